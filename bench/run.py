# python -m src bench --quick --out_dir runs/bench
"""The benchmark: every engine and every memory option, side by side, in one run.

    python -m src bench --out_dir runs/bench            # full size (~1 hour on 2 CPU cores)
    python -m src bench --quick --out_dir runs/bench    # reduced run, under 10 minutes here
    python -m src bench --tiny --out_dir /tmp/b         # seconds per case: checks that it runs (CI)
    python -m src bench --quick --only engines,lowmem   # a subset of the groups

Each case runs in its own subprocess with the same thread count (``--threads``, default 2:
``torch.set_num_threads``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), and only one computes
at a time. The two cases of a compared pair (``Case.lockstep``: main path vs another engine,
random vs length-grouped order) run together, taking turns one optimizer step each
(:mod:`bench.lockstep`), and their ratio is the median of the per-step ratios
(:func:`paired_ratio`): a shared machine whose speed drifts slows both alike.
A case is one engine -- the main path (``python -m src fit``), the legacy loop
(``legacy/train_low_mem.py``), the Trainer script (``legacy/train_with_transformers_trainer.py``)
or LLaMA-Factory (``legacy/train_with_real_llamafactory.py``, causal models) -- run *through its
own command-line entry*, in-process in the worker, on the same model, data and batch.
Every case is measured the same way, from outside the engine (:class:`bench.probe.StepProbe`):
optimizer-step end times, the tokens of every batch taken from a DataLoader, and peak memory
(peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU) at the end of the last step.

Groups (``--only``):

* ``engines``  T5 ~30M, batch 8 x 128 tokens (encoder) + 128 (decoder): main path vs legacy loop
  with the legacy loop's settings (``adafactor_legacy`` + one-cycle), main path vs Trainer
  script with the Trainer's settings (``adafactor`` + cosine).
* ``options``  the same model and batch on the main path: fp32 AdamW (the baseline, also the
  MFU case), AdamW8bit, PagedAdamW8bit, gradient checkpointing, LoRA, torch.compile.
* ``lowmem``   T5 ~100M at a batch where activations matter: fp32 AdamW vs AdamW8bit +
  gradient checkpointing (peak RSS), and their loss curves over the first 50 steps.
* ``grouped``  long-tailed prompt/response lengths (log-normal, like chat data): length-grouped
  batches vs the legacy random order, one epoch each, then the validation loss of both.
* ``causal``   a Llama ~30M: main path vs LLaMA-Factory (sft, the same rows and batch).
* ``data``     the shared data module vs the legacy low-memory dataset
  (:class:`LegacyLowMemDataset`, the original re-reads the parquet file for every item), per
  sample, on 20k- and 200k-row files, with the process RSS while serving.

Outputs in ``--out_dir``: ``bench.json`` (every case, ``ratios``, ``targets``), ``bench.md``
(the tables) and ``bench.png``. The command exits 1 when a target fails (``--no-check``: 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from bench.lockstep import BatonPair
from chatlm.model.config import Evaluation, LoRA, ModelShape, Optimization, group_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
LEGACY = os.path.join(REPO, "legacy")

# --------------------------------------------------------------------------- sizes
#: Model shapes (vocabulary: the bundled 768-token tokenizer; parameter counts include it).
#: The model sizes of the cases: name -> (arch, shape).
SIZES: dict[str, tuple[str, ModelShape]] = {
    # 29.8M parameters
    "t5_30m": ("t5", ModelShape(d_model=384, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=6, d_kv=64)),
    # 99.7M parameters
    "t5_100m": ("t5", ModelShape(d_model=768, d_ff=3072, num_layers=6, num_decoder_layers=6, num_heads=12, d_kv=64)),
    # 8.8M parameters
    "t5_small": ("t5", ModelShape(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64)),
    # 29.7M parameters
    "llama_30m": ("llama", ModelShape(d_model=512, d_ff=1536, num_layers=8, num_heads=8, d_kv=64)),
    "t5_tiny": ("t5", ModelShape(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16)),
    "llama_tiny": ("llama", ModelShape(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16)),
}

#: cutoff_len (tokens) of the causal cases, both engines
CAUSAL_CUTOFF = 1024

GROUPS = ("engines", "options", "lowmem", "grouped", "causal", "data")


@dataclass
class Case:
    """One measured run: an engine, a model, data, a batch and training options."""

    name: str
    group: str
    engine: str                      # main | legacy | hf_trainer | llamafactory
    size: str
    data: str                        # fixed | fixed_small | longtail | causal
    batch_size: int
    steps: int                       # optimizer steps (one batch each)
    warmup: int                      # steps left out of the timing
    label: str = ""
    optimizer: str = "adamw"
    scheduler: str = "constant"
    lr: float = 3e-4
    div_factor: float = 25.0
    gradient_checkpointing: bool = False
    lora_r: int = 0
    compile: bool = False
    group_by_length: bool = False
    dropout: float = 0.0
    loss_normalization: str = "micro_batch"
    legacy_accumulation_scaling: bool = False
    validate: bool = False           # validation loss after the last step (grouped)
    time_from_first_batch: bool = False
    seed: int = 42
    repeat: int = 1                  # engines run several times, alternating: repeat k of the case
    fresh_process: bool = False      # a new python process (imports included), not forked: peak RSS as users see it
    lockstep: str = ""               # cases with the same tag run at once, taking turns one step each (lockstep.Baton)

    @property
    def arch(self) -> str:
        return SIZES[self.size][0]


@dataclass
class Mode:
    """How big a run is: model sizes, steps and data sizes per group."""

    name: str
    engine_size: str = "t5_30m"
    engine_len: int = 128            # encoder tokens = decoder tokens per row (engines, options)
    engine_batch: int = 8
    engine_steps: int = 8
    engine_warmup: int = 2
    engine_repeats: int = 3          # each engine pair runs this many times (ABBA); all runs' steps count together
    option_steps: int = 6
    option_warmup: int = 2
    compile_warmup: int = 3
    lowmem_size: str = "t5_100m"
    lowmem_mem_batch: int = 16       # batch (x lowmem_len) of the peak-memory runs
    lowmem_len: int = 128
    lowmem_mem_steps: int = 50       # steps of the peak-memory runs
    lowmem_curve_batch: int = 0      # 0: the loss curves come from the peak-memory runs
    lowmem_curve_size: str = ""      # model of separate loss-curve runs ("": lowmem_size)
    lowmem_curve_len: int = 32
    lowmem_curve_steps: int = 50
    lowmem_dropout: float = 0.1
    grouped_size: str = "t5_30m"
    grouped_batch: int = 8
    grouped_batches: int = 100       # batches per epoch (rows = batches x batch)
    grouped_max_chars: int = 1200    # legacy max_seq_len (characters kept per text)
    grouped_val_rows: int = 256      # validation rows scored after the epoch
    grouped_repeats: int = 2         # the pair runs this many times, ABBA; the median run counts
    causal_size: str = "llama_30m"
    causal_len: int = 256
    causal_batch: int = 8
    causal_steps: int = 6
    causal_warmup: int = 2
    data_rows: tuple[int, int] = (20_000, 200_000)
    data_legacy_items: int = 20
    data_module_items: int = 5000
    peak_seconds: float = 1.5
    check: bool = True


MODES: dict[str, Mode] = {
    "full": Mode("full"),
    # under 10 minutes on 2 CPU cores: fewer steps, the loss curves and the length-grouping
    # comparison on the 8.8M T5, the same engines, batch and model for every speed target;
    # the compared pairs take turns step by step, so two ABBA runs of 8 timed steps per engine
    # and one length-grouping pair (32 batches, timed whole) are steadier than more, shorter runs
    "quick": Mode(
        "quick", engine_steps=8, engine_warmup=2, engine_repeats=2, option_steps=3, option_warmup=2,
        compile_warmup=2, lowmem_mem_batch=16, lowmem_mem_steps=2, lowmem_curve_batch=2, lowmem_curve_len=32,
        lowmem_curve_size="t5_small", lowmem_curve_steps=50, grouped_size="t5_small", grouped_batches=32,
        grouped_val_rows=128, grouped_repeats=1, causal_len=128, causal_steps=3, causal_warmup=2,
        data_legacy_items=10, data_module_items=10000, peak_seconds=1.0),
    "tiny": Mode(
        "tiny", engine_size="t5_tiny", engine_len=16, engine_batch=4, engine_steps=3, engine_warmup=1,
        engine_repeats=1,
        option_steps=2, option_warmup=1, compile_warmup=1, lowmem_size="t5_tiny", lowmem_mem_batch=4,
        lowmem_len=16, lowmem_mem_steps=3, lowmem_curve_batch=0, lowmem_curve_steps=3,
        lowmem_dropout=0.0, grouped_size="t5_tiny", grouped_batch=4, grouped_batches=6,
        grouped_max_chars=200, grouped_val_rows=32, grouped_repeats=1, causal_size="llama_tiny", causal_len=16,
        causal_batch=4, causal_steps=3, causal_warmup=1, data_rows=(500, 2000), data_legacy_items=3,
        data_module_items=200, peak_seconds=0.2, check=False),
}


def plan_cases(mode: Mode, groups: tuple[str, ...], skip_compile: bool = False) -> list[Case]:
    """The cases of a run, in the order they run."""
    m = mode
    cases: list[Case] = []
    eng = dict(size=m.engine_size, data="fixed", batch_size=m.engine_batch)
    legacy_settings = dict(optimizer="adafactor_legacy", scheduler="onecycle", lr=1.5e-4, div_factor=25.0,
                           legacy_accumulation_scaling=True)
    trainer_settings = dict(optimizer="adafactor", scheduler="cosine", lr=1e-4,
                            loss_normalization="window_tokens")
    if "engines" in groups:
        steps = dict(steps=m.engine_steps + m.engine_warmup, warmup=m.engine_warmup)
        # alternating repeats in ABBA order (main first in odd runs, the other engine first in
        # even ones): a machine whose speed drifts (other tenants of the host, clocks) treats both
        # engines of a pair alike; all runs' timed steps count together (combine_repeats)
        for r in range(1, max(1, m.engine_repeats) + 1):
            tag = "" if r == 1 else f"#{r}"
            pairs = [
                (Case("main_legacy_settings" + tag, "engines", "main", label="main path (legacy loop's settings)",
                      repeat=r, **eng, **steps, **legacy_settings),
                 Case("legacy_loop" + tag, "engines", "legacy", label="legacy loop (train_low_mem.py)",
                      repeat=r, **eng, **steps, **legacy_settings)),
                (Case("main_trainer_settings" + tag, "engines", "main",
                      label="main path (Trainer script's settings)", repeat=r, **eng, **steps, **trainer_settings),
                 Case("hf_trainer" + tag, "engines", "hf_trainer",
                      label="Trainer script (train_with_transformers_trainer.py)", repeat=r, **eng, **steps,
                      **trainer_settings)),
            ]
            for main_case, other in pairs:
                main_case.lockstep = other.lockstep = f"{main_case.name}~{other.name}"
                cases += [main_case, other] if r % 2 else [other, main_case]
    tiny = m.name.startswith("tiny")
    if "options" in groups:
        steps = dict(steps=m.option_steps + m.option_warmup, warmup=m.option_warmup)
        cases += [
            Case("fp32_adamw", "options", "main", label="fp32 AdamW (baseline)", **eng, **steps),
            Case("adamw8bit", "options", "main", label="AdamW8bit", optimizer="adamw8bit", **eng, **steps),
            Case("paged_adamw8bit", "options", "main", label="PagedAdamW8bit", optimizer="paged_adamw8bit",
                 **eng, **steps),
            Case("grad_ckpt", "options", "main", label="gradient checkpointing", gradient_checkpointing=True,
                 **eng, **steps),
            Case("lora", "options", "main", label="LoRA r=8 (q, v)", lora_r=8, lr=1e-3, **eng, **steps),
        ]
        if tiny:  # CI checks that every kind of case runs, not every option
            cases = [c for c in cases if c.name != "paged_adamw8bit"]
        if "engines" not in groups:
            cases.append(Case("adafactor_legacy", "options", "main", label="legacy Adafactor",
                              **eng, **steps, **legacy_settings))
        if not skip_compile and not tiny:
            cases.append(Case("compile", "options", "main", label="torch.compile", compile=True, **eng,
                              steps=m.option_steps + m.compile_warmup, warmup=m.compile_warmup))
    if "lowmem" in groups:
        low = dict(size=m.lowmem_size, dropout=m.lowmem_dropout, data="lowmem", batch_size=m.lowmem_mem_batch,
                   steps=m.lowmem_mem_steps, warmup=min(1, m.lowmem_mem_steps - 1), fresh_process=True)
        cases += [
            Case("lowmem_fp32_adamw", "lowmem", "main", label="fp32 AdamW", **low),
            Case("lowmem_8bit_ckpt", "lowmem", "main", label="AdamW8bit + gradient checkpointing",
                 optimizer="adamw8bit", gradient_checkpointing=True, **low),
        ]
        if m.lowmem_curve_batch:
            curve = dict(low, data="lowmem_curve", batch_size=m.lowmem_curve_batch, steps=m.lowmem_curve_steps,
                         warmup=1, size=m.lowmem_curve_size or m.lowmem_size, fresh_process=False)
            cases += [
                Case("lowmem_curve_fp32_adamw", "lowmem", "main", label="fp32 AdamW (loss curve)", **curve),
                Case("lowmem_curve_8bit_ckpt", "lowmem", "main",
                     label="AdamW8bit + gradient checkpointing (loss curve)", optimizer="adamw8bit",
                     gradient_checkpointing=True, **curve),
            ]
    if "grouped" in groups:
        grp = dict(size=m.grouped_size, data="longtail", batch_size=m.grouped_batch, steps=m.grouped_batches,
                   warmup=0, validate=True, time_from_first_batch=True, lr=1e-3, scheduler="cosine")
        for r in range(1, max(1, m.grouped_repeats) + 1):  # alternating in ABBA order, like the engines
            tag = "" if r == 1 else f"#{r}"
            pair = [Case("random_order" + tag, "grouped", "main", label="random order (legacy)", repeat=r,
                         lockstep=f"grouped{tag}", **grp),
                    Case("length_grouped" + tag, "grouped", "main", label="length-grouped", group_by_length=True,
                         repeat=r, lockstep=f"grouped{tag}", **grp)]
            cases += pair if r % 2 else pair[::-1]
    if "causal" in groups:
        cz = dict(size=m.causal_size, data="causal", batch_size=m.causal_batch,
                  steps=m.causal_steps + m.causal_warmup, warmup=m.causal_warmup, optimizer="adamw",
                  scheduler="cosine", lr=1e-4, loss_normalization="window_tokens")
        cases += [
            Case("main_causal", "causal", "main", label="main path (llama, sft)", lockstep="causal", **cz),
            Case("llamafactory", "causal", "llamafactory", label="LLaMA-Factory (llama, sft)", lockstep="causal",
                 **cz),
        ]
    return cases


# =========================================================================== data
_WORDS_CACHE: dict[str, list[str]] = {}


def single_token_words(tokenizer) -> list[str]:
    """Words that are one token after a space in ``tokenizer`` (to build texts of known length)."""
    key = getattr(tokenizer, "name_or_path", "") + str(len(tokenizer))
    if key in _WORDS_CACHE:
        return _WORDS_CACHE[key]
    words = []
    for tok in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([tok])
        if text.startswith(" ") and len(text) > 2 and text[1:].isalpha():
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
                words.append(text[1:])
    words.sort()
    _WORDS_CACHE[key] = words
    return words


def text_of_tokens(tokenizer, n: int, rng: random.Random, words: list[str], tries: int = 30) -> str:
    """A text of exactly ``n`` tokens (the closest found in ``tries`` draws otherwise)."""
    best, best_gap = "", None
    for _ in range(tries):
        text = " ".join(rng.choice(words) for _ in range(max(1, n)))
        got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        while got > n and " " in text:
            text = text.rsplit(" ", 1)[0]
            got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got == n:
            return text
        gap = abs(got - n)
        if best_gap is None or gap < best_gap:
            best, best_gap = text, gap
    return best


def write_parquet(path: str, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


def fixed_rows(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int) -> list[dict]:
    """Rows whose prompt and response are ``prompt_tokens`` / ``response_tokens`` tokens with [EOS]."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    return [{"prompt": text_of_tokens(tokenizer, prompt_tokens - 1, rng, words),
             "response": text_of_tokens(tokenizer, response_tokens - 1, rng, words)} for _ in range(n)]


