"""Helpers of the reliability tests (issue 5): tiny data, tiny fits in-process or as a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import CPU, REPO, TINY_T5, env, read_jsonl

DEMO = os.path.join(REPO, "configs", "demo.yaml")


def write_pairs(path, n: int, seed: int = 0) -> str:
    """``n`` rows of the bundled prompt/response task as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatlm.data.sample import generate_rows

    pq.write_table(pa.Table.from_pylist(generate_rows(n, seed=seed)), str(path))
    return str(path)


def tiny_data(directory) -> dict[str, str]:
    """40 train rows (10 batches of 4 per epoch) and 8 validation rows."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return {"train": write_pairs(d / "train.parquet", 40, seed=1), "val": write_pairs(d / "val.parquet", 8, seed=2)}


def fit_args(run, data: dict[str, str], *extra: str) -> list[str]:
    """A tiny T5 fit on ``data`` (no HF export, no plot): a few seconds per run."""
    return ["fit", "--config", DEMO, *CPU, *TINY_T5,
            "--data.train_file", data["train"], "--data.val_file", data["val"],
            "--data.batch_size", "4", "--data.max_seq_len", "32",
            "--model.bleu_max_samples", "4", "--model.max_new_tokens", "4",
            "--run.export_hf", "false", "--run.plot_loss", "false",
            "--trainer.default_root_dir", str(run), *extra]


def fit_inprocess(*args: str) -> tuple[int, str]:
    """``chatlm.cli.main(args)`` in this process; returns (exit code, captured stderr)."""
    from chatlm.cli import main

    err = io.StringIO()
    code = 0
    saved = os.environ.get("CHATLM_DEBUG")
    os.environ.pop("CHATLM_DEBUG", None)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns about pytest's own arguments
    try:
        with contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        if saved is None:
            os.environ.pop("CHATLM_DEBUG", None)
        else:
            os.environ["CHATLM_DEBUG"] = saved
    return code, err.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("chatlm: error:")]


def popen_cli(*args: str, extra_env: dict | None = None, stdin=subprocess.DEVNULL,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``python -m src ARGS`` as a child process (own session), stdout and stderr to pipes by default."""
    e = env()
    if extra_env:
        e.update(extra_env)
    return subprocess.Popen([sys.executable, "-m", "src", *args], cwd=REPO, env=e, stdin=stdin,
                            stdout=stdout, stderr=stderr, text=True, start_new_session=True)


def wait_for_rows(proc: subprocess.Popen, losses: Path, rows: int, timeout: float = 300) -> bool:
    """Wait until ``losses`` has at least ``rows`` rows; False if the process exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if count_rows(losses) >= rows:
            return True
        time.sleep(0.05)
    raise TimeoutError(f"{losses} did not reach {rows} rows in {timeout}s")


def count_rows(losses: Path) -> int:
    try:
        with open(losses, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def tree_digest(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under ``directory``."""
    out = {}
    root = Path(directory)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def load_ckpt(path) -> dict:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer and scheduler states and step of two checkpoints, bit for bit."""
    import torch

    assert a["global_step"] == b["global_step"], (a["global_step"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} weights differ, e.g. {differ[:3]}"
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for pid, sa in oa["state"].items():
            for key, va in sa.items():
                vb = ob["state"][pid][key]
                same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
                assert same, f"optimizer state {pid}.{key} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]


__all__ = ["DEMO", "write_pairs", "tiny_data", "fit_args", "fit_inprocess", "error_lines", "popen_cli",
           "wait_for_rows", "count_rows", "tree_digest", "load_ckpt", "assert_same_training_state",
           "read_jsonl"]
