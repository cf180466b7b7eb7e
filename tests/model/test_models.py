"""chatlm.model: build, safe loading (HF dirs and legacy state dicts), export, LoRA, freezing."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from chatlm.errors import ModelLoadError
from chatlm.model.config import ModelShape
from chatlm.model.lora import apply_lora
from chatlm.model.build import build_model, count_parameters, freeze_modules, is_seq2seq
from chatlm.model.load import load_model
from chatlm.model.export import save_hf

TINY = ModelShape(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like chatlm's ([PAD]=0, [EOS]=1), trained in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["今天天气很好，我们去公园散步吧", "hello world", "你好"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


def tiny(arch: str, seed: int = 0, vocab: int = VOCAB, tie_word_embeddings: bool = True, **overrides):
    torch.manual_seed(seed)
    return build_model(arch, vocab, dataclasses.replace(TINY, **overrides), tie_word_embeddings=tie_word_embeddings)


def batch(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(2, VOCAB, (2, 5), generator=g) if arch == "t5" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch(arch)).logits


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- build
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_build_forward_and_loss(arch):
    model = tiny(arch)
    out = model(**batch(arch))
    assert torch.isfinite(out.loss)
    assert out.logits.shape[-1] == VOCAB
    out.loss.backward()
    assert is_seq2seq(model) == (arch == "t5")


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_same_seed_same_weights(arch):
    assert same_weights(tiny(arch, seed=3), tiny(arch, seed=3))
    assert not same_weights(tiny(arch, seed=3), tiny(arch, seed=4))


def test_t5_is_the_legacy_model():
    """The legacy script builds T5ForConditionalGeneration(T5Config(...)) after set_seed."""
    torch.manual_seed(23333)
    legacy = T5ForConditionalGeneration(T5Config(
        d_ff=64, d_model=32, num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=2,
        vocab_size=VOCAB, decoder_start_token_id=0, eos_token_id=1))
    ours = tiny("t5", seed=23333)
    assert same_weights(legacy, ours)
    assert ours.config.decoder_start_token_id == 0 and ours.config.pad_token_id == 0
    assert ours.config.eos_token_id == 1 and ours.config.dropout_rate == 0.1
    assert ours.lm_head.weight is ours.shared.weight


def test_llama_config():
    model = tiny("llama", dropout=0.0, max_position_embeddings=128)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32, 64, 2)
    assert cfg.num_attention_heads == cfg.num_key_value_heads == 4 and cfg.head_dim == 8
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.max_position_embeddings) == (0, 1, 128)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = tiny("llama", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_build_errors():
    with pytest.raises(ValueError, match="unknown arch 'gpt'"):
        build_model("gpt", VOCAB)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple"):
        build_model("llama", VOCAB, shape=ModelShape(d_model=30, num_heads=4))


def test_count_parameters_counts_tied_once():
    model = tiny("t5")
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in set(model.parameters()))


# --------------------------------------------------------------------------- HF export / load
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_save_hf_round_trip(arch, tokenizer, tmp_path):
    model = tiny(arch)
    out = save_hf(model, tokenizer, tmp_path / "hf")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    plain = auto.from_pretrained(out)
    torch.testing.assert_close(logits(plain, arch), logits(model, arch), rtol=0, atol=0)
    ours = load_model(out, shape=ModelShape(d_model=999), expected_vocab_size=len(tokenizer))  # kwargs ignored
    torch.testing.assert_close(logits(ours, arch), logits(model, arch), rtol=0, atol=0)


def test_save_hf_exports_use_cache(tokenizer, tmp_path):
    model = tiny("llama")
    model.config.use_cache = False  # as gradient checkpointing sets it for training
    out = save_hf(model, tokenizer, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False


def test_load_consumes_the_rng_like_build(tmp_path):
    """Legacy SFT: set_seed, build, load the checkpoint; the data order depends on the RNG after."""
    for arch in ("t5", "llama"):
        f = tmp_path / f"{arch}.bin"
        torch.save(tiny(arch).state_dict(), f)
        torch.manual_seed(1)
        build_model(arch, VOCAB, TINY)
        after_build = torch.rand(4)
        torch.manual_seed(1)
        load_model(f, arch=arch, shape=TINY)
        assert torch.equal(torch.rand(4), after_build)


def test_save_hf_replaces_previous_export(tokenizer, tmp_path):
    out = tmp_path / "hf"
    save_hf(tiny("t5", seed=1), tokenizer, out)
    (out / "stale.txt").write_text("from the old export")
    model = tiny("t5", seed=2)
    save_hf(model, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert os.listdir(tmp_path) == ["hf"]  # no temp or backup directory left
    assert same_weights(AutoModelForSeq2SeqLM.from_pretrained(out), model)


def test_save_hf_failure_keeps_previous_export(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    first = tiny("t5", seed=1)
    save_hf(first, tokenizer, out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tiny("t5", seed=2), tokenizer, out)
    assert os.listdir(tmp_path) == ["hf"]
    assert same_weights(AutoModelForSeq2SeqLM.from_pretrained(out), first)


def test_load_hf_dir_errors(tokenizer, tmp_path):
    save_hf(tiny("t5"), tokenizer, tmp_path / "hf")
    with pytest.raises(ModelLoadError, match="300 tokens but the tokenizer has 512; use the matching"):
        load_model(tmp_path / "hf", expected_vocab_size=512)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


# --------------------------------------------------------------------------- legacy files
def test_load_legacy_bin(tmp_path):
    """The legacy script's torch.save(state_dict, f, _use_new_zipfile_serialization=False)."""
    model = tiny("t5", seed=5)
    f = tmp_path / "chat_small_t5.best.bin"
    torch.save(model.state_dict(), f, _use_new_zipfile_serialization=False)
    loaded = load_model(f, arch="t5", expected_vocab_size=VOCAB, shape=TINY)
    assert same_weights(loaded, model)
    assert loaded.lm_head.weight is loaded.shared.weight  # still tied after loading
    # arch and vocabulary inferred from the weights
    assert same_weights(load_model(f, shape=TINY), model)


