"""The simulator: hand-computed schedules, and `check` catching every kind of violation."""

from __future__ import annotations

import dataclasses
import random

import pytest

from moirai.costgraph import Device
from moirai.placement import (
    InvalidScheduleError,
    PlacementProblem,
    ScheduledTask,
    ScheduledTransfer,
    check,
    evaluate,
    list_schedule,
    period,
    solve,
)
from moirai.placement.bounds import critical_path, device_critical_path, lower_bound, total_work
from moirai.placement.simulate import Replay, Timeline, loads, retime

from .instances import fork, random_costgraph, random_dag


def test_list_schedule_by_hand() -> None:
    # c on y: a ends 1, transfer a->c 1..3, c 3..6, transfer c->d 6..8, d at 8..9; b 1..4 on x
    plan = evaluate(fork(), {"a": "x", "b": "x", "c": "y", "d": "x"})
    times = {s.task: (s.start_ms, s.end_ms) for s in plan.schedule}
    assert times == {"a": (1 - 1, 1), "b": (1, 4), "c": (3, 6), "d": (8, 9)}
    assert plan.makespan_ms == 9
    assert check(PlacementProblem(fork()), plan) == 9
    # same device: no transfers, 8 ms serial
    assert evaluate(fork(), dict.fromkeys("abcd", "x")).makespan_ms == 8


def test_congestion_serialises_transfers_on_a_port() -> None:
    # b and c on y: both transfers leave x's send port; the second waits for the first
    plan = evaluate(fork(), {"a": "x", "b": "y", "c": "y", "d": "x"})
    sends = sorted((t.start_ms, t.end_ms) for t in plan.transfers if t.from_device == "x")
    assert sends == [(1, 3), (3, 5)]
    check(PlacementProblem(fork()), plan)


def test_period_is_the_busiest_resource() -> None:
    gpus = dataclasses.replace(
        fork(), devices=(Device("x", 10**9, "gpu"), Device("y", 10**9, "gpu"))
    )
    p = PlacementProblem(gpus)
    x, y = p.device_index["x"], p.device_index["y"]
    assign = [x, x, y, x]  # a b c d
    # x computes 1+3+1 = 5; x sends a->c (2); x receives c->d (2); y computes 3
    assert period(p, assign) == 5
    assert period(p, [x, y, y, y]) == pytest.approx(7)  # y computes 3+3+1


def test_period_charges_transfers_to_the_devices_that_pay_for_them() -> None:
    p = PlacementProblem(fork("cpu"))  # CPU devices: a stage server copies tensors on its own core
    x, y = p.device_index["x"], p.device_index["y"]
    assign = [x, x, y, x]
    # x: computes 5, sends a->c (2), receives c->d (2); y: computes 3, receives 2, sends 2
    assert loads(p, assign) == [9, 7, 2, 2, 2, 2]  # devices x y, send ports, receive ports
    assert period(p, assign) == 9
    assert period(p, [x] * 4) == 8  # no transfer: one device computing everything wins
    # a CPU told otherwise, and a GPU told to pay, swap roles
    swapped = dataclasses.replace(
        fork("cpu"),
        devices=(
            Device("x", 10**9, transfers_occupy_device=False),
            Device("y", 10**9, "gpu", transfers_occupy_device=True),
        ),
    )
    assert loads(PlacementProblem(swapped), assign) == [5, 7, 2, 2, 2, 2]


def test_hop_work_by_hand() -> None:
    # CPUs: a 2 ms hop is 1 ms of work on the sender from its start and 1 ms on the receiver
    # once the data is in. a 0..1 on x; a->c 1..3 with x busy 1..2, y receiving 2..3; b waits
    # for x: 2..5; c 3..6 on y; c->d 6..8 with y busy 6..7, x receiving 7..8; d 8..9
    cpus = fork("cpu")
    p = PlacementProblem(cpus)
    assert p.send_work[0][0][1] == p.recv_work[0][0][1] == 1.0
    assert p.send_work[0][0][0] == 0.0
    plan = evaluate(cpus, {"a": "x", "b": "x", "c": "y", "d": "x"})
    times = {s.task: (s.start_ms, s.end_ms) for s in plan.schedule}
    assert times == {"a": (0, 1), "b": (2, 5), "c": (3, 6), "d": (8, 9)}
    hops = {(t.src, t.dst): (t.start_ms, t.end_ms, t.arrive_ms) for t in plan.transfers}
    assert hops == {("a", "c"): (1, 3, 3), ("c", "d"): (6, 8, 8)}
    assert check(p, plan) == 9
    # the same plan on GPUs leaves b where it was
    assert {s.task: s.start_ms for s in evaluate(fork(), plan.assignment).schedule}["b"] == 1
    # a task over the sender's share, or the consumer before the receiver's, is caught
    early_b = [s if s.task != "b" else ScheduledTask("b", "x", 1.0, 4.0) for s in plan.schedule]
    with pytest.raises(InvalidScheduleError, match=r"device 'x': .*hop a->c.* overlap"):
        check(p, _bad(plan, schedule=early_b))
    late = [dataclasses.replace(t, arrive_ms=4.0) if t.src == "a" else t for t in plan.transfers]
    with pytest.raises(InvalidScheduleError, match="before its input from 'a' arrives at 4"):
        check(p, _bad(plan, transfers=late))
    soon = [dataclasses.replace(t, arrive_ms=2.5) if t.src == "a" else t for t in plan.transfers]
    with pytest.raises(InvalidScheduleError, match="before its data is in"):
        check(p, _bad(plan, transfers=soon))


