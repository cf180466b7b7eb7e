"""DDP on 2 CPU processes (gloo) trains exactly like 1 process with twice the batch."""

import pytest

from helpers import CPU, TINY_T5, read_jsonl, run_cli


def _fit(run, devices, batch):
    args = ["fit", "--config", "configs/demo.yaml", *CPU, *TINY_T5,
            "--trainer.devices", str(devices), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", "12", "--trainer.accumulate_grad_batches", "2",
            "--trainer.limit_val_batches", "0", "--data.batch_size", str(batch),
            "--model.loss_normalization", "window_tokens", "--model.optimizer", "adamw",
            "--model.lr", "0.001", "--run.export_hf", "false"]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    run_cli(*args, timeout=900)
    return read_jsonl(run / "losses.jsonl")


@pytest.mark.distributed
def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path):
    one = _fit(tmp_path / "one", 1, 16)
    two = _fit(tmp_path / "two", 2, 8)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 13))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
