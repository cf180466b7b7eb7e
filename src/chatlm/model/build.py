"""Build the Hugging Face models chatlm trains, and change them in place. Knows nothing of Lightning.

Two architectures:

* ``t5``    -- ``T5ForConditionalGeneration`` (seq2seq), built exactly as the legacy
  ``train_low_mem.py`` builds it (``T5ModelConfig``), so the same seed gives the same weights.
* ``llama`` -- ``LlamaForCausalLM`` (decoder-only).
"""

from __future__ import annotations

import contextlib
from typing import Literal, Optional, get_args

from torch import nn
from transformers import PreTrainedModel

from chatlm.model.config import ModelShape

Arch = Literal["t5", "llama"]


def build_model(
    arch: Arch,
    vocab_size: int,
    shape: Optional[ModelShape] = None,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    tie_word_embeddings: bool = True,
) -> PreTrainedModel:
    """A freshly initialised model; seed the global torch RNG first for reproducible weights.

    Args:
        arch: ``"t5"`` (encoder-decoder) or ``"llama"`` (decoder-only).
        vocab_size: Rows of the embedding matrix (``len(tokenizer)``).
        shape: Its size (:class:`~chatlm.model.config.ModelShape`; None: the defaults, the
            legacy project's 0.2B T5).
        pad_token_id: Padding id; T5 also starts decoding from it (``decoder_start_token_id``).
        eos_token_id: End-of-sequence id. Llama's ``bos_token_id`` is set to it as well (the
            chatlm tokenizers have no BOS token).
        tie_word_embeddings: Llama: share input embeddings and output head. T5 always ties
            them (transformers forces it), as the legacy model does.
    """
    s = shape or ModelShape()
    if arch == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            vocab_size=vocab_size, d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_layers=s.num_layers,
            num_decoder_layers=s.num_decoder_layers, num_heads=s.num_heads, dropout_rate=s.dropout,
            decoder_start_token_id=pad_token_id, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        return T5ForConditionalGeneration(config)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        if s.num_decoder_layers is not None and s.num_decoder_layers != s.num_layers:
            raise ValueError(f"num_decoder_layers={s.num_decoder_layers} is a T5 option; "
                             f"llama has num_layers={s.num_layers} decoder layers only")
        if s.d_model % s.num_heads:
            raise ValueError(f"d_model={s.d_model} is not a multiple of num_heads={s.num_heads}")
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=s.d_model, intermediate_size=s.d_ff,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
            num_key_value_heads=s.num_heads, head_dim=s.d_model // s.num_heads,
            max_position_embeddings=s.max_position_embeddings, attention_dropout=s.dropout,
            pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(get_args(Arch))}")


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every repeated transformer block of ``model`` in place (regional compilation).

    Each ``nn.ModuleList`` whose children are all of one class (T5's ``encoder.block`` and
    ``decoder.block``, llama's ``model.layers``; also inside a PEFT wrapper) has each child
    compiled with ``nn.Module.compile``. Identical blocks share one compiled graph, so this
    compiles a few small graphs instead of one whole-model graph (about half the compile
    time of ``torch.compile(model)`` for the benchmark's 30M T5), and the module tree and
    its state-dict keys stay as they were (no ``_orig_mod.`` prefix in checkpoints).

    Returns:
        The number of blocks compiled (0: nothing repeated was found; the model is unchanged).
    """
    n = 0
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList) and len(module) >= 2 \
                and len({type(child) for child in module}) == 1:
            for child in module:
                child.compile()
                n += 1
    return n


def is_seq2seq(model: nn.Module) -> bool:
    """True for an encoder-decoder model (T5), False for a causal LM (also through PEFT)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied parameters are counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared Parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def freeze_modules(model: nn.Module, prefixes: list[str]) -> tuple[int, int]:
    """Freeze every parameter whose name is, or starts with, ``prefix + "."`` for a prefix.

    Names are those of ``model.named_parameters()``; inside a PEFT wrapper the
    ``base_model.model.`` part may be left out. Tied parameters are one Parameter: T5 ties
    ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` to ``shared``, so
    freezing ``shared`` also freezes the output head (as the legacy SFT does).

    Returns:
        ``(trainable, total)`` parameter counts after freezing.

    Raises:
        ValueError: a prefix matches no parameter (most likely a typo).
    """
    def matches(name: str, prefix: str) -> bool:
        prefix = prefix.rstrip(".")
        return name == prefix or name.startswith(prefix + ".")

    used: set[str] = set()
    for name, param in model.named_parameters():
        short = name.removeprefix("base_model.model.")
        for prefix in prefixes:
            if matches(name, prefix) or matches(short, prefix):
                param.requires_grad_(False)
                used.add(prefix)
    unused = [p for p in prefixes if p not in used]
    if unused:
        tops = sorted({n.removeprefix("base_model.model.").split(".")[0]
                       for n, _ in model.named_parameters()})
        raise ValueError(f"freeze prefixes {unused} match no parameter; "
                         f"top-level names are {tops}")
    return count_parameters(model)


@contextlib.contextmanager
def quiet_progress():
    """No transformers progress bars ("Writing model shards") inside a training log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