def longtail_lengths(n: int, seed: int, medians: tuple[float, float] = (24, 40), sigma: float = 1.0,
                     rho: float = 0.5, lo: int = 2, hi: int = 400) -> tuple[list[int], list[int]]:
    """Prompt and response lengths, log-normal (a long right tail, as in chat data), their logs
    correlated ``rho`` (longer questions tend to get longer answers), clipped to [lo, hi]."""
    import numpy as np

    g = np.random.default_rng(seed)
    z1 = g.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1 - rho * rho) * g.standard_normal(n)
    p = np.clip(np.round(np.exp(math.log(medians[0]) + sigma * z1)), lo, hi).astype(int)
    r = np.clip(np.round(np.exp(math.log(medians[1]) + sigma * z2)), lo, hi).astype(int)
    return p.tolist(), r.tolist()


def longtail_rows(tokenizer, n: int, seed: int) -> list[dict]:
    """Prompt/response pairs of long-tailed token lengths: log-normal, medians 24 / 40 tokens,
    sigma 1.0, log-lengths correlated 0.5, 2-400 tokens."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    p_len, r_len = longtail_lengths(n, seed)
    return [{"prompt": " ".join(rng.choice(words) for _ in range(a)),
             "response": " ".join(rng.choice(words) for _ in range(b))} for a, b in zip(p_len, r_len)]


def loading_rows(n: int, seed: int) -> list[dict]:
    """Chat-sized rows (prompts 5-320, responses 4-320 characters, log-normal) without tokenizing."""
    rng = random.Random(seed)
    alphabet = ("的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
                "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头"
                "面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向"
                "情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信"
                "北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难"
                "神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物"
                "台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指"
                "思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步"
                "完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双"
                "历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞"
                "观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪"
                "官示冷域读")
    out = []
    for _ in range(n):
        a = int(min(320, max(5, rng.lognormvariate(math.log(40), 0.8))))
        b = int(min(320, max(4, rng.lognormvariate(math.log(60), 0.8))))
        out.append({"prompt": "".join(rng.choices(alphabet, k=a)), "response": "".join(rng.choices(alphabet, k=b))})
    return out


def causal_rows(tokenizer, n: int, total_tokens: int, seed: int) -> list[dict]:
    """Prompt/response pairs whose sft sequence (LLaMA-Factory's default template: "Human: " +
    prompt + eos + "\nAssistant:" + response + eos + "\n") is about ``total_tokens`` tokens."""
    half = max(2, total_tokens // 2 - 8)
    return fixed_rows(tokenizer, n, half, half, seed)


def prepare_data(out_dir: str, mode: Mode, cases: list[Case]) -> dict[str, str]:
    """Write the data files the cases need (deterministic; reused when present)."""
    from chatlm.data.sample import sample_file, sample_tokenizer_dir
    from chatlm.data.tokenizer import load_tokenizer

    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    tok_dir = sample_tokenizer_dir()
    tok = load_tokenizer(tok_dir)
    files: dict[str, str] = {"tokenizer": tok_dir, "val_sample": sample_file("val")}
    need = {c.data for c in cases}

    def rows_needed(kind: str) -> int:
        return max([c.steps * c.batch_size for c in cases if c.data == kind] or [0])

    def make(name: str, build) -> str:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            write_parquet(path, build())
        return path

    if "fixed" in need:
        n, L = rows_needed("fixed"), mode.engine_len
        files["fixed"] = make(f"fixed_{n}x{L}.parquet", lambda: fixed_rows(tok, n, L, L, seed=1))
    if "lowmem" in need:
        n, L = rows_needed("lowmem"), mode.lowmem_len
        files["lowmem"] = make(f"lowmem_{n}x{L}.parquet", lambda: fixed_rows(tok, n, L, L, seed=2))
    if "lowmem_curve" in need:
        n, L = rows_needed("lowmem_curve"), mode.lowmem_curve_len
        files["lowmem_curve"] = make(f"lowmem_curve_{n}x{L}.parquet", lambda: fixed_rows(tok, n, L, L, seed=3))
    if "longtail" in need:
        n = rows_needed("longtail")
        files["longtail"] = make(f"longtail2_{n}.parquet", lambda: longtail_rows(tok, n, seed=4))
        v = mode.grouped_val_rows
        files["longtail_val"] = make(f"longtail2_val_{v}.parquet", lambda: longtail_rows(tok, v, seed=5))
    if "causal" in need:
        n, L = rows_needed("causal"), mode.causal_len
        files["causal"] = make(f"causal_{n}x{L}.parquet", lambda: causal_rows(tok, n, L, seed=6))
    # the legacy loop insists on a validation file; one row evaluates nothing (floor(1 / 2b) = 0)
    files["one_row"] = make("one_row.parquet", lambda: fixed_rows(tok, 1, 8, 8, seed=7))
    return files


# =========================================================================== legacy reference
class LegacyLowMemDataset:
    """Measurement reference, not a data path: the original ``LowMemDataset(ultra_low_mem=True)``.

    Reproduced from the original project for the data-loading benchmark: its constructor
    reads the parquet file once to count the rows and drops it; every ``__getitem__`` reads
    the **whole** parquet table again (``pq.read_table``), slices row ``index`` and returns
    ``prompt[:max_seq_len-5] + "[EOS]"``, ``response[:max_seq_len-5] + "[EOS]"``: O(rows) per
    item [legacy-spec defect]. The shared data module (memory-mapped Arrow) replaces it.
    """

    def __init__(self, parquet_file: str, max_seq_len: int = 512) -> None:
        import pyarrow.parquet as pq

        self.parquet_file = parquet_file
        self.max_seq_len = max_seq_len
        table = pq.read_table(parquet_file)
        self.length = table.num_rows
        del table

    def __getitem__(self, index: int) -> tuple[str, str]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.parquet_file)  # the whole table, for one row
        row = table.slice(index, 1)
        prompt = row["prompt"][0].as_py()
        response = row["response"][0].as_py()
        del table
        keep = self.max_seq_len - 5  # len("[EOS]")
        return f"{prompt[0:keep]}[EOS]", f"{response[0:keep]}[EOS]"

    def __len__(self) -> int:
        return self.length


# legacy name used in the issue
legacy_lowmem_dataset = LegacyLowMemDataset


# =========================================================================== worker (one case)
def _case_config(case: Case, files: dict[str, str], run_dir: str, threads: int) -> dict[str, Any]:
    """The ``python -m src fit`` config of a main-path case."""
    train_file = files[case.data]
    optim = Optimization(optimizer=case.optimizer, lr=case.lr, scheduler=case.scheduler, warmup_steps=0,
                         div_factor=case.div_factor, scheduler_total_steps=case.steps,
                         loss_normalization=case.loss_normalization,
                         legacy_accumulation_scaling=case.legacy_accumulation_scaling)
    model: dict[str, Any] = dict(
        arch=case.arch, shape=group_dict(case_shape(case)), optim=group_dict(optim),
        lora=group_dict(LoRA(r=case.lora_r)), evaluation=group_dict(Evaluation(bleu_max_samples=0)),
        gradient_checkpointing=case.gradient_checkpointing, compile=case.compile)
    if case.arch == "llama":
        model["pretrained"] = files["llama_dir"]
    data: dict[str, Any] = dict(
        train_file=train_file, tokenizer=files["tokenizer"], batch_size=case.batch_size,
        seed=case.seed, shuffle=True, group_by_length=case.group_by_length, num_workers=0)
    if case.arch == "t5":
        data.update(format="legacy", max_seq_len=_max_chars(case, files))
    else:
        # LLaMA-Factory's sft layout (default template, cutoff_len), as its shim feeds the model
        data.update(format="llamafactory", max_seq_len=CAUSAL_CUTOFF, tokenizer=files["llama_dir"])
    trainer: dict[str, Any] = dict(
        default_root_dir=run_dir, accelerator="cpu" if not _cuda() else "auto", devices=1,
        precision="32-true", max_epochs=1, max_steps=case.steps, gradient_clip_val=1.0,
        num_sanity_val_steps=0, enable_progress_bar=False, log_every_n_steps=50,
        enable_model_summary=False)
    if case.validate:
        data["val_file"] = files["longtail_val"]
        data["eval_batch_size"] = 32
    else:
        trainer["limit_val_batches"] = 0
    run = dict(checkpoint_every_n_steps=0, save_top_k=0, export_hf=False, plot_loss=False)
    return {"seed_everything": case.seed, "trainer": trainer, "model": model, "data": data, "run": run}


def _max_chars(case: Case, files: dict[str, str]) -> int:
    if case.data == "longtail":
        return int(files.get("grouped_max_chars", 1200))
    return 8192  # texts of a known token count: never truncated


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def case_shape(case: Case) -> ModelShape:
    """The model shape of a case: its size, with the case's dropout."""
    return dataclasses.replace(SIZES[case.size][1], dropout=case.dropout)


