"""Devices timed in turns (`moirai.profile.turns`): the turns alternate, each device keeps its
fastest run, a device whose turns met other work takes more turns until it has quiet ones or
its patience ends (then it is contended), and the profile cache measures a contended device
again, keeping the better measurement. The kernel's counters are faked: a fake clock, run
delay and per-core busy time, so these tests decide the same way on an idle and a busy
machine."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from profiling_support import FAST, ModelFile

from moirai.profile import measured, turns
from moirai.profile.cache import ProfileCache
from moirai.profile.document import DeviceProfile, Load
from moirai.profile.measured import MeasuredProfile
from moirai.profile.targets import Target, signature
from moirai.profile.turns import Contender, take_turns


class FakeMachine(turns.Machine):
    """A clock that runs advance, and load counters that the runs feed."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waited = 0.0
        self.busy = {0: 0.0, 1: 0.0}
        self.own = 0.0
        self.order: list[str] = []

    def clock(self) -> float:
        return self.now

    def waited_ms(self) -> float | None:
        return self.waited

    def busy_s(self) -> dict[int, float] | None:
        return dict(self.busy)

    def own_cpu_s(self) -> float:
        return self.own

    def tick_s(self) -> float:
        return 0.0

    def loadavg(self) -> float | None:
        return 1.5


Weather = Callable[[FakeMachine], tuple[float, float]]
"""At the machine's time: (ms a run waits for a core, share of its cores others use)."""


def quiet(machine: FakeMachine) -> tuple[float, float]:
    return 0.0, 0.0


def device(
    machine: FakeMachine,
    name: str,
    runs_ms: Callable[[], float],
    cores: list[int],
    weather: Weather = quiet,
) -> Contender:
    def run() -> float:
        waited, others = weather(machine)
        ms = runs_ms()
        wall = ms + waited
        machine.order.append(name)
        machine.now += wall / 1000
        machine.waited += waited
        machine.own += ms / 1000
        machine.busy[cores[0]] += ms / 1000
        for c in cores:
            machine.busy[c] += others * wall / 1000
        return wall

    return Contender(run=run, cores=cores)


def _turns(machine: FakeMachine, contenders: dict[str, Contender], patience: float) -> dict:
    return take_turns(
        contenders,
        warmup=1,
        runs_for=lambda ms: 5,
        min_seconds=0.03,
        patience_seconds=patience,
        machine=machine,
    )


