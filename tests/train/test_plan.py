"""``python -m src plan``: the peak-memory estimate and the settings it suggests.

The estimate is checked against reality: the benchmark's configs (fp32 AdamW, legacy
Adafactor, AdamW8bit, gradient checkpointing, LoRA, AdamW8bit + checkpointing with dropout)
are trained for a few steps at CI size in fresh processes, their peak RSS is measured, and
plan's estimate for the same config and batch must be within 25% of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, env, run_cli

TOL = 0.25


def _setup(**kw):
    from chatlm.train.plan import Setup

    from chatlm.model.config import ModelShape

    dropout = kw.pop("dropout", 0.0)
    base = dict(arch="t5", shape=ModelShape(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                                            d_kv=16, dropout=dropout, max_position_embeddings=64),
                vocab_size=100, optimizer="adamw", gradient_checkpointing=False, lora_r=0,
                lora_target_modules=None, freeze=None, batch_size=4, seq_len=12, label_len=9, accumulation=1,
                precision="32-true", device="cpu")
    base.update(kw)
    return Setup(**base)


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("text,mib", [("16GB", 16384), ("16G", 16384), ("1.5GiB", 1536), ("800MB", 800),
                                      ("8", 8192), ("2T", 2 * 1024 ** 2)])
def test_parse_memory(text, mib):
    from chatlm.train.plan import parse_memory

    assert parse_memory(text) == pytest.approx(mib)


def test_parse_memory_rejects_garbage():
    from chatlm.train.plan import parse_memory

    with pytest.raises(ValueError, match="16GB"):
        parse_memory("lots")


def test_load_config_merges_files_and_overrides(tmp_path):
    from chatlm.train.plan import load_config

    a = tmp_path / "a.yaml"
    a.write_text("model:\n  d_model: 64\n  optimizer: adamw\ndata:\n  batch_size: 4\n")
    b = tmp_path / "b.yaml"
    b.write_text("model:\n  optimizer: adamw8bit\n")
    cfg = load_config([str(a), str(b)], ["--data.batch_size", "2", "--model.gradient_checkpointing=true",
                                         "--model.shape.d_ff", "96"])
    model = cfg["model"]
    assert (model["shape"]["d_model"], model["shape"]["d_ff"], model["optim"]["optimizer"]) == (64, 96, "adamw8bit")
    assert model["gradient_checkpointing"] is True and model["shape"]["num_layers"] == 10  # the CLI's defaults
    assert cfg["data"]["batch_size"] == 2
    from jsonargparse import ArgumentError

    with pytest.raises(ArgumentError, match="oops"):
        load_config([str(a)], ["--model.oops", "1"])


@pytest.mark.parametrize("arch,dropout,lora", [("t5", 0.0, 0), ("t5", 0.1, 0), ("t5", 0.0, 4), ("llama", 0.0, 0)])
def test_meta_activation_count_equals_a_real_forward(arch, dropout, lora):
    """Saved-for-backward bytes counted on the meta device are those of a real CPU forward."""
    from chatlm.train.plan import _build_meta, activation_facts

    s = _setup(arch=arch, dropout=dropout, lora_r=lora, label_len=None if arch == "llama" else 9)
    if arch == "llama":
        s = s.replace(shape=dataclasses.replace(s.shape, num_decoder_layers=None))
    meta = activation_facts(s)
    model = _build_meta(s, checkpointing=False).to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    ids = torch.randint(2, 100, (s.batch_size, s.seq_len))
    labels = torch.randint(2, 100, (s.batch_size, s.label_len or s.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels)
    if arch == "t5":
        assert meta["saved"] == sum(seen.values()) > 0
    else:  # meta runs SDPA's math path (it saves the attention probabilities); CPU/GPU kernels do not
        assert sum(seen.values()) <= meta["saved"] <= 1.1 * sum(seen.values())
    assert 0 < meta["max_layer"] <= meta["layers"] <= meta["saved"]


def test_estimate_parts_follow_the_options():
    from chatlm.train.plan import estimate

    base = estimate(_setup(), runtime=0.0)
    n = base["parameters"]
    assert base["parameters_mb"] == pytest.approx(4 * n / 2**20)
    assert base["optimizer_state_mb"] == pytest.approx(8 * n / 2**20)
    wide = dataclasses.replace(_setup().shape, d_model=64, d_ff=128, d_kv=32)  # >= 4096 elements: 8-bit states
    eight = estimate(_setup(optimizer="adamw8bit", shape=wide), runtime=0.0)
    full32 = estimate(_setup(shape=wide), runtime=0.0)
    assert eight["optimizer_state_mb"] < 0.4 * full32["optimizer_state_mb"]
    fact = estimate(_setup(optimizer="adafactor"), runtime=0.0)
    assert fact["optimizer_state_mb"] < 0.2 * base["optimizer_state_mb"]
    ckpt = estimate(_setup(gradient_checkpointing=True, batch_size=16, seq_len=64, label_len=64), runtime=0.0)
    full = estimate(_setup(batch_size=16, seq_len=64, label_len=64), runtime=0.0)
    assert ckpt["activations_mb"] < 0.7 * full["activations_mb"]
    # Same device, same shape: bf16-mixed saves less for backward than fp32 (not half: T5
    # keeps its norms and softmax in fp32 under autocast, and the count is exact per dtype).
    shape = dict(shape=wide, batch_size=16, seq_len=64, label_len=64, device="cuda")
    bf16 = estimate(_setup(precision="bf16-mixed", **shape), runtime=0.0)
    fp32 = estimate(_setup(precision="32-true", **shape), runtime=0.0)
    assert 0 < bf16["activations_mb"] < 0.98 * fp32["activations_mb"]
    lora = estimate(_setup(lora_r=2), runtime=0.0)
    assert lora["trainable_parameters"] < 0.2 * lora["parameters"]
    assert lora["gradients_mb"] < 0.2 * base["gradients_mb"]
    acc = estimate(_setup(accumulation=4), runtime=0.0)
    assert acc["peak_mb"] >= base["peak_mb"]


def test_plan_suggests_settings_that_fit():
    from chatlm.train.plan import plan

    cfg = {"model": {"arch": "t5", "shape": {"d_model": 256, "d_ff": 1024, "num_layers": 4, "num_heads": 4, "d_kv": 64},
                     "optim": {"optimizer": "adamw"}},
           "data": {"batch_size": 32}}
    roomy = plan(cfg, budget_mb=1e6, seq_len=128)
    assert roomy["fits"] and roomy["suggestion"]["flags"] == []
    need = roomy["estimate"]["peak_mb"]
    runtime = roomy["runtime_mb"]
    tight = plan(cfg, budget_mb=runtime + 0.6 * (need - runtime), seq_len=128)
    assert not tight["fits"]
    sug = tight["suggestion"]
    assert sug is not None and sug["peak_mb"] <= tight["budget_mb"] and sug["flags"]
    assert all(f.startswith("--") for f in sug["flags"])
    impossible = plan(cfg, budget_mb=10, seq_len=128)
    assert impossible["suggestion"] is None


def test_plan_cli(tmp_path):
    proc = run_cli("plan", "--config", "configs/demo.yaml", "--memory", "16GB", "--seq_len", "32")
    assert "estimated peak" in proc.stdout and "fits" in proc.stdout
    proc = run_cli("plan", "--config", "configs/lowmem.yaml", "--memory", "3GB", "--seq_len", "256", "--json")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["budget_mb"] == 3072 and result["options"]
    assert result["estimate"]["setup"]["optimizer"] == "adamw8bit"
    bad = run_cli("plan", "--config", "configs/demo.yaml", "--memory", "lots", check=False)
    assert bad.returncode == 2 and "16GB" in bad.stderr


# ----------------------------------------------------------------------------- against measured peaks
#: The benchmark's configs (bench.run), CI-sized: a T5 of 8.8M parameters, batch 8 x 64 + 64 tokens.
MEASURED = {
    "fp32_adamw": {},
    "adafactor_legacy": dict(optimizer="adafactor_legacy", scheduler="onecycle", lr=1.5e-4,
                             legacy_accumulation_scaling=True),
    "adamw8bit": dict(optimizer="adamw8bit"),
    "grad_ckpt": dict(gradient_checkpointing=True),
    "lora": dict(lora_r=8, lr=1e-3),
    "lowmem_8bit_ckpt": dict(optimizer="adamw8bit", gradient_checkpointing=True, dropout=0.1),
}


@pytest.fixture(scope="module")
def measured_runs(tmp_path_factory):
    """Each config trained for 3 steps by the benchmark's worker (a fresh `fit` process each)."""
    from bench.run import Case, fixed_rows, write_parquet
    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("plan_measured")
    tok_dir = sample_tokenizer_dir()
    data = write_parquet(str(root / "fixed.parquet"), fixed_rows(load_tokenizer(tok_dir), 24, 64, 64, seed=0))
    files = {"tokenizer": tok_dir, "fixed": data}
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), REPO])
    e["CHATLM_CACHE_DIR"] = str(root / "cache")
    out = {}
    for name, opts in MEASURED.items():
        case = Case(name, "options", "main", size="t5_small", data="fixed", batch_size=8, steps=3, warmup=1, **opts)
        run_dir = root / name
        run_dir.mkdir()
        spec = run_dir / "spec.json"
        spec.write_text(json.dumps({"case": dataclasses.asdict(case), "files": files, "run_dir": str(run_dir),
                                    "threads": 2}))
        res_path = run_dir / "result.json"
        proc = subprocess.run([sys.executable, "-m", "bench.run", "_case", str(spec), str(res_path)], cwd=REPO,
                              env=e, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-3000:])
        out[name] = json.loads(res_path.read_text())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEASURED))
def test_plan_within_25_percent_of_measured_peak(measured_runs, name):
    res = measured_runs[name]
    measured, plan = res["peak_mb"], res["plan"]
    assert measured and plan, res.keys()
    err = (plan["peak_mb"] - measured) / measured
    assert abs(err) <= TOL, f"{name}: plan {plan['peak_mb']:.0f} MiB vs measured {measured:.0f} MiB ({err:+.1%})"


@pytest.mark.slow
def test_plan_orders_the_configs_like_the_measurements(measured_runs):
    """Cheaper configs are estimated cheaper: fp32 AdamW > AdamW8bit + checkpointing."""
    full, low = measured_runs["fp32_adamw"], measured_runs["lowmem_8bit_ckpt"]
    assert full["peak_mb"] > low["peak_mb"]
    assert full["plan"]["peak_mb"] > low["plan"]["peak_mb"]
