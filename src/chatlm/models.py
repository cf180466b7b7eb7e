"""Build, load and export the Hugging Face models chatlm trains. Knows nothing of Lightning.

Two architectures:

* ``t5``    -- ``T5ForConditionalGeneration`` (seq2seq), built exactly as the legacy
  ``train_low_mem.py`` builds it (``T5ModelConfig``), so the same seed gives the same weights.
* ``llama`` -- ``LlamaForCausalLM`` (decoder-only).

Loading accepts a Hugging Face directory (``save_pretrained`` output) or a single legacy
state-dict file (``.bin`` / ``.pt`` / ``.pth`` / ``.safetensors``). Pickled files are read with
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.
Every load problem is a :class:`ModelLoadError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import PreTrainedModel

Arch = Literal["t5", "llama"]

#: Files beside a legacy state dict that describe its model (first found wins).
CONFIG_NAMES = ("config.json", "model_config.json")
#: Extensions load_model reads as a single state-dict file.
STATE_DICT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
#: LoRA target modules per ``config.model_type`` (attention query and value projections).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}
#: Wrapper prefixes stripped from state-dict keys (DDP, torch.compile, a LightningModule).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class ModelLoadError(ValueError):
    """A model file or directory cannot be loaded; the message is one line naming it."""


# --------------------------------------------------------------------------- build
def build_model(
    arch: Arch,
    vocab_size: int,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    d_model: int = 768,
    d_ff: int = 3072,
    num_layers: int = 10,
    num_decoder_layers: int | None = None,
    num_heads: int = 12,
    d_kv: int = 64,
    dropout: float = 0.1,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
) -> PreTrainedModel:
    """A freshly initialised model; seed the global torch RNG first for reproducible weights.

    Args:
        arch: ``"t5"`` (encoder-decoder) or ``"llama"`` (decoder-only).
        vocab_size: Rows of the embedding matrix (``len(tokenizer)``).
        pad_token_id: Padding id; T5 also starts decoding from it (``decoder_start_token_id``).
        eos_token_id: End-of-sequence id. Llama's ``bos_token_id`` is set to it as well (the
            chatlm tokenizers have no BOS token).
        d_model: Hidden width.
        d_ff: Feed-forward width.
        num_layers: T5 encoder layers / llama decoder layers.
        num_decoder_layers: T5 decoder layers (None: ``num_layers``); must be None for llama.
        num_heads: Attention heads (llama: also key/value heads, i.e. no grouped-query attention).
        d_kv: T5 width of one head. Llama's head width is always ``d_model // num_heads``
            (``d_kv`` is ignored unless it already equals that).
        dropout: T5 ``dropout_rate``; llama ``attention_dropout``.
        max_position_embeddings: Longest llama sequence (T5 uses relative positions).
        tie_word_embeddings: Llama: share input embeddings and output head. T5 always ties
            them (transformers forces it), as the legacy model does.
    """
    if arch == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
            num_decoder_layers=num_decoder_layers, num_heads=num_heads, dropout_rate=dropout,
            decoder_start_token_id=pad_token_id, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        return T5ForConditionalGeneration(config)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        if num_decoder_layers is not None and num_decoder_layers != num_layers:
            raise ValueError(f"num_decoder_layers={num_decoder_layers} is a T5 option; "
                             f"llama has num_layers={num_layers} decoder layers only")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of num_heads={num_heads}")
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, head_dim=d_model // num_heads,
            max_position_embeddings=max_position_embeddings, attention_dropout=dropout,
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


# --------------------------------------------------------------------------- LoRA
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


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------- export
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
    if _is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    config = model.config
    training_use_cache = getattr(config, "use_cache", None)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if training_use_cache is False:  # off for gradient checkpointing; exports generate
            config.use_cache = True
        with _quiet_progress():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if training_use_cache is False:
            config.use_cache = False
    return out


@contextlib.contextmanager
def _quiet_progress():
    """No transformers progress bars ("Writing model shards") inside a training log."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _replace_dir(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside, then removed."""
    if not final.exists():
        os.replace(new, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rmdir(old)
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- load
def load_model(
    path: str | os.PathLike,
    *,
    arch: Arch | None = None,
    expected_vocab_size: int | None = None,
    trust_remote_code: bool = False,
    **build_kwargs: Any,
) -> PreTrainedModel:
    """Load a Hugging Face model directory or a legacy state-dict file.

    * A directory: ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM.from_pretrained``,
      chosen by its config's ``is_encoder_decoder`` (safetensors preferred by transformers;
      ``.bin`` weights are read with ``weights_only``). ``arch`` and ``build_kwargs`` are
      ignored: the directory's config decides.
    * A file (``.bin``/``.pt``/``.pth``/``.safetensors``): the state dict is read safely and the
      model built, then loaded with ``strict=True``. The model is built with
      :func:`build_model` from ``arch`` and ``build_kwargs`` when any build kwarg is given
      (explicit options win, as the legacy script always builds from its ``T5ModelConfig``;
      wrong sizes give a shape error). Without build kwargs it is built from a
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
        **build_kwargs: :func:`build_model` arguments for a state-dict file (given: they
            define the model and a config file beside it is not read).

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
    config = None if build_kwargs else _config_beside(p, arch)
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
        kwargs = dict(build_kwargs)
        if kwargs.get("vocab_size") is None:
            if vocab is None:
                raise ModelLoadError(f"{p}: cannot tell the vocabulary size (no embedding "
                                     "weight found); pass vocab_size")
            kwargs["vocab_size"] = vocab
        try:
            model = build_model(arch, **kwargs)
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
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():  # "Detected pickle protocol N": the error says more
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        low = msg.lower()
        refused = any(s in low for s in ("unsupported global", "not an allowed global", "is blocked")) or (
            "unsupported operand" in low and _pickles_parse(p))  # a real pickle, not garbage
        if refused:
            reason = next((ln.strip() for ln in msg.splitlines()
                           if "unsupported" in ln.lower()), "")
            raise ModelLoadError(
                f"{p}: refused as unsafe: it holds pickled objects other than tensors, which "
                f"could run code when loaded (torch.load weights_only=True: {reason}); "
                "re-save it as a plain state dict or safetensors from a trusted source") from None
        raise ModelLoadError(f"{p}: corrupt or truncated checkpoint ({_one_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - every reader failure is a corrupt file
        raise ModelLoadError(f"{p}: corrupt or truncated checkpoint "
                             f"({type(err).__name__}: {_one_line(err)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelLoadError(f"{p}: not a state dict (expected a mapping of names to tensors, "
                             f"got {type(obj).__name__})")
    return dict(obj)


def _pickles_parse(path: Path) -> bool:
    """True when the file's pickle stream is well-formed (parsed with pickletools, never run).

    Tells a valid pickle that the weights-only loader refuses (unsafe) from random bytes
    (corrupt) when ``torch.load`` reports an unsupported opcode.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as stream:
                    for _ in pickletools.genops(stream):
                        pass
            return True
        size = path.stat().st_size
        with open(path, "rb") as stream:
            for _ in range(4):  # legacy torch files: magic, protocol, sys info, then the data
                if stream.tell() >= size:
                    break
                for _ in pickletools.genops(stream):
                    pass
        return True
    except Exception:  # noqa: BLE001 - anything unparsable is corrupt, not unsafe
        return False


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_hf_dir(path: Path, expected_vocab_size: int | None,
                 trust_remote_code: bool) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if not (path / "config.json").is_file():
        hint = (" (it is a PEFT adapter; export a merged model with chatlm.models.save_hf)"
                if (path / "adapter_config.json").is_file() else "")
        raise ModelLoadError(f"{path}: no config.json, not a Hugging Face model directory{hint}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path / 'config.json'}: unreadable model config "
                             f"({_one_line(err)})") from None
    _check_vocab(path, getattr(config, "vocab_size", None), expected_vocab_size)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with _quiet_progress():
            return auto.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load the model weights ({_one_line(err)})") from None


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
            raise ModelLoadError(f"{f}: unreadable model config ({_one_line(err)})") from None
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
            model = build_model(arch, vocab_size=8, d_model=8, d_ff=8, num_layers=1,  # type: ignore[arg-type]
                                num_heads=1, d_kv=8)
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
