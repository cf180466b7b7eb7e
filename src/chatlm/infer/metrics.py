"""BLEU-4 exactly as the legacy project computes it (character level, legacy brevity term).

Per sentence: the strings are split into characters; n-grams of order 1..4 are counted with
clipping (an output n-gram counts at most as often as in the reference). The score is 0 when
any order has no match (so any output under 4 characters scores 0), else the geometric mean
of the four precisions times ``exp(1 - len(reference) / len(output))``. That last factor is
applied whether the output is shorter or longer than the reference, so a longer output is
boosted (standard BLEU uses 1 there): a legacy defect kept on purpose so scores compare with
the old runs. (Clipping still keeps every score <= 1: the precisions of an output longer than
its reference are below ``len(reference) / len(output)``, and ``x * exp(1 - x) <= 1``.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

MAX_ORDER = 4


def _ngrams(chars: Sequence[str], max_order: int) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(chars) - n + 1):
            counts[tuple(chars[i:i + n])] += 1
    return counts


def bleu4(reference: str, output: str) -> float:
    """Legacy character-level BLEU-4 of ``output`` against ``reference`` (see module doc)."""
    ref_counts = _ngrams(reference, MAX_ORDER)
    out_counts = _ngrams(output, MAX_ORDER)
    clipped = np.zeros(MAX_ORDER)
    total = np.zeros(MAX_ORDER)
    for gram, count in (out_counts & ref_counts).items():
        clipped[len(gram) - 1] += count
    for gram, count in out_counts.items():
        total[len(gram) - 1] += count
    if np.min(clipped) == 0.0:
        return 0.0
    # The legacy numpy operations in the legacy order: numpy's exp/log can differ from the
    # math module's in the last bit, and parity wants the very same floats.
    weights = np.ones(MAX_ORDER) * (1.0 / MAX_ORDER)
    geometric_mean = np.exp(np.sum(weights * np.log(clipped / total)))
    brevity = np.exp(1 - (len(reference) / len(output)))
    return float(brevity * geometric_mean)


def mean_bleu4(references: Sequence[str], outputs: Sequence[str]) -> float:
    """Mean :func:`bleu4` over pairs (0.0 for no pairs)."""
    if len(references) != len(outputs):
        raise ValueError(f"got {len(references)} references but {len(outputs)} outputs")
    if not references:
        return 0.0
    return sum(bleu4(r, o) for r, o in zip(references, outputs, strict=True)) / len(references)
