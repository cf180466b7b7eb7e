"""Shared helpers for tests that run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_T5 = [
    "--model.arch", "t5", "--model.d_model", "32", "--model.d_ff", "64",
    "--model.num_layers", "2", "--model.num_decoder_layers", "2",
    "--model.num_heads", "2", "--model.d_kv", "16", "--model.dropout", "0.0",
]
TINY_LLAMA = [
    "--model.arch", "llama", "--model.d_model", "32", "--model.d_ff", "64",
    "--model.num_layers", "2", "--model.num_heads", "2", "--model.d_kv", "16",
    "--model.dropout", "0.0",
]
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
       "--trainer.enable_progress_bar", "false"]


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.pop("CHATLM_DEBUG", None)
    return e


def run_cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m src ARGS`` from the repo root; returns the completed process."""
    proc = subprocess.run([sys.executable, "-m", "src", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