def _size_flags_legacy(case: Case) -> list[str]:
    s = case_shape(case)
    return [f"--d_model={s.d_model}", f"--d_ff={s.d_ff}", f"--num_layers={s.num_layers}",
            f"--num_decoder_layers={s.num_decoder_layers}", f"--num_heads={s.num_heads}",
            f"--d_kv={s.d_kv}", f"--dropout_rate={s.dropout}"]


def _run_main(case: Case, files: dict[str, str], run_dir: str, threads: int) -> dict[str, Any]:
    import yaml

    from chatlm.train.cli import main as cli_main

    cfg = _case_config(case, files, run_dir, threads)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "bench_case.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cli_main(["fit", "--config", path])
    out: dict[str, Any] = {"command": f"python -m src fit --config {path}"}
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        with open(summary, encoding="utf-8") as f:
            s = json.load(f)
        out["val_loss"] = s.get("val_loss")
        out["parameters"] = s.get("parameters")
    return out


def _run_script(path: str, argv: list[str]) -> None:
    import runpy

    old = sys.argv
    sys.argv = [path] + argv
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as err:
        if err.code not in (0, None):
            raise RuntimeError(f"{os.path.basename(path)} exited with {err.code}") from None
    finally:
        sys.argv = old


def _run_legacy(case: Case, files: dict[str, str], run_dir: str, threads: int) -> dict[str, Any]:
    out = os.path.join(run_dir, "out")
    argv = ["train", f"--train_file={files[case.data]}", f"--validation_file={files['one_row']}",
            f"--test_file={files['one_row']}", f"--tokenizer_dir={files['tokenizer']}", f"--output_dir={out}",
            f"--train_state_dir={out}/state", f"--model_file={out}/model.{{}}.bin",
            f"--model_config_file={out}/model_config.json", "--epochs=1",
            f"--batch_size_per_gpu={case.batch_size}", "--gradient_accumulation_steps=1",
            "--adaptive_memory=False", "--mixed_precision=no", f"--max_seq_len={_max_chars(case, files)}",
            "--save_steps=100000000", "--logging_steps=100000000", f"--seed={case.seed}",
            f"--learn_rate={case.lr}", f"--div_factor={case.div_factor}"] + _size_flags_legacy(case)
    _run_script(os.path.join(LEGACY, "train_low_mem.py"), argv)
    return {"command": "python legacy/train_low_mem.py " + " ".join(argv), "loss_dir": out}


