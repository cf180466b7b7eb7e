# python -m src plan --config configs/lowmem.yaml --memory 16GB
"""Peak-memory estimate of a training config, and settings that fit a memory budget.

    python -m src plan --config configs/pretrain_t5.yaml --memory 16GB
    python -m src plan --config configs/pretrain_t5.yaml --memory 8GB --seq_len 128
    python -m src plan --config X.yaml --memory 24GB --device cuda --json
    python -m src plan --config X.yaml --memory 16GB --model.d_model 512 --data.batch_size 4

The estimate adds up, for one process:

* **runtime** -- what the training process holds before the model exists (CPU: the RSS of
  Python with torch, Lightning, transformers and datasets imported, measured in this very
  process; CUDA: 0, ``max_memory_allocated`` counts tensors only);
* **parameters** (fp32; ``bf16-mixed`` keeps fp32 weights), **gradients** (trainable
  parameters, fp32), **optimizer state** (AdamW 8 bytes per trainable parameter, 8-bit AdamW
  2, Adafactor its factored rows and columns);
* **activations** -- the tensors autograd saves for backward, counted exactly by running the
  model's forward on the ``meta`` device (no memory, no compute) for the batch shape,
  with dropout, LoRA and gradient checkpointing as configured (bf16-mixed halves the
  floating-point ones);
* **transients** -- the largest temporaries: the backward's first gradients, the optimizer
  step's work buffers (``foreach`` AdamW: one more copy of the trainable parameters; 8-bit
  AdamW on CPU: a few fp32 copies of the largest tensor).

Peak = runtime + parameters + optimizer state + max(activations + backward transients
[+ gradients under accumulation], gradients + optimizer transients). The benchmark
(``python -m src bench``) prints this estimate beside every measured peak; tests/test_plan.py
checks it stays within 25% of measured peaks.

Sequence lengths: ``--seq_len`` (and ``--label_len`` for T5's decoder) in tokens. Without
them the plan uses ``data.max_seq_len`` -- for ``format: legacy`` that is characters, so the
estimate assumes one token per character (pass ``--seq_len`` for your tokenizer's real count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from chatlm.model.config import LoRA, ModelShape, Optimization, as_group, nest_model_args

MiB = 2 ** 20

#: CPU: memory a fit process holds beyond the imports before training (tokenizer, data module,
#: Lightning objects, logger, allocator slack), calibrated on the benchmark configs.
CPU_FIT_OVERHEAD_MB = 60.0
#: CPU: peak RSS per byte of saved activations. glibc malloc keeps the memory of freed
#: activations mapped and the gradients land elsewhere, so RSS peaks well above the live
#: tensors: measured 1.4-1.6x on the benchmark's full fine-tunes (T5 30M and 100M, fp32 and
#: 8-bit AdamW, Adafactor). CUDA's caching allocator reports live tensors: 1.0.
CPU_ACTIVATION_FACTOR = 1.5
#: CPU with gradient checkpointing: the backward recomputes one layer at a time, and the
#: gradients made between those recomputes land between their freed buffers, so the heap
#: grows by more than the gradients themselves: measured +1.4-2.1x the gradients' size on top
#: of them (T5 30M and 100M, fp32 AdamW and 8-bit AdamW, peak RSS of fresh processes).
CPU_CHECKPOINT_GRAD_EXTRA = 1.75


# --------------------------------------------------------------------------- config
def load_config(paths: list[str], overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """The ``fit`` config of ``--config PATH ... [--section.key value ...]``, read by the CLI's own
    parser (:func:`chatlm.train.cli.parse_fit_config`): every default filled in, flat model
    names of earlier releases moved into their groups, a wrong key or value is one line."""
    from chatlm.train.cli import parse_fit_config

    args: list[str] = []
    for path in paths:
        args += ["--config", path]
    return parse_fit_config(args + list(overrides or []))


@dataclass
class Setup:
    """What the estimate needs, resolved from a config with chatlm's defaults."""

    arch: str
    shape: ModelShape
    vocab_size: int
    optimizer: str
    gradient_checkpointing: bool
    lora_r: int
    lora_target_modules: Optional[list[str]]
    freeze: Optional[list[str]]
    batch_size: int
    seq_len: int
    label_len: Optional[int]          # T5 decoder tokens; None for causal
    accumulation: int
    precision: str
    device: str
    pretrained: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def replace(self, **kw) -> "Setup":
        return dataclasses.replace(self, notes=list(self.notes), **kw)


