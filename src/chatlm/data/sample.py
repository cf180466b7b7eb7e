"""The bundled sample task: small, regular prompt/response pairs in English and Chinese.

    python -m chatlm.data.sample --out_dir src/chatlm/data/sample     # regenerate the bundled files

Four tasks, equally mixed, every prompt and response under 40 characters and every
response at least 6 characters (legacy BLEU-4 scores outputs under 4 characters as 0):

* ``spell 472``           -> ``472 is four hundred seventy-two``
* ``读出 472``            -> ``472 读作 四百七十二``
* ``add 3 and 5``         -> ``3 + 5 = 8``
* ``translate 苹果``      -> ``苹果 means apple``  (40 words)

A tiny T5 (d_model 128, d_ff 256, 2+2 layers, AdamW 3e-3, batch 32) reaches validation
BLEU-4 ~0.65 after ~200 steps (about 2 minutes on 2 CPU cores). A letter-reversal task was
tried and dropped: such a model scored ~0.04 on it in the same time. The rows are a pure
function of ``(n, seed)``.
"""

from __future__ import annotations

import argparse
import os
import random

__all__ = [
    "SAMPLE_DIR",
    "SPLIT_SEEDS",
    "SPLIT_SIZES",
    "TOKENIZER_VOCAB_SIZE",
    "generate_rows",
    "main",
    "sample_file",
    "sample_tokenizer_dir",
    "spell_chinese",
    "spell_english",
    "write_sample",
]

#: Directory of the bundled files (train/val/test parquet and tokenizer/).
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
SPLIT_SIZES = {"train": 6000, "val": 200, "test": 200}
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
TOKENIZER_VOCAB_SIZE = 768

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ZH_DIGITS = "零一二三四五六七八九"
_WORDS = [
    ("猫", "cat"), ("狗", "dog"), ("鱼", "fish"), ("鸟", "bird"), ("马", "horse"), ("牛", "cow"),
    ("羊", "sheep"), ("鸡", "chicken"), ("山", "mountain"), ("水", "water"), ("火", "fire"), ("风", "wind"),
    ("雨", "rain"), ("雪", "snow"), ("花", "flower"), ("树", "tree"), ("书", "book"), ("笔", "pen"),
    ("桌子", "table"), ("椅子", "chair"), ("苹果", "apple"), ("香蕉", "banana"), ("米饭", "rice"), ("面包", "bread"),
    ("太阳", "sun"), ("月亮", "moon"), ("星星", "star"), ("天空", "sky"), ("大海", "sea"), ("河流", "river"),
    ("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("白色", "white"), ("黑色", "black"), ("朋友", "friend"),
    ("学校", "school"), ("老师", "teacher"), ("学生", "student"), ("医生", "doctor"),
]


def spell_english(n: int) -> str:
    """0..999 in English words: ``472 -> "four hundred seventy-two"``."""
    if not 0 <= n <= 999:
        raise ValueError(f"spell_english handles 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {spell_english(rest)}" if rest else "")


def spell_chinese(n: int) -> str:
    """0..999 in Chinese numerals: ``472 -> "四百七十二"``, ``105 -> "一百零五"``, ``12 -> "十二"``."""
    if not 0 <= n <= 999:
        raise ValueError(f"spell_chinese handles 0..999, got {n}")
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 20:
        return "十" + (_ZH_DIGITS[n - 10] if n > 10 else "")
    if n < 100:
        tens, ones = divmod(n, 10)
        return _ZH_DIGITS[tens] + "十" + (_ZH_DIGITS[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    out = _ZH_DIGITS[hundreds] + "百"
    if rest == 0:
        return out
    if rest < 10:
        return out + "零" + _ZH_DIGITS[rest]
    tens, ones = divmod(rest, 10)
    return out + _ZH_DIGITS[tens] + "十" + (_ZH_DIGITS[ones] if ones else "")


def _row(task: int, rng: random.Random) -> dict[str, str]:
    if task == 0:
        n = rng.randrange(1000)
        return {"prompt": f"spell {n}", "response": f"{n} is {spell_english(n)}"}
    if task == 1:
        n = rng.randrange(1000)
        return {"prompt": f"读出 {n}", "response": f"{n} 读作 {spell_chinese(n)}"}
    if task == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"prompt": f"add {a} and {b}", "response": f"{a} + {b} = {a + b}"}
    zh, en = rng.choice(_WORDS)
    return {"prompt": f"translate {zh}", "response": f"{zh} means {en}"}


def generate_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "response"}``; tasks cycle in order, values drawn from ``seed``."""
    rng = random.Random(seed)
    return [_row(i % 4, rng) for i in range(n)]


def write_sample(
    out_dir: str,
    n_train: int = SPLIT_SIZES["train"],
    n_val: int = SPLIT_SIZES["val"],
    n_test: int = SPLIT_SIZES["test"],
    tokenizer: bool = True,
) -> dict[str, str]:
    """Write ``train.parquet``, ``val.parquet``, ``test.parquet`` (and ``tokenizer/``) to ``out_dir``.

    Returns the written paths by split (and ``"tokenizer"``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        path = os.path.join(out_dir, f"{split}.parquet")
        table = pa.Table.from_pylist(generate_rows(n, SPLIT_SEEDS[split]),
                                     schema=pa.schema([("prompt", pa.string()), ("response", pa.string())]))
        tmp = path + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        written[split] = path
    if tokenizer:
        from chatlm.data.tokenizer import train_tokenizer

        written["tokenizer"] = os.path.join(out_dir, "tokenizer")
        train_tokenizer([written["train"]], TOKENIZER_VOCAB_SIZE, written["tokenizer"])
    return written


def sample_file(split: str) -> str:
    """Path of a bundled split: ``train``, ``val`` (also ``validation``) or ``test``."""
    split = {"validation": "val", "valid": "val", "fit": "train"}.get(split, split)
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown sample split {split!r}; expected train, val or test")
    return os.path.join(SAMPLE_DIR, f"{split}.parquet")


def sample_tokenizer_dir() -> str:
    """Path of the bundled tokenizer trained on the sample (vocab 768)."""
    return os.path.join(SAMPLE_DIR, "tokenizer")


def main(argv: list[str] | None = None) -> None:
    """``python -m chatlm.data.sample --out_dir DIR``: regenerate the sample files."""
    parser = argparse.ArgumentParser(prog="python -m chatlm.data.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=SAMPLE_DIR, help=f"output directory (default {SAMPLE_DIR})")
    parser.add_argument("--n_train", type=int, default=SPLIT_SIZES["train"])
    parser.add_argument("--n_val", type=int, default=SPLIT_SIZES["val"])
    parser.add_argument("--n_test", type=int, default=SPLIT_SIZES["test"])
    parser.add_argument("--no_tokenizer", action="store_true", help="do not train tokenizer/")
    args = parser.parse_args(argv)
    written = write_sample(args.out_dir, args.n_train, args.n_val, args.n_test, tokenizer=not args.no_tokenizer)
    for name, path in written.items():
        print(f"wrote {name}: {path}")


if __name__ == "__main__":
    main()
