"""``losses.jsonl``: the one loss-log format every engine writes and every parity test reads.

One JSON object per optimizer step: ``{"step": int, "loss": float, "lr": float | null}``,
where ``step`` counts optimizer steps from 1 and ``loss`` is the mean of the micro-batch
losses (each a token mean) of that step's accumulation window.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from chatlm.io import atomic_write_text

FILENAME = "losses.jsonl"


def read_losses(path: str) -> list[dict]:
    """Rows of a losses.jsonl file (a directory means ``DIR/losses.jsonl``)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class LossLogWriter:
    """Appends rows to losses.jsonl; on resume, first drops rows past the restored step."""

    def __init__(self, path: str, resume_from_step: int = 0) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, FILENAME)
        self.path = path
        self.rows: list[dict] = []
        if resume_from_step > 0 and os.path.exists(path):
            self.rows = [r for r in read_losses(path) if r["step"] <= resume_from_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, step: int, loss: float, lr: Optional[float]) -> dict:
        row = {"step": int(step), "loss": float(loss), "lr": None if lr is None else float(lr)}
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        return row
