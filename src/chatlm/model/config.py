"""The typed configuration groups of a model, defined once.

Used by the LightningModule (``--model.shape.*``, ``--model.optim.*``, ``--model.lora.*``,
``--model.evaluation.*``), the model builders (:func:`chatlm.model.build.build_model`), the
memory planner, the benchmark and the tests. Every flat name of earlier releases still works
on the command line and in YAML (``--model.d_model 256``, ``--model.lr 3e-4``,
``--model.optimizer adamw``, ``--model.lora_r 8``): :func:`nest_model_args` and
:func:`nest_model_flags` move them into their group, and :data:`FLAT_NAMES` lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, TypeVar

OptimizerName = Literal["adafactor_legacy", "adafactor", "adamw", "adamw8bit", "paged_adamw8bit"]
SchedulerName = Literal["onecycle", "cosine", "linear", "constant"]
LossNormalization = Literal["micro_batch", "window_tokens"]


@dataclass(frozen=True)
class ModelShape:
    """The size of a model built from scratch (a Hugging Face directory in ``pretrained`` brings its own).

    Args:
        d_model: Hidden width.
        d_ff: Feed-forward width.
        num_layers: Encoder layers (T5) or decoder layers (llama).
        num_decoder_layers: T5 decoder layers; None = num_layers (must stay None for llama).
        num_heads: Attention heads (llama: also key/value heads).
        d_kv: Width of each T5 attention head (llama: always d_model / num_heads).
        dropout: Dropout rate (0 for exact reproducibility checks).
        max_position_embeddings: Longest sequence a llama model can take (T5 uses relative positions).
    """

    d_model: int = 768
    d_ff: int = 3072
    num_layers: int = 10
    num_decoder_layers: Optional[int] = None
    num_heads: int = 12
    d_kv: int = 64
    dropout: float = 0.1
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class Optimization:
    """How the weights are updated.

    Args:
        optimizer: ``adamw``; ``adafactor`` (fixed lr, as the HF Trainer's); ``adafactor_legacy``
            (relative step: IGNORES lr, as train_low_mem.py); ``adamw8bit`` / ``paged_adamw8bit``
            (bitsandbytes, ~4x less optimizer memory).
        lr: Peak learning rate (ignored by ``adafactor_legacy``).
        weight_decay: Decoupled weight decay.
        betas: Adam betas.
        scheduler: ``cosine`` (with warmup), ``linear``, ``constant`` (with warmup) or
            ``onecycle`` (legacy: max lr = div_factor * lr).
        warmup_steps: Warmup optimizer steps (cosine, linear, constant).
        div_factor: One-cycle initial lr = max lr / div_factor.
        scheduler_total_steps: Steps the schedule spans; None = the trainer's estimate.
        loss_normalization: ``micro_batch``: each micro-batch's loss is its token mean (Lightning /
            legacy loop). ``window_tokens``: every token of an accumulation window (and of all
            devices) weighs the same, as the HF Trainer; also makes N devices at batch b train
            exactly as one device at batch N*b.
        legacy_accumulation_scaling: Reproduce train_low_mem.py, whose gradients are those of
            ``CE / accumulation**2`` (a defect; matters with clipping or non-Adafactor).
    """

    optimizer: OptimizerName = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: SchedulerName = "cosine"
    warmup_steps: int = 0
    div_factor: float = 25.0
    scheduler_total_steps: Optional[int] = None
    loss_normalization: LossNormalization = "micro_batch"
    legacy_accumulation_scaling: bool = False


@dataclass(frozen=True)
class LoRA:
    """LoRA adapters (PEFT); merged into the weights on export.

    Args:
        r: Rank of the adapters; 0 = full fine-tuning.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter branch.
        target_modules: Module names that get adapters; None = per-arch default (T5 q, v; llama
            q_proj, v_proj).
    """

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None


@dataclass(frozen=True)
class Evaluation:
    """What each validation measures beside the loss.

    Args:
        bleu_max_samples: Validation samples (per device) that get a greedy generation scored
            with BLEU-4 each validation; 0 turns BLEU off.
        generation_preset: Preset used for those generations (see chatlm.infer.generation).
        max_new_tokens: Longest generated answer during evaluation.
    """

    bleu_max_samples: int = 64
    generation_preset: str = "greedy"
    max_new_tokens: int = 64


#: The groups of ``--model``: attribute name -> class.
GROUPS: dict[str, type] = {"shape": ModelShape, "optim": Optimization, "lora": LoRA, "evaluation": Evaluation}
#: Flat names of earlier releases -> (group, field). LoRA's were ``lora_r`` ... ``lora_target_modules``.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    (f"lora_{f.name}" if group == "lora" else f.name): (group, f.name)
    for group, cls in GROUPS.items() for f in fields(cls)
}

G = TypeVar("G")


def as_group(cls: type[G], value: Any) -> G:
    """``value`` (an instance, a mapping of field values, a jsonargparse Namespace or None) as ``cls``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if hasattr(value, "as_dict") and not isinstance(value, Mapping):  # jsonargparse.Namespace
        value = value.as_dict()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"{cls.__name__}: expected a mapping of its fields, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        from chatlm.errors import ConfigError

        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; the fields are {sorted(known)}")
    kwargs = dict(value)
    if "betas" in kwargs and kwargs["betas"] is not None:
        kwargs["betas"] = tuple(kwargs["betas"])
    if kwargs.get("target_modules") is not None:
        kwargs["target_modules"] = list(kwargs["target_modules"])
    return cls(**kwargs)


def group_dict(value: Any) -> dict[str, Any]:
    """A group as plain values (for checkpoints: they load with ``weights_only=True``)."""
    d = dataclasses.asdict(value)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def nest_model_args(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section of a config (or a checkpoint's hyperparameters) with every flat name
    of an earlier release moved into its group; a group given as a whole stays as it is."""
    out: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    for key, value in model.items():
        if key in FLAT_NAMES and key not in GROUPS:
            group, name = FLAT_NAMES[key]
            moved.setdefault(group, {})[name] = value
        else:
            out[key] = value
    for group, values in moved.items():
        current = out.get(group)
        if current is None:
            out[group] = values
        elif isinstance(current, Mapping):
            out[group] = {**current, **values}
        else:  # an instance given as a whole: the flat values win
            out[group] = {**group_dict(as_group(GROUPS[group], current)), **values}
    return out


def nest_model_flags(argv: list[str]) -> list[str]:
    """Command-line flags with ``--model.FLAT`` (or ``--model.FLAT=V``) renamed to ``--model.GROUP.FIELD``."""
    out = []
    for arg in argv:
        if arg.startswith("--model."):
            name, eq, value = arg[len("--model."):].partition("=")
            if name in FLAT_NAMES:
                group, field_name = FLAT_NAMES[name]
                arg = f"--model.{group}.{field_name}{eq}{value}"
        out.append(arg)
    return out
