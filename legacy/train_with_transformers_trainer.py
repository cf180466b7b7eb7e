# python legacy/train_with_transformers_trainer.py --model_name_or_path DIR [--flag value ...]
# torchrun --nproc_per_node 2 legacy/train_with_transformers_trainer.py [...]      (CPU: gloo)
# accelerate launch --multi_gpu --num_processes 2 legacy/train_with_transformers_trainer.py [...]   (also on CPU; accelerate 1.x "--cpu --num_processes 2" starts one process)
# python legacy/train_with_transformers_trainer.py [...] --print_lightning_config > run.yaml
"""The legacy Transformers-``Trainer`` training script, brought up to transformers 5.x.

Kept in the top-to-bottom style of the original (``train_with_transformers_trainer.py`` of
the ChatLM-mini-Chinese project): three argument dataclasses parsed by
``HfArgumentParser`` with the original defaults, a ``Trainer``, then save / log / evaluate.
It reads its data through :mod:`chatlm.data` (the same rows, order and batches as the
main path ``python -m src fit``) and writes ``OUTPUT_DIR/losses.jsonl`` in the format of
:mod:`chatlm.train.losslog`, so its loss curve can be compared step by step with the main path
(``tests/test_parity_hf_trainer.py``). To move to the main path, print the equivalent
Lightning config: ``--print_lightning_config`` (``configs/legacy/hf_trainer.yaml`` is the
one for the defaults).

What changed from the original, and why (docs: ``legacy-spec.md`` section 2):

* ``evaluation_strategy`` -> ``eval_strategy`` (renamed in transformers; the old name was
  silently ignored and ``load_best_model_at_end`` then raised). ``--evaluation_strategy``
  is still accepted as an alias.
* ``bf16`` stays the default but is only used where the hardware supports it (a CUDA GPU
  with bf16); elsewhere it falls back to fp32 with a note (transformers refuses bf16 on a
  machine without such a GPU). Without a validation file, or with
  ``--eval_strategy no``, evaluation and ``load_best_model_at_end`` are turned off.
* The tokenizer loads through ``chatlm.data.tokenizer.load_tokenizer`` (``T5Tokenizer`` raises on
  the project's byte-level BPE tokenizer in transformers 5.x).
* Data: ``chatlm.data.sources.load_prompt_response`` reads parquet / JSON lines /
  ``dataset_info.json#NAME`` with either ``prompt``/``response`` (the project's files) or
  the original's ``input``/``target`` columns. Batches are made on the fly by a
  ``chatlm.data`` collator (``--data_format legacy``, the default: characters truncated to
  ``max_seq_length - 5`` + ``"[EOS]"``, as the main path and ``train_low_mem.py``) or, with
  ``--data_format original``, the original layout: token truncation to ``max_seq_length``,
  no ``[EOS]``, ``DataCollatorForSeq2Seq(label_pad_token_id=-100, pad_to_multiple_of=8 when
  bf16)``. ``preprocessing_num_workers`` is accepted but unused (nothing is pre-tokenized).
* Batch order: rows come in the shared order of ``chatlm.data.sampling.ShardedBatchSampler``
  (a function of ``seed``/``data_seed`` and the epoch; N processes at batch b see exactly the
  rows of 1 process at batch N*b), not the Trainer's ``RandomSampler``. The DataLoader is
  deliberately *not* passed through ``accelerator.prepare``: with several processes that
  would wrap the batch sampler in accelerate's ``BatchSamplerShard`` and shard the
  already-sharded batches a second time (the batch logs of the 2-process test check it).
  Evaluation reads the rows in file order and *is* prepared by accelerate: its loop gathers
  equal-size batches from every process, which accelerate's ``even_batches`` padding (and
  ``gather_for_metrics`` de-duplication) provides, so each row counts exactly once.
* Launchers: ``python`` (one process, or DataParallel over the visible GPUs), ``torchrun``
  and ``accelerate launch --multi_gpu --num_processes N`` (several processes; on CPU with
  gloo). ``accelerate launch --cpu --num_processes N`` starts ONE process: accelerate
  starts several CPU processes only through ``mpirun`` with a hostfile.
* ``Trainer(tokenizer=...)`` -> ``processing_class=...``.
* ``compute_metrics``: T5 returns a tuple (LM logits, encoder states); the token accuracy is
  computed on its first element. ``preprocess_logits_for_metrics`` reduces the logits to
  their argmax during evaluation, so the full logits are never accumulated in memory.
* Loss normalization (``--loss_normalization``): transformers 5.x passes
  ``num_items_in_batch`` to any model whose ``forward`` takes ``**kwargs`` and then neither
  divides by the accumulation steps nor lets the model average; T5 takes ``**kwargs`` but
  ignores ``num_items_in_batch`` and returns its own token mean, so the stock Trainer trains
  T5 on ``accumulation x processes x`` (mean of the per-process micro-batch means)
  (``--loss_normalization stock`` keeps that). The default ``window_tokens`` implements what
  the Trainer means to do: every label token of the accumulation window, on every
  process, weighs the same (the main path's ``--model.loss_normalization window_tokens``).
  ``micro_batch`` is the pre-4.46 Trainer (the original's): the mean of the micro-batch
  means (the main path's default).
* New, for tests and migration: ``--init_from_scratch`` (or an empty
  ``--model_name_or_path``) builds a fresh T5 from the size flags with
  ``chatlm.model.build.build_model`` after ``transformers.set_seed(seed)`` (the main path's
  ``seed_everything(seed)`` + the same builder: identical initial weights);
  ``OUTPUT_DIR/losses.jsonl``; ``--print_lightning_config``; ``--batch_log_file``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "src"))  # chatlm without `pip install -e .`

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from transformers import (  # noqa: E402
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

LossNormalization = Literal["window_tokens", "micro_batch", "stock"]
DataFormat = Literal["legacy", "original"]


# ----------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str = field(
        default="./model_save/ChatLM-mini-Chinese/",
        metadata={"help": "Hugging Face model directory to start from (or a legacy state-dict "
                          "file). Empty: build a new T5 from the size flags below."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory; None: the model directory."})
    init_from_scratch: bool = field(
        default=False,
        metadata={"help": "New (not in the original): build a fresh T5 from --d_model etc. after "
                          "set_seed(seed) instead of loading --model_name_or_path."})
    d_model: int = field(default=768, metadata={"help": "New T5 only: hidden width."})
    d_ff: int = field(default=3072, metadata={"help": "New T5 only: feed-forward width."})
    num_layers: int = field(default=10, metadata={"help": "New T5 only: encoder layers."})
    num_decoder_layers: int = field(default=10, metadata={"help": "New T5 only: decoder layers."})
    num_heads: int = field(default=12, metadata={"help": "New T5 only: attention heads."})
    d_kv: int = field(default=64, metadata={"help": "New T5 only: width of one head."})
    dropout: float = field(default=0.1, metadata={"help": "New T5 only: dropout rate."})

    @property
    def from_scratch(self) -> bool:
        return self.init_from_scratch or not self.model_name_or_path


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    train_file: str = field(
        default="./data/my_train_dataset.parquet",
        metadata={"help": "Training pairs: parquet / JSON lines with prompt/response (or "
                          "input/target) columns, or DIR/dataset_info.json#NAME."})
    validation_file: Optional[str] = field(
        default="./data/my_valid_dataset.parquet",
        metadata={"help": "Validation pairs; empty: no evaluation."})
    max_seq_length: int = field(
        default=512, metadata={"help": "legacy: characters kept per text (minus 5 for [EOS]); "
                                       "original: tokens kept per text."})
    preprocessing_num_workers: Optional[int] = field(
        default=4, metadata={"help": "Accepted for compatibility; unused (tokenized per batch)."})
    data_format: DataFormat = field(
        default="legacy",
        metadata={"help": "legacy: chatlm's Seq2SeqCollator (char truncation + [EOS]), as the main "
                          "path; original: the original script's layout (token truncation, no "
                          "[EOS], DataCollatorForSeq2Seq, pad to a multiple of 8 with bf16)."})


@dataclass
class CustomTrainingArguments(TrainingArguments):
    """TrainingArguments with the original script's defaults (and a few new options)."""

    output_dir: Optional[str] = field(default="./model_save/llama_factory_output")
    num_train_epochs: float = field(default=5)
    per_device_train_batch_size: int = field(default=16)
    per_device_eval_batch_size: int = field(default=32)
    gradient_accumulation_steps: int = field(default=8)
    learning_rate: float = field(default=1e-4)
    optim: str = field(default="adafactor")
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=1024)
    bf16: bool = field(default=True, metadata={"help": "bf16 mixed precision where supported "
                                                       "(a CUDA GPU with bf16), else fp32."})
    gradient_checkpointing: bool = field(default=True)
    max_grad_norm: float = field(default=1.0)
    logging_steps: float = field(default=50)
    save_steps: float = field(default=5000)
    save_total_limit: Optional[int] = field(default=8)
    eval_strategy: str = field(default="steps")
    eval_steps: Optional[float] = field(default=5000)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: Optional[str] = field(default="eval_loss")
    ddp_timeout: int = field(default=1800)
    dataloader_num_workers: int = field(default=0)
    dataloader_pin_memory: bool = field(default=False)
    # --- not in TrainingArguments -------------------------------------------------------
    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "Old name of --eval_strategy (transformers < 4.46)."})
    loss_normalization: LossNormalization = field(
        default="window_tokens",
        metadata={"help": "window_tokens: every label token of the accumulation window (all "
                          "processes) weighs the same, what the Trainer intends (main path "
                          "--model.loss_normalization window_tokens); micro_batch: mean of the "
                          "micro-batch means (pre-4.46 Trainer, main path default); stock: "
                          "transformers 5.x as is, which on T5 scales the loss by accumulation "
                          "x processes."})
    print_lightning_config: bool = field(
        default=False, metadata={"help": "Print the equivalent `python -m src fit` YAML for this "
                                         "command line and exit (nothing is trained)."})
    batch_log_file: Optional[str] = field(
        default=None, metadata={"help": "Debugging: append the row indices of every training "
                                        "batch to this JSONL file (rank r > 0: FILE.rank{r})."})

    def __post_init__(self):
        notes = []
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if str(self.eval_strategy) == "no" and self.load_best_model_at_end:
            self.load_best_model_at_end = False
            notes.append("eval_strategy no: load_best_model_at_end turned off")
        if self.bf16 and not _bf16_supported(self.use_cpu):
            self.bf16 = False
            notes.append("bf16 is not supported here (needs a CUDA GPU with bf16): training in fp32")
        super().__post_init__()
        self._notes = notes


