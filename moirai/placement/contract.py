"""The solver contract: what every solver takes, returns and shares.

A solver is anything with a `name`, `available() -> (bool, reason)` and
`solve(problem, options) -> Placement`; the problem knows nothing about solvers (as in PuLP's
and cvxpy's solver interfaces). `SolveOptions` carries the time limit, threads, seed, a hint,
the progress callback and a stop; `interruptible` runs a native search so that Ctrl-C or the
stop ends it, `side_by_side` several at once; `fall_back` and `no_plan` are what an exact
solver answers when its search found nothing better, or nothing.

Stopping. `SolveOptions.stop` is an Event that anyone may set while a solve runs (the operator
does when the PlacedModel being planned was edited or deleted): the solve then ends at its next
deadline check, within about a second, with its best plan so far, marked
`extra["stopped_by"] = "stop"` unless proven optimal, or raises `StoppedError` (a
`SolverError`) when it has none. A stop is a deadline that has come early, so it takes the
paths every deadline already takes rather than checks of its own: a solver's `solve` is
`stoppable`, which makes the stop the one of the solve running on this thread; within it,
`SolveOptions.remaining`, `seconds_left` and `passed` (what every deadline in the package is
checked with, including the plain `deadline: float` that the heuristics, LPs and the local
search take) answer 0 and True once it is set, and `interruptible` ends the native search it
runs (CP-SAT's `StopSearch`, HiGHS's `cancelSolve`, Gurobi's `terminate`), as on Ctrl-C but
returning what the search found instead of raising.

Every solver returns a plan re-timed by the one simulator (`moirai.placement.simulate`) and
`solve` re-checks it, so a solver bug cannot reach a user as a wrong schedule.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from moirai.errors import InfeasibleError, MoiraiError, SolverError, StoppedError
from moirai.placement.bounds import settle
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement


@dataclass(frozen=True)
class Progress:
    """A progress report during a solve: an improving incumbent and/or a better bound."""

    solver: str
    elapsed_s: float
    incumbent_ms: float | None
    bound_ms: float | None
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class SolveOptions:
    time_limit: float = 60.0
    """Wall-clock seconds for the whole solve (heuristics, model building and search)."""
    threads: int = 1
    seed: int = 0
    work_limit: float | None = None
    """Deterministic work for the search, in CP-SAT's deterministic seconds (about a second of
    one core, counted the same on an idle and a loaded machine): with it, a search stopped by
    its work rather than by the clock ends at the same plan wherever it runs."""
    progress: ProgressCallback | None = None
    hint: Placement | None = None
    """A plan to start from (CP-SAT hints, MIP start); the exact solvers compute one otherwise."""
    deadline: float = field(default=0.0)
    """Absolute `time.monotonic()` deadline; derived from `time_limit` when left at 0."""
    origin: float = field(default=0.0)
    """When the user's solve began (`time.monotonic()`); progress reports count from it, also
    from solvers that `auto` runs inside its own time."""
    stop: threading.Event | None = None
    """Set (from any thread) to end the solve early with its best plan so far (see the module
    docstring)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_limit) and self.time_limit > 0):
            raise SolverError(
                f"time limit must be a finite number of seconds > 0, got {self.time_limit}"
            )
        if self.threads < 1:
            raise SolverError(f"threads must be >= 1, got {self.threads}")
        if self.origin == 0.0:
            object.__setattr__(self, "origin", time.monotonic())
        if self.deadline == 0.0:
            object.__setattr__(self, "deadline", self.origin + self.time_limit)

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def remaining(self) -> float:
        """Seconds to the deadline; 0 once stopped."""
        return 0.0 if self.stopped else max(0.0, self.deadline - time.monotonic())

    def report(
        self, solver: str, incumbent: float | None, bound: float | None, message: str = ""
    ) -> None:
        if self.progress is not None:
            elapsed = time.monotonic() - self.origin
            self.progress(Progress(solver, elapsed, incumbent, bound, message))


T = TypeVar("T")
S = TypeVar("S")

STOP_POLL_S = 0.1
"""How often `interruptible` looks at the solve's stop while a native search runs."""

_stop: ContextVar[threading.Event | None] = ContextVar("moirai_solve_stop", default=None)
"""The stop of the solve running in this context (`stoppable`)."""


def stopped() -> bool:
    """Whether the solve running on this thread was stopped (`SolveOptions.stop`)."""
    stop = _stop.get()
    return stop is not None and stop.is_set()