@pytest.mark.parametrize("variant", ["no_lm_head", "ddp_prefix", "lightning_ckpt", "zip", "safetensors"])
def test_load_state_dict_variants(variant, tmp_path):
    arch = "llama" if variant in ("lightning_ckpt", "safetensors") else "t5"
    model = tiny(arch, seed=6)
    sd = dict(model.state_dict())
    f = tmp_path / "w.bin"
    if variant == "no_lm_head":
        sd.pop("lm_head.weight")
        torch.save(sd, f, _use_new_zipfile_serialization=False)
    elif variant == "ddp_prefix":
        torch.save({f"module.{k}": v for k, v in sd.items()}, f)
    elif variant == "lightning_ckpt":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1}, f)
    elif variant == "zip":
        f = tmp_path / "w.pt"
        torch.save(sd, f)
    else:
        from safetensors.torch import save_file

        f = tmp_path / "model.safetensors"
        sd.pop("lm_head.weight")  # safetensors cannot hold shared tensors
        save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    assert same_weights(load_model(f, arch=arch, shape=TINY), model)


def test_load_legacy_bin_with_config_beside(tmp_path):
    """The legacy script writes its model config (a diff dict) next to the weights."""
    model = tiny("t5", seed=7, num_decoder_layers=1)
    (tmp_path / "model_config.json").write_text(json.dumps(model.config.to_diff_dict()))
    f = tmp_path / "m.bin"
    torch.save(model.state_dict(), f, _use_new_zipfile_serialization=False)
    loaded = load_model(f)  # no build options: the config beside the file decides
    assert loaded.config.num_decoder_layers == 1 and loaded.config.dropout_rate == 0.1
    assert same_weights(loaded, model)
    # Explicit build options win over the file (the legacy script builds from its defaults).
    loaded = load_model(f, arch="t5", shape=dataclasses.replace(TINY, num_decoder_layers=1, dropout=0.0))
    assert loaded.config.dropout_rate == 0.0 and same_weights(loaded, model)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(f, arch="t5", shape=TINY)  # 2 decoder layers


