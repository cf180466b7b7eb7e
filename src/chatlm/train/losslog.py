"""``losses.jsonl``: the one loss-log format every engine writes and every parity test reads.

One JSON object per optimizer step: ``{"step": int, "loss": float, "lr": float | null}``,
where ``step`` counts optimizer steps from 1 and ``loss`` is the mean of the micro-batch
losses (each a token mean) of that step's accumulation window.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

from chatlm.util.files import atomic_write_text

FILENAME = "losses.jsonl"


def window_loss(micro_batches: Sequence[Sequence[Any]]) -> float:
    """The ``loss`` of one optimizer step, as every engine logs it.

    ``micro_batches`` holds one ``(CE * label tokens, label tokens)`` pair per micro-batch of
    the accumulation window (numbers or 0-dim tensors). In a multi-process run the pairs are
    summed over all processes first (every process must call this with the same number of
    pairs), so each micro-batch's loss is a token mean over all devices; the step's loss is
    the mean of those. NaN for an empty window.
    """
    import torch

    stats = torch.tensor([[float(a), float(b)] for a, b in micro_batches], dtype=torch.float64).reshape(-1, 2)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    if not len(stats):
        return math.nan
    return float((stats[:, 0] / stats[:, 1].clamp(min=1)).mean())


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
