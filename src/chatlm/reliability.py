"""Reliability of long runs on shared, flaky machines (see docs/reliability.md).

    python -m src fit --config configs/demo.yaml                 # everything below is on
    python -m src fit --config configs/demo.yaml --ckpt_path last  # continue a killed run exactly

What this module adds to every ``fit`` (wired in by :class:`chatlm.cli.ChatLMCLI`):

* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the same
  directory, fsynced and renamed over the old one, after checking that the disk has room for
  them (a clear :class:`DiskSpaceError` instead of half a file); they are always read with
  ``torch.load(weights_only=True)``, so a crafted pickle is refused (:class:`CheckpointError`).
* :class:`ExactResume`: the torch / CUDA / numpy / python RNG states travel in the checkpoint,
  so dropout continues bit-identically after ``--ckpt_path last``.
* :class:`GracefulStop`: SIGINT / SIGTERM save a resumable ``last.ckpt`` at the end of the
  current optimizer step and exit with 128 + the signal number (130 / 143); a second signal
  stops at once (the previous ``last.ckpt`` stays intact).
* :class:`NonFiniteGuard`: a checkpoint whose weights are NaN / infinite is never written, so
  the last good ``last.ckpt`` survives a diverging run (the module stops on a non-finite loss).
* :func:`check_checkpoint_fits`: a checkpoint whose weights do not fit the model (another
  vocabulary, another size) is refused with one line naming the file.
* :func:`distributed_failure_message` / :func:`strategy_with_timeout`: a multi-process run
  whose peer died (or hangs past ``--run.ddp_timeout_s``) stops with one line.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from chatlm.errors import ChatLMError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "DiskSpaceError",
    "ExactResume",
    "GracefulStop",
    "LastCheckpoint",
    "NonFiniteGuard",
    "TrainingStopped",
    "check_checkpoint_fits",
    "checkpoint_io_plugins",
    "distributed_failure_message",
    "ensure_disk_space",
    "estimate_checkpoint_bytes",
    "load_checkpoint_safely",
    "preflight_checkpoint",
    "reliability_callbacks",
    "strategy_with_timeout",
]

#: Temporary checkpoint files are ``.saving-<pid>-<n>.tmp``: never ``last*.ckpt``, which
#: ``--ckpt_path last`` would pick up.
TMP_PREFIX = ".saving-"
#: Head room asked for on top of the estimated checkpoint size.
DISK_MARGIN_BYTES = 16 * 2**20


class CheckpointError(ChatLMError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or made for another model."""


class DiskSpaceError(ChatLMError):
    """Not enough free disk space for a save; nothing was written."""


class TrainingStopped(SystemExit):
    """Raised after a signal-requested checkpoint: exits with 128 + the signal number."""


