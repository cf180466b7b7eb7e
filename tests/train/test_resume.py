"""Exact resume (issue 5.1): a fit stopped or SIGKILLed at any moment and resumed with
``--ckpt_path last`` ends bit-identical (CPU, fp32, dropout > 0) to an uninterrupted run:
same weights, optimizer and scheduler state, same ``losses.jsonl`` rows.

Tiny T5, 40 training rows at batch 4 (10 batches per epoch), validation (loss + BLEU) every 4
batches, dropout 0.1, so stops fall mid-epoch, at epoch ends, around validations and
inside accumulation windows.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

import chatlm.train.cli
from chatlm.train.resume import ExactResume
from chatlm.train.guards import GracefulStop, NonFiniteGuard
from helpers import run_cli
from helpers import (assert_same_training_state, count_rows, fit_args, fit_inprocess, load_ckpt, popen_cli,
                         read_jsonl, tiny_data, wait_for_rows)

STEPS = 14
COMMON = ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "4",
          "--model.dropout", "0.1", "--model.warmup_steps", "2", "--run.checkpoint_every_n_steps", "3",
          "--model.scheduler_total_steps", str(STEPS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("resume-data"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    code, err = fit_inprocess(*fit_args(run, data, *COMMON, "--trainer.max_steps", str(STEPS)))
    assert code == 0, err[-3000:]
    return run


def _stop_and_resume(run, data, stops):
    for i, stop in enumerate(stops):
        resume = ["--ckpt_path", "last"] if i else []
        code, err = fit_inprocess(*fit_args(run, data, *COMMON, "--trainer.max_steps", str(stop), *resume))
        assert code == 0, err[-3000:]
        assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == stop  # saved at the final step


def test_stop_and_resume_is_bit_identical_with_dropout(uninterrupted, data, tmp_path):
    """Stops at step 7 (mid-epoch, after a validation), 10 (an epoch end) and 14 (the end)."""
    run = tmp_path / "resumed"
    _stop_and_resume(run, data, [7, 10, STEPS])
    assert_same_training_state(load_ckpt(uninterrupted / "checkpoints" / "last.ckpt"),
                               load_ckpt(run / "checkpoints" / "last.ckpt"))
    full, resumed = read_jsonl(uninterrupted / "losses.jsonl"), read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in full] == list(range(1, STEPS + 1))
    assert resumed == full  # no duplicated or skipped rows, identical losses and learning rates


def test_without_the_rng_state_dropout_would_not_resume_exactly(uninterrupted, data, tmp_path, monkeypatch):
    """The comparison above can fail: drop ExactResume and the resumed weights differ."""
    monkeypatch.setattr(chatlm.train.cli, "reliability_callbacks", lambda: [NonFiniteGuard(), GracefulStop()])
    run = tmp_path / "no-rng"
    _stop_and_resume(run, data, [7, STEPS])
    with pytest.raises(AssertionError, match="weights differ"):
        assert_same_training_state(load_ckpt(uninterrupted / "checkpoints" / "last.ckpt"),
                                   load_ckpt(run / "checkpoints" / "last.ckpt"))


def test_last_ckpt_is_only_written_at_optimizer_step_boundaries(data, tmp_path, monkeypatch):
    """After a resume the first batches are inside an accumulation window: Lightning's every-N-steps
    rule alone would write last.ckpt there (losing the window's micro-batches on the next resume)."""
    from chatlm.checkpoint.trainer_io import AtomicCheckpointIO

    run = tmp_path / "run"
    args = ["--trainer.accumulate_grad_batches", "3", "--run.checkpoint_every_n_steps", "1",
            "--trainer.limit_val_batches", "0", "--model.scheduler_total_steps", "8"]
    code, err = fit_inprocess(*fit_args(run, data, *args, "--trainer.max_steps", "4"))  # ends at an epoch end
    assert code == 0, err[-3000:]
    saves = []
    real = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]
        saves.append((os.path.basename(path), checkpoint["global_step"], progress))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    code, err = fit_inprocess(*fit_args(run, data, *args, "--trainer.max_steps", "8", "--ckpt_path", "last"))
    assert code == 0, err[-3000:]
    # 10 batches per epoch, windows of 3: steps end at batches 3, 6, 9 and 10 (partial window)
    assert saves == [("last.ckpt", 5, 3), ("last.ckpt", 6, 6), ("last.ckpt", 7, 9), ("last.ckpt", 8, 10)], saves


def test_checkpoint_holds_rng_state_and_loads_weights_only(uninterrupted):
    ckpt = load_ckpt(uninterrupted / "checkpoints" / "last.ckpt")  # weights_only=True
    states = ckpt["callbacks"][ExactResume().state_key]["ranks"]
    assert len(states) == 1 and states[0]["torch"].dtype == torch.uint8
    assert {"torch", "numpy", "python"} <= set(states[0])


# ----------------------------------------------------------------------------- SIGKILL at random moments
KILL_STEPS = 16
KILL_ARGS = ["--trainer.accumulate_grad_batches", "3", "--trainer.val_check_interval", "4",
             "--model.dropout", "0.1", "--model.warmup_steps", "2", "--run.checkpoint_every_n_steps", "2",
             "--trainer.max_steps", str(KILL_STEPS)]


@pytest.mark.slow
def test_sigkill_at_five_random_moments_then_resume_is_bit_identical(data, tmp_path):
    """``python -m src fit`` SIGKILLed at 5 moments drawn from a fixed seed (while training,
    validating, saving, or still restoring), each time resumed with ``--ckpt_path last``.

    Accumulation 3 over 10 batches per epoch: the last window of every epoch is partial.
    """
    full = tmp_path / "full"
    run_cli(*fit_args(full, data, *KILL_ARGS))
    run = tmp_path / "killed"
    losses = run / "losses.jsonl"
    rng = random.Random(5)
    moments = sorted(rng.sample(range(1, KILL_STEPS), 5))  # kill once this many loss rows exist ...
    delays = [rng.uniform(0.0, 1.5) for _ in moments]       # ... plus this many seconds
    killed = []
    for i, (rows, delay) in enumerate(zip(moments, delays)):
        proc = popen_cli(*fit_args(run, data, *KILL_ARGS, *(["--ckpt_path", "last"] if i else [])))
        try:
            wait_for_rows(proc, losses, rows)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append((rows, round(delay, 2), count_rows(losses)))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert len(killed) == 5, f"the run ended before all 5 kills: {killed}"
    run_cli(*fit_args(run, data, *KILL_ARGS, "--ckpt_path", "last"))
    expected, got = read_jsonl(full / "losses.jsonl"), read_jsonl(losses)
    first_diff = next((a for a, b in zip(expected, got) if a != b), None)
    assert got == expected, f"kills (rows wanted, delay s, rows at kill): {killed}; first differing row {first_diff}"
    assert [r["step"] for r in got] == list(range(1, KILL_STEPS + 1))
    assert_same_training_state(load_ckpt(full / "checkpoints" / "last.ckpt"),
                               load_ckpt(run / "checkpoints" / "last.ckpt"))
    leftovers = [n for n in os.listdir(run / "checkpoints") if not n.endswith(".ckpt")]
    assert not leftovers, leftovers  # temporary files of killed saves are cleaned up
