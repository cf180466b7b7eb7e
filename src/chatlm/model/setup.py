"""The model a run trains, assembled from its options: built or loaded, frozen, LoRA, checkpointing.

One function shared by the LightningModule (:class:`chatlm.train.module.ChatLM`) and by
inference from a training checkpoint (:mod:`chatlm.infer.predict`), so both make the same
module tree and a checkpoint's state dict always fits.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from chatlm.model.build import Arch, build_model, freeze_modules
from chatlm.model.config import LoRA, ModelShape
from chatlm.model.load import load_model
from chatlm.model.lora import apply_lora


def make_model(
    arch: Arch,
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    shape: ModelShape,
    pretrained: Optional[str] = None,
    lora: Optional[LoRA] = None,
    freeze: Optional[list[str]] = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model of a run (see :class:`chatlm.train.module.ChatLM` for what each option means).

    ``pretrained`` (a Hugging Face directory or a state-dict file) is loaded safely and must
    have ``vocab_size`` tokens; without it a new model is built (seed the torch RNG first).
    """
    if pretrained:
        model = load_model(pretrained, arch=arch, shape=shape, expected_vocab_size=vocab_size,
                           pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                           trust_remote_code=trust_remote_code)
    else:
        model = build_model(arch, vocab_size, shape, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    if freeze:
        freeze_modules(model, list(freeze))
    lora = lora or LoRA()
    if lora.r > 0:
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora.r > 0 or freeze:
            model.enable_input_require_grads()
        model.config.use_cache = False
    return model
