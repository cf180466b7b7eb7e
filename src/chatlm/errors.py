"""One error hierarchy: everything a user can get wrong is a :class:`ChatLMError`.

Code raises a :class:`ChatLMError` subclass (or a ValueError / FileNotFoundError that already
names its file); :func:`user_errors` turns it into ``chatlm: error: <one line>`` on stderr and
exit code 2. ``CHATLM_DEBUG=1`` shows the full traceback instead. A dead or hung peer of a
multi-process run is recognised by :func:`distributed_failure_message` (one line, exit 1).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Optional

from chatlm.util.text import one_line


class ChatLMError(Exception):
    """An error the user can fix; its message is one line naming the file, column or key."""


class ConfigError(ChatLMError, ValueError):
    """A configuration value or combination that cannot work; names the option."""


class DataError(ChatLMError, ValueError):
    """A data file that cannot be used; the message is one line naming file, column or row."""


class ModelLoadError(ChatLMError, ValueError):
    """A model file or directory that cannot be loaded; the message is one line naming it."""


class CheckpointError(ChatLMError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or made for another model."""


class DiskSpaceError(ChatLMError):
    """Not enough free disk space for a save; nothing was written."""


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    print(f"chatlm: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's doing. Third-party modules are asked only when
    already imported (one that was never imported raised nothing), so ``--help`` stays fast."""
    types: list[type[BaseException]] = [ChatLMError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError, PermissionError, FloatingPointError]
    for module, name in (("jsonargparse", "ArgumentError"),
                         ("lightning.fabric.utilities.exceptions", "MisconfigurationException")):
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            types.append(found)
    return tuple(types)


@contextlib.contextmanager
def user_errors():
    """Turn user errors into one line + exit 2 (full traceback with CHATLM_DEBUG=1)."""
    try:
        yield
    except _user_error_types() as err:
        if os.environ.get("CHATLM_DEBUG"):
            raise
        fail(f"{type(err).__name__}: {err}" if not isinstance(err, ChatLMError) else str(err))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as err:  # a dead or hung peer of a multi-process run: one line, exit 1
        message = distributed_failure_message(err)
        if message is None or os.environ.get("CHATLM_DEBUG"):
            raise
        fail(message, code=1)


# ---------------------------------------------------------------------------- distributed faults
def process_rank() -> int:
    """This process's rank in a multi-process run, from the launcher's environment (0 alone)."""
    for key in ("RANK", "GLOBAL_RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


_DIST_PATTERNS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
    "socket timeout", "connection refused", "nccl", "gloo", "c10d", "processgroup", "process group",
    "timeout", "pair closure",  # gloo: "Application timeout caused pair closure"
)


def distributed_failure_message(err: BaseException) -> Optional[str]:
    """One line for an error that means another process of a distributed run died or hangs; else None."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    available = dist is not None and dist.is_available()
    distributed = (available and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    dist_types: tuple[type, ...] = ()
    if available:
        dist_types = tuple(t for t in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                                       getattr(dist, "DistNetworkError", None),
                                       getattr(dist, "DistStoreError", None)) if t)
    text = str(err)
    low = text.lower()
    if not (isinstance(err, dist_types) or (distributed and isinstance(err, RuntimeError)
                                            and any(p in low for p in _DIST_PATTERNS))):
        return None
    first = next((ln for ln in text.splitlines() if ln.strip()), type(err).__name__)
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first.strip())
    first = first.split(". This is typically")[0]
    return (f"rank {process_rank()}: another process of this distributed run died or stopped answering "
            f"({one_line(first, 160)}); stopping this one too. Fix the cause, then resume with "
            f"--ckpt_path last")
