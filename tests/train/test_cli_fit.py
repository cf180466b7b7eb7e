"""End-to-end: `python -m src fit` on the bundled data writes the whole run directory."""

import json
import os

import pytest
import torch

from helpers import CPU, TINY_LLAMA, TINY_T5, read_jsonl, run_cli


def _fit(tmp_path, *extra):
    run = tmp_path / "run"
    proc = run_cli("fit", "--config", "configs/demo.yaml", *CPU, *TINY_T5,
                   "--trainer.default_root_dir", str(run), "--trainer.max_steps", "12",
                   "--trainer.val_check_interval", "6", "--trainer.accumulate_grad_batches", "2",
                   "--data.batch_size", "8", "--data.val_max_samples", "16",
                   "--model.bleu_max_samples", "8", "--model.max_new_tokens", "8",
                   "--run.checkpoint_every_n_steps", "3", *extra)
    return run, proc


def test_fit_writes_run_dir(tmp_path):
    run, proc = _fit(tmp_path)
    assert "run written to" in proc.stdout
    rows = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # one row per optimizer step
    assert all(set(r) == {"step", "loss", "lr"} and r["loss"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "train_loss_first", "train_loss_last", "val_loss", "val_bleu4",
                "tokens_per_s", "nonpad_tokens_per_s", "peak_rss_mb", "best_checkpoint",
                "hf_export_dir"):
        assert summary[key] is not None, key
    assert summary["steps"] == 12
    assert summary["train_loss_first"] == rows[0]["loss"]
    assert summary["nonpad_tokens_per_s"] <= summary["tokens_per_s"]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert os.path.exists(summary["best_checkpoint"])
    assert (run / "metrics.csv").exists() and (run / "loss.png").stat().st_size > 1000
    # The export loads with plain transformers.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(run / "hf")
    tok = AutoTokenizer.from_pretrained(run / "hf")
    assert model.config.vocab_size == len(tok)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12


def test_resume_from_last_continues_the_loss_log(tmp_path):
    run, _ = _fit(tmp_path, "--trainer.max_steps", "6")
    _fit(tmp_path, "--trainer.max_steps", "12", "--ckpt_path", "last")
    rows = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_causal_lora_fit_and_predict(tmp_path):
    run = tmp_path / "run"
    run_cli("fit", "--config", "configs/demo.yaml", *CPU, *TINY_LLAMA, "--data.format", "causal",
            "--model.lora_r", "4", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4", "--data.val_max_samples", "8",
            "--model.bleu_max_samples", "4", "--model.max_new_tokens", "6")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "hf")  # LoRA merged: plain model
    assert not any("lora" in n for n, _ in model.named_parameters())
    out = run_cli("predict", "--model", str(run / "hf"), "--prompt", "spell 42", "--max_new_tokens", "5")
    assert "spell 42" in out.stdout


@pytest.mark.parametrize("flag", ["--help"])
def test_help_documents_options(flag):
    out = run_cli("fit", flag).stdout
    for key in ("--data.train_file", "--data.val_file", "--data.test_file", "--data.tokenizer",
                "--data.max_seq_len", "--data.batch_size", "--model.optimizer",
                "--model.gradient_checkpointing", "--trainer.max_steps", "--trainer.default_root_dir",
                "--run.checkpoint_every_n_steps"):
        assert key in out, key
    assert "IGNORES lr" in out  # the docstrings reach --help


def test_flat_model_flags_and_yaml_keys_of_earlier_releases_still_work(tmp_path):
    """--model.lr / --model.d_model / --model.lora_r (and flat YAML keys) land in their option groups."""
    from chatlm.model.config import FLAT_NAMES
    from chatlm.train.cli import parse_fit_config

    flat = parse_fit_config(["--config", "configs/demo.yaml", "--model.lr", "0.01", "--model.d_model=48",
                             "--model.lora_r", "4", "--model.bleu_max_samples", "3"])
    nested = parse_fit_config(["--config", "configs/demo.yaml", "--model.optim.lr", "0.01", "--model.shape.d_model=48",
                               "--model.lora.r", "4", "--model.evaluation.bleu_max_samples", "3"])
    assert flat["model"] == nested["model"]
    assert (nested["model"]["optim"]["lr"], nested["model"]["shape"]["d_model"], nested["model"]["lora"]["r"]) == (
        0.01, 48, 4)
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  d_model: 40\n  optimizer: adafactor\n  lora_alpha: 8\n  max_new_tokens: 7\n")
    model = parse_fit_config(["--config", str(old)])["model"]
    assert (model["shape"]["d_model"], model["optim"]["optimizer"], model["lora"]["alpha"],
            model["evaluation"]["max_new_tokens"]) == (40, "adafactor", 8, 7)
    assert {"d_model", "lr", "optimizer", "gradient_checkpointing"} - {"gradient_checkpointing"} <= set(FLAT_NAMES)


def test_a_checkpoint_stores_its_options_as_plain_values():
    """Groups are saved as dicts (checkpoints load with weights_only=True) and rebuild the module."""
    from chatlm.model.config import ModelShape, Optimization
    from chatlm.train.module import ChatLM

    module = ChatLM(arch="llama", vocab_size=64, shape=ModelShape(d_model=16, d_ff=32, num_layers=1, num_heads=2),
                    optim={"lr": 0.5})
    hp = dict(module.hparams)
    assert hp["shape"]["d_model"] == 16 and hp["optim"]["lr"] == 0.5 and isinstance(hp["optim"]["betas"], list)
    assert all(isinstance(v, (dict, list, str, int, float, bool, type(None))) for v in hp.values())
    again = ChatLM(**hp)
    assert again.shape == module.shape and again.optim == Optimization(lr=0.5)
