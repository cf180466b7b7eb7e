"""The benchmark command (bench.run) and its measuring tools (bench.probe).

CI checks that the benchmark runs and writes what it promises (``bench --tiny``: tiny models,
a few steps per engine); it does not check the figures, which only mean something at full
size on a quiet machine (``python -m src bench --quick``, docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from helpers import TINY_SHAPE, run_cli

REQUIRED_RATIOS = (
    "main_vs_legacy_tokens_per_s",
    "main_vs_hf_trainer_tokens_per_s",
    "lowmem_vs_fp32_peak_rss",
    "grouped_vs_random_nonpad_tokens_per_s",
    "data_module_vs_legacy_dataset_per_sample",
    "mfu",
)


# ----------------------------------------------------------------------------- bench.probe
def test_matmul_peak_is_positive():
    from bench.probe import matmul_peak

    res = matmul_peak(sizes=(128, 256), seconds=0.05)
    assert res["flops_per_s"] > 0 and res["best_size"] in (128, 256)
    assert set(res["per_size"]) == {"128", "256"}


def _tiny_t5(vocab=64):
    from chatlm.model.build import build_model

    return build_model("t5", vocab, shape=TINY_SHAPE)


def test_meta_flops_equal_a_real_step():
    """FLOPs counted on the meta device are those of a real forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.probe import model_step_flops

    torch.manual_seed(0)
    model = _tiny_t5()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=torch.randint(2, 64, (3, 7)), labels=torch.randint(2, 64, (3, 5)))
        out.loss.backward()
    assert model_step_flops(_tiny_t5, 3, 7, 5, vocab_size=64) == counter.get_total_flops() > 0


def test_step_probe_times_steps_and_counts_batches():
    from torch.utils.data import DataLoader

    from bench.probe import StepProbe, timed_window

    rows = [{"input_ids": torch.tensor([5, 6, 7, 0]), "attention_mask": torch.tensor([1, 1, 1, 0]),
             "labels": torch.tensor([5, 6, -100])} for _ in range(8)]

    def collate(batch):
        return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = StepProbe().install()
    try:
        for _ in DataLoader(rows, batch_size=2, collate_fn=collate):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        probe.remove()
    res = probe.result()
    assert len(res["step_ends"]) == 4 and len(res["batches"]) == 4
    # seq2seq batch: 2 rows x (4 encoder + 3 decoder) tokens, 2 x (3 + 2) non-pad
    assert res["batches"][0] == {"tokens": 14, "nonpad": 10, "shape": [2, 4, 3]}
    win = timed_window(res, warmup=1, flops_of=lambda shape: 100)
    assert win["steps"] == 3 and win["tokens"] == 42 and win["flops"] == 300
    assert win["tokens_per_s"] > 0 and 0 < win["pad_fraction"] < 1
    # removed: later steps are not recorded
    opt.step()
    assert len(probe.steps) == 4


def test_step_probe_times_the_optimizer_without_its_closure():
    """Lightning passes forward + backward to optimizer.step() as a closure: not optimizer time."""
    import time

    from bench.probe import StepProbe

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        time.sleep(0.2)  # "forward + backward"
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    probe = StepProbe().install()
    try:
        opt.step(closure)          # keyword-less, as torch optimizers take it
        opt.step(closure=closure)  # as Lightning passes it
    finally:
        probe.remove()
    steps = probe.result()
    assert len(steps["optimizer_s"]) == 2 and all(0 <= x < 0.1 for x in steps["optimizer_s"])
    assert model.weight.grad is not None


# ----------------------------------------------------------------------------- bench pieces
def test_texts_of_exact_token_counts(tiny_tokenizer):
    import random

    from bench.run import fixed_rows, single_token_words, text_of_tokens

    words = single_token_words(tiny_tokenizer)
    assert len(words) > 20
    rng = random.Random(0)
    for n in (1, 7, 63):
        text = text_of_tokens(tiny_tokenizer, n, rng, words)
        assert len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) == n
    rows = fixed_rows(tiny_tokenizer, 3, 16, 9, seed=0)
    assert [len(tiny_tokenizer(r["prompt"] + "[EOS]")["input_ids"]) for r in rows] == [16] * 3
    assert [len(tiny_tokenizer(r["response"] + "[EOS]")["input_ids"]) for r in rows] == [9] * 3