def _bf16_supported(use_cpu: bool) -> bool:
    return (not use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _note(message: str) -> None:
    print(f"[train_with_transformers_trainer] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
class _RecordingBatchSampler(Sampler[list[int]]):
    """Passes a batch sampler through and appends every batch's row indices to a JSONL file."""

    def __init__(self, inner, path: str) -> None:
        self.inner = inner
        self.path = path

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": int(self.inner.epoch), "rows": list(map(int, batch))}) + "\n")
            yield batch


def make_collator(tokenizer, data_args: DataArguments, bf16: bool):
    """The collator of --data_format (both give int64 input_ids, attention_mask, labels)."""
    from chatlm.data import collate

    if data_args.data_format == "legacy":
        return collate.Seq2SeqCollator(tokenizer, data_args.max_seq_length)
    if hasattr(collate, "OriginalSeq2SeqCollator"):  # if chatlm.data grows one, prefer it
        return collate.OriginalSeq2SeqCollator(tokenizer, data_args.max_seq_length,
                                               pad_to_multiple_of=8 if bf16 else None)
    return _OriginalCollator(tokenizer, data_args.max_seq_length, pad_to_multiple_of=8 if bf16 else None)


class _OriginalCollator:
    """The original script's layout: what its ``datasets.map`` tokenization followed by
    ``DataCollatorForSeq2Seq`` produced, done per batch (prompt -> input_ids, response ->
    labels, each truncated to ``max_length`` tokens, no ``[EOS]`` text appended)."""

    def __init__(self, tokenizer, max_length: int, pad_to_multiple_of: Optional[int]) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100,
                                            pad_to_multiple_of=pad_to_multiple_of,
                                            return_tensors="pt")

    def __call__(self, rows):
        enc = self.tokenizer([r["prompt"] for r in rows], max_length=self.max_length,
                             truncation=True, return_token_type_ids=False)
        lab = self.tokenizer([r["response"] for r in rows], max_length=self.max_length,
                             truncation=True, return_token_type_ids=False)
        features = [{"input_ids": i, "attention_mask": m, "labels": t}
                    for i, m, t in zip(enc["input_ids"], enc["attention_mask"], lab["input_ids"])]
        batch = self.inner(features)
        return {k: batch[k].long() for k in ("input_ids", "attention_mask", "labels")}


# ----------------------------------------------------------------------------- trainer
class LegacySeq2SeqTrainer(Trainer):
    """``Trainer`` reading batches in chatlm's shared order and computing the loss itself.

    Args (besides Trainer's):
        batch_seed: Seed of the batch order (``data_seed``, else ``seed``).
        loss_normalization: See ``--loss_normalization``.
        batch_log_file: See ``--batch_log_file``.
    """

    def __init__(self, *args, batch_seed: int = 42, loss_normalization: str = "window_tokens",
                 batch_log_file: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_seed = batch_seed
        self.loss_normalization = loss_normalization
        self.batch_log_file = batch_log_file
        self.window: list[tuple[float, float]] = []  # (CE token mean, label tokens) per micro-batch
        if loss_normalization != "stock":
            # Always get num_items_in_batch (the window's label tokens, summed over processes)
            # and return the final loss from compute_loss (no extra division by accumulation).
            self.model_accepts_loss_kwargs = True

    # -- data: the shared order, not re-sharded by accelerate ---------------------------
    def get_train_dataloader(self) -> DataLoader:
        from chatlm.data.sampling import ShardedBatchSampler

        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        # _train_batch_size = per-device batch x GPUs under DataParallel (one process).
        sampler = ShardedBatchSampler(len(self.train_dataset), self._train_batch_size,
                                      seed=self.batch_seed, shuffle=True,
                                      num_replicas=self.args.world_size, rank=self.args.process_index)
        if self.batch_log_file:
            path = self.batch_log_file
            if self.args.process_index > 0:
                path = f"{path}.rank{self.args.process_index}"
            sampler = _RecordingBatchSampler(sampler, path)
        # Not accelerator.prepare()d: it would wrap batch_sampler in BatchSamplerShard and
        # shard the per-rank batches again. The Trainer moves each batch to the device.
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)

    def _eval_loader(self, dataset) -> DataLoader:
        """Rows in file order, in batches of eval_batch_size, shared out by accelerate.

        Unlike training, evaluation goes through ``accelerator.prepare``: the Trainer's
        evaluation loop gathers every batch's losses from all processes, which needs batches of
        the same size on every process; accelerate's ``even_batches`` pads the last round and
        ``gather_for_metrics`` drops the padding again, so each row counts exactly once.
        """
        from chatlm.data.sampling import ShardedBatchSampler

        sampler = ShardedBatchSampler(len(dataset), self.args.eval_batch_size, seed=self.batch_seed,
                                      shuffle=False)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        return self._eval_loader(dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._eval_loader(test_dataset)

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        if self.loss_normalization == "stock":
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            ce = outputs["loss"]
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"])
            ce = outputs["loss"]
            if ce.dim() > 0:  # DataParallel: one loss per GPU
                ce = ce.mean()
            loss = ce
            if training:
                if self.loss_normalization == "window_tokens" and num_items_in_batch is not None:
                    ntok = (inputs["labels"] != -100).sum()
                    loss = ce * ntok / num_items_in_batch
                    if self.args.average_tokens_across_devices and self.args.world_size > 1:
                        loss = loss * self.args.world_size  # DDP averages gradients over processes
                else:
                    loss = ce / self.current_gradient_accumulation_steps
        if training:
            ce_mean = ce.detach().float().mean()
            self.window.append((float(ce_mean), float((inputs["labels"] != -100).sum())))
        return (loss, outputs) if return_outputs else loss


class SetEpochCallback(TrainerCallback):
    """Selects the epoch of the shared batch order at the start of each epoch."""

    def __init__(self, trainer: LegacySeq2SeqTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = train_dataloader if train_dataloader is not None else self.trainer.callback_handler.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            # state.epoch is the fraction of epochs done: 0.0, 1.0, ... (or e.g. 2.5 on resume)
            sampler.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-9)))


