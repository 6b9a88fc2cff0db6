"""Local search: never worse than where it starts, valid plans, and the same result for the
same work (evaluations) whatever the clock says."""

from __future__ import annotations

import math
import time

from moirai.placement import PlacementProblem, check
from moirai.placement.heuristics import heft
from moirai.placement.local import LocalSearch, improve, timing

from .instances import random_dag


def test_search_from_a_schedule_never_ends_above_it() -> None:
    problem = PlacementProblem(random_dag(3, 60, 4, ccr=1.0))
    start = heft(problem)
    assign, value, sched = improve(
        problem,
        list(start.where),
        time.monotonic() + 30,
        max_evaluations=300,
        start=timing(problem, start),
    )
    assert sched is not None and value == sched.makespan <= start.makespan
    assert list(sched.where) == assign
    plan = sched.to_placement("local", "heuristic", 0.0, 0.0)
    assert math.isclose(check(problem, plan), value)


def test_same_work_same_result() -> None:
    problem = PlacementProblem(random_dag(4, 50, 3, ccr=0.3))
    start = heft(problem)
    runs = [
        improve(problem, list(start.where), time.monotonic() + 60, seed=5, max_evaluations=200)
        for _ in range(2)
    ]
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]


def test_search_resumes_where_it_stopped() -> None:
    """A search stopped by its work goes on from there: it reaches a local optimum no worse
    than where it stopped, with a valid schedule, and a run from a local optimum without kicks
    evaluates nothing (it does not prove the optimum again)."""
    problem = PlacementProblem(random_dag(3, 60, 4, ccr=1.0))
    start = heft(problem)
    search = LocalSearch(problem, list(start.where), seed=1, start=timing(problem, start))
    deadline = time.monotonic() + 60
    _, stopped, _ = search.run(deadline, max_evaluations=40, kicks=False)
    assert search.evaluations == 40 and stopped <= start.makespan
    assign, value, sched = search.run(deadline, kicks=False)
    assert value <= stopped and search.evaluations > 40
    assert sched is not None and list(sched.where) == assign
    plan = sched.to_placement("local", "heuristic", 0.0, 0.0)
    assert math.isclose(check(problem, plan), value)
    settled = search.evaluations
    assert search.run(deadline, kicks=False)[1] == value and search.evaluations == settled
    assert search.run(deadline, max_evaluations=settled + 100)[1] <= value
    assert search.evaluations == settled + 100
