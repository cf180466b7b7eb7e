"""python -m src fit --config configs/demo.yaml   (run from the repository root)

A thin entry point: chatlm.commands picks the command (also the `chatlm` console script).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # works before `pip install -e .` too

from chatlm.commands import main  # noqa: E402

if __name__ == "__main__":
    main()
