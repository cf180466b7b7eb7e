"""Load a model: a Hugging Face directory or a single (legacy) state-dict file, safely.

Pickled files are read with ``torch.load(weights_only=True)`` (:mod:`chatlm.checkpoint.store`):
a file that would run code when unpickled is refused. Every load problem is a
:class:`~chatlm.errors.ModelLoadError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn
from transformers import PreTrainedModel

from chatlm.checkpoint.store import safe_torch_load
from chatlm.errors import ModelLoadError
from chatlm.model.build import Arch, build_model, quiet_progress
from chatlm.model.config import ModelShape
from chatlm.util.text import one_line

#: Files beside a legacy state dict that describe its model (first found wins).
CONFIG_NAMES = ("config.json", "model_config.json")


#: Extensions load_model reads as a single state-dict file.
STATE_DICT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


#: Wrapper prefixes stripped from state-dict keys (DDP, torch.compile, a LightningModule).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_model(
    path: str | os.PathLike,
    *,
    arch: Arch | None = None,
    shape: ModelShape | None = None,
    vocab_size: int | None = None,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    expected_vocab_size: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a Hugging Face model directory or a legacy state-dict file.

    * A directory: ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM.from_pretrained``,
      chosen by its config's ``is_encoder_decoder`` (safetensors preferred by transformers;
      ``.bin`` weights are read with ``weights_only``). ``arch``, ``shape`` and the ids are
      ignored: the directory's config decides.
    * A file (``.bin``/``.pt``/``.pth``/``.safetensors``): the state dict is read safely and the
      model built, then loaded with ``strict=True``. The model is built with
      :func:`build_model` from ``arch`` and ``shape`` when ``shape`` is given
      (explicit options win, as the legacy script always builds from its ``T5ModelConfig``;
      wrong sizes give a shape error). Without ``shape`` it is built from a
      ``config.json`` / ``model_config.json`` beside the file if there is one, else with
      :func:`build_model` defaults. Arch and vocab size are inferred from the weights when
      not given. Tied
      weights may be present or absent (``lm_head.weight`` of a tied model). Keys wrapped by
      DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or a LightningModule (``model.``)
      are unwrapped; a Lightning ``.ckpt``-style dict with a ``state_dict`` entry is accepted.

    Building a model consumes the global torch RNG exactly like :func:`build_model`, as the
    legacy script's "build, then load the fine-tuning checkpoint" does.

    Args:
        path: Directory or state-dict file.
        arch: Architecture for a bare state-dict file (None: inferred from its keys).
        expected_vocab_size: The tokenizer's vocabulary size; a different checkpoint
            vocabulary is an error instead of a silent mismatch.
        trust_remote_code: Allow a directory's custom modelling code to run (off by default).
        shape: The size of the model for a state-dict file (given: it defines the model and
            a config file beside it is not read).
        vocab_size: Its vocabulary (None: from the weights).
        pad_token_id: Pad id of a model built for a state-dict file.
        eos_token_id: End-of-sequence id of a model built for a state-dict file.

    Raises:
        ModelLoadError: missing path, unsafe / corrupt / truncated file, weights that do not
            fit the model, or a vocabulary different from ``expected_vocab_size``.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such model file or directory")
    if p.is_dir():
        return _load_hf_dir(p, expected_vocab_size, trust_remote_code)
    if p.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise ModelLoadError(f"{p}: not a model directory or a state-dict file "
                             f"({', '.join(STATE_DICT_SUFFIXES)})")
    state = read_state_dict(p)
    arch = arch or _infer_arch(state)
    config = None if shape is not None else _config_beside(p, arch)
    if config is None:
        if arch is None:
            raise ModelLoadError(f"{p}: cannot tell the architecture from its weights; pass arch")
        if arch not in get_args(Arch):
            raise ModelLoadError(f"{p}: unknown arch {arch!r}; choose one of "
                                 f"{', '.join(get_args(Arch))}")
    model_keys = set(_template_keys(config, arch))
    state = _unwrap_keys(state, model_keys)
    vocab = _state_vocab_size(state)
    _check_vocab(p, vocab, expected_vocab_size)
    if config is not None:
        model = _model_from_config(config)
    else:
        vocab_size = vocab_size if vocab_size is not None else vocab
        if vocab_size is None:
            raise ModelLoadError(f"{p}: cannot tell the vocabulary size (no embedding "
                                 "weight found); pass vocab_size")
        try:
            model = build_model(arch, vocab_size, shape, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{p}: cannot build a {arch} model: {err}") from err
    _load_state(model, state, p)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a (legacy or zip) torch pickle.

    Pickles go through ``torch.load(weights_only=True)``: only tensors and plain containers
    are rebuilt, so a crafted file cannot run code. Raises :class:`ModelLoadError`.
    """
    p = Path(path)
    if p.suffix.lower() == ".safetensors" and p.is_file() and p.stat().st_size:
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        except Exception as err:  # noqa: BLE001 - every reader failure is a corrupt file
            raise ModelLoadError(f"{p}: corrupt or truncated ({type(err).__name__}: {one_line(err, 160)})") from None
    else:
        obj = safe_torch_load(p, error=ModelLoadError)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelLoadError(f"{p}: not a state dict (expected a mapping of names to tensors, "
                             f"got {type(obj).__name__})")
    return dict(obj)


