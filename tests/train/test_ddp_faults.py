"""Distributed faults (issue 5.7): in a 2-process DDP run on CPU (gloo), a process that dies
(SIGKILL) or hangs (SIGSTOP, past ``--run.ddp_timeout_s``) makes the other one exit within a
bounded time with one line ``chatlm: error: rank N: another process ... died or stopped
answering ...`` instead of hanging; ``last.ckpt`` stays loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import timedelta

import psutil
import pytest

from chatlm.errors import distributed_failure_message
from chatlm.train.distributed import strategy_with_timeout
from helpers import fit_args, load_ckpt, popen_cli, tiny_data, wait_for_rows

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "2000",
       "--trainer.limit_val_batches", "0", "--run.checkpoint_every_n_steps", "2"]
BOUND_S = 120  # the survivor must be gone this long after the fault (gloo notices a dead peer at once)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("ddp-data"))


def _start(run, data, *extra):
    proc = popen_cli(*fit_args(run, data, *DDP, *extra))
    try:
        assert wait_for_rows(proc, run / "losses.jsonl", 3, timeout=600), proc.communicate()[1][-3000:]
        children = [c for c in psutil.Process(proc.pid).children(recursive=True) if "src" in " ".join(c.cmdline())]
        assert len(children) == 1, children  # Lightning starts rank 1 as a child of rank 0
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, children[0]


def _finish(proc, rank1, timeout):
    """Wait for both ranks (the pipes close when both have exited); returns (stderr, seconds)."""
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=timeout)
        rank1.wait(timeout=max(1, timeout - (time.time() - t0)))
    finally:
        for p in (proc, rank1):
            try:
                if p.poll() is None if isinstance(p, subprocess.Popen) else p.is_running():
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.communicate()
    return err, time.time() - t0


def _one_line_errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("chatlm: error:")]


@pytest.mark.distributed
@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_a_killed_process_makes_the_other_exit_with_one_line(victim, data, tmp_path):
    run = tmp_path / "run"
    proc, rank1 = _start(run, data, "--run.ddp_timeout_s", "600")
    if victim == "rank1":
        os.kill(rank1.pid, signal.SIGKILL)
        err, seconds = _finish(proc, rank1, BOUND_S)
        assert proc.returncode == 1, err[-3000:]
        survivor = 0
    else:
        os.kill(proc.pid, signal.SIGKILL)
        err, seconds = _finish(proc, rank1, BOUND_S)
        assert rank1.is_running() is False
        survivor = 1
    assert seconds < BOUND_S
    lines = _one_line_errors(err)
    assert any(ln.startswith(f"chatlm: error: rank {survivor}: another process of this distributed run died")
               for ln in lines), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")  # intact
    assert ckpt["global_step"] >= 2
    assert len(ckpt["callbacks"]["ExactResume"]["ranks"]) == 2  # each rank's RNG state, for an exact resume


@pytest.mark.distributed
def test_a_hung_process_times_out_after_ddp_timeout_s(data, tmp_path):
    """SIGSTOP keeps rank 1's sockets open: only the process-group timeout can end rank 0's wait."""
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = popen_cli(*fit_args(run, data, *DDP, "--run.ddp_timeout_s", "15"), stdout=subprocess.DEVNULL,
                         stderr=stderr)
    rank1 = None
    try:
        assert wait_for_rows(proc, run / "losses.jsonl", 3, timeout=600), log.read_text()[-3000:]
        rank1 = next(c for c in psutil.Process(proc.pid).children(recursive=True) if "src" in " ".join(c.cmdline()))
        os.kill(rank1.pid, signal.SIGSTOP)
        t0 = time.time()
        try:
            proc.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still waits for the stopped rank 1")
        seconds = time.time() - t0
    finally:
        if rank1 is not None:
            try:
                rank1.kill()
                rank1.wait(timeout=30)
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 1 and seconds < BOUND_S, err[-3000:]
    lines = _one_line_errors(err)
    assert any(ln.startswith("chatlm: error: rank 0: another process of this distributed run died or stopped "
                             "answering") for ln in lines), err[-3000:]
    assert "Traceback" not in err


def test_ddp_timeout_reaches_the_strategy():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = strategy_with_timeout("ddp", 12)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=12)
    assert strategy_with_timeout("auto", 12) == "auto"
    assert strategy_with_timeout(None, 12) is None
    assert strategy_with_timeout("ddp", 0) == "ddp"


def test_distributed_failure_message(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                       "[127.0.0.1]:3999. This is typically caused by a remote worker crashing.")
    message = distributed_failure_message(err)
    assert message.startswith("rank 1: another process of this distributed run died or stopped answering "
                              "(Connection closed by peer [127.0.0.1]:3999)")
    assert distributed_failure_message(RuntimeError("shapes do not match")) is None
    assert distributed_failure_message(ValueError("gloo")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed_failure_message(RuntimeError("Connection closed by peer")) is None