class LossLogCallback(TrainerCallback):
    """Writes ``OUTPUT_DIR/losses.jsonl`` (main process): one row per optimizer step.

    ``loss`` = mean over the window's micro-batches of each micro-batch's CE token mean over
    all processes; ``lr`` = the learning rate that optimizer step used. Same format and
    meaning as the main path's ``chatlm.train.callbacks.LossLog``.
    """

    def __init__(self, trainer: LegacySeq2SeqTrainer) -> None:
        self.trainer = trainer
        self.writer = None
        self.lr: Optional[float] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.window = []
        if state.is_world_process_zero:
            from chatlm.train.losslog import LossLogWriter

            os.makedirs(args.output_dir, exist_ok=True)
            self.writer = LossLogWriter(args.output_dir, resume_from_step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        optimizer = optimizer or self.trainer.optimizer
        lr = optimizer.param_groups[0].get("lr")
        self.lr = None if lr is None else float(lr)

    def on_step_end(self, args, state, control, **kwargs):
        window, self.trainer.window = self.trainer.window, []
        stats = torch.tensor([[ce * n, n] for ce, n in window], dtype=torch.float64)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            stats = stats.to(device)
            torch.distributed.all_reduce(stats)
            stats = stats.cpu()
        loss = float((stats[:, 0] / stats[:, 1].clamp(min=1)).mean()) if len(stats) else float("nan")
        if self.writer is not None:
            self.writer.append(state.global_step, loss, self.lr)


# ----------------------------------------------------------------------------- metrics
def preprocess_logits_for_metrics(logits, labels):
    """Keep only the argmax ids of the LM logits (T5 returns (logits, encoder states, ...))."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred) -> dict[str, float]:
    """Token accuracy of argmax(logits) over the label positions that are not -100."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(preds, (tuple, list)):  # T5: (logits, encoder_last_hidden_state, ...)
        preds = preds[0]
    preds = np.asarray(preds)
    if preds.ndim == 3:  # logits, not yet reduced
        preds = preds.argmax(-1)
    labels = np.asarray(labels)
    width = min(preds.shape[-1], labels.shape[-1])
    preds, labels = preds[..., :width], labels[..., :width]
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}


