"""Answer generation with the legacy project's four decoding presets.

``PRESETS`` holds the decoding settings of the legacy ``my_generate`` (greedy, beam, sampling,
contrastive), each with the shared ``repetition_penalty=1.3`` and ``remove_invalid_values``.
Token ids (pad, eos, decoder start) are not in the presets: :func:`generation_config` takes
them from the tokenizer and the model config (the legacy code hard-codes pad 0 / eos 1, which
are the chatlm tokenizers' ids).

Transformers 5 moved contrastive search out of the library (it downloads it from the Hub
with ``trust_remote_code``), which an offline trainer cannot do. :func:`generate_answers`
therefore runs contrastive search with a small local implementation of the same algorithm
(Su et al. 2022, as Transformers 4.x's ``_contrastive_search``): without a KV cache, so each
new token costs ``top_k`` full forward passes: fine for evaluating small models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    InfNanRemoveLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.modeling_outputs import BaseModelOutput

#: Settings every legacy preset shares.
COMMON: dict[str, Any] = {"repetition_penalty": 1.3, "remove_invalid_values": True}

PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {**COMMON, "num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 4},
    "beam": {**COMMON, "num_beams": 5, "do_sample": True, "top_k": 50, "top_p": 0.95,
             "no_repeat_ngram_size": 4, "length_penalty": 1.2, "early_stopping": True},
    "sampling": {**COMMON, "num_beams": 1, "do_sample": True, "top_k": 50, "temperature": 0.98,
                 "top_p": 0.80, "no_repeat_ngram_size": 4},
    "contrastive": {**COMMON, "penalty_alpha": 0.5, "top_k": 50},
}


def _token_id(tokenizer: Any, model: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None) if tokenizer is not None else None
    if value is None:
        value = getattr(getattr(model, "config", None), name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def generation_config(preset: str, max_new_tokens: int, model: Any, tokenizer: Any) -> GenerationConfig:
    """The ``GenerationConfig`` of a legacy preset.

    ``pad_token_id`` / ``eos_token_id`` come from the tokenizer (else the model config);
    a seq2seq model's ``decoder_start_token_id`` from its config (else its generation config,
    else the pad id, as T5 does).

    Raises:
        ValueError: unknown preset (the message lists the valid ones) or ``max_new_tokens < 1``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown generation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids: dict[str, Any] = {
        "pad_token_id": _token_id(tokenizer, model, "pad_token_id"),
        "eos_token_id": _token_id(tokenizer, model, "eos_token_id"),
    }
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        ids["decoder_start_token_id"] = ids["pad_token_id"] if start is None else start
    return GenerationConfig(max_new_tokens=max_new_tokens, **ids, **PRESETS[preset])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    preset: str = "greedy",
    max_new_tokens: int = 64,
) -> list[str]:
    """Generate one answer per row and decode it (special tokens skipped, whitespace stripped).

    Args:
        model: A seq2seq (T5) or causal model, possibly PEFT-wrapped or ``torch.compile``-d, whole or
            per block (the eager model generates). It is put in eval mode for the call and back in train mode
            afterwards if it was training.
        input_ids: Prompts, ``(batch, length)``. Causal models need them **left-padded** (the
            answer continues the last column); only the new tokens are decoded.
        attention_mask: 1 on prompt tokens, 0 on padding.
        preset: A key of :data:`PRESETS`.

    Raises:
        ValueError: unknown preset, or right-padded prompts for a causal model.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile: generate with the eager model
    config = generation_config(preset, max_new_tokens, model, tokenizer)
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    if not seq2seq and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("causal generation needs left-padded prompts (a row ends in padding)")
    was_training = model.training
    model.eval()
    try:
        # compiled blocks (model.compile) run eager here: generation changes shapes every step
        with torch.compiler.set_stance("force_eager"):
            if config.penalty_alpha:
                sequences = contrastive_search(model, input_ids, attention_mask, config)
            else:
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           generation_config=config)
    finally:
        model.train(was_training)
    if not seq2seq:
        sequences = sequences[:, input_ids.shape[1]:]
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return [t.strip() for t in texts]


# --------------------------------------------------------------------------- contrastive search
def _logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The processors Transformers' ``generate`` would build for these settings (same order)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    return processors


def _forward_last(model: Any, seq2seq: bool, tokens: torch.Tensor, mask: torch.Tensor,
                  encoder_out: torch.Tensor | None, encoder_mask: torch.Tensor | None):
    """Logits of the last position and last-layer hidden states of every position."""
    if seq2seq:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out),
                    attention_mask=encoder_mask,
                    decoder_input_ids=tokens, output_hidden_states=True, use_cache=False)
        hidden = out.decoder_hidden_states[-1]
    else:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids,
                    output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]
    return out.logits[:, -1, :].float(), hidden.float()


def contrastive_search(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       config: GenerationConfig) -> torch.Tensor:
    """Contrastive search (``penalty_alpha``, ``top_k``) with the config's logits processors.

    Each step keeps the ``top_k`` most probable next tokens (after repetition penalty etc.)
    and picks ``argmax((1 - alpha) * p(token) - alpha * max cosine(h_token, h_context))``,
    where ``h`` are last-layer hidden states and the context is every earlier (non-padding)
    position. With ``alpha = 0`` it is greedy search. Rows that produced EOS get padding.

    Returns:
        Like ``generate``: decoder tokens starting with the decoder start token (seq2seq) or
        the prompt followed by the new tokens (causal).
    """
    config = copy.deepcopy(config)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    alpha, k = float(config.penalty_alpha), int(config.top_k or 1)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    eos = config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    processors = _logits_processors(config)
    batch = input_ids.shape[0]

    encoder_out = encoder_mask = None
    if seq2seq:
        encoder_out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          return_dict=True).last_hidden_state
        encoder_mask = attention_mask
        tokens = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long,
                            device=input_ids.device)
        mask = torch.ones_like(tokens)
    else:
        tokens, mask = input_ids, attention_mask.long()
    logits, hidden = _forward_last(model, seq2seq, tokens, mask, encoder_out, encoder_mask)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    k = min(k, logits.shape[-1])

    for _ in range(int(config.max_new_tokens)):
        probs = torch.softmax(processors(tokens, logits), dim=-1)
        top_probs, top_ids = probs.topk(k, dim=-1)  # (batch, k)
        # Every candidate appended to its row, all batch * k rows in one forward pass.
        cand_tokens = torch.cat([tokens.repeat_interleave(k, 0), top_ids.reshape(-1, 1)], dim=1)
        cand_mask = torch.cat([mask.repeat_interleave(k, 0), mask.new_ones(batch * k, 1)], dim=1)
        cand_logits, cand_hidden = _forward_last(
            model, seq2seq, cand_tokens, cand_mask,
            None if encoder_out is None else encoder_out.repeat_interleave(k, 0),
            None if encoder_mask is None else encoder_mask.repeat_interleave(k, 0))
        context = torch.nn.functional.normalize(hidden, dim=-1).repeat_interleave(k, 0)
        new = torch.nn.functional.normalize(cand_hidden[:, -1:, :], dim=-1)
        cosine = (context @ new.transpose(1, 2)).squeeze(-1)  # (batch * k, context length)
        cosine = cosine.masked_fill(mask.repeat_interleave(k, 0) == 0, -1.0)
        penalty = cosine.max(dim=-1).values.view(batch, k)
        score = (1.0 - alpha) * top_probs - alpha * penalty
        choice = score.argmax(dim=-1)  # (batch,)
        rows = torch.arange(batch, device=tokens.device) * k + choice
        next_ids = torch.where(unfinished, top_ids.gather(1, choice[:, None]).squeeze(1),
                               torch.full_like(choice, pad))
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        hidden = cand_hidden[rows]
        logits = cand_logits[rows]
        if eos_ids.numel():
            unfinished &= ~torch.isin(next_ids, eos_ids)
        if not bool(unfinished.any()):
            break
    return tokens
