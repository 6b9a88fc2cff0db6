"""`auto` (the default): heuristics, the series decomposition, then local search and CP-SAT.

0. Memory: some assignment of the tasks fits the devices' memory (`memory.packing`: first-fit
   decreasing, else CP-SAT's exact packing), or `auto` stops with the proof that none does.
   Every later step then has a memory-feasible start.
1. The list schedulers that need no LP (`QUICK_HEURISTICS`: HEFT, the best single device):
   milliseconds even on thousands of tasks, and a first incumbent; where devices do hop work
   (`problem.hop_work`), HEFT's devices chosen without it too, then scheduled with it
   (`heft-ports`: HEFT places a consumer on another device after its producer's device has
   taken its next tasks, where the sender's share no longer fits, so it keeps too much on one
   device; on the random DAGs of `bench/placement.py` this start is 9-42% shorter); and the
   windowed load bound (`lp.windowed_load`). If the incumbent meets the lower bound it is
   optimal and we stop (likewise after every step below).
2. Series decomposition (`moirai.placement.series`, latency only): when the graph has cut
   vertices (a concat closing an Inception module, the norm after a residual add, every layer
   of a chain), the segments between them are solved exactly one by one, each for the devices
   of its ends, and the cheapest chain of segments is both a plan and a lower bound; it ends
   as soon as they meet (every zoo model, usually within seconds), or after `SERIES_SHARE` of
   the time left. Its segment solves are limited by work, not time, so it ends at the same
   plan on an idle and on a loaded machine.
3. On models of moderate size whose series decomposition leaves a segment of more than
   `SERIES_WHOLE` of the tasks (or has none), the path LP bound (`lp.path_lp`: assignment,
   start times, transfers, ports and hop work in one LP, within `PATH_LP_SHARE` of the
   limit); on larger ones with hop work, the windowed load with the devices' hop work
   instead (within `HOPS_LP_SHARE`); then
   GETF and m-SCT, whose LPs get at most `HEURISTIC_SHARE` of the limit.
4. The paper's MILP on HiGHS, warm-started, for `MILP_SHARE` of the time left, when its model
   is small (`MILP_ROWS`, and quick to build for the time it would get, `BUILD_S_PER_ROW`;
   the throughput model always is): its LP bound closes some instances that CP-SAT's search
   does not.
5. The race: local search (`moirai.placement.local`: block moves evaluated by list scheduling,
   with kicks out of local optima) and CP-SAT (interval model, no big-M) take turns, each
   from the best plan so far. It opens with a plain descent to a local optimum; when that
   improved the plan the search goes on, with kicks, for `LOCAL_FIRST_SHARE` of the time left
   (moves are cheap to evaluate, `simulate.Replay`), again and again as long as each such turn
   improves the plan (`LOCAL_MORE_S`); then one long CP-SAT turn (`CPSAT_FIRST_SHARE`). The
   local search resumes where its last turn stopped while the plan is still its own
   (`local.LocalSearch`). After that a search whose turn improved the plan gets a longer turn
   next, one whose turn did not a shorter one (CP-SAT's never under `CPSAT_MIN_SLICE_S`), so
   the time goes to whichever is improving. CP-SAT's model is built once and hinted anew each
   turn. Past `FULL_MODEL_LIMIT` optional intervals the model is too big to search well in a
   minute on a few cores, so each task keeps only its devices within `NEAR_FASTEST` of its
   fastest time plus its devices in every plan offered so far (the incumbent stays inside the
   restricted model), and the bound is then the others'; past
   `RESTRICTED_LIMIT`, or when building the model would take too much of the time left, local
   search has all the time.

It returns the best plan found with the best bound (named in the plan's `bound_from`: a simple
bound of `moirai.placement.bounds`, `series`, or an exact solver's own), the gap and a status:
`optimal` when the gap is within tolerance, `feasible` when an exact solver (or the series
decomposition) produced the plan, `heuristic` otherwise. `solver` says which step produced
the plan, e.g. `auto(series)`, `auto(cpsat)` or `auto(heft+local)`.

Stability: `stopped_by` in the plan says why it ended. `proof`: the plan is optimal, and
every step before it stops by work or proof, not by the clock (the heuristics, and the series
decomposition's segment solves, limited by CP-SAT's deterministic time), so the same inputs
give the same plan on an idle and on a loaded machine (as long as the machine is not so slow
that the series phase's deadline comes first). `time`: the time limit ended the search, and a
faster or less loaded machine may find a better plan in the same limit. `stop`: the caller
stopped it (`SolveOptions.stop`): every step then ends at its next deadline check, and the best
plan so far is returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from moirai.errors import InfeasibleError, StoppedError
from moirai.placement import cpsat, heuristics, milp
from moirai.placement.bounds import settle, simple_bounds, strongest
from moirai.placement.contract import SolveOptions, no_plan, seconds_left, stoppable
from moirai.placement.local import LocalSearch, plan_timing
from moirai.placement.lp import hops_seconds, path_lp, windowed_load
from moirai.placement.memory import packing
from moirai.placement.problem import PlacementProblem
from moirai.placement.result import Placement
from moirai.placement.series import decompose
from moirai.placement.simulate import list_schedule

EXACT_PREFERENCE = ("cpsat", "milp-highs", "series")
MILP_ROWS = 150_000
MILP_MAX_TASKS = 800
MILP_SHARE = 0.3
"""The MILP runs first, for this share of the time left, when its model has at most
`MILP_ROWS` rows: its LP bound proves some instances in seconds where CP-SAT's search stalls
(and CP-SAT proves others the MILP cannot touch)."""
FULL_MODEL_LIMIT = 12_000
RESTRICTED_LIMIT = 40_000
NEAR_FASTEST = 1.5
HEURISTIC_SHARE = 0.25
"""Share of the time limit the heuristics' LPs (GETF, m-SCT) may use before giving up their
advice; the list schedulers themselves take well under a second even on thousands of tasks."""
BUILD_S_PER_INTERVAL = 3e-4
BUILD_S_PER_ROW = 2.5e-5
BUILD_SHARE = 0.3
"""Building a model in Python takes about `BUILD_S_PER_INTERVAL` per optional interval
(CP-SAT), or `BUILD_S_PER_ROW` per row to build the MILP and load it into HiGHS, neither of
which stops at a deadline (a 94,000-row MILP: 1.3 s to build, 0.9 s in HiGHS before its time
limit is looked at, on the 2-core development machine); no exact model is built when that would
take more than `BUILD_SHARE` of the time it gets."""
SERIES_SHARE = 0.5
"""Share of the time left that the series decomposition (`moirai.placement.series`) may use;
it stops earlier once its plan is proven optimal, which on graphs with cut vertices (every zoo
model) is usually within seconds."""
QUICK_HEURISTICS = ("heft", "single")
"""Run first; GETF and m-SCT solve an LP first, run after the series decomposition."""
LP_BOUND_SHARE = 0.15
"""Share of the time limit the windowed load bound's LP may use (it needs far less)."""
PATH_LP_SHARE = 0.2
"""Share of the time limit the path LP (`lp.path_lp`) may use; it is skipped on models too
large to solve in that time (`lp.PATH_LP_S_PER_COLUMN`: at 20 s, up to about 27,000 columns;
at 60 s, 80,000)."""
HOPS_LP_SHARE = 0.3
"""Share of the time limit the windowed load with hop work (`lp.windowed_load` with `hops`)
may use, where the path LP does not run; it is skipped on models too large to solve in that
time (`lp.hops_seconds`: at 20 s, 600 to 800 tasks on 6 to 8 CPUs, 1,500 on 3)."""
SERIES_WHOLE = 0.5
"""The path LP is skipped when the series decomposition's largest segment holds at most this
share of the tasks."""
SLICE_S = (0.5, 30.0)
"""Shortest and longest turn in the race between local search and CP-SAT."""
DESCENT_SHARE = 0.15
CPSAT_FIRST_SHARE = (0.6, 0.9)
"""The race opens as the pipeline before it did: a plain descent of the local search (to its
first local optimum, within `DESCENT_SHARE` of the time left), then CP-SAT in one turn, for
the first share of the time left when the descent improved the plan (local search pays here:
it gets its turns after), the second when it did not. Short CP-SAT turns restart its presolve
and search each time; on a 600-task model a turn of a second or two finds nothing, where one
long run improves the plan."""
LOCAL_FIRST_SHARE = 0.5
"""When the descent improved the plan, the local search goes on (with kicks) for this share of
the time left before CP-SAT's long turn: with moves evaluated by replay (`simulate.Replay`) it
improves random DAGs of 100 to 800 tasks further in 20 s than CP-SAT's search does."""
LOCAL_MORE_S = 4.0
"""The local search's opening turns go on while each improves the plan and more than this
many seconds are left (each turn `LOCAL_FIRST_SHARE` of the time left): on the random DAGs of
`bench/placement.py` the descent is still finding moves after 10 s (200 tasks, 16,000 moves
tried), where CP-SAT's turns find nothing."""
CPSAT_MIN_SLICE_S = 2.0
"""CP-SAT's turns in the race are never shorter than this."""
FIRST_SLICE_SHARE = 0.1
"""Each search's first turn: this share of the time left (at least the shortest turn)."""
RESERVE_S = 0.5
"""Seconds kept back for re-timing, checking and writing the plan."""


