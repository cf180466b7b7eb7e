"""Lockstep pairs: two processes take turns on the CPUs, one optimizer step each.

:mod:`bench.run` runs the engines it compares this way (``Case.lockstep``), and
:class:`bench.probe.StepProbe` hands the turn over after every optimizer step. On a shared
machine whose speed drifts (other tenants of the host, clock changes), every step of one engine
then runs a few seconds from a step of the other, so the drift slows both alike instead of
deciding which one looks faster. Nothing here imports torch.
"""

from __future__ import annotations

import os
import select
import time
from typing import Optional

__all__ = ["Baton", "BatonPair"]


class Baton:
    """Two processes take turns on the CPUs, one optimizer step at a time.

    Each process owns a FIFO from which it reads its turn (``b"G"``) and writes its partner's
    FIFO to hand the turn over; ``b"D"`` says the sender has finished, after which the
    receiver runs on without waiting. The launcher creates the FIFOs and gives the first turn
    (:class:`BatonPair`), and writes ``b"D"`` to the survivor's FIFO if a process dies; a turn
    never waits longer than ``timeout`` seconds.
    """

    GO, DONE = b"G", b"D"

    def __init__(self, mine: str, partner: str, timeout: float = 900.0) -> None:
        self.mine, self.partner, self.timeout = mine, partner, timeout
        self.partner_done = False
        self._rd: Optional[int] = None
        self._wr: Optional[int] = None

    def _open(self) -> None:
        if self._rd is None:  # O_RDWR: opening a FIFO then neither blocks nor sees end-of-file
            self._rd = os.open(self.mine, os.O_RDWR)
            self._wr = os.open(self.partner, os.O_RDWR | os.O_NONBLOCK)

    def take(self) -> float:
        """Block until it is this process's turn; returns the seconds waited."""
        self._open()
        t = time.perf_counter()
        if not self.partner_done:
            ready, _, _ = select.select([self._rd], [], [], self.timeout)
            token = os.read(self._rd, 1) if ready else self.DONE  # timed out: run on alone
            if token == self.DONE:
                self.partner_done = True
        return time.perf_counter() - t

    def hand_over(self) -> float:
        """Give the turn to the partner and wait for it to come back; returns the seconds waited."""
        if self.partner_done:
            return 0.0
        self._open()
        os.write(self._wr, self.GO)
        return self.take()

    def finish(self) -> None:
        """Tell the partner this process is done (it no longer waits for a turn)."""
        try:
            self._open()
            os.write(self._wr, self.DONE)
        except OSError:
            pass
        for fd in (self._rd, self._wr):
            if fd is not None:
                os.close(fd)
        self._rd = self._wr = None


class BatonPair:
    """The launcher's side of a lockstep pair: two FIFOs in ``directory``, held open while the
    pair runs (a FIFO nobody holds open drops what was written to it), the first turn given to
    process ``first`` (0 or 1). Use as a context manager; the FIFOs are removed at exit."""

    def __init__(self, directory: str, first: int = 0) -> None:
        self.paths = (os.path.join(directory, "turn_a.fifo"), os.path.join(directory, "turn_b.fifo"))
        self._fds: list[int] = []
        for path in self.paths:
            if os.path.exists(path):
                os.unlink(path)
            os.mkfifo(path)
            self._fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        os.write(self._fds[first], Baton.GO)

    def baton_args(self, i: int) -> list[str]:
        """``Baton(*args)`` for process ``i``: its own FIFO, then its partner's."""
        return [self.paths[i], self.paths[1 - i]]

    def release(self, i: int) -> None:
        """Process ``i`` runs on alone from now on (its partner has ended)."""
        os.write(self._fds[i], Baton.DONE)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        for path in self.paths:
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> "BatonPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
