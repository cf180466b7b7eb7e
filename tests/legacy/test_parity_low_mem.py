"""Parity: legacy/train_low_mem.py against the main path, and against itself on 2 processes.

All runs: CPU, fp32, a tiny T5, the bundled tokenizer, data generated here (unseen by
anything else). The main path runs ``python -m src fit`` with the shipped
``configs/legacy/low_mem_pretrain.yaml`` (plus size/data overrides), or with the YAML that
``--print_lightning_config`` prints for the legacy command line, exactly as a user migrates.

Tolerances (measured on this CPU, see docs in the test bodies):
* legacy vs main path: 1e-5 relative per step and on the final parameters (1e-3 under the
  legacy default bf16 autocast); the main path's Adafactor (chatlm.model.adafactor) equals
  Transformers' to float rounding, so the curves agree to ~1e-7 in fp32 (printed with -s).
* legacy on 2 processes at batch b vs 1 process at batch 2b, responses of equal token
  length: 1e-5 relative per step / on the parameters; measured max 1.3e-7 (losses, 32 steps)
  and 1.6e-7 (parameters): float summation order only.
* the same on responses of different lengths: only the first step is equal (1e-6): each
  process's loss is a token mean over its own rows and DDP averages the two gradients, so a
  process with fewer label tokens weighs its tokens more than one process at batch 2b does
  (the legacy loop's "micro_batch" loss normalisation; measured drift up to 1.5% by step 6).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, read_jsonl
from test_legacy_low_mem import TINY, env, legacy, paths, state_dict, tokenizer_dir, write_rows

REL = 1e-5
MAIN_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
            "--run.export_hf", "false", "--run.plot_loss", "false"]
MAIN_TINY = ["--model.d_model", "32", "--model.d_ff", "64", "--model.num_layers", "2",
             "--model.num_decoder_layers", "2", "--model.num_heads", "2", "--model.d_kv", "16"]


def main_path(*args: str, tmp_root, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m src ARGS`` from the repo root."""
    cmd = [sys.executable, "-m", "src", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_root), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def assert_same_losses(ref: list[dict], other: list[dict], rel: float = REL, steps: int | None = None,
                       check_lr: bool = True) -> float:
    """Same steps, each loss within ``rel`` (and the lr); returns the largest relative difference."""
    if steps is not None:
        assert [r["step"] for r in ref] == list(range(1, steps + 1)), [r["step"] for r in ref]
    assert [r["step"] for r in other] == [r["step"] for r in ref]
    worst = 0.0
    for a, b in zip(ref, other):
        diff = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        worst = max(worst, diff)
        assert diff <= rel, (a, b, diff)
        if check_lr:
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-9, abs=1e-15), (a, b)
    return worst


def lightning_weights(ckpt: str) -> dict:
    import torch

    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v for k, v in sd.items()}


def assert_same_params(ref: dict, other: dict, rel: float = REL) -> float:
    """Every tensor of ``ref`` in ``other``; max |difference| <= rel * max |parameter|."""
    missing = set(ref) - set(other)
    assert not missing, sorted(missing)[:5]
    scale = max(float(v.abs().max()) for v in ref.values())
    worst = max(float((ref[k].float() - other[k].float()).abs().max()) for k in ref)
    assert worst <= rel * scale, (worst, scale)
    return worst / scale


