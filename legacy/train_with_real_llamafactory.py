# python legacy/train_with_real_llamafactory.py [--flag value ...]
# llamafactory-cli train llamafactory_config.yaml        (the YAML this script writes; run it once first)
# accelerate launch --cpu --num_processes 2 legacy/train_with_real_llamafactory.py [...]
# torchrun --nproc_per_node 2 legacy/train_with_real_llamafactory.py [...]
# python legacy/train_with_real_llamafactory.py [...] --print_lightning_config > run.yaml
"""The legacy LLaMA-Factory training script, brought up to LLaMA-Factory 0.9.5.

Kept in the top-to-bottom style of the original (``train_with_real_llamafactory.py``): write
``llamafactory_config.yaml`` and ``dataset_info.json``, then call LLaMA-Factory's own
training entry (``llamafactory.train.tuner.run_exp``). Every flag is optional and defaults
to the original's setting; any other ``--key value`` is passed to LLaMA-Factory unchanged
(it validates it), e.g. ``--adam_beta2 0.95`` or ``--save_strategy no``.

Data goes through :mod:`chatlm.data`: ``--train_file`` / ``--validation_file`` are read with
``chatlm.data.sources.load_prompt_response`` (parquet, JSON lines or
``DIR/dataset_info.json#NAME``; ``prompt``/``response`` or ``input``/``target`` columns) and
exported as parquet into ``--dataset_dir`` beside the ``dataset_info.json`` that points
LLaMA-Factory at them. ``OUTPUT_DIR/losses.jsonl`` is written in the format of
:mod:`chatlm.train.losslog` (one row per optimizer step: the mean of the micro-batch CE token
means of the window, each over all processes, and the lr of that step), so the curve can be
compared with the main path (``tests/test_parity_llamafactory.py``).
``--print_lightning_config`` prints the equivalent ``python -m src fit`` YAML
(``configs/legacy/llamafactory_*.yaml`` are those of the defaults).

What changed from the original, and why (``legacy-spec.md`` section 3):

* ``from llmtuner import run_exp`` -> ``from llamafactory.train.tuner import run_exp`` (the
  package was renamed). Still: no package -> an install hint and exit code 1.
* Key names of LLaMA-Factory 0.9.5 / transformers 5: ``evaluation_strategy`` ->
  ``eval_strategy`` (``--evaluation_strategy`` still accepted); ``overwrite_output_dir`` no
  longer exists (transformers 5): the script keeps its meaning (start afresh instead of
  resuming from a ``checkpoint-*`` or refusing a non-empty ``output_dir``) by setting the
  attribute LLaMA-Factory checks, so ``llamafactory-cli train`` on the YAML will resume or
  refuse instead; ``gradient_checkpointing`` -> LLaMA-Factory's own
  ``disable_gradient_checkpointing: false`` (it checkpoints by default); ``deepspeed: none``
  is left out (a path, or absent).
* Evaluation: the original set ``do_eval`` without ``eval_dataset`` (LLaMA-Factory refuses
  that). The validation file now goes to ``eval_dataset: custom_t5_dataset_eval``; without
  one, ``do_eval``, ``eval_strategy`` and ``load_best_model_at_end`` are turned off. The
  eval entry's ``split`` is ``train``: a single parquet file has no ``validation`` split.
* ``dataset_info.json`` columns: the original mapped the prompt role to a column ``input``
  and the response role to ``target``, which the project's files do not have; the exported
  files have ``prompt``/``response`` (``sft``) or ``text`` (``pt``) and the entry says so.
* ``pt`` reads only the prompt role of an alpaca entry (LLaMA-Factory's pretraining
  processor), so the original pretrained on prompts alone. ``--pt_text prompt_response``
  (default) exports ``prompt + "\\n" + response`` as each document; ``--pt_text prompt``
  reproduces the original. A ``.txt`` file or one with a ``text`` column is exported as is.
* bf16 (the original's) only where supported (a CUDA GPU with bf16); elsewhere fp32, and
  without CUDA ``use_cpu: true``. ``report_to: tensorboard`` / ``plot_loss`` fall back to off
  when tensorboard / matplotlib are not installed.
* T5: LLaMA-Factory loads it as a seq2seq model but feeds it decoder-only batches (the same
  ids as encoder input and as labels), so the encoder sees the answer in ``sft`` and ``pt``
  is a copy task. The script warns (it still runs, as the original did).
* Batch order (``--batch_order shared``, the default when run through this script): the
  Trainer's sampler is replaced by the shared order of :mod:`chatlm.data.sampling` (a pure
  function of ``data_seed`` or ``seed`` and the epoch, global batch = per-device batch x
  processes), the order the main path uses; accelerate still shards each global batch over
  the processes, so N processes at batch b read exactly the rows of 1 process at batch N*b.
  ``--batch_order llamafactory`` keeps LLaMA-Factory's own ``RandomSampler`` (what
  ``llamafactory-cli train`` does with the YAML).
* New: ``OUTPUT_DIR/losses.jsonl``, ``--print_lightning_config``, ``--export_only``, the
  path flags (``--train_file``, ``--validation_file``, ``--dataset_dir``,
  ``--config_file``); ``rm`` / ``ppo`` stages are not offered (no main-path counterpart).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "src"))  # chatlm without `pip install -e .`

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml

DATASET = "custom_t5_dataset"
EVAL_DATASET = "custom_t5_dataset_eval"
#: LLaMA-Factory's lora_target "all" on a Llama: every linear layer but the output head.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_EXPORT_VERSION = 1


def _note(message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0:
        print(f"[train_with_real_llamafactory] {message}", file=sys.stderr, flush=True)


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar(text: str) -> Any:
    """A passed-through LLaMA-Factory value, typed as YAML would type it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run LLaMA-Factory with the original script's settings (any other --key value "
                    "is passed to LLaMA-Factory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)  # no prefix guessing:
    # an unknown --key must reach LLaMA-Factory as it is
    a = p.add_argument
    # model / method (the original's llamafactory_config.yaml)
    a("--model_name_or_path", default="./model_save/ChatLM-mini-Chinese/",
      help="Hugging Face model directory (its tokenizer too).")
    a("--stage", default="pt", choices=["pt", "sft"], help="pt: packed pretraining; sft: supervised.")
    a("--finetuning_type", default="full", choices=["full", "lora"])
    a("--lora_rank", type=int, default=8, help="lora: adapter rank (LLaMA-Factory default).")
    a("--lora_alpha", type=int, default=None, help="lora: scaling numerator; None: 2 x rank.")
    a("--lora_dropout", type=float, default=0.0)
    a("--lora_target", default="all", help="lora: comma-separated module names, or all linear layers.")
    a("--template", default="default", help="LLaMA-Factory chat template (sft).")
    a("--cutoff_len", type=int, default=512, help="sft: tokens per example; pt: tokens per packed block.")
    a("--preprocessing_num_workers", type=int, default=4)
    a("--preprocessing_batch_size", type=int, default=1000,
      help="Rows per tokenization batch (pt packs each batch of each worker's shard on its own).")
    # data (new: the original had fixed paths)
    a("--dataset", default=DATASET, help="Name of the training entry in dataset_info.json.")
    a("--train_file", default="./data/my_train_dataset.parquet",
      help="Training data read by chatlm.data (parquet / jsonl / DIR/dataset_info.json#NAME; .txt for pt).")
    a("--validation_file", default="./data/my_valid_dataset.parquet",
      help="Validation data; empty: no evaluation.")
    a("--dataset_dir", default="./model_save/llamafactory_data",
      help="Where dataset_info.json and the exported parquet files are written.")
    a("--config_file", default="./llamafactory_config.yaml", help="Where the LLaMA-Factory YAML is written.")
    a("--pt_text", default="prompt_response", choices=["prompt_response", "prompt"],
      help="pt documents from prompt/response rows: prompt + newline + response, or the prompt alone "
           "(the original: LLaMA-Factory pt reads the prompt role only).")
    # training (the original's values)
    a("--do_train", type=_bool, default=True)
    a("--do_eval", type=_bool, default=True, help="Turned off without --validation_file.")
    a("--output_dir", default="./model_save/llamafactory_output")
    a("--overwrite_output_dir", type=_bool, default=True,
      help="Start afresh in a non-empty output_dir (false: resume from its last checkpoint).")
    a("--per_device_train_batch_size", type=int, default=16)
    a("--per_device_eval_batch_size", type=int, default=32)
    a("--gradient_accumulation_steps", type=int, default=8)
    a("--learning_rate", type=float, default=1e-4)
    a("--weight_decay", type=float, default=0.0)
    a("--num_train_epochs", type=float, default=5.0)
    a("--max_steps", type=int, default=-1)
    a("--optim", default="adafactor")
    a("--lr_scheduler_type", default="cosine")
    a("--warmup_steps", type=int, default=1024)
    a("--max_grad_norm", type=float, default=1.0)
    a("--bf16", type=_bool, default=True, help="bf16 mixed precision where supported, else fp32.")
    a("--use_cpu", type=_bool, default=None, help="None: true when CUDA is not available.")
    a("--gradient_checkpointing", type=_bool, default=True,
      help="LLaMA-Factory's own (disable_gradient_checkpointing: false).")
    a("--logging_steps", type=int, default=50)
    a("--save_strategy", default="steps")
    a("--save_steps", type=int, default=5000)
    a("--save_total_limit", type=int, default=8)
    a("--eval_strategy", "--evaluation_strategy", dest="eval_strategy", default="steps")
    a("--eval_steps", type=int, default=5000)
    a("--load_best_model_at_end", type=_bool, default=True)
    a("--metric_for_best_model", default="eval_loss")
    a("--ddp_timeout", type=int, default=1800)
    a("--dataloader_num_workers", type=int, default=0)
    a("--dataloader_pin_memory", type=_bool, default=False)
    a("--report_to", default="tensorboard")
    a("--plot_loss", type=_bool, default=True)
    a("--seed", type=int, default=42)
    a("--data_seed", type=int, default=None, help="Seed of the batch order; None: --seed.")
    # new
    a("--batch_order", default="shared", choices=["shared", "llamafactory"],
      help="shared: chatlm's (seed, epoch) order, sharded over processes (as the main path); "
           "llamafactory: the Trainer's own RandomSampler.")
    a("--export_only", action="store_true",
      help="Write the exported data, dataset_info.json and the YAML, then stop (for llamafactory-cli).")
    a("--print_lightning_config", action="store_true",
      help="Print the equivalent `python -m src fit` YAML and exit (nothing is written or trained).")
    return p


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(known arguments, extra LLaMA-Factory keys from every other ``--key value`` / ``--key=value``)."""
    args, rest = build_parser().parse_known_args(argv)
    extra: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or len(item) <= 2:
            raise SystemExit(f"unexpected argument {item!r} (LLaMA-Factory keys are passed as --key value)")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 1
            else:
                value = "true"
        extra[key.replace("-", "_")] = _scalar(value)
        i += 1
    return args, extra


def _bf16_supported(use_cpu: bool) -> bool:
    import torch

    return (not use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- config files
def llamafactory_config(args: argparse.Namespace, extra: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The LLaMA-Factory training config (original values, 0.9.5 key names) and notes."""
    import torch

    notes = []
    use_cpu = (not torch.cuda.is_available()) if args.use_cpu is None else args.use_cpu
    bf16 = args.bf16 and _bf16_supported(use_cpu)
    if args.bf16 and not bf16:
        notes.append("bf16 is not supported here (needs a CUDA GPU with bf16): training in fp32")
    do_eval = args.do_eval and bool(args.validation_file)
    eval_strategy = args.eval_strategy if do_eval else "no"
    if args.do_eval and not args.validation_file:
        notes.append("no --validation_file: do_eval, eval_strategy and load_best_model_at_end turned off")
    load_best = args.load_best_model_at_end and do_eval and eval_strategy != "no"
    if load_best and str(args.save_strategy) != eval_strategy:
        notes.append(f"save_strategy {args.save_strategy} != eval_strategy {eval_strategy}: "
                     "load_best_model_at_end turned off")
        load_best = False
    report_to = args.report_to
    if report_to == "tensorboard" and not _installed("tensorboard"):
        notes.append("tensorboard is not installed: report_to none")
        report_to = "none"
    plot_loss = args.plot_loss
    if plot_loss and not _installed("matplotlib"):
        notes.append("matplotlib is not installed: plot_loss off")
        plot_loss = False

    cfg: dict[str, Any] = {
        "model_name_or_path": args.model_name_or_path,
        "stage": args.stage,
        "do_train": args.do_train,
        "finetuning_type": args.finetuning_type,
    }
    if args.finetuning_type == "lora":
        cfg.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                   lora_dropout=args.lora_dropout, lora_target=args.lora_target)
    cfg.update({
        "dataset": args.dataset,
        "dataset_dir": os.path.abspath(args.dataset_dir),
        "template": args.template,
        "cutoff_len": args.cutoff_len,
        "preprocessing_num_workers": args.preprocessing_num_workers,
        "preprocessing_batch_size": args.preprocessing_batch_size,
        "output_dir": args.output_dir,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "optim": args.optim,
        "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_steps": args.warmup_steps,
        "max_grad_norm": args.max_grad_norm,
        "bf16": bf16,
        "use_cpu": use_cpu,
        "disable_gradient_checkpointing": not args.gradient_checkpointing,
        "logging_steps": args.logging_steps,
        "save_strategy": args.save_strategy,
        "save_steps": args.save_steps,
        "save_total_limit": args.save_total_limit,
        "do_eval": do_eval,
        "eval_strategy": eval_strategy,
    })
    if do_eval:
        cfg.update(eval_dataset=EVAL_DATASET, eval_steps=args.eval_steps,
                   per_device_eval_batch_size=args.per_device_eval_batch_size)
    cfg.update({
        "load_best_model_at_end": load_best,
        "metric_for_best_model": args.metric_for_best_model,
        "ddp_timeout": args.ddp_timeout,
        "dataloader_num_workers": args.dataloader_num_workers,
        "dataloader_pin_memory": args.dataloader_pin_memory,
        "report_to": report_to,
        "plot_loss": plot_loss,
        "seed": args.seed,
    })
    if args.data_seed is not None:
        cfg["data_seed"] = args.data_seed
    cfg.update(extra)
    return cfg, notes


