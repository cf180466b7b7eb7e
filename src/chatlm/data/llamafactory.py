"""LLaMA-Factory's data layouts, reproduced without LLaMA-Factory (for parity and migration).

``legacy/train_with_real_llamafactory.py`` runs LLaMA-Factory itself; the main path reproduces
what LLaMA-Factory 0.9.5 feeds the model with two data options:

* ``--data.format llamafactory`` (stage ``sft``): one user turn of LLaMA-Factory's ``default``
  template. Each text piece is tokenized on its own (``add_special_tokens=False``), as
  ``Template._convert_elements_to_ids`` does::

      prompt ids   = ids("Human: " + prompt) + [eos] + ids("\\nAssistant:")
      response ids = ids(response) + [eos] + ids("\\n")

  Both are cut by LLaMA-Factory's ``infer_seqlen`` rule to ``max_seq_len`` (= ``cutoff_len``);
  prompt labels are -100 (``train_on_prompt: false``); batches are right-padded to a
  multiple of 8 (its SFT collator's ``pad_to_multiple_of=8`` when training).
* ``--data.format text --data.packing true`` (stage ``pt``): every document + the eos
  *text* is tokenized, the ids are concatenated and cut into blocks of ``max_seq_len``
  tokens; the tail shorter than a block is dropped. LLaMA-Factory does this separately for
  each ``datasets.map`` batch (``preprocessing_batch_size`` rows, 1000 by default) of each
  worker's contiguous shard (``preprocessing_num_workers``), dropping each group's tail:
  ``--data.packing_group_rows`` and ``--data.packing_shards`` reproduce those groups.
  Labels are the ids (pad ids -> -100, as ``DataCollatorForLanguageModeling``).

Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from chatlm.errors import DataError

__all__ = [
    "LF_TEMPLATES",
    "LlamaFactoryCollator",
    "LlamaFactoryTemplate",
    "PackedCollator",
    "infer_seqlen",
    "llamafactory_example",
    "llamafactory_prompt_ids",
    "pack_text_dataset",
    "pack_token_ids",
    "packing_groups",
]

IGNORE_INDEX = -100
_EOS = object()  # stands for the eos token id in a template's slots


@dataclass(frozen=True)
class LlamaFactoryTemplate:
    """The slots of one LLaMA-Factory template turn: strings (``{content}`` filled) or eos."""

    user: tuple[Any, ...]
    assistant: tuple[Any, ...]


#: Templates reproduced here (LLaMA-Factory ``data/template.py``; no system prompt, no prefix).
LF_TEMPLATES: dict[str, LlamaFactoryTemplate] = {
    "default": LlamaFactoryTemplate(user=("Human: {content}", _EOS, "\nAssistant:"),
                                    assistant=("{content}", _EOS, "\n")),
}


def _template(name: str) -> LlamaFactoryTemplate:
    if name not in LF_TEMPLATES:
        raise DataError(f"LLaMA-Factory template {name!r} is not reproduced by chatlm; "
                        f"supported: {', '.join(LF_TEMPLATES)}")
    return LF_TEMPLATES[name]


def _slot_ids(tokenizer: PreTrainedTokenizerBase, slots: Sequence[Any], content: str) -> list[int]:
    ids: list[int] = []
    for slot in slots:
        if slot is _EOS:
            ids.append(int(tokenizer.eos_token_id))
        else:
            text = slot.replace("{content}", content)
            if text:
                ids += tokenizer.encode(text, add_special_tokens=False)
    return ids


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's truncation of a (prompt, response) pair to ``cutoff_len`` tokens.

    A short response (under half the budget) is kept whole and the prompt is cut; else a
    short prompt is kept and the response cut; else both are cut in proportion.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def llamafactory_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                            template: str = "default") -> list[list[int]]:
    """The template's user-turn ids for each prompt (what generation continues from)."""
    t = _template(template)
    return [_slot_ids(tokenizer, t.user, p) for p in prompts]


def llamafactory_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    cutoff_len: int,
    template: str = "default",
    mask_prompt: bool = True,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one single-turn SFT example, as LLaMA-Factory's supervised processor."""
    t = _template(template)
    source = _slot_ids(tokenizer, t.user, prompt)
    target = _slot_ids(tokenizer, t.assistant, response)
    source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len)
    source, target = source[:source_len], target[:target_len]
    labels = (list(source) if not mask_prompt else [IGNORE_INDEX] * source_len) + target
    return source + target, labels