def resolve(cfg: dict[str, Any], seq_len: Optional[int] = None, label_len: Optional[int] = None,
            device: str = "cpu") -> Setup:
    """A :class:`Setup` from a ``fit`` config (a nested dict; missing keys take the defaults of
    the model's option groups and of ChatDataModule)."""
    model = nest_model_args(cfg.get("model") or {})
    data = cfg.get("data") or {}
    trainer = cfg.get("trainer") or {}
    notes: list[str] = []
    arch = model.get("arch") or "t5"
    shape = as_group(ModelShape, model.get("shape"))
    optim = as_group(Optimization, model.get("optim"))
    lora = as_group(LoRA, model.get("lora"))
    vocab = _vocab_size(model, data)
    pretrained = model.get("pretrained")
    if pretrained and os.path.isdir(str(pretrained)):
        shape, arch, vocab = _size_from_hf_dir(str(pretrained), shape, arch, vocab)
    elif pretrained:
        notes.append(f"sizes of {pretrained} taken from model.shape.* (a state-dict file)")
    fmt = data.get("format") or "legacy"
    max_len = int(data.get("max_seq_len") or 256)
    if seq_len is None:
        seq_len = max_len
        if fmt == "legacy":
            notes.append(f"seq_len {max_len}: data.max_seq_len counts characters in format legacy; "
                         "one token per character assumed (pass --seq_len)")
    seq2seq = arch == "t5"
    if seq2seq and label_len is None:
        label_len = seq_len
    precision = trainer.get("precision")
    if precision in (None, "auto"):
        precision = "bf16-mixed" if device == "cuda" else "32-true"
    precision = str(precision)
    return Setup(arch=arch, shape=shape, vocab_size=vocab, optimizer=str(optim.optimizer),
                 gradient_checkpointing=bool(model.get("gradient_checkpointing")),
                 lora_r=int(lora.r or 0), lora_target_modules=lora.target_modules,
                 freeze=model.get("freeze"), batch_size=int(data.get("batch_size") or 8), seq_len=int(seq_len),
                 label_len=int(label_len) if seq2seq else None,
                 accumulation=int(trainer.get("accumulate_grad_batches") or 1), precision=precision,
                 device=device, pretrained=str(pretrained) if pretrained else None, notes=notes)


def _vocab_size(model: dict[str, Any], data: dict[str, Any]) -> int:
    tok = data.get("tokenizer")
    try:
        from chatlm.data.sample import sample_tokenizer_dir
        from chatlm.data.tokenizer import load_tokenizer

        return len(load_tokenizer(tok or sample_tokenizer_dir()))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer: the model's own setting
        return int(model.get("vocab_size") or 32128)


def _size_from_hf_dir(path: str, shape: ModelShape, arch: str, vocab: int) -> tuple[ModelShape, str, int]:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    if c.get("model_type") == "t5" or c.get("is_encoder_decoder"):
        shape = dataclasses.replace(shape, d_model=c["d_model"], d_ff=c["d_ff"], num_layers=c["num_layers"],
                                    num_decoder_layers=c.get("num_decoder_layers"), num_heads=c["num_heads"],
                                    d_kv=c["d_kv"])
        return shape, "t5", int(c.get("vocab_size", vocab))
    heads = c.get("num_attention_heads", shape.num_heads)
    shape = dataclasses.replace(shape, d_model=c["hidden_size"], d_ff=c["intermediate_size"],
                                num_layers=c["num_hidden_layers"], num_decoder_layers=None, num_heads=heads,
                                d_kv=c["hidden_size"] // heads,
                                max_position_embeddings=c.get("max_position_embeddings", 2048))
    return shape, "llama", int(c.get("vocab_size", vocab))


