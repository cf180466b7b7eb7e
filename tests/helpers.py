"""The one helpers module of the tests: paths, tiny model flags, child processes, data files,
in-process fits and checkpoint comparisons. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
if SRC not in sys.path:  # chatlm without `pip install -e .`
    sys.path.insert(0, SRC)
if REPO not in sys.path:  # the benchmark harness (bench/) and legacy/ live beside src/
    sys.path.insert(1, REPO)

def _tiny_shape():
    from chatlm.model.config import ModelShape

    return ModelShape(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, dropout=0.0)


#: The tiny model of the tests (a few thousand parameters, dropout 0).
TINY_SHAPE = _tiny_shape()
TINY_T5 = [
    "--model.arch", "t5", "--model.shape.d_model", "32", "--model.shape.d_ff", "64",
    "--model.shape.num_layers", "2", "--model.shape.num_decoder_layers", "2",
    "--model.shape.num_heads", "2", "--model.shape.d_kv", "16", "--model.shape.dropout", "0.0",
]
TINY_LLAMA = [
    "--model.arch", "llama", "--model.shape.d_model", "32", "--model.shape.d_ff", "64",
    "--model.shape.num_layers", "2", "--model.shape.num_heads", "2", "--model.shape.d_kv", "16",
    "--model.shape.dropout", "0.0",
]
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
       "--trainer.enable_progress_bar", "false"]
#: Environment variables of ours or of an engine that must not leak into a child process.
_UNSET = ("CHATLM_DEBUG", "DISABLE_VERSION_CHECK", "ALLOW_EXTRA_ARGS", "LLAMAFACTORY_VERBOSITY")


# ----------------------------------------------------------------------------- child processes
def env(threads: int | None = None, **extra: str) -> dict:
    """Environment of a child process: offline, unbuffered, ``src/`` importable; ``threads``
    sets OMP_NUM_THREADS."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, e.get("PYTHONPATH", "")) if p)
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    for key in _UNSET:
        e.pop(key, None)
    e.update(extra)
    return e


def run(cmd: Sequence[str], check: bool = True, timeout: int = 900, threads: int | None = 1,
        **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root (one compute thread unless ``threads`` says otherwise);
    with ``check``, a non-zero exit fails with its output."""
    proc = subprocess.run(list(cmd), cwd=REPO, env=env(threads), capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\nSTDOUT:\n{proc.stdout[-3000:]}"
                             f"\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m src ARGS`` from the repo root; returns the completed process."""
    return run([sys.executable, "-m", "src", *args], check=check, timeout=timeout, threads=None)


def load_script(path: str, name: str):
    """A legacy script imported as a module (registered in sys.modules: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- files
def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_parquet(path: str | os.PathLike, rows: Sequence[dict], schema=None) -> str:
    """Write a list of row dicts to ``path`` as parquet and return the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), str(path))
    return str(path)


def write_pairs(path, n: int, seed: int = 0, columns: tuple[str, str] = ("prompt", "response")) -> str:
    """``n`` rows of the bundled prompt/response task as parquet (columns renamed if asked)."""
    from chatlm.data.sample import generate_rows

    rows = [{columns[0]: r["prompt"], columns[1]: r["response"]} for r in generate_rows(n, seed=seed)]
    return write_parquet(path, rows)


def tokenizer_dir() -> str:
    """The bundled sample tokenizer ([PAD]=0, [EOS]=1)."""
    from chatlm.data.sample import sample_tokenizer_dir

    return sample_tokenizer_dir()


# ----------------------------------------------------------------------------- fits
DEMO = os.path.join(REPO, "configs", "demo.yaml")


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
            "--model.evaluation.bleu_max_samples", "4", "--model.evaluation.max_new_tokens", "4",
            "--run.export_hf", "false", "--run.plot_loss", "false",
            "--trainer.default_root_dir", str(run), *extra]


def fit_inprocess(*args: str) -> tuple[int, str]:
    """``chatlm.train.cli.main(args)`` in this process; returns (exit code, captured stderr)."""
    from chatlm.train.cli import main

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


