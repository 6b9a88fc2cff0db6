"""Every lower bound is valid: never above the optimum that brute force finds on small
instances; and the series decomposition is exact where it says so."""

from __future__ import annotations

import time

import pytest

from moirai.placement import PlacementProblem, SolveOptions, check, solve
from moirai.placement.bounds import simple_bounds
from moirai.placement.lp import path_lp, windowed_load
from moirai.placement.series import decompose

from .brute import brute_force_makespan, brute_force_period
from .instances import fork, random_costgraph, random_dag, series_costgraph

REL = 1e-3  # CP-SAT rounds durations down to its time unit (far below this)

RANDOM = [
    *((s, 4 + s % 4, 2 + s % 2, {}) for s in range(8)),
    *((500 + s, 6, 3, {"unrunnable_prob": 0.4, "zero_prob": 0.2}) for s in range(3)),
    *((510 + s, 6, 3, {"memory_tight": True}) for s in range(3)),
]


@pytest.mark.parametrize(("seed", "tasks", "devices", "opts"), RANDOM)
def test_simple_bounds_never_exceed_the_optimum(
    seed: int, tasks: int, devices: int, opts: dict
) -> None:
    cg = random_costgraph(seed, tasks=tasks, devices=devices, edge_prob=0.4, **opts)
    latency = PlacementProblem(cg)
    best = brute_force_makespan(latency)
    for name, value in _bounds(latency).items():
        assert value <= best * (1 + 1e-9), name
    throughput = PlacementProblem(cg, objective="throughput")
    best = brute_force_period(throughput)
    for name, value in _bounds(throughput).items():
        assert value <= best * (1 + 1e-9), name


def _bounds(problem: PlacementProblem) -> dict[str, float]:
    """Every bound that needs no search: the simple ones, the windowed load LP and (latency)
    the path LP."""
    load = windowed_load(problem, time.monotonic() + 30)
    assert load is not None
    hops = windowed_load(problem, time.monotonic() + 30, hops=True)
    assert hops is not None
    bounds = {**simple_bounds(problem), "windowed load": load, "windowed load with hops": hops}
    if problem.objective == "latency":
        path = path_lp(problem, time.monotonic() + 30)
        assert path is not None
        bounds["path LP"] = path
    return bounds


def test_windowed_load_beats_plain_load_where_heads_and_tails_matter() -> None:
    """A chain into a wide layer into a chain: the wide tasks can only run in the middle."""
    cg = series_costgraph(3, blocks=(4,), devices=2)
    problem = PlacementProblem(cg)
    load = windowed_load(problem, time.monotonic() + 30)
    plain = windowed_load(PlacementProblem(cg, objective="throughput"), time.monotonic() + 30)
    assert load is not None and plain is not None
    assert load > plain * 1.01
    assert load <= brute_force_makespan(problem) * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_windowed_load_separates_every_window(seed: int) -> None:
    """The windows added by separation reach the optimum of the LP with every window (t, 0)
    and (0, s), t and s up to the simple bound, written down at once."""
    from moirai.placement.bounds import heads_tails, lower_bound
    from moirai.placement.lp import solve_lp

    p = PlacementProblem(random_dag(seed, 60, 3 + seed % 2, ccr=1.0))
    head, tail = heads_tails(p)
    after = [{k: tail[i][k] - p.compute[i][k] for k in p.cand[i]} for i in range(p.n)]
    known = lower_bound(p)
    col = {(i, k): c for c, (i, k) in enumerate((i, k) for i in range(p.n) for k in p.cand[i])}
    c = len(col)
    rows = [(1.0, 1.0, [col[i, k] for k in p.cand[i]], [1.0] * len(p.cand[i])) for i in range(p.n)]
    for k in range(p.num_devices):
        values = {v[k] for side in (head, after) for v in side if k in v}
        for t in [0.0, *(v for v in values if v <= known)]:
            for side in (head, after):
                inside = [i for i in range(p.n) if k in p.cand[i] and side[i][k] >= t]
                cols = [c] + [col[i, k] for i in inside]
                rows.append((t, float("inf"), cols, [1.0] + [-p.compute[i][k] for i in inside]))
    full = solve_lp(c + 1, c, rows, time.monotonic() + 60)
    load = windowed_load(p, time.monotonic() + 60)
    assert full is not None and load is not None
    assert load >= full[c] * (1 - 1e-6)


DAGS = [(s, 5 + s % 2, 2 + s % 2, ccr) for s in range(4) for ccr in (0.3, 1.0)]


@pytest.mark.parametrize(("seed", "tasks", "devices", "ccr"), DAGS)
def test_lp_bounds_never_exceed_the_optimum_on_benchmark_style_dags(
    seed: int, tasks: int, devices: int, ccr: float
) -> None:
    """The benchmark's random DAGs (`instances.random_dag`: transfer matrices per edge, a fast
    island and slow far devices), small enough for brute force."""
    problem = PlacementProblem(random_dag(seed, tasks, devices, ccr=ccr, max_width=3))
    best = brute_force_makespan(problem)
    for name, value in _bounds(problem).items():
        assert value <= best * (1 + 1e-9), name


