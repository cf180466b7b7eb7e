# HF_HUB_OFFLINE=1 python -m pytest tests/test_lockstep.py -q
"""bench.lockstep.Baton: two processes take turns, and a dead partner never blocks the other."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

from bench.lockstep import Baton, BatonPair


def _stepper(mine: str, partner: str, steps: int, out: str, die_after: int = -1) -> None:
    baton = Baton(mine, partner, timeout=60)
    baton.take()
    spans, waited = [], 0.0
    for k in range(steps):
        t0 = time.perf_counter()
        busy_until = t0 + 0.02
        while time.perf_counter() < busy_until:  # a "step" of CPU work
            pass
        spans.append((t0, time.perf_counter()))
        if k == die_after:
            os._exit(3)  # no finish(): the launcher has to release the partner
        waited += baton.hand_over()
    baton.finish()
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"spans": spans, "waited": waited, "partner_done": baton.partner_done}, f)


def _start(ctx, pair, steps, tmp_path, die_after=(-1, -1)):
    procs = []
    for i in (0, 1):
        p = ctx.Process(target=_stepper, args=(*pair.baton_args(i), steps[i], str(tmp_path / f"{i}.json"),
                                               die_after[i]))
        p.start()
        procs.append(p)
    return procs


def test_two_processes_take_turns_one_step_each(tmp_path):
    ctx = mp.get_context("fork")
    with BatonPair(str(tmp_path)) as pair:
        procs = _start(ctx, pair, (6, 4), tmp_path)  # unequal lengths: the longer one runs on alone
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    a, b = (json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1))
    spans = sorted([(s, e, "a") for s, e in a["spans"]] + [(s, e, "b") for s, e in b["spans"]])
    for (s0, e0, _), (s1, _, _) in zip(spans, spans[1:]):
        assert e0 <= s1, "two steps ran at the same time"
    order = "".join(who for _, _, who in spans)
    assert order == "abababab" + "aa"
    assert a["waited"] > 0.02 * 3 and b["partner_done"] is False and a["partner_done"] is True


def test_a_partner_that_dies_does_not_block_the_other(tmp_path):
    ctx = mp.get_context("fork")
    with BatonPair(str(tmp_path)) as pair:
        procs = _start(ctx, pair, (5, 5), tmp_path, die_after=(-1, 1))
        procs[1].join(60)
        assert procs[1].exitcode == 3
        pair.release(0)  # what CaseLauncher.run_together does when a case process ends
        procs[0].join(60)
        assert procs[0].exitcode == 0
    assert not os.path.exists(pair.paths[0])
    a = json.loads((tmp_path / "0.json").read_text())
    assert len(a["spans"]) == 5 and a["partner_done"] is True
