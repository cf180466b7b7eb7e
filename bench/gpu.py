# python bench/gpu.py --out gpu_bench.json        (one GPU, ~2 minutes; --cpu --tiny: a CPU smoke run)
"""GPU memory and speed of the low-memory options for a T5 of ~250M parameters.

    python bench/gpu.py --out gpu_bench.json
    python bench/gpu.py --out gpu_bench.json --batch_size 16 --seq_len 512 --steps 10
    python bench/gpu.py --cpu --tiny --out /tmp/gpu_bench_tiny.json     # smoke test, no GPU

Configs, each on a fresh model (same seed), the main path's building blocks
(``chatlm.model.build.build_model``, ``chatlm.model.optim.build_optimizer``) in a plain loop:

    fp32_adamw          fp32 weights and compute, torch AdamW            (the baseline)
    bf16_adamw          bf16-mixed: fp32 weights, bf16 autocast compute  (Lightning's bf16-mixed)
    bf16_adamw8bit      bf16-mixed + bitsandbytes AdamW8bit
    bf16_8bit_ckpt      bf16-mixed + AdamW8bit + gradient checkpointing
    bf16_paged8bit_ckpt bf16-mixed + PagedAdamW8bit + gradient checkpointing

Measured per config: ``torch.cuda.max_memory_allocated`` over the whole run (weights,
gradients, optimizer state, activations), tokens/s and step time after ``--warmup`` steps
(``torch.cuda.synchronize`` around the timed steps), model FLOPs per step (FlopCounterMode on
the meta device) and MFU against a bf16 (or fp32) matmul peak measured by this script on the
same GPU, and ``chatlm.train.plan``'s estimate beside the measured peak. An out-of-memory config is
recorded as such and the others still run. Everything goes to one JSON file (``--out``).

Imports: torch, transformers, chatlm.model / bench.probe / chatlm.train.plan (no
Lightning, datasets or jsonargparse), and bitsandbytes only for the 8-bit configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "src"), REPO]  # chatlm without `pip install -e .`, and bench/

import torch  # noqa: E402

from chatlm.model.config import ModelShape  # noqa: E402

# d_model 1024, d_ff 3584, 8 + 8 layers, 16 heads x 64, vocabulary 32128: 251.0M parameters
SIZE_250M = ModelShape(d_model=1024, d_ff=3584, num_layers=8, num_decoder_layers=8, num_heads=16, d_kv=64)
SIZE_TINY = ModelShape(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32)

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32_adamw": dict(bf16=False, optimizer="adamw", checkpointing=False),
    "bf16_adamw": dict(bf16=True, optimizer="adamw", checkpointing=False),
    "bf16_adamw8bit": dict(bf16=True, optimizer="adamw8bit", checkpointing=False),
    "bf16_8bit_ckpt": dict(bf16=True, optimizer="adamw8bit", checkpointing=True),
    "bf16_paged8bit_ckpt": dict(bf16=True, optimizer="paged_adamw8bit", checkpointing=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from chatlm.util.system import peak_rss_mb

    return peak_rss_mb()


def run_config(name: str, cfg: dict[str, Any], args, device: torch.device, size: ModelShape,
               vocab: int, flops_per_step: int) -> dict[str, Any]:
    from chatlm.model.build import build_model
    from chatlm.model.optim import build_optimizer

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    out: dict[str, Any] = {"config": cfg}
    model = optimizer = None
    try:
        with torch.device(device):
            model = build_model("t5", vocab, dataclasses.replace(size, dropout=args.dropout))
        model.train()
        if cfg["checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        optimizer = build_optimizer(cfg["optimizer"], [p for p in model.parameters() if p.requires_grad],
                                    lr=args.lr, weight_decay=0.0)
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(2, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
        labels = torch.randint(2, vocab, (args.batch_size, args.label_len or args.seq_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg["bf16"])
        losses, times = [], []
        for step in range(args.warmup + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        timed = times[args.warmup:]
        step_time = sum(timed) / len(timed)
        tokens = args.batch_size * (args.seq_len + (args.label_len or args.seq_len))
        peak_key = "bf16" if cfg["bf16"] else "fp32"
        out.update(
            status="ok",
            peak_memory_mb=_memory_mb(device),
            memory_kind="cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss_of_process",
            step_time_s=step_time,
            step_times_s=times,
            tokens_per_step=tokens,
            tokens_per_s=tokens / step_time,
            flops_per_step=flops_per_step,
            achieved_tflops=flops_per_step / step_time / 1e12,
            mfu=((flops_per_step / step_time) / args.peaks[peak_key]["flops_per_s"]
                 if args.peaks.get(peak_key) else None),
            mfu_against=f"{peak_key} matmul peak",
            loss_first=losses[0],
            loss_last=losses[-1],
        )
    except torch.cuda.OutOfMemoryError as err:
        out.update(status="oom", error=str(err).splitlines()[0], peak_memory_mb=_memory_mb(device))
    except Exception as err:  # noqa: BLE001 - one failing config must not lose the others
        out.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def plan_estimate(cfg: dict[str, Any], args, size: ModelShape, vocab: int, device: torch.device):
    """chatlm.train.plan's estimate of the same run (CUDA: tensors only, runtime 0)."""
    try:
        from chatlm.train.plan import Setup, estimate

        s = Setup(arch="t5", shape=dataclasses.replace(size, dropout=args.dropout), vocab_size=vocab,
                  optimizer=cfg["optimizer"], gradient_checkpointing=cfg["checkpointing"],
                  lora_r=0, lora_target_modules=None, freeze=None, batch_size=args.batch_size,
                  seq_len=args.seq_len, label_len=args.label_len or args.seq_len, accumulation=1,
                  precision="bf16-mixed" if cfg["bf16"] else "32-true", device=device.type)
        est = estimate(s, runtime=0.0 if device.type == "cuda" else args.runtime_mb)
        return {k: v for k, v in est.items() if k not in ("setup", "notes")}
    except Exception as err:  # noqa: BLE001 - the estimate is a side note
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512, help="encoder tokens per row")
    p.add_argument("--label_len", type=int, default=None, help="decoder tokens per row (default: --seq_len)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--vocab_size", type=int, default=32128)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test; memory is peak RSS)")
    p.add_argument("--tiny", action="store_true", help="a tiny T5 and batch (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (--cpu)")
    args = p.parse_args(argv)

    if args.tiny:
        size = SIZE_TINY
        args.batch_size, args.seq_len, args.steps, args.warmup = min(args.batch_size, 2), min(args.seq_len, 16), 2, 1
        args.vocab_size = min(args.vocab_size, 512)
    else:
        size = SIZE_250M
    if args.cpu:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_bench: no CUDA device (pass --cpu for a CPU smoke run)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")

    from chatlm.model.build import build_model
    from bench.probe import matmul_peak, model_step_flops

    vocab = args.vocab_size
    t_start = time.perf_counter()
    from chatlm.util.system import rss_mb

    args.runtime_mb = rss_mb()  # CPU: what the process holds before any model (for chatlm.train.plan)
    peak_sizes = (256, 512) if args.tiny else ((4096, 8192) if device.type == "cuda" else (1024, 2048))
    seconds = 0.2 if args.tiny else 1.0
    args.peaks = {"fp32": matmul_peak(sizes=peak_sizes, seconds=seconds, device=device.type)}
    if device.type == "cuda" or args.tiny:
        args.peaks["bf16"] = matmul_peak(sizes=peak_sizes, seconds=seconds, dtype=torch.bfloat16, device=device.type)
    flops = model_step_flops(lambda: build_model("t5", vocab, dataclasses.replace(size, dropout=args.dropout)),
                             args.batch_size, args.seq_len, args.label_len or args.seq_len, vocab_size=vocab)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model("t5", vocab, size).parameters())
    info = {
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parameters": n_params,
        "size": dataclasses.asdict(size),
        "vocab_size": vocab,
        "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len,
                  "label_len": args.label_len or args.seq_len, "dropout": args.dropout},
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_peak": args.peaks,
        "flops_per_step": flops,
        "configs": {},
    }
    print(f"gpu_bench: T5 {n_params / 1e6:.1f}M on {info['device']}, batch {args.batch_size} x "
          f"{args.seq_len}+{args.label_len or args.seq_len}; matmul peak "
          + ", ".join(f"{k} {v['gflops'] / 1e3:.1f} TFLOP/s" for k, v in args.peaks.items()), flush=True)
    for name in names:
        res = run_config(name, CONFIGS[name], args, device, size, vocab, flops)
        res["plan"] = plan_estimate(CONFIGS[name], args, size, vocab, device)
        info["configs"][name] = res
        if res["status"] == "ok":
            print(f"  {name:20s} peak {res['peak_memory_mb']:9.0f} MB  {res['tokens_per_s']:10.0f} tok/s  "
                  f"step {res['step_time_s']:.3f}s  MFU {100 * (res['mfu'] or 0):.1f}%  "
                  f"(plan {res['plan'].get('peak_mb', float('nan')):.0f} MB)", flush=True)
        else:
            print(f"  {name:20s} {res['status']}: {res.get('error', '')[:200]}", flush=True)
    base = info["configs"].get("fp32_adamw", {})
    ratios = {}
    for name, res in info["configs"].items():
        if res.get("status") == "ok" and base.get("status") == "ok" and name != "fp32_adamw":
            ratios[f"{name}_vs_fp32_memory"] = res["peak_memory_mb"] / base["peak_memory_mb"]
            ratios[f"{name}_vs_fp32_tokens_per_s"] = res["tokens_per_s"] / base["tokens_per_s"]
    info["ratios"] = ratios
    info["wall_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(f"gpu_bench: wrote {args.out} ({info['wall_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
