"""Signals (issue 5.2): SIGTERM and SIGINT save a resumable ``last.ckpt`` at the end of the
current optimizer step and exit with 128 + the signal number (143, 130) and one line; nothing
ever waits on stdin (stdin here is an open pipe that is never written: a prompt would hang).
The checkpoint continues exactly: resumed, the run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from chatlm.train.guards import GracefulStop
from helpers import (assert_same_training_state, count_rows, fit_args, fit_inprocess, load_ckpt, popen_cli,
                         read_jsonl, tiny_data, wait_for_rows)

LONG = ["--trainer.max_steps", "400", "--model.scheduler_total_steps", "400", "--trainer.accumulate_grad_batches", "2",
        "--trainer.val_check_interval", "6", "--model.dropout", "0.1", "--run.checkpoint_every_n_steps", "1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("signal-data"))


def _interrupt(run, data, sig: signal.Signals, after_rows: int = 3) -> tuple[subprocess.CompletedProcess, int]:
    proc = popen_cli(*fit_args(run, data, *LONG), stdin=subprocess.PIPE)
    try:
        assert wait_for_rows(proc, run / "losses.jsonl", after_rows), proc.communicate()[1][-3000:]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)  # a stdin prompt would time out here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 128 + int(sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_resumable_checkpoint_and_exits(sig, data, tmp_path):
    run = tmp_path / "run"
    proc, expected_code = _interrupt(run, data, sig)
    assert proc.returncode == expected_code, proc.stderr[-3000:]
    stops = [ln for ln in proc.stderr.splitlines() if ln.startswith("chatlm: stopped by")]
    assert len(stops) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    m = re.fullmatch(rf"chatlm: stopped by {sig.name} after step (\d+): resumable checkpoint (.+last\.ckpt); "
                     r"continue with --ckpt_path last", stops[0])
    assert m, stops[0]
    step = int(m.group(1))
    ckpt = load_ckpt(m.group(2))
    assert ckpt["global_step"] == step == count_rows(run / "losses.jsonl")  # saved at an optimizer-step boundary
    if sig is signal.SIGTERM:  # resumed, it continues exactly as an uninterrupted run
        code, err = fit_inprocess(*fit_args(run, data, *LONG[2:], "--trainer.max_steps", str(step + 3),
                                            "--ckpt_path", "last"))
        assert code == 0, err[-3000:]
        full = tmp_path / "full"
        code, err = fit_inprocess(*fit_args(full, data, *LONG[2:], "--trainer.max_steps", str(step + 3)))
        assert code == 0, err[-3000:]
        assert_same_training_state(load_ckpt(full / "checkpoints" / "last.ckpt"),
                                   load_ckpt(run / "checkpoints" / "last.ckpt"))
        assert read_jsonl(run / "losses.jsonl") == read_jsonl(full / "losses.jsonl")


def test_a_second_signal_stops_at_once():
    stop = GracefulStop()
    stop._handler(signal.SIGTERM, None)
    assert stop.received == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGTERM, None)


def test_handlers_are_restored_after_training():
    stop = GracefulStop()
    before = signal.getsignal(signal.SIGTERM)

    class T:
        global_step = 0

    stop.on_train_start(T(), None)
    assert signal.getsignal(signal.SIGTERM) == stop._handler
    stop.on_train_end(T(), None)
    assert signal.getsignal(signal.SIGTERM) == before
