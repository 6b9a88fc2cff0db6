"""The plan space, served: Moirai's latency and throughput plans on this machine against ONNX
Runtime on its own and plain replication.

    .venv/bin/python bench/plans.py [--models squeezenet inception_v1 ...] [--requests 9] \
        [--window 5] [--rounds 2] [--time-limit 10] [--cache-dir DIR] [--append]

For each zoo model, as `moirai serve --devices local` plans it (measured profile, cached; the
CPU's cores grouped as serves best; lanes for throughput):

1. **Latency.** The latency plan, served by `moirai serve`'s processes
   (`moirai.runtime.local.LocalDeployment`), median of `requests` sequential requests from one
   client, against in-process ONNX Runtime on the whole model with every core and with one
   thread (the best single device of the groupings), and the serving frame: a model with the
   same inputs and outputs that computes nothing, served the same way (the stack's own cost per
   request). Goal: served <= 1.05 x the better of the two + the frame.
2. **Throughput.** The throughput plan, served, driven by 3 client processes with 4 requests in
   flight each over a window, against in-process ONNX Runtime with every core (4 threads calling
   `run` on one session), two one-thread replicas (two processes, each pinned to its core, each
   calling `run` in a loop; their requests/s added) and plain replication served (one lane per
   one-thread device). Goals: served >= 0.95 x the best of every-core ORT and two replicas, and
   >= plain replication served (within 5%: measurements alternate, but the machine is shared).
   The throughput plan is also driven with the clients' tensors in shared memory (Triton's
   extension, `--allow-shared-memory`), as a client on the serving host can send them; the goals
   are judged on requests that carry their tensors.

The served variants and the in-process ones run back to back for each model so that they see the
same machine, in `rounds` rounds (each variant once per round; its best round kept); the load
average before and after each model is recorded. Writes bench/results/plans.md and plans.json;
with `--append`, the rows of models not run this time are kept from plans.json, so that a long
list can be run in several invocations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import cpu_ms, drive, median_ms  # noqa: E402
from runtime import inputs_for  # noqa: E402
from validation import frame_ms  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import available_cores  # noqa: E402
from moirai.planning import plan_model, resolve  # noqa: E402
from moirai.planning.lanes import merge_lanes  # noqa: E402
from moirai.profile.targets import cpu_model  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.sessions import session_options  # noqa: E402
from moirai.stageplan import StagePlan  # noqa: E402
from stage_server.allocator import keep_freed_memory  # noqa: E402
from stage_server.client import InferenceClient  # noqa: E402
from stage_server.settings import EndpointConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LATENCY_GOAL, THROUGHPUT_GOAL, REPLICATION_GOAL = 1.05, 0.95, 0.95


# ------------------------------------------------------------------ served
def served_rps(
    d: LocalDeployment, model: str, inputs: dict, window_s: float, shared_memory: bool = False
) -> dict[str, float]:
    """Requests/s of the deployment under 3 client processes x 4 in flight, and the CPU all
    serving processes spent per request; `shared_memory`: the clients' tensors in shared
    memory (Triton's extension) instead of in the requests."""
    r = drive(
        d.grpc_url,
        model,
        inputs,
        pids=list(d.pids.values()),
        window_s=window_s,
        warmup_s=1,
        shared_memory=shared_memory,
    )
    return {"rps": r["rps"], "cpu_ms": r["server_cpu_ms"]}


# --------------------------------------------------------------- in process
def _session(model_file: str, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(
        model_file, session_options(threads), providers=["CPUExecutionProvider"]
    )


def in_process_rps(
    model_file: str, inputs: dict, threads: int, window_s: float
) -> dict[str, float]:
    """Requests/s of 4 Python threads calling `run` on one session of `threads` threads, and
    the CPU the process spent per request."""
    session = _session(model_file, threads)
    stop, counts = threading.Event(), [0] * 4

    def worker(i: int) -> None:
        while not stop.is_set():
            session.run(None, inputs)
            counts[i] += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    c0, n0, t0 = cpu_ms([os.getpid()]), sum(counts), time.perf_counter()
    time.sleep(window_s)
    c1, n1, t1 = cpu_ms([os.getpid()]), sum(counts), time.perf_counter()
    stop.set()
    for w in workers:
        w.join()
    return {"rps": (n1 - n0) / (t1 - t0), "cpu_ms": (c1 - c0) / max(n1 - n0, 1)}


def _replica(model_file: str, inputs: dict, core: int, count, ready, stop) -> None:
    os.sched_setaffinity(0, {core})
    session = _session(model_file, 1)
    session.run(None, inputs)
    ready.set()
    while not stop.is_set():
        session.run(None, inputs)
        with count.get_lock():
            count.value += 1


def replicas_rps(model_file: str, inputs: dict, window_s: float) -> dict[str, float]:
    """Requests/s of one one-thread ORT process per core (two on two cores), together, and
    the CPU they spent per request."""
    ctx = mp.get_context("spawn")
    count, stop = ctx.Value("q", 0), ctx.Event()
    readies = [ctx.Event() for _ in available_cores()]
    procs = [
        ctx.Process(target=_replica, args=(model_file, inputs, core, count, ready, stop))
        for core, ready in zip(available_cores(), readies, strict=True)
    ]
    for p in procs:
        p.start()
    try:
        for ready in readies:
            ready.wait(300)
        time.sleep(1.0)
        pids = [p.pid for p in procs]
        c0, n0, t0 = cpu_ms(pids), count.value, time.perf_counter()
        time.sleep(window_s)
        c1, n1, t1 = cpu_ms(pids), count.value, time.perf_counter()
    finally:
        stop.set()
        for p in procs:
            p.join(30)
    return {"rps": (n1 - n0) / (t1 - t0), "cpu_ms": (c1 - c0) / max(n1 - n0, 1)}


# ------------------------------------------------------------------- a model
def _served_latency(plan: StagePlan, path: Path, inputs: dict, n: int, tmp: Path) -> float:
    with LocalDeployment(plan, path, tmp) as d, InferenceClient(d.grpc_url) as client:
        return median_ms(lambda: client.infer(plan.model_name, inputs, timeout_s=300), n)


def _layout(plan: StagePlan) -> str:
    return str(plan.predicted.get("layout", "?"))


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started = time.monotonic()
    path = zoo.get(name)
    inputs = resolve(
        path,
        "local",
        input_shapes=zoo.input_shapes(name),
        profile="measured",
        cache_dir=args.cache_dir,
    )
    common = {
        "profile": inputs.profile,
        "time_limit": args.time_limit,
        "threads": len(available_cores()),
    }
    latency = plan_model(inputs.model, inputs.device_sets, objective="latency", **common)
    throughput = plan_model(inputs.model, inputs.device_sets, objective="throughput", **common)
    # Plain replication: a whole copy of the model on each device of the finest grouping.
    finest = max(inputs.device_sets, key=lambda ds: len(ds.devices))
    copies = [
        plan_model(
            inputs.model,
            dataclasses.replace(finest, devices=(device,)),
            objective="throughput",
            solver="single",
            **common,
        ).plan
        for device in finest.devices
    ]
    replication = merge_lanes(copies, [1.0] * len(copies))
    lanes = len(copies)
    feeds = inputs_for(latency.plan)
    # The file itself, not the loaded proto's bytes: ORT reads external weights only beside a path.
    model_file = str(path)
    cores = len(available_cores())
    row: dict[str, Any] = {"model": name, "load_before": os.getloadavg()[0]}
    same = throughput.plan.to_dict()["stages"] == replication.to_dict()["stages"]

    # Each variant is measured once per round, the rounds in turn, and its best round is kept:
    # on a shared machine another process's burst then costs every variant alike.
    latency_runs: dict[str, list[float]] = {}
    rps_runs: dict[str, list[float]] = {}
    cpu_runs: dict[str, list[float]] = {}
    all_cores, one_thread = _session(model_file, cores), _session(model_file, 1)
    for _ in range(args.rounds):
        # Latency: served, the frame, in-process ORT with every core and with one thread.
        for key, value in (
            ("latency_ms", _served_latency(latency.plan, path, feeds, args.requests, tmp / "lat")),
            ("frame_ms", frame_ms(latency.plan, inputs.model.proto, args.requests, tmp)),
            ("ort_all_ms", median_ms(partial(all_cores.run, None, feeds), args.requests)),
            ("ort_one_ms", median_ms(partial(one_thread.run, None, feeds), args.requests)),
        ):
            latency_runs.setdefault(key, []).append(value)
        # Throughput: served plan, served plain replication, ORT with every core, two replicas.
        endpoint = EndpointConfig(allow_shared_memory=True)
        with LocalDeployment(throughput.plan, path, tmp / "tput", endpoint=endpoint) as d:
            served = served_rps(d, throughput.plan.model_name, feeds, args.window)
            shm = served_rps(d, throughput.plan.model_name, feeds, args.window, True)
        for key, measured in (("served", served), ("served_shm", shm)):
            rps_runs.setdefault(f"{key}_rps", []).append(measured["rps"])
            cpu_runs.setdefault(f"{key}_cpu_ms", []).append(measured["cpu_ms"])
        if not same:
            with LocalDeployment(replication, path, tmp / "repl") as d:
                repl = served_rps(d, replication.model_name, feeds, args.window)["rps"]
            rps_runs.setdefault("replication_rps", []).append(repl)
        for key, measured in (
            ("ort_all", in_process_rps(model_file, feeds, cores, args.window)),
            ("replicas", replicas_rps(model_file, feeds, args.window)),
        ):
            rps_runs.setdefault(f"{key}_rps", []).append(measured["rps"])
            cpu_runs.setdefault(f"{key}_cpu_ms", []).append(measured["cpu_ms"])
    row.update({k: min(v) for k, v in latency_runs.items()})
    row.update({k: max(v) for k, v in rps_runs.items()})
    row.update({k: min(v) for k, v in cpu_runs.items()})
    if same:
        row["replication_rps"] = row["served_rps"]  # the plan is plain replication
    row["runs"] = {**latency_runs, **rps_runs, **cpu_runs}

    row["latency_layout"] = _layout(latency.plan)
    row["latency_predicted_ms"] = latency.plan.predicted["latency_ms"]
    # What the planner weighed (predicted served ms of each layout), to set beside the measured.
    row["latency_candidates"] = latency.plan.predicted.get("candidates", [])
    row["throughput_candidates"] = throughput.plan.predicted.get("candidates", [])
    best = min(row["ort_all_ms"], row["ort_one_ms"])
    row["latency_goal_ms"] = LATENCY_GOAL * best + row["frame_ms"]
    row["latency_met"] = row["latency_ms"] <= row["latency_goal_ms"]
    row["throughput_layout"] = _layout(throughput.plan)
    row["throughput_predicted_rps"] = 1000.0 / throughput.plan.predicted["served_period_ms"]
    row["replication_lanes"] = lanes
    best_rps = max(row["ort_all_rps"], row["replicas_rps"])
    row["throughput_ratio"] = row["served_rps"] / best_rps
    row["throughput_met"] = row["throughput_ratio"] >= THROUGHPUT_GOAL
    row["replication_ratio"] = row["served_rps"] / row["replication_rps"]
    row["replication_met"] = row["replication_ratio"] >= REPLICATION_GOAL
    row["load_after"] = os.getloadavg()[0]
    row["seconds"] = time.monotonic() - started
    print(
        f"{name:>14}: latency {row['latency_ms']:.2f} ms ({row['latency_layout']}; goal "
        f"{row['latency_goal_ms']:.2f}: ORT all {row['ort_all_ms']:.2f}, one "
        f"{row['ort_one_ms']:.2f}, frame {row['frame_ms']:.2f}); throughput "
        f"{row['served_rps']:.1f} req/s ({row['throughput_layout']}; ORT all "
        f"{row['ort_all_rps']:.1f}, replicas {row['replicas_rps']:.1f}, replication served "
        f"{row['replication_rps']:.1f}) ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


# ------------------------------------------------------------------- report
def _load(row: dict[str, Any]) -> str:
    return f"{row['load_before']:.1f} / {row['load_after']:.1f}"


def report(results: dict[str, Any]) -> str:
    rows = [r for r in results["rows"] if "failed" not in r]
    failed = [r for r in results["rows"] if "failed" in r]
    m, s = results["machine"], results["settings"]
    lat = sum(r["latency_met"] for r in rows)
    tput = sum(r["throughput_met"] for r in rows)
    repl = sum(r["replication_met"] for r in rows)
    out = [
        "# The plan space, served (`bench/plans.py`)",
        "",
        f"{m['cores']} cores ({m['cpu']}), shared with other work: the load average (1 min) "
        "before and after each model is in the last column. Plans as `moirai serve --devices "
        "local` makes them (measured profile; the CPU's cores grouped as serves best; lanes for "
        f"throughput), solver time limit {s['time_limit']:g} s. Latency: median of "
        f"{s['requests']} sequential requests; throughput: 3 client processes x 4 in flight over "
        f"{s['window']:g} s. Every variant is measured in each of {s['rounds']} rounds, in turn, "
        "and its best round is kept (lowest latency, highest requests/s, lowest CPU per "
        "request). On a loaded machine a variant with more runnable processes gets a larger "
        "share of the cores, so requests/s favour the served variants; CPU per request (of "
        "every serving process, or of the ORT processes) does not depend on that share.",
        "",
        f"**Latency plans**: {lat} of {len(rows)} within {LATENCY_GOAL:g}x the better of "
        "in-process ONNX Runtime with every core and with one thread, plus the frame (the "
        "stack's own latency per request). "
        f"**Throughput plans**: {tput} of {len(rows)} at >= {THROUGHPUT_GOAL:g}x the better of "
        "in-process ONNX Runtime with every core and two one-thread replicas; "
        f"{repl} of {len(rows)} at >= {REPLICATION_GOAL:g}x plain replication served.",
        "",
        "| model | latency plan | served ms | predicted ms | ORT all cores ms | ORT 1 thread "
        "ms | frame ms | goal ms | met | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['latency_layout']} | {r['latency_ms']:.2f} | "
            f"{r['latency_predicted_ms']:.2f} | {r['ort_all_ms']:.2f} | {r['ort_one_ms']:.2f} | "
            f"{r['frame_ms']:.2f} | {r['latency_goal_ms']:.2f} | "
            f"{'yes' if r['latency_met'] else 'no'} | {_load(r)} |"
        )
    out += [
        "",
        "| model | throughput plan | served req/s | predicted req/s | ORT all cores | two "
        "replicas (ORT) | vs best | replication served | vs replication | served, tensors in "
        "shared memory | CPU ms/req: served / shared memory / ORT all cores / replicas | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shm = r.get("served_shm_rps")
        out.append(
            f"| {r['model']} | {r['throughput_layout']} | {r['served_rps']:.1f} | "
            f"{r['throughput_predicted_rps']:.1f} | {r['ort_all_rps']:.1f} | "
            f"{r['replicas_rps']:.1f} | {r['throughput_ratio']:.2f}x | "
            f"{r['replication_rps']:.1f} | {r['replication_ratio']:.2f}x | "
            + (
                f"{shm:.1f} ({shm / max(r['ort_all_rps'], r['replicas_rps']):.2f}x) | "
                if shm
                else "| "
            )
            + f"{r['served_cpu_ms']:.1f} / "
            + (f"{r['served_shm_cpu_ms']:.1f} / " if shm else "- / ")
            + f"{r['ort_all_cpu_ms']:.1f} / {r['replicas_cpu_ms']:.1f} | {_load(r)} |"
        )
    if failed:
        out += ["", "Cases that failed:", ""]
        out += [f"- {r['model']}: {r['failed']}" for r in failed]
    return "\n".join(out) + "\n"


def main() -> None:
    keep_freed_memory()  # this process is the latency client: no page faults per request
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.names(), choices=zoo.names())
    parser.add_argument("--requests", type=int, default=9, help="latency: requests timed")
    parser.add_argument("--window", type=float, default=5.0, help="throughput window, s")
    parser.add_argument("--time-limit", type=float, default=10.0, help="solver time limit, s")
    parser.add_argument("--cache-dir", type=Path, help="profile cache (default: the user's)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant, best kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other models' rows of the results directory's plans.json",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests: give 1 or more")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "requests": args.requests,
        "window": args.window,
        "time_limit": args.time_limit,
        "rounds": args.rounds,
    }
    previous = args.out / "plans.json"
    kept = []
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"--append: {previous} was written with other settings")
        kept = [r for r in old["rows"] if r["model"] not in args.models]
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="moirai-plans-") as tmp:
            try:
                rows.append(bench_model(name, args, Path(tmp)))
            except Exception as e:  # a case that fails is reported, the others still run
                message = " ".join(str(e).split())[:200]
                print(f"{name:>14}: failed: {message}", flush=True)
                rows.append({"model": name, "failed": message})
        # Written after every model, so that a run cut short keeps the models it measured.
        results = {
            "rows": kept + rows,
            "settings": settings,
            "machine": {"cores": len(available_cores()), "cpu": cpu_model()},
        }
        (args.out / "plans.json").write_text(json.dumps(results, indent=1) + "\n")
        text = report(results)
        (args.out / "plans.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