@pytest.fixture(scope="module")
def pdata(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity_data")
    return {
        # 64 rows at batch 4: 16 micro-batches per epoch, a multiple of the accumulation (2 or 4),
        # so the legacy loop never carries a window over an epoch end (Lightning would step it).
        "train": write_rows(str(d / "train.parquet"), 64, seed=101),
        "valid": write_rows(str(d / "valid.parquet"), 8, seed=102),
        "test": write_rows(str(d / "test.parquet"), 4, seed=103),
        "tokenizer": tokenizer_dir(),
        "root": d,
    }


def legacy_train(run_dir, data, *extra: str, epochs: int, batch: int = 4, tiny: list[str] = TINY) -> list[str]:
    return ["train", "--adaptive_memory=False", "--mixed_precision=no", *tiny, *paths(run_dir, data),
            f"--epochs={epochs}", f"--batch_size_per_gpu={batch}", "--max_seq_len=24",
            "--save_steps=16", *extra]  # save_steps = batches per epoch: epoch_{e}_latest = end-of-epoch weights


@pytest.fixture(scope="module")
def legacy_pretrain(pdata, tmp_path_factory):
    """The reference: legacy pretraining (TrainConfig, accumulation 2), 4 epochs = 32 optimizer steps."""
    run = tmp_path_factory.mktemp("legacy_ref")
    legacy(*legacy_train(run, pdata, epochs=4), tmp_root=pdata["root"])
    return run


@pytest.mark.parity
def test_legacy_matches_main_path_with_its_shipped_config_across_a_resume(pdata, legacy_pretrain, tmp_path):
    """32 optimizer steps, accumulation 2, clipping at 1.0; both engines interrupted at step 13 and resumed.

    The main path runs the shipped configs/legacy/low_mem_pretrain.yaml with only sizes, data and
    device overridden -- the migration a user does.
    """
    ref = read_jsonl(legacy_pretrain / "losses.jsonl")
    assert len(ref) == 32

    # legacy, interrupted after optimizer step 13 (mid epoch 1), then --is_keep_training=True
    li = tmp_path / "legacy_resumed"
    legacy(*legacy_train(li, pdata, "--interrupt_at_step=13", epochs=4), tmp_root=pdata["root"])
    assert len(read_jsonl(li / "losses.jsonl")) == 13
    legacy(*legacy_train(li, pdata, "--is_keep_training=True", epochs=4), tmp_root=pdata["root"])
    assert_same_losses(ref, read_jsonl(li / "losses.jsonl"), rel=0.0, steps=32)  # bit-exact resume

    # main path, stopped at step 13 (checkpoints/last.ckpt), then --ckpt_path last
    run = tmp_path / "main"
    common = ["fit", "--config", "configs/legacy/low_mem_pretrain.yaml", *MAIN_CPU, *MAIN_TINY,
              "--model.dropout", "0.0", "--model.max_new_tokens", "24", "--model.scheduler_total_steps", "32",
              "--trainer.precision", "32-true", "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(run),
              "--data.train_file", pdata["train"], "--data.val_file", pdata["valid"],
              "--data.test_file", pdata["test"], "--data.tokenizer", pdata["tokenizer"],
              "--data.max_seq_len", "24", "--data.batch_size", "4", "--data.eval_batch_size", "8",
              "--run.checkpoint_every_n_steps", "13"]
    main_path(*common, "--trainer.max_steps", "13", tmp_root=pdata["root"])
    assert len(read_jsonl(run / "losses.jsonl")) == 13
    main_path(*common, "--ckpt_path", "last", tmp_root=pdata["root"])
    main_rows = read_jsonl(run / "losses.jsonl")
    worst = assert_same_losses(ref, main_rows, steps=32)
    print(f"legacy vs main path (TrainConfig, resumed): max relative loss difference {worst:.2e}")

    legacy_final = state_dict(str(legacy_pretrain / "chat_small_t5.epoch_3_latest.bin"))
    worst = assert_same_params(legacy_final, lightning_weights(str(run / "checkpoints" / "last.ckpt")))
    print(f"legacy vs main path (TrainConfig, resumed): max relative parameter difference {worst:.2e}")
    assert_same_params(legacy_final, state_dict(str(li / "chat_small_t5.epoch_3_latest.bin")), rel=0.0)


@pytest.mark.parity
def test_sft_with_dropout_matches_the_printed_lightning_config(pdata, legacy_pretrain, tmp_path):
    """Fine-tuning (frozen shared + encoder), dropout 0.1, accumulation 4: the YAML printed by
    ``--print_lightning_config`` for the same command line trains the same steps."""
    pretrained_file = str(legacy_pretrain / "chat_small_t5.epoch_3_latest.bin")
    tiny = [a for a in TINY if not a.startswith("--dropout_rate")]  # T5ModelConfig's 0.1
    flags = ["--is_finetune=True", f"--finetune_from_ckp_file={pretrained_file}", "--gradient_accumulation_steps=4"]
    lrun = tmp_path / "legacy"
    legacy(*legacy_train(lrun, pdata, *flags, epochs=2, tiny=tiny), tmp_root=pdata["root"])
    ref = read_jsonl(lrun / "losses.jsonl")

    mrun = tmp_path / "main"
    printed = legacy(*legacy_train(mrun, pdata, *flags, "--print_lightning_config", epochs=2, tiny=tiny),
                     tmp_root=pdata["root"]).stdout
    assert not mrun.exists()
    assert "dropout: 0.1" in printed and "freeze: [shared, encoder]" in printed
    cfg_file = tmp_path / "low_mem_sft.yaml"
    cfg_file.write_text(printed, encoding="utf-8")
    main_path("fit", "--config", str(cfg_file), *MAIN_CPU, tmp_root=pdata["root"])
    worst = assert_same_losses(ref, read_jsonl(mrun / "losses.jsonl"), steps=8)
    print(f"legacy vs main path (SFT, dropout 0.1): max relative loss difference {worst:.2e}")

    legacy_final = state_dict(str(lrun / "chat_small_t5.epoch_1_latest.bin"))
    main_final = lightning_weights(str(mrun / "checkpoints" / "last.ckpt"))
    assert_same_params(legacy_final, main_final)
    pretrained = state_dict(pretrained_file)
    assert all(bool((pretrained[k] == legacy_final[k]).all()) for k in pretrained if k.startswith("encoder."))


_ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
ACCELERATE_2CPU = ([_ACCELERATE] if os.path.exists(_ACCELERATE) else [sys.executable, "-m", "accelerate.commands.launch"]) \
    + (["launch"] if os.path.exists(_ACCELERATE) else []) + ["--cpu", "--num_processes", "2"]


@pytest.mark.parity
@pytest.mark.distributed
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """``accelerate launch --cpu --num_processes 2`` at batch 2 == 1 process at batch 4.

    Every response has exactly 4 label tokens, so each process's token mean weighs tokens as
    the single process does; what is left is float summation order: measured max relative
    difference 1.3e-7 over 32 steps; the test allows 1e-5.
    """
    data = {"train": write_rows(str(tmp_path / "train.parquet"), 64, seed=201, fixed_response_tokens=True),
            "valid": write_rows(str(tmp_path / "valid.parquet"), 8, seed=202, fixed_response_tokens=True),
            "test": write_rows(str(tmp_path / "test.parquet"), 4, seed=203, fixed_response_tokens=True),
            "tokenizer": tokenizer_dir()}
    one, two = tmp_path / "one", tmp_path / "two"
    legacy(*legacy_train(one, data, epochs=4, batch=4), tmp_root=tmp_path)
    proc = legacy(*legacy_train(two, data, epochs=4, batch=2), tmp_root=tmp_path, launcher=ACCELERATE_2CPU)
    assert "processes: 2" in proc.stdout
    assert (two / "state" / "random_states_1.pkl").exists()
    # lr differs: the 2-process one-cycle schedule is stepped twice per optimizer step by
    # accelerate (as in the original) and the adafactor_legacy updates ignore it anyway.
    worst = assert_same_losses(read_jsonl(one / "losses.jsonl"), read_jsonl(two / "losses.jsonl"),
                               steps=32, check_lr=False)
    print(f"2 processes vs 1: max relative loss difference {worst:.2e}")
    assert_same_params(state_dict(str(one / "chat_small_t5.epoch_3_latest.bin")),
                       state_dict(str(two / "chat_small_t5.epoch_3_latest.bin")))


@pytest.mark.parity
@pytest.mark.distributed
def test_two_process_loss_is_the_token_mean_over_all_processes(tmp_path):
    """Responses of different lengths: the logged loss of step 1 (same weights on both sides)
    is the token mean over both processes' rows, equal to the single process's within 1e-6."""
    data = {"train": write_rows(str(tmp_path / "train.parquet"), 16, seed=301),
            "valid": write_rows(str(tmp_path / "valid.parquet"), 4, seed=302),
            "test": write_rows(str(tmp_path / "test.parquet"), 4, seed=303),
            "tokenizer": tokenizer_dir()}
    one, two = tmp_path / "one", tmp_path / "two"
    legacy(*legacy_train(one, data, epochs=1, batch=4), tmp_root=tmp_path)
    legacy(*legacy_train(two, data, epochs=1, batch=2), tmp_root=tmp_path, launcher=ACCELERATE_2CPU)
    a, b = read_jsonl(one / "losses.jsonl"), read_jsonl(two / "losses.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)


@pytest.mark.parity
def test_default_flags_match_the_shipped_config(pdata, tmp_path):
    """The migration check as a user runs it: legacy defaults (bf16 autocast, dropout 0.1) with
    only paths and the model size on the command line, against the shipped YAML with the same
    overrides (16 steps across an epoch boundary and a validation). The main path's Adafactor
    equals Transformers' to float rounding (~1e-7); bf16 autocast turns such differences into
    whole bf16 roundings of activations, so this one is compared within 1e-3 (measured 1.3e-4)."""
    lrun, mrun = tmp_path / "legacy", tmp_path / "main"
    tiny = [a for a in TINY if not a.startswith("--dropout_rate")]
    legacy("train", *tiny, *paths(lrun, pdata), "--epochs=2", "--batch_size_per_gpu=4", "--max_seq_len=24",
           tmp_root=pdata["root"])
    main_path("fit", "--config", "configs/legacy/low_mem_pretrain.yaml", *MAIN_TINY,
              "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
              "--run.export_hf", "false", "--run.plot_loss", "false", "--trainer.default_root_dir", str(mrun),
              "--trainer.max_epochs", "2", "--data.train_file", pdata["train"], "--data.val_file", pdata["valid"],
              "--data.test_file", pdata["test"], "--data.tokenizer", pdata["tokenizer"],
              "--data.batch_size", "4", "--data.eval_batch_size", "8", "--data.max_seq_len", "24",
              "--model.max_new_tokens", "24", tmp_root=pdata["root"])
    worst = assert_same_losses(read_jsonl(lrun / "losses.jsonl"), read_jsonl(mrun / "losses.jsonl"), rel=1e-3,
                               steps=16)
    print(f"legacy vs main path (legacy defaults, bf16 autocast): max relative loss difference {worst:.2e}")
