"""Text helpers for one-line messages."""

from __future__ import annotations


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """``err`` (an exception or text) folded onto one line of at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
