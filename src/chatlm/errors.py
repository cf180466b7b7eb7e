"""One-line errors for everything a user can get wrong.

Code raises a :class:`ChatLMError` subclass (or a ValueError / FileNotFoundError that
already names its file); :func:`user_errors` turns it into ``chatlm: error: <one line>``
on stderr and exit code 2. ``CHATLM_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys


class ChatLMError(Exception):
    """An error the user can fix; its message is one line naming the file, column or key."""


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    print(f"chatlm: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's doing. Only modules already imported are asked
    (one that was never imported raised nothing), so an early ``--help`` stays fast."""
    types: list[type[BaseException]] = [ChatLMError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError, PermissionError, FloatingPointError]
    for module, name in (("chatlm.data.sources", "DataError"), ("chatlm.models", "ModelLoadError"),
                         ("jsonargparse", "ArgumentError"),
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
        from chatlm.reliability import distributed_failure_message

        message = distributed_failure_message(err)
        if message is None or os.environ.get("CHATLM_DEBUG"):
            raise
        fail(message, code=1)
