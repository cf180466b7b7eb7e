"""legacy/train_low_mem.py: config classes, CLI, outputs, resume, Ctrl+C, test, finetune, YAML.

Every run is a tiny T5 on CPU (fp32, dropout 0) with the bundled tokenizer and a few dozen
generated rows, started as a subprocess exactly as a user would
(``python legacy/train_low_mem.py train --field=value ...``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from helpers import REPO, read_jsonl
from helpers import env as base_env

for _p in (REPO, os.path.join(REPO, "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCRIPT = os.path.join(REPO, "legacy", "train_low_mem.py")
TINY = ["--d_model=32", "--d_ff=64", "--num_layers=2", "--num_decoder_layers=2", "--num_heads=2",
        "--d_kv=16", "--dropout_rate=0.0"]
WORDS = ["你好", "世界", "今天", "天气", "很好", "我们", "公园", "散步", "北京", "上海", "hello", "world",
         "chat", "model", "small", "T5", "数据", "训练", "模型", "问题"]


# ----------------------------------------------------------------------------- helpers
def write_rows(path: str, n: int, seed: int, fixed_response_tokens: bool = False) -> str:
    """``n`` prompt/response rows (repeat / reverse / add tasks) as a parquet file.

    ``fixed_response_tokens``: every response is a 3-digit number, i.e. exactly 4 label tokens
    with the chatlm tokenizers (digits split one by one, plus "[EOS]").
    """
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        task = rng.randint(0, 2)
        if fixed_response_tokens:
            x = rng.randint(0, 999)
            rows.append({"prompt": "数字 " + " ".join(words) + " " + str(x), "response": f"{(x * 7 + 3) % 1000:03d}"})
        elif task == 0:
            rows.append({"prompt": "重复: " + " ".join(words), "response": " ".join(words)})
        elif task == 1:
            rows.append({"prompt": "reverse: " + " ".join(words), "response": " ".join(words[::-1])})
        else:
            x, y = rng.randint(0, 999), rng.randint(0, 999)
            rows.append({"prompt": f"加 {x} {y}", "response": str(x + y)})
    pd.DataFrame(rows).to_parquet(path)
    return path


def tokenizer_dir() -> str:
    from chatlm.data.sample import sample_tokenizer_dir

    return sample_tokenizer_dir()


def env(tmp_root) -> dict:
    e = base_env()
    e["CHATLM_CACHE_DIR"] = str(tmp_root / "arrow-cache")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("NCCL_SHM_DISABLE", None)
    e.pop("NCCL_TIMEOUT", None)
    return e


def paths(run_dir, data) -> list[str]:
    """Every path flag of the config class, pointed into ``run_dir`` / the test data."""
    run_dir = str(run_dir)
    return [f"--train_file={data['train']}", f"--validation_file={data['valid']}", f"--test_file={data['test']}",
            f"--tokenizer_dir={data['tokenizer']}", f"--output_dir={run_dir}",
            f"--model_file={run_dir}/chat_small_t5.{{}}.bin", f"--model_config_file={run_dir}/model_config.json",
            f"--train_state_dir={run_dir}/state"]


def legacy(*args: str, tmp_root, launcher: list[str] | None = None, check: bool = True,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """``python legacy/train_low_mem.py ARGS`` (or ``LAUNCHER legacy/train_low_mem.py ARGS``) from the repo root."""
    cmd = (launcher or [sys.executable]) + [SCRIPT, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_root), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def train_args(run_dir, data, *extra: str, epochs: int = 2, batch: int = 4, acc: int = 2,
               dropout: float = 0.0) -> list[str]:
    tiny = [a for a in TINY if not a.startswith("--dropout_rate")] + [f"--dropout_rate={dropout}"]
    return ["train", "--adaptive_memory=False", "--mixed_precision=no", *tiny, *paths(run_dir, data),
            f"--epochs={epochs}", f"--batch_size_per_gpu={batch}", f"--gradient_accumulation_steps={acc}",
            "--max_seq_len=24", *extra]


def state_dict(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy_data")
    return {
        # 60 rows at batch 4: 15 micro-batches per epoch, so with accumulation 2 one micro-batch
        # is left over at each epoch end (it carries into the next epoch's first window).
        "train": write_rows(str(d / "train.parquet"), 60, seed=11),
        "valid": write_rows(str(d / "valid.parquet"), 8, seed=12),   # one eval batch of 8
        "test": write_rows(str(d / "test.parquet"), 4, seed=13),
        "tokenizer": tokenizer_dir(),
        "root": d,
    }


@pytest.fixture(scope="module")
def pretrain(data, tmp_path_factory):
    """One pretraining run (2 epochs, 14 optimizer steps, dropout 0.1) that several tests inspect."""
    run = tmp_path_factory.mktemp("legacy_pretrain")
    proc = legacy(*train_args(run, data, "--save_steps=4", "--keep_latest_n_ckp=1", "--logging_steps=5",
                              dropout=0.1), tmp_root=data["root"])
    return {"dir": run, "proc": proc}


# ----------------------------------------------------------------------------- config classes
SPEC = {  # legacy-spec.md section 1, the table
    "TrainConfig": dict(epochs=6, batch_size_per_gpu=32, learn_rate=1.5e-4, div_factor=50, mixed_precision="bf16",
                        gradient_accumulation_steps=2, warmup_steps=1024, logging_steps=100, save_steps=500,
                        keep_latest_n_ckp=8, seed=23333, dataloader_buffer_size=10000, max_seq_len=192),
    "TrainConfigSFT": dict(epochs=20, batch_size_per_gpu=20, learn_rate=5e-5, div_factor=25, mixed_precision="bf16",
                           gradient_accumulation_steps=6, warmup_steps=200, max_grad_norm=1.0, logging_steps=20,
                           save_steps=83, keep_latest_n_ckp=5, seed=23333, dataloader_buffer_size=50000,
                           max_seq_len=256),
    "TrainConfigSFTSmall": dict(epochs=3, batch_size_per_gpu=1, learn_rate=5e-5, div_factor=25,
                                gradient_accumulation_steps=8, warmup_steps=100, max_grad_norm=1.0,
                                logging_steps=50, save_steps=312, keep_latest_n_ckp=3, seed=23333,
                                dataloader_buffer_size=10000, max_seq_len=512),
    "TrainConfigSFTFast": dict(epochs=5, batch_size_per_gpu=24, learn_rate=5e-5, div_factor=25,
                               gradient_accumulation_steps=2, warmup_steps=300, max_grad_norm=1.0,
                               logging_steps=100, save_steps=521, keep_latest_n_ckp=3, seed=23333,
                               dataloader_buffer_size=50000, max_seq_len=512),
    "TrainConfigPretrainLarge": dict(epochs=6, batch_size_per_gpu=32, learn_rate=1.5e-4, div_factor=50,
                                     gradient_accumulation_steps=2, warmup_steps=1024, max_grad_norm=1.0,
                                     logging_steps=100, save_steps=5000, keep_latest_n_ckp=5, seed=23333,
                                     dataloader_buffer_size=5000, max_seq_len=192),
    "TrainConfigSFTUltra": dict(epochs=8, batch_size_per_gpu=24, gradient_accumulation_steps=2, warmup_steps=100,
                                logging_steps=10, save_steps=52, keep_latest_n_ckp=3, max_seq_len=512,
                                dataloader_num_workers=32, dataloader_pin_memory=True, use_torch_compile=True,
                                gradient_checkpointing=False),
    "T5ModelConfig": dict(d_ff=3072, d_model=768, num_heads=12, d_kv=64, num_layers=10, num_decoder_layers=10),
}
PATH_FIELDS = ("tokenizer_dir", "model_file", "model_config_file", "train_file", "validation_file", "test_file",
               "finetune_from_ckp_file", "train_state_dir", "output_dir")


@pytest.mark.parametrize("name", sorted(SPEC))
def test_config_classes_keep_the_original_defaults(name):
    import legacy.config as config

    obj = getattr(config, name)()
    for field, value in SPEC[name].items():
        assert getattr(obj, field) == value, (name, field)
    if name != "T5ModelConfig":
        for field in PATH_FIELDS:
            assert getattr(obj, field).startswith(config.PROJECT_ROOT + "/"), (name, field)
        assert "{}" in obj.model_file
    assert ("max_grad_norm" in {f.name for f in dataclasses.fields(obj)}) == (name not in ("TrainConfig", "T5ModelConfig"))


def test_config_selection_order_and_overrides(capsys):
    import legacy.train_low_mem as t
    from legacy.config import T5ModelConfig

    sel = t.select_train_config
    assert type(sel()).__name__ == "TrainConfig"
    assert type(sel(is_finetune=True)).__name__ == "TrainConfigSFT"
    assert type(sel(is_finetune=True, use_small_config=True)).__name__ == "TrainConfigSFTSmall"
    assert type(sel(use_small_config=True, use_fast_config=True)).__name__ == "TrainConfigSFTFast"
    assert type(sel(is_finetune=True, use_fast_config=True, use_large_config=True)).__name__ == "TrainConfigPretrainLarge"

    tc, mc = sel(), T5ModelConfig()
    t.apply_overrides(tc, mc, {"epochs": 10, "learn_rate": 0.0002, "d_model": 128, "mixed_precision": "no",
                               "max_grad_norm": 2.0, "no_such_field": 1, "batch_size_per_gpu": 8.0})
    err = capsys.readouterr().err
    assert (tc.epochs, tc.learn_rate, mc.d_model, tc.mixed_precision, tc.batch_size_per_gpu) == (10, 0.0002, 128, "no", 8)
    assert isinstance(tc.batch_size_per_gpu, int)
    assert "epochs: 6 -> 10" in err and "learn_rate: 0.00015 -> 0.0002" in err and "d_model: 768 -> 128" in err
    assert "unknown parameter: no_such_field" in err
    assert "unknown parameter: max_grad_norm" in err  # TrainConfig has no max_grad_norm


def test_memory_knobs(monkeypatch):
    import legacy.train_low_mem as t
    from legacy.config import TrainConfigSFT

    monkeypatch.setattr(t, "available_memory_gb", lambda: 6.0)
    low = t.memory_knobs(TrainConfigSFT(), adaptive_memory=True)
    assert (low["accumulation_steps"], low["num_workers"], low["low_memory"], low["pin_memory"]) == (4, 0, True, False)
    off = t.memory_knobs(TrainConfigSFT(), adaptive_memory=False)
    assert (off["accumulation_steps"], off["low_memory"]) == (6, False)
    monkeypatch.setattr(t, "available_memory_gb", lambda: 64.0)
    assert t.memory_knobs(TrainConfigSFT(), adaptive_memory=True)["accumulation_steps"] == 6


def test_import_sets_and_prints_nccl_env(tmp_path):
    code = "import os, legacy.train_low_mem; print(os.environ['NCCL_SHM_DISABLE'], os.environ['NCCL_TIMEOUT'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1800"]
    assert "NCCL_SHM_DISABLE=0, NCCL_TIMEOUT=1800" in proc.stderr


# ----------------------------------------------------------------------------- Lightning YAML
SHIPPED = {
    "low_mem_pretrain.yaml": [],
    "low_mem_sft.yaml": ["--is_finetune=True"],
    "low_mem_sft_small.yaml": ["--is_finetune=True", "--use_small_config=True"],
    "low_mem_sft_fast.yaml": ["--is_finetune=True", "--use_fast_config=True"],
    "low_mem_pretrain_large.yaml": ["--use_large_config=True"],
}


def _generated(name: str) -> str:
    """What --print_lightning_config prints for the shipped file's flags (in-process)."""
    import legacy.train_low_mem as t
    from legacy.config import T5ModelConfig, TrainConfigSFTUltra

    if name == "low_mem_sft_ultra.yaml":
        tc = TrainConfigSFTUltra()
        return t.lightning_config(tc, T5ModelConfig(), True, tc.gradient_accumulation_steps, 1,
                                  command=t.ULTRA_COMMAND)
    flags = {f.split("=")[0].lstrip("-"): True for f in SHIPPED[name]}
    tc = t.select_train_config(**flags)
    command = " ".join(["python legacy/train_low_mem.py", "train", *SHIPPED[name]])
    return t.lightning_config(tc, T5ModelConfig(), flags.get("is_finetune", False), tc.gradient_accumulation_steps,
                              1, command=command)