def _one_line(err: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _rank() -> int:
    for key in ("RANK", "GLOBAL_RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# ============================================================================ disk space
def estimate_checkpoint_bytes(obj: Any) -> int:
    """Bytes ``torch.save(obj)`` will roughly take: tensor storages plus a small overhead."""
    seen: set[int] = set()
    total = 0
    count = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            count += 1
            try:
                storage = item.untyped_storage()
                key = storage.data_ptr() if storage.data_ptr() else id(storage)
                if key in seen:
                    continue
                seen.add(key)
                total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # meta / sparse tensors
                total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, np.ndarray):
            total += item.nbytes
        else:
            total += 16
    return int(total + 512 * count + 64 * 1024)


def ensure_disk_space(directory: str, needed: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` unless ``directory``'s disk has ``needed`` bytes + a margin free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell (e.g. some network filesystems): let the write itself fail
    if free < needed + DISK_MARGIN_BYTES:
        raise DiskSpaceError(
            f"not enough disk space to save {what}: it needs about {_mb(needed + DISK_MARGIN_BYTES)}, "
            f"only {_mb(free)} free in {directory}; nothing was written and the previous checkpoints "
            f"are kept: free some space (or point --trainer.default_root_dir to a larger disk) and "
            f"resume with --ckpt_path last")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_tmp_counter = 0


def _tmp_name(directory: str) -> str:
    global _tmp_counter
    _tmp_counter += 1
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{_tmp_counter}.tmp")


def _remove_stale_tmp_files(directory: str) -> None:
    """Remove ``.saving-<pid>-*.tmp`` files left by processes that no longer run (killed mid-save)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\d+\.tmp", name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (another run writing here): leave it alone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def atomic_torch_save(obj: Any, path: str, what: Optional[str] = None) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A kill at any moment leaves the old ``path`` or the new one, never half a file. The disk
    is checked first (:class:`DiskSpaceError`); a write that still runs out of space removes
    its temporary file and raises :class:`DiskSpaceError` too.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_tmp_files(directory)
    ensure_disk_space(directory, estimate_checkpoint_bytes(obj), what or path)
    tmp = _tmp_name(directory)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _unlink(tmp)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(
                f"disk full while saving {what or path} ({_one_line(err)}); the partial file was removed "
                f"and the previous checkpoints are kept: free some space and resume with --ckpt_path last"
            ) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(directory)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ============================================================================ safe loading
def load_checkpoint_safely(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``torch.load(weights_only=True)``; errors are one line.

    Raises:
        CheckpointError: missing, empty, corrupt / truncated, unsafe (pickled code), or not
            a checkpoint dictionary. The message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.ckpt)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            kwargs = {"mmap": True} if mmap else {}
            try:
                obj = torch.load(path, map_location=map_location, weights_only=True, **kwargs)
            except RuntimeError as err:
                if mmap and "mmap" in str(err):  # legacy (non-zip) format cannot be mapped
                    obj = torch.load(path, map_location=map_location, weights_only=True)
                else:
                    raise
    except pickle.UnpicklingError as err:
        if _looks_unsafe(err, path):
            reason = next((ln.strip() for ln in str(err).splitlines() if "unsupported" in ln.lower()
                           or "global" in ln.lower()), "")
            raise CheckpointError(
                f"{path}: refused as unsafe: it holds pickled objects other than tensors and plain "
                f"values, which could run code when loaded (torch.load weights_only=True: "
                f"{_one_line(reason, 120)}); only load checkpoints you trust, re-saved as plain "
                f"state dicts") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_error_detail(err)})") from None
    except Exception as err:  # noqa: BLE001 - any reader failure means a corrupt file
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {_error_detail(err)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dictionary, got {type(obj).__name__})")
    return obj


def _error_detail(err: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are often generic advice)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"unsupported|invalid|failed|truncat|eof|magic|central directory", ln, re.I) \
                and not ln.lower().startswith(("weights only load failed", "please file")):
            return _one_line(ln, 120)
    return _one_line(lines[0] if lines else type(err).__name__, 120)


def _looks_unsafe(err: BaseException, path: str) -> bool:
    low = str(err).lower()
    if any(s in low for s in ("unsupported global", "not an allowed global", "is blocked",
                              "unsupported class", "weights only load failed")):
        if "unsupported operand" not in low:
            return True
    if "unsupported operand" in low:
        try:
            from chatlm.models import _pickles_parse  # a well-formed pickle, not random bytes
            from pathlib import Path

            return bool(_pickles_parse(Path(path)))
        except Exception:  # noqa: BLE001
            return False
    return False


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


# ============================================================================ checkpoint fits model
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


# ============================================================================ RNG state
def _capture_rng() -> dict[str, Any]:
    """The RNG states as the libraries return them (cheap: called after every training batch)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _rng_to_checkpoint(state: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors and plain values only, so the checkpoint loads with ``weights_only=True``."""
    np_state, py_state = state["numpy"], state["python"]
    out: dict[str, Any] = {
        "torch": state["torch"].clone(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if state.get("cuda"):
        out["cuda"] = [s.cpu().clone() for s in state["cuda"]]
    return out


def _rng_from_checkpoint(saved: Mapping[str, Any]) -> dict[str, Any]:
    n, p = saved["numpy"], saved["python"]
    state: dict[str, Any] = {
        "torch": saved["torch"].cpu().to(torch.uint8),
        "numpy": ("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                  float(n["cached_gaussian"])),
        "python": (int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]),
    }
    if saved.get("cuda"):
        state["cuda"] = [s.to(torch.uint8) for s in saved["cuda"]]
    return state


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
            _restore_rng(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = _capture_rng()

    def state_dict(self) -> dict[str, Any]:
        state = _rng_to_checkpoint(self._state if self._state is not None else _capture_rng())
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
        self._state = _rng_from_checkpoint(ranks[rank])


# ============================================================================ non-finite guard
class NonFiniteGuard(Callback):
    """Never writes a checkpoint whose weights are NaN or infinite (the last good one is kept).

    The loss itself is checked every step by :class:`chatlm.module.ChatLM` (FloatingPointError
    naming the step); weights can turn non-finite one step earlier, while the loss of that
    step was still finite, so every checkpoint is checked before it is written.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for key, value in (checkpoint.get("state_dict") or {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"non-finite weights ({key}) after step {trainer.global_step}: the checkpoint was not "
                    f"written, the last good one is kept; lower --model.lr or check the data")


# ============================================================================ last.ckpt
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


# ============================================================================ signals
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
        path = _last_checkpoint_path(trainer)
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


def _last_checkpoint_path(trainer) -> Optional[str]:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return None


def reliability_callbacks() -> list[Callback]:
    """The callbacks of every fit (after the loss log, so a step's row is written before its checkpoint)."""
    return [ExactResume(), NonFiniteGuard(), GracefulStop()]


# ============================================================================ distributed faults
def strategy_with_timeout(strategy: Any, timeout_s: Optional[float]) -> Any:
    """A registry strategy name (``ddp``, ``ddp_spawn``, ``fsdp``...) as an instance whose process
    group times out after ``timeout_s`` seconds; anything else is returned unchanged."""
    if not timeout_s:
        return strategy
    if not isinstance(strategy, str):
        if hasattr(strategy, "_timeout"):  # DDPStrategy / FSDPStrategy / DeepSpeedStrategy given as a class_path
            strategy._timeout = timedelta(seconds=float(timeout_s))
        return strategy
    import inspect

    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    cls = entry["strategy"]
    params = dict(entry.get("init_params") or {})
    try:
        accepts = "timeout" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts or "timeout" in params:
        return strategy
    return cls(**params, timeout=timedelta(seconds=float(timeout_s)))


_DIST_PATTERNS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
    "socket timeout", "connection refused", "nccl", "gloo", "c10d", "processgroup", "process group",
    "timeout", "pair closure",  # gloo: "Application timeout caused pair closure"
)


def distributed_failure_message(err: BaseException) -> Optional[str]:
    """One line for an error that means another process of a distributed run died or hangs; else None."""
    distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    dist_types: tuple[type, ...] = ()
    if torch.distributed.is_available():
        dist_types = tuple(t for t in (getattr(torch.distributed, "DistError", None),
                                       getattr(torch.distributed, "DistBackendError", None),
                                       getattr(torch.distributed, "DistNetworkError", None),
                                       getattr(torch.distributed, "DistStoreError", None)) if t)
    text = str(err)
    low = text.lower()
    if not (isinstance(err, dist_types) or (distributed and isinstance(err, RuntimeError)
                                            and any(p in low for p in _DIST_PATTERNS))):
        return None
    first = next((ln for ln in text.splitlines() if ln.strip()), type(err).__name__)
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first.strip())
    first = first.split(". This is typically")[0]
    return (f"rank {_rank()}: another process of this distributed run died or stopped answering "
            f"({_one_line(first, 160)}); stopping this one too. Fix the cause, then resume with "
            f"--ckpt_path last")
