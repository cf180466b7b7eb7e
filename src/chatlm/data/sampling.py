"""Batch order: a pure function of (seed, epoch), sharded over ranks, resumable mid-epoch.

:func:`epoch_batches` lists the *global* batches of one epoch. With ``num_replicas``
processes of per-device batch ``b`` the global batch is ``b * num_replicas`` and rank ``r``
takes ``batch[r*b:(r+1)*b]``, so 2 processes at batch ``b`` see exactly the rows that one
process sees at batch ``2b``, in the same order.

:class:`ShardedBatchSampler` yields one rank's share; :class:`ResumableDataLoader` counts
the batches it actually handed out and saves / restores that count through Lightning (a
train dataloader with ``state_dict`` / ``load_state_dict`` is saved in every checkpoint
under ``loops.fit_loop.state_dict.combined_loader`` and restored before the first
iteration), so a resumed run continues with the next unseen batch of the same epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler

__all__ = ["MEGA_BATCH_FACTOR", "ResumableDataLoader", "ShardedBatchSampler", "epoch_batches"]

#: group_by_length sorts windows of this many batches by length.
MEGA_BATCH_FACTOR = 50


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, epoch])


def epoch_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
    lengths: Sequence[int] | np.ndarray | None = None,
    group_by_length: bool = False,
) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch; depends on nothing but its arguments.

    Args:
        n: Number of rows.
        batch_size: Rows per batch (the *global* batch when several processes share it).
        seed: Base seed; with ``epoch`` it seeds ``np.random.default_rng([seed, epoch])``.
        epoch: Epoch number (each epoch has its own order).
        shuffle: Permute the rows; unshuffled batches are ``[0..b-1], [b..2b-1], ...``.
        drop_last: Drop a last batch shorter than ``batch_size``.
        lengths: Per-row lengths (needed by ``group_by_length``).
        group_by_length: Permute, cut into windows of ``MEGA_BATCH_FACTOR`` batches, sort each
            window by length (longest first), cut into batches, shuffle the batch order and put
            the heaviest batch (rows x longest length) first, so an out-of-memory shows at once.
            Without ``shuffle`` the windows are sorted but the batch order is kept.

    Every row appears exactly once (except in a dropped last batch). Only the last batch in
    row order can be short; with ``group_by_length`` it may end up anywhere.
    """
    if n < 0 or batch_size < 1 or epoch < 0:
        raise ValueError(f"epoch_batches needs n >= 0, batch_size >= 1, epoch >= 0 (got {n}, {batch_size}, {epoch})")
    rng = _rng(seed, epoch)
    order = rng.permutation(n) if shuffle else np.arange(n)
    lens: np.ndarray | None = None
    if group_by_length:
        if lengths is None or len(lengths) != n:
            raise ValueError(f"group_by_length needs {n} lengths, got {None if lengths is None else len(lengths)}")
        lens = np.asarray(lengths)
        window = batch_size * MEGA_BATCH_FACTOR
        order = np.concatenate(
            [chunk[np.argsort(-lens[chunk], kind="stable")] for chunk in np.split(order, range(window, n, window))]
        ) if n else order
    batches = np.split(order, range(batch_size, n, batch_size)) if n else []
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if lens is not None and shuffle and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        weight = [len(b) * int(lens[b].max()) for b in batches]
        heaviest = int(np.argmax(weight))
        batches[0], batches[heaviest] = batches[heaviest], batches[0]
    return [b.tolist() for b in batches]


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's batches of :func:`epoch_batches` with global batch ``batch_size * num_replicas``.

    Rank ``r`` takes ``[r*batch_size:(r+1)*batch_size]`` of each global batch. A short last
    global batch is split as evenly as possible (contiguous parts, sizes differ by at most
    one); if it has fewer rows than ``num_replicas``, some rank would get nothing, so it is
    dropped for every rank. All ranks therefore yield the same number of batches.

    Resumable: :meth:`state_dict` gives ``{"epoch", "batches_done"}``; after
    :meth:`load_state_dict` the next iteration of that epoch skips its first
    ``batches_done`` batches (later epochs start from 0). Lightning calls :meth:`set_epoch`
    through ``batch_sampler.sampler`` (this object) at the start of every epoch.

    Args:
        n: Number of rows in the dataset.
        batch_size: Rows per batch on this device.
        seed: Base seed of the order.
        shuffle: Shuffle rows every epoch.
        drop_last: Drop a short last global batch.
        lengths: Per-row lengths for ``group_by_length``.
        group_by_length: See :func:`epoch_batches`.
        num_replicas: Number of processes sharing each global batch.
        rank: This process' rank in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_by_length: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"ShardedBatchSampler needs a row count n >= 0, got {n!r}")
        if batch_size < 1:
            raise ValueError(f"ShardedBatchSampler needs batch_size >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ShardedBatchSampler needs 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        if group_by_length and (lengths is None or len(lengths) != n):
            raise ValueError(f"group_by_length needs {n} lengths")
        self.n = int(n)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group_by_length = group_by_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._batches_done = 0
        self._resume: dict[str, int] | None = None

    @property
    def sampler(self) -> ShardedBatchSampler:
        """Itself: Lightning calls ``dataloader.batch_sampler.sampler.set_epoch(epoch)``."""
        return self

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        if epoch != self.epoch:
            self._batches_done = 0
        self.epoch = int(epoch)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (all of them, ignoring any resume offset)."""
        out = []
        size, replicas = self.batch_size, self.num_replicas
        for batch in epoch_batches(self.n, self.global_batch_size, self.seed, epoch, self.shuffle,
                                   self.drop_last, self.lengths, self.group_by_length):
            m = len(batch)
            if m == self.global_batch_size:
                out.append(batch[self.rank * size:(self.rank + 1) * size])
            elif m >= replicas:
                base, extra = divmod(m, replicas)
                start = self.rank * base + min(self.rank, extra)
                out.append(batch[start:start + base + (1 if self.rank < extra else 0)])
        return out

    def resume_offset(self, epoch: int) -> int:
        """Batches the next iteration of ``epoch`` skips (from :meth:`load_state_dict`)."""
        if self._resume is not None and self._resume["epoch"] == epoch:
            return self._resume["batches_done"]
        return 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        start = self.resume_offset(epoch)
        self._resume = None
        self._batches_done = start
        for batch in self.rank_batches(epoch)[start:]:
            self._batches_done += 1
            yield batch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch_size)
        return full + (1 if rest and not self.drop_last and rest >= self.num_replicas else 0)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done"}``: batches this sampler handed out in ``epoch``.

        With worker processes the sampler runs ahead of the training loop; use
        :meth:`ResumableDataLoader.state_dict`, which counts batches actually delivered.
        """
        if self._resume is not None:
            return dict(self._resume)
        return {"epoch": self.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches on the next iteration."""
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        if epoch < 0 or done < 0:
            raise ValueError(f"invalid sampler state {state_dict!r}")
        self.epoch = epoch
        self._batches_done = done
        self._resume = {"epoch": epoch, "batches_done": done}


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardedBatchSampler` that Lightning can checkpoint.

    It counts the batches its iterator actually yielded in the current epoch (not those the
    sampler prepared: workers prefetch), and exposes ``state_dict()`` /
    ``load_state_dict()``. Lightning 2.6 stores the state of every train dataloader with
    these two methods in the checkpoint (``CombinedLoader._state_dicts``) and restores it
    before creating the first iterator of the resumed fit; that iteration then skips the
    batches already done, and later epochs start from 0.

    Iteration is lazy: the epoch is read at the first ``next()``, i.e. after Lightning's
    ``set_epoch`` call, even though Lightning creates the iterator before it.

    Args:
        dataset: Map-style dataset (``datasets.Dataset`` is fetched a batch at a time).
        batch_sampler: The sampler giving this rank's batches.
        **kwargs: Other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Any, batch_sampler: ShardedBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, ShardedBatchSampler):
            raise TypeError(f"ResumableDataLoader needs a ShardedBatchSampler, got {type(batch_sampler).__name__}")
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._epoch = batch_sampler.epoch
        self._batches_done = 0
        self._loaded: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ShardedBatchSampler = self.batch_sampler  # type: ignore[assignment]
        epoch = sampler.epoch
        self._epoch, self._batches_done, self._loaded = epoch, sampler.resume_offset(epoch), None
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_done"}``: batches delivered so far in the current epoch."""
        if self._loaded is not None:
            return dict(self._loaded)
        sampler_epoch = self.batch_sampler.epoch  # type: ignore[union-attr]
        if sampler_epoch != self._epoch:  # set_epoch called, next epoch not started yet
            return {"epoch": sampler_epoch, "batches_done": 0}
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration continue ``epoch`` after ``batches_done`` batches."""
        self.batch_sampler.load_state_dict(state_dict)  # type: ignore[union-attr]
        self._loaded = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}
        self._epoch, self._batches_done = self._loaded["epoch"], self._loaded["batches_done"]