def seconds_left(deadline: float) -> float:
    """Seconds to a `time.monotonic()` deadline; 0 once the solve was stopped."""
    return 0.0 if stopped() else max(0.0, deadline - time.monotonic())


def passed(deadline: float) -> bool:
    """Whether a `time.monotonic()` deadline has passed, or the solve was stopped."""
    return stopped() or time.monotonic() >= deadline


def stoppable(
    solve: Callable[[S, PlacementProblem, SolveOptions], Placement],
) -> Callable[[S, PlacementProblem, SolveOptions], Placement]:
    """A solver's `solve`, under `options.stop`: the deadline checks and native searches within
    it answer to the stop, and a plan it cut short says `stopped_by: "stop"`."""

    @functools.wraps(solve)
    def stoppable_solve(self: S, problem: PlacementProblem, options: SolveOptions) -> Placement:
        token = _stop.set(options.stop) if options.stop is not None else None
        try:
            plan = solve(self, problem, options)
        finally:
            if token is not None:
                _stop.reset(token)
        if options.stopped and plan.status != "optimal":
            plan.extra["stopped_by"] = "stop"
        return plan

    return stoppable_solve


def interruptible(solve: Callable[[], T], stop: Callable[[], None]) -> T:
    """Run a native solver's blocking `solve` so that Ctrl-C stops it and propagates, and the
    solve's stop (`stoppable`) ends it early.

    Python runs signal handlers only on the main thread between bytecodes, so while a solver's
    C++ search holds the main thread a Ctrl-C waits for the search to end (and CP-SAT, left to
    itself, catches SIGINT and merely ends the search early). The search runs on a worker thread
    instead; the main thread waits on it, and on KeyboardInterrupt asks the solver to `stop`,
    waits for it to unwind and re-raises, so the caller never goes on with a cut-short result.
    While the solve's stop is set it asks the solver to `stop` every `STOP_POLL_S` until the
    search returns (a request made before the native search began may be lost), and returns
    what the search found.
    """
    stopping = _stop.get()
    result: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            result.append(solve())
        except BaseException as e:  # re-raised on the calling thread
            failure.append(e)
        finally:
            done.set()

    # An Event, not Thread.join: an interrupted join marks the thread finished (CPython 3.11,
    # bpo-45274), so a second join would not wait and the process would exit mid-search.
    threading.Thread(target=work, name="moirai-solve", daemon=True).start()
    try:
        while not done.wait(None if stopping is None else STOP_POLL_S):
            if stopping is not None and stopping.is_set():
                stop()
    except KeyboardInterrupt:
        stop()
        done.wait()
        raise
    if failure:
        raise failure[0]
    return result[0]


def side_by_side(jobs: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """The results of `jobs`, run `threads` at a time (native searches release the GIL), in
    order; one after the other with one thread.

    Ctrl-C and the running solve's stop reach every job, as `interruptible` does for one: each
    job runs under a stop of its own (what its deadline checks and native searches look at),
    set when the solve is stopped or on Ctrl-C, and the caller goes on (or re-raises) only once
    every job has returned.
    """
    if threads <= 1:
        return [job() for job in jobs]
    halt = threading.Event()
    if stopped():
        halt.set()

    def run(job: Callable[[], T]) -> T:
        token = _stop.set(halt)
        try:
            return job()
        finally:
            _stop.reset(token)

    def run_all() -> list[T]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(run, jobs))

    return interruptible(run_all, halt.set)


class Solver(Protocol):
    name: str
    description: str

    def available(self) -> tuple[bool, str]:
        """Whether the solver can run here, and if not, why (one line)."""
        ...

    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement: ...


def fall_back(
    warm: Placement,
    solver: str,
    bound: float,
    started: float,
    note: str,
    options: SolveOptions,
) -> Placement:
    """The warm start, relabelled: what an exact solver returns when it found nothing better."""
    plan = Placement.from_dict(warm.to_dict())
    plan.solver = solver
    plan.status = "heuristic"
    plan.solve_seconds = time.monotonic() - started
    if note:
        plan.extra["note"] = note
    settle(plan, bound)
    options.report(solver, plan.objective_ms, plan.lower_bound_ms, note)
    return plan


def no_plan(solver: str, options: SolveOptions) -> MoiraiError:
    """What a solver raises when its search found no plan: it was stopped, or ran out of time."""
    if options.stopped:
        return StoppedError(f"{solver}: stopped before it found a placement")
    return InfeasibleError(
        f"{solver}: found no placement that fits the device memories within "
        f"{options.time_limit:g} s (not proven impossible: raise --time-limit)"
    )
