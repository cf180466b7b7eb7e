"""Answers from a trained model.

    python -m src predict --model runs/demo/hf --prompt "spell 472" --prompt "读出 35"
    python -m src predict --model runs/demo/checkpoints/last.ckpt --prompts_file questions.txt --preset beam

``--model`` is a Hugging Face export directory (``RUN/hf``) or a Lightning checkpoint
(``.ckpt``, loaded with ``weights_only=True``). Prompts come from ``--prompt`` (repeatable)
or ``--prompts_file`` (a text file with one prompt per line, or a parquet/jsonl file with a
``prompt`` column). Output: one JSON line per prompt ``{"prompt", "answer"}`` on stdout, or
into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional


from chatlm.errors import ChatLMError, ModelLoadError
from chatlm.util.text import one_line


def _load_from_checkpoint(path: str, tokenizer: Optional[str]):
    """The model of a training checkpoint, rebuilt from its hyperparameters (no Lightning needed)."""
    from chatlm.checkpoint.store import load_checkpoint_safely
    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.model.config import LoRA, ModelShape, as_group, nest_model_args
    from chatlm.model.setup import make_model

    ckpt = load_checkpoint_safely(path)
    hp = nest_model_args({k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")})
    state = ckpt.get("state_dict") or {}
    if not hp or not state:
        raise ModelLoadError(f"{path}: not a chatlm training checkpoint (no hyperparameters or weights)")
    model = make_model(hp.get("arch", "t5"), int(hp["vocab_size"]), int(hp.get("pad_token_id", 0)),
                       int(hp.get("eos_token_id", 1)), as_group(ModelShape, hp.get("shape")),
                       lora=as_group(LoRA, hp.get("lora")), freeze=hp.get("freeze"))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"{path}: its weights do not fit the model its hyperparameters describe "
                             f"({one_line(err, 160)})") from None
    if hasattr(model, "merge_and_unload"):  # LoRA: answer with the merged weights
        model = model.merge_and_unload()
    data_hp = ckpt.get("datamodule_hyper_parameters", {}) or {}
    tok_dir = tokenizer or data_hp.get("tokenizer") or sample_tokenizer_dir()
    return model, tok_dir, data_hp.get("format"), data_hp.get("max_seq_len")


def load_for_inference(model_path: str, tokenizer: Optional[str] = None):
    """(model, tokenizer, data format or None, max_seq_len or None) from an export or a .ckpt."""
    from chatlm.model.load import load_model
    from chatlm.data.tokenizer import load_tokenizer

    if not os.path.exists(model_path):
        raise ChatLMError(f"--model {model_path}: no such file or directory")
    if model_path.endswith(".ckpt"):
        model, tok_dir, fmt, max_len = _load_from_checkpoint(model_path, tokenizer)
    else:
        model, tok_dir, fmt, max_len = load_model(model_path), tokenizer or model_path, None, None
    return model.eval(), load_tokenizer(tok_dir), fmt, max_len


def read_prompts(prompts: list[str], prompts_file: Optional[str]) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        if prompts_file.endswith((".parquet", ".jsonl", ".json")):
            from chatlm.data.sources import load_prompt_response

            out += list(load_prompt_response(prompts_file)["prompt"])
        else:
            if not os.path.exists(prompts_file):
                raise ChatLMError(f"--prompts_file {prompts_file}: no such file")
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.rstrip("\n") for line in f if line.strip()]
    if not out:
        raise ChatLMError("no prompt given: use --prompt TEXT or --prompts_file FILE")
    return out


def predict(model, tokenizer, prompts: list[str], fmt: str, max_seq_len: int, preset: str,
            max_new_tokens: int, batch_size: int = 8) -> list[str]:
    from chatlm.data.collate import prompt_ids_for_generation
    from chatlm.infer.generation import generate_answers

    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = prompt_ids_for_generation(tokenizer, chunk, fmt, max_seq_len)
        answers += generate_answers(model, tokenizer, enc["input_ids"], enc["attention_mask"], preset=preset,
                                    max_new_tokens=max_new_tokens)
    return answers


def main(argv: Optional[list[str]] = None) -> None:
    from chatlm.infer.generation import PRESETS
    from chatlm.model.build import is_seq2seq

    p = argparse.ArgumentParser(prog="python -m src predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF export dir (RUN/hf) or a Lightning .ckpt")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the export's, or the checkpoint's data.tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", help="text file (one prompt per line) or parquet/jsonl with a prompt column")
    p.add_argument("--preset", default="greedy", choices=sorted(PRESETS), help="legacy generation preset")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--format", choices=["legacy", "causal", "chat_template"],
                   help="prompt layout (default: the checkpoint's, else legacy for T5, causal for causal LMs)")
    p.add_argument("--max_seq_len", type=int, default=None, help="prompt truncation (default: the checkpoint's, else 512)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    args = p.parse_args(argv)

    model, tok, fmt, max_len = load_for_inference(args.model, args.tokenizer)
    fmt = args.format or fmt or ("legacy" if is_seq2seq(model) else "causal")
    if fmt == "text":
        fmt = "causal"
    prompts = read_prompts(args.prompt, args.prompts_file)
    answers = predict(model, tok, prompts, fmt, args.max_seq_len or max_len or 512, args.preset,
                      args.max_new_tokens, args.batch_size)
    lines = [json.dumps({"prompt": q, "answer": a}, ensure_ascii=False) for q, a in zip(prompts, answers)]
    if args.output:
        from chatlm.util.files import atomic_write_text

        atomic_write_text(args.output, "\n".join(lines) + "\n")
        print(f"chatlm: wrote {len(lines)} answers to {args.output}")
    else:
        print("\n".join(lines))