class LlamaFactoryCollator:
    """``--data.format llamafactory``: LLaMA-Factory SFT batches (see the module docstring).

    Args:
        tokenizer: Tokenizer with pad and eos tokens.
        max_seq_len: LLaMA-Factory's ``cutoff_len``.
        mask_prompt: No loss on the prompt (LLaMA-Factory ``train_on_prompt: false``).
        template: LLaMA-Factory template name (``default``).
        pad_to_multiple_of: Pad the batch width to a multiple of this (LLaMA-Factory: 8).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, mask_prompt: bool = True,
                 template: str = "default", pad_to_multiple_of: int | None = 8) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} needs a pad and an eos token")
        _template(template)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.mask_prompt = mask_prompt
        self.template = template
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        seqs = [llamafactory_example(self.tokenizer, ex["prompt"], ex["response"], self.max_seq_len,
                                     self.template, self.mask_prompt) for ex in examples]
        width = max((len(ids) for ids, _ in seqs), default=0)
        if self.pad_to_multiple_of and width % self.pad_to_multiple_of:
            width += self.pad_to_multiple_of - width % self.pad_to_multiple_of
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            if ids:
                input_ids[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                attention_mask[i, :len(ids)] = 1
                labels[i, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------- packing (pt)
def packing_groups(n: int, shards: int = 1, group_rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` packed separately, in order.

    ``shards`` contiguous shards as ``datasets.Dataset.shard(contiguous=True)`` makes them for
    ``map(num_proc=shards)`` (the first ``n % shards`` get one row more; never more shards than
    rows), each cut into groups of ``group_rows`` rows (None: the whole shard).
    """
    if n < 0 or shards < 1 or (group_rows is not None and group_rows < 1):
        raise ValueError(f"packing_groups needs n >= 0, shards >= 1, group_rows >= 1 or None "
                         f"(got {n}, {shards}, {group_rows})")
    shards = max(1, min(shards, n))
    div, mod = divmod(n, shards)
    out = []
    for i in range(shards):
        start = div * i + min(i, mod)
        stop = start + div + (1 if i < mod else 0)
        step = group_rows or max(1, stop - start)
        out += [(s, min(s + step, stop)) for s in range(start, stop, step)]
    return out


def pack_token_ids(token_lists: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate ``token_lists`` and cut into full blocks of ``block_size`` (tail dropped)."""
    flat = [t for ids in token_lists for t in ids]
    usable = (len(flat) // block_size) * block_size
    return [flat[i:i + block_size] for i in range(0, usable, block_size)]


def _document_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    eos = tokenizer.eos_token
    if eos is None:
        raise DataError("packing needs a tokenizer with an eos token")
    return tokenizer([t + eos for t in texts], add_special_tokens=False)["input_ids"]


def pack_text_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    shards: int = 1,
    group_rows: int | None = None,
    cache_key: str = "",
) -> datasets.Dataset:
    """A ``text`` dataset packed into ``input_ids`` blocks (memory-mapped, cached by datasets).

    Each group of :func:`packing_groups` is tokenized (text + eos text, no special tokens
    added), concatenated and cut into ``block_size`` blocks, its tail dropped; a tokenizer
    with ``add_bos_token`` gets its bos id as every block's first id (as LLaMA-Factory). One
    ``datasets.map`` per shard, in batches of ``group_rows`` rows (so a batch is a group); a
    whole-shard group is streamed in batches, carrying the unfinished block across them.

    Raises:
        DataError: the data gives no full block.
    """
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    carry: list[int] = []

    def finish(blocks: list[list[int]]) -> dict[str, list]:
        if bos is not None:
            for b in blocks:
                b[0] = bos
        return {"input_ids": blocks}

    def pack_group(batch: dict[str, list]) -> dict[str, list]:
        return finish(pack_token_ids(_document_ids(tokenizer, batch["text"]), block_size))

    def pack_stream(batch: dict[str, list]) -> dict[str, list]:
        flat = carry + [t for ids in _document_ids(tokenizer, batch["text"]) for t in ids]
        usable = (len(flat) // block_size) * block_size
        carry[:] = flat[usable:]
        return finish([flat[i:i + block_size] for i in range(0, usable, block_size)])

    fingerprint = hashlib.sha256(json.dumps(
        [getattr(ds, "_fingerprint", ""), cache_key, sorted(tokenizer.get_vocab().items()),
         tokenizer.eos_token, block_size, shards, group_rows, bos]).encode()).hexdigest()[:32]
    parts = []
    for start, stop in packing_groups(len(ds), shards, None):
        part = ds if (start, stop) == (0, len(ds)) else ds.select(range(start, stop))
        carry.clear()
        parts.append(part.map(
            pack_group if group_rows else pack_stream, batched=True, batch_size=group_rows or 1000,
            remove_columns=ds.column_names, new_fingerprint=f"{fingerprint}-{start}",
            load_from_cache_file=True))
    out = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(out) == 0:
        raise DataError(f"packing: the {len(ds)} documents give no full block of {block_size} tokens; "
                        "lower --data.max_seq_len or add data")
    return out


class PackedCollator:
    """Batches of packed blocks: ``labels`` = ids with pad ids -> -100 (``mlm=False`` LM collator)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.pad_token_id is None:
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} needs a pad token")
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([list(ex["input_ids"]) for ex in examples], dtype=torch.long)
        labels = input_ids.clone()
        labels[labels == self.pad_token_id] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
