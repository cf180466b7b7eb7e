"""Checkpoint files on disk: atomic, disk-checked saves and the one safe loader.

Every checkpoint chatlm reads -- a Lightning ``.ckpt`` to resume, validate or predict from, a
legacy state-dict ``.bin`` to start from, the legacy loop's own saves -- goes through
:func:`safe_torch_load` (``torch.load(weights_only=True)``: a crafted pickle is refused and
never runs) and every one it writes through :func:`atomic_torch_save` (a temporary file in
the same directory, fsynced and renamed over the old one after a free-space check, so a
kill at any moment leaves the old file or the new one).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from chatlm.errors import ChatLMError, CheckpointError, DiskSpaceError
from chatlm.util.text import one_line

#: Temporary checkpoint files are ``.saving-<pid>-<n>.tmp``: never ``last*.ckpt``, which
#: ``--ckpt_path last`` would pick up.
TMP_PREFIX = ".saving-"


#: Head room asked for on top of the estimated checkpoint size.
DISK_MARGIN_BYTES = 16 * 2**20


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


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
                f"disk full while saving {what or path} ({one_line(err)}); the partial file was removed "
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
def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False,
                    error: type[ChatLMError] = CheckpointError) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Args:
        mmap: Map the file instead of reading it (zip-format files; a legacy-format file
            is read normally).
        error: The :class:`ChatLMError` subclass raised (``CheckpointError`` for checkpoints,
            ``ModelLoadError`` for model weights).

    Raises:
        ``error``: missing, a directory, empty, corrupt / truncated, or unsafe (it holds
        pickled objects other than tensors and plain values, which could run code).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise error(f"{path}: file not found")
    if os.path.isdir(path):
        raise error(f"{path}: is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise error(f"{path}: corrupt or truncated (the file is empty)")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": the error says more
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(path, map_location=map_location, weights_only=True,
                                  **({"mmap": True} if mmap else {}))
            except RuntimeError as err:
                if mmap and "mmap" in str(err):  # legacy (non-zip) format cannot be mapped
                    return torch.load(path, map_location=map_location, weights_only=True)
                raise
    except pickle.UnpicklingError as err:
        if _looks_unsafe(err, path):
            reason = next((ln.strip() for ln in str(err).splitlines() if "unsupported" in ln.lower()
                           or "global" in ln.lower()), "")
            raise error(
                f"{path}: refused as unsafe: it holds pickled objects other than tensors and plain "
                f"values, which could run code when loaded (torch.load weights_only=True: "
                f"{one_line(reason, 120)}); only load files you trust, re-saved as plain state dicts "
                f"or safetensors") from None
        raise error(f"{path}: corrupt or truncated ({_error_detail(err)})") from None
    except Exception as err:  # noqa: BLE001 - any reader failure means a corrupt file
        raise error(f"{path}: corrupt or truncated ({type(err).__name__}: {_error_detail(err)})") from None


def load_checkpoint_safely(path: str, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint (a dictionary) read by :func:`safe_torch_load`.

    Raises:
        CheckpointError: as :func:`safe_torch_load`, or not a checkpoint dictionary.
    """
    obj = safe_torch_load(path, map_location=map_location, mmap=mmap, error=CheckpointError)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dictionary, got {type(obj).__name__})")
    return obj


def _error_detail(err: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are often generic advice)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"unsupported|invalid|failed|truncat|eof|magic|central directory", ln, re.I) \
                and not ln.lower().startswith(("weights only load failed", "please file")):
            return one_line(ln, 120)
    return one_line(lines[0] if lines else type(err).__name__, 120)


def _looks_unsafe(err: BaseException, path: str) -> bool:
    """A refusal of a real pickle (unsafe), not a parse failure of random bytes (corrupt)."""
    low = str(err).lower()
    if "unsupported operand" in low:  # also what garbage bytes give: parse the stream to tell
        return pickles_parse(Path(path))
    return any(s in low for s in ("unsupported global", "not an allowed global", "is blocked",
                                  "unsupported class", "weights only load failed"))

def pickles_parse(path: Path) -> bool:
    """True when the file's pickle stream is well-formed (parsed with pickletools, never run).

    Tells a valid pickle that the weights-only loader refuses (unsafe) from random bytes
    (corrupt) when ``torch.load`` reports an unsupported opcode.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as stream:
                    for _ in pickletools.genops(stream):
                        pass
            return True
        size = path.stat().st_size
        with open(path, "rb") as stream:
            for _ in range(4):  # legacy torch files: magic, protocol, sys info, then the data
                if stream.tell() >= size:
                    break
                for _ in pickletools.genops(stream):
                    pass
        return True
    except Exception:  # noqa: BLE001 - anything unparsable is corrupt, not unsafe
        return False


