"""Parity: the legacy Transformers-Trainer script vs the main path, and vs itself on 2 processes.

CPU, fp32, dropout 0, the same initial weights (set_seed + chatlm.model.build.build_model on both
sides), tokenizer, rows and batch order (chatlm.data.sampling). 30 optimizer steps with
gradient accumulation 2, clipping (max_grad_norm 0.5) and a cosine schedule with warmup.
The main path runs the config that ``--print_lightning_config`` prints for the same
command line, so the migration mapping is tested too.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import REPO, read_jsonl, run

SCRIPT = os.path.join(REPO, "legacy", "train_with_transformers_trainer.py")
STEPS = 30
LOSS_RTOL = 1e-4   # per-step loss, relative (measured: ~1e-6 or better)
FIRST_RTOL = 1e-6  # step 1 (lr 0 before warmup: depends only on the initial weights and batch)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from chatlm.data.sample import generate_rows

    path = tmp_path_factory.mktemp("hf_parity") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(generate_rows(64, 11)), str(path))  # 64 rows: 8 steps an epoch
    return str(path)


def script_args(train_file: str, batch: int) -> list[str]:
    from chatlm.data.sample import sample_tokenizer_dir

    return [
        "--model_name_or_path", "", "--tokenizer_name_or_path", sample_tokenizer_dir(),
        "--d_model", "32", "--d_ff", "64", "--num_layers", "2", "--num_decoder_layers", "2",
        "--num_heads", "2", "--d_kv", "16", "--dropout", "0",
        "--train_file", train_file, "--validation_file", "", "--max_seq_length", "48",
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "2",
        "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--warmup_steps", "3",
        "--max_grad_norm", "0.5", "--seed", "1234", "--save_strategy", "no",
        "--logging_steps", "5", "--disable_tqdm", "True",
    ]


def run_script(args: list[str], out, nproc: int = 1) -> list[dict]:
    if nproc == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), SCRIPT]
    run(cmd + args + ["--output_dir", str(out), "--batch_log_file", str(out) + ".batches.jsonl"])
    return read_jsonl(os.path.join(out, "losses.jsonl"))


def assert_same_curve(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=FIRST_RTOL)  # identical initial weights
    worst = 0.0
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL), (x, y)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9, abs=1e-15), (x, y)
        worst = max(worst, abs(y["loss"] - x["loss"]) / abs(x["loss"]))
    assert a[-1]["loss"] < a[0]["loss"] - 0.5  # it trained: the comparison is not trivial
    return worst


@pytest.mark.parity
def test_trainer_script_matches_main_path(tmp_path, train_file):
    from chatlm.data.sampling import epoch_batches

    args = script_args(train_file, batch=4)
    hf = run_script(args, tmp_path / "hf")

    # the batch order is the shared one (the main path's ChatDataModule uses the same sampler)
    seen = read_jsonl(str(tmp_path / "hf") + ".batches.jsonl")
    want = [{"epoch": e, "rows": b} for e in range(4) for b in epoch_batches(64, 4, 1234, e)]
    assert seen == want[:STEPS * 2]

    config = tmp_path / "main.yaml"
    config.write_text(run([sys.executable, SCRIPT, *args, "--output_dir", str(tmp_path / "main"),
                           "--print_lightning_config"]).stdout)
    run([sys.executable, "-m", "src", "fit", "--config", str(config),
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.enable_progress_bar", "false", "--run.export_hf", "false",
         "--run.checkpoint_every_n_steps", "0"])
    main = read_jsonl(tmp_path / "main" / "losses.jsonl")
    worst = assert_same_curve(hf, main)
    print(f"hf trainer vs main path: max relative loss difference {worst:.2e} over {STEPS} steps")


@pytest.mark.parity
@pytest.mark.distributed
def test_trainer_script_two_processes_match_one_with_double_batch(tmp_path, train_file):
    one = run_script(script_args(train_file, batch=4), tmp_path / "one")
    two = run_script(script_args(train_file, batch=2), tmp_path / "two", nproc=2)
    worst = assert_same_curve(one, two)
    print(f"hf trainer 2 processes vs 1: max relative loss difference {worst:.2e} over {STEPS} steps")
    # rank 0 + rank 1 read exactly the rows of the single process, batch by batch
    single = read_jsonl(str(tmp_path / "one") + ".batches.jsonl")
    rank0 = read_jsonl(str(tmp_path / "two") + ".batches.jsonl")
    rank1 = read_jsonl(str(tmp_path / "two") + ".batches.jsonl.rank1")
    assert len(single) == len(rank0) == len(rank1) == STEPS * 2
    for s, a, b in zip(single, rank0, rank1):
        assert s["epoch"] == a["epoch"] == b["epoch"]
        assert s["rows"] == a["rows"] + b["rows"]