def test_devices_take_turns_and_keep_their_fastest_run() -> None:
    machine = FakeMachine()
    slow_every_third = itertools.cycle([3.5, 3.0, 6.0])
    result = _turns(
        machine,
        {
            "one": device(machine, "one", lambda: 4.0, [0]),
            "two": device(machine, "two", lambda: next(slow_every_third), [0, 1]),
        },
        patience=1.0,
    )
    # Turns of 10 ms (min_seconds / QUIET_TURNS): one, two, one, two, ... after the warm-up.
    blocks = [name for name, _ in itertools.groupby(machine.order[2:])]
    assert blocks == ["one", "two"] * (len(blocks) // 2) and len(blocks) >= 6
    one, two = result["one"], result["two"]
    assert one[0].fastest == 4.0 and two[0].fastest == 3.0
    assert len(one[0].runs) >= 5 and len(two[0].runs) >= 5
    assert one[1] == Load(
        loadavg=1.5,
        others_cpu=0.0,
        waited=0.0,
        turns=one[0].turns,
        quiet_turns=one[0].turns,
        seconds=pytest.approx(machine.now - 0.0075),  # after the warm-up runs (4 + 3.5 ms)
        contended=False,
        alongside=("two",),
    )
    assert two[1].alongside == ("one",) and not two[1].contended


def test_a_starved_device_takes_turns_until_it_has_quiet_ones() -> None:
    """The 2-thread device's second thread waits behind other work for the first 0.3 s: its
    turns go on (the 1-thread device's, settled, do not) until it has had three quiet turns,
    which find its fastest run."""
    machine = FakeMachine()

    def weather(m: FakeMachine) -> tuple[float, float]:
        return (4.0, 0.5) if m.now < 0.3 else (0.0, 0.0)

    def runs_ms() -> float:
        return 3.0 if machine.now >= 0.3 else 3.5

    result = _turns(
        machine,
        {
            "one": device(machine, "one", lambda: 4.0, [0]),
            "two": device(machine, "two", runs_ms, [0, 1], weather),
        },
        patience=5.0,
    )
    two, load = result["two"]
    assert load.quiet_turns == 3 and not load.contended and two.fastest == 3.0
    assert load.turns > load.quiet_turns and load.waited is not None and load.waited > 0.1
    assert 0.3 < machine.now < 0.5  # stopped once quiet, long before its patience ran out
    assert machine.order[-1] == "two" and result["one"][0].turns == 3


def test_a_device_that_never_gets_a_quiet_turn_is_contended() -> None:
    """Other processes use its cores throughout (no run waits: the scheduler lets it in
    first): after the patience it is contended, with its fastest run and the load it met."""
    machine = FakeMachine()
    result = _turns(
        machine,
        {
            "one": device(machine, "one", lambda: 4.0, [0]),
            "two": device(machine, "two", lambda: 6.0, [0, 1], lambda m: (0.0, 0.6)),
        },
        patience=0.2,
    )
    two, load = result["two"]
    assert load.contended and load.quiet_turns == 0 and two.fastest == 6.0
    assert load.others_cpu == pytest.approx(0.6, abs=0.05) and load.waited == 0.0
    assert not result["one"][1].contended
    assert 0.2 < machine.now < 0.35  # the base window, then the patience


def test_without_patience_the_turns_end_with_the_base_window() -> None:
    machine = FakeMachine()
    result = _turns(
        machine,
        {"two": device(machine, "two", lambda: 6.0, [0, 1], lambda m: (3.0, 0.0))},
        patience=0.0,
    )
    two, load = result["two"]
    assert load.contended and load.turns == 3 and len(two.runs) == 6  # turns of two 9 ms runs


def test_raised_priority_holds_for_the_threads_started_under_it() -> None:
    before, group = os.getpriority(os.PRIO_PROCESS, 0), turns._autogroup_nice()
    seen: list[int] = []
    with turns.raised_priority() as nice:
        assert nice == os.getpriority(os.PRIO_PROCESS, 0)
        # Raised where permitted (root, CAP_SYS_NICE), left alone where not.
        assert nice in (turns.NICE, before)
        worker = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
        worker.start()
        worker.join()
    assert seen == [nice]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert turns._autogroup_nice() == group  # the session's group, where there is one, too


KILLED_IN_THE_TURNS = """
import signal, subprocess, sys, time
from moirai.profile import turns
for signum in (signal.SIGTERM, signal.SIGHUP):  # as from a terminal (not nohup's SIGHUP ignored)
    signal.signal(signum, signal.SIG_DFL)
keeper = subprocess.Popen(["sleep", "60"])  # stays in this session: its autogroup outlives us
with turns.raised_priority() as nice:
    print(keeper.pid, nice, turns._autogroup_nice(), flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not os.path.exists(turns.AUTOGROUP), reason="no autogroups on this kernel")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_profiler_killed_in_the_turns_restores_its_sessions_group(signum: int) -> None:
    """A real process, in a session of its own (so this one's group is not touched), is sent
    SIGTERM (or SIGHUP) while its priority is raised: it dies by that signal as before, and the
    group its session keeps (a `sleep` stays in it) is back at its nice value."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_IN_THE_TURNS],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=Path(turns.__file__).parents[2],
    )
    assert child.stdout is not None
    keeper_pid, nice, raised = child.stdout.readline().split()
    keeper = Path(f"/proc/{keeper_pid}/autogroup")
    try:
        if nice != str(turns.NICE) or raised != str(turns.NICE):
            child.kill()
            pytest.skip("this process may not raise its priority (root or CAP_SYS_NICE)")
        child.send_signal(signum)
        assert child.wait(timeout=10) == -signum  # ended by the signal, as without the handler
        assert keeper.read_text().split()[-1] == "0"  # a new session's group starts at 0
    finally:
        child.kill()
        child.wait()
        os.kill(int(keeper_pid), signal.SIGKILL)


def test_the_load_goes_through_the_profile_file() -> None:
    load = Load(1.2, 0.05, 0.01, 20, 19, 2.5, False, ("cpu:threads=2",), -20)
    profile = _profile("cpu:threads=1", 4.0, load)
    again = DeviceProfile.from_dict(profile.to_dict(), "device")
    assert again == profile and again.load == load and not again.contended
    plain = _profile("cpu:threads=1", 4.0, None)
    assert "load" not in plain.to_dict()
    assert DeviceProfile.from_dict(plain.to_dict(), "device").load is None
    assert "others used 5% of its cores" in load.describe()


# ---------------------------------------------------------- with the cache
def _profile(target: str, run_ms: float, load: Load | None) -> DeviceProfile:
    return DeviceProfile(
        target=target,
        signature=signature(Target("cpu", threads=int(target.rsplit("=", 1)[1]))),
        groups=(),
        run_ms=run_ms,
        run_spread_ms=0.0,
        call_overhead_ms=0.0,
        kernel_ms=None,
        warmup=0,
        repeats=1,
        measured_at="",
        load=load,
    )


def _load(contended: bool) -> Load:
    return Load(2.0, 0.5 if contended else 0.0, 0.0, 10, 0 if contended else 10, 1.0, contended)


class Measurements:
    """Stands in for the measuring: hands out the given profiles in order, and records which
    targets were timed in turns together."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, runs: list[tuple[float, bool]]) -> None:
        self.runs = list(runs)
        self.together: list[list[str]] = []
        monkeypatch.setattr(measured, "time_in_turns", self.time_in_turns)
        monkeypatch.setattr(measured, "measure_device", self.measure_device)

    def time_in_turns(self, model, graph, targets, settings, progress) -> dict:
        self.together.append(sorted(targets))
        return {}

    def measure_device(self, model, graph, target, settings, progress, turns) -> DeviceProfile:
        run_ms, contended = self.runs.pop(0)
        return _profile(target.key, run_ms, _load(contended))


def test_a_contended_entry_is_measured_again_until_a_quiet_one_replaces_it(
    squeezenet: ModelFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ProfileCache.at(tmp_path)
    fake = Measurements(monkeypatch, [(5.0, True), (6.0, True), (4.5, True), (7.0, False)])
    two = {"cpu:threads=2": Target("cpu", threads=2)}

    def measure() -> tuple[str, DeviceProfile]:
        profiler = MeasuredProfile(squeezenet.path, None, settings=FAST, cache=cache)
        entry = profiler.measure(two).devices["cpu:threads=2"]
        return profiler.cache_status["cpu:threads=2"], entry

    assert measure() == ("measured", _profile("cpu:threads=2", 5.0, _load(True)))
    # Contended again and slower: the earlier, faster one is kept.
    assert measure()[1].run_ms == 5.0
    # Contended but faster: nearer the device alone, it replaces the earlier one.
    assert measure()[1].run_ms == 4.5
    # Quiet: it replaces any contended one, and is a hit from then on.
    assert measure() == ("measured", _profile("cpu:threads=2", 7.0, _load(False)))
    status, entry = measure()
    assert status == "hit" and entry.run_ms == 7.0 and not fake.runs


def test_the_devices_of_every_grouping_are_timed_in_turns_together(
    squeezenet: ModelFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pricing the 2-thread device times the 1-thread device with it (`together`), so the
    grouping that prices the 1-thread device next finds it measured already."""
    fake = Measurements(monkeypatch, [(3.6, False), (4.0, False)])
    one, two = Target("cpu", threads=1), Target("cpu", threads=2)
    profiler = MeasuredProfile(
        squeezenet.path, None, settings=FAST, cache=ProfileCache.at(tmp_path), together=[one, two]
    )
    profiler.measure({two.key: two})
    profiler.measure({one.key: one})
    assert fake.together == [["cpu:threads=1", "cpu:threads=2"]]
    devices = profiler.document.devices
    assert devices[two.key].run_ms == 3.6 and devices[one.key].run_ms == 4.0