# ----------------------------------------------------------------------------- migration
_OPTIMIZERS = {"adafactor": "adafactor", "adamw_torch": "adamw", "adamw_torch_fused": "adamw",
               "adamw_hf": "adamw", "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit",
               "paged_adamw_8bit": "paged_adamw8bit"}
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
               "constant_with_warmup": "constant"}


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def lightning_config(model_args: ModelArguments, data_args: DataArguments,
                     args: CustomTrainingArguments) -> dict[str, Any]:
    """The ``python -m src fit`` config equivalent to this script's arguments."""
    from chatlm.model.config import nest_model_args

    optim = str(_value(args.optim))
    scheduler = str(_value(args.lr_scheduler_type))
    if optim not in _OPTIMIZERS:
        raise SystemExit(f"--optim {optim}: no main-path equivalent (supported: {', '.join(_OPTIMIZERS)})")
    if scheduler not in _SCHEDULERS:
        raise SystemExit(f"--lr_scheduler_type {scheduler}: no main-path equivalent "
                         f"(supported: {', '.join(_SCHEDULERS)})")
    acc = args.gradient_accumulation_steps
    max_steps = args.max_steps if args.max_steps and args.max_steps > 0 else -1

    def steps(value: Optional[float], what: str) -> Optional[int]:
        """An HF step count (a float < 1 is a ratio of the total steps) as an int."""
        if value is None:
            return None
        if value >= 1 or value == 0:
            return int(value)
        if max_steps < 0:
            raise SystemExit(f"--{what} {value} is a ratio of the total steps: give --max_steps "
                             "or an integer step count to print a Lightning config")
        return math.ceil(value * max_steps)

    warmup = steps(args.warmup_steps, "warmup_steps") or 0
    if not warmup and getattr(args, "warmup_ratio", None):
        warmup = steps(args.warmup_ratio, "warmup_ratio")
    if scheduler == "constant":
        warmup = 0

    trainer: dict[str, Any] = {"default_root_dir": args.output_dir}
    if max_steps > 0:
        trainer.update(max_steps=max_steps, max_epochs=-1)
    else:
        trainer.update(max_epochs=int(math.ceil(args.num_train_epochs)))
    trainer["accumulate_grad_batches"] = acc
    trainer["gradient_clip_val"] = args.max_grad_norm if args.max_grad_norm > 0 else None
    trainer["precision"] = None if args.bf16 or _requested_bf16(args) else ("16-mixed" if args.fp16 else "32-true")
    trainer["log_every_n_steps"] = max(1, steps(args.logging_steps, "logging_steps") or 1)
    has_val = bool(data_args.validation_file) and str(_value(args.eval_strategy)) != "no"
    if not has_val:
        trainer["limit_val_batches"] = 0
    elif str(_value(args.eval_strategy)) == "steps":
        eval_steps = steps(args.eval_steps if args.eval_steps is not None else args.logging_steps, "eval_steps")
        trainer["val_check_interval"] = eval_steps * acc  # Lightning counts batches, HF optimizer steps
        trainer["check_val_every_n_epoch"] = None

    model: dict[str, Any] = {"arch": "t5"}
    if model_args.from_scratch:
        model.update(pretrained=None, d_model=model_args.d_model, d_ff=model_args.d_ff,
                     num_layers=model_args.num_layers, num_decoder_layers=model_args.num_decoder_layers,
                     num_heads=model_args.num_heads, d_kv=model_args.d_kv, dropout=model_args.dropout)
    else:
        model["pretrained"] = model_args.model_name_or_path
    model.update(optimizer=_OPTIMIZERS[optim], lr=args.learning_rate, weight_decay=args.weight_decay)
    if _OPTIMIZERS[optim] != "adafactor":
        model["betas"] = [args.adam_beta1, args.adam_beta2]
    model.update(scheduler=_SCHEDULERS[scheduler], warmup_steps=warmup,
                 gradient_checkpointing=bool(args.gradient_checkpointing),
                 loss_normalization="window_tokens" if args.loss_normalization == "window_tokens" else "micro_batch",
                 bleu_max_samples=0)

    tokenizer = model_args.tokenizer_name_or_path or model_args.model_name_or_path or None
    data: dict[str, Any] = {
        "train_file": data_args.train_file,
        "val_file": data_args.validation_file or None,
        "tokenizer": tokenizer,
        "format": "legacy",
        "max_seq_len": data_args.max_seq_length,
        "batch_size": args.per_device_train_batch_size,
        "eval_batch_size": args.per_device_eval_batch_size,
        "seed": args.data_seed if args.data_seed is not None else args.seed,
        "num_workers": args.dataloader_num_workers,
    }
    save_steps = steps(args.save_steps, "save_steps") if str(_value(args.save_strategy)) == "steps" else 0
    run = {"checkpoint_every_n_steps": save_steps or 0,
           "save_top_k": args.save_total_limit if args.save_total_limit else -1,
           "export_hf": True}
    return {"seed_everything": args.seed, "trainer": trainer, "model": nest_model_args(model), "data": data, "run": run}


