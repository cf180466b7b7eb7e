"""legacy/train_with_transformers_trainer.py: arguments, migration config, data, a tiny run.

Loss-curve parity with the main path is in tests/test_parity_hf_trainer.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import TINY_SHAPE, REPO, load_script, read_jsonl, run, tokenizer_dir, write_pairs
import torch
import yaml

SCRIPT = os.path.join(REPO, "legacy", "train_with_transformers_trainer.py")
CONFIG = os.path.join(REPO, "configs", "legacy", "hf_trainer.yaml")
TINY = ["--model_name_or_path", "", "--d_model", "32", "--d_ff", "64", "--num_layers", "2",
        "--num_decoder_layers", "2", "--num_heads", "2", "--d_kv", "16", "--dropout", "0"]


legacy = load_script(SCRIPT, "legacy_hf_trainer_script")


# ----------------------------------------------------------------------------- arguments
def test_defaults_are_the_original_scripts():
    model_args, data_args, args = legacy.parse_arguments([])
    assert model_args.model_name_or_path == "./model_save/ChatLM-mini-Chinese/"
    assert model_args.tokenizer_name_or_path is None and not model_args.from_scratch
    assert (data_args.train_file, data_args.validation_file) == (
        "./data/my_train_dataset.parquet", "./data/my_valid_dataset.parquet")
    assert (data_args.max_seq_length, data_args.preprocessing_num_workers) == (512, 4)
    assert args.output_dir == "./model_save/llama_factory_output"
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size,
            args.gradient_accumulation_steps, args.learning_rate) == (5, 16, 32, 8, 1e-4)
    assert (str(args.optim.value if hasattr(args.optim, "value") else args.optim),
            str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))) == ("adafactor", "cosine")
    assert (args.warmup_steps, args.max_grad_norm, args.logging_steps, args.save_steps,
            args.save_total_limit, args.eval_steps) == (1024, 1.0, 50, 5000, 8, 5000)
    assert str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps"
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.gradient_checkpointing and args.ddp_timeout == 1800
    assert args.dataloader_num_workers == 0 and not args.dataloader_pin_memory
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        assert not args.bf16  # bf16 only where supported (the original's bf16=True raised on CPU)
        assert any("bf16" in n for n in args._notes)


def test_old_evaluation_strategy_name_and_no_validation_file():
    *_, args = legacy.parse_arguments(["--evaluation_strategy", "no"])
    assert str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no"
    assert not args.load_best_model_at_end
    _, data_args, args = legacy.parse_arguments(["--validation_file", ""])
    assert str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no"
    assert not args.load_best_model_at_end and not data_args.validation_file
    model_args, *_ = legacy.parse_arguments(["--model_name_or_path", ""])
    assert model_args.from_scratch
    model_args, *_ = legacy.parse_arguments(["--init_from_scratch", "True"])
    assert model_args.from_scratch


# ----------------------------------------------------------------------------- migration
def print_config(argv: list[str]) -> str:
    """What ``SCRIPT ARGV --print_lightning_config`` prints (run in this process)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert legacy.main([*argv, "--print_lightning_config"]) == 0
    return buf.getvalue()


def test_shipped_config_is_the_printed_default_config():
    with open(CONFIG, encoding="utf-8") as f:
        text = f.read()
    assert text.splitlines()[0] == "# python -m src fit --config configs/legacy/hf_trainer.yaml"
    printed = print_config([])
    assert printed.startswith("# python -m src fit --config")
    assert yaml.safe_load(printed) == yaml.safe_load(text)


