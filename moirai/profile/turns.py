"""The whole model's run time on several devices, timed in turns, and the load it met.

A CPU's cores can be grouped into devices in several ways (one device with every thread, or
several smaller ones), and the planner picks the grouping by the run times of those devices.
So the times must rank them the same way on an idle and on a loaded machine. They did not when
each device was timed in its own window, one after the other: on two cores shared with other
work, ShuffleNet's 2-thread device was timed while the other core was busy throughout its
window (7.2 ms a run where it takes 3.7 alone, and one thread 4.3), so the planner chose two
1-thread devices and served 6.9 ms where either device alone serves under 5.

**Turns.** Every device measured for a model runs the whole model in turns of about `TURN_S`
(at least one run): 1 thread, 2 threads, 1 thread, 2 threads, ... Each device's time is its
fastest run (`moirai.profile.measured`, Statistics), now taken over the same stretch of time as
the others', so a quiet moment anywhere in it serves them all, and a busy one costs them all.

**At the front of the queue.** Where the process may (root, or `CAP_SYS_NICE`), the turns run
at the highest priority (`NICE`, `raised_priority`: the sessions' threads are made under it
and inherit it, and the session's autogroup is raised with them), so another process on the
same cores waits for them rather than they for it, and a run times the device much as it runs
with the machine to itself. ShuffleNet, 150 runs of each beside a busy loop on the other core
started in another session: at the default priority the 2-thread runs' second thread queued
behind the loop for 4.7 ms of a run (median), 5 runs of 150 unstarved, fastest 4.45 ms, no
faster than one thread (4.49); with the thread raised alone the same (the loop's group shares
the cores equally with ours); with the group raised too 130 of 150 unstarved, fastest 4.02
against one thread's 4.37. Stage servers serve at the default priority: this is about ranking the
devices the same way whatever the machine is doing while they are measured, and it lasts
only as long as the turns. Elsewhere they run as they are, and the load shows in the profile.

**The load each turn met.** A turn is *quiet* when
- its runs waited for a core less than `STARVED_SHARE` of their time: the run delay of every
  thread of this process (`/proc/self/task/*/schedstat`, the kernel's time runnable but not
  running) — a 2-thread session whose second thread waits behind another process is starved,
  however fast its runs happen to be;
- and other processes used less than `OTHERS_QUIET` of the turn's cores (`/proc/stat`, every
  process on the machine, less this one's own CPU time): another process sharing the cores
  costs a run even when the scheduler lets this one in first (its caches are cold, its wakeups
  late) — 6.3 ms a run for ShuffleNet's 2-thread device beside a busy loop on the other core,
  with no run delay at all.

The turns last at least as long as the settings ask (`min_seconds`, `repeats`), and then go on
for the devices that have not had `QUIET_TURNS` quiet turns yet, for at most `patience_seconds`
more. A device that never got them is *contended*: its time is the fastest run still, but the
profile says so (`Load`), and the profile cache keeps it only until a quieter measurement
replaces it (`moirai.profile.measured.MeasuredProfile`). What no probe sees — the host of a
virtual machine running other guests' work on the same physical cores — only the window's
length and the fastest run guard against.

Where the kernel's counters cannot be read (not Linux), every turn counts as quiet and the load
is unknown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

from moirai.profile.document import Load

TURN_S = 0.1
"""How long one device's turn lasts (at least one run)."""
STARVED_SHARE = 0.1
"""A turn whose runs waited for a core more than this share of their time was starved."""
OTHERS_QUIET = 0.2
"""A turn during which other processes used more than this share of its cores was busy."""
QUIET_TURNS = 3
"""Quiet turns each device needs before the turns may end."""
NICE = -20
"""The priority the turns run at where the process may raise its own."""

Progress = Callable[[str], None]