def test_transfers_sent_when_their_source_ends() -> None:
    # pushing a's output before b takes x (eager) beats sending it when c is placed (lazy)
    p = PlacementProblem(fork("cpu"))
    assign = {"a": "x", "b": "x", "c": "y", "d": "x"}
    order = ["a", "b", "c", "d"]
    assert list_schedule(p, assign, order, eager=True).makespan == 9
    assert list_schedule(p, assign, order, eager=False).makespan == 12
    assert list_schedule(p, assign, order).makespan == 9  # the better of the two


def test_bounds_are_valid_and_ordered() -> None:
    p = PlacementProblem(fork())
    assert critical_path(p) == 5  # a b d on the fastest devices
    assert total_work(p) == 4
    assert device_critical_path(p) == 5
    assert lower_bound(p) <= solve(fork(), "cpsat", time_limit=10, threads=1).makespan_ms


def _bad(plan, **changes):  # type: ignore[no-untyped-def]
    return dataclasses.replace(plan, **changes)


@pytest.fixture
def good():  # type: ignore[no-untyped-def]
    return evaluate(fork(), {"a": "x", "b": "y", "c": "y", "d": "x"})


def test_check_catches_device_overlap(good) -> None:  # type: ignore[no-untyped-def]
    # inputs: a->b arrives at 3, a->c at 5 (one send port); b 3..6 and c 5..8 overlap on y
    sched = [s if s.task != "b" else ScheduledTask("b", "y", 3.0, 6.0) for s in good.schedule]
    sched = [s if s.task != "c" else ScheduledTask("c", "y", 5.0, 8.0) for s in sched]
    with pytest.raises(InvalidScheduleError, match=r"device 'y': .* overlap"):
        check(fork(), _bad(good, schedule=sched))


def test_check_catches_port_congestion(good) -> None:  # type: ignore[no-untyped-def]
    xs = [
        dataclasses.replace(t, start_ms=1.0, end_ms=3.0) if t.from_device == "x" else t
        for t in good.transfers
    ]
    with pytest.raises(InvalidScheduleError, match="send port of 'x'"):
        check(fork(), _bad(good, transfers=xs))


def test_check_catches_receive_congestion() -> None:
    plan = evaluate(fork(), {"a": "x", "b": "x", "c": "y", "d": "y"})
    # b->d (x->y) moved to overlap a->c (x->y) on y's receive port and x's send port
    xs = [
        dataclasses.replace(t, start_ms=1.5, end_ms=3.5) if t.src == "b" else t
        for t in plan.transfers
    ]
    with pytest.raises(InvalidScheduleError, match=r"port of 'x'|port of 'y'|before 'b' ends"):
        check(fork(), _bad(plan, transfers=xs))


def test_check_catches_early_start(good) -> None:  # type: ignore[no-untyped-def]
    sched = [s if s.task != "d" else ScheduledTask("d", "x", 0.5, 1.5) for s in good.schedule]
    with pytest.raises(InvalidScheduleError, match="before its input"):
        check(fork(), _bad(good, schedule=sched))


def test_check_catches_wrong_durations_and_missing_transfers(good) -> None:  # type: ignore[no-untyped-def]
    sched = [s if s.task != "a" else ScheduledTask("a", "x", 0.0, 0.5) for s in good.schedule]
    with pytest.raises(InvalidScheduleError, match="compute time there is 1"):
        check(fork(), _bad(good, schedule=sched))
    with pytest.raises(InvalidScheduleError, match="has no transfer"):
        check(fork(), _bad(good, transfers=good.transfers[1:]))
    extra = ScheduledTransfer("a", "b", "y", "x", 0.0, 2.0)
    with pytest.raises(InvalidScheduleError, match="scheduled twice"):
        check(fork(), _bad(good, transfers=[*good.transfers, extra]))


def test_check_catches_assignment_and_memory_errors(good) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidScheduleError, match="unknown device 'z'"):
        check(fork(), _bad(good, assignment={**good.assignment, "a": "z"}))
    with pytest.raises(InvalidScheduleError, match="makespan_ms is 1"):
        check(fork(), _bad(good, makespan_ms=1.0))
    # on CPUs y computes b and c (6) and copies four 2 ms transfers (8); the ports alone say 6
    assert good.period_ms == 6
    cpus = evaluate(fork("cpu"), good.assignment)
    assert cpus.period_ms == 14
    with pytest.raises(InvalidScheduleError, match="period_ms is 6 but the assignment's is 14"):
        check(fork("cpu"), _bad(cpus, period_ms=6.0))
    small = dataclasses.replace(
        fork(),
        devices=(Device("x", 10), Device("y", 10)),
        tasks=tuple(dataclasses.replace(t, memory_bytes=4) for t in fork().tasks),
    )
    with pytest.raises(InvalidScheduleError, match="device 'x' holds"):
        check(small, evaluate(fork(), {"a": "x", "b": "x", "c": "x", "d": "y"}))
    pinned = PlacementProblem(fork(), pins={"a": "y"})
    with pytest.raises(InvalidScheduleError, match="pinned to 'y'"):
        check(pinned, good)