# --------------------------------------------------------------------------- model facts
def _build_meta(s: Setup, checkpointing: bool, device: str = "meta"):
    """The model of ``s`` without memory: on the meta device, or on a fake CUDA device
    (``device="cuda"``, to be called inside a ``FakeTensorMode``)."""
    import torch

    from chatlm.model.lora import apply_lora
    from chatlm.model.build import build_model, freeze_modules

    shape = dataclasses.replace(s.shape, num_decoder_layers=None) if s.arch == "llama" else s.shape
    with torch.device(device):
        model = build_model(s.arch, s.vocab_size, shape)
        if s.freeze:
            freeze_modules(model, list(s.freeze))
        if s.lora_r:
            model = apply_lora(model, r=s.lora_r, target_modules=s.lora_target_modules)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.lora_r or s.freeze:
            model.enable_input_require_grads()
        model.config.use_cache = False
    model.train()
    return model


def _layers(model) -> list:
    from torch import nn

    out = []
    for m in model.modules():
        name = type(m).__name__
        if name in ("T5Block", "LlamaDecoderLayer") and isinstance(m, nn.Module):
            out.append(m)
    return out


def activation_facts(s: Setup) -> dict[str, float]:
    """Saved-for-backward bytes of one micro-batch, and the per-layer split.

    CPU: counted on the meta device, which takes the CPU kernels' paths (dropout saves an fp32
    noise tensor). CUDA: counted on *fake* CUDA tensors (``FakeTensorMode``: no GPU needed, no
    memory), so CUDA's paths are taken (dropout saves a 1-byte mask) and ``bf16-mixed`` runs
    under autocast exactly as Lightning runs it (``"dtype_exact": 1.0``); where fake CUDA is
    not available the meta count is used and scaled for bf16.
    """
    if s.device == "cuda":
        try:
            return _count_saved(s, "cuda")
        except Exception:  # noqa: BLE001 - torch without CUDA support: the meta count
            pass
    return _count_saved(s, "meta")


def _count_saved(s: Setup, device: str) -> dict[str, float]:
    import contextlib

    import torch

    fake = contextlib.nullcontext()
    if device == "cuda":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = _build_meta(s, checkpointing=False, device=device)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        seen: dict[int, int] = {}
        largest = [0]

        def pack(t):
            st = t.untyped_storage()
            key = st._cdata
            if key not in params and key not in seen:
                seen[key] = st.nbytes()
                largest[0] = max(largest[0], st.nbytes())
            return t

        per_layer: list[int] = []
        inputs: list[int] = []
        marks: list[int] = []

        def pre(module, args, kwargs):
            marks.append(sum(seen.values()))
            hs = args[0] if args else kwargs.get("hidden_states")
            inputs.append(hs.numel() * hs.element_size() if hs is not None else 0)

        def post(module, args, kwargs, out):
            per_layer.append(sum(seen.values()) - marks.pop())

        handles = []
        for layer in _layers(model):
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        with torch.device(device):
            ids = torch.randint(2, max(3, s.vocab_size), (s.batch_size, s.seq_len))
            labels = torch.randint(2, max(3, s.vocab_size), (s.batch_size, s.label_len or s.seq_len))
        autocast = device == "cuda" and s.precision.startswith("bf16")
        try:
            if autocast:  # torch.autocast refuses "cuda" without a GPU: switch it on directly
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", torch.bfloat16)
                torch.autocast_increment_nesting()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(input_ids=ids, labels=labels)
        finally:
            if autocast:
                torch.autocast_decrement_nesting()
                torch.set_autocast_enabled("cuda", False)
                torch.clear_autocast_cache()
            for h in handles:
                h.remove()
        logits = out.logits
        logits_bytes = float(logits.numel() * logits.element_size())
    total = float(sum(seen.values()))
    layers = float(sum(per_layer))
    return {"saved": total, "layers": layers, "outside_layers": total - layers,
            "max_layer": float(max(per_layer) if per_layer else 0), "layer_inputs": float(sum(inputs)),
            "largest_saved": float(largest[0]), "logits": logits_bytes,
            "dtype_exact": 1.0 if device == "cuda" else 0.0}