def test_legacy_lowmem_dataset_rereads_the_file_for_every_item(tmp_path, sample_parquet, monkeypatch):
    import pyarrow.parquet as pq

    from bench.run import LegacyLowMemDataset
    from chatlm.data.formatting import legacy_texts

    rows = [{"prompt": "p" * 40 + str(i), "response": "回答" * 30 + str(i)} for i in range(10)]
    path = sample_parquet(rows)
    ds = LegacyLowMemDataset(path, max_seq_len=20)
    assert len(ds) == 10
    reads = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: reads.append(a) or real(*a, **k))
    for i in (3, 7, 3):
        assert ds[i] == legacy_texts(rows[i]["prompt"], rows[i]["response"], 20)
    assert len(reads) == 3  # the whole table, once per item


def test_ratios_and_targets_from_results():
    from bench.run import MODES, compute_ratios

    def case(name, **metrics):
        base = {"tokens_per_s": 100.0, "nonpad_tokens_per_s": 50.0, "peak_mb": 1000.0, "mfu": 0.41}
        base.update(metrics)
        return name, {"case": {"compile": False}, "metrics": base, "raw": {"losses": [2.0] * 50}}

    results = dict([
        case("main_legacy_settings", tokens_per_s=110.0), case("legacy_loop"),
        case("main_trainer_settings", tokens_per_s=90.0), case("hf_trainer"),
        case("lowmem_fp32_adamw", peak_mb=4000.0), case("lowmem_8bit_ckpt", peak_mb=2000.0),
        case("random_order"), case("length_grouped", nonpad_tokens_per_s=80.0),
        case("fp32_adamw", mfu=0.42),
    ])
    results["random_order"]["raw"]["val_loss"] = 3.0
    results["length_grouped"]["raw"]["val_loss"] = 3.03
    data = {"files": [{"rows": 200, "speedup": 500.0, "module_per_sample_s": 1e-5, "legacy_per_sample_s": 5e-3,
                       "module_rss_growth_mb": 1.0, "module_anon_rss_growth_mb": 0.5, "file_mb": 30.0},
                      {"rows": 20, "speedup": 60.0, "module_per_sample_s": 1e-5, "legacy_per_sample_s": 6e-4,
                       "module_rss_growth_mb": 0.0, "module_anon_rss_growth_mb": 0.0, "file_mb": 3.0}]}
    ratios, targets = compute_ratios(results, data, MODES["full"])
    assert ratios["main_vs_legacy_tokens_per_s"] == pytest.approx(1.1)
    assert ratios["main_vs_hf_trainer_tokens_per_s"] == pytest.approx(0.9)
    assert ratios["lowmem_vs_fp32_peak_rss"] == pytest.approx(0.5)
    assert ratios["grouped_vs_random_nonpad_tokens_per_s"] == pytest.approx(1.6)
    assert ratios["data_module_vs_legacy_dataset_per_sample"] == 500.0
    assert ratios["mfu"] == 0.42
    assert targets["main_vs_legacy"]["pass"] is True
    assert targets["main_vs_hf_trainer"]["pass"] is False
    assert targets["lowmem_peak_rss"]["pass"] is True
    assert targets["grouped_equal_loss"]["pass"] is True  # 1% apart
    assert targets["mfu"]["pass"] is True
    assert targets["data_loading_flat_rss"]["pass"] is True and targets["data_loading_speedup"]["pass"] is True