def test_printed_config_follows_the_command_line():
    argv = [*TINY, "--tokenizer_name_or_path", "tok", "--train_file", "t.parquet", "--validation_file", "",
            "--max_steps", "30", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5",
            "--optim", "adamw_torch", "--adam_beta2", "0.98", "--lr_scheduler_type", "linear",
            "--warmup_steps", "0.1", "--per_device_train_batch_size", "4", "--seed", "7",
            "--data_seed", "9", "--bf16", "False", "--gradient_checkpointing", "False",
            "--save_strategy", "no", "--loss_normalization", "micro_batch", "--output_dir", "out"]
    cfg = yaml.safe_load(print_config(argv))
    assert cfg["seed_everything"] == 7 and cfg["data"]["seed"] == 9
    assert cfg["trainer"] == {"default_root_dir": "out", "max_steps": 30, "max_epochs": -1,
                              "accumulate_grad_batches": 2, "gradient_clip_val": 0.5,
                              "precision": "32-true", "log_every_n_steps": 50, "limit_val_batches": 0}
    model, shape, optim = cfg["model"], cfg["model"]["shape"], cfg["model"]["optim"]
    assert model["pretrained"] is None and (shape["d_model"], shape["d_kv"], shape["dropout"]) == (32, 16, 0.0)
    assert (optim["optimizer"], optim["betas"], optim["scheduler"], optim["warmup_steps"]) == (
        "adamw", [0.9, 0.98], "linear", 3)  # warmup ratio 0.1 of 30 steps, as the Trainer rounds it
    assert optim["loss_normalization"] == "micro_batch" and not model["gradient_checkpointing"]
    assert cfg["data"]["tokenizer"] == "tok" and cfg["data"]["val_file"] is None
    assert cfg["run"]["checkpoint_every_n_steps"] == 0
    # a ratio needs a known number of steps
    with pytest.raises(SystemExit, match="warmup_steps"):
        print_config(["--warmup_steps", "0.1"])


def test_print_lightning_config_from_the_command_line():
    proc = run([sys.executable, SCRIPT, "--optim", "adamw_torch", "--print_lightning_config"])
    assert proc.stdout.startswith("# python -m src fit --config")
    assert yaml.safe_load(proc.stdout)["model"]["optim"]["optimizer"] == "adamw"


# ----------------------------------------------------------------------------- data / model
def test_original_data_format_layout():
    from chatlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    rows = [{"prompt": "spell 47", "response": "47 is forty-seven"},
            {"prompt": "add 1 and 2", "response": "1 + 2 = 3"}]
    data_args = legacy.DataArguments(max_seq_length=4, data_format="original")
    batch = legacy.make_collator(tok, data_args, bf16=True)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape[1] % 8 == 0  # pad_to_multiple_of 8
    want = tok(["spell 47", "add 1 and 2"], max_length=4, truncation=True)["input_ids"]
    for i, ids in enumerate(want):
        assert batch["input_ids"][i, :len(ids)].tolist() == ids  # token truncation, no [EOS]
        assert (batch["input_ids"][i, len(ids):] == tok.pad_token_id).all()
        assert tok.eos_token_id not in ids
    assert (batch["labels"] == -100).any()  # labels padded with -100
    legacy_batch = legacy.make_collator(tok, legacy.DataArguments(max_seq_length=64), bf16=False)(rows)
    from chatlm.data.collate import Seq2SeqCollator

    ref = Seq2SeqCollator(tok, 64)(rows)
    assert all(torch.equal(legacy_batch[k], ref[k]) for k in ref)


def test_new_model_has_the_main_paths_initial_weights():
    """set_seed(seed) + chatlm.model.build.build_model == the main path's seed_everything + ChatLM."""
    from chatlm.data.tokenizer import load_tokenizer
    from lightning.pytorch import seed_everything

    from chatlm.train.module import ChatLM

    tok = load_tokenizer(tokenizer_dir())
    model_args, _, _ = legacy.parse_arguments(TINY)
    ours = legacy.build_model(model_args, tok, seed=123).state_dict()
    seed_everything(123)
    theirs = ChatLM(arch="t5", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, shape=TINY_SHAPE).model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----------------------------------------------------------------------------- runs
