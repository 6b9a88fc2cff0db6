"""One suite, every solver: plans pass the simulator's check and honour the problem."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moirai.costgraph import CostGraph, Device, Edge, Task
from moirai.errors import InfeasibleError, MoiraiError, SolverError, StoppedError
from moirai.placement import (
    Placement,
    PlacementProblem,
    Progress,
    SolveOptions,
    check,
    contract,
    get_solver,
    solve,
    solve_problem,
    solvers,
)
from moirai.placement.contract import no_plan, side_by_side, stopped

from .instances import random_costgraph, tight_costgraph

SOLVERS = ["heft", "getf", "msct", "single", "milp", "milp-highs", "milp-gurobi", "cpsat", "auto"]

INSTANCES = {
    "plain": dict(seed=1, tasks=10, devices=3),
    "wide": dict(seed=2, tasks=14, devices=4, edge_prob=0.15),
    "zero-times": dict(seed=3, tasks=9, devices=3, zero_prob=0.3),
    "unrunnable": dict(seed=4, tasks=10, devices=3, unrunnable_prob=0.5),
    "tight-memory": dict(seed=5, tasks=10, devices=3, memory_tight=True),
    # every hop is work on both ends (`problem.hop_work`)
    "cpus": dict(seed=6, tasks=12, devices=3, cpus=3, edge_prob=0.3),
}


def _available(name: str) -> None:
    ok, reason = get_solver(name).available() if name != "milp-gurobi" else (True, "")
    if name == "milp-gurobi":
        from moirai.placement.milp import gurobi_available

        ok, reason = gurobi_available()
    if not ok:
        pytest.skip(reason)


def test_registry_lists_every_solver() -> None:
    names = {s.name for s in solvers()}
    assert set(SOLVERS) <= names
    with pytest.raises(SolverError, match="unknown solver 'nope'"):
        get_solver("nope")


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf")])
def test_time_limit_must_be_finite_and_positive(limit: float) -> None:
    """`time_limit <= 0` let nan through (no comparison with nan is true)."""
    with pytest.raises(SolverError, match="time limit must be a finite number of seconds > 0"):
        SolveOptions(time_limit=limit)


@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_plan_is_valid(solver: str, instance: str) -> None:
    _available(solver)
    cg = random_costgraph(**INSTANCES[instance])
    problem = PlacementProblem(cg)
    try:
        plan = solve(cg, solver, time_limit=10, threads=2)
    except InfeasibleError:
        assert solver == "single"  # some instances have no device that runs every task
        return
    assert check(problem, plan) == pytest.approx(plan.makespan_ms)
    assert plan.status in ("optimal", "feasible", "heuristic")
    assert 0 < plan.lower_bound_ms <= plan.makespan_ms * (1 + 1e-9)
    assert plan.period_ms is not None and plan.period_ms > 0
    for s in plan.schedule:
        assert s.device in cg.task[s.task].compute_ms


@pytest.mark.parametrize("solver", SOLVERS)
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10**6),
    tasks=st.integers(4, 12),
    devices=st.integers(2, 4),
    slack=st.floats(0.95, 1.2),
    unrunnable=st.sampled_from([0.0, 0.3]),
)
def test_memory_tight_instances_get_a_plan_or_no_plan(
    solver: str, seed: int, tasks: int, devices: int, slack: float, unrunnable: float
) -> None:
    """Every solver answers a valid plan or says "no plan" (`InfeasibleError`), and only the
    best single device may say so when the tasks can be packed into the memories at all."""
    _available(solver)
    from moirai.placement.memory import exact_packing

    cg = tight_costgraph(seed, tasks, devices, slack, unrunnable_prob=unrunnable)
    try:
        problem = PlacementProblem(cg)
        packable = exact_packing(problem) is not None
    except InfeasibleError:
        packable = False
    try:
        plan = solve(cg, solver, time_limit=5, threads=1)
    except InfeasibleError as e:
        assert solver == "single" or not packable, f"{solver}: {e}"
        return
    assert packable
    check(problem, plan)


@pytest.mark.parametrize("solver", SOLVERS)
def test_pins_are_honoured(solver: str) -> None:
    _available(solver)
    cg = random_costgraph(seed=6, tasks=8, devices=3)
    pins = {"t0": "d1", "t5": "d2"}
    if solver == "single":
        with pytest.raises(InfeasibleError, match="no single device"):
            solve(cg, solver, pins=pins)
        return
    plan = solve(cg, solver, time_limit=10, threads=2, pins=pins)
    assert plan.assignment["t0"] == "d1" and plan.assignment["t5"] == "d2"
    check(PlacementProblem(cg, pins=pins), plan)


@pytest.mark.parametrize("solver", SOLVERS)
def test_throughput_objective(solver: str) -> None:
    _available(solver)
    cg = random_costgraph(seed=7, tasks=10, devices=3)
    plan = solve(cg, solver, objective="throughput", time_limit=10, threads=2)
    assert plan.objective == "throughput"
    assert plan.period_ms is not None
    assert plan.lower_bound_ms <= plan.period_ms * (1 + 1e-9)
    check(PlacementProblem(cg, objective="throughput"), plan)


@pytest.mark.parametrize("solver", SOLVERS)
def test_deterministic_for_a_seed(solver: str) -> None:
    _available(solver)
    cg = random_costgraph(seed=8, tasks=10, devices=3)
    a = solve(cg, solver, time_limit=20, threads=1, seed=3)
    b = solve(cg, solver, time_limit=20, threads=1, seed=3)
    assert a.assignment == b.assignment
    assert a.schedule == b.schedule


def test_memory_forces_a_split() -> None:
    """Two heavy tasks that do not fit together: every solver must use both devices."""
    cg = CostGraph(
        name="split",
        devices=(Device("fast", 10), Device("slow", 10)),
        tasks=(
            Task("a", {"fast": 1.0, "slow": 3.0}, memory_bytes=8),
            Task("b", {"fast": 1.0, "slow": 3.0}, memory_bytes=8),
        ),
        edges=(Edge("a", "b", 1000),),
    )
    for name in SOLVERS:
        if name == "single":
            with pytest.raises(InfeasibleError):
                solve(cg, name)
            continue
        if name == "milp-gurobi":
            continue
        plan = solve(cg, name, time_limit=5, threads=1)
        assert set(plan.assignment.values()) == {"fast", "slow"}, name


def test_unrunnable_device_is_never_used() -> None:
    cg = CostGraph(
        name="ep",
        devices=(Device("gpu", 10**9, "gpu"), Device("cpu", 10**9)),
        tasks=(
            Task("a", {"gpu": 1.0, "cpu": 5.0}),
            Task("custom", {"cpu": 1.0}),  # the GPU provider lacks this operator
            Task("c", {"gpu": 1.0, "cpu": 5.0}),
        ),
        edges=(Edge("a", "custom", 10), Edge("custom", "c", 10)),
    )
    for name in ("heft", "getf", "msct", "milp", "cpsat", "auto"):
        assert solve(cg, name, time_limit=5, threads=1).assignment["custom"] == "cpu"


def test_progress_reports_incumbents_and_bounds() -> None:
    events: list[Progress] = []
    cg = random_costgraph(seed=9, tasks=12, devices=3)
    plan = solve(cg, "auto", time_limit=20, threads=2, progress=events.append)
    assert events
    assert any(e.incumbent_ms is not None for e in events)
    assert min(e.incumbent_ms for e in events if e.incumbent_ms) <= plan.makespan_ms * (1 + 1e-3)


def test_auto_is_never_worse_than_a_heuristic() -> None:
    cg = random_costgraph(seed=10, tasks=12, devices=4, edge_prob=0.25)
    auto = solve(cg, "auto", time_limit=15, threads=2)
    for name in ("heft", "getf", "msct", "single"):
        assert auto.makespan_ms <= solve(cg, name).makespan_ms * (1 + 1e-9)
    assert auto.solver.startswith("auto(")


def test_time_limit_is_respected_and_auto_still_answers() -> None:
    import time

    cg = random_costgraph(seed=11, tasks=40, devices=4, edge_prob=0.15)
    started = time.monotonic()
    plan = solve(cg, "auto", time_limit=2, threads=2)
    assert time.monotonic() - started < 6  # imports and checking on a loaded machine
    assert plan.status in ("optimal", "feasible", "heuristic")
    assert plan.lower_bound_ms > 0


def test_auto_builds_no_milp_it_has_no_time_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # ~95,000 rows: seconds to build and load into HiGHS, and neither stops at the deadline
    import moirai.placement.milp as milp

    built: list[int] = []
    build = milp.build
    monkeypatch.setattr(milp, "build", lambda p, horizon: built.append(p.n) or build(p, horizon))
    cg = random_costgraph(seed=11, tasks=40, devices=4, edge_prob=0.15)
    assert milp.count_rows(PlacementProblem(cg)) > 90_000
    solve(cg, "auto", time_limit=2, threads=2)
    assert built == []
    solve(cg, "auto", objective="throughput", time_limit=2, threads=2)  # a small model
    assert built == [40]


def test_large_graph_within_the_time_limit() -> None:
    import time

    from .instances import layered_costgraph

    cg = layered_costgraph(seed=0, tasks=1500)
    started = time.monotonic()
    plan = solve(cg, "auto", time_limit=6, threads=2)
    assert time.monotonic() - started < 12  # the limit plus checking, on a loaded machine
    heft = solve(cg, "heft")
    assert plan.makespan_ms <= heft.makespan_ms
    assert plan.lower_bound_ms > 0 and plan.status in ("feasible", "heuristic")


def test_gurobi_size_limit_falls_back_to_highs() -> None:
    from moirai.placement.milp import (
        GUROBI_SIZE_LIMIT,
        build,
        gurobi_available,
        gurobi_unrestricted,
    )

    ok, reason = gurobi_available()
    if not ok:
        pytest.skip(reason)
    if gurobi_unrestricted():
        pytest.skip("a full Gurobi licence has no size limit")
    cg = random_costgraph(seed=12, tasks=16, devices=4, edge_prob=0.3)
    problem = PlacementProblem(cg)
    size = build(problem, horizon=100.0).model.num_rows
    assert size > GUROBI_SIZE_LIMIT  # beyond the pip licence
    plan = solve(cg, "milp-gurobi", time_limit=5, threads=1)
    assert plan.solver == "milp-highs"
    assert "size-limited" in plan.extra["note"]
    check(problem, plan)


@pytest.mark.parametrize("solver", SOLVERS)
def test_degenerate_graphs(solver: str) -> None:
    _available(solver)
    one = CostGraph(
        name="one",
        devices=(Device("a", 10), Device("b", 10)),
        tasks=(Task("t", {"a": 2.0, "b": 1.0}),),
        edges=(),
    )
    free = CostGraph(
        name="free",
        devices=(Device("a", 10), Device("b", 10)),
        tasks=(Task("s", {"a": 0.0, "b": 0.0}), Task("t", {"a": 0.0, "b": 0.0})),
        edges=(Edge("s", "t", 0),),
    )
    plan = solve(one, solver, time_limit=5, threads=1)
    assert plan.makespan_ms == pytest.approx(1.0)  # on b
    assert plan.status == "optimal"
    plan = solve(free, solver, time_limit=5, threads=1)
    assert plan.makespan_ms == 0.0 and plan.status == "optimal"


STOP_GUARD_S = 60.0
"""Only a guard against a hang: without the stop these solves would run for ten minutes."""


def _solve_stopped(
    solver: str, problem: PlacementProblem, stop: threading.Event, **options: Any
) -> Placement | MoiraiError:
    """Solve on a thread, as the operator does, with `stop`: the plan (valid, and stopped or
    proven optimal), or the error that says it was stopped first."""
    out: list[Placement | MoiraiError] = []

    def run() -> None:
        try:
            opts = SolveOptions(time_limit=600, threads=2, stop=stop, **options)
            out.append(solve_problem(problem, solver, opts))
        except MoiraiError as e:
            out.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(STOP_GUARD_S)
    assert out, f"{solver} did not end within {STOP_GUARD_S} s of its stop"
    result = out[0]
    if isinstance(result, Placement):
        check(problem, result)
        assert result.status == "optimal" or result.extra.get("stopped_by") == "stop"
    else:
        assert isinstance(result, StoppedError), result
    return result


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_stop_set_before_the_solve_ends_it(solver: str) -> None:
    """A stop that is set already: a plan at once (the heuristics' or the warm start), never
    the ten-minute search."""
    _available(solver)
    stop = threading.Event()
    stop.set()
    problem = PlacementProblem(random_costgraph(seed=13, tasks=30, devices=4, cpus=2))
    assert isinstance(_solve_stopped(solver, problem, stop), Placement)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_stop_set_while_solving_ends_it_with_its_best_plan(solver: str, objective: str) -> None:
    """The stop is set at the first progress report (the search has an incumbent): the solve
    ends at its next check with its best plan, marked `stopped_by: stop` unless proven."""
    _available(solver)
    stop = threading.Event()
    seen: list[Progress] = []

    def progress(report: Progress) -> None:
        seen.append(report)
        stop.set()

    cg = random_costgraph(seed=14, tasks=20, devices=4, cpus=2)
    result = _solve_stopped(solver, PlacementProblem(cg, objective), stop, progress=progress)
    assert seen and isinstance(result, Placement) and result.objective == objective


def test_auto_stopped_in_its_race_ends_it() -> None:
    """Stopped once its local search has improved the plan (the race is under way, with most
    of ten minutes left for its turns): the race ends and the improved plan is returned."""
    stop = threading.Event()

    def progress(report: Progress) -> None:
        if report.message.startswith("local search"):
            stop.set()

    problem = PlacementProblem(random_costgraph(seed=14, tasks=30, devices=4, cpus=2))
    plan = _solve_stopped("auto", problem, stop, progress=progress)
    assert stop.is_set() and isinstance(plan, Placement)
    assert plan.solver.endswith("+local)") and plan.extra["stopped_by"] == "stop"


def test_jobs_side_by_side_see_the_solves_stop_and_keep_their_order() -> None:
    """`side_by_side` runs each job on a thread of its own; the running solve's stop (set on
    the calling thread, as `stoppable` does) must reach every job, or a stopped series
    decomposition would go on solving its segments."""

    def job(k: int) -> Any:
        def wait() -> tuple[int, bool, int]:
            guard = time.monotonic() + STOP_GUARD_S
            while not stopped() and time.monotonic() < guard:
                time.sleep(0.01)
            return k, stopped(), threading.get_ident()

        return wait

    stop = threading.Event()
    token = contract._stop.set(stop)  # what `stoppable` does for a solve with a stop
    try:
        threading.Timer(0.1, stop.set).start()
        out = side_by_side([job(k) for k in range(3)], threads=3)
    finally:
        contract._stop.reset(token)
    assert [(k, seen) for k, seen, _ in out] == [(0, True), (1, True), (2, True)]
    assert len({thread for _, _, thread in out}) == 3  # side by side


def test_a_solve_stopped_with_no_plan_says_so() -> None:
    stop = threading.Event()
    assert isinstance(no_plan("cpsat", SolveOptions(stop=stop)), InfeasibleError)
    stop.set()
    error = no_plan("cpsat", SolveOptions(stop=stop))
    assert isinstance(error, SolverError) and "stopped before it found a placement" in str(error)