@pytest.mark.parametrize("name", sorted([*SHIPPED, "low_mem_sft_ultra.yaml"]))
def test_shipped_lightning_configs_are_the_generated_ones(name):
    import yaml

    path = os.path.join(REPO, "configs", "legacy", name)
    text = open(path, encoding="utf-8").read()
    assert text.splitlines()[0] == f"# python -m src fit --config configs/legacy/{name}"
    cfg = yaml.safe_load(text)
    assert cfg["seed_everything"] == cfg["data"]["seed"] == 23333
    assert cfg["model"]["optim"]["optimizer"] == "adafactor_legacy" and cfg["model"]["optim"]["legacy_accumulation_scaling"] is True
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
    assert ("freeze" in cfg["model"]) == ("sft" in name)
    if any(os.path.exists(os.path.join(REPO, cfg["data"][k])) for k in ("train_file", "val_file")):
        pytest.skip("legacy data files present: the generated YAML adds their sizes")
    assert text == _generated(name)


def test_print_lightning_config_prints_yaml_and_trains_nothing(tmp_path):
    import yaml

    out = tmp_path / "never"
    proc = legacy("train", "--is_finetune=True", "--adaptive_memory=False", f"--output_dir={out}",
                  "--print_lightning_config", tmp_root=tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["trainer"]["default_root_dir"] == str(out)
    assert cfg["trainer"]["accumulate_grad_batches"] == 6 and cfg["data"]["batch_size"] == 20
    assert cfg["model"]["freeze"] == ["shared", "encoder"]
    assert not out.exists()
    # the shipped file is that command's output, up to the path override
    shipped = open(os.path.join(REPO, "configs", "legacy", "low_mem_sft.yaml"), encoding="utf-8").read()
    assert yaml.safe_load(shipped)["model"] == cfg["model"]


# ----------------------------------------------------------------------------- training runs
def test_train_writes_the_legacy_outputs(pretrain, data):
    run = pretrain["dir"]
    rows = read_jsonl(run / "losses.jsonl")
    # 15 micro-batches per epoch, accumulation 2: 7 optimizer steps per epoch
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    names = set(os.listdir(run))
    assert {"chat_small_t5.best.bin", "chat_small_t5.epoch_1_latest.bin", "model_config.json",
            "losses.jsonl", "train_low_mem.log", "state"} <= names
    assert "chat_small_t5.epoch_0_latest.bin" not in names  # keep_latest_n_ckp=1 pruned it
    best = str(run / "chat_small_t5.best.bin")
    assert not zipfile.is_zipfile(best)  # legacy (non-zip) torch.save format
    sd = state_dict(best)
    assert sd["shared.weight"].shape[1] == 32 and "lm_head.weight" in sd
    assert json.load(open(run / "model_config.json"))["d_model"] == 32
    state = set(os.listdir(run / "state"))
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "legacy_progress.json", "legacy_rng_state_0.pt"} <= state
    # the leftover micro-batch of the last epoch is still pending: a resume would replay it
    progress = json.load(open(run / "state" / "legacy_progress.json"))
    assert (progress["epoch"], progress["step"], progress["global_step"]) == (1, 14, 14)


