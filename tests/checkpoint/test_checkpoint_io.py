"""Atomic writes and safe loading (issue 5.3, 5.4): checkpoints, exports and summaries are
written to a temporary name and renamed; a kill or a full disk never leaves half a file; the
best checkpoint is never deleted; checkpoints never run code when loaded."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatlm.checkpoint.store as rel
from chatlm.checkpoint.trainer_io import AtomicCheckpointIO
from chatlm.errors import CheckpointError, DiskSpaceError
from chatlm.checkpoint.store import atomic_torch_save, load_checkpoint_safely
from helpers import TINY_SHAPE, error_lines, fit_args, fit_inprocess, load_ckpt, tiny_data


class Evil:
    """Pickles to a call of os.system: loading it with weights_only=False would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tmp_files(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(rel.TMP_PREFIX)]


# ----------------------------------------------------------------------------- atomic checkpoint writes
KILL_MID_WRITE = """
import io, os, signal, sys, torch
import chatlm.checkpoint.store as rel
real_save = torch.save
def half_save(obj, f):  # write half of the new checkpoint, then die by SIGKILL mid-write
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
rel.torch.save = half_save
rel.atomic_torch_save({"step": 2, "w": torch.zeros(100_000)}, sys.argv[1])
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, subprocess_env):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(100_000, dtype=torch.float32)}, str(path))
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = _tmp_files(tmp_path)
    assert len(leftovers) == 1 and os.path.getsize(tmp_path / leftovers[0]) > 0  # the half-written file
    # `--ckpt_path last` only considers last*.ckpt (Lightning's pattern): never the partial file
    assert not re.match(r"^last(-(\d+))?$", Path(leftovers[0]).stem)
    old = load_checkpoint_safely(str(path))
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(100_000, dtype=torch.float32))
    atomic_torch_save({"step": 3}, str(path))  # the next save removes the dead process' file
    assert _tmp_files(tmp_path) == [] and load_checkpoint_safely(str(path))["step"] == 3


def test_a_save_that_cannot_fit_on_the_disk_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, str(path))
    before = path.read_bytes()
    usage = os.statvfs(tmp_path)
    monkeypatch.setattr(rel.shutil, "disk_usage",
                        lambda d: type("U", (), {"free": 1024, "total": usage.f_blocks, "used": 0})())
    with pytest.raises(DiskSpaceError, match=r"not enough disk space to save .*last\.ckpt.*MiB.*free"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1_000_000)}, str(path))
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []


def test_disk_full_during_the_write_removes_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, str(path))
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rel.torch, "save", full_disk)
    with pytest.raises(DiskSpaceError, match="disk full while saving"):
        atomic_torch_save({"step": 2}, str(path))
    assert path.read_bytes() == before and _tmp_files(tmp_path) == []


def test_estimate_covers_the_real_checkpoint_size(tmp_path):
    obj = {"state_dict": {"a": torch.zeros(300, 300), "b": torch.ones(1000, dtype=torch.int64)},
           "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(300, 300)}}}], "hyper_parameters": {"lr": 1e-3}}
    atomic_torch_save(obj, str(tmp_path / "x.ckpt"))
    assert rel.estimate_checkpoint_bytes(obj) >= os.path.getsize(tmp_path / "x.ckpt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("io-data"))


def test_fit_on_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = fit_args(run, data, "--run.checkpoint_every_n_steps", "2", "--trainer.limit_val_batches", "0")
    code, err = fit_inprocess(*args, "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real = rel.shutil.disk_usage
    monkeypatch.setattr(rel.shutil, "disk_usage",
                        lambda d: real(d)._replace(free=1024) if "checkpoints" in str(d) else real(d))
    code, err = fit_inprocess(*args, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "not enough disk space to save checkpoint" in lines[0] and "last.ckpt" in lines[0]
    assert "Traceback" not in err
    assert last.read_bytes() == before and load_ckpt(last)["global_step"] == 2
    assert _tmp_files(run / "checkpoints") == []


def test_an_export_that_cannot_fit_on_the_disk_says_so(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = rel.shutil.disk_usage
    monkeypatch.setattr(rel.shutil, "disk_usage",
                        lambda d: real(d)._replace(free=1024) if os.path.abspath(d) == str(run) else real(d))
    code, err = fit_inprocess(*fit_args(run, data, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                                        "--run.export_hf", "true"))
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "not enough disk space to save the export" in lines[0] and str(run / "hf") in lines[0]
    assert not (run / "hf").exists() and [n for n in os.listdir(run) if n.startswith(".hf")] == []
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # the checkpoint is there


# ----------------------------------------------------------------------------- best-k
def test_keeping_the_best_k_never_deletes_the_best(data, tmp_path, monkeypatch):
    """Every removal of a best-k file happens after its replacement is written; the final best exists."""
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    events: list[tuple[str, str, set]] = []
    real_save, real_remove = AtomicCheckpointIO.save_checkpoint, AtomicCheckpointIO.remove_checkpoint

    def best_files() -> set:
        return {n for n in os.listdir(ckpt_dir) if n.startswith("best")} if ckpt_dir.exists() else set()

    def save(self, checkpoint, path, storage_options=None):
        real_save(self, checkpoint, path, storage_options)
        events.append(("save", os.path.basename(path), best_files()))

    def remove(self, path):
        real_remove(self, path)
        events.append(("remove", os.path.basename(path), best_files()))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", remove)
    code, err = fit_inprocess(*fit_args(run, data, "--trainer.max_steps", "10", "--trainer.val_check_interval", "2",
                                        "--model.bleu_max_samples", "0", "--run.save_top_k", "1",
                                        "--model.lr", "0.01", "--model.warmup_steps", "0"))
    assert code == 0, err[-3000:]
    removals = [e for e in events if e[0] == "remove"]
    assert removals, events  # the best changed at least once
    for kind, name, present in events:
        if kind == "remove" or name.startswith("best"):
            assert present, (kind, name)  # a best checkpoint exists after every event once one was saved
    summary = json.loads((run / "summary.json").read_text())
    assert os.path.exists(summary["best_checkpoint"]) and best_files() == {os.path.basename(summary["best_checkpoint"])}
    import csv

    val_losses = [float(r["val_loss"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_loss")]
    assert load_ckpt(summary["best_checkpoint"])["callbacks"]  # a full, loadable checkpoint
    assert f"{min(val_losses):.4f}" in summary["best_checkpoint"]


# ----------------------------------------------------------------------------- summary and export
def test_summary_write_failure_keeps_the_old_summary(tmp_path, monkeypatch):
    from chatlm.util.files import atomic_write_text

    path = tmp_path / "summary.json"
    atomic_write_text(str(path), '{"old": true}\n')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError):
        atomic_write_text(str(path), '{"new": true}\n')
    assert path.read_text() == '{"old": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_export_failure_keeps_the_old_export(tmp_path, monkeypatch):
    from chatlm.model.build import build_model
    from chatlm.model.export import save_hf

    model = build_model("t5", 64, shape=TINY_SHAPE, pad_token_id=0, eos_token_id=1)
    out = tmp_path / "hf"
    save_hf(model, None, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, directory, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        save_hf(model, None, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directory left


# ----------------------------------------------------------------------------- safe loading
def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused as unsafe"):
        load_checkpoint_safely(str(evil))
    # Lightning passes weights_only=None (or False): the IO plugin still refuses
    for weights_only in (None, False):
        with pytest.raises(CheckpointError, match="refused as unsafe"):
            AtomicCheckpointIO().load_checkpoint(str(evil), weights_only=weights_only)
    # legacy .bin state dicts (--model.pretrained, the legacy shims) go through the same kind of check
    from chatlm.errors import ModelLoadError
    from chatlm.model.load import read_state_dict

    torch.save({"shared.weight": torch.zeros(2), "x": Evil(marker)}, tmp_path / "evil.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError, match="refused as unsafe"):
        read_state_dict(tmp_path / "evil.bin")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "not_a_dict", "missing", "directory"])
def test_corrupt_checkpoints_give_one_line_naming_the_file(tmp_path, kind):
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.zeros(1000)}}, str(good))
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_safely(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    if kind in ("truncated", "garbage"):
        assert "corrupt or truncated" in message and "unsafe" not in message


def test_trust_remote_code_stays_off(tmp_path):
    """A model directory that ships its own code is refused unless --model.trust_remote_code."""
    import inspect

    from chatlm.errors import ModelLoadError
    from chatlm.model.build import build_model
    from chatlm.model.load import load_model
    from chatlm.train.module import ChatLM

    marker = tmp_path / "PWNED"
    model = build_model("t5", 64, shape=TINY_SHAPE, pad_token_id=0, eos_token_id=1)
    d = tmp_path / "remote"
    model.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig",
                       "AutoModelForSeq2SeqLM": "evil_config.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_config.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    try:
        loaded = load_model(d)  # transformers falls back to its own T5 class, or refuses
        assert type(loaded).__module__.startswith("transformers.")
    except ModelLoadError:
        pass
    assert not marker.exists()  # the directory's code never ran
    assert inspect.signature(ChatLM).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
