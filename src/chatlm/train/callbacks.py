"""Run-directory callbacks: losses.jsonl, summary.json + loss.png, best-model HF export.

They are added by the CLI (chatlm.train.cli) from the ``run`` group of options, so every
``python -m src fit ...`` writes the same run directory::

    <default_root_dir>/checkpoints/   last.ckpt (resumable, every N steps) + best-k by val BLEU-4
    <default_root_dir>/hf/            best model as safetensors + tokenizer (from_pretrained-able)
    <default_root_dir>/losses.jsonl   one row per optimizer step: {"step", "loss", "lr"}
    <default_root_dir>/metrics.csv    Lightning's CSV metrics
    <default_root_dir>/summary.json   the numbers of the run; loss.png the curve
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from chatlm.checkpoint.store import ensure_disk_space, estimate_checkpoint_bytes, load_checkpoint_safely
from chatlm.checkpoint.trainer_io import LastCheckpoint
from chatlm.train.guards import GracefulStop, NonFiniteGuard
from chatlm.train.losslog import LossLogWriter, window_loss
from chatlm.train.resume import ExactResume
from chatlm.util.files import atomic_write_text
from chatlm.util.system import peak_rss_mb


@dataclass
class RunConfig:
    """What a run writes to its directory (``--trainer.default_root_dir``).

    Args:
        checkpoint_every_n_steps: Save a resumable ``checkpoints/last.ckpt`` every N
            optimizer steps (and at every epoch end).
        save_top_k: Keep the k best checkpoints by validation BLEU-4 (val loss when BLEU
            is off).
        export_hf: At the end of fit, export the best model (LoRA merged) to ``hf/``.
        plot_loss: Draw ``loss.png`` from ``losses.jsonl`` at the end of fit.
        debug: Show full tracebacks instead of one-line errors.
        ddp_timeout_s: Seconds a process of a multi-process run (ddp, fsdp) waits in a
            collective for the others before it stops with an error (a dead or hung peer).
    """

    checkpoint_every_n_steps: int = 50
    save_top_k: int = 2
    export_hf: bool = True
    plot_loss: bool = True
    debug: bool = False
    ddp_timeout_s: int = 1800


class LossLog(Callback):
    """Writes ``losses.jsonl``: one row per optimizer step, the same format as every engine.

    ``loss`` is the mean of the micro-batch losses of the accumulation window, each a
    token mean over all devices; ``lr`` is the learning rate the step used. On resume,
    rows past the restored step (written by the killed run) are dropped first, so the
    log continues without duplicated or skipped steps.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._window: list[tuple[float, float]] = []  # (ce * label tokens, label tokens)
        self._lr: Optional[float] = None
        self.tokens = 0
        self.nonpad_tokens = 0
        self.rows: list[dict[str, float]] = []
        self._seen_step = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        lr = optimizer.param_groups[0].get("lr")
        self._lr = float(lr) if lr is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        micro = pl_module.last_micro
        self._window.append((micro["loss"] * micro["label_tokens"], micro["label_tokens"]))
        self.tokens += micro["tokens"]
        self.nonpad_tokens += micro["nonpad_tokens"]
        if trainer.global_step == self._seen_step:
            return  # still inside the accumulation window
        self._seen_step = trainer.global_step
        loss = window_loss(self._window)  # each micro-batch a token mean over all devices
        self._window = []
        if trainer.is_global_zero:
            self.writer.append(trainer.global_step, loss, self._lr)

    def on_train_start(self, trainer, pl_module) -> None:
        # Not on_fit_start: Lightning restores global_step (loops) only after on_fit_start.
        if trainer.is_global_zero:
            self.writer = LossLogWriter(self.path, resume_from_step=trainer.global_step)
            self.rows = self.writer.rows
        self._seen_step = trainer.global_step
        self._window = []


