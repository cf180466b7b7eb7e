"""Checkpoints in a Lightning run: the atomic, weights-only CheckpointIO and ``last.ckpt``."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from chatlm.checkpoint.store import atomic_torch_save, load_checkpoint_safely

class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic, disk-checked saves; weights-only loads with clear errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, os.fspath(path), what=f"checkpoint {os.fspath(path)}")

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        # weights_only is always True: a checkpoint never runs code, whatever the caller asks.
        if weights_only is False:
            warnings.warn("chatlm loads checkpoints with weights_only=True only", stacklevel=2)
        return load_checkpoint_safely(os.fspath(path), map_location=map_location)


def checkpoint_io_plugins(plugins: Any) -> list[Any]:
    """``trainer.plugins`` with :class:`AtomicCheckpointIO` added unless a CheckpointIO is given."""
    from lightning.fabric.plugins import CheckpointIO

    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: every N optimizer steps, at every epoch end and at the final step.

    Lightning 2.6 saves ``last`` only together with a periodic save, so a run that stops at
    ``max_steps`` or at an epoch end between two periodic saves would leave an older
    ``last.ckpt``. Every save happens at the end of a training batch that completed an
    optimizer step, the one point from which Lightning resumes exactly (mid-epoch included).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            # No optimizer step in this batch (inside an accumulation window). Lightning's own
            # every-N-steps rule would save here right after a resume (its "already saved at
            # this step" memory is not in the checkpoint): a checkpoint that loses the
            # micro-batches of the open window.
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer):
            return  # already saved at this step
        final = 0 < trainer.max_steps <= trainer.global_step
        epoch_end = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if final or epoch_end:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def save_last_now(self, trainer) -> str:
        """Save ``last.ckpt`` now (at an optimizer-step boundary); returns its path."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path


def last_checkpoint_path(trainer) -> Optional[str]:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return None


