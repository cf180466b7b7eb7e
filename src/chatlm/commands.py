"""``chatlm ...`` (the console script) and ``python -m src ...`` (from a checkout): the command table.

Each command imports only what it needs: chatlm's own commands start without importing
Lightning (about 12 s on 2 CPU cores); ``fit`` / ``validate`` / ``test`` go to
:func:`chatlm.train.cli.main` (LightningCLI).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Command:
    """One subcommand: where its ``main(argv)`` lives and one line of help."""

    target: str  # "module:function"; the function takes the argv after the command name
    help: str
    checkout_only: bool = False  # lives outside the installed package (bench/ beside legacy/)


#: Every command, in the order ``chatlm --help`` lists them (the order a run flows).
COMMANDS: dict[str, Command] = {
    "tokenizer": Command("chatlm.data.tokenizer:main", "train a byte-level BPE tokenizer on your files"),
    "fit": Command("chatlm.train.cli:main", "train a model (pretrain, SFT, LoRA) from a YAML config"),
    "validate": Command("chatlm.train.cli:main", "val loss / BLEU-4 of a checkpoint on the validation file"),
    "test": Command("chatlm.train.cli:main", "test loss / BLEU-4 of a checkpoint on the test file"),
    "predict": Command("chatlm.infer.predict:main", "answers from an export, a checkpoint or a hub model"),
    "plan": Command("chatlm.train.plan:main", "peak memory of a config, and settings that fit a budget"),
    "bench": Command("bench.run:main", "benchmark every engine and option (needs a checkout)", checkout_only=True),
}
#: Commands handled by LightningCLI (they take the whole argv, subcommand included).
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: chatlm COMMAND [options]      (python -m src COMMAND ... from a checkout)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "chatlm COMMAND --help shows the options of one command; "
              "chatlm fit --config configs/demo.yaml trains the demo."]
    return "\n".join(lines)


def _checkout_root() -> Optional[str]:
    """The repository root when chatlm runs from a checkout (``src/chatlm``), else None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "bench")) and os.path.isdir(os.path.join(root, "legacy")) else None


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``chatlm`` and ``python -m src``."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = args[0]
    from chatlm.errors import fail, user_errors

    if name not in COMMANDS:
        fail(f"unknown command {name!r}; the commands are: {', '.join(COMMANDS)} (chatlm --help)")
    command = COMMANDS[name]
    with user_errors():
        if command.checkout_only:
            root = _checkout_root()
            if root is None:
                fail(f"'chatlm {name}' runs from a chatlm checkout (it drives the legacy engines in legacy/): "
                     f"clone the repository and run python -m src {name} there")
            if root not in sys.path:
                sys.path.insert(0, root)
        module_name, func = command.target.split(":")
        entry = getattr(importlib.import_module(module_name), func)
        entry(args if name in LIGHTNING_COMMANDS else args[1:])