def test_keep_training_resumes_a_carried_window_exactly(pretrain, data, tmp_path):
    """Stop after epoch 0 (one micro-batch carried), resume with --epochs=2: the same losses and
    weights as one run, dropout (0.1) included: the open window is replayed from its RNG state."""
    args = train_args(tmp_path, data, "--save_steps=4", "--logging_steps=5", epochs=1, dropout=0.1)
    legacy(*args, tmp_root=data["root"])
    progress = json.load(open(tmp_path / "state" / "legacy_progress.json"))
    assert (progress["epoch"], progress["step"], progress["global_step"]) == (0, 14, 7)
    assert (tmp_path / "state" / "legacy_rng_state_0.pt").exists()
    args = train_args(tmp_path, data, "--save_steps=4", "--logging_steps=5", "--is_keep_training=True", epochs=2,
                      dropout=0.1)
    proc = legacy(*args, tmp_root=data["root"])
    assert "resuming at epoch 0, micro-step 14, optimizer step 7" in proc.stdout
    full = read_jsonl(pretrain["dir"] / "losses.jsonl")
    resumed = read_jsonl(tmp_path / "losses.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-12, abs=0), (a, b)
    a, b = state_dict(str(pretrain["dir"] / "chat_small_t5.best.bin")), state_dict(str(tmp_path / "chat_small_t5.best.bin"))
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_ctrl_c_without_tty_saves_state_and_exits(data, tmp_path):
    args = train_args(tmp_path, data, "--save_steps=1000", "--logging_steps=1000", epochs=200)
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, env=env(data["root"]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    losses = tmp_path / "losses.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if losses.exists() and len(read_jsonl(losses)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "training state saved in" in out
    progress = json.load(open(tmp_path / "state" / "legacy_progress.json"))
    assert progress["global_step"] >= 2 and progress["step"] % 2 == 0  # saved between optimizer steps
    assert len(read_jsonl(losses)) == progress["global_step"]
    assert (tmp_path / "state" / "optimizer.bin").exists()


def test_ctrl_c_on_a_tty_asks_and_no_saves_nothing(data, tmp_path):
    import pty

    args = train_args(tmp_path, data, "--save_steps=1000", "--logging_steps=1000", epochs=200)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, env=env(data["root"]), stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    losses = tmp_path / "losses.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if losses.exists() and len(read_jsonl(losses)) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        line = ""
        while "do you want to save checkpoint" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        os.write(master, b"n\n")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0, err[-3000:]
    assert "do you want to save checkpoint" in line and "exit without saving" in out
    assert not (tmp_path / "state" / "legacy_progress.json").exists()


def test_test_command_scores_a_saved_model(pretrain, data, tmp_path):
    run = pretrain["dir"]
    shutil.copy(run / "chat_small_t5.best.bin", tmp_path / "chat_small_t5.0.bin")
    proc = legacy("test", "--best_epoch=0", "--use_small_config=True", *TINY,
                  f"--model_file={tmp_path}/chat_small_t5.{{}}.bin",
                  f"--tokenizer_dir={data['tokenizer']}", f"--test_file={data['test']}", "--max_seq_len=8",
                  "--mixed_precision=no", tmp_root=data["root"])
    assert "test BLEU-4 of" in proc.stdout and "chat_small_t5.0.bin" in proc.stdout
    assert f"test dataset: {data['test']} (4 rows)" in proc.stdout


def test_finetune_freezes_embeddings_and_encoder(pretrain, data, tmp_path):
    pretrained = str(pretrain["dir"] / "chat_small_t5.best.bin")
    legacy(*train_args(tmp_path, data, "--is_finetune=True", f"--finetune_from_ckp_file={pretrained}",
                       "--save_steps=1000", epochs=1), tmp_root=data["root"])
    before, after = state_dict(pretrained), state_dict(str(tmp_path / "chat_small_t5.best.bin"))
    frozen = [k for k in before if k.startswith(("shared.", "encoder.")) or k == "lm_head.weight"]
    trained = [k for k in before if k.startswith("decoder.block.")]
    assert frozen and trained
    assert all(bool((before[k] == after[k]).all()) for k in frozen)
    assert any(not bool((before[k] == after[k]).all()) for k in trained)
    assert "trainable parameters" in open(tmp_path / "train_low_mem.log", encoding="utf-8").read()


@pytest.mark.parametrize("flags", [
    ["--use_large_config=True"],
    ["--is_finetune=True", "--use_small_config=True"],
    ["--is_finetune=True", "--use_fast_config=True"],
    ["--epochs=1", "--learn_rate=0.0002"],
], ids=["large", "sft_small", "sft_fast", "epochs_lr"])
def test_original_usage_lines_run_on_cpu(flags, pretrain, data, tmp_path):
    """The remaining usage lines, with their own config values (batch, accumulation) and a tiny model."""
    extra = [f"--finetune_from_ckp_file={pretrain['dir']}/chat_small_t5.best.bin"] if "--is_finetune=True" in flags else []
    args = ["train", *flags, *extra, "--adaptive_memory=False", "--mixed_precision=no", *TINY,
            *paths(tmp_path, data), "--max_seq_len=16"]
    if "--epochs=1" not in flags:
        args.append("--epochs=1")
    proc = legacy(*args, tmp_root=data["root"])
    assert "epoch log: epoch:0" in proc.stdout
    assert read_jsonl(tmp_path / "losses.jsonl")
    assert (tmp_path / "chat_small_t5.best.bin").exists()


def test_missing_train_file_names_it(data, tmp_path):
    proc = legacy(*train_args(tmp_path, data, f"--train_file={tmp_path}/nope.parquet"), tmp_root=data["root"],
                  check=False)
    assert proc.returncode != 0
    assert "nope.parquet" in proc.stderr and "FileNotFoundError" in proc.stderr