def param_facts(s: Setup) -> dict[str, float]:
    model = _build_meta(s, checkpointing=False)
    total = trainable = 0
    largest = 0
    state = 0.0
    for p in model.parameters():
        n = p.numel()
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        largest = max(largest, n)
        state += _state_bytes(s.optimizer, p)
    return {"total": float(total), "trainable": float(trainable), "largest": float(largest),
            "state_bytes": state}


def _state_bytes(optimizer: str, p) -> float:
    n = p.numel()
    if optimizer in ("adamw",):
        return 8.0 * n
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        if n < 4096:  # bitsandbytes keeps small tensors in 32-bit
            return 8.0 * n
        return 2.0 * n + 2 * 4.0 * math.ceil(n / 256)
    if optimizer in ("adafactor", "adafactor_legacy"):
        if p.dim() >= 2:
            rows, cols = p.shape[0], int(n // p.shape[0])
            return 4.0 * (rows + cols)
        return 4.0 * n
    return 8.0 * n


# --------------------------------------------------------------------------- the estimate
def runtime_mb(s: Setup) -> float:
    """Memory held before the model exists: this process's RSS with the same imports (CPU)."""
    if s.device != "cpu":
        return 0.0
    import datasets  # noqa: F401 - the imports of a fit process
    import lightning  # noqa: F401
    import transformers  # noqa: F401

    import chatlm.train.cli  # noqa: F401
    from chatlm.util.system import rss_mb

    if s.optimizer in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            pass
    if s.lora_r:
        import peft  # noqa: F401
    return rss_mb() + CPU_FIT_OVERHEAD_MB


def estimate(s: Setup, runtime: Optional[float] = None) -> dict[str, Any]:
    """Peak memory of training ``s``, in MiB, with its parts."""
    pf = param_facts(s)
    af = activation_facts(s)
    # bf16-mixed without an exact (fake CUDA, autocast) count: linear inputs are saved in bf16,
    # the residual stream, norms and softmax stay fp32
    act_scale = 0.75 if s.precision.startswith(("bf16", "16")) and not af["dtype_exact"] else 1.0
    weights = 4.0 * pf["total"]
    grads = 4.0 * pf["trainable"]
    state = pf["state_bytes"]
    if s.gradient_checkpointing:
        # inside checkpointed layers nothing is saved; each layer keeps its input, and the
        # backward recomputes one layer at a time
        acts = af["outside_layers"] + af["layer_inputs"] + af["max_layer"]
    else:
        acts = af["saved"]
    acts *= act_scale
    bwd_transient = 2.0 * af["logits"] * act_scale + 4.0 * pf["largest"]
    if s.optimizer == "adamw":
        opt_transient = 4.0 * pf["trainable"]          # foreach: sqrt(exp_avg_sq) of every tensor
    elif s.optimizer in ("adamw8bit", "paged_adamw8bit"):
        opt_transient = 4.0 * 5 * pf["largest"] if s.device == "cpu" else 4.0 * pf["largest"]
    else:
        opt_transient = 4.0 * 3 * pf["largest"]       # Adafactor: per-tensor temporaries
    accum = grads if s.accumulation > 1 else 0.0
    if s.device == "cpu":
        # freed activation memory stays in the heap while the gradients are allocated
        phase_train = CPU_ACTIVATION_FACTOR * acts + bwd_transient + grads
        if s.gradient_checkpointing:
            phase_train += CPU_CHECKPOINT_GRAD_EXTRA * grads
    elif s.gradient_checkpointing:
        # the loss's tensors are freed before the first layer is recomputed, which then meets
        # the gradients already made
        inputs = af["layer_inputs"] * act_scale
        phase_train = inputs + accum + max(af["outside_layers"] * act_scale + bwd_transient,
                                           af["max_layer"] * act_scale + grads)
    else:
        phase_train = acts + bwd_transient + accum
    phase_step = grads + opt_transient
    base = runtime_mb(s) if runtime is None else runtime
    model_mb = (weights + state + max(phase_train, phase_step)) / MiB
    total = base + model_mb
    return {
        "peak_mb": total,
        "runtime_mb": base,
        "parameters_mb": weights / MiB,
        "gradients_mb": grads / MiB,
        "optimizer_state_mb": state / MiB,
        "activations_mb": acts / MiB,
        "backward_transient_mb": bwd_transient / MiB,
        "optimizer_transient_mb": opt_transient / MiB,
        "phase": "forward/backward" if phase_train >= phase_step else "optimizer step",
        "parameters": int(pf["total"]),
        "trainable_parameters": int(pf["trainable"]),
        "tokens_per_micro_batch": s.batch_size * (s.seq_len + (s.label_len or 0)),
        "setup": {k: v for k, v in dataclasses.asdict(s).items() if k != "notes"},
        "notes": list(s.notes),
    }


# --------------------------------------------------------------------------- suggestions
#: Options tried to fit a budget, cheapest in throughput first (the cost is the bench's
#: measured slowdown class on CPU; on a GPU 8-bit AdamW is nearly free).
def candidate_setups(s: Setup) -> list[tuple[str, list[str], Setup]]:
    out: list[tuple[str, list[str], Setup]] = []
    seen = set()

    def add(name: str, flags: list[str], setup: Setup) -> None:
        key = (setup.optimizer, setup.gradient_checkpointing, setup.batch_size, setup.accumulation,
               setup.precision, setup.lora_r)
        if key not in seen:
            seen.add(key)
            out.append((name, flags, setup))

    add("as configured", [], s)
    steps: list[tuple[str, list[str], dict[str, Any]]] = []
    if s.device == "cuda" and not s.precision.startswith("bf16"):
        steps.append(("bf16-mixed", ["--trainer.precision bf16-mixed"], {"precision": "bf16-mixed"}))
    if s.optimizer == "adamw":
        steps.append(("8-bit AdamW", ["--model.optim.optimizer adamw8bit"], {"optimizer": "adamw8bit"}))
    if not s.gradient_checkpointing:
        steps.append(("gradient checkpointing", ["--model.gradient_checkpointing true"],
                      {"gradient_checkpointing": True}))
    cur, flags, names = s, [], []
    for name, fl, change in steps:
        cur = cur.replace(**change)
        flags, names = flags + fl, names + [name]
        add(" + ".join(names), flags, cur)
    b, acc = cur.batch_size, cur.accumulation
    while b > 1:
        b, acc = max(1, b // 2), acc * 2
        add(" + ".join(names + [f"micro-batch {b} x accumulation {acc}"]),
            flags + [f"--data.batch_size {b}", f"--trainer.accumulate_grad_batches {acc}"],
            cur.replace(batch_size=b, accumulation=acc))
    if not s.lora_r:
        add("LoRA r=8 (adapters only: not a full fine-tune)", ["--model.lora.r 8"], s.replace(lora_r=8))
        add("LoRA r=8 + gradient checkpointing", ["--model.lora.r 8", "--model.gradient_checkpointing true"],
            s.replace(lora_r=8, gradient_checkpointing=True))
    return out


def plan(cfg: dict[str, Any], budget_mb: float, seq_len: Optional[int] = None, label_len: Optional[int] = None,
         device: str = "cpu") -> dict[str, Any]:
    s = resolve(cfg, seq_len, label_len, device)
    runtime = runtime_mb(s) if device == "cpu" else 0.0
    rows = []
    for name, flags, setup in candidate_setups(s):
        est = estimate(setup, runtime=runtime_mb(setup) if device == "cpu" else 0.0)
        rows.append({"option": name, "flags": flags, "peak_mb": est["peak_mb"], "fits": est["peak_mb"] <= budget_mb,
                     "estimate": est})
    first = rows[0]
    suggestion = next((r for r in rows if r["fits"]), None)
    return {"budget_mb": budget_mb, "runtime_mb": runtime, "estimate": first["estimate"], "fits": first["fits"],
            "suggestion": suggestion, "options": rows}


def parse_memory(text: str) -> float:
    """``16GB``, ``16G``, ``16GiB``, ``16`` (GiB), ``800MB`` or ``800M`` -> MiB (GB counted as GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"--memory {text!r}: expected e.g. 16GB, 16 (GiB) or 800MB")
    value, unit = float(m.group(1)), m.group(2).upper() or "G"
    return value * {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2}[unit]


def render(result: dict[str, Any]) -> str:
    e = result["estimate"]
    s = e["setup"]
    lines = [
        f"model: {s['arch']} {e['parameters'] / 1e6:.1f}M parameters ({e['trainable_parameters'] / 1e6:.1f}M "
        f"trainable), optimizer {s['optimizer']}, precision {s['precision']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}",
        f"micro-batch: {s['batch_size']} x {s['seq_len']}" + (f" + {s['label_len']} decoder" if s['label_len'] else "")
        + f" tokens, accumulation {s['accumulation']}, device {s['device']}",
        "",
        f"  runtime (imports, CUDA context not counted) {e['runtime_mb']:10.0f} MiB",
        f"  parameters                                  {e['parameters_mb']:10.0f} MiB",
        f"  gradients                                   {e['gradients_mb']:10.0f} MiB",
        f"  optimizer state                             {e['optimizer_state_mb']:10.0f} MiB",
        f"  activations (saved for backward)            {e['activations_mb']:10.0f} MiB",
        f"  transients (backward / optimizer step)      {e['backward_transient_mb']:5.0f} / "
        f"{e['optimizer_transient_mb']:.0f} MiB",
        f"  estimated peak ({e['phase']:>16s})       {e['peak_mb']:10.0f} MiB   "
        f"({'fits' if result['fits'] else 'does NOT fit'} {result['budget_mb']:.0f} MiB)",
    ]
    for note in e["notes"]:
        lines.append(f"  note: {note}")
    lines += ["", f"{'option':60s} {'peak MiB':>9s}  fits"]
    for r in result["options"]:
        lines.append(f"{r['option'][:60]:60s} {r['peak_mb']:9.0f}  {'yes' if r['fits'] else 'no'}")
    sug = result["suggestion"]
    lines.append("")
    if sug is None:
        lines.append("nothing tried fits: use a smaller model, shorter sequences (--data.max_seq_len) or more memory")
    elif sug["flags"]:
        lines.append(f"suggested: {sug['option']} -> {sug['peak_mb']:.0f} MiB")
        lines.append("  python -m src fit --config ... " + " ".join(sug["flags"]))
    else:
        lines.append("the config fits as it is")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m src plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="fit config YAML (repeatable)")
    p.add_argument("--memory", required=True, help="budget, e.g. 16GB or 16 (GiB), or 800MB")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per (encoder) sequence")
    p.add_argument("--label_len", type=int, default=None, help="T5 decoder tokens (default: --seq_len)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: peak RSS; cuda: peak torch.cuda.max_memory_allocated")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args, rest = p.parse_known_args(argv)
    from chatlm.errors import ChatLMError

    try:
        cfg = load_config(args.config, rest)
        budget = parse_memory(args.memory)
    except (OSError, ValueError) as err:
        raise ChatLMError(str(err)) from None
    result = plan(cfg, budget, args.seq_len, args.label_len, args.device)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(render(result))


if __name__ == "__main__":
    main()
