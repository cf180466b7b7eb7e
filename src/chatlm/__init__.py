"""chatlm: one Lightning trainer for small chat LMs (T5 seq2seq and causal)."""

__version__ = "0.1.0"
