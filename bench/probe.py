# python -m bench.probe peak --threads 2        # the machine's fp32 matmul peak (GFLOP/s)
"""Performance measurement: matmul peak, model FLOPs, MFU, memory, step timing.

Used by ``python -m src bench`` (:mod:`bench.run`), ``python -m src plan``
(:mod:`chatlm.train.plan`) and ``bench/gpu.py``. Engine-agnostic by design: a
:class:`StepProbe` times every engine the same way, from outside its code:

* a global optimizer post-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``)
  stamps the end of every optimizer step, whichever trainer calls ``step()``;
* a wrapper around ``torch.utils.data``'s iterator ``__next__`` records every batch handed to
  the trainer (padded and non-pad tokens, shape), so tokens/s never depends on an engine's
  own bookkeeping;
* peak memory is read at each step end: ``ru_maxrss`` (peak RSS of the process) on CPU,
  ``torch.cuda.max_memory_allocated`` on a GPU;
* with a :class:`bench.lockstep.Baton`, two processes (two engines being compared) take turns, one
  optimizer step each: every step of one runs next to a step of the other, so a machine
  whose speed drifts (other tenants of a shared host) slows both alike. The time a process
  waits for its turn is taken off its clock.

Model FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward +
backward of the model built on the ``meta`` device (shapes only: no memory, no compute), so
encoder and decoder tokens, attention and the output head are all counted exactly; a
gradient-checkpointing recompute is *not* counted (MFU counts model FLOPs, not hardware
FLOPs). MFU = achieved model FLOPs/s / the fp32 matmul peak measured on the same machine
with the same thread count (:func:`matmul_peak`).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bench.lockstep import Baton
from chatlm.util.system import peak_rss_mb, rss_mb, set_threads  # noqa: F401 - re-exported for the harness

__all__ = [
    "set_threads",
    "matmul_peak",
    "model_step_flops",
    "rss_mb",
    "peak_rss_mb",
    "StepProbe",
    "timed_window",
    "main",
]


# --------------------------------------------------------------------------- threads, memory


# --------------------------------------------------------------------------- matmul peak
def matmul_peak(threads: Optional[int] = None, sizes: tuple[int, ...] = (1024, 2048),
                seconds: float = 1.0, dtype: torch.dtype = torch.float32,
                device: str = "cpu", rounds: int = 2) -> dict[str, Any]:
    """The best FLOP/s of large square matmuls: the peak MFU is measured against.

    After a warm-up, each size runs ``rounds`` times for ``seconds``; the best of all wins
    (CPU BLAS peaks at a size that fits its blocking, a GPU at the largest; repeating
    protects against a round slowed by another process).

    Returns:
        ``{"flops_per_s", "gflops", "best_size", "per_size": {n: GFLOP/s}, "threads",
        "dtype", "device"}``.
    """
    if threads:
        set_threads(threads)
    per_size: dict[int, float] = {}
    warmed = False
    for _ in range(max(1, rounds)):
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            out = torch.empty(n, n, dtype=dtype, device=device)
            t_warm = time.perf_counter()
            while True:  # first time: ~0.3 s of warm-up (clocks, caches, threads)
                torch.mm(a, b, out=out)
                _sync(device)
                if warmed or time.perf_counter() - t_warm > 0.3:
                    break
            warmed = True
            k, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=out)
                k += 1
                if k % 4 == 0 or device == "cpu":
                    _sync(device)
                    if time.perf_counter() - t0 >= seconds:
                        break
            _sync(device)
            dt = (time.perf_counter() - t0) / k
            per_size[n] = max(per_size.get(n, 0.0), 2.0 * n ** 3 / dt / 1e9)
    best = max(per_size, key=per_size.__getitem__)
    return {"flops_per_s": per_size[best] * 1e9, "gflops": per_size[best], "best_size": best,
            "per_size": {str(k): round(v, 2) for k, v in per_size.items()},
            "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
            "device": device}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- FLOPs
def model_step_flops(build: Callable[[], torch.nn.Module], batch_size: int, input_len: int,
                     label_len: Optional[int] = None, vocab_size: int = 8) -> int:
    """FLOPs of one training step (forward + backward) of ``build()`` on one batch shape.

    ``build`` is called under ``torch.device("meta")`` (no memory, no compute): pass the same
    builder as the real run (LoRA included; leave gradient checkpointing off so its recompute
    is not counted). ``label_len`` None: a causal model (labels as long as the input);
    otherwise a seq2seq model with ``label_len`` decoder tokens. The attention mask is left
    out (it changes no FLOP count, and transformers inspects its values).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        model.train()
        ids = torch.randint(2, max(3, vocab_size), (batch_size, input_len))
        labels = torch.randint(2, max(3, vocab_size), (batch_size, label_len or input_len))
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- step probe
@dataclass
class StepProbe:
    """Times optimizer steps and records the batches of any PyTorch trainer in this process.

    ``install()`` before the trainer starts; afterwards ``steps`` holds one
    ``(perf_counter, peak_memory_mb)`` per optimizer step and ``batches`` one
    ``{"tokens", "nonpad", "shape"}`` per batch taken from a ``DataLoader`` (in order).
    Seq2seq batches count encoder and decoder tokens: ``seq2seq=True`` says the model is one
    (labels are decoder tokens even when as long as ``input_ids``); None guesses it from the
    shapes (labels shaped unlike ``input_ids``).

    ``baton``: after every optimizer step, hand the CPUs to the partner process and wait for
    them back (:class:`Baton`); all times are on a clock that stops while waiting.
    """

    max_steps: Optional[int] = None
    seq2seq: Optional[bool] = None
    steps: list[tuple[float, float]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    rusage: list[tuple[float, float, int]] = field(default_factory=list)  # (user s, system s, minor faults)
    optimizer_s: list[float] = field(default_factory=list)  # seconds of each optimizer.step(), closure excluded
    t_start: float = 0.0
    first_batch_at: Optional[float] = None
    profile_step: int = 0            # > 0: torch.profiler over optimizer step N (from the end of N-1)
    profile_table: Optional[str] = None
    baton: Optional[Baton] = None
    waited: float = 0.0              # seconds spent waiting for the baton (off the clock)
    _handles: list[Any] = field(default_factory=list)
    _orig_next: Any = None
    _profiler: Any = None

    def _profile_hook(self, done: int) -> None:
        if done == self.profile_step - 1 and self._profiler is None:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self._profiler.__enter__()
        elif done == self.profile_step and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            avg = self._profiler.key_averages()
            self.profile_table = avg.table(sort_by="self_cpu_time_total", row_limit=40)
            self._profiler = None

    def now(self) -> float:
        """``time.perf_counter()`` less the time spent waiting for the baton."""
        return time.perf_counter() - self.waited

    def install(self) -> "StepProbe":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils.data import dataloader

        self.t_start = self.now()
        on_gpu = torch.cuda.is_available()
        in_step = [0.0, 0.0]  # (when optimizer.step() began, seconds spent inside its closure)

        def timed(closure):
            def run_closure(*a, **k):
                t = self.now()
                try:
                    return closure(*a, **k)
                finally:
                    in_step[1] += self.now() - t
            return run_closure

        def before_step(optimizer, args, kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            in_step[:] = [self.now(), 0.0]
            # a closure (Lightning passes forward + backward as one) is not the optimizer's own time
            if callable(kwargs.get("closure")):
                return args, dict(kwargs, closure=timed(kwargs["closure"]))
            if len(args) > 1 and callable(args[1]):  # args[0] is the optimizer itself
                return (args[0], timed(args[1]), *args[2:]), kwargs
            return None

        def after_step(optimizer, args, kwargs) -> None:
            if on_gpu:
                torch.cuda.synchronize()
                mem = torch.cuda.max_memory_allocated() / 2**20
            else:
                mem = peak_rss_mb()
            end = self.now()
            self.optimizer_s.append(end - in_step[0] - in_step[1])
            self.steps.append((end, mem))
            ru = resource.getrusage(resource.RUSAGE_SELF)
            self.rusage.append((ru.ru_utime, ru.ru_stime, ru.ru_minflt))
            if self.profile_step:
                self._profile_hook(len(self.steps))
            if self.baton is not None:
                self.waited += self.baton.hand_over()

        self._handles.append(register_optimizer_step_pre_hook(before_step))
        self._handles.append(register_optimizer_step_post_hook(after_step))
        base = dataloader._BaseDataLoaderIter
        orig = base.__next__
        self._orig_next = orig
        probe = self

        def __next__(it):  # noqa: N807 - replaces the iterator protocol method
            batch = orig(it)
            probe._record(batch)
            return batch

        base.__next__ = __next__
        return self

    def remove(self) -> None:
        from torch.utils.data import dataloader

        for h in self._handles:
            h.remove()
        self._handles = []
        if self._orig_next is not None:
            dataloader._BaseDataLoaderIter.__next__ = self._orig_next
            self._orig_next = None

    def _record(self, batch: Any) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = self.now()
        if not isinstance(batch, Mapping) or "input_ids" not in batch:  # dict, BatchEncoding, ...
            self.batches.append({"tokens": 0, "nonpad": 0, "shape": None})
            return
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        tokens = int(ids.numel())
        nonpad = int(mask.sum()) if mask is not None else tokens
        shape = [int(ids.shape[0]), int(ids.shape[1])]
        decoder_side = self.seq2seq if self.seq2seq is not None else (
            labels is not None and tuple(labels.shape) != tuple(ids.shape))
        if labels is not None and decoder_side:  # seq2seq: the decoder side counts too
            tokens += int(labels.numel())
            nonpad += int((labels != -100).sum())
            shape.append(int(labels.shape[1]))
        self.batches.append({"tokens": tokens, "nonpad": nonpad, "shape": shape})

    def result(self) -> dict[str, Any]:
        t0 = self.t_start
        return {
            "step_ends": [round(t - t0, 6) for t, _ in self.steps],
            "step_peak_mb": [round(m, 2) for _, m in self.steps],
            "first_batch_at": None if self.first_batch_at is None else round(self.first_batch_at - t0, 6),
            "batches": self.batches,
            # per step: CPU seconds in user / kernel mode and minor page faults (cumulative)
            "step_rusage": [[round(u, 4), round(k, 4), f] for u, k, f in self.rusage],
            "optimizer_s": [round(x, 5) for x in self.optimizer_s],
            "profile": self.profile_table,
        }


def timed_window(result: dict[str, Any], warmup: int, accumulation: int = 1,
                 flops_of: Optional[Callable[[list[int]], int]] = None,
                 from_first_batch: bool = False) -> dict[str, Any]:
    """Throughput over the optimizer steps after ``warmup`` (from a :meth:`StepProbe.result`).

    Steps ``warmup+1 .. N`` are timed from the end of step ``warmup`` to the end of step
    ``N``; their batches are batches ``warmup*acc .. N*acc - 1`` (batches prefetched but
    never trained on are ignored). ``from_first_batch``: time every step from the moment
    the first batch was taken (no warm-up excluded; for runs whose batches differ in cost,
    e.g. length-grouped, where excluding the first batch would bias the comparison).

    Returns ``{"steps", "seconds", "step_time_s" (median), "tokens_per_s" (all timed tokens /
    all timed seconds), "step_tokens_per_s" (each timed step's tokens / its time),
    "median_step_tokens_per_s" (the median over steps of each step's
    tokens / its time: robust to a step slowed by another process), "nonpad_tokens_per_s",
    "flops_per_s" (when ``flops_of`` is given), "pad_fraction"}``.
    """
    ends = result["step_ends"]
    n = len(ends)
    if from_first_batch:
        warmup = 0
        start = result.get("first_batch_at") or 0.0
    else:
        warmup = min(max(0, warmup), max(0, n - 1))
        start = ends[warmup - 1] if warmup > 0 else (result.get("first_batch_at") or 0.0)
    timed = ends[warmup:]
    if not timed:
        raise ValueError("no optimizer step was recorded")
    seconds = timed[-1] - start
    batches = result["batches"][warmup * accumulation: n * accumulation]
    tokens = sum(b["tokens"] for b in batches)
    nonpad = sum(b["nonpad"] for b in batches)
    diffs = [b - a for a, b in zip([start] + timed[:-1], timed)]
    per_step = [sum(x["tokens"] for x in batches[i * accumulation:(i + 1) * accumulation]) / d
                for i, d in enumerate(diffs) if d > 0]
    out = {
        "steps": len(timed),
        "seconds": seconds,
        "step_time_s": _median(diffs),
        "median_step_tokens_per_s": _median(per_step),
        "step_tokens_per_s": per_step,
        "tokens": tokens,
        "nonpad_tokens": nonpad,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "nonpad_tokens_per_s": nonpad / seconds if seconds > 0 else 0.0,
        "pad_fraction": 1.0 - nonpad / tokens if tokens else 0.0,
    }
    if flops_of is not None:
        flops = sum(flops_of(b["shape"]) for b in batches if b["shape"])
        out["flops"] = flops
        out["flops_per_s"] = flops / seconds if seconds > 0 else 0.0
    return out


def _median(values: Any) -> float:
    """The median of ``values`` (any order); 0.0 when empty."""
    xs = sorted(values)
    n = len(xs)
    return (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])) if n else 0.0


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> None:
    """``python -m bench.probe peak [--threads N] [--seconds S] [--device cpu|cuda] [--dtype ...]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    peak = sub.add_parser("peak", help="measure the matmul peak and print it as JSON")
    peak.add_argument("--threads", type=int, default=None)
    peak.add_argument("--seconds", type=float, default=1.0)
    peak.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    peak.add_argument("--rounds", type=int, default=2)
    peak.add_argument("--device", default="cpu")
    peak.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    peak.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    res = matmul_peak(args.threads, tuple(args.sizes), args.seconds, getattr(torch, args.dtype), args.device,
                      args.rounds)
    text = json.dumps(res)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
