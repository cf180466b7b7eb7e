"""The chatlm command line.

    python -m src fit --config configs/demo.yaml          # train (LightningCLI)
    python -m src validate|test --config X.yaml --ckpt_path PATH
    python -m src predict --model RUN_DIR/hf --prompt "spell 42"
    python -m src tokenizer --train_files A.parquet --vocab_size 1024 --out_dir tok/
    python -m src bench --quick --out_dir bench/          # benchmark every engine
    python -m src plan --config X.yaml --memory 16GB      # memory estimate

``fit``/``validate``/``test`` are Lightning's; the others are chatlm's own. Every error a
user can cause (bad file, column, key, value) ends in one line and exit code 2; set
``CHATLM_DEBUG=1`` or ``--run.debug true`` for the full traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from chatlm.callbacks import RunConfig, run_callbacks
from chatlm.data import ChatDataModule
from chatlm.entry import OWN_SUBCOMMANDS
from chatlm.errors import ChatLMError, fail, user_errors
from chatlm.module import ChatLM
from chatlm.reliability import checkpoint_io_plugins, reliability_callbacks, strategy_with_timeout


def default_precision(accelerator: Optional[str]) -> str:
    """bf16-mixed on a GPU that supports it, else full fp32 (bf16 on CPU is ~300x slower here)."""
    import torch

    on_gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class ChatLMCLI(LightningCLI):
    """LightningCLI with linked arguments, run-directory callbacks and device-aware precision."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        for name in ("vocab_size", "pad_token_id", "eos_token_id"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.get("precision") is None:
            cfg.trainer.precision = default_precision(cfg.trainer.get("accelerator"))
        if cfg.run.debug:
            os.environ["CHATLM_DEBUG"] = "1"
        import torch

        if torch.cuda.is_available():  # TF32 tensor cores for fp32 matmuls (bf16-mixed unaffected)
            torch.set_float32_matmul_precision("high")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads --ckpt_path's hyperparameters here; check the file safely first (one line)."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and os.path.isfile(ckpt_path):
            from chatlm.reliability import load_checkpoint_safely

            load_checkpoint_safely(ckpt_path, mmap=True)  # weights_only; corrupt / unsafe -> CheckpointError
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """Check --ckpt_path (safe load, fits the model) before the trainer writes anything."""
        from chatlm.reliability import preflight_checkpoint

        preflight_checkpoint(self.trainer, self.model, self.config[self.subcommand].get("ckpt_path"))

    before_validate = before_test = before_fit

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run_dir = cfg.trainer.get("default_root_dir") or "runs/default"
        cfg.trainer.default_root_dir = run_dir
        extra = []
        if self.subcommand == "fit":
            extra = run_callbacks(cfg.run, run_dir, has_validation=self.datamodule.has_validation,
                                  bleu_on=self.model.hparams.bleu_max_samples > 0)
            extra += reliability_callbacks()  # RNG state, NaN guard, SIGINT/SIGTERM (after the loss log)
        trainer_cfg = dict(cfg.trainer)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        trainer_cfg["callbacks"] = callbacks + extra
        trainer_cfg["plugins"] = checkpoint_io_plugins(trainer_cfg.get("plugins"))  # atomic, weights-only
        trainer_cfg["strategy"] = strategy_with_timeout(trainer_cfg.get("strategy"), cfg.run.ddp_timeout_s)
        if trainer_cfg.get("logger") in (None, True):
            from lightning.pytorch.loggers import CSVLogger

            trainer_cfg["logger"] = CSVLogger(save_dir=run_dir, name="", version="")
        extra_cb = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer({**trainer_cfg, **kwargs}, extra_cb)


def lightning_main(args: Optional[list[str]]) -> None:
    from chatlm.perf import tune_malloc

    tune_malloc()  # steady training steps without page faults (docs/performance.md)
    ChatLMCLI(
        ChatLM,
        ChatDataModule,
        args=args,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,  # ChatDataModule shards batches itself
        },
        parser_kwargs={"exit_on_error": False},
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -m src`` and the ``chatlm`` console script."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with user_errors():
        if argv and argv[0] in OWN_SUBCOMMANDS:
            module_name, func = OWN_SUBCOMMANDS[argv[0]].split(":")
            import importlib

            getattr(importlib.import_module(module_name), func)(argv[1:])
            return
        lightning_main(None if from_sys else argv)


__all__ = ["ChatLMCLI", "main", "default_precision", "ChatLMError", "fail"]
