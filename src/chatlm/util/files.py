"""Atomic file writes: write to a temporary name in the same directory, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old or the new file, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; keep the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(new_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written ``new_dir`` to ``final_dir``, replacing an older one.

    The old directory is renamed aside (to a fresh temporary name beside it) first and removed
    only after the new one is in place, so an interruption leaves the old or the new one,
    never half of either; if the final rename fails, the old one is put back.
    """
    new_dir, final_dir = os.fspath(new_dir), os.fspath(final_dir)
    if not os.path.exists(final_dir):
        os.replace(new_dir, final_dir)
        return
    parent, name = os.path.split(os.path.abspath(final_dir))
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(old)
    os.replace(final_dir, old)
    try:
        os.replace(new_dir, final_dir)
    except BaseException:
        os.replace(old, final_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike) -> Iterator[str]:
    """Write a directory atomically: yields a fresh temporary directory beside ``final_dir``;
    when the block ends without error it replaces ``final_dir`` (:func:`replace_dir`), else
    it is removed and ``final_dir`` is left as it was."""
    final = os.path.abspath(os.fspath(final_dir))
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
