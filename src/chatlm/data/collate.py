"""Collators: lists of rows -> dict of int64 tensors ``input_ids``, ``attention_mask``, ``labels``.

Ignored label positions are -100. Seq2seq batches feed a T5
(``model(input_ids, attention_mask=..., labels=...)``); causal batches feed a causal LM the
same way (labels aligned with input_ids; the model shifts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from chatlm.data.formatting import (
    DataFormat,
    Template,
    causal_example,
    causal_prompt_ids,
    legacy_prompt_text,
    legacy_texts,
    text_ids,
)
from chatlm.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "CausalCollator",
    "Seq2SeqCollator",
    "TextCollator",
    "make_collator",
    "pad_sequences",
    "prompt_ids_for_generation",
]

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right") -> torch.Tensor:
    """Stack lists of ids into an int64 tensor, padding to the longest with ``value``."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            row = torch.as_tensor(s, dtype=torch.long)
            if side == "right":
                out[i, : len(s)] = row
            else:
                out[i, width - len(s) :] = row
    return out


def _require_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} needs a pad and an eos token")
    return int(pad), int(eos)


def _causal_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    ids = [s[0] for s in seqs]
    input_ids = pad_sequences(ids, pad_id)
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    labels = pad_sequences([s[1] for s in seqs], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Seq2SeqCollator:
    """Legacy-exact T5 batches (``train_low_mem.py``).

    Each row becomes ``legacy_texts(prompt, response, max_seq_len)``; prompts and responses
    are tokenized separately with ``padding=True, return_token_type_ids=False`` and no
    truncation. ``input_ids`` / ``attention_mask`` come from the prompts (legacy
    ``input_ids`` / ``input_mask``), ``labels`` are the response ids with pad -> -100
    (legacy ``target_ids``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_token_id, _ = _require_ids(tokenizer)

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> Batch:
        pairs = [legacy_texts(ex["prompt"], ex["response"], self.max_seq_len) for ex in examples]
        prompts = [p for p, _ in pairs]
        responses = [r for _, r in pairs]
        enc = self.tokenizer(prompts, padding=True, return_token_type_ids=False)
        dec = self.tokenizer(responses, padding=True, return_token_type_ids=False)
        labels = torch.tensor(dec["input_ids"], dtype=torch.long)
        labels[labels == self.pad_token_id] = IGNORE_INDEX
        return {
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
            "labels": labels,
        }


class CausalCollator:
    """Decoder-only SFT batches: prompt + response + eos, right-padded.

    Args:
        tokenizer: Tokenizer with pad and eos tokens.
        max_seq_len: Tokens per example; longer ones keep their beginning.
        mask_prompt: Labels of the prompt tokens are -100 (loss on the answer only).
        template: ``plain`` (``prompt + "\\n"``) or ``chat_template`` (the tokenizer's template
            with the generation prompt). See :mod:`chatlm.data.formatting`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int,
        mask_prompt: bool = True,
        template: Template = "plain",
    ) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.mask_prompt = mask_prompt
        self.template = template
        self.pad_token_id, self.eos_token_id = _require_ids(tokenizer)

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> Batch:
        prompts = causal_prompt_ids(self.tokenizer, [ex["prompt"] for ex in examples], self.template)
        responses = text_ids(self.tokenizer, [ex["response"] for ex in examples])
        seqs = [
            causal_example(p, r, self.eos_token_id, self.max_seq_len, self.mask_prompt)
            for p, r in zip(prompts, responses)
        ]
        return _causal_batch(seqs, self.pad_token_id)


class TextCollator:
    """Causal pretraining batches on plain text: text tokens + eos, cut to ``max_seq_len``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_token_id, self.eos_token_id = _require_ids(tokenizer)

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> Batch:
        texts = text_ids(self.tokenizer, [ex["text"] for ex in examples])
        seqs = [causal_example([], t, self.eos_token_id, self.max_seq_len, mask_prompt=False) for t in texts]
        return _causal_batch(seqs, self.pad_token_id)


def make_collator(
    format: DataFormat, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, mask_prompt: bool = True
) -> Seq2SeqCollator | CausalCollator | TextCollator:
    """The collator of a data format (``legacy``, ``causal``, ``chat_template``, ``text``)."""
    if format == "legacy":
        return Seq2SeqCollator(tokenizer, max_seq_len)
    if format == "causal":
        return CausalCollator(tokenizer, max_seq_len, mask_prompt=mask_prompt, template="plain")
    if format == "chat_template":
        return CausalCollator(tokenizer, max_seq_len, mask_prompt=mask_prompt, template="chat_template")
    if format == "text":
        return TextCollator(tokenizer, max_seq_len)
    if format == "llamafactory":  # LLaMA-Factory's `default` template (chatlm.data.llamafactory)
        from chatlm.data.llamafactory import LlamaFactoryCollator

        return LlamaFactoryCollator(tokenizer, max_seq_len, mask_prompt=mask_prompt)
    raise ValueError(f"unknown data format {format!r}; expected legacy, causal, chat_template or text")


def prompt_ids_for_generation(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    format: DataFormat,
    max_seq_len: int,
) -> Batch:
    """Model inputs for generating answers to ``prompts`` (eval / predict), as int64 tensors.

    * ``legacy``: encoder input ``prompt[:max_seq_len-5] + "[EOS]"``, tokenized as the
      legacy collator does (right padding); feed to T5 ``generate``.
    * ``causal`` / ``chat_template``: the same prompt ids as training
      (:func:`~chatlm.data.formatting.causal_prompt_ids`), cut to ``max_seq_len`` (keep the
      beginning), **left**-padded so generation continues right after each prompt.
    * ``text``: the prompt's own tokens (a continuation), left-padded.

    Returns ``{"input_ids", "attention_mask"}``.
    """
    pad_id, _ = _require_ids(tokenizer)
    prompts = list(prompts)
    if format == "legacy":
        enc = tokenizer([legacy_prompt_text(p, max_seq_len) for p in prompts], padding=True,
                        return_token_type_ids=False)
        return {
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        }
    if format in ("causal", "chat_template"):
        template: Template = "plain" if format == "causal" else "chat_template"
        ids = causal_prompt_ids(tokenizer, prompts, template)
    elif format == "text":
        ids = text_ids(tokenizer, prompts)
    elif format == "llamafactory":
        from chatlm.data.llamafactory import llamafactory_prompt_ids

        ids = llamafactory_prompt_ids(tokenizer, prompts)
    else:
        raise ValueError(f"unknown data format {format!r}; expected legacy, causal, chat_template or text")
    ids = [list(s[:max_seq_len]) for s in ids]
    input_ids = pad_sequences(ids, pad_id, side="left")
    attention_mask = pad_sequences([[1] * len(s) for s in ids], 0, side="left")
    return {"input_ids": input_ids, "attention_mask": attention_mask}