def test_load_legacy_config_without_model_type(tmp_path):
    """A hand-written or old config without model_type is read as the weights' arch."""
    model = tiny("t5", seed=8)
    keys = ("d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size")
    config = {k: getattr(model.config, k) for k in keys} | {"transformers_version": "4.36.2",
                                                            "output_past": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert same_weights(load_model(tmp_path / "m.pt"), model)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


@pytest.mark.parametrize("fmt", ["legacy", "zip", "raw_pickle"])
def test_malicious_pickle_is_refused(fmt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "evil.bin"
    payload = {"shared.weight": torch.zeros(3, 2), "x": _Evil()}
    if fmt == "legacy":
        torch.save(payload, f, _use_new_zipfile_serialization=False)
    elif fmt == "zip":
        torch.save(payload, f)
    else:
        f.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ModelLoadError, match="refused as unsafe") as err:
        load_model(f, arch="t5", shape=TINY)
    assert str(f) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("damage", ["truncated", "truncated_zip", "garbage", "empty", "bad_safetensors"])
def test_corrupt_file(damage, tmp_path):
    sd = tiny("t5").state_dict()
    f = tmp_path / ("w.safetensors" if damage == "bad_safetensors" else "w.bin")
    if damage.startswith("truncated"):
        torch.save(sd, f, _use_new_zipfile_serialization=damage == "truncated_zip")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(b"not a checkpoint at all " * 20)
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as err:
        load_model(f, arch="t5", shape=TINY)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_model(tmp_path / "nope.bin", arch="t5")


def test_vocab_mismatch(tmp_path):
    f = tmp_path / "w.bin"
    torch.save(tiny("t5").state_dict(), f, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError) as err:
        load_model(f, arch="t5", expected_vocab_size=512, shape=TINY)
    msg = str(err.value)
    assert "300" in msg and "512" in msg and "tokenizer" in msg and str(f) in msg


def test_wrong_size_options(tmp_path):
    f = tmp_path / "w.bin"
    torch.save(tiny("t5").state_dict(), f, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError, match="shapes differ"):
        load_model(f, arch="t5", shape=dataclasses.replace(TINY, d_ff=128))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(f, arch="t5", shape=dataclasses.replace(TINY, num_layers=3))


# --------------------------------------------------------------------------- LoRA / freezing
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_lora_merged_export_matches(arch, tokenizer, tmp_path):
    peft_model = apply_lora(tiny(arch), r=4, alpha=8)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    expected_targets = {"t5": {"q", "v"}, "llama": {"q_proj", "v_proj"}}[arch]
    assert set(peft_model.peft_config["default"].target_modules) == expected_targets
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    before = logits(peft_model, arch)
    out = save_hf(peft_model, tokenizer, tmp_path / "hf")
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    merged = auto.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, arch), before, rtol=1e-5, atol=1e-5)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())  # original untouched
    torch.testing.assert_close(logits(peft_model, arch), before, rtol=0, atol=0)


def test_freeze_legacy_sft():
    """Legacy SFT freezes shared + encoder: the tied head freezes too, only the decoder trains."""
    model = tiny("t5")
    trainable, total = freeze_modules(model, ["shared", "encoder"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("decoder.block.") or n == "decoder.final_layer_norm.weight"
                         for n in names)
    assert "decoder.final_layer_norm.weight" in names
    assert not model.lm_head.weight.requires_grad
    assert not model.decoder.embed_tokens.weight.requires_grad
    decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
    assert (trainable, total) == (decoder, count_parameters(model)[1])
    assert 0 < trainable < total


def test_freeze_errors_and_peft_names():
    with pytest.raises(ValueError, match="match no parameter"):
        freeze_modules(tiny("t5"), ["encoderr"])
    with pytest.raises(ValueError, match="match no parameter"):
        freeze_modules(tiny("t5"), ["shar"])  # whole name parts only
    peft_model = apply_lora(tiny("t5"))
    freeze_modules(peft_model, ["decoder"])
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".decoder." in n)