def dataset_info(args: argparse.Namespace) -> dict[str, Any]:
    """``dataset_info.json``: the exported files, alpaca formatting, their real columns."""
    columns = {"prompt": "text"} if args.stage == "pt" else {"prompt": "prompt", "response": "response"}
    info = {DATASET: {"file_name": f"{DATASET}.{args.stage}.parquet", "formatting": "alpaca",
                      "columns": columns, "split": "train"}}
    if args.validation_file:
        info[EVAL_DATASET] = {"file_name": f"{EVAL_DATASET}.{args.stage}.parquet", "formatting": "alpaca",
                              "columns": columns, "split": "train"}
    if args.dataset != DATASET:
        info[args.dataset] = info.pop(DATASET)
    return info


def config_yaml(cfg: dict[str, Any], config_file: str, argv: list[str]) -> str:
    header = [
        f"# llamafactory-cli train {config_file}",
        "# Written by: python legacy/train_with_real_llamafactory.py " + shlex.join(argv),
        "# (that script exported the data in dataset_dir; overwrite_output_dir is gone in transformers 5:",
        "#  with this YAML alone LLaMA-Factory resumes from output_dir/checkpoint-* or refuses a used",
        "#  output_dir; LLaMA-Factory's own batch order, and no losses.jsonl)",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- data export
def _source_token(path: str, kind: str) -> str:
    from chatlm.data.sources import split_dataset_info_path
    from chatlm.errors import DataError

    file_part, name = split_dataset_info_path(path)
    if not os.path.isfile(file_part):
        raise DataError(f"{file_part}: file not found")
    st = os.stat(file_part)
    key = [_EXPORT_VERSION, os.path.abspath(file_part), name, st.st_size, st.st_mtime_ns, kind]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _is_text_source(path: str) -> bool:
    """A ``.txt`` file, or a parquet / JSON file with a ``text`` column and no prompt pair."""
    from chatlm.data.sources import _source_columns, split_dataset_info_path

    if split_dataset_info_path(path)[1] is not None:
        return False
    if path.lower().endswith(".txt"):
        return True
    try:
        columns = set(_source_columns(path))
    except Exception:  # noqa: BLE001 - load_prompt_response reports the real problem
        return False
    return "text" in columns and not ({"prompt", "response"} <= columns or {"input", "target"} <= columns)


def export_table(path: str, stage: str, pt_text: str):
    """The rows LLaMA-Factory reads, as an Arrow table: prompt/response (sft) or text (pt)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from chatlm.data.sources import load_prompt_response, load_text

    if stage == "pt" and _is_text_source(path):
        return pa.table({"text": load_text(path).data.column("text")})
    table = load_prompt_response(path).data
    prompt, response = table.column("prompt"), table.column("response")
    if stage == "sft":
        return pa.table({"prompt": prompt, "response": response})
    if pt_text == "prompt":
        return pa.table({"text": prompt})
    return pa.table({"text": pc.binary_join_element_wise(prompt, response, "\n")})


def write_inputs(args: argparse.Namespace, cfg: dict[str, Any], argv: list[str]) -> None:
    """Export the data, write dataset_info.json and the YAML: local rank 0 writes, the others wait.

    A marker file names what the export was made from, so an up-to-date export is reused and
    the other ranks of a launch know when rank 0 is done.
    """
    import pyarrow.parquet as pq

    from chatlm.util.files import atomic_write_text

    files = [(args.train_file, dataset_info(args)[args.dataset]["file_name"])]
    if args.validation_file and cfg.get("do_eval"):
        files.append((args.validation_file, f"{EVAL_DATASET}.{args.stage}.parquet"))
    token = hashlib.sha256(json.dumps(
        [_source_token(src, f"{args.stage}/{args.pt_text}") for src, _ in files]
        + [dataset_info(args), cfg, args.config_file]).encode()).hexdigest()[:20]
    marker = os.path.join(args.dataset_dir, ".export_done")

    def marked() -> str | None:
        try:
            with open(marker, encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return None

    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if local_rank != 0:
        deadline = time.time() + 3600
        while time.time() < deadline:
            if marked() == token:
                return
            time.sleep(0.2)
        raise SystemExit(f"rank {local_rank}: timed out waiting for local rank 0 to write {args.dataset_dir}")
    os.makedirs(args.dataset_dir, exist_ok=True)
    if marked() == token and all(os.path.exists(os.path.join(args.dataset_dir, f)) for _, f in files):
        return
    if os.path.exists(marker):
        os.unlink(marker)
    for src, name in files:
        table = export_table(src, args.stage, args.pt_text)
        target = os.path.join(args.dataset_dir, name)
        tmp = target + f".tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, target)
        _note(f"exported {table.num_rows} rows of {src} -> {target}")
    atomic_write_text(os.path.join(args.dataset_dir, "dataset_info.json"),
                      json.dumps(dataset_info(args), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(args.config_file, config_yaml(cfg, args.config_file, argv))
    atomic_write_text(marker, token + "\n")


# ----------------------------------------------------------------------------- model checks
def _model_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def model_type(path: str) -> str | None:
    config = _model_config(path)
    return config.get("model_type") or ("t5" if config.get("is_encoder_decoder") else None)


def warn_if_seq2seq(path: str, stage: str) -> bool:
    """Warn that LLaMA-Factory trains an encoder-decoder model as if it were decoder-only."""
    config = _model_config(path)
    if not (config.get("is_encoder_decoder") or config.get("model_type") == "t5"):
        return False
    what = ("the encoder reads prompt AND answer (input_ids) while the decoder is trained to produce "
            "the answer (labels): it learns to copy the answer from its input" if stage == "sft" else
            "the encoder reads each packed block and the decoder is trained to reproduce it: "
            "pretraining becomes a copy task")
    _note(f"WARNING: {path} is a T5 (encoder-decoder) model. LLaMA-Factory has no seq2seq path for "
          f"stage {stage}: it trains T5 as if it were decoder-only (encoder input and decoder labels are the same sequence), so {what}. The "
          "loss falls but the model will not learn to answer prompts. Train T5 with the main path "
          "(python -m src fit --model.arch t5 --data.format legacy) or legacy/train_low_mem.py.")
    return True


# ----------------------------------------------------------------------------- LLaMA-Factory hooks
class SharedOrderSampler:
    """The rows of :func:`chatlm.data.sampling.epoch_batches` for the epoch set by ``set_epoch``,
    flattened. Global batch = per-device batch x processes: accelerate cuts the flat order into
    per-device batches and gives batch k to process k % N, i.e. each process its slice of every
    global batch, as ``ShardedBatchSampler`` does (a short last global batch is split
    differently: accelerate fills it up from the start of the epoch)."""

    def __init__(self, n: int, global_batch_size: int, seed: int) -> None:
        self.n, self.global_batch_size, self.seed, self.epoch = n, global_batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        from chatlm.data.sampling import epoch_batches

        for batch in epoch_batches(self.n, self.global_batch_size, self.seed, self.epoch, shuffle=True):
            yield from batch

    def __len__(self) -> int:
        return self.n


def use_shared_order() -> None:
    """Make LLaMA-Factory's pt and sft trainers read the shared batch order."""
    from llamafactory.train.pt.trainer import CustomTrainer
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.finetuning_args.disable_shuffling:
            import torch

            return torch.utils.data.SequentialSampler(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SharedOrderSampler(len(dataset), self._train_batch_size * self.args.world_size, seed)

    CustomTrainer._get_train_sampler = _get_train_sampler
    CustomSeq2SeqTrainer._get_train_sampler = _get_train_sampler


def keep_overwrite_output_dir() -> None:
    """``overwrite_output_dir: true`` (gone from transformers 5): set the attribute LLaMA-Factory
    reads, so a non-empty output_dir is trained afresh instead of resumed or refused."""
    from llamafactory.hparams import parser

    parse = parser._parse_train_args

    def _parse_train_args(args=None):
        parsed = parse(args)
        parsed[2].overwrite_output_dir = True  # (model, data, training, finetuning, generating)
        return parsed

    parser._parse_train_args = _parse_train_args


def make_loss_log_callback():
    """A TrainerCallback writing ``OUTPUT_DIR/losses.jsonl`` (main process), one row per step.

    LLaMA-Factory's logged loss is the window's token-weighted loss; ``losses.jsonl`` needs each
    micro-batch's CE token mean. A forward hook on the model recomputes it from the logits and
    labels of every training forward (shifted for a causal model), the window's micro-batches are
    summed over processes, and the row is the mean over the window of sum(CE) / tokens.
    """
    import torch
    import torch.nn.functional as F
    from transformers import TrainerCallback

    class LossLogCallback(TrainerCallback):
        def __init__(self) -> None:
            self.window: list[tuple[float, float]] = []  # (sum of token CE, label tokens) per micro-batch
            self.writer = None
            self.lr: float | None = None
            self.handle = None

        def _hook(self, module, args, kwargs, output):
            labels = kwargs.get("labels")
            if not module.training or labels is None or not torch.is_grad_enabled():
                return
            logits = output["logits"] if isinstance(output, dict) else output[1]
            config = getattr(module, "config", None)
            with torch.no_grad():
                if not getattr(config, "is_encoder_decoder", False):  # causal: position t predicts t+1
                    logits, labels = logits[:, :-1], labels[:, 1:]
                logits = logits.float().reshape(-1, logits.shape[-1])
                labels = labels.reshape(-1).to(logits.device)
                ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                self.window.append((float(ce), float((labels != -100).sum())))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.window = []
            if model is not None and self.handle is None:
                self.handle = model.register_forward_hook(self._hook, with_kwargs=True)
            if state.is_world_process_zero:
                from chatlm.train.losslog import LossLogWriter

                os.makedirs(args.output_dir, exist_ok=True)
                self.writer = LossLogWriter(args.output_dir, resume_from_step=state.global_step)

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                lr = optimizer.param_groups[0].get("lr")
                self.lr = None if lr is None else float(lr)

        def on_step_end(self, args, state, control, **kwargs):
            window, self.window = self.window, []
            stats = torch.tensor(window, dtype=torch.float64).reshape(-1, 2)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                device = (torch.device("cuda", torch.cuda.current_device())
                          if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
                stats = stats.to(device)
                torch.distributed.all_reduce(stats)
                stats = stats.cpu()
            loss = float((stats[:, 0] / stats[:, 1].clamp(min=1)).mean()) if len(stats) else float("nan")
            if self.writer is not None:
                self.writer.append(state.global_step, loss, self.lr)

        def on_train_end(self, args, state, control, **kwargs):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    return LossLogCallback()


# ----------------------------------------------------------------------------- migration
_OPTIMIZERS = {"adafactor": "adafactor", "adamw_torch": "adamw", "adamw_torch_fused": "adamw",
               "adamw_hf": "adamw", "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit",
               "paged_adamw_8bit": "paged_adamw8bit"}
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
               "constant_with_warmup": "constant"}


def lightning_config(args: argparse.Namespace, extra: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The ``python -m src fit`` config reproducing this LLaMA-Factory run, and header notes."""
    from chatlm.model.config import nest_model_args

    cfg, _ = llamafactory_config(args, extra)
    notes = []
    optim, scheduler = str(cfg["optim"]), str(cfg["lr_scheduler_type"])
    if optim not in _OPTIMIZERS:
        raise SystemExit(f"--optim {optim}: no main-path equivalent (supported: {', '.join(_OPTIMIZERS)})")
    if scheduler not in _SCHEDULERS:
        raise SystemExit(f"--lr_scheduler_type {scheduler}: no main-path equivalent "
                         f"(supported: {', '.join(_SCHEDULERS)})")
    acc = cfg["gradient_accumulation_steps"]
    arch_type = model_type(args.model_name_or_path)
    seq2seq = arch_type == "t5"

    trainer: dict[str, Any] = {"default_root_dir": cfg["output_dir"]}
    if cfg["max_steps"] and cfg["max_steps"] > 0:
        trainer.update(max_steps=cfg["max_steps"], max_epochs=-1)
    else:
        trainer["max_epochs"] = math.ceil(cfg["num_train_epochs"])
    trainer["accumulate_grad_batches"] = acc
    trainer["gradient_clip_val"] = cfg["max_grad_norm"] if cfg["max_grad_norm"] > 0 else None
    packing = cfg["stage"] == "pt" and cfg.get("packing", True) is not False and not seq2seq
    if packing and trainer["gradient_clip_val"]:
        # The HF Trainer divides the window's summed CE by its label count *before* the shift
        # (B x L per packed block), the main path by the B x (L-1) tokens actually predicted:
        # its gradients are L/(L-1) times LLaMA-Factory's. AdamW / Adafactor (fixed lr) ignore a
        # constant gradient scale; clipping does not, so the threshold is scaled the same way.
        L = int(cfg["cutoff_len"])
        trainer["gradient_clip_val"] = float(cfg["max_grad_norm"]) * L / (L - 1)
        notes.append(f"gradient_clip_val = max_grad_norm x {L}/{L - 1}: LLaMA-Factory's pt loss is divided by "
                     "all L positions of a block, the main path's by the L-1 predicted ones")
    trainer["precision"] = None if args.bf16 else "32-true"
    trainer["log_every_n_steps"] = max(1, int(cfg["logging_steps"]))
    if not cfg["do_eval"]:
        trainer["limit_val_batches"] = 0
    elif cfg["eval_strategy"] == "steps":
        trainer["val_check_interval"] = int(cfg["eval_steps"]) * acc  # Lightning counts batches
        trainer["check_val_every_n_epoch"] = None

    model: dict[str, Any] = {"arch": "t5" if seq2seq else "llama", "pretrained": cfg["model_name_or_path"]}
    if cfg["finetuning_type"] == "lora":
        target = str(cfg["lora_target"])
        if target == "all":
            if seq2seq:
                modules = ["q", "k", "v", "o", "wi", "wo"]
            elif arch_type not in (None, "llama"):
                modules = None
                notes.append(f"lora_target all on a {arch_type} model: set model.lora_target_modules to "
                             "its linear layers (LLaMA-Factory takes every linear layer but the head)")
            else:
                modules = LLAMA_LINEAR
        else:
            modules = [m.strip() for m in target.split(",") if m.strip()]
        model.update(lora_r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                     lora_target_modules=modules)
    model.update(optimizer=_OPTIMIZERS[optim], lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    if _OPTIMIZERS[optim] != "adafactor":
        model["betas"] = [float(cfg.get("adam_beta1", 0.9)), float(cfg.get("adam_beta2", 0.999))]
    model.update(scheduler=_SCHEDULERS[scheduler], warmup_steps=0 if scheduler == "constant" else cfg["warmup_steps"],
                 gradient_checkpointing=not cfg["disable_gradient_checkpointing"],
                 loss_normalization="window_tokens", bleu_max_samples=0)
    if cfg["weight_decay"]:
        notes.append("weight_decay: the HF Trainer exempts biases and norm weights, the main path decays all")

    data: dict[str, Any] = {}
    if seq2seq:
        notes.append("T5: LLaMA-Factory trains it as decoder-only (the encoder sees the answer); the main "
                     "path trains it as seq2seq (data.format legacy): not the same run")
        data.update(train_file=args.train_file, val_file=args.validation_file or None, format="legacy")
    elif cfg["stage"] == "sft":
        data.update(train_file=args.train_file, val_file=(args.validation_file or None) if cfg["do_eval"] else None,
                    format="llamafactory")
    else:
        exported = os.path.join(args.dataset_dir, f"{DATASET}.pt.parquet")
        data.update(train_file=exported,
                    val_file=os.path.join(args.dataset_dir, f"{EVAL_DATASET}.pt.parquet") if cfg["do_eval"] else None,
                    format="text", text_column="text")
        if packing:
            data.update(packing=True, packing_group_rows=cfg["preprocessing_batch_size"],
                        packing_shards=max(1, int(cfg["preprocessing_num_workers"] or 1)))
        else:
            notes.append("packing false: LLaMA-Factory divides each window's CE by its unshifted label count, "
                         "the main path by the predicted tokens; close, not identical")
        notes.append(f"pt reads the documents this script exported to {args.dataset_dir} "
                     "(run it once, or with --export_only)")
    data.update(tokenizer=cfg["model_name_or_path"], max_seq_len=cfg["cutoff_len"],
                batch_size=cfg["per_device_train_batch_size"],
                eval_batch_size=cfg["per_device_eval_batch_size"],
                seed=cfg["data_seed"] if cfg.get("data_seed") is not None else cfg["seed"],
                num_workers=cfg["dataloader_num_workers"])
    if cfg["template"] != "default" and not seq2seq and cfg["stage"] == "sft":
        raise SystemExit(f"--template {cfg['template']}: the main path reproduces only LLaMA-Factory's "
                         "`default` template (data.format llamafactory)")
    save_steps = int(cfg["save_steps"]) if str(cfg["save_strategy"]) == "steps" else 0
    run = {"checkpoint_every_n_steps": save_steps,
           "save_top_k": cfg["save_total_limit"] if cfg["save_total_limit"] else -1,
           "export_hf": True}
    return {"seed_everything": cfg["seed"], "trainer": trainer, "model": nest_model_args(model), "data": data, "run": run}, notes


def lightning_yaml(args: argparse.Namespace, extra: dict[str, Any], argv: list[str]) -> str:
    cfg, notes = lightning_config(args, extra)
    header = [
        "# python -m src fit --config THIS_FILE.yaml",
        "# Main-path equivalent of: python legacy/train_with_real_llamafactory.py " + shlex.join(argv),
        "# (precision null: bf16-mixed on a GPU that supports it, else 32-true, as bf16 does;",
        "#  loss_normalization window_tokens: every label token of the window weighs the same, as the",
        "#  HF Trainer under LLaMA-Factory; val_check_interval counts batches = eval_steps x accumulation)",
    ] + [f"# NOTE: {n}" for n in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- main
def accelerate_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when accelerate started only this process.

    accelerate 1.x starts several CPU processes only through mpirun (with a hostfile); without
    it, ``--cpu --num_processes 2`` silently runs one process. Its command line is the parent's.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "WORLD_SIZE" in os.environ:
        return 1
    try:
        import psutil

        argv = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no parent to read: one process
        return 1
    if not any(os.path.basename(a).startswith("accelerate") or a.endswith("accelerate_cli.py") for a in argv[:3]):
        return 1
    script = os.path.abspath(sys.argv[0])
    for i, arg in enumerate(argv):
        if os.path.abspath(arg) == script:
            break  # flags after the script are the script's own
        if arg == "--num_processes" and i + 1 < len(argv):
            return max(1, int(argv[i + 1]))
        if arg.startswith("--num_processes="):
            return max(1, int(arg.split("=", 1)[1]))
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_arguments(argv)

    if args.print_lightning_config:
        shown = [a for a in argv if a != "--print_lightning_config"]
        sys.stdout.write(lightning_yaml(args, extra, shown))
        return 0

    n = accelerate_cpu_processes()
    if n > 1:  # start the N processes with torchrun (gloo on CPU), as `--multi_gpu` would on GPUs
        _note(f"accelerate launch --cpu --num_processes {n}: starting {n} CPU processes with torch.distributed.run")
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", str(n), os.path.abspath(sys.argv[0]), *sys.argv[1:]])

    cfg, notes = llamafactory_config(args, extra)
    for note in notes:
        _note(note)
    warn_if_seq2seq(args.model_name_or_path, args.stage)
    from chatlm.errors import DataError

    model = args.model_name_or_path
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        print(f"train_with_real_llamafactory: error: --model_name_or_path {model}: directory not found",
              file=sys.stderr)
        return 2
    try:
        write_inputs(args, cfg, [a for a in argv if a != "--export_only"])
    except DataError as err:  # a missing / unreadable data file: one line, naming it
        hint = " (--validation_file '' trains without evaluation)" if args.validation_file and \
            args.validation_file.split("#")[0] in str(err) else ""
        print(f"train_with_real_llamafactory: error: {err}{hint}", file=sys.stderr)
        return 2
    _note(f"wrote {args.config_file} and {os.path.join(args.dataset_dir, 'dataset_info.json')}")
    if args.export_only:
        return 0

    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as err:
        print(f"LLaMA-Factory is not installed ({err}). Install it with:\n"
              "    pip install 'llamafactory==0.9.5'\n"
              f"then run this script again, or: llamafactory-cli train {args.config_file}", file=sys.stderr)
        return 1

    if args.batch_order == "shared":
        use_shared_order()
    if args.overwrite_output_dir:
        keep_overwrite_output_dir()
    run_exp(dict(cfg), callbacks=[make_loss_log_callback()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
