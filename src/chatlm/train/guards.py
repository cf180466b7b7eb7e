"""Guards of a long run: no checkpoint with non-finite weights; SIGINT / SIGTERM stop cleanly."""

from __future__ import annotations

import signal
import sys
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from chatlm.checkpoint.trainer_io import LastCheckpoint, last_checkpoint_path

class TrainingStopped(SystemExit):
    """Raised after a signal-requested checkpoint: exits with 128 + the signal number."""


class NonFiniteGuard(Callback):
    """Never writes a checkpoint whose weights are NaN or infinite (the last good one is kept).

    The loss itself is checked every step by :class:`chatlm.train.module.ChatLM` (FloatingPointError
    naming the step); weights can turn non-finite one step earlier, while the loss of that
    step was still finite, so every checkpoint is checked before it is written.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for key, value in (checkpoint.get("state_dict") or {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"non-finite weights ({key}) after step {trainer.global_step}: the checkpoint was not "
                    f"written, the last good one is kept; lower --model.lr or check the data")


class GracefulStop(Callback):
    """SIGINT / SIGTERM: save a resumable ``last.ckpt`` at the end of the optimizer step, then exit.

    The first signal only sets a flag; at the next optimizer-step boundary (after the loss
    row of that step is written, between two accumulation windows, so the checkpoint is
    exact) every process saves the checkpoint together and the run exits with 128 + the
    signal number (130 for SIGINT, 143 for SIGTERM) and one line saying where the checkpoint
    is. A second signal stops at once without saving (the previous ``last.ckpt`` is intact:
    saves are atomic). Nothing ever reads stdin.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._seen_step = -1

    # ---------------------------------------------------------------- handlers
    def _handler(self, signum, frame) -> None:
        if self.received is not None:  # second signal: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        try:
            print(f"chatlm: {name} received: saving a resumable checkpoint at the end of this optimizer step "
                  f"(send {name} again to stop at once without saving)", file=sys.stderr, flush=True)
        except (OSError, RuntimeError, ValueError):  # stderr closed, or busy in the interrupted frame
            pass

    def _install_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = None
        self._seen_step = trainer.global_step
        self._install_handlers()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore_handlers()

    # ---------------------------------------------------------------- the stop
    def _agreed_signal(self, trainer, pl_module) -> int:
        flag = self.received or 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64, device=pl_module.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:
            return  # inside an accumulation window: not a consistent point
        self._seen_step = trainer.global_step
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            return
        last = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)), None)
        path = last_checkpoint_path(trainer)
        if last is not None:
            path = last.save_last_now(trainer)
        elif path is not None:
            trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            saved = f"resumable checkpoint {path}" if path else "no checkpoint (no last.ckpt configured)"
            print(f"chatlm: stopped by {name} after step {trainer.global_step}: {saved}; continue with "
                  f"--ckpt_path last", file=sys.stderr, flush=True)
        self._restore_handlers()
        raise TrainingStopped(128 + int(signum))