class Machine:
    """The kernel's counters the turns read (module docstring); tests replace it."""

    def waited_ms(self) -> float | None:
        """Time every thread of this process has waited for a core, in total (ms)."""
        total = 0
        try:
            tasks = os.listdir("/proc/self/task")
        except OSError:
            return None
        seen = False
        for tid in tasks:
            try:
                with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[1])
                    seen = True
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
        return total / 1e6 if seen else None

    def tick_s(self) -> float:
        """How finely `busy_s` counts."""
        return 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)

    def busy_s(self) -> dict[int, float] | None:
        """Each core's busy time since boot, every process together (s)."""
        try:
            with open("/proc/stat", encoding="ascii") as f:
                lines = f.readlines()
        except OSError:
            return None
        tick = self.tick_s()
        out = {}
        for line in lines:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                # user, nice, system, irq, softirq (idle, iowait and steal are not busy)
                out[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6]) * tick
        return out or None

    def own_cpu_s(self) -> float:
        return time.process_time()

    def loadavg(self) -> float | None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return None

    def clock(self) -> float:
        return time.perf_counter()


AUTOGROUP = "/proc/self/autogroup"


@contextlib.contextmanager
def raised_priority(nice: int = NICE) -> Iterator[int | None]:
    """The calling thread, and the threads it starts meanwhile, at priority `nice` where this
    process may raise it; yields the nice value in effect (None where there is none).

    On Linux a thread's nice value is its own and new threads inherit it; but where the kernel
    groups processes by session (autogroups, `kernel.sched_autogroup_enabled`), a nice value
    only orders threads within the group, and the groups share the cores equally. So the
    session's group is raised too (`/proc/self/autogroup`), for as long as the block lasts.

    The group outlives this process (the shell that started it, and whatever else runs in its
    session, stay in it), so a process killed in the block must still put it back: a signal
    that would end the process without unwinding (SIGTERM, SIGHUP, or SIGINT where its default
    is set; `_restoring_on_signals`) first restores the group, then ends the process by the same
    signal, as it would have. A handler the program installed itself is left alone: it decides
    how the process ends, and unwinding runs the restore below. SIGKILL cannot be caught."""
    if not hasattr(os, "setpriority"):
        yield None
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:  # not permitted: measure as we are
        yield before
        return
    group = _autogroup_nice()
    if group is not None:
        group = group if _set_autogroup_nice(nice) else None

    def restore() -> None:
        if group is not None:
            _set_autogroup_nice(group)
        os.setpriority(os.PRIO_PROCESS, 0, before)  # lowering a priority is always permitted

    with _restoring_on_signals(restore if group is not None else None):
        try:
            yield nice
        finally:
            restore()


_ENDING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name)
)


@contextlib.contextmanager
def _restoring_on_signals(restore: Callable[[], None] | None) -> Iterator[None]:
    """While the block lasts, each of `_ENDING_SIGNALS` whose disposition is the default (the
    process ends without unwinding) calls `restore`, then ends the process by that signal as
    the default would. Only the main thread may set handlers; elsewhere this does nothing."""
    if restore is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ending(signum: int, _frame: object) -> None:
        restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    installed = {}
    for signum in _ENDING_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            installed[signum] = signal.signal(signum, ending)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _autogroup_nice() -> int | None:
    """The nice value of this session's autogroup ("/autogroup-25 nice 0"), None without."""
    try:
        with open(AUTOGROUP, encoding="ascii") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup_nice(nice: int) -> bool:
    try:
        with open(AUTOGROUP, "w", encoding="ascii") as f:
            f.write(str(nice))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Contender:
    """A device taking turns: its run (wall ms of one run of the whole model), the cores it
    runs on, and how to pin the calling thread to them for a turn."""

    run: Callable[[], float]
    cores: Collection[int]
    pinned: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext


@dataclass
class Timed:
    """One device's runs in the turns."""

    runs: list[float] = field(default_factory=list)
    """Wall time of each timed run (ms)."""
    turns: int = 0
    quiet_turns: int = 0
    waited_ms: float | None = None
    """Time its runs waited for a core, all threads together (None: unknown)."""
    others_s: float | None = None
    """CPU time other processes took on its cores during its turns (None: unknown)."""
    core_s: float = 0.0
    """Its turns' wall time times its cores: what `others_s` is a share of."""
    wanted: int = 0
    """Runs the settings ask for (`min_seconds`, `repeats`)."""

    @property
    def fastest(self) -> float:
        return min(self.runs) if self.runs else 0.0

    def load(
        self,
        seconds: float,
        loadavg: float | None,
        alongside: tuple[str, ...],
        nice: int | None = None,
    ) -> Load:
        wall = sum(self.runs)
        return Load(
            loadavg=loadavg,
            others_cpu=None
            if self.others_s is None or self.core_s <= 0
            else min(1.0, max(0.0, self.others_s / self.core_s)),
            waited=None if self.waited_ms is None or wall <= 0 else self.waited_ms / wall,
            turns=self.turns,
            quiet_turns=self.quiet_turns,
            seconds=seconds,
            contended=self.quiet_turns < QUIET_TURNS,
            alongside=alongside,
            nice=nice,
        )