@pytest.mark.parametrize("seed", range(6))
def test_retime_never_starts_later_than_the_solver(seed: int) -> None:
    cg = random_costgraph(seed, tasks=12, devices=3, zero_prob=0.2 if seed % 2 else 0.0)
    p = PlacementProblem(cg)
    plan = solve(cg, "getf")
    assign = [p.device_index[plan.assignment[t]] for t in p.tasks]
    starts = {s.task: s.start_ms for s in plan.schedule}
    xs = {(t.src, t.dst): t.start_ms for t in plan.transfers}
    task_start = [starts[t] for t in p.tasks]
    edge_start = {
        e: xs[(p.tasks[i], p.tasks[j])]
        for e, (i, j) in enumerate(p.edges)
        if (p.tasks[i], p.tasks[j]) in xs
    }
    replay = retime(p, assign, task_start, edge_start)
    assert all(replay.start[i] <= task_start[i] + 1e-9 for i in range(p.n))
    assert replay.makespan <= plan.makespan_ms + 1e-9
    assert list_schedule(p, assign).makespan > 0


@pytest.mark.parametrize("seed", range(4))
def test_replay_from_a_move_is_valid_and_stops_only_above_its_limit(seed: int) -> None:
    """`Replay.evaluate` keeps the base replay up to the first operation a move touches: the
    schedule of the moved assignment is valid, and with a limit it answers None exactly when
    that schedule would end after the limit."""
    import random

    from moirai.placement.heuristics import heft
    from moirai.placement.local import timing

    cg = random_costgraph(seed, tasks=14, devices=3, zero_prob=0.2) if seed < 2 else None
    p = PlacementProblem(cg if cg is not None else random_dag(seed, 80, 4, ccr=1.0))
    base = heft(p)
    replay = Replay(p, list(base.where), *timing(p, base))
    assert replay.schedule.makespan <= base.makespan + 1e-9
    rng = random.Random(seed)
    for _ in range(30):
        assign = list(base.where)
        moved = rng.sample(range(p.n), rng.randint(1, 4))
        for i in moved:
            assign[i] = rng.choice(p.cand[i])
        sched = replay.evaluate(assign, moved)
        assert sched is not None and list(sched.where) == assign
        plan = sched.to_placement("replay", "heuristic", 0.0, 0.0)
        assert abs(check(p, plan) - sched.makespan) < 1e-9
        for limit in (sched.makespan * 0.97, sched.makespan * (1 + 1e-9)):
            limited = replay.evaluate(assign, moved, limit)
            assert (limited is None) == (sched.makespan > limit)


def test_timeline_keeps_touching_intervals_as_one() -> None:
    """Back-to-back intervals are one (the next gap is found in one step), removing one cuts
    it out again, and the earliest free start is that of the intervals added, one by one,
    whatever was merged (against a brute force over the intervals themselves)."""
    tl = Timeline()
    for k in range(5):
        tl.add(float(k), k + 1.0)
    assert (tl.starts, tl.ends) == ([0.0], [5.0])
    assert tl.first_free(0.5, 0.1) == 5.0
    tl.remove(2.0, 3.0)
    assert (tl.starts, tl.ends) == ([0.0, 3.0], [2.0, 5.0])
    assert tl.first_free(1.0, 1.0) == 2.0 and tl.first_free(1.0, 1.5) == 5.0
    tl.remove(0.0, 1.0)
    tl.remove(4.0, 5.0)
    assert (tl.starts, tl.ends) == ([1.0, 3.0], [2.0, 4.0])
    tl.add(2.0, 3.0)
    assert (tl.starts, tl.ends) == ([1.0], [4.0])

    rng = random.Random(7)
    tl, busy = Timeline(), set()
    for _ in range(400):
        free = [k for k in range(40) if k not in busy]
        if busy and (not free or rng.random() < 0.4):
            k = rng.choice(sorted(busy))
            busy.discard(k)
            tl.remove(k / 4, (k + 1) / 4)
        else:
            k = rng.choice(free)
            busy.add(k)
            tl.add(k / 4, (k + 1) / 4)
        t, dur = rng.uniform(0, 10), rng.choice((0.1, 0.25, 0.6, 1.1))
        start = t
        while any(k / 4 < start + dur and start < (k + 1) / 4 for k in busy):
            start = min((k + 1) / 4 for k in busy if k / 4 < start + dur and start < (k + 1) / 4)
        assert tl.first_free(t, dur) == start
        assert all(e < s for e, s in zip(tl.ends, tl.starts[1:], strict=False))
