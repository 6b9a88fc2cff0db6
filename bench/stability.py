"""Plans are stable: the same model planned on an idle and on a loaded machine.

    .venv/bin/python bench/stability.py [--models shufflenet squeezenet] [--rounds 2] \
        [--modes alone turns] [--time-limit 10]

For each zoo model, each measuring mode and each round, the model is profiled afresh (an empty
profile cache; the loopback link measured once and copied in) and planned for latency on this
machine's CPU groupings (`moirai serve --devices local`'s plan), twice in a row: once as the
machine is ("idle"; under the benchmark lock, other agents' light work may still run) and once
beside a busy loop pinned to the last core, in a session of its own ("loaded", the condition
of bench/results/plans.md's shufflenet miss: the other core busy through the whole
measurement). Modes:

- `alone`: each device timed in its own window at the default priority, one after the other
  (the method before `moirai.profile.turns`: `time_in_turns` left out);
- `turns`: the devices of every grouping timed in turns (`moirai.profile.turns`), at the
  highest priority the process may take.

It prints, per model, mode and condition, the whole model's time on each device, whether the
profile was contended, and the latency plan's layout with its predicted served time; a mode is
stable when every round and condition gives the same layout. Writes
bench/results/stability.md and stability.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moirai import zoo  # noqa: E402
from moirai.devices import available_cores  # noqa: E402
from moirai.planning import plan_model, resolve  # noqa: E402
from moirai.profile import measured  # noqa: E402
from moirai.profile.targets import cpu_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _spin(core: int) -> None:
    os.setsid()  # a session of its own, as another user's work would be (its own autogroup)
    os.sched_setaffinity(0, {core})
    while True:
        pass


@contextlib.contextmanager
def busy_core(loaded: bool) -> Iterator[None]:
    """A busy loop pinned to the last core while the block runs (when `loaded`)."""
    if not loaded:
        yield
        return
    proc = mp.get_context("spawn").Process(target=_spin, args=(available_cores()[-1],))
    proc.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.kill()
        proc.join()


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    if name == "turns":
        yield
        return
    real = measured.time_in_turns
    measured.time_in_turns = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        measured.time_in_turns = real


def plan_once(name: str, cache: Path, links: Path | None, args: argparse.Namespace) -> dict:
    if links is not None:
        shutil.copytree(links, cache / "links", dirs_exist_ok=True)
    started = time.monotonic()
    inputs = resolve(
        zoo.get(name),
        "local",
        input_shapes=zoo.input_shapes(name),
        profile="measured",
        cache_dir=cache,
    )
    planned = plan_model(
        inputs.model,
        inputs.device_sets,
        objective="latency",
        profile=inputs.profile,
        time_limit=args.time_limit,
        threads=len(available_cores()),
    )
    devices = inputs.profile.document.devices
    predicted = planned.plan.predicted
    return {
        "run_ms": {k: d.run_ms for k, d in sorted(devices.items())},
        "contended": sorted(k for k, d in devices.items() if d.contended),
        "load": {k: d.load.to_dict() for k, d in devices.items() if d.load is not None},
        "layout": predicted.get("layout"),
        "stages": [s.device for s in planned.plan.stages],
        "served_ms": predicted.get("served_ms", predicted.get("latency_ms")),
        "candidates": predicted.get("candidates", []),
        "seconds": time.monotonic() - started,
        "loadavg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shufflenet", "squeezenet"])
    parser.add_argument("--modes", nargs="+", default=["alone", "turns"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moirai-stability-") as tmp:
        links: Path | None = None
        for name in args.models:
            for round_ in range(args.rounds):
                for mode_name in args.modes:
                    for loaded in (False, True):
                        cache = Path(tmp) / f"{name}-{round_}-{mode_name}-{loaded}"
                        with mode(mode_name), busy_core(loaded):
                            row = plan_once(name, cache, links, args)
                        if links is None:
                            links = cache / "links"
                        row |= {
                            "model": name,
                            "mode": mode_name,
                            "round": round_,
                            "condition": "loaded" if loaded else "idle",
                        }
                        rows.append(row)
                        print(_line(row), flush=True)
    write(rows, args)


def _line(row: dict[str, Any]) -> str:
    times = ", ".join(f"{k.split('=')[-1]}t {v:.2f}" for k, v in row["run_ms"].items())
    contended = ", ".join(k.split("=")[-1] + "t" for k in row["contended"]) or "-"
    served = row["served_ms"]
    served_text = f"{served:.2f}" if isinstance(served, int | float) else "?"
    return (
        f"| {row['model']} | {row['mode']} | {row['round'] + 1} | {row['condition']} | {times} "
        f"| {contended} | {row['layout']} | {served_text} | {row['loadavg']:.1f} |"
    )


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    head = (
        f"# Plans on an idle and a loaded machine (`bench/stability.py`)\n\n"
        f"{len(available_cores())} cores ({cpu_model()}), shared with other work. Each row: a "
        "fresh measured profile (empty cache) and the latency plan over the CPU groupings; "
        "`loaded` runs a busy loop pinned to the last core, in a session of its own, throughout. "
        "`alone`: each device "
        "timed in its own window at the default priority (the method before); `turns`: the "
        "devices timed in turns at raised priority (`moirai.profile.turns`). Times are the "
        "whole model's fastest run per device (1t, 2t: threads); contended: devices whose "
        "turns never were quiet; predicted served ms: the plan's served makespan as predicted, "
        "without the client's call; load: 1-minute load average after the row.\n\n"
    )
    table = [
        "| model | mode | round | machine | whole model ms | contended | latency plan "
        "| predicted served ms | load |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_line(r) for r in rows),
    ]
    summary = []
    for name in args.models:
        for mode_name in args.modes:
            layouts = {r["layout"] for r in rows if r["model"] == name and r["mode"] == mode_name}
            verdict = "stable" if len(layouts) == 1 else "unstable"
            summary.append(f"- {name}, `{mode_name}`: {verdict} ({'; '.join(sorted(layouts))})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stability.md").write_text(
        head + "\n".join(table) + "\n\n" + "\n".join(summary) + "\n", encoding="utf-8"
    )
    (RESULTS / "stability.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
