"""Exact resume: ``--ckpt_path last`` continues bit-identically, dropout included."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from chatlm.checkpoint.rng import capture_rng, restore_rng, rng_from_checkpoint, rng_to_checkpoint

class ExactResume(Callback):
    """Makes ``--ckpt_path last`` continue bit-identically, dropout included.

    Lightning restores weights, optimizer, scheduler, loop counters and the data position
    (:class:`chatlm.data.sampling.ResumableDataLoader`) but no RNG state. This callback keeps
    the torch / CUDA / numpy / python RNG states as they were at the end of the last training
    batch, puts them back at the start of the next one, and saves them in every checkpoint
    (one entry per rank). So every training step draws its dropout masks from the same
    state whether or not the run was resumed in between, and whether or not a validation or
    the creation of a data loader iterator (which draws a seed) happened in between.
    """

    def __init__(self) -> None:
        self._state: Optional[dict[str, Any]] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            restore_rng(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = capture_rng()

    def state_dict(self) -> dict[str, Any]:
        state = rng_to_checkpoint(self._state if self._state is not None else capture_rng())
        states = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        return {"version": 1, "ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if not ranks:
            return
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        if rank >= len(ranks):
            warnings.warn(f"the checkpoint holds RNG states of {len(ranks)} processes, this is rank {rank}: "
                          "dropout will not continue exactly", stacklevel=2)
            return
        self._state = rng_from_checkpoint(ranks[rank])