def test_path_lp_prices_transfers_that_the_load_bounds_do_not_see() -> None:
    """Costly transfers: the path LP proves more than the windowed load, and stays valid."""
    problem = PlacementProblem(random_dag(0, 6, 3, ccr=1.0, max_width=3))
    path = path_lp(problem, time.monotonic() + 30)
    load = windowed_load(problem, time.monotonic() + 30)
    assert path is not None and load is not None
    assert path > load * 1.01
    assert path <= brute_force_makespan(problem) * (1 + 1e-9)


def test_sequenced_critical_path_by_hand() -> None:
    """a feeds b and c, which both feed d; 2 ms transfers. Each alone lets d start at 4 on x
    (b and c in parallel on x: the plain device-aware bound, 5); together they run on x one
    after the other (d at 7), or one goes to y and its result comes back by 6: so 7, which
    is the optimum (a and c on y, b and d on x)."""
    # GPUs: transfers on the ports only (on CPUs, hop work makes the split cost 8)
    problem = PlacementProblem(fork())
    bounds = simple_bounds(problem)
    assert bounds["device critical path"] == pytest.approx(5.0)
    assert bounds["sequenced critical path"] == pytest.approx(7.0)
    assert brute_force_makespan(problem) == pytest.approx(7.0)
    # on CPUs the hop work only adds: the same bound, an optimum of 8
    cpus = PlacementProblem(fork("cpu"))
    assert simple_bounds(cpus)["sequenced critical path"] == pytest.approx(7.0)
    assert brute_force_makespan(cpus) == pytest.approx(8.0)


JOINS = [(s, 5 + s % 2, 2 + s % 3, 0.3 + 0.7 * (s % 2)) for s in range(12)]


@pytest.mark.parametrize(("seed", "tasks", "devices", "ccr"), JOINS)
def test_sequenced_heads_never_exceed_the_optimum_on_joins(
    seed: int, tasks: int, devices: int, ccr: float
) -> None:
    """Narrow benchmark-style DAGs (every task fed by one to three of the last layers, so
    joins everywhere), where sequencing predecessors and the receive port binds most; the
    LPs built on the sequenced heads are checked too."""
    problem = PlacementProblem(random_dag(100 + seed, tasks, devices, ccr=ccr, max_width=2))
    best = brute_force_makespan(problem)
    for name, value in _bounds(problem).items():
        assert value <= best * (1 + 1e-9), name


HOPS = [(s, 5 + s % 2, 2 + s % 2) for s in range(8)]


@pytest.mark.parametrize(("seed", "tasks", "devices"), HOPS)
def test_bounds_with_hop_work_never_exceed_the_optimum(seed: int, tasks: int, devices: int) -> None:
    """Every device a CPU, so every hop is work on both ends (`problem.hop_work`), which the
    sequenced heads and tails and the path LP's device rows count: still valid."""
    cg = random_costgraph(300 + seed, tasks=tasks, devices=devices, edge_prob=0.5, cpus=devices)
    problem = PlacementProblem(cg)
    assert problem.has_hop_work
    best = brute_force_makespan(problem)
    for name, value in _bounds(problem).items():
        assert value <= best * (1 + 1e-9), name


def test_hop_work_raises_the_bounds() -> None:
    """On CPUs a hop is work on both ends: the sequenced heads (a receiver's share of each
    hop into a task's device) and the path LP (each device's share of its hops) prove more
    than on the same problem with transfers on the ports only, and stay valid."""
    problem = PlacementProblem(random_dag(0, 6, 3, ccr=1.0, max_width=3))
    ports = problem.ports_only()
    assert problem.has_hop_work and not ports.has_hop_work
    path, path_ports = (path_lp(q, time.monotonic() + 30) for q in (problem, ports))
    assert path is not None and path_ports is not None
    assert path > path_ports * 1.05
    best = brute_force_makespan(problem)
    assert path <= best * (1 + 1e-9)
    wide = PlacementProblem(random_dag(7, 6, 3, ccr=1.0, max_width=3))
    load = windowed_load(wide, time.monotonic() + 30)
    hops = windowed_load(wide, time.monotonic() + 30, hops=True)
    assert load is not None and hops is not None
    assert load * 1.05 < hops <= brute_force_makespan(wide) * (1 + 1e-9)
    joins = PlacementProblem(random_dag(107, 6, 2, ccr=1.0, max_width=2))
    seq = simple_bounds(joins)["sequenced critical path"]
    assert seq > simple_bounds(joins.ports_only())["sequenced critical path"] * 1.01
    assert seq <= brute_force_makespan(joins) * (1 + 1e-9)