def _requested_bf16(args: CustomTrainingArguments) -> bool:
    return any(n.startswith("bf16 is not supported") for n in getattr(args, "_notes", []))


def lightning_yaml(model_args, data_args, args, argv: list[str]) -> str:
    import yaml

    cfg = lightning_config(model_args, data_args, args)
    header = [
        "# python -m src fit --config THIS_FILE.yaml",
        "# Main-path equivalent of: python legacy/train_with_transformers_trainer.py " + shlex.join(argv),
        "# (precision null: bf16-mixed on a GPU that supports it, else 32-true, as --bf16 does;",
        "#  val_check_interval counts batches = eval_steps x accumulation; bleu_max_samples 0:",
        "#  the best checkpoint is chosen by val_loss, as metric_for_best_model eval_loss)",
    ]
    if args.loss_normalization == "stock":
        header.append("# loss_normalization stock has no exact equivalent: micro_batch gives the same "
                      "gradient direction (stock scales it by accumulation x processes)")
    if data_args.data_format == "original":
        header.append("# data_format original has no main-path equivalent: data.format legacy "
                      "(char truncation + [EOS]) is used")
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- main
def print_environment(args: TrainingArguments) -> None:
    world, rank = args.world_size, args.process_index
    gpus = torch.cuda.device_count()
    mode = "DDP" if world > 1 else ("DataParallel" if args.n_gpu > 1 else "single")
    print(f"[rank {rank}] torch {torch.__version__}, transformers {transformers.__version__}, "
          f"CUDA {torch.version.cuda if torch.cuda.is_available() else 'unavailable'}, GPUs {gpus}, "
          f"rank {rank} / world size {world}, mode {mode}, device {args.device}", flush=True)


