"""Export a trained model as a Hugging Face directory (safetensors + tokenizer)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from chatlm.model.build import quiet_progress
from chatlm.model.lora import is_peft
from chatlm.util.files import atomic_dir

def save_hf(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Export ``model`` (safetensors) and ``tokenizer`` as a Hugging Face directory.

    Everything is written to a temporary directory beside ``out_dir`` and then renamed over
    it, so a reader (or a crash) sees the previous export or the new one, never half of one.
    A PEFT model is merged (``merge_and_unload`` on a deep copy: the trained model keeps its
    adapters; the copy needs the model's memory once more) so the export loads with plain
    ``AutoModelFor*.from_pretrained``. A ``torch.compile`` wrapper is unwrapped. The export's
    config has ``use_cache`` on even if training turned it off (gradient checkpointing).

    Args:
        tokenizer: Anything with ``save_pretrained`` (or None to export the model only).

    Returns:
        The export directory.
    """
    out = Path(out_dir).absolute()
    model = getattr(model, "_orig_mod", model)
    if is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    config = model.config
    training_use_cache = getattr(config, "use_cache", None)
    try:
        if training_use_cache is False:  # off for gradient checkpointing; exports generate
            config.use_cache = True
        with atomic_dir(out) as tmp:
            with quiet_progress():
                model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if training_use_cache is False:
            config.use_cache = False
    return out


