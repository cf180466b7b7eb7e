"""LoRA adapters (PEFT) on a chatlm model."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from chatlm.model.build import is_seq2seq

#: LoRA target modules per ``config.model_type`` (attention query and value projections).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
):
    """Wrap ``model`` in a PEFT LoRA model; only the adapters stay trainable.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter branch.
        target_modules: Module names that get adapters. None: ``DEFAULT_LORA_TARGETS`` for the
            model type (T5 ``["q", "v"]``, llama ``["q_proj", "v_proj"]``), else PEFT's own default.

    Returns:
        A ``peft.PeftModel``; :func:`save_hf` merges the adapters when exporting it. PEFT
        injects the adapters into ``model`` itself: keep using the returned wrapper.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a declared dependency
        raise ImportError("LoRA needs the 'peft' package: pip install peft") from err
    if target_modules is None:
        target_modules = DEFAULT_LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else None,
        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