# ----------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_bench_tiny_runs_every_engine_and_writes_its_reports(tmp_path):
    """``bench --tiny``: every group and engine runs; bench.json has the promised structure."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "--tiny", "--out_dir", str(out), timeout=1500)
    assert "targets pass" in proc.stdout
    assert "leaked semaphore" not in proc.stderr  # the case processes leave the resource tracker clean
    report = json.loads((out / "bench.json").read_text())
    for key in ("mode", "machine", "peak", "cases", "ratios", "targets", "data", "versions"):
        assert key in report, key
    assert report["mode"] == "tiny" and report["checked"] is False
    assert report["peak"]["flops_per_s"] > 0 and report["machine"]["threads"] == 2
    errors = {k: c["error"] for k, c in report["cases"].items() if c.get("error")}
    assert not errors, errors
    engines = {c["case"]["engine"] for c in report["cases"].values()}
    assert engines == {"main", "legacy", "hf_trainer", "llamafactory"}
    for name, c in report["cases"].items():
        m = c["metrics"]
        assert m["tokens_per_s"] > 0 and m["nonpad_tokens_per_s"] > 0, name
        assert m["peak_mb"] > 100 and 0 < m["mfu"] < 1, name
        assert c["raw"]["losses"] and all(math.isfinite(x) for x in c["raw"]["losses"]), name
        if c["case"]["engine"] == "main":
            assert m["plan_mb"] > 0, name
    for key in REQUIRED_RATIOS:
        assert report["ratios"][key] is not None and report["ratios"][key] > 0, key
    assert 0 < report["ratios"]["mfu"] < 1
    for name, t in report["targets"].items():
        assert set(t) == {"value", "op", "threshold", "pass", "what"}, name
    assert {"main_vs_legacy", "main_vs_hf_trainer", "lowmem_peak_rss", "lowmem_loss_curve",
            "grouped_nonpad_throughput", "grouped_equal_loss", "data_loading_speedup", "mfu",
            "plan_accuracy"} <= set(report["targets"])
    assert len(report["data"]["files"]) == 2
    md = (out / "bench.md").read_text()
    assert "| target |" in md and "main_vs_legacy_tokens_per_s" in md
    assert (out / "bench.png").stat().st_size > 1000
    # the same batches on every engine: same weights and data give the same first loss
    first = {k: c["raw"]["losses"][0] for k, c in report["cases"].items() if c["case"]["group"] == "engines"}
    assert first["main_legacy_settings"] == pytest.approx(first["legacy_loop"], rel=1e-4)
    assert first["main_trainer_settings"] == pytest.approx(first["hf_trainer"], rel=1e-4)


def test_bench_rejects_unknown_groups(tmp_path):
    proc = run_cli("bench", "--tiny", "--only", "nope", "--out_dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "unknown group" in proc.stderr


def test_bench_exit_code_follows_targets(monkeypatch, capsys):
    from bench import run as bench

    report = {"checked": True, "targets": {"a": {"pass": True}, "b": {"pass": False}}}
    assert bench.exit_code(report, errors=[]) == 1
    assert bench.exit_code(dict(report, checked=False), errors=[]) == 0
    assert bench.exit_code({"checked": True, "targets": {"a": {"pass": True}}}, errors=[]) == 0
    assert bench.exit_code({"checked": True, "targets": {"a": {"pass": True}}}, errors=["x"]) == 1


def test_gpu_bench_cpu_tiny(tmp_path):
    """bench/gpu.py runs end to end on CPU in its tiny mode and writes its JSON."""
    import subprocess
    import sys

    from helpers import REPO, env

    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--cpu", "--tiny",
                           "--out", str(out), "--configs", "fp32_adamw,bf16_8bit_ckpt"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {"fp32_adamw", "bf16_8bit_ckpt"}
    for name, c in report["configs"].items():
        assert c["status"] == "ok", (name, c.get("error"))
        assert c["tokens_per_s"] > 0 and c["peak_memory_mb"] > 0 and c["plan"]["peak_mb"] > 0
    assert report["parameters"] > 0 and report["flops_per_step"] > 0
    assert "bf16_8bit_ckpt_vs_fp32_memory" in report["ratios"]


def test_repeated_cases_count_the_median_step_of_all_runs():
    from bench.run import combine_repeats

    def run(steps, error=False):
        if error:
            return {"case": {}, "error": "x"}
        med = sorted(steps)[len(steps) // 2]
        return {"case": {"warmup": 1}, "raw": {"optimizer_s": [9.0] + [s / 1000 for s in steps]},
                "metrics": {"tokens_per_s": med, "nonpad_tokens_per_s": med / 2, "step_time_s": 1000 / med,
                            "achieved_gflops": med, "mfu": med / 1000, "step_tokens_per_s": steps}}

    # one lucky run (a#2) does not decide: the median of the 9 timed steps does
    out = combine_repeats({"a": run([100.0, 101.0, 99.0]), "a#2": run([130.0, 131.0, 129.0]),
                           "a#3": run([102.0, 98.0, 100.0]), "a#4": run([], error=True), "b": run([5.0])})
    assert out["a"]["metrics"]["tokens_per_s"] == 101.0
    assert out["a"]["combined"] == {"runs": 3, "timed_steps": 9}
    assert out["a"]["metrics"]["step_time_s"] == pytest.approx(1000 / 101.0)
    assert out["a"]["metrics"]["mfu"] == pytest.approx(0.101)
    assert out["a"]["repeats"] == {"a": 100.0, "a#2": 130.0, "a#3": 100.0, "a#4": None}
    # the optimizer's time: the median of all runs' timed steps too (warm-up steps left out)
    assert out["a"]["metrics"]["optimizer_step_s"] == pytest.approx(0.101)
    assert out["b"]["metrics"]["tokens_per_s"] == 5.0 and "combined" not in out["b"]


def test_engines_in_turns_compare_step_by_step():
    """A slow second run slows both engines of the pair: the per-step ratios do not move."""
    from bench.run import compute_ratios, paired_ratio, MODES

    def run(name, partner, steps):
        return {"case": {"name": name}, "lockstep_with": [partner],
                "metrics": {"tokens_per_s": sorted(steps)[len(steps) // 2], "nonpad_tokens_per_s": 1.0,
                            "step_time_s": 1.0, "achieved_gflops": 1.0, "mfu": None, "step_tokens_per_s": steps}}

    results = {"main_legacy_settings": run("main_legacy_settings", "legacy_loop", [110.0, 105.0, 112.0]),
               "legacy_loop": run("legacy_loop", "main_legacy_settings", [100.0, 100.0, 100.0]),
               # the machine at half speed for the whole second run
               "legacy_loop#2": run("legacy_loop#2", "main_legacy_settings#2", [50.0, 50.0, 50.0]),
               "main_legacy_settings#2": run("main_legacy_settings#2", "legacy_loop#2", [54.0, 52.0, 56.0])}
    got = paired_ratio(results, "main_legacy_settings", "legacy_loop")
    assert got["pairs"] == 6 and got["ratio"] == pytest.approx((1.08 + 1.10) / 2)
    ratios, _ = compute_ratios(results, None, MODES["quick"])
    assert ratios["main_vs_legacy_tokens_per_s"] == pytest.approx(got["ratio"])
    # not in turns: no pairing (the pooled figures count)
    results["legacy_loop"]["lockstep_with"] = results["legacy_loop#2"]["lockstep_with"] = None
    assert paired_ratio(results, "legacy_loop", "main_legacy_settings") is None


def test_step_probe_told_seq2seq_counts_decoder_tokens_of_equal_length():
    """A T5 batch whose labels are as long as its inputs still has a decoder side."""
    from bench.probe import StepProbe

    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4),
             "labels": torch.tensor([[5, 6, 7, -100], [5, 6, 7, 8]])}
    guessed, told = StepProbe(), StepProbe(seq2seq=True)
    guessed._record(batch)
    told._record(batch)
    assert guessed.batches[0] == {"tokens": 8, "nonpad": 8, "shape": [2, 4]}  # looks causal
    assert told.batches[0] == {"tokens": 16, "nonpad": 15, "shape": [2, 4, 4]}


@pytest.mark.parametrize("size, shapes", [
    ("t5_tiny", [(8, 40, 60), (3, 9, 9), (5, 120, 7), (2, 7, 300), (8, 41, 60), (4, 1, 2), (8, 16, 16)]),
    ("llama_tiny", [(8, 40), (2, 7), (3, 3), (4, 100), (5, 9), (6, 10), (7, 11), (1, 5)]),
])
def test_flop_form_equals_direct_counts(size, shapes):
    """Batches of many shapes use the solved FLOP form: it must equal a direct count, shape by shape."""
    from bench.run import SIZES, Case, _FlopCache

    case = Case("x", "grouped", "main", size, "longtail", 8, 10, 0)
    by_form, direct = _FlopCache(), _FlopCache()
    by_form.DIRECT_SHAPES, direct.DIRECT_SHAPES = 0, 10_000
    f, g = by_form.for_case(case, 96), direct.for_case(case, 96)
    assert [f(list(s)) for s in shapes] == [g(list(s)) for s in shapes]
    assert by_form.forms[(size, 0, SIZES[size][0])] is not None  # the form was used, not the fallback


def test_compile_blocks_compiles_each_repeated_block_in_place():
    from chatlm.model.build import build_model, compile_blocks

    model = build_model("t5", 64, shape=TINY_SHAPE)
    keys = list(model.state_dict())
    assert compile_blocks(model) == 4  # 2 encoder + 2 decoder blocks
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints unchanged
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.encoder.block)
    llama = build_model("llama", 64, shape=dataclasses.replace(TINY_SHAPE, num_layers=3))
    assert compile_blocks(llama) == 3
