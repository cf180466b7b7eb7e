"""``python -m src ...`` and the ``chatlm`` console script: pick the command, import only it.

chatlm's own subcommands (tokenizer, predict, bench, plan) start without importing Lightning
(about 12 s on 2 CPU cores); ``fit``/``validate``/``test`` go to :func:`chatlm.cli.main`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

#: chatlm's own subcommands: ``name -> "module:function"`` (the function takes the argv after the name)
OWN_SUBCOMMANDS = {
    "tokenizer": "chatlm.tokenizer:main",
    "predict": "chatlm.predict:main",
    "bench": "chatlm.bench:main",
    "plan": "chatlm.plan:main",
}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``python -m src`` and the ``chatlm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args and args[0] in OWN_SUBCOMMANDS:
        from chatlm.errors import user_errors

        module_name, func = OWN_SUBCOMMANDS[args[0]].split(":")
        with user_errors():
            getattr(importlib.import_module(module_name), func)(args[1:])
        return
    from chatlm.cli import main as cli_main

    cli_main(argv)