def interval_count(problem: PlacementProblem, allowed: Sequence[Sequence[int]]) -> int:
    """Optional intervals of CP-SAT's model: tasks per device, transfers per device pair, and
    the hop work of each pair on the devices that pay for their transfers."""
    p = problem
    count = sum(len(a) for a in allowed)
    for e, (i, j) in enumerate(p.edges):
        count += len(allowed[i]) * len(allowed[j]) - len(set(allowed[i]) & set(allowed[j]))
        if p.has_hop_work:
            send, recv = p.send_work[e], p.recv_work[e]
            count += sum(
                (send[a][b] > 0) + (recv[a][b] > 0) for a in allowed[i] for b in allowed[j]
            )
    return count


def restrict(problem: PlacementProblem, plans: list[Placement]) -> list[tuple[int, ...]]:
    """Devices kept per task for large instances: near its fastest, or used by a plan."""
    p = problem
    used = [{p.device_index[plan.assignment[t]] for plan in plans} for t in p.tasks]
    return [
        tuple(
            k
            for k in p.cand[i]
            if p.compute[i][k] <= NEAR_FASTEST * p.min_compute[i] or k in used[i]
        )
        for i in range(p.n)
    ]


@dataclass
class _Incumbent:
    """The best plan so far, what produced it, and every bound found, by name."""

    bounds: dict[str, float]
    options: SolveOptions
    plan: Placement | None = None
    label: str = "none"
    seen: list[Placement] = field(default_factory=list)
    """Every plan offered, kept or not (their devices stay in CP-SAT's restricted model)."""
    search: LocalSearch | None = None
    """The local search of the race's turns, resumed while the plan is its own."""

    @property
    def bound(self) -> float:
        return strongest(self.bounds)[1]

    @property
    def optimal(self) -> bool:
        return self.plan is not None and settle(self.plan, self.bound).status == "optimal"

    def offer(self, plan: Placement | None, label: str, message: str = "") -> bool:
        """Keep `plan` when it is better; whether it was."""
        if plan is not None:
            self.seen.append(plan)
        if plan is None or (
            self.plan is not None and plan.objective_ms >= self.plan.objective_ms * (1 - 1e-9)
        ):
            return False
        self.plan, self.label = plan, label
        self.options.report("auto", plan.objective_ms, self.bound, message or label)
        return True