SERIES = [
    *((s, {}) for s in range(4)),
    *((10 + s, {"jumps": 1 + s % 2}) for s in range(4)),
    *((20 + s, {"twins": True}) for s in range(4)),
    *((30 + s, {"twins": True, "jumps": 1}) for s in range(2)),
    *((40 + s, {"memory_tight": True}) for s in range(4)),
    *((50 + s, {"blocks": (3,), "devices": 2}) for s in range(2)),
]


@pytest.mark.parametrize(("seed", "opts"), SERIES)
def test_series_bound_is_valid_and_exact_where_it_says_so(seed: int, opts: dict) -> None:
    cg = series_costgraph(seed, **opts)
    problem = PlacementProblem(cg)
    best = brute_force_makespan(problem)
    for name, value in _bounds(problem).items():
        assert value <= best * (1 + 1e-9), name
    split = decompose(problem, SolveOptions(time_limit=30, threads=1))
    assert split is not None
    assert split.bound <= best * (1 + 1e-6)
    if split.plan is not None:
        plan = split.plan.to_placement("series", "heuristic", split.bound, 0.0)
        assert check(problem, plan) >= best * (1 - 1e-9)
        if split.exact and split.jumps == 0:  # no coupling left: the plan is the optimum
            assert plan.makespan_ms == pytest.approx(best, rel=REL)
    if split.exact and split.jumps == 0 and "memory_tight" not in opts:
        assert split.bound == pytest.approx(best, rel=REL)


def test_series_segments_small_enough_for_auto_to_skip_the_path_lp() -> None:
    """A paper-style graph of small Inception modules: the series decomposition's segments
    are small, and `auto` skips the path LP (its bound is far weaker there); a random DAG
    without cut vertices gets it."""
    from moirai.placement import auto

    from .instances import inception_costgraph

    small = PlacementProblem(inception_costgraph(1, 4))
    split = decompose(small, SolveOptions(time_limit=30, threads=1))
    assert split is not None and 0 < split.largest <= auto.SERIES_WHOLE * small.n
    plain = PlacementProblem(random_dag(3, 40, 3, ccr=1.0))
    assert decompose(plain, SolveOptions(time_limit=30, threads=1)) is None


def test_series_solves_segments_side_by_side_to_the_same_result() -> None:
    """With two threads the segments on the cheapest path are solved two at a time; each solve
    is single-threaded and limited by work, so bound, plan and the number of solves are those
    of one thread."""
    from .instances import inception_costgraph

    problem = PlacementProblem(inception_costgraph(3, 6))
    one, two = (decompose(problem, SolveOptions(time_limit=60, threads=t)) for t in (1, 2))
    assert one is not None and two is not None and one.plan is not None and two.plan is not None
    assert one.solves > 2  # several segments on the path, solved side by side with two threads
    assert (two.bound, two.solves, two.exact) == (one.bound, one.solves, one.exact)
    assert two.plan.where == one.plan.where
    assert two.plan.makespan == one.plan.makespan


def test_twins_are_interchangeable_devices_only() -> None:
    assert PlacementProblem(series_costgraph(1, twins=True)).twins == [0, 1, 1]
    assert PlacementProblem(series_costgraph(1)).twins == [0, 1, 2]
    pinned = PlacementProblem(series_costgraph(1, twins=True), pins={"t1": "d2"})
    assert pinned.twins == [0, 1, 2]  # a pin tells them apart


def test_auto_reports_the_binding_bound() -> None:
    cg = series_costgraph(3, blocks=(2, 2, 2), devices=3)
    plan = solve(cg, "auto", time_limit=20, threads=1)
    assert plan.status == "optimal"
    assert plan.extra["bound_from"] in {
        *simple_bounds(PlacementProblem(cg)),
        "series",
        "windowed load",
        "path LP",
    }
    plan = solve(random_costgraph(3, tasks=6, devices=2), "auto", time_limit=20, threads=1)
    source = plan.extra["bound_from"]
    named = simple_bounds(PlacementProblem(random_costgraph(3, tasks=6, devices=2)))
    assert source in {*named, "windowed load", "path LP", "cpsat", "milp-highs"}
    if source in named:
        assert plan.lower_bound_ms == pytest.approx(min(named[source], plan.makespan_ms))


def test_auto_takes_the_windowed_load_with_hops_where_the_path_lp_does_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the path LP is too large (here: made so), `auto` asks for the windowed load with
    the devices' hop work, and its plan's bound is at least that LP's."""
    from moirai.placement import lp

    monkeypatch.setattr(lp, "PATH_LP_COLUMNS", 0)
    cg = random_dag(7, 60, 4, ccr=1.0)
    problem = PlacementProblem(cg)
    hops = windowed_load(problem, time.monotonic() + 30, hops=True)
    plain = windowed_load(problem, time.monotonic() + 30)
    assert hops is not None and plain is not None and hops > plain * 1.05
    plan = solve(cg, "auto", time_limit=4, threads=1)
    assert plan.lower_bound_ms >= min(hops, plan.makespan_ms) * (1 - 1e-9)