class RunSummary(Callback):
    """Writes ``summary.json`` (and ``loss.png``) at the end of fit."""

    def __init__(self, run_dir: str, loss_log: LossLog, best: Optional[ModelCheckpoint],
                 export_dir: Optional[str], plot: bool = True) -> None:
        self.run_dir = run_dir
        self.loss_log = loss_log
        self.best = best
        self.export_dir = export_dir
        self.plot = plot
        self._t0 = 0.0
        self._train_time = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._train_time = time.perf_counter() - self._t0

    def on_fit_end(self, trainer, pl_module) -> None:
        rss = torch.tensor(peak_rss_mb(), device=pl_module.device)
        if trainer.world_size > 1:
            rss = trainer.strategy.reduce(rss, reduce_op="max")
        tokens = torch.tensor([self.loss_log.tokens, self.loss_log.nonpad_tokens],
                              dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        if not trainer.is_global_zero:
            return
        rows = self.loss_log.rows
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}
        secs = max(self._train_time, 1e-9)
        best = self.best.best_model_path if self.best is not None else ""
        summary: dict[str, Any] = {
            "steps": trainer.global_step,
            "train_loss_first": rows[0]["loss"] if rows else None,
            "train_loss_last": rows[-1]["loss"] if rows else None,
            "val_loss": metrics.get("val_loss"),
            "val_bleu4": metrics.get("val_bleu4"),
            "tokens_per_s": float(tokens[0]) / secs,
            "nonpad_tokens_per_s": float(tokens[1]) / secs,
            "train_seconds": self._train_time,
            "peak_rss_mb": float(rss),
            "parameters": pl_module.param_counts,
            "best_checkpoint": best or None,
            "last_checkpoint": os.path.join(self.run_dir, "checkpoints", "last.ckpt"),
            "hf_export_dir": self.export_dir if self.export_dir and os.path.isdir(self.export_dir) else None,
            "losses": os.path.join(self.run_dir, "losses.jsonl"),
        }
        atomic_write_text(os.path.join(self.run_dir, "summary.json"),
                          json.dumps(summary, indent=2) + "\n")
        if self.plot and rows:
            plot_losses(rows, os.path.join(self.run_dir, "loss.png"))
        print(f"chatlm: run written to {os.path.abspath(self.run_dir)} "
              f"(summary.json, losses.jsonl, checkpoints/"
              f"{', hf/' if summary['hf_export_dir'] else ''})", flush=True)


def plot_losses(rows: list[dict], path: str) -> None:
    """Train loss per optimizer step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class HFExport(Callback):
    """At the end of fit, exports the best checkpoint's weights (else the current ones)
    as a Hugging Face directory with the tokenizer: loads with plain from_pretrained."""

    def __init__(self, out_dir: str, best: Optional[ModelCheckpoint]) -> None:
        self.out_dir = out_dir
        self.best = best

    def on_fit_end(self, trainer, pl_module) -> None:
        from chatlm.model.export import save_hf

        path = self.best.best_model_path if self.best is not None else ""
        current = None
        if path and os.path.exists(path):
            current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            ckpt = load_checkpoint_safely(path)
            pl_module.load_state_dict(ckpt["state_dict"])
        if trainer.is_global_zero:
            ensure_disk_space(os.path.dirname(os.path.abspath(self.out_dir)),
                              estimate_checkpoint_bytes(pl_module.hf_model().state_dict()), f"the export {self.out_dir}")
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            save_hf(pl_module.hf_model(), tokenizer, self.out_dir)
        if current is not None:
            pl_module.load_state_dict(current)
        trainer.strategy.barrier("chatlm_hf_export")


def run_callbacks(cfg: RunConfig, run_dir: str, has_validation: bool,
                  bleu_on: bool) -> list[Callback]:
    """The callbacks every fit gets, all writing under ``run_dir``."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    last = LastCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True,
                          every_n_train_steps=cfg.checkpoint_every_n_steps or None,
                          save_on_train_epoch_end=True)
    callbacks: list[Callback] = [last]
    best = None
    if has_validation and cfg.save_top_k != 0:
        monitor, mode = ("val_bleu4", "max") if bleu_on else ("val_loss", "min")
        best = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode,
                               save_top_k=cfg.save_top_k, save_last=False,
                               filename="best-step{step}-" + monitor.split("_")[1] + "{" + monitor + ":.4f}",
                               auto_insert_metric_name=False)
        callbacks.append(best)
    loss_log = LossLog(os.path.join(run_dir, "losses.jsonl"))
    export_dir = os.path.join(run_dir, "hf") if cfg.export_hf else None
    callbacks.append(loss_log)
    if export_dir:
        callbacks.append(HFExport(export_dir, best))
    callbacks.append(RunSummary(run_dir, loss_log, best, export_dir, plot=cfg.plot_loss))
    return callbacks


def reliability_callbacks() -> list[Callback]:
    """The callbacks of every fit (after the loss log, so a step's row is written before its checkpoint)."""
    return [ExactResume(), NonFiniteGuard(), GracefulStop()]
