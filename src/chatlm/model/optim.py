"""Optimizer and learning-rate schedule factories.

Optimizers:

* ``adafactor_legacy`` -- what ``train_low_mem.py`` trains with (``torch_optimizer.Adafactor``
  defaults, reproduced bit for bit by Transformers' ``Adafactor(lr=None, relative_step=True,
  scale_parameter=True, warmup_init=False)``). **Its step size is computed from the step
  count and each parameter's RMS: the learning rate you pass, and any schedule, are IGNORED.**
* ``adafactor`` -- Transformers' Adafactor with a fixed, schedulable lr: what the HF Trainer's
  ``optim="adafactor"`` builds (``scale_parameter=False, relative_step=False``).
* ``adamw`` -- ``torch.optim.AdamW``.
* ``adamw8bit`` / ``paged_adamw8bit`` -- bitsandbytes 8-bit AdamW (also run on CPU; paging only
  applies on CUDA).

Schedules (stepped once per optimizer step):

* ``onecycle`` -- the legacy ``OneCycleLR``: starts at ``lr``, peaks at ``div_factor * lr``.
* ``cosine`` / ``linear`` / ``constant`` -- Transformers' ``get_*_schedule_with_warmup``, as the
  HF Trainer's ``lr_scheduler_type``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import get_args

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from chatlm.model.config import OptimizerName, SchedulerName


def build_optimizer(
    name: OptimizerName,
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """The optimizer ``name`` over ``params`` (parameters or param-group dicts).

    Args:
        name: See the module docstring.
        lr: Learning rate. **Ignored by ``adafactor_legacy``**, whose relative step sets the
            update size to ``max(1e-3, RMS(param)) * min(1e-2, 1/sqrt(step))``.
        weight_decay: Decoupled weight decay (AdamW family; Adafactor's own ``weight_decay``).
        betas: Adam betas (AdamW family only; Adafactor keeps its defaults).
        eps: Adam epsilon (AdamW family only; Adafactor keeps its ``(1e-30, 1e-3)``).
    """
    if name == "adafactor_legacy":
        from transformers.optimization import Adafactor

        # lr=None is required by relative_step=True; the given lr is deliberately dropped.
        return Adafactor(params, lr=None, relative_step=True, scale_parameter=True,
                         warmup_init=False, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # transformers.trainer_optimizer._get_adafactor: {"lr": lr, "scale_parameter": False,
        # "relative_step": False}; weight decay arrives through the Trainer's param groups.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(f"optimizer {name!r} needs bitsandbytes: pip install bitsandbytes") from err
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(get_args(OptimizerName))}")


def build_scheduler(
    name: SchedulerName,
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    lr: float | None = None,
    div_factor: float = 25.0,
) -> LRScheduler | None:
    """The learning-rate schedule ``name``, to step after every optimizer step.

    Args:
        total_steps: Optimizer steps the schedule spans (``onecycle`` raises past it).
        warmup_steps: Linear warmup steps of ``cosine`` / ``linear`` / ``constant``. ``onecycle``
            ignores it (its warmup is the first 30% of ``total_steps``), as the legacy loop does.
        lr: Base lr of ``onecycle`` (None: the optimizer's lr). The other schedules scale the
            optimizer's own lr.
        div_factor: ``onecycle`` peaks at ``div_factor * lr`` and starts at ``lr``.

    Returns:
        The scheduler, or None when the optimizer has no learning rate to schedule
        (``adafactor_legacy`` with ``cosine``/``linear``/``constant``: its relative step ignores
        the lr anyway, so the schedule could change nothing; a warning says so). ``onecycle``
        on ``adafactor_legacy`` is built, as in the legacy script: it writes
        ``param_group["lr"]`` (and so the logged lr) but does not change the updates.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if name == "onecycle":
        base = lr if lr is not None else optimizer.param_groups[0].get("lr")
        if base is None:
            raise ValueError("scheduler 'onecycle' needs lr when the optimizer has none "
                             "(adafactor_legacy); pass lr")
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=div_factor * base, total_steps=total_steps,
            div_factor=div_factor, cycle_momentum=False)
    if name not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(get_args(SchedulerName))}")
    if any(group.get("lr") is None for group in optimizer.param_groups):
        warnings.warn(f"scheduler {name!r} skipped: the optimizer has no fixed learning rate "
                      "(adafactor_legacy computes its own step size and ignores lr)", stacklevel=2)
        return None
    from transformers import optimization as hf

    if name == "cosine":
        return hf.get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "linear":
        return hf.get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return hf.get_constant_schedule_with_warmup(optimizer, warmup_steps)


def legacy_onecycle_total_steps(n_train: int, batch_size: int, accumulation: int, epochs: int) -> int:
    """``epochs * ceil(n_train / (batch_size * accumulation))``: the legacy OneCycleLR length.

    (``train_low_mem.py`` passes ``epochs`` and ``steps_per_epoch``; OneCycleLR multiplies them.)
    """
    if min(n_train, batch_size, accumulation, epochs) < 1:
        raise ValueError("n_train, batch_size, accumulation and epochs must all be >= 1, got "
                         f"{n_train}, {batch_size}, {accumulation}, {epochs}")
    return epochs * math.ceil(n_train / (batch_size * accumulation))
