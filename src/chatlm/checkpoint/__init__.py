"""Checkpoints as one component (docs/reliability.md).

* :mod:`~chatlm.checkpoint.store` -- the one safe loader (``weights_only=True``, one-line
  errors) and atomic, disk-checked saves; used by resume, the callbacks, export, predict and
  the legacy shims.
* :mod:`~chatlm.checkpoint.rng` -- RNG state capture and its checkpoint codec (main path and
  legacy loop).
* :mod:`~chatlm.checkpoint.preflight` -- ``--ckpt_path`` exists, loads and fits the model.
* :mod:`~chatlm.checkpoint.trainer_io` -- Lightning's CheckpointIO plugin and ``last.ckpt``.
"""
