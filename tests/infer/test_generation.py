"""chatlm.infer.generation: legacy presets, generate_answers for seq2seq and causal models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from chatlm.infer.generation import (
    PRESETS,
    contrastive_search,
    generate_answers,
    generation_config,
)
from chatlm.model.build import build_model
from chatlm.model.config import ModelShape

TINY = ModelShape(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
PROMPTS = ["你好", "今天天气很好，我们去公园"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like chatlm's ([PAD]=0, [EOS]=1), trained in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["今天天气很好，我们去公园散步吧", "hello world", "你好"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def t5(tokenizer):
    torch.manual_seed(0)
    return build_model("t5", len(tokenizer), TINY)


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    return build_model("llama", len(tokenizer), TINY)


def encode(tokenizer, seq2seq: bool):
    tokenizer.padding_side = "right" if seq2seq else "left"
    texts = [p + "[EOS]" for p in PROMPTS] if seq2seq else PROMPTS
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


def test_presets_are_the_legacy_ones():
    common = {"repetition_penalty": 1.3, "remove_invalid_values": True}
    assert PRESETS == {
        "greedy": {**common, "num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 4},
        "beam": {**common, "num_beams": 5, "do_sample": True, "top_k": 50, "top_p": 0.95,
                 "no_repeat_ngram_size": 4, "length_penalty": 1.2, "early_stopping": True},
        "sampling": {**common, "num_beams": 1, "do_sample": True, "top_k": 50,
                     "temperature": 0.98, "top_p": 0.80, "no_repeat_ngram_size": 4},
        "contrastive": {**common, "penalty_alpha": 0.5, "top_k": 50},
    }


@pytest.mark.parametrize("preset", list(PRESETS))
def test_generation_config(preset, t5, llama, tokenizer):
    cfg = generation_config(preset, 17, t5, tokenizer)
    assert isinstance(cfg, GenerationConfig)
    assert (cfg.max_new_tokens, cfg.pad_token_id, cfg.eos_token_id) == (17, 0, 1)
    assert cfg.decoder_start_token_id == t5.config.decoder_start_token_id == 0
    for key, value in PRESETS[preset].items():
        assert getattr(cfg, key) == value, key
    causal = generation_config(preset, 5, llama, None)  # ids from the model config
    assert (causal.pad_token_id, causal.eos_token_id) == (0, 1)
    assert causal.decoder_start_token_id is None


def test_generation_config_errors(t5, tokenizer):
    valid = "greedy, beam, sampling, contrastive"
    with pytest.raises(ValueError, match=f"unknown generation preset 'top'; choose one of {valid}"):
        generation_config("top", 8, t5, tokenizer)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_config("greedy", 0, t5, tokenizer)


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_generate_answers_every_preset(arch, preset, request, tokenizer):
    model = request.getfixturevalue(arch)
    ids, mask = encode(tokenizer, arch == "t5")
    torch.manual_seed(0)
    answers = generate_answers(model, tokenizer, ids, mask, preset=preset, max_new_tokens=6)
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    assert all(a == a.strip() and "[PAD]" not in a and "[EOS]" not in a for a in answers)
    if preset in ("greedy", "contrastive"):  # deterministic
        assert generate_answers(model, tokenizer, ids, mask, preset=preset, max_new_tokens=6) == answers


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_eval_mode_during_generation_and_restored(arch, request, tokenizer):
    model = request.getfixturevalue(arch)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        model.train()
        generate_answers(model, tokenizer, *encode(tokenizer, arch == "t5"), max_new_tokens=3)
        assert seen and not any(seen) and model.training
        model.eval()
        generate_answers(model, tokenizer, *encode(tokenizer, arch == "t5"), max_new_tokens=3)
        assert not model.training
    finally:
        handle.remove()
        model.train()


def test_causal_answers_exclude_the_prompt(llama, tokenizer):
    ids, mask = encode(tokenizer, seq2seq=False)
    answers = generate_answers(llama, tokenizer, ids, mask, preset="greedy", max_new_tokens=5)
    llama.eval()
    cfg = generation_config("greedy", 5, llama, tokenizer)
    with torch.no_grad():
        full = llama.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    expected = tokenizer.batch_decode(full[:, ids.shape[1]:], skip_special_tokens=True)
    assert answers == [e.strip() for e in expected]
    assert full.shape[1] > ids.shape[1]


def test_causal_needs_left_padding(llama, tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # right-padded
    with pytest.raises(ValueError, match="left-padded"):
        generate_answers(llama, tokenizer, enc["input_ids"], enc["attention_mask"])


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_contrastive_without_penalty_is_greedy(arch, request, tokenizer):
    """alpha = 0 ranks candidates by probability alone: the greedy choice, same processors."""
    model = request.getfixturevalue(arch).eval()
    ids, mask = encode(tokenizer, arch == "t5")
    cfg = generation_config("contrastive", 6, model, tokenizer)
    cfg.penalty_alpha, cfg.top_k = 0.0, 4
    ours = contrastive_search(model, ids, mask, cfg)
    greedy = generation_config("greedy", 6, model, tokenizer)
    greedy.no_repeat_ngram_size = None  # the contrastive preset has none
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
    assert torch.equal(ours, ref)


def test_contrastive_first_step_by_hand(t5, tokenizer):
    """Step 1: argmax over the top-k of (1 - a) * p - a * max cosine(candidate, context)."""
    ids, mask = encode(tokenizer, seq2seq=True)
    t5.eval()
    cfg = generation_config("contrastive", 1, t5, tokenizer)
    cfg.top_k = 5
    ours = contrastive_search(t5, ids, mask, cfg)
    alpha, start = cfg.penalty_alpha, torch.zeros(len(PROMPTS), 1, dtype=torch.long)
    with torch.no_grad():
        out = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=start,
                 output_hidden_states=True)
        # One decoder token so far: the repetition penalty applies to it (id 0).
        logits = out.logits[:, -1].clone()
        logits[:, 0] = torch.where(logits[:, 0] < 0, logits[:, 0] * 1.3, logits[:, 0] / 1.3)
        probs, cand = logits.softmax(-1).topk(5, dim=-1)
        context = out.decoder_hidden_states[-1][:, 0]
        for row in range(len(PROMPTS)):
            scores = []
            for j in range(5):
                dec = torch.cat([start[row], cand[row, j:j + 1]])[None]
                h = t5(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                       decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states[-1]
                cos = torch.cosine_similarity(h[0, -1], context[row], dim=0)
                scores.append((1 - alpha) * probs[row, j] - alpha * cos)
            assert ours[row, 1] == cand[row, int(torch.stack(scores).argmax())]
    assert ours.shape == (len(PROMPTS), 2) and ours[:, 0].eq(0).all()


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("preset", ["greedy", "contrastive"])
def test_generate_through_lora_wrapper(arch, preset, tokenizer):
    """The module hands generate_answers its PEFT-wrapped model; zero-init LoRA changes nothing."""
    from chatlm.model.lora import apply_lora

    torch.manual_seed(0)
    base = build_model(arch, len(tokenizer), TINY)
    ids, mask = encode(tokenizer, arch == "t5")
    expected = generate_answers(base, tokenizer, ids, mask, preset=preset, max_new_tokens=4)
    wrapped = apply_lora(base)
    assert generate_answers(wrapped, tokenizer, ids, mask, preset=preset, max_new_tokens=4) == expected
