"""``fit`` / ``validate`` / ``test``: the LightningCLI of the main path.

    chatlm fit --config configs/demo.yaml          # train
    chatlm validate|test --config X.yaml --ckpt_path PATH

The other commands are listed by ``chatlm --help`` (:mod:`chatlm.commands`). Every error a
user can cause (bad file, column, key, value) ends in one line and exit code 2; set
``CHATLM_DEBUG=1`` or ``--run.debug true`` for the full traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional

from jsonargparse import set_loader
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from chatlm.checkpoint.trainer_io import checkpoint_io_plugins
from chatlm.data import ChatDataModule
from chatlm.errors import user_errors
from chatlm.model.config import nest_model_args, nest_model_flags
from chatlm.train.callbacks import RunConfig, reliability_callbacks, run_callbacks
from chatlm.train.distributed import strategy_with_timeout
from chatlm.train.module import ChatLM


#: jsonargparse parser mode of chatlm: YAML whose ``model`` section may use the flat names of
#: earlier releases (``d_model``, ``lr``, ``lora_r``...), moved into their groups on load.
PARSER_MODE = "chatlm_yaml"


def nest_config(obj: Any) -> Any:
    """A loaded config (top level or under a subcommand) with its ``model`` section nested."""
    if isinstance(obj, dict):
        if isinstance(obj.get("model"), dict):
            obj["model"] = nest_model_args(obj["model"])
        for sub in ("fit", "validate", "test"):
            if isinstance(obj.get(sub), dict):
                nest_config(obj[sub])
    return obj


def _load_yaml(text: str) -> Any:
    import yaml

    return nest_config(yaml.safe_load(text))


set_loader(PARSER_MODE, _load_yaml)


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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit / validate / test (``predict`` is chatlm's own command: chatlm.infer.predict)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate", "test")}

    def parse_arguments(self, parser, args) -> None:
        """Flat model flags of earlier releases (``--model.lr``) become their group's (``--model.optim.lr``)."""
        super().parse_arguments(parser, nest_model_flags(list(sys.argv[1:] if args is None else args)))

    def _parse_ckpt_path(self) -> None:
        """The model options saved in ``--ckpt_path`` win over the config, as in Lightning; the file
        is read safely (memory-mapped, weights only: corrupt / unsafe -> one line) and the
        hyperparameters of a checkpoint made before the option groups are nested first."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not (ckpt_path and os.path.isfile(ckpt_path)):
            return
        from chatlm.checkpoint.store import load_checkpoint_safely

        hparams = dict(load_checkpoint_safely(ckpt_path, mmap=True).get("hyper_parameters") or {})
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # _instantiator, _class_path
        if hparams:
            self.config = self.parser.parse_object({sub: {"model": nest_model_args(hparams)}}, self.config)

    def before_fit(self) -> None:
        """Check --ckpt_path (safe load, fits the model) before the trainer writes anything."""
        from chatlm.checkpoint.preflight import preflight_checkpoint

        preflight_checkpoint(self.trainer, self.model, self.config[self.subcommand].get("ckpt_path"))

    before_validate = before_test = before_fit

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run_dir = cfg.trainer.get("default_root_dir") or "runs/default"
        cfg.trainer.default_root_dir = run_dir
        extra = []
        if self.subcommand == "fit":
            extra = run_callbacks(cfg.run, run_dir, has_validation=self.datamodule.has_validation,
                                  bleu_on=self.model.evaluation.bleu_max_samples > 0)
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


#: LightningCLI warns when ``args`` is given while sys.argv has arguments: ours are argv (nested).
_ARGS_WARNING = "LightningCLI's args parameter is intended"


class _ConfigOnlyCLI(ChatLMCLI):
    """Parses like ``chatlm fit`` and stops: nothing is instantiated, seeded or run."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: Optional[str]) -> None:
        pass


def _cli_kwargs() -> dict[str, Any]:
    return dict(
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,  # ChatDataModule shards batches itself
        },
        parser_kwargs={"exit_on_error": False, "parser_mode": PARSER_MODE},
    )


def parse_fit_config(args: list[str]) -> dict[str, Any]:
    """The config ``chatlm fit ARGS`` would train with (``model``, ``data``, ``trainer``, ``run``
    sections, every default filled in), parsed by the CLI's own parser without building anything."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ARGS_WARNING)
        cli = _ConfigOnlyCLI(ChatLM, ChatDataModule, args=["fit", *args], **_cli_kwargs())
    return cli.config["fit"].as_dict()


def lightning_main(args: Optional[list[str]]) -> None:
    from chatlm.util.system import tune_malloc

    tune_malloc()  # steady training steps without page faults (docs/performance.md)
    warnings.filterwarnings("ignore", message=_ARGS_WARNING)  # args is argv here
    ChatLMCLI(ChatLM, ChatDataModule, args=args, **_cli_kwargs())


def main(argv: Optional[list[str]] = None) -> None:
    """``fit`` / ``validate`` / ``test``: ``argv`` starts with the subcommand (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with user_errors():
        lightning_main(argv)
