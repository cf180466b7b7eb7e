"""Before a run touches anything: does the checkpoint named by ``--ckpt_path`` exist, load
safely and fit the model? Every refusal is one line naming the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from chatlm.checkpoint.store import load_checkpoint_safely
from chatlm.errors import CheckpointError

_EMBEDDING_KEYS = ("shared.weight", "embed_tokens.weight", "lm_head.weight")


def check_checkpoint_fits(module: torch.nn.Module, checkpoint: Mapping[str, Any],
                          path: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` (one line) when ``checkpoint['state_dict']`` does not fit ``module``.

    A different vocabulary (the checkpoint was trained with another tokenizer) is named as
    such; other shape or key differences name the first differing weight.
    """
    where = path or "checkpoint"
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: has no 'state_dict' (not a Lightning checkpoint of a chatlm model)")
    own = module.state_dict()
    for key, value in state.items():
        if key in own and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(own[key].shape):
            if key.endswith(_EMBEDDING_KEYS):
                hp = checkpoint.get("hyper_parameters") or {}
                theirs = hp.get("vocab_size", value.shape[0])
                raise CheckpointError(
                    f"{where}: its vocabulary has {theirs} tokens but the tokenizer has {own[key].shape[0]} "
                    f"(weight {key}): use the tokenizer the checkpoint was trained with (--data.tokenizer)")
            raise CheckpointError(
                f"{where}: weight {key} has shape {tuple(value.shape)} but the model's is "
                f"{tuple(own[key].shape)}: the --model.* size arguments must match the checkpoint's")
    if not getattr(module, "strict_loading", True):
        return
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = (f"{len(missing)} model weights missing, e.g. {missing[0]}" if missing
                  else f"{len(unexpected)} unknown weights, e.g. {unexpected[0]}")
        raise CheckpointError(f"{where}: does not fit the model ({detail}): "
                              f"the --model.* arguments (arch, layers, LoRA) must match the checkpoint's")


def resolve_ckpt_path(trainer, ckpt_path: Any) -> Optional[str]:
    """The file ``--ckpt_path`` names: ``last`` -> the newest ``last*.ckpt`` of the checkpoint
    callbacks (as Lightning picks it); ``best`` / ``hpc`` / None -> None (not checked here)."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith(("http://", "https://")):
        return None
    if ckpt_path == "last":
        candidates: set[str] = set()
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                candidates |= cb._find_last_checkpoints(trainer)
        existing = [p for p in candidates if os.path.isfile(p)]
        return max(existing, key=os.path.getmtime) if existing else None
    return os.fspath(ckpt_path)


def preflight_checkpoint(trainer, module: torch.nn.Module, ckpt_path: Any) -> None:
    """Before ``trainer.fit`` writes anything: the checkpoint exists, loads safely and fits the model.

    Raises :class:`CheckpointError` (one line naming the file); reads the file memory-mapped.
    """
    path = resolve_ckpt_path(trainer, ckpt_path)
    if path is None or os.path.isdir(path):
        return  # nothing to resume from (Lightning warns), or a sharded (directory) checkpoint
    checkpoint = load_checkpoint_safely(path, mmap=True)
    check_checkpoint_fits(module, checkpoint, path)