def _load_hf_dir(path: Path, expected_vocab_size: int | None,
                 trust_remote_code: bool) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if not (path / "config.json").is_file():
        hint = (" (it is a PEFT adapter; export a merged model with chatlm.model.export.save_hf)"
                if (path / "adapter_config.json").is_file() else "")
        raise ModelLoadError(f"{path}: no config.json, not a Hugging Face model directory{hint}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path / 'config.json'}: unreadable model config "
                             f"({one_line(err, 160)})") from None
    _check_vocab(path, getattr(config, "vocab_size", None), expected_vocab_size)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with quiet_progress():
            return auto.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load the model weights ({one_line(err, 160)})") from None


def _check_vocab(path: Path, vocab: int | None, expected: int | None) -> None:
    if expected is not None and vocab is not None and vocab != expected:
        raise ModelLoadError(
            f"{path}: the checkpoint's vocabulary has {vocab} tokens but the tokenizer has "
            f"{expected}; use the matching tokenizer (the one the model was trained with)")


def _config_beside(path: Path, arch: str | None):
    """The model config described by a JSON file next to a state-dict file, or None.

    A config without ``model_type`` is read as one of ``arch``.
    """
    from transformers import CONFIG_MAPPING

    for name in CONFIG_NAMES:
        f = path.parent / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            model_type = data.pop("model_type", None) or arch
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"unknown model_type {model_type!r}")
            return CONFIG_MAPPING[model_type].from_dict(data)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"{f}: unreadable model config ({one_line(err, 160)})") from None
    return None


def _model_class(config):
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    mapping = (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if getattr(config, "is_encoder_decoder", False)
               else MODEL_FOR_CAUSAL_LM_MAPPING)
    return mapping[type(config)]


def _model_from_config(config) -> PreTrainedModel:
    # cls(config), not from_config: the same RNG draws as build_model / the legacy script.
    return _model_class(config)(config)


def _template_keys(config, arch: str | None) -> list[str]:
    """State-dict keys of the model that would be built (on the meta device: no memory)."""
    with torch.device("meta"):
        if config is not None:
            model = _model_from_config(config)
        else:
            model = build_model(arch, 8, ModelShape(d_model=8, d_ff=8, num_layers=1,  # type: ignore[arg-type]
                                                    num_heads=1, d_kv=8))
    return list(model.state_dict())


def _infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"t5"`` or ``"llama"`` judged by the state-dict key names; None when neither fits."""
    keys = list(state)
    if any(k.endswith("shared.weight") or ".encoder.block." in f".{k}" for k in keys):
        return "t5"
    if any(k.endswith("embed_tokens.weight") and ".layers." not in k for k in keys) or any(
            ".layers." in k and "self_attn" in k for k in keys):
        return "llama"
    return None


def _unwrap_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes while no key matches the model but all share the prefix."""
    while state and not (model_keys & state.keys()):
        prefix = next((pre for pre in _WRAPPER_PREFIXES if all(k.startswith(pre) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _state_vocab_size(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("shared.weight", "model.embed_tokens.weight", "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` after filling tied aliases missing from ``state``."""
    state = dict(state)
    expected = model.state_dict()
    groups: dict[tuple[int, int], list[str]] = {}
    for name, tensor in expected.items():
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present and len(names) > 1:
            for n in names:
                state.setdefault(n, state[present[0]])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not fit the {type(model).__name__} built for them "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:3]}); check arch and the model size options")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k, got, want = bad[0]
        raise ModelLoadError(f"{path}: {len(bad)} weight shapes differ from the model's, e.g. "
                             f"{k} {got} vs {want}; check the model size options")
    model.load_state_dict(state, strict=True)


