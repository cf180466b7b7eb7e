"""RNG state of a process, and its codec for checkpoints that load with ``weights_only=True``.

Used by exact resume on the main path (:class:`chatlm.train.resume.ExactResume`) and by the
legacy loop's own checkpoints (``legacy/train_low_mem.py``): the torch / CUDA / numpy /
python states are captured, stored as tensors and plain values only, and put back.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

def capture_rng() -> dict[str, Any]:
    """The RNG states as the libraries return them (cheap: called after every training batch)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rng_to_checkpoint(state: Mapping[str, Any]) -> dict[str, Any]:
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


def rng_from_checkpoint(saved: Mapping[str, Any]) -> dict[str, Any]:
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


