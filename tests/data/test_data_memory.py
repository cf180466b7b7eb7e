"""The data pipeline's memory does not grow with the dataset (memory-mapped Arrow, no row lists).

    .venv/bin/python -m pytest tests/test_data_memory.py -q

A 20k-row and a 200k-row parquet file (prompts 5-320 and responses 4-320 Chinese
characters, ~190 MB of text for 200k rows) are each loaded by ``ChatDataModule`` in a fresh
process, which then draws 1,000 shuffled batches of 8. The test asserts that the 200k
process peaks at most 100 MB above the 20k one.

What is measured: the peak of *anonymous* resident memory (``RssAnon`` in
``/proc/self/status``, sampled every 2 ms), i.e. memory the process allocated. Pages of the
memory-mapped Arrow file are page cache: the kernel drops them under pressure, so they cannot
cause an out-of-memory kill, yet ``ru_maxrss`` counts every one it touched (shuffled reads
fault in most of the file). ``ru_maxrss`` is reported alongside for information.

A control run loads the same files into Python lists with the same probe and must exceed
the bound, so this test can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BOUND_MB = 100
SMALL, LARGE = 20_000, 200_000

CHILD = r"""
import json, os, resource, sys, threading, time

def anon_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

peak = [0]
running = [True]
def sample():
    while running[0]:
        value = anon_kb()
        if value is None:
            return
        peak[0] = max(peak[0], value)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()

path, cache_dir, mode = sys.argv[1:4]
batches = 0
if mode == "datamodule":
    from chatlm.data import ChatDataModule
    dm = ChatDataModule(train_file=path, cache_dir=cache_dir, batch_size=8, shuffle=True, seed=0)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    for _ in range(1000):
        batch = next(iterator)
        batches += 1
else:  # control: what loading the rows as Python objects costs
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
    batches = len(rows)
running[0] = False
time.sleep(0.01)
anon = anon_kb()
peak_mb = max(peak[0], anon or 0) / 1024 if anon is not None else None
maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_mb": peak_mb if peak_mb is not None else maxrss_mb, "maxrss_mb": maxrss_mb,
                  "batches": batches}))
"""


def _write_rows(path: Path, n: int, seed: int = 0) -> str:
    """Write ``n`` rows of random Chinese text in 20k-row chunks (bounded memory here too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pool = ["".join(map(chr, rng.integers(0x4E00, 0x9FA5, 400))) for _ in range(997)]
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            p_len, r_len, offset = rng.integers(5, 321, m), rng.integers(4, 321, m), rng.integers(0, 80, m)
            rows = range(start, start + m)
            prompts = [pool[i % 997][o:o + k] for i, o, k in zip(rows, offset, p_len)]
            responses = [pool[(7 * i + 3) % 997][o:o + k] for i, o, k in zip(rows, offset, r_len)]
            writer.write_table(pa.table({"prompt": prompts, "response": responses}, schema=schema))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[int, str]:
    tmp = tmp_path_factory.mktemp("memory")
    return {n: _write_rows(tmp / f"rows_{n}.parquet", n) for n in (SMALL, LARGE)}


def _measure(files: dict[int, str], mode: str, cache_dir: Path, env: dict[str, str]) -> dict[int, dict]:
    """Run one fresh child per file (both at once) and return their measurements."""
    procs = {
        n: subprocess.Popen([sys.executable, "-c", CHILD, path, str(cache_dir / str(n)), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for n, path in files.items()
    }
    results = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"child for {n} rows failed:\n{err[-3000:]}"
        results[n] = json.loads(out.strip().splitlines()[-1])
    return results


def test_peak_memory_does_not_grow_with_rows(files, tmp_path, subprocess_env):
    result = _measure(files, "datamodule", tmp_path, subprocess_env)
    assert result[SMALL]["batches"] == result[LARGE]["batches"] == 1000
    growth = result[LARGE]["peak_mb"] - result[SMALL]["peak_mb"]
    assert growth <= BOUND_MB, (
        f"peak anonymous memory grew by {growth:.0f} MB from {SMALL} to {LARGE} rows (bound {BOUND_MB} MB); "
        f"measurements: {result}")


def test_probe_detects_rows_loaded_into_python(files, tmp_path, subprocess_env):
    result = _measure(files, "pylist", tmp_path, subprocess_env)
    growth = result[LARGE]["peak_mb"] - result[SMALL]["peak_mb"]
    assert growth > BOUND_MB, f"the control should exceed {BOUND_MB} MB, grew {growth:.0f} MB: {result}"
