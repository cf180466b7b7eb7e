"""Numerical guard (issue 5.5): a NaN / infinite loss stops the run with one line naming the
step, and the last good checkpoint is kept (never overwritten by a checkpoint of the NaN state).

An absurd learning rate (1e3, AdamW, no warmup) makes the tiny T5's weights overflow at step 3
and its loss NaN at step 4.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from chatlm.train.guards import NonFiniteGuard
from helpers import error_lines, fit_args, fit_inprocess, load_ckpt, read_jsonl, tiny_data

ABSURD = ["--model.lr", "1000", "--model.warmup_steps", "0", "--trainer.max_steps", "20",
          "--trainer.limit_val_batches", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("nan-data"))


def _check_kept(run, step: int) -> None:
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == step
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())
    rows = read_jsonl(run / "losses.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_nan_loss_stops_with_one_line_naming_the_step(data, tmp_path):
    run = tmp_path / "run"
    code, err = fit_inprocess(*fit_args(run, data, *ABSURD, "--run.checkpoint_every_n_steps", "2"))
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    step = int(re.search(r"non-finite training loss \((nan|inf|-inf)\) at step (\d+)", lines[0]).group(2))
    assert step > 2
    _check_kept(run, 2 * ((step - 1) // 2))  # the last periodic checkpoint before the NaN step
    assert [r["step"] for r in read_jsonl(run / "losses.jsonl")] == list(range(1, step))


def test_non_finite_weights_are_never_checkpointed(data, tmp_path):
    """Weights overflow one step before the loss does: that step's checkpoint is refused."""
    run = tmp_path / "run"
    code, err = fit_inprocess(*fit_args(run, data, *ABSURD, "--run.checkpoint_every_n_steps", "1"))
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    m = re.search(r"non-finite (weights \(.+\) after step|training loss \(\S+\) at step) (\d+)", lines[0])
    assert m, lines[0]
    bad_step = int(m.group(2))
    _check_kept(run, bad_step - 1)


def test_guard_refuses_a_checkpoint_with_nan_weights():
    class T:
        global_step = 7

    ckpt = {"state_dict": {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "i": torch.zeros(2, dtype=torch.long)}}
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(b\) after step 7"):
        NonFiniteGuard().on_save_checkpoint(T(), None, ckpt)
    NonFiniteGuard().on_save_checkpoint(T(), None, {"state_dict": {"a": torch.zeros(3)}})
