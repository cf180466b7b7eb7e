"""One data pipeline for every engine: sources -> formatting -> collators -> batch order.

``ChatDataModule`` (the Lightning DataModule) is imported lazily, so the legacy shims and the
tokenizer command can use the light modules without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatlm.data.collate import (
    CausalCollator,
    Seq2SeqCollator,
    TextCollator,
    make_collator,
    prompt_ids_for_generation,
)
from chatlm.data.formatting import EOS_TEXT, legacy_texts
from chatlm.data.sampling import ResumableDataLoader, ShardedBatchSampler, epoch_batches
from chatlm.data.sources import load_prompt_response, load_text
from chatlm.errors import DataError

if TYPE_CHECKING:
    from chatlm.data.datamodule import ChatDataModule

__all__ = [
    "EOS_TEXT",
    "CausalCollator",
    "ChatDataModule",
    "DataError",
    "ResumableDataLoader",
    "Seq2SeqCollator",
    "ShardedBatchSampler",
    "TextCollator",
    "epoch_batches",
    "legacy_texts",
    "load_prompt_response",
    "load_text",
    "make_collator",
    "prompt_ids_for_generation",
]


def __getattr__(name: str) -> Any:
    if name == "ChatDataModule":
        from chatlm.data.datamodule import ChatDataModule

        return ChatDataModule
    raise AttributeError(f"module 'chatlm.data' has no attribute {name!r}")