@contextlib.contextmanager
def _counting(
    machine: Machine, timed: Timed, cores: Collection[int], started: float
) -> Iterator[None]:
    """Account one turn's load to `timed` (module docstring)."""
    waited0, busy0, own0 = machine.waited_ms(), machine.busy_s(), machine.own_cpu_s()
    runs0 = len(timed.runs)
    yield
    waited1, busy1, own1 = machine.waited_ms(), machine.busy_s(), machine.own_cpu_s()
    wall_s = machine.clock() - started
    run_ms = sum(timed.runs[runs0:])
    timed.turns += 1
    quiet = True
    if waited0 is not None and waited1 is not None:
        waited = max(0.0, waited1 - waited0)
        timed.waited_ms = (timed.waited_ms or 0.0) + waited
        quiet = waited <= STARVED_SHARE * run_ms
    if busy0 is not None and busy1 is not None and cores:
        busy = sum(busy1.get(c, 0.0) - busy0.get(c, 0.0) for c in cores)
        others = max(0.0, busy - (own1 - own0))
        timed.others_s = (timed.others_s or 0.0) + others
        # Each core's counter may be off by a tick at either end: a short turn is given that.
        slack = machine.tick_s() * len(cores)
        quiet = quiet and others <= OTHERS_QUIET * wall_s * len(cores) + slack
    timed.core_s += wall_s * len(cores)
    timed.quiet_turns += quiet


def take_turns(
    contenders: Mapping[str, Contender],
    *,
    warmup: int,
    runs_for: Callable[[float], int],
    min_seconds: float,
    patience_seconds: float,
    machine: Machine | None = None,
    progress: Progress | None = None,
    nice: int | None = None,
) -> dict[str, tuple[Timed, Load]]:
    """Time every contender in turns (module docstring): after `warmup` untimed runs each, turns
    until each has `runs_for(its fastest warm-up run)` runs and then, for at most
    `patience_seconds` more, until each has had `QUIET_TURNS` quiet turns. Each contender's runs
    and the load they met; `nice` is the priority they ran at, for the record."""
    machine = machine or Machine()
    timed = {name: Timed() for name in contenders}
    for name, c in contenders.items():
        with c.pinned():
            warm = [c.run() for _ in range(max(1, warmup))]
        timed[name].wanted = runs_for(min(warm))
    turn_s = min(TURN_S, min_seconds / QUIET_TURNS) if min_seconds > 0 else 0.0
    started = reported = machine.clock()
    patience_from: float | None = None

    def settled(t: Timed) -> bool:
        return len(t.runs) >= t.wanted and t.quiet_turns >= QUIET_TURNS

    while True:
        base_done = all(len(t.runs) >= t.wanted for t in timed.values())
        if base_done:
            if patience_from is None:
                patience_from = machine.clock()
            if all(settled(t) for t in timed.values()):
                break
            if machine.clock() - patience_from >= patience_seconds:
                break
        for name, c in contenders.items():
            t = timed[name]
            if settled(t):
                continue
            with c.pinned():
                turn_started = machine.clock()
                with _counting(machine, t, c.cores, turn_started):
                    t.runs.append(c.run())
                    while machine.clock() - turn_started < turn_s:
                        t.runs.append(c.run())
        if progress is not None and machine.clock() - reported >= 1.0:
            reported = machine.clock()
            progress(
                "in turns: "
                + ", ".join(
                    f"{n} {t.fastest:.3f} ms ({len(t.runs)} runs, {t.quiet_turns} quiet turns)"
                    for n, t in timed.items()
                )
            )
    seconds = machine.clock() - started
    loadavg = machine.loadavg()
    return {
        name: (t, t.load(seconds, loadavg, tuple(n for n in contenders if n != name), nice))
        for name, t in timed.items()
    }
