"""Train and load byte-level BPE tokenizers: ``[PAD]``=0, ``[EOS]``=1, ``[UNK]``=2, ``[BOS]``=3.

    python -m src tokenizer --train_files data/train.parquet --vocab_size 1024 --out_dir tok/

The tokenizer adds no special token of its own (no post-processor): ``"你好[EOS]"`` encodes
to the text's tokens followed by exactly one eos id, as the legacy data path expects. Digits
are split one by one; everything else is byte-level BPE (any text encodes, nothing is UNK).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence

import pyarrow.parquet as pq

from chatlm.data.formatting import DEFAULT_CHAT_TEMPLATE
from chatlm.data.sources import iter_text_batches
from chatlm.errors import DataError
from chatlm.util.files import atomic_dir

__all__ = ["SPECIAL_TOKENS", "load_tokenizer", "main", "train_tokenizer"]

#: Special tokens in id order.
SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[UNK]", "[BOS]")


def _iter_texts(files: Sequence[str], columns: Sequence[str]) -> Iterator[str]:
    """Every text of the given columns of every file, streamed in Arrow record batches."""
    for path in files:
        for batch in iter_text_batches(path, columns):
            for column in batch.columns:
                yield from column.to_pylist()


def _count_texts(files: Sequence[str], columns: Sequence[str]) -> int | None:
    """Number of texts (a progress hint for the trainer); None when not cheaply known."""
    if not all(f.lower().endswith((".parquet", ".pq")) for f in files):
        return None
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files) * len(columns)
    except (OSError, ValueError):  # pyarrow errors are ValueError / OSError subclasses
        return None


def train_tokenizer(
    files: list[str],
    vocab_size: int,
    out_dir: str,
    columns: Sequence[str] = ("prompt", "response"),
    min_frequency: int = 2,
    model_max_length: int = 2048,
):
    """Train a byte-level BPE tokenizer on text columns and save it with ``save_pretrained``.

    Args:
        files: Parquet or JSON lines files (``columns`` are read) or ``.txt`` files (every
            non-empty line).
        vocab_size: Vocabulary size including the 4 special tokens (at least 300: the 256
            byte symbols must fit).
        out_dir: Output directory; written to a temporary directory first, then renamed.
        columns: Text columns to learn from.
        min_frequency: Minimum pair count for a merge.
        model_max_length: Stored as the tokenizer's ``model_max_length``.

    Returns:
        The trained ``PreTrainedTokenizerFast`` (pad/eos/unk/bos set, chat template set).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not files:
        raise DataError("tokenizer: no --train_files given")
    if vocab_size < 300:
        raise DataError(f"tokenizer: --vocab_size must be >= 300 (256 bytes + specials), got {vocab_size}")
    for path in files:  # fail fast with a one-line DataError, before the trainer starts
        next(iter_text_batches(path, columns), None)

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(files, columns), trainer=trainer, length=_count_texts(files, columns))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} is not id {i}"

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    _save_atomically(fast, out_dir)
    return fast


def _save_atomically(tokenizer, out_dir: str) -> None:
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(path: str):
    """Load a tokenizer directory with ``AutoTokenizer`` (never remote code).

    Raises:
        DataError: the directory is missing or unreadable, or the tokenizer lacks a pad or
            an eos token.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"{path}: tokenizer directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: cannot load tokenizer ({' '.join(str(err).split())[:300]})") from None
    if tokenizer.pad_token_id is None:
        raise DataError(f"{path}: tokenizer has no pad token")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{path}: tokenizer has no eos token")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """``python -m src tokenizer --train_files A.parquet [B ...] --vocab_size N --out_dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m src tokenizer",
        description="Train a byte-level BPE tokenizer ([PAD]=0, [EOS]=1, [UNK]=2, [BOS]=3).",
    )
    parser.add_argument("--train_files", nargs="+", required=True,
                        help="parquet / jsonl / txt files to learn from")
    parser.add_argument("--vocab_size", type=int, required=True, help="vocabulary size (>= 300)")
    parser.add_argument("--out_dir", required=True, help="output directory (save_pretrained format)")
    parser.add_argument("--columns", nargs="+", default=["prompt", "response"],
                        help="text columns of parquet files (default: prompt response)")
    parser.add_argument("--min_frequency", type=int, default=2, help="minimum pair count for a merge")
    parser.add_argument("--model_max_length", type=int, default=2048, help="stored model_max_length")
    args = parser.parse_args(argv)
    tok = train_tokenizer(args.train_files, args.vocab_size, args.out_dir, columns=tuple(args.columns),
                          min_frequency=args.min_frequency, model_max_length=args.model_max_length)
    print(f"wrote tokenizer ({len(tok)} tokens) to {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main()