def test_tiny_run_reads_input_target_columns_in_the_shared_order(tmp_path):
    """The original's input/target columns, 2 epochs, evaluation, then a second run that loads
    the saved directory (the original's only mode)."""
    from chatlm.data.sampling import epoch_batches

    train = write_pairs(tmp_path / "train.parquet", 16, 1, columns=("input", "target"))
    val = write_pairs(tmp_path / "val.parquet", 6, 2, columns=("input", "target"))
    out = tmp_path / "out"
    run([sys.executable, SCRIPT, *TINY, "--tokenizer_name_or_path", tokenizer_dir(),
         "--train_file", train, "--validation_file", val, "--output_dir", str(out),
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
         "--gradient_accumulation_steps", "2", "--max_steps", "4", "--warmup_steps", "1",
         "--learning_rate", "1e-3", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
         "--max_seq_length", "48", "--seed", "5", "--disable_tqdm", "True",
         "--batch_log_file", str(tmp_path / "batches.jsonl")])
    rows = read_jsonl(out / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)  # warmup 1, then cosine
    seen = read_jsonl(tmp_path / "batches.jsonl")
    want = [{"epoch": e, "rows": b} for e in (0, 1) for b in epoch_batches(16, 4, 5, e)]
    assert seen == want  # the shared order, a new order each epoch (set_epoch)
    metrics = json.loads((out / "eval_results.json").read_text())
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    again = tmp_path / "again"
    run([sys.executable, SCRIPT, "--model_name_or_path", str(out), "--train_file", train,
         "--validation_file", "", "--output_dir", str(again), "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "1", "--max_steps", "1", "--save_strategy", "no",
         "--gradient_checkpointing", "False", "--disable_tqdm", "True", "--seed", "5"])
    first = read_jsonl(again / "losses.jsonl")
    assert [r["step"] for r in first] == [1]


def test_stock_normalization_shows_the_transformers_t5_scaling(tmp_path):
    """--loss_normalization stock: transformers 5.x on T5 backpropagates (and logs) the SUM of
    the micro-batch means of a window (x processes), not their mean: the defect that the
    default window_tokens corrects."""
    train = write_pairs(tmp_path / "train.parquet", 16, 1)
    out = tmp_path / "out"
    run([sys.executable, SCRIPT, *TINY, "--tokenizer_name_or_path", tokenizer_dir(),
         "--train_file", train, "--validation_file", "", "--output_dir", str(out),
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
         "--loss_normalization", "stock", "--gradient_checkpointing", "False", "--disable_tqdm", "True"])
    ours = read_jsonl(out / "losses.jsonl")
    logged = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in h]
    assert len(logged) == 2
    for row, theirs in zip(ours, logged):
        assert theirs == pytest.approx(2 * row["loss"], rel=1e-3)


@pytest.mark.distributed
def test_accelerate_launch_and_evaluation_on_two_processes(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` runs 2 CPU processes (torchrun
    underneath, gloo); ``--cpu --num_processes 2`` runs ONE process (accelerate starts several
    CPU processes only through mpirun with a hostfile), so it is given twice the batch. Both
    train the same steps, and evaluation over 21 rows (a last round that does not fill both
    processes) gives the same eval_loss."""
    train = write_pairs(tmp_path / "train.parquet", 16, 1)
    val = write_pairs(tmp_path / "val.parquet", 21, 3)
    results = {}
    for mode, batch, world in (("--multi_gpu", 2, 2), ("--cpu", 4, 1)):
        out = tmp_path / mode.strip("-")
        proc = run([sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port()), SCRIPT, *TINY,
                    "--tokenizer_name_or_path", tokenizer_dir(), "--train_file", train,
                    "--validation_file", val, "--output_dir", str(out),
                    "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "3",
                    "--gradient_accumulation_steps", "2", "--max_steps", "2", "--learning_rate", "1e-3",
                    "--warmup_steps", "0", "--eval_steps", "2", "--save_steps", "2",
                    "--gradient_checkpointing", "False", "--disable_tqdm", "True"])
        assert f"world size {world}," in proc.stdout
        results[mode] = (read_jsonl(out / "losses.jsonl"), json.loads((out / "eval_results.json").read_text()))
    (two, two_eval), (one, one_eval) = results["--multi_gpu"], results["--cpu"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert two_eval["eval_samples"] == one_eval["eval_samples"] == 21
    assert two_eval["eval_loss"] == pytest.approx(one_eval["eval_loss"], rel=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