def _run_hf_trainer(case: Case, files: dict[str, str], run_dir: str, threads: int) -> dict[str, Any]:
    s = case_shape(case)
    out = os.path.join(run_dir, "out")
    argv = ["--init_from_scratch", "True", "--model_name_or_path", "", "--tokenizer_name_or_path", files["tokenizer"],
            "--d_model", str(s.d_model), "--d_ff", str(s.d_ff), "--num_layers", str(s.num_layers),
            "--num_decoder_layers", str(s.num_decoder_layers), "--num_heads", str(s.num_heads),
            "--d_kv", str(s.d_kv), "--dropout", str(s.dropout),
            "--train_file", files[case.data], "--validation_file", "", "--max_seq_length", str(_max_chars(case, files)),
            "--output_dir", out, "--num_train_epochs", "1", "--max_steps", str(case.steps),
            "--per_device_train_batch_size", str(case.batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(case.lr), "--optim", "adafactor" if case.optimizer == "adafactor" else "adamw_torch",
            "--lr_scheduler_type", case.scheduler, "--warmup_steps", "0", "--gradient_checkpointing", "False",
            "--bf16", "False", "--logging_steps", "100000000", "--save_strategy", "no", "--report_to", "none",
            "--use_cpu", "False" if _cuda() else "True", "--seed", str(case.seed), "--dataloader_num_workers", "0",
            "--loss_normalization", case.loss_normalization, "--disable_tqdm", "True", "--max_grad_norm", "1.0"]
    _run_script(os.path.join(LEGACY, "train_with_transformers_trainer.py"), argv)
    return {"command": "python legacy/train_with_transformers_trainer.py " + " ".join(argv), "loss_dir": out}


def _run_llamafactory(case: Case, files: dict[str, str], run_dir: str, threads: int) -> dict[str, Any]:
    out = os.path.join(run_dir, "out")
    argv = ["--model_name_or_path", files["llama_dir"], "--stage", "sft", "--finetuning_type", "full",
            "--template", "default", "--cutoff_len", str(CAUSAL_CUTOFF), "--preprocessing_num_workers", "1",
            "--train_file", files[case.data], "--validation_file", "",
            "--dataset_dir", os.path.join(run_dir, "lf_data"),
            "--config_file", os.path.join(run_dir, "llamafactory_config.yaml"), "--output_dir", out,
            "--per_device_train_batch_size", str(case.batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(case.lr), "--num_train_epochs", "1", "--max_steps", str(case.steps),
            "--optim", "adamw_torch", "--lr_scheduler_type", case.scheduler, "--warmup_steps", "0",
            "--max_grad_norm", "1.0", "--bf16", "false", "--gradient_checkpointing", "false",
            "--logging_steps", "100000000", "--save_strategy", "no", "--report_to", "none", "--plot_loss", "false",
            "--seed", str(case.seed), "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    _run_script(os.path.join(LEGACY, "train_with_real_llamafactory.py"), argv)
    return {"command": "python legacy/train_with_real_llamafactory.py " + " ".join(argv), "loss_dir": out}


def _plan_for_run(case: Case, files: dict[str, str], run_dir: str, threads: int, res: dict[str, Any],
                  runtime_mb: Optional[float]) -> Optional[dict[str, Any]]:
    """``chatlm.train.plan``'s estimate for this case at its heaviest trained batch shape."""
    import torch

    from chatlm.train.plan import estimate, resolve

    trained = [b for b in res["batches"][: len(res["step_ends"])] if b.get("shape")]
    if not trained:
        return None
    shape = max(trained, key=lambda b: b["tokens"])["shape"]
    cfg = _case_config(case, files, run_dir, threads)
    cfg["data"]["batch_size"] = shape[0]
    setup = resolve(cfg, seq_len=shape[1], label_len=shape[2] if len(shape) > 2 else None,
                    device="cuda" if torch.cuda.is_available() else "cpu")
    est = estimate(setup, runtime=runtime_mb)
    return {k: v for k, v in est.items() if k != "setup"}


RUNNERS = {"main": _run_main, "legacy": _run_legacy, "hf_trainer": _run_hf_trainer,
           "llamafactory": _run_llamafactory}


def worker_main(argv: list[str]) -> None:
    """``python -m bench.run _case SPEC.json OUT.json``: run one case, write its measurements.

    ``SPEC["baton"]`` (two FIFO paths, timeout): the case is half of a lockstep pair
    (:class:`bench.lockstep.Baton`).
    """
    from bench.lockstep import Baton

    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    case = Case(**spec["case"])
    files, run_dir, threads = spec["files"], spec["run_dir"], spec["threads"]
    baton = None
    if spec.get("baton"):  # a lockstep pair: nothing runs before this process's first turn
        baton = Baton(*spec["baton"])
        baton.take()
    try:
        _run_case(case, files, run_dir, threads, spec, baton, argv[1])
    finally:
        if baton is not None:
            baton.finish()


def _run_case(case: Case, files: dict[str, str], run_dir: str, threads: int, spec: dict[str, Any],
              baton: Optional[Any], out_path: str) -> None:
    from bench.probe import StepProbe, peak_rss_mb, set_threads

    set_threads(threads)
    import torch

    torch.manual_seed(case.seed)
    runtime_mb = None
    if case.engine == "main":
        from chatlm.train.plan import runtime_mb as plan_runtime
        from chatlm.train.plan import resolve

        # what `python -m src plan` measures as the runtime part, in this fresh process
        runtime_mb = plan_runtime(resolve(_case_config(case, files, run_dir, threads),
                                          device="cuda" if torch.cuda.is_available() else "cpu"))
    probe = StepProbe(profile_step=int(spec.get("profile_step") or 0), seq2seq=case.arch == "t5",
                      baton=baton).install()
    t0 = probe.now()
    extra = RUNNERS[case.engine](case, files, run_dir, threads)
    wall = probe.now() - t0
    probe.remove()
    res = probe.result()
    if case.engine == "main":
        res["plan"] = _plan_for_run(case, files, run_dir, threads, res, runtime_mb)
    steps = res["step_peak_mb"]
    res.update(extra)
    res["wall_s"] = wall
    res["peak_mb"] = steps[-1] if steps else None  # at the end of the last optimizer step
    res["process_peak_rss_mb"] = peak_rss_mb()      # incl. anything after training (saving)
    res["memory_kind"] = "cuda_max_allocated" if torch.cuda.is_available() else "peak_rss"
    res["threads"] = torch.get_num_threads()
    res["waited_for_partner_s"] = round(probe.waited, 3)
    loss_path = os.path.join(extra.get("loss_dir", run_dir), "losses.jsonl")
    res["losses"] = []
    if os.path.exists(loss_path):
        with open(loss_path, encoding="utf-8") as f:
            res["losses"] = [json.loads(line)["loss"] for line in f if line.strip()]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(res, f)


# =========================================================================== data benchmark
def _anon_rss_mb() -> float:
    """Anonymous resident memory of this process (RssAnon: heap, not file pages), MiB."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    from bench.probe import rss_mb

    return rss_mb()


def data_bench_main(argv: list[str]) -> None:
    """``python -m bench.run _data SPEC.json OUT.json``: per-sample cost of both datasets."""
    from chatlm.data.formatting import legacy_texts
    from chatlm.data.sources import load_prompt_response
    from bench.probe import rss_mb, set_threads

    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    set_threads(spec["threads"])
    import numpy as np

    rng = random.Random(0)
    entries: list[dict[str, Any]] = []
    datasets = []
    for path, rows in zip(spec["paths"], spec["rows"]):
        entry: dict[str, Any] = {"rows": rows, "file_mb": os.path.getsize(path) / 2**20}
        # the shared data module's dataset: memory-mapped Arrow (converted once, then reused)
        t = time.perf_counter()
        ds = load_prompt_response(path, cache_dir=spec["cache_dir"])
        entry["module_open_s"] = time.perf_counter() - t
        # steady state, as after the first pass of an epoch: every page of the mapped file
        # touched once (one byte a page), so neither file pays first-touch page faults below
        for column in ds.data.table.columns:
            for chunk in column.chunks:
                for buf in chunk.buffers():
                    if buf is not None and buf.size:
                        int(np.frombuffer(buf, dtype=np.uint8)[::4096].sum())
        for _ in range(50):  # warm-up
            row = ds[rng.randrange(rows)]
            legacy_texts(row["prompt"], row["response"], 512)
        entry["module_per_sample_rounds_s"] = []
        entries.append(entry)
        datasets.append(ds)
    rss0, anon0 = rss_mb(), _anon_rss_mb()
    # random rows in rounds, the files taking turns round by round (this machine's speed shifts
    # from one second to the next: both files meet the same shifts); each file's best round
    # counts (a round slowed by another process says nothing about the data module)
    per_round = max(1, spec["module_items"] // 5)
    for r in range(5):
        for k in (range(len(entries)) if r % 2 == 0 else reversed(range(len(entries)))):
            ds, rows = datasets[k], entries[k]["rows"]
            idx = [rng.randrange(rows) for _ in range(per_round)]
            t = time.perf_counter()
            for i in idx:
                row = ds[i]
                legacy_texts(row["prompt"], row["response"], 512)
            entries[k]["module_per_sample_rounds_s"].append((time.perf_counter() - t) / len(idx))
    # total RSS grows by the file pages read through the memory map (page cache, shared,
    # reclaimable: at most the file's size); the process's own (anonymous) memory stays flat
    for entry in entries:
        entry["module_per_sample_s"] = min(entry["module_per_sample_rounds_s"])
        entry["module_rss_growth_mb"] = rss_mb() - rss0
        entry["module_anon_rss_growth_mb"] = _anon_rss_mb() - anon0
        entry["module_rss_mb"] = rss_mb()
    del datasets, ds
    for path, entry in zip(spec["paths"], entries):
        # the legacy low-memory dataset (re-reads the parquet file for every item)
        legacy = LegacyLowMemDataset(path, max_seq_len=512)
        legacy[0]
        idx = [rng.randrange(entry["rows"]) for _ in range(spec["legacy_items"])]
        t = time.perf_counter()
        for i in idx:
            legacy[i]
        entry["legacy_per_sample_s"] = (time.perf_counter() - t) / len(idx)
        entry["speedup"] = entry["legacy_per_sample_s"] / max(entry["module_per_sample_s"], 1e-12)
    results: dict[str, Any] = {"files": entries}
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(results, f)


# =========================================================================== parent
def _env(threads: int, cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               CHATLM_CACHE_DIR=cache_dir, DISABLE_VERSION_CHECK="1", LLAMAFACTORY_VERBOSITY="WARN")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, REPO, env.get("PYTHONPATH", "")) if p)
    env.pop("CHATLM_DEBUG", None)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the case process gets SIGTERM when the bench process dies (no orphans)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _cpu_busy_s() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Fraction of all cores busy over ``seconds`` (other processes: this one is sleeping)."""
    a = _cpu_busy_s()
    time.sleep(seconds)
    b = _cpu_busy_s()
    if a is None or b is None:
        return None
    return (b - a) / (seconds * (os.cpu_count() or 1))


def wait_until_quiet(max_wait: float, threshold: float = 0.10) -> Optional[float]:
    """Sleep until other processes use under ``threshold`` of the CPUs (at most ``max_wait`` s)."""
    deadline = time.perf_counter() + max_wait
    busy = machine_busy_fraction(1.0)
    while busy is not None and busy > threshold and time.perf_counter() < deadline:
        time.sleep(4.0)
        busy = machine_busy_fraction(1.0)
    return busy


def _start_python(args: list[str], env: dict[str, str], log: Any) -> subprocess.Popen:
    """Start ``python ARGS`` in the repo root, its output to the open file ``log``; it dies with us."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _subprocess(args: list[str], env: dict[str, str], log_path: str, timeout: float) -> int:
    """Run ``python ARGS`` (output to ``log_path``); returns its exit code (-9: timed out)."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = _start_python(args, env, log)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9


def _contention(load0: Optional[float], busy0: Optional[float], busy1: Optional[float],
                own_cpu_s: Optional[float], wall: float) -> dict[str, Any]:
    """Load average before/after and the share of all CPUs that *other* processes used while a
    case ran: machine busy time minus the case's own CPU time, over ``wall`` seconds."""
    contention: dict[str, Any] = {"load_start": load0, "load_end": _load()}
    if busy0 is not None and busy1 is not None and own_cpu_s is not None and wall > 0:
        others = max(0.0, (busy1 - busy0) - own_cpu_s)
        contention["others_cpu_fraction"] = round(others / (wall * (os.cpu_count() or 1)), 4)
    return contention


#: Modules every case imports, loaded once by the fork server (``--fresh_processes``: none)
PRELOAD = ("torch", "numpy", "pyarrow.parquet", "transformers", "transformers.models.t5.modeling_t5",
           "transformers.models.llama.modeling_llama", "transformers.trainer", "lightning", "datasets", "peft",
           "accelerate", "chatlm.train.cli", "chatlm.train.plan", "bench.probe")


def _noop() -> None:  # pragma: no cover - child
    pass


def _child_entry(kind: str, argv: list[str], log_path: str, cpu_path: str) -> None:  # pragma: no cover - child
    """A case process forked from the fork server: log to ``log_path``, run, report own CPU time."""
    import resource
    import traceback

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _die_with_parent()
    os.chdir(REPO)
    code = 0
    try:
        (worker_main if kind == "_case" else data_bench_main)(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the case's log
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(cpu_path, "w", encoding="utf-8") as f:
            json.dump({"cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime}, f)
    # multiprocessing's exit path (not os._exit): it runs the finalizers that unregister the
    # semaphores a case made (tqdm's lock, ...), or the resource tracker reports them as leaked
    sys.exit(code)


class _Job:
    """One case process, launched; :meth:`poll` returns its exit code once it has ended."""

    def __init__(self, proc: Any, log: Any = None, cpu_path: Optional[str] = None) -> None:
        self.proc, self.log, self.cpu_path = proc, log, cpu_path
        self.rc: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.rc is None:
            rc = self.proc.poll() if isinstance(self.proc, subprocess.Popen) else self.proc.exitcode
            if rc is not None:
                self._ended(rc)
        return self.rc

    def kill(self) -> None:
        if self.rc is None:
            self.proc.kill()
            if isinstance(self.proc, subprocess.Popen):
                self.proc.wait()
            else:
                self.proc.join()
            self._ended(-9)

    def _ended(self, rc: int) -> None:
        self.rc = rc
        if self.log is not None:
            self.log.close()

    def own_cpu_s(self) -> Optional[float]:
        """CPU seconds of a forked case (it writes them; a fresh one counts as a child of ours)."""
        if self.cpu_path is None:
            return 0.0
        try:
            with open(self.cpu_path, encoding="utf-8") as f:
                return json.load(f)["cpu_s"]
        except (OSError, ValueError, KeyError):
            return None


class CaseLauncher:
    """Runs each case in a process of its own: one at a time, or a lockstep pair at once.

    Default: a fork server (``multiprocessing`` ``forkserver``) that has imported torch,
    transformers, lightning, datasets, peft and accelerate once, without computing anything
    (no thread pools), forks one fresh process per case. Every case still starts from a new
    process with nothing trained, allocated or cached by another case; what it is spared is
    ~12 s of imports per case (about 4 minutes of a ``--quick`` run). Peak RSS counts the
    imported modules exactly as a process that imported them itself. ``fresh=True`` (or a
    platform without fork) starts ``python -m bench.run _case ...`` from scratch instead.
    """

    def __init__(self, env: dict[str, str], fresh: bool = False) -> None:
        self.env = env
        self.fresh = fresh or not sys.platform.startswith("linux")
        self.ctx = None
        self._started = None

    def start(self) -> None:
        """Start the fork server; it imports PRELOAD in the background (call early: the imports
        overlap whatever the caller does next)."""
        if self.fresh or self._started is not None:
            return
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        saved = dict(os.environ)
        os.environ.update(self.env)  # the fork server (and so every case) gets the bench's environment
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._started = ctx

    def ready(self) -> None:
        """Wait until the fork server has imported PRELOAD (before anything is timed)."""
        self._context()

    def _context(self):
        if self.ctx is None:
            self.start()
            warm = self._started.Process(target=_noop)  # returns once the server has imported PRELOAD
            warm.start()
            warm.join()
            self.ctx = self._started
        return self.ctx

    def _launch(self, kind: str, argv: list[str], log_path: str, fresh: bool) -> _Job:
        if self.fresh or fresh:
            log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by _Job
            return _Job(_start_python(["-m", "bench.run", kind, *argv], self.env, log), log=log)
        ctx = self._context()
        cpu_path = log_path + ".cpu.json"
        if os.path.exists(cpu_path):
            os.unlink(cpu_path)
        proc = ctx.Process(target=_child_entry, args=(kind, argv, log_path, cpu_path))
        proc.start()
        return _Job(proc, cpu_path=cpu_path)

    def run(self, kind: str, argv: list[str], log_path: str, timeout: float,
            fresh: bool = False) -> tuple[int, float, dict]:
        """Run ``kind`` (``_case`` / ``_data``) with ``argv``; returns (exit code, seconds, contention).
        ``fresh``: this one as a new python process whatever the launcher's default."""
        return self.run_together([(kind, argv, log_path, fresh)], timeout)[0]

    def run_together(self, jobs: list[tuple[str, list[str], str, bool]], timeout: float,
                     pair: Optional[BatonPair] = None) -> list[tuple[int, float, dict]]:
        """Start every ``(kind, argv, log_path, fresh)`` at once and wait for all.

        ``pair``: the two jobs are a lockstep pair; when one ends (or is killed after
        ``timeout`` s), the other is told so and runs on alone. The contention figure (CPU
        used by other processes) is that of the whole group; each job's seconds run from the
        start to its own end."""
        busy0, load0, kids0 = _cpu_busy_s(), _load(), _children_cpu_s()
        t = time.perf_counter()
        running = [self._launch(kind, argv, log, fresh) for kind, argv, log, fresh in jobs]
        walls: list[float] = [0.0] * len(running)
        while True:
            for i, job in enumerate(running):
                if job.rc is not None:
                    continue
                if job.poll() is None:  # still running
                    if time.perf_counter() - t <= timeout:
                        continue
                    job.kill()
                walls[i] = time.perf_counter() - t
                if pair is not None and len(running) == 2 and running[1 - i].rc is None:
                    pair.release(1 - i)
            if all(job.rc is not None for job in running):
                break
            time.sleep(0.02)
        wall = max(walls)
        busy1 = _cpu_busy_s()
        own = [job.own_cpu_s() for job in running]
        own_total = None if None in own else sum(own) + _children_cpu_s() - kids0
        contention = _contention(load0, busy0, busy1, own_total, wall)
        return [(job.rc, w, dict(contention)) for job, w in zip(running, walls)]


def _tail(path: str, n: int = 12) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines() if ln.strip()]
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def _make_llama_dir(out_dir: str, size: str) -> str:
    """A freshly initialised Llama + the bundled tokenizer as a HF directory (both causal engines load it)."""
    path = os.path.join(out_dir, "data", f"{size}_hf")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch

    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.model.build import build_model
    from chatlm.model.export import save_hf
    from chatlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(sample_tokenizer_dir())
    torch.manual_seed(0)
    shape = dataclasses.replace(SIZES[size][1], dropout=0.0)
    model = build_model("llama", len(tok), shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    save_hf(model, tok, path)
    return path


def measure_peak(threads: int, seconds: float, env: dict[str, str], out_dir: str) -> dict[str, Any]:
    out = os.path.join(out_dir, "logs", "peak.json")
    rc = _subprocess(["-m", "bench.probe", "peak", "--threads", str(threads), "--seconds", str(seconds),
                      "--out", out], env, os.path.join(out_dir, "logs", "peak.log"), 300)
    if rc != 0:
        raise RuntimeError("matmul peak measurement failed:\n" + _tail(os.path.join(out_dir, "logs", "peak.log")))
    with open(out, encoding="utf-8") as f:
        return json.load(f)


class _FlopCache:
    """FLOPs per batch shape of a case's model (meta device), cached.

    A few shapes are counted directly (``FlopCounterMode``, ~0.5 s each). Batches of many
    shapes (length-grouped epochs) use the exact form of a transformer's matmul FLOPs
    instead: ``B * (a*Ti + b*To + c*Ti^2 + d*To^2 + e*Ti*To) + f*Ti + g*To`` for seq2seq
    (batch B, encoder length Ti, decoder length To: linear layers, self- and cross-attention,
    and work shared by the batch's rows), ``B * (a*T + c*T^2) + f*T`` for a causal model
    (its rotary angles are computed once per batch). The coefficients are solved from
    direct counts, and two further counts at other shapes must match the form to the FLOP,
    else every shape is counted directly.
    """

    DIRECT_SHAPES = 6

    def __init__(self) -> None:
        self.cache: dict[tuple, int] = {}
        self.forms: dict[tuple, Optional[list[float]]] = {}

    def for_case(self, case: Case, vocab: int):
        def builder():
            from chatlm.model.lora import apply_lora
            from chatlm.model.build import build_model

            model = build_model(case.arch, vocab, case_shape(case))
            if case.lora_r:
                model = apply_lora(model, r=case.lora_r)
            return model

        def count(shape: tuple[int, ...]) -> int:
            key = (case.size, case.lora_r, tuple(shape))
            if key not in self.cache:
                from bench.probe import model_step_flops

                b, t_in = shape[0], shape[1]
                t_out = shape[2] if len(shape) > 2 else None
                self.cache[key] = model_step_flops(builder, b, t_in, t_out, vocab_size=vocab)
            return self.cache[key]

        def terms(shape: tuple[int, ...]) -> list[float]:
            b = shape[0]
            if len(shape) > 2:
                ti, to = shape[1], shape[2]
                return [b * ti, b * to, b * ti * ti, b * to * to, b * ti * to, ti, to]
            return [b * shape[1], b * shape[1] ** 2, shape[1]]

        def form() -> Optional[list[float]]:
            key = (case.size, case.lora_r, case.arch)
            if key not in self.forms:
                import numpy as np

                if case.arch == "t5":
                    pts = [(1, 8, 12), (1, 16, 8), (1, 24, 40), (1, 40, 16), (1, 56, 64), (2, 8, 12), (2, 20, 6)]
                    checks = [(3, 33, 21), (5, 7, 90)]
                else:
                    pts = [(1, 8), (1, 40), (2, 8)]
                    checks = [(3, 29), (5, 70)]
                a = np.array([terms(p) for p in pts], dtype=np.float64)
                y = np.array([count(p) for p in pts], dtype=np.float64)
                coef = np.linalg.solve(a, y).tolist()
                ok = all(round(sum(c * t for c, t in zip(coef, terms(p)))) == count(p) for p in checks)
                self.forms[key] = coef if ok else None
            return self.forms[key]

        seen: set[tuple[int, ...]] = set()

        def flops_of(shape: list[int]) -> int:
            shape_t = tuple(int(x) for x in shape)
            seen.add(shape_t)
            if (case.size, case.lora_r, shape_t) in self.cache or len(seen) <= self.DIRECT_SHAPES:
                return count(shape_t)
            coef = form()
            if coef is None:
                return count(shape_t)
            return int(round(sum(c * t for c, t in zip(coef, terms(shape_t)))))

        return flops_of


def analyse_case(case: Case, res: dict[str, Any], peak: dict[str, Any], flops: _FlopCache,
                 vocab: int) -> dict[str, Any]:
    from bench.probe import _median, timed_window

    win = timed_window(res, case.warmup, flops_of=flops.for_case(case, vocab),
                       from_first_batch=case.time_from_first_batch)
    fixed_shape = len({tuple(b["shape"] or ()) for b in res["batches"][: len(res["step_ends"])]}) == 1
    out = {
        # fixed-shape batches: the median step's throughput (robust to a step slowed by another
        # process); batches of varying shape (length-grouped): all tokens / all seconds
        "tokens_per_s": win["median_step_tokens_per_s"] if fixed_shape else win["tokens_per_s"],
        "mean_tokens_per_s": win["tokens_per_s"],
        "step_tokens_per_s": [round(x, 3) for x in win["step_tokens_per_s"]] if fixed_shape else None,
        "nonpad_tokens_per_s": (win["nonpad_tokens_per_s"] * win["median_step_tokens_per_s"] / win["tokens_per_s"]
                                if fixed_shape and win["tokens_per_s"] else win["nonpad_tokens_per_s"]),
        "step_time_s": win["step_time_s"],
        "timed_steps": win["steps"],
        "timed_seconds": win["seconds"],
        "pad_fraction": win["pad_fraction"],
        "flops_per_step": win["flops"] / max(1, win["steps"]),
        "achieved_gflops": win["flops_per_s"] / 1e9,  # all timed FLOPs / all timed seconds
        "mfu": (win["flops_per_s"] * (win["median_step_tokens_per_s"] / win["tokens_per_s"] if fixed_shape
                                      and win["tokens_per_s"] else 1.0)) / peak["flops_per_s"]
        if peak.get("flops_per_s") else None,
        "peak_mb": res.get("peak_mb"),
        "memory_kind": res.get("memory_kind"),
    }
    # the optimizer's share: its median step inside the median step (where the engines differ)
    timed_opt = _timed_optimizer_s(dataclasses.asdict(case), res)
    out["optimizer_step_s"] = _median(timed_opt) if timed_opt else None
    plan = res.get("plan")
    if plan and res.get("peak_mb"):
        out["plan_mb"] = plan["peak_mb"]
        out["plan_rel_error"] = (plan["peak_mb"] - res["peak_mb"]) / res["peak_mb"]
    return out


def _timed_optimizer_s(case: dict[str, Any], raw: dict[str, Any]) -> list[float]:
    """The optimizer's own seconds of a run's timed steps (those ``timed_window`` times)."""
    skip = 0 if case.get("time_from_first_batch") else case.get("warmup", 0)
    return (raw.get("optimizer_s") or [])[skip:]


def _rel_curve_diff(a: list[float], b: list[float], n: int) -> dict[str, float]:
    k = min(n, len(a), len(b))
    if k == 0:
        return {"steps": 0, "max": float("nan"), "mean": float("nan")}
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:k], b[:k])]
    return {"steps": k, "max": max(rel), "mean": sum(rel) / k}


def combine_repeats(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per case. A case run several times (``name#2``, ...) counts the median step
    of all its runs' timed steps together (fixed-shape batches; else the median run), so one
    run slowed or sped up by the machine moves it little; its other speed figures are scaled
    to that throughput, ``repeats`` keeps each run's own tokens/s."""
    from bench.probe import _median

    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, entry in results.items():
        groups.setdefault(name.split("#", 1)[0], []).append((name, entry))
    out: dict[str, dict[str, Any]] = {}
    for base, runs in groups.items():
        ok = [(n, e) for n, e in runs if not e.get("error") and "metrics" in e]
        if not ok:
            out[base] = runs[0][1]
            continue
        if len(runs) == 1:
            out[base] = ok[0][1]
            continue
        steps = [x for _, e in ok for x in (e["metrics"].get("step_tokens_per_s") or [])]
        pooled = _median(steps) if steps else _median(e["metrics"]["tokens_per_s"] for _, e in ok)
        first = ok[0][1]
        m = dict(first["metrics"])
        f = pooled / m["tokens_per_s"] if m["tokens_per_s"] else 1.0
        m["tokens_per_s"] = pooled
        m["nonpad_tokens_per_s"] *= f
        m["step_time_s"] /= f
        m["achieved_gflops"] *= f
        if m.get("mfu") is not None:
            m["mfu"] *= f
        opt = [x for _, e in ok for x in _timed_optimizer_s(e["case"], e.get("raw") or {})]
        m["optimizer_step_s"] = _median(opt) if opt else m.get("optimizer_step_s")
        out[base] = dict(first, metrics=m, combined={"runs": len(ok), "timed_steps": len(steps)},
                         repeats={n: (e["metrics"]["tokens_per_s"] if "metrics" in e else None) for n, e in runs})
    return out


def paired_ratio(results: dict[str, dict[str, Any]], a: str, b: str) -> Optional[dict[str, Any]]:
    """Throughput of ``a`` over ``b`` from their steps taken in turns (lockstep pairs).

    Step k of ``a`` ran next to step k of ``b`` in the same run (``a#2`` next to ``b#2``, ...),
    so the ratio of their tokens/s cancels the machine's speed at that moment; the median of
    all runs' per-step ratios counts. None when the cases did not run in turns or have no
    per-step figures (varying batch shapes)."""
    from bench.probe import _median

    pairs: list[float] = []
    for name, entry in results.items():
        base, _, tag = name.partition("#")
        other_name = b + ("#" + tag if tag else "")
        other = results.get(other_name)
        if base != a or not other or entry.get("error") or other.get("error") \
                or entry.get("lockstep_with") != [other_name]:
            continue
        x = entry["metrics"].get("step_tokens_per_s") or []
        y = other["metrics"].get("step_tokens_per_s") or []
        pairs += [p / q for p, q in zip(x, y) if q > 0]
    if not pairs:
        return None
    return {"ratio": _median(pairs), "pairs": len(pairs), "min": min(pairs), "max": max(pairs)}


def compute_ratios(results: dict[str, dict[str, Any]], data: Optional[dict[str, Any]],
                   mode: Mode) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ratios`` and ``targets`` from the analysed cases. Engines that ran in turns: the median
    of their per-step ratios (:func:`paired_ratio`); otherwise repeated cases count all runs'
    steps together (:func:`combine_repeats`)."""
    raw_results = results
    results = combine_repeats(results)
    r: dict[str, Any] = {}

    def get(name: str, key: str):
        c = results.get(name)
        if not c or c.get("error"):
            return None
        return c["metrics"].get(key)

    def ratio(a, b):
        return a / b if a is not None and b else None

    for key, a, b in (("main_vs_legacy", "main_legacy_settings", "legacy_loop"),
                      ("main_vs_hf_trainer", "main_trainer_settings", "hf_trainer"),
                      ("main_vs_llamafactory", "main_causal", "llamafactory")):
        paired = paired_ratio(raw_results, a, b)
        r[f"{key}_tokens_per_s"] = paired["ratio"] if paired else ratio(get(a, "tokens_per_s"),
                                                                        get(b, "tokens_per_s"))
        if paired:
            r[f"{key}_step_pairs"] = paired["pairs"]
            r[f"{key}_step_ratio_range"] = [round(paired["min"], 3), round(paired["max"], 3)]
    r["lowmem_vs_fp32_peak_rss"] = ratio(get("lowmem_8bit_ckpt", "peak_mb"), get("lowmem_fp32_adamw", "peak_mb"))
    curve_a, curve_b = ("lowmem_curve_8bit_ckpt", "lowmem_curve_fp32_adamw") if mode.lowmem_curve_batch else (
        "lowmem_8bit_ckpt", "lowmem_fp32_adamw")
    if curve_a in results and curve_b in results and not results[curve_a].get("error") \
            and not results[curve_b].get("error"):
        d = _rel_curve_diff(results[curve_a]["raw"]["losses"], results[curve_b]["raw"]["losses"],
                            mode.lowmem_curve_steps)
        r["lowmem_loss_curve_max_rel_diff"] = d["max"]
        r["lowmem_loss_curve_mean_rel_diff"] = d["mean"]
        r["lowmem_loss_curve_steps"] = d["steps"]
    r["grouped_vs_random_nonpad_tokens_per_s"] = ratio(get("length_grouped", "nonpad_tokens_per_s"),
                                                       get("random_order", "nonpad_tokens_per_s"))
    vg, vr = (results.get(n, {}).get("raw", {}).get("val_loss") for n in ("length_grouped", "random_order"))
    r["grouped_vs_random_val_loss_rel_diff"] = abs(vg - vr) / vr if vg is not None and vr else None
    if data and data.get("files"):
        big = max(data["files"], key=lambda e: e["rows"])
        small = min(data["files"], key=lambda e: e["rows"])
        r["data_module_vs_legacy_dataset_per_sample"] = big["speedup"]
        r["data_module_per_sample_big_vs_small"] = big["module_per_sample_s"] / small["module_per_sample_s"]
        r["legacy_dataset_per_sample_big_vs_small"] = big["legacy_per_sample_s"] / small["legacy_per_sample_s"]
        r["data_module_rss_growth_mb"] = big["module_rss_growth_mb"]
        r["data_module_anon_rss_growth_mb"] = big.get("module_anon_rss_growth_mb")
        r["data_file_mb"] = big["file_mb"]
    r["mfu"] = get("fp32_adamw", "mfu")
    r["mfu_engine_case"] = get("main_legacy_settings", "mfu")
    r["compile_vs_eager_tokens_per_s"] = ratio(get("compile", "tokens_per_s"), get("fp32_adamw", "tokens_per_s"))
    # the plan estimates what `python -m src fit` holds: compared with cases run as fresh
    # processes (a forked case's RSS leaves out the library pages it never touches)
    all_plan_errors = {k: c["metrics"]["plan_rel_error"] for k, c in results.items()
                       if not c.get("error") and c.get("metrics", {}).get("plan_rel_error") is not None
                       and not c["case"].get("compile")}
    plan_errors = {k: v for k, v in all_plan_errors.items() if results[k].get("fresh_process", True)}
    r["plan_max_abs_rel_error"] = max((abs(v) for v in plan_errors.values()), default=None)
    r["plan_rel_errors"] = plan_errors
    r["plan_rel_errors_forked_cases"] = {k: v for k, v in all_plan_errors.items() if k not in plan_errors}

    def target(value, op: str, threshold: float, what: str) -> dict[str, Any]:
        ok = None if value is None or (isinstance(value, float) and math.isnan(value)) else (
            value >= threshold if op == ">=" else value <= threshold)
        return {"value": value, "op": op, "threshold": threshold, "pass": ok, "what": what}

    t: dict[str, Any] = {}
    if "main_legacy_settings" in results:
        t["main_vs_legacy"] = target(r["main_vs_legacy_tokens_per_s"], ">=", 1.0,
                                     "main path tokens/s / legacy loop tokens/s, same settings (median of the "
                                     "steps' ratios, the engines taking turns)")
        t["main_vs_hf_trainer"] = target(r["main_vs_hf_trainer_tokens_per_s"], ">=", 1.0,
                                         "main path tokens/s / Trainer script tokens/s, same settings (median of "
                                         "the steps' ratios, the engines taking turns)")
    if "lowmem_fp32_adamw" in results:
        t["lowmem_peak_rss"] = target(r["lowmem_vs_fp32_peak_rss"], "<=", 0.6,
                                      "peak RSS of AdamW8bit + checkpointing / fp32 AdamW")
        t["lowmem_loss_curve"] = target(r.get("lowmem_loss_curve_max_rel_diff"), "<=", 0.02,
                                        "max relative loss difference, first 50 steps")
    if "length_grouped" in results:
        t["grouped_nonpad_throughput"] = target(r["grouped_vs_random_nonpad_tokens_per_s"], ">=", 1.5,
                                                "non-pad tokens/s, length-grouped / random order")
        t["grouped_equal_loss"] = target(r["grouped_vs_random_val_loss_rel_diff"], "<=", 0.02,
                                         "validation loss after the same tokens, relative difference")
    if data and data.get("files"):
        t["data_loading_speedup"] = target(r["data_module_vs_legacy_dataset_per_sample"], ">=", 100.0,
                                           "per-sample time, legacy low-memory dataset / data module (200k rows)")
        t["data_loading_size_independent"] = target(r["data_module_per_sample_big_vs_small"], "<=", 1.5,
                                                     "data module per-sample time, 200k-row / 20k-row file")
        t["data_loading_flat_rss"] = target(r["data_module_anon_rss_growth_mb"], "<=", 16.0,
                                            "growth of the process's own memory (anonymous RSS, MiB) while the "
                                            "data module serves samples of the 20k- and 200k-row files")
    if plan_errors:
        t["plan_accuracy"] = target(r["plan_max_abs_rel_error"], "<=", 0.25,
                                    "largest |plan estimate - measured peak| / measured peak (main-path cases "
                                    "run as fresh processes)")
    if "fp32_adamw" in results:
        t["mfu"] = target(r["mfu"], ">=", 0.40, "MFU of the main path, 30M T5, batch 8 x 128, fp32 AdamW")
    return r, t


# =========================================================================== reports
def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and abs(v) < 10 ** -nd:  # small ratios (loss-curve differences): significant digits
            return f"{v:.2g}"
        return f"{v:,.{nd}f}"
    return str(v)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# chatlm bench ({report['mode']})", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, {m['device']}; load average at start "
             f"{m['load_start']}, at end {m['load_end']}. Matmul peak (fp32, measured in this run): "
             f"**{report['peak']['gflops']:.1f} GFLOP/s** ({report['peak']['best_size']}^2; measured "
             f"{report['peak'].get('start_gflops', report['peak']['gflops']):.1f} before the cases and "
             f"{report['peak'].get('end_gflops', report['peak']['gflops']):.1f} after them, the better one is used). "
             "\"others' CPU\": the share of the CPUs that other processes used while the case ran "
             "(over 10% means the figure is disturbed). Peak RSS marked * : the case ran as a fresh python "
             "process (what `python -m src fit` shows); the others were forked from a server that had "
             "imported torch, transformers and lightning, so their RSS counts only the library pages they "
             "touched. tokens/s: the median step of the case's timed steps.", "",
             f"Command: `{report['command']}`", "",
             "| group | case | engine | model | batch | tokens/s | non-pad tok/s | step (s) | peak "
             + ("GPU MB" if m["device"] != "cpu" else "RSS MB") + " | plan MB | MFU | last loss | others' CPU |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    repeated = {n.split("#", 1)[0] for n in report["cases"] if "#" in n}
    for name, c in report["cases"].items():
        case = dict(c["case"])
        if name.split("#", 1)[0] in repeated:
            case["label"] = (case["label"] or name) + f" (run {case.get('repeat', 1)})"
        if c.get("error"):
            lines.append(f"| {case['group']} | {case['label'] or name} | {case['engine']} | {case['size']} | "
                         f"{case['batch_size']} | failed | | | | | | | |")
            continue
        mt = c["metrics"]
        losses = c["raw"].get("losses") or []
        lines.append(
            f"| {case['group']} | {case['label'] or name} | {case['engine']} | {case['size']} | "
            f"{case['batch_size']} | {_fmt(mt['tokens_per_s'], 0)} | {_fmt(mt['nonpad_tokens_per_s'], 0)} | "
            f"{_fmt(mt['step_time_s'], 2)} | {_fmt(mt['peak_mb'], 0)}{'*' if c.get('fresh_process') else ''} | "
            f"{_fmt(mt.get('plan_mb'), 0)} | "
            f"{_fmt(100 * mt['mfu'] if mt.get('mfu') is not None else None, 1)}% | "
            f"{_fmt(losses[-1] if losses else None, 3)} | "
            f"{_pct((c.get('contention') or {}).get('others_cpu_fraction'))} |")
    combined = {k: c for k, c in combine_repeats(report["cases"]).items() if c.get("combined")}
    if combined:
        lines += ["", "Cases run several times (engines: in turns, the starting engine swapped): the median step of "
                  "all their runs' timed steps. The engine ratios are the median of the per-step ratios of the "
                  "engines' steps taken in turns (`*_step_pairs` pairs, range in `*_step_ratio_range`).", "",
                  "| case | runs | timed steps | tokens/s | step (s) | of which optimizer (s) | MFU | "
                  "each run's tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for k, c in combined.items():
            mt = c["metrics"]
            runs = ", ".join(_fmt(v, 0) for v in c["repeats"].values())
            lines.append(f"| {c['case']['label'] or k} | {c['combined']['runs']} | "
                         f"{c['combined']['timed_steps'] or '- (median run)'} | "
                         f"{_fmt(mt['tokens_per_s'], 0)} | {_fmt(mt['step_time_s'], 2)} | "
                         f"{_fmt(mt.get('optimizer_step_s'), 3)} | "
                         f"{_fmt(100 * mt['mfu'] if mt.get('mfu') is not None else None, 1)}% | {runs} |")
    if report.get("data"):
        lines += ["", "| data file | rows | legacy low-mem dataset (ms/sample) | data module (us/sample) "
                  "| speed-up | RSS growth while serving: total / anonymous (MB) |", "|---|---:|---:|---:|---:|---:|"]
        for e in report["data"]["files"]:
            lines.append(f"| {e['file_mb']:.1f} MB | {e['rows']:,} | {1e3 * e['legacy_per_sample_s']:.1f} | "
                         f"{1e6 * e['module_per_sample_s']:.1f} | {e['speedup']:,.0f}x | "
                         f"{e['module_rss_growth_mb']:.1f} / {e.get('module_anon_rss_growth_mb', float('nan')):.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for k, v in report["ratios"].items():
        if not isinstance(v, dict):
            lines.append(f"| {k} | {_fmt(v, 3)} |")
    lines += ["", "| target | value | threshold | pass |", "|---|---:|---:|---|"]
    for k, t in report["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"| {k}: {t['what']} | {_fmt(t['value'], 3)} | {t['op']} {t['threshold']} | {verdict} |")
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {k: c for k, c in combine_repeats(report["cases"]).items() if not c.get("error") and "metrics" in c}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), dpi=100)
    names = [k for k, c in cases.items() if c["case"]["group"] in ("engines", "options", "causal")]
    ax = axes[0]
    ax.barh(names, [cases[k]["metrics"]["tokens_per_s"] for k in names], color="tab:blue")
    ax.set_xlabel("tokens/s (higher is better)")
    ax.invert_yaxis()
    ax.set_title("throughput")
    ax = axes[1]
    mem = [k for k in cases if cases[k]["metrics"].get("peak_mb")]
    ax.barh(mem, [cases[k]["metrics"]["peak_mb"] for k in mem], color="tab:orange")
    ax.set_xlabel("peak memory, MB")
    ax.invert_yaxis()
    ax.set_title("peak memory")
    ax = axes[2]
    for k, c in cases.items():
        if c["case"]["group"] == "lowmem" and c["raw"].get("losses") and len(c["raw"]["losses"]) > 3:
            ax.plot(range(1, len(c["raw"]["losses"]) + 1), c["raw"]["losses"], label=c["case"]["label"] or k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title("low-memory loss curves")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# =========================================================================== main
def apply_overrides(mode: Mode, items: list[str]) -> Mode:
    """``FIELD=VALUE`` overrides of a :class:`Mode` (values typed like the field's default)."""
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Mode)}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in fields or key == "name":
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(k for k in fields if k != 'name')}")
        current = getattr(mode, key)
        if isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            changes[key] = tuple(int(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    if changes:
        mode = dataclasses.replace(mode, **changes)
        mode.name = mode.name + "*"
    return mode


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced run (under 10 minutes on 2 CPU cores)")
    size.add_argument("--tiny", action="store_true", help="tiny models, seconds per case (CI): figures not checked")
    p.add_argument("--out_dir", default="runs/bench", help="where bench.json, bench.md, bench.png go")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every case (and the matmul peak)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    p.add_argument("--no-check", "--no_check", dest="no_check", action="store_true",
                   help="exit 0 even when a target fails")
    p.add_argument("--skip_compile", action="store_true", help="leave out the torch.compile case")
    p.add_argument("--fresh_processes", action="store_true",
                   help="start every case as a new python process (imports included) instead of forking it "
                        "from a server that has imported torch, transformers and lightning once")
    p.add_argument("--keep_runs", action="store_true", help="keep each case's run directory (checkpoints)")
    p.add_argument("--case_timeout", type=float, default=1800.0, help="seconds before a case is killed")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a size/step setting of the mode (see bench.run.Mode), e.g. "
                        "--set lowmem_mem_batch=8 --set engine_steps=10")
    p.add_argument("--quiet_wait", type=float, default=0.0,
                   help="before each case, wait up to this many seconds for other processes to use under "
                        "10%% of the CPUs (measurement hygiene on a shared machine)")
    p.add_argument("--profile_step", type=int, default=0,
                   help="diagnostics: torch.profiler over optimizer step N of every case (table in bench.json)")
    p.add_argument("--cases", default=None, help="comma-separated case names to run (default: all of --only)")
    args = p.parse_args(argv)
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        p.error(f"--only: unknown group(s) {bad}; choose from {', '.join(GROUPS)}")
    args.groups = groups
    return args


def lockstep_units(cases: list[Case]) -> list[list[Case]]:
    """The cases in run order, grouped: adjacent cases with the same ``lockstep`` tag run together."""
    units: list[list[Case]] = []
    for case in cases:
        if units and case.lockstep and units[-1][0].lockstep == case.lockstep:
            units[-1].append(case)
        else:
            units.append([case])
    return units


def run_unit(unit: list[Case], launcher: CaseLauncher, files: dict[str, str], out_dir: str,
             args: argparse.Namespace, peak: dict[str, Any], flops: "_FlopCache",
             vocab: int) -> dict[str, dict[str, Any]]:
    """Run one case, or a lockstep pair taking turns step by step (the first listed starts);
    returns ``{case name: entry}``."""
    jobs = []
    pair = BatonPair(os.path.join(out_dir, "logs")) if len(unit) == 2 else None
    for i, case in enumerate(unit):
        run_dir = os.path.join(out_dir, "runs", case.name)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir, exist_ok=True)
        spec_path = os.path.join(run_dir, "spec.json")
        out_path = os.path.join(out_dir, "logs", f"{case.name}.json")
        if os.path.exists(out_path):
            os.unlink(out_path)
        spec = {"case": dataclasses.asdict(case), "files": files, "run_dir": run_dir, "threads": args.threads,
                "profile_step": args.profile_step}
        if pair is not None:
            spec["baton"] = [*pair.baton_args(i), args.case_timeout]
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        log = os.path.join(out_dir, "logs", f"{case.name}.log")
        jobs.append(("_case", [spec_path, out_path], log, case.fresh_process))
    quiet = wait_until_quiet(args.quiet_wait) if args.quiet_wait > 0 else None
    try:
        outcomes = launcher.run_together(jobs, args.case_timeout, pair)
    finally:
        if pair is not None:
            pair.close()
    results: dict[str, dict[str, Any]] = {}
    for case, job, (rc, secs, contention) in zip(unit, jobs, outcomes):
        log, out_path, run_dir = job[2], job[1][1], os.path.join(out_dir, "runs", case.name)
        contention["busy_before"] = quiet
        entry: dict[str, Any] = {"case": dataclasses.asdict(case), "wall_s": secs, "log": log,
                                 "contention": contention, "fresh_process": launcher.fresh or case.fresh_process}
        if len(unit) > 1:
            entry["lockstep_with"] = [c.name for c in unit if c is not case]
        if rc != 0 or not os.path.exists(out_path):
            entry["error"] = f"exit code {rc}: " + _tail(log, 6)
            print(f"  {case.name:24s} FAILED ({secs:.0f}s): see {log}", flush=True)
        else:
            with open(out_path, encoding="utf-8") as f:
                raw = json.load(f)
            entry["raw"] = raw
            try:
                entry["metrics"] = analyse_case(case, raw, peak, flops, vocab)
            except Exception as err:  # noqa: BLE001 - one bad case must not lose the others
                entry["error"] = f"analysis failed: {err}"
            if "metrics" in entry:
                mt = entry["metrics"]
                turns = f", in turns with {entry['lockstep_with'][0]}" if len(unit) > 1 else ""
                print(f"  {case.name:24s} {mt['tokens_per_s']:9.0f} tok/s {mt['nonpad_tokens_per_s']:9.0f} non-pad"
                      f"  step {mt['step_time_s']:.3f}s  peak {_fmt(mt['peak_mb'], 0)} MB  MFU "
                      f"{_fmt(100 * mt['mfu'] if mt['mfu'] is not None else None, 1)}%  ({secs:.0f}s{turns}, "
                      f"others' CPU {_pct(contention.get('others_cpu_fraction'))})", flush=True)
        results[case.name] = entry
        if not args.keep_runs:
            for sub in ("checkpoints", "out", "lf_data"):
                shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    return results


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_case":
        return worker_main(argv[1:])
    if argv and argv[0] == "_data":
        return data_bench_main(argv[1:])
    args = parse_args(argv)
    mode = apply_overrides(MODES["tiny" if args.tiny else "quick" if args.quick else "full"], args.set)
    out_dir = os.path.abspath(args.out_dir)
    for sub in ("logs", "runs", "data"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    cache_dir = os.path.join(out_dir, "cache")
    env = _env(args.threads, cache_dir)
    t_start = time.perf_counter()
    load_start = _load()
    print(f"chatlm bench ({mode.name}): load average {load_start}, {args.threads} threads, out_dir {out_dir}",
          flush=True)

    cases = plan_cases(mode, args.groups, skip_compile=args.skip_compile)
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"--cases: unknown {sorted(unknown)}; cases of --only: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    launcher = CaseLauncher(env, fresh=args.fresh_processes)
    launcher.start()  # its imports overlap the data preparation
    files = prepare_data(out_dir, mode, cases)
    files["grouped_max_chars"] = str(mode.grouped_max_chars)
    if any(c.arch == "llama" for c in cases):
        files["llama_dir"] = _make_llama_dir(out_dir, mode.causal_size)
    from chatlm.data.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(files["tokenizer"]))

    if not launcher.fresh:
        launcher.ready()  # nothing else running while the peak is measured
    peak = measure_peak(args.threads, mode.peak_seconds, env, out_dir)
    print(f"  matmul peak: {peak['gflops']:.1f} GFLOP/s (fp32, {peak['best_size']}^2, {peak['threads']} threads)",
          flush=True)

    flops = _FlopCache()
    results: dict[str, dict[str, Any]] = {}
    for unit in lockstep_units(cases):
        results.update(run_unit(unit, launcher, files, out_dir, args, peak, flops, vocab))

    data = None
    if "data" in args.groups:
        data = run_data_bench(out_dir, mode, launcher, args.threads)

    peak_end = measure_peak(args.threads, mode.peak_seconds, env, out_dir)
    peak["start_gflops"], peak["end_gflops"] = peak["gflops"], peak_end["gflops"]
    if peak_end["flops_per_s"] > peak["flops_per_s"]:  # the better of two: less disturbed
        for name, entry in results.items():
            if "metrics" in entry and entry["metrics"].get("mfu") is not None:
                entry["metrics"]["mfu"] *= peak["flops_per_s"] / peak_end["flops_per_s"]
        peak.update({k: peak_end[k] for k in ("flops_per_s", "gflops", "best_size", "per_size")})
    contended = {k: e["contention"].get("others_cpu_fraction") for k, e in results.items()
                 if (e.get("contention") or {}).get("others_cpu_fraction", 0) > 0.10}

    ratios, targets = compute_ratios(results, data, mode)
    report = {
        "mode": mode.name,
        "command": "python -m src bench " + " ".join(argv),
        "machine": {"cpu": _cpu_name(), "threads": args.threads, "device": "cuda" if _cuda() else "cpu",
                    "load_start": load_start, "load_end": _load(), "python": platform.python_version()},
        "peak": peak,
        "sizes": {k: {"arch": SIZES[k][0], **group_dict(SIZES[k][1])} for k in sorted({c.size for c in cases})},
        "cases": results,
        "data": data,
        "ratios": ratios,
        "targets": targets,
        "checked": mode.check and not args.no_check,
        "contended_cases": contended,
        "wall_s": time.perf_counter() - t_start,
    }
    _versions(report)
    from chatlm.util.files import atomic_write_text

    atomic_write_text(os.path.join(out_dir, "bench.json"), json.dumps(report, indent=1, default=str) + "\n")
    md = render_markdown(report)
    atomic_write_text(os.path.join(out_dir, "bench.md"), md)
    try:
        render_png(report, os.path.join(out_dir, "bench.png"))
    except Exception as err:  # noqa: BLE001 - the figures are in bench.json/bench.md anyway
        print(f"  bench.png not drawn: {err}", flush=True)
    print(md, flush=True)
    failed = [k for k, t in targets.items() if t["pass"] is not True]
    errors = [k for k, e in results.items() if e.get("error")]
    print(f"chatlm bench: {report['wall_s']:.0f}s; load average {load_start} -> {_load()}; "
          f"{len(targets) - len(failed)}/{len(targets)} targets pass"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; cases with errors: {', '.join(errors)}" if errors else ""), flush=True)
    if contended:
        print(f"chatlm bench: WARNING: other processes used over 10% of the CPUs during {', '.join(contended)}: "
              "those figures are disturbed (rerun on a quiet machine, or with --quiet_wait 300)", flush=True)
    code = exit_code(report, errors)
    if code:
        sys.exit(code)


def exit_code(report: dict[str, Any], errors: list[str]) -> int:
    """1 when the run is checked and a target failed (or could not be measured) or a case failed."""
    if not report.get("checked"):
        return 0
    failed = [k for k, t in report["targets"].items() if t["pass"] is not True]
    return 1 if failed or errors else 0


def run_data_bench(out_dir: str, mode: Mode, launcher: CaseLauncher, threads: int) -> Optional[dict[str, Any]]:
    paths = []
    for n in mode.data_rows:
        path = os.path.join(out_dir, "data", f"rows_{n}.parquet")
        if not os.path.exists(path):
            write_parquet(path, loading_rows(n, seed=n))
        paths.append(path)
    spec_path = os.path.join(out_dir, "logs", "data_spec.json")
    out_path = os.path.join(out_dir, "logs", "data.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump({"paths": paths, "rows": list(mode.data_rows), "threads": threads,
                   "cache_dir": os.path.join(out_dir, "cache"), "legacy_items": mode.data_legacy_items,
                   "module_items": mode.data_module_items}, f)
    log = os.path.join(out_dir, "logs", "data.log")
    rc, secs, contention = launcher.run("_data", [spec_path, out_path], log, 1800)
    if rc != 0:
        print(f"  data loading FAILED: see {log}", flush=True)
        return {"error": _tail(log, 6), "files": []}
    with open(out_path, encoding="utf-8") as f:
        data = json.load(f)
    for e in data["files"]:
        print(f"  data {e['rows']:>7,} rows: legacy {1e3 * e['legacy_per_sample_s']:.1f} ms/sample, module "
              f"{1e6 * e['module_per_sample_s']:.1f} us/sample ({e['speedup']:,.0f}x), RSS +"
              f"{e['module_rss_growth_mb']:.1f} MB (anonymous +{e['module_anon_rss_growth_mb']:.1f} MB)", flush=True)
    data["wall_s"] = secs
    data["contention"] = contention
    return data


def _versions(report: dict[str, Any]) -> None:
    import importlib.metadata as md

    v = {}
    for pkg in ("torch", "transformers", "lightning", "bitsandbytes", "peft", "llamafactory", "accelerate"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    report["versions"] = v


if __name__ == "__main__":
    main()