@dataclass
class _Arm:
    """One search of the race: its next turn's length, and what it has done."""

    name: str
    slice_s: float
    turns: int = 0


@dataclass(frozen=True)
class AutoSolver:
    name: str = "auto"
    description: str = "heuristics, series decomposition, then local search raced with CP-SAT"

    def available(self) -> tuple[bool, str]:
        return True, ""

    @stoppable
    def solve(self, problem: PlacementProblem, options: SolveOptions) -> Placement:
        started = time.monotonic()
        deadline = options.deadline - RESERVE_S
        packing(problem, deadline)  # 0. raises the proof when no assignment fits the memory
        best = _Incumbent(simple_bounds(problem), options)
        try:
            self._steps(problem, best, options, deadline, started)
        except StoppedError:  # a step stopped before it found a plan: keep the best so far
            if best.plan is None:
                raise
        return self._done(best, started)

    def _steps(
        self,
        p: PlacementProblem,
        best: _Incumbent,
        options: SolveOptions,
        deadline: float,
        started: float,
    ) -> None:
        """Steps 1 to 5 (see the module docstring); each returns early once `best` is optimal."""
        # 1. the list schedulers that need no LP: milliseconds, and a first incumbent
        for h in heuristics.SOLVERS:
            if h.name in QUICK_HEURISTICS:
                best.offer(self._heuristic(p, h, replace(options, progress=None)), h.name)
        if p.has_hop_work and p.objective == "latency":
            best.offer(self._heft_ports(p, deadline, started), "heft-ports")
        # and the LP bound (fractions of tasks per device, in time windows): a second or a few
        # on thousands of tasks
        load = windowed_load(
            p, min(deadline, time.monotonic() + LP_BOUND_SHARE * options.time_limit)
        )
        if load is not None:
            best.bounds["windowed load"] = load
        if best.optimal:
            return
        # 2. the series decomposition: exact on graphs with cut vertices (every zoo model)
        now = time.monotonic()
        split = decompose(
            p, replace(options, deadline=now + SERIES_SHARE * max(0.0, deadline - now))
        )
        if split is not None:
            best.bounds["series"] = split.bound
            if split.plan is not None:
                plan = split.plan.to_placement("series", "feasible", best.bound, 0.0)
                best.offer(plan, "series", f"series: {split.segments} segments")
            if best.optimal:
                return
        # the path LP (latency, models of moderate size): transfers priced on paths and ports;
        # after the series decomposition, which needs no more bound where it proves its plan,
        # and not where every segment is small: there the series bound is far stronger
        # (paper-style graphs: 12.2 and 17.2 ms against the path LP's 9.2 and 11.6)
        path = None
        if split is None or split.largest > SERIES_WHOLE * p.n:
            lp_deadline = time.monotonic() + PATH_LP_SHARE * options.time_limit
            path = path_lp(p, min(deadline, lp_deadline))
        if path is not None:
            best.bounds["path LP"] = path
            if best.optimal:
                return
        elif p.objective == "latency" and p.has_hop_work:
            # no path LP (too large): the windowed load with the devices' hop work instead,
            # when its first LP should finish within `HOPS_LP_SHARE` of the limit
            lp_s = min(seconds_left(deadline), HOPS_LP_SHARE * options.time_limit)
            if hops_seconds(p) <= lp_s:
                load = windowed_load(p, time.monotonic() + lp_s, hops=True)
                if load is not None and load > best.bounds.get("windowed load", 0.0):
                    best.bounds["windowed load"] = load
                if best.optimal:
                    return
        # 3. the heuristics with an LP (GETF, m-SCT), their LPs within a share of the limit
        lp_deadline = min(deadline, time.monotonic() + HEURISTIC_SHARE * options.time_limit)
        for h in heuristics.SOLVERS:
            if h.name not in QUICK_HEURISTICS:
                quiet = replace(options, progress=None, deadline=lp_deadline)
                best.offer(self._heuristic(p, h, quiet), h.name)
        if best.plan is None:
            raise no_plan("auto", options)
        if best.optimal:
            return
        # 4. the MILP, when its model is small (the throughput model always is)
        self._milp(p, best, replace(options, deadline=deadline))
        if best.optimal:
            return
        # 5. local search and CP-SAT take turns, each from the best plan so far
        self._race(p, best, replace(options, deadline=deadline))

    @staticmethod
    def _heuristic(
        p: PlacementProblem, h: heuristics.Heuristic, options: SolveOptions
    ) -> Placement | None:
        try:
            return h.solve(p, options)
        except (InfeasibleError, StoppedError):
            return None

    @staticmethod
    def _heft_ports(p: PlacementProblem, deadline: float, started: float) -> Placement:
        """HEFT's devices on the problem without hop work, list scheduled with it."""
        assign = heuristics.heft(p.ports_only(), deadline).where
        sched = list_schedule(p, assign)
        bound = simple_bounds(p)
        return settle(
            sched.to_placement("heft-ports", "heuristic", 0.0, time.monotonic() - started),
            strongest(bound)[1],
        )

    @staticmethod
    def _milp(p: PlacementProblem, best: _Incumbent, options: SolveOptions) -> None:
        """One run of the MILP on HiGHS, for `MILP_SHARE` of the time, when its model is small
        (and quick to build for the time it gets)."""
        highs = next(s for s in milp.SOLVERS if s.name == "milp-highs")
        if not highs.available()[0]:
            return
        share = MILP_SHARE if cpsat.SOLVERS[0].available()[0] else 1.0
        milp_s = share * options.remaining()
        rows = milp.count_rows(p, MILP_ROWS) if p.n <= MILP_MAX_TASKS else math.inf
        small = p.objective == "throughput" or (
            rows <= MILP_ROWS and rows * BUILD_S_PER_ROW <= BUILD_SHARE * milp_s
        )
        if not small:
            return
        plan = highs.solve(p, replace(options, hint=best.plan, deadline=time.monotonic() + milp_s))
        best.bounds["milp-highs"] = plan.lower_bound_ms
        best.offer(plan, "milp-highs")

    def _race(self, p: PlacementProblem, best: _Incumbent, options: SolveOptions) -> None:
        """Local search and CP-SAT take turns until the time is up or the plan is proven.

        Each turn starts from the best plan so far, whoever found it (CP-SAT from it as a
        complete hint, its model built once); an arm whose turn improved the plan gets twice
        as long next time, one whose turn did not gets half as long (within `SLICE_S`), so the
        time goes to whichever search is improving.
        """
        session = self._session(p, best, options)
        # the old pipeline's path first, so the race never ends behind it: a plain descent to
        # a local optimum, then one long CP-SAT turn from it (its search needs a long run to
        # pay for its presolve on large models)
        descent = replace(options, deadline=time.monotonic() + DESCENT_SHARE * options.remaining())
        descended = self._local(p, best, descent, 0, kicks=False)
        turns = 1
        # moves pay here: the search goes on, with kicks, before CP-SAT's turn, as long as
        # each of its turns improves the plan
        while descended and options.remaining() > LOCAL_MORE_S and not best.optimal:
            kicked = replace(
                options, deadline=time.monotonic() + LOCAL_FIRST_SHARE * options.remaining()
            )
            improved = self._local(p, best, kicked, turns)
            turns += 1
            if not improved:
                break
        first = max(SLICE_S[0], FIRST_SLICE_SHARE * options.remaining())
        arms = [_Arm("local", first, turns=turns)]
        if session is not None and not best.optimal:
            share = CPSAT_FIRST_SHARE[0 if descended else 1]
            long_turn = replace(options, deadline=time.monotonic() + share * options.remaining())
            improved = self._cpsat(p, best, session, long_turn)
            arms.append(_Arm("cpsat", first if improved else CPSAT_MIN_SLICE_S, turns=1))
        while options.remaining() > SLICE_S[0] / 2 and not best.optimal:
            for arm in arms:
                if options.remaining() <= SLICE_S[0] / 2 or best.optimal:
                    break
                if arm.name == "cpsat" and options.remaining() < CPSAT_MIN_SLICE_S:
                    continue  # a shorter turn finds nothing and may overrun the limit
                turn = replace(
                    options, deadline=time.monotonic() + min(arm.slice_s, options.remaining())
                )
                if arm.name == "local":
                    improved = self._local(p, best, turn, arm.turns)
                else:
                    assert session is not None
                    improved = self._cpsat(p, best, session, turn)
                arm.turns += 1
                grown = arm.slice_s * (2 if improved else 0.5)
                shortest = CPSAT_MIN_SLICE_S if arm.name == "cpsat" else SLICE_S[0]
                arm.slice_s = min(SLICE_S[1], max(shortest, grown))

    @staticmethod
    def _session(
        p: PlacementProblem, best: _Incumbent, options: SolveOptions
    ) -> cpsat.Session | None:
        """The CP-SAT model for the race (restricted on large instances), or None when there
        is no time to build one."""
        if not cpsat.SOLVERS[0].available()[0] or best.plan is None:
            return None
        size = interval_count(p, p.cand)
        allowed: list[tuple[int, ...]] | None = None
        if size > FULL_MODEL_LIMIT:
            allowed = restrict(p, [best.plan, *best.seen])
            size = interval_count(p, allowed)
            if size > RESTRICTED_LIMIT:
                return None
        if size * BUILD_S_PER_INTERVAL > BUILD_SHARE * options.remaining():
            return None
        return cpsat.Session(p, best.plan.objective_ms, allowed)

    @staticmethod
    def _cpsat(
        p: PlacementProblem, best: _Incumbent, session: cpsat.Session, options: SolveOptions
    ) -> bool:
        plan = session.search(options, best.plan)
        if session.allowed is None:
            best.bounds["cpsat"] = max(best.bounds.get("cpsat", 0.0), session.bound)
        return best.offer(plan, "cpsat")

    @staticmethod
    def _local(
        p: PlacementProblem,
        best: _Incumbent,
        options: SolveOptions,
        turn: int,
        kicks: bool = True,
    ) -> bool:
        """One turn of the local search: it goes on where its last turn stopped while the best
        plan is still its own, and starts anew from the best plan otherwise."""
        assert best.plan is not None
        search = best.search
        if search is None or search.value > best.plan.objective_ms * (1 + 1e-9):
            assign = [p.device_index[best.plan.assignment[t]] for t in p.tasks]
            start = plan_timing(p, best.plan) if p.objective == "latency" else None
            search = best.search = LocalSearch(p, assign, options.seed + turn, start=start)
        search.bound = best.bound
        better, value, sched = search.run(options.deadline, kicks=kicks)
        if value >= best.plan.objective_ms * (1 - 1e-9):
            return False
        sched = sched or list_schedule(p, better)
        plan = sched.to_placement("local", "heuristic", best.bound, 0.0)
        label = best.label if best.label.endswith("+local") else f"{best.label}+local"
        return best.offer(plan, label, f"local search: {label}")

    @staticmethod
    def _done(best: _Incumbent, started: float) -> Placement:
        plan = best.plan
        assert plan is not None
        source, bound = strongest(best.bounds)
        settle(plan, bound, source)
        plan.extra["stopped_by"] = "proof"
        if plan.status != "optimal":
            base = best.label.removesuffix("+local")
            plan.status = "feasible" if base in EXACT_PREFERENCE else "heuristic"
            plan.extra["stopped_by"] = "time"
        plan.solver = f"auto({best.label})"
        plan.solve_seconds = time.monotonic() - started
        return plan


SOLVERS = (AutoSolver(),)
