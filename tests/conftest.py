"""Shared test setup: offline Hugging Face, ``src/`` importable, small data fixtures.

Fixtures for any test: ``tiny_tokenizer_dir`` / ``tiny_tokenizer`` (the bundled sample
tokenizer), ``sample_rows`` (rows of the bundled task), ``sample_parquet`` (a factory that
writes rows to a parquet file under ``tmp_path``), ``data_cache_dir`` (a per-test Arrow cache
directory) and ``subprocess_env`` (environment for child processes that import chatlm).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from helpers import SRC, write_parquet  # noqa: E402 - helpers puts src/ on sys.path


@pytest.fixture(scope="session", autouse=True)
def _isolated_arrow_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted Arrow files of every test go to a temporary directory, never ~/.cache."""
    if "CHATLM_CACHE_DIR" not in os.environ:
        os.environ["CHATLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("chatlm-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir() -> str:
    """Directory of the bundled sample tokenizer ([PAD]=0, [EOS]=1, vocab 768)."""
    from chatlm.data.sample import sample_tokenizer_dir

    return sample_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: str):
    """The bundled sample tokenizer, loaded once per session."""
    from chatlm.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    """64 rows of the bundled prompt/response task."""
    from chatlm.data.sample import generate_rows

    return generate_rows(64, seed=0)


@pytest.fixture
def sample_parquet(tmp_path: Path, sample_rows: list[dict]) -> Callable[..., str]:
    """Factory: ``sample_parquet(rows=None, name="train.parquet") -> path`` under ``tmp_path``."""

    def make(rows: Sequence[dict] | None = None, name: str = "train.parquet", schema=None) -> str:
        return write_parquet(tmp_path / name, sample_rows if rows is None else rows, schema=schema)

    return make


@pytest.fixture
def data_cache_dir(tmp_path: Path) -> str:
    """A fresh Arrow cache directory for one test."""
    return str(tmp_path / "arrow-cache")


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: offline, ``src/`` on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the embedded default, trained as ``make demo`` trains it (``hf/``,
    ``checkpoints/last.ckpt``, ``summary.json``): once per test session, a few minutes on 2 cores.

    For development, ``CHATLM_TEST_DEMO_RUN=DIR`` reuses a finished demo run directory instead
    (``python -m src fit --config configs/demo.yaml --trainer.default_root_dir DIR``).
    """
    reuse = os.environ.get("CHATLM_TEST_DEMO_RUN")
    if reuse:
        run = Path(reuse)
        assert (run / "hf" / "config.json").is_file(), f"CHATLM_TEST_DEMO_RUN={reuse}: no finished demo run there"
        return run
    from helpers import run_cli

    run = tmp_path_factory.mktemp("demo") / "run"
    run_cli("fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", timeout=1200)
    return run
