"""Parity: LLaMA-Factory (through legacy/train_with_real_llamafactory.py) vs the main path, and vs itself
on 2 processes.

CPU, fp32, dropout 0; the same initial weights (a tiny llama built after a seed and saved with
chatlm.model.export.save_hf, loaded by both), tokenizer (the bundled one), rows and batch order (the
script makes LLaMA-Factory's Trainer read chatlm.data.sampling's order). 20 optimizer steps with
gradient accumulation 2, clipping (max_grad_norm 1.0, active) and a cosine schedule with warmup,
for stages pt and sft and finetuning full and lora. The main path runs the config that
``--print_lightning_config`` prints for the same command line, so the migration mapping (data
format ``llamafactory``, ``packing``, ``window_tokens``, the pt clipping threshold) is tested too.
Measured (docs/parity.md): at most ~5e-7 relative difference per step; the tests allow 1e-4.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import TINY_SHAPE, REPO, read_jsonl, run

SCRIPT = os.path.join(REPO, "legacy", "train_with_real_llamafactory.py")
STEPS = 20
LOSS_RTOL = 1e-4   # per-step loss, relative (measured: <= 5e-7)
FIRST_RTOL = 1e-6  # step 1: depends only on the initial weights and the first window's batches
_ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
ACCELERATE_2CPU = ([_ACCELERATE, "launch"] if os.path.exists(_ACCELERATE)
                   else [sys.executable, "-m", "accelerate.commands.launch"]) + ["--cpu", "--num_processes", "2"]

pytestmark = [pytest.mark.parity, pytest.mark.llamafactory]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny llama HF directory (seeded init, bundled tokenizer) and the sft / pt training files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from chatlm.data.sample import generate_rows, sample_tokenizer_dir
    from chatlm.model.build import build_model
    from chatlm.model.export import save_hf
    from chatlm.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lf_parity")
    tok = load_tokenizer(sample_tokenizer_dir())
    torch.manual_seed(0)
    model = build_model("llama", len(tok), shape=TINY_SHAPE, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = {"model": str(save_hf(model, tok, root / "llama")), "root": root, "runs": {}}
    pq.write_table(pa.Table.from_pylist(generate_rows(64, 11)), root / "sft.parquet")   # 8 rows per step
    pq.write_table(pa.Table.from_pylist(generate_rows(256, 7)), root / "pt.parquet")    # ~160 blocks of 32
    out["sft"], out["pt"] = str(root / "sft.parquet"), str(root / "pt.parquet")
    return out


def script_args(setup: dict, stage: str, method: str, batch: int, name: str) -> list[str]:
    d = setup["root"] / name
    args = [
        "--model_name_or_path", setup["model"], "--stage", stage, "--finetuning_type", method,
        "--train_file", setup[stage], "--validation_file", "", "--dataset_dir", str(d / "data"),
        "--config_file", str(d / "llamafactory_config.yaml"),
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "2",
        "--max_steps", str(STEPS), "--learning_rate", "1e-2" if method == "lora" else "3e-3",
        "--optim", "adamw_torch", "--warmup_steps", "3", "--max_grad_norm", "1.0", "--seed", "1234",
        "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--plot_loss", "false",
        "--disable_tqdm", "true",
    ]
    if stage == "pt":  # 2 tokenization workers, packed per batch of 100 rows: data.packing_* reproduce it
        args += ["--cutoff_len", "32", "--preprocessing_num_workers", "2", "--preprocessing_batch_size", "100"]
    else:
        args += ["--cutoff_len", "64", "--preprocessing_num_workers", "1"]
    return args


def run_llamafactory(setup: dict, stage: str, method: str, batch: int = 4, nproc: int = 1) -> list[dict]:
    name = f"lf-{stage}-{method}-{nproc}x{batch}"
    if name not in setup["runs"]:
        out = setup["root"] / name / "out"
        launcher = [sys.executable] if nproc == 1 else ACCELERATE_2CPU
        proc = run(launcher + [SCRIPT, *script_args(setup, stage, method, batch, name), "--output_dir", str(out)])
        if nproc > 1:
            assert "world size: 2" in proc.stdout + proc.stderr
        setup["runs"][name] = read_jsonl(out / "losses.jsonl")
    return setup["runs"][name]


def assert_same_curve(a: list[dict], b: list[dict], min_drop: float) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=FIRST_RTOL)  # identical initial weights and batches
    worst = 0.0
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL), (x, y)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9, abs=1e-15), (x, y)
        worst = max(worst, abs(y["loss"] - x["loss"]) / abs(x["loss"]))
    assert a[-1]["loss"] < a[0]["loss"] - min_drop  # it trained: the comparison is not trivial
    return worst


@pytest.mark.parametrize("stage,method", [("sft", "full"), ("sft", "lora"), ("pt", "full"), ("pt", "lora")])
def test_llamafactory_matches_main_path(setup, stage, method):
    lf = run_llamafactory(setup, stage, method)
    name = f"main-{stage}-{method}"
    d = setup["root"] / name
    config = d / "main.yaml"
    d.mkdir(parents=True, exist_ok=True)
    # same flags as the LLaMA-Factory run (its dataset_dir holds the exported pt documents)
    args = script_args(setup, stage, method, 4, f"lf-{stage}-{method}-1x4")
    config.write_text(run([sys.executable, SCRIPT, *args, "--output_dir", str(d / "run"),
                           "--print_lightning_config"]).stdout, encoding="utf-8")
    text = config.read_text(encoding="utf-8")
    assert ("format: llamafactory" in text) if stage == "sft" else ("packing: true" in text)
    run([sys.executable, "-m", "src", "fit", "--config", str(config),
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.enable_progress_bar", "false", "--run.export_hf", "false",
         "--run.checkpoint_every_n_steps", "0"])
    main = read_jsonl(d / "run" / "losses.jsonl")
    worst = assert_same_curve(lf, main, min_drop=0.5 if method == "full" else 0.1)
    print(f"LLaMA-Factory {stage}/{method} vs main path: max relative loss difference {worst:.2e} over {STEPS} steps")


@pytest.mark.distributed
def test_llamafactory_two_processes_match_one_with_double_batch(setup):
    """``accelerate launch --cpu --num_processes 2`` at batch 2 == 1 process at batch 4 (LLaMA-Factory)."""
    one = run_llamafactory(setup, "sft", "full", batch=4)
    two = run_llamafactory(setup, "sft", "full", batch=2, nproc=2)
    worst = assert_same_curve(one, two, min_drop=0.5)
    print(f"LLaMA-Factory 2 processes vs 1: max relative loss difference {worst:.2e} over {STEPS} steps")