def build_model(model_args: ModelArguments, tokenizer, seed: int):
    """Load --model_name_or_path, or build a fresh T5 after set_seed(seed) (as the main path)."""
    from chatlm.model.build import build_model as chatlm_build_model
    from chatlm.model.config import ModelShape
    from chatlm.model.load import load_model

    if model_args.from_scratch:
        set_seed(seed)
        shape = ModelShape(d_model=model_args.d_model, d_ff=model_args.d_ff, num_layers=model_args.num_layers,
                           num_decoder_layers=model_args.num_decoder_layers, num_heads=model_args.num_heads,
                           d_kv=model_args.d_kv, dropout=model_args.dropout)
        return chatlm_build_model("t5", len(tokenizer), shape, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    return load_model(model_args.model_name_or_path, arch="t5", expected_vocab_size=len(tokenizer))


def parse_arguments(argv: list[str]):
    """``HfArgumentParser`` over the three dataclasses (or one JSON file of their fields).

    Without a validation file, evaluation is turned off *before* ``TrainingArguments``
    validates itself (else ``load_best_model_at_end`` with the default strategies raises).
    """
    import dataclasses

    parser = HfArgumentParser((ModelArguments, DataArguments, CustomTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            values = json.load(f)
    else:
        values = vars(parser.parse_args(argv))

    def pick(cls) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return {k: v for k, v in values.items() if k in names}

    model_args, data_args = ModelArguments(**pick(ModelArguments)), DataArguments(**pick(DataArguments))
    notes = []
    if not data_args.validation_file:
        if str(values.get("evaluation_strategy") or values.get("eval_strategy", "steps")) != "no":
            notes.append("no --validation_file: evaluation and load_best_model_at_end turned off")
        values.update(eval_strategy="no", evaluation_strategy=None, load_best_model_at_end=False)
    training_args = CustomTrainingArguments(**pick(CustomTrainingArguments))
    training_args._notes = notes + training_args._notes
    return model_args, data_args, training_args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_arguments(argv)

    if training_args.print_lightning_config:
        shown = [a for a in argv if a not in ("--print_lightning_config",)]
        sys.stdout.write(lightning_yaml(model_args, data_args, training_args, shown))
        return 0

    for note in training_args._notes:
        if training_args.process_index == 0:
            _note(note)
    print_environment(training_args)

    from chatlm.data.sources import load_prompt_response
    from chatlm.data.tokenizer import load_tokenizer

    tokenizer_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tokenizer_path:
        raise SystemExit("give --tokenizer_name_or_path (or --model_name_or_path)")
    tokenizer = load_tokenizer(tokenizer_path)
    train_dataset = load_prompt_response(data_args.train_file)  # prompt/response or input/target
    eval_dataset = load_prompt_response(data_args.validation_file) if data_args.validation_file else None
    model = build_model(model_args, tokenizer, training_args.seed)  # (re)seeds before a new model

    trainer = LegacySeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=make_collator(tokenizer, data_args, training_args.bf16),
        compute_metrics=compute_metrics if eval_dataset is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if eval_dataset is not None else None,
        batch_seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        loss_normalization=training_args.loss_normalization,
        batch_log_file=training_args.batch_log_file,
    )
    trainer.add_callback(SetEpochCallback(trainer))
    trainer.add_callback(LossLogCallback(trainer))

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

    if eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return 0


if __name__ == "__main__":
    from chatlm.errors import user_errors

    with user_errors():  # a missing file / bad column: one line naming it, exit 2
        sys.exit(main())
