"""chatlm.infer.metrics: BLEU-4 equals the legacy implementation, bit for bit."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from chatlm.infer.metrics import bleu4, mean_bleu4

# legacy-spec.md "BLEU-4" reference values.
REFERENCE_TABLE = [
    ("抱歉，我不知道ABB代表什么意思", "我不明白ABB是什么意思", 0.24485547321266596),
    ("今天天气很好", "今天天气很好，我们去公园散步吧", 0.5899515426074043),
    ("今天天气很好，我们去公园散步吧", "今天天气很好", 0.22313016014842982),
    ("我爱北京天安门", "我爱北京", 0.4723665527410147),
    ("今天天气很好", "今天天气很好", 1.0),
    ("你好", "你好", 0.0),
]


def _legacy_ngrams(words, n_gram):
    counter = Counter()
    for i in range(1, n_gram + 1):
        for j in range(len(words) - i + 1):
            counter[(" ".join(words[j:j + i]), i)] += 1
    return counter


def legacy_bleu4(reference, outputs, n_gram=4):
    """The legacy project's get_bleu4_score, kept verbatim in substance as the oracle."""
    weights = np.ones(n_gram) * (1.0 / n_gram)
    outputs_len, reference_len = len(outputs), len(reference)
    reference, outputs = list(reference), list(outputs)
    outputs_counter = _legacy_ngrams(outputs, n_gram)
    clip = outputs_counter & _legacy_ngrams(reference, n_gram)
    clip_counter, output_counter = np.zeros(n_gram), np.zeros(n_gram)
    for (_, n), cnt in clip.items():
        clip_counter[n - 1] += cnt
    for (_, n), cnt in outputs_counter.items():
        output_counter[n - 1] += cnt
    if np.min(clip_counter) == 0.0:
        return np.array(0.0)
    geometric_mean = np.exp(np.sum(weights * np.log(clip_counter / output_counter)))
    return np.exp(1 - (reference_len / outputs_len)) * geometric_mean


@pytest.mark.parametrize("reference,output,score", REFERENCE_TABLE)
def test_reference_values(reference, output, score):
    assert bleu4(reference, output) == pytest.approx(score, abs=1e-12)
    assert isinstance(bleu4(reference, output), float)


def test_bit_identical_to_legacy_on_random_strings():
    rng = random.Random(0)
    for _ in range(3000):
        ref = "".join(rng.choice("今天气很好 ab") for _ in range(rng.randint(0, 25)))
        out = "".join(rng.choice("今天气很好 ab") for _ in range(rng.randint(0, 25)))
        assert bleu4(ref, out) == float(legacy_bleu4(ref, out)), (ref, out)
        assert 0.0 <= bleu4(ref, out) <= 1.0 + 1e-12


def test_legacy_quirks():
    assert bleu4("abc", "abc") == 0.0  # under 4 characters: no 4-gram can match
    assert bleu4("abcd", "") == 0.0
    assert bleu4("", "abcd") == 0.0
    # The brevity term exp(1 - r/o) also applies to longer outputs, where it exceeds 1
    # (standard BLEU uses 1 there): 6 reference characters, 15 output characters.
    geometric_mean = (6 / 15 * 5 / 14 * 4 / 13 * 3 / 12) ** 0.25
    score = bleu4("今天天气很好", "今天天气很好，我们去公园散步吧")
    assert score == pytest.approx(geometric_mean * np.exp(1 - 6 / 15), abs=1e-12)
    assert score > geometric_mean


def test_mean_bleu4():
    refs = [r for r, _, _ in REFERENCE_TABLE]
    outs = [o for _, o, _ in REFERENCE_TABLE]
    assert mean_bleu4(refs, outs) == pytest.approx(sum(s for *_, s in REFERENCE_TABLE) / 6, abs=1e-12)
    assert mean_bleu4([], []) == 0.0
    with pytest.raises(ValueError, match="2 references but 1 outputs"):
        mean_bleu4(["a", "b"], ["a"])
