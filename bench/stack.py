"""Stack cost: what `moirai serve` costs per request, and how close it serves to ONNX Runtime.

    .venv/bin/python bench/stack.py [--quick] [--tree LABEL=CHECKOUT ...] [--window 10] \
        [--only stack|resnet|wait|latency]

1. **Stack cost.** A model that computes nothing (one Identity node) served as a one-stage plan by
   `moirai serve`'s real processes (`moirai.runtime.local.LocalDeployment`), at 64 B, 0.57 MiB
   (1x3x224x224 FP32) and 4.7 MiB (1x3x640x640 FP32), driven by several client *processes* over
   gRPC (and over HTTP with binary tensors at 0.57 MiB, and over gRPC with the tensors in the
   clients' shared memory, Triton's extension, from 0.57 MiB: `grpc+shm`). Over a load window,
   the CPU every serving process spent (all threads, from the scheduler's nanosecond counts in
   /proc, the process tree of the deployment) divided by the requests completed in that window.
   Clients send a request encoded once and do not decode answers (one checked answer each), so
   that their own CPU disturbs the servers as little as possible; their CPU is reported apart.
2. **Against in-process ONNX Runtime.** ResNet-50 (`moirai.zoo`, 1x3x224x224) as a one-stage plan
   on one CPU device with every core's thread, 16 requests in flight from client processes,
   against in-process ORT with the same session options and threads at 16 in flight (16 Python
   threads calling `run` on one session) in alternating rounds, so that both see the same
   machine.
3. **The answer's wait.** The bare gRPC server of (1) answering a 0.57 MiB request with a 4 KiB
   answer (a classifier's input and output) at once, and after holding its event loop for 2, 7
   and 20 ms (a busy wait, as a stage that runs there holds it): one client, sequential requests,
   the median round trip less the wait. What a request costs the transport grows when its answer
   waits, which a model that computes nothing (the frame) does not show. The client's malloc is
   tuned as the servers' (`stage_server.allocator`).
4. **A light model's latency, against bare servers running it.** SqueezeNet (0.57 MiB in, 4 KiB
   out) as a one-stage plan on one device with every core's thread, served by `moirai serve`'s
   processes, against three bare gRPC servers that run the same session (the stage servers'
   options) with nothing around it but `stage_server.codec`'s decoding and encoding: `grpc.aio`
   handing the run to a one-thread pool (as a stage server does), `grpc.aio` running it on the
   event loop, and the sync gRPC server running it in its handler thread (no event loop at
   all); and in-process ONNX Runtime. One client, sequential requests, the median of each
   variant in each round, rounds alternating. What the bare servers add to ORT is the
   transport's; what Moirai adds to the best of them is its own.

Several checkouts can be measured side by side: `--tree before=/path/to/old/checkout --tree
after=.` runs each measurement (a size, the ResNet-50 comparison) for each checkout in turn, in a
child process with that checkout's `moirai` on the path (its servers too), so that both see the
same machine; the report has one row per checkout. Results go to bench/results/stack.json and
stack.md (`--only`: printed only). The load average is recorded: on a shared machine every
figure moves with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TREE = Path(os.environ.get("MOIRAI_TREE", ROOT)).resolve()
sys.path.insert(0, str(TREE))
os.environ["PYTHONPATH"] = str(TREE)  # the servers run this checkout's code too

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from loadgen import cpu_ms, drive, median_ms  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.graph import load_model  # noqa: E402
from moirai.partition import build_plan  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.stageplan import DeviceSpec, StagePlan  # noqa: E402
from stage_server.settings import EndpointConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SIZES = {"64 B": (16,), "0.57 MiB": (1, 3, 224, 224), "4.7 MiB": (1, 3, 640, 640)}
HTTP_SIZE = "0.57 MiB"
SHARED_MEMORY_BYTES = 1 << 16
"""Sizes from which the clients' shared memory is measured too (`stage_server.regions`)."""


# -------------------------------------------------------------- 1. stack cost
def identity_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="Identity_0")],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bench_size(tmp: Path, size: str, window_s: float) -> dict:
    shape = SIZES[size]
    model = identity_model(shape)
    path = tmp / "identity.onnx"
    onnx.save(model, path)
    plan = build_plan(
        model, {"Identity_0": "cpu-0"}, [DeviceSpec("cpu-0", threads=1)], model_name="identity"
    )
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    endpoint = EndpointConfig(allow_shared_memory=True)
    with LocalDeployment(plan, path, tmp / "run", endpoint=endpoint) as d:
        pids = list(d.pids.values())
        row = {"size": size, "bytes": x.nbytes, "processes": len(pids)}
        call = {"model": "identity", "inputs": {"x": x}, "pids": pids, "want": x}
        row["grpc"] = drive(d.grpc_url, **call, window_s=window_s)
        if size == HTTP_SIZE:
            row["http"] = drive(d.http_url, **call, http=True, window_s=window_s)
        if x.nbytes >= SHARED_MEMORY_BYTES:
            row["grpc+shm"] = drive(d.grpc_url, **call, shared_memory=True, window_s=window_s)
    row["floor"] = bench_floor(x, window_s)
    return row


def _serve(port: int, ready, infer: Callable, sync: bool = False) -> None:
    """A bare gRPC server on `port` answering ModelInfer with `infer` (raw bytes in and out), its
    malloc tuned as the stage servers'; `ready` is set once it listens. A `grpc.aio` server for
    a coroutine, or with `sync` the sync server (handler threads) for a function."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from stage_server.allocator import keep_freed_memory
    from stage_server.oip_grpc import SERVICE

    keep_freed_memory()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    handler = grpc.unary_unary_rpc_method_handler(infer)
    handlers = (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
    if sync:
        server = grpc.server(ThreadPoolExecutor(4), handlers=handlers, options=options)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        server.wait_for_termination()
        return

    async def serve() -> None:
        server = grpc.aio.server(handlers=handlers, options=options)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def _echo_server(port: int, ready, response: bytes, hold_ms: float = 0.0) -> None:
    """A bare gRPC server answering every ModelInfer with `response` (the transport's floor),
    after holding its event loop for `hold_ms`."""

    async def infer(request: bytes, context: object) -> bytes:
        until = time.perf_counter() + hold_ms / 1000.0
        while time.perf_counter() < until:
            pass
        return response

    _serve(port, ready, infer)


@contextlib.contextmanager
def bare_server(serve: Callable[..., None], *args: object) -> Iterator[tuple[str, int]]:
    """`serve(port, ready, *args)`, a bare gRPC server, in a process of its own: its address and
    pid once it is ready."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=serve, args=(port, ready, *args), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the bare gRPC server did not start")
        assert server.pid is not None
        yield f"127.0.0.1:{port}", server.pid
    finally:
        server.kill()
        server.join()


def bench_floor(x: np.ndarray, window_s: float) -> dict:
    """The bare gRPC server's CPU per request for a request and an answer of `x`'s size."""
    from stage_server import codec

    response = codec.encode_infer_response("identity", "", {"y": x})
    with bare_server(_echo_server, response) as (url, pid):
        return drive(url, "identity", {"x": x}, pids=[pid], want=x, window_s=window_s)


# ------------------------------------------------------- 2. against ORT in-process
def _in_process_rps(session, feeds: dict, inflight: int, window_s: float) -> tuple[float, float]:
    """Requests/s of `inflight` threads calling `session.run`, and CPU ms per request."""
    stop = threading.Event()
    counts = [0] * inflight

    def worker(i: int) -> None:
        while not stop.is_set():
            session.run(None, feeds)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(inflight)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    n0, c0, t0 = sum(counts), cpu_ms([os.getpid()]), time.perf_counter()
    time.sleep(window_s)
    n1, c1, t1 = sum(counts), cpu_ms([os.getpid()]), time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    return (n1 - n0) / (t1 - t0), (c1 - c0) / max(n1 - n0, 1)


def one_device_plan(name: str) -> tuple[Path, onnx.ModelProto, StagePlan]:
    """Zoo model `name` as a one-stage plan on one CPU device with every core's thread."""
    path = zoo.get(name)
    model = load_model(path, zoo.input_shapes(name))
    nodes = dict.fromkeys((n.name for n in model.graph.node), "cpu-0")
    devices = [DeviceSpec("cpu-0", threads=len(os.sched_getaffinity(0)))]
    return path, model, build_plan(model, nodes, devices, model_name=name)


def stage_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A session of `model` with the stage servers' options."""
    from stage_server.sessions import session_options

    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )


def bench_resnet(tmp: Path, window_s: float, rounds: int, inflight: int = 16) -> dict:
    threads = len(os.sched_getaffinity(0))
    path, model, plan = one_device_plan("resnet50")
    (spec,) = plan.inputs
    x = np.random.default_rng(0).random(spec.shape, dtype=np.float32)
    session = stage_session(model, threads)
    want = session.run(None, {spec.name: x})
    served, single, served_cpu, single_cpu = [], [], [], []
    with LocalDeployment(plan, path, tmp / "resnet") as d:
        pids = list(d.pids.values())
        from stage_server.client import InferenceClient

        with InferenceClient(d.grpc_url) as client:
            got = client.infer("resnet50", {spec.name: x}, timeout_s=120)
        np.testing.assert_allclose(next(iter(got.values())), want[0], rtol=1e-3, atol=1e-4)
        for _ in range(rounds):
            rps, cpu = _in_process_rps(session, {spec.name: x}, inflight, window_s)
            single.append(rps)
            single_cpu.append(cpu)
            r = drive(
                d.grpc_url,
                "resnet50",
                {spec.name: x},
                pids=pids,
                want=want[0],
                processes=4,
                inflight=inflight // 4,
                warmup_s=3.0,
                window_s=window_s,
            )
            served.append(r["rps"])
            served_cpu.append(r["server_cpu_ms"])
    return {
        "threads": threads,
        "inflight": inflight,
        "in_process_rps": statistics.median(single),
        "served_rps": statistics.median(served),
        "ratio": statistics.median(s / i for s, i in zip(served, single, strict=True)),
        "in_process_cpu_ms": statistics.median(single_cpu),
        "served_cpu_ms": statistics.median(served_cpu),
    }


# ------------------------------------------------------------ 3. the answer's wait
WAITS_MS = (0.0, 2.0, 7.0, 20.0)


def bench_wait(requests: int) -> list[dict]:
    """Round trip less the wait, bare gRPC server, for each of `WAITS_MS` (module docstring)."""
    from stage_server import codec
    from stage_server.allocator import keep_freed_memory

    keep_freed_memory()  # the client's too: untuned, its page faults add 0.5 ms (README)
    x = np.random.default_rng(0).random(SIZES[HTTP_SIZE], dtype=np.float32)
    response = codec.encode_infer_response("m", "", {"y": np.zeros((1, 1000), np.float32)})
    rows = []
    for wait in WAITS_MS:
        with bare_server(_echo_server, response, wait) as (url, _):
            round_trip = median_round_trip(url, "m", {"x": x}, requests)
        rows.append({"wait_ms": wait, "round_trip_less_wait_ms": round_trip - wait})
    return rows


def median_round_trip(url: str, model: str, inputs: dict, requests: int) -> float:
    """The median ms of `requests` sequential calls from one client, after 5 unmeasured."""
    from stage_server.client import InferenceClient

    with InferenceClient(url) as client:
        return median_ms(lambda: client.infer(model, inputs), requests, warmup=5)


# -------------------------------------- 4. a light model's latency, against bare servers
LATENCY_MODEL = "squeezenet"
BARE_SERVERS = {
    "bare grpc.aio, run in a thread": "aio-thread",
    "bare grpc.aio, run on the loop": "aio-loop",
    "bare sync gRPC, run in the handler": "sync",
}
"""The bare servers that run the model (module docstring), by label: their `_model_server`
kind."""


def _model_server(port: int, ready, name: str, kind: str) -> None:
    """A bare gRPC server of `kind` (`BARE_SERVERS`) running zoo model `name` for every
    ModelInfer: decoded and encoded with `stage_server.codec`, run on every core's thread."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from stage_server import codec

    _, model, _ = one_device_plan(name)
    session = stage_session(model, len(os.sched_getaffinity(0)))
    names = [o.name for o in session.get_outputs()]

    def infer(request: bytes, context: object = None) -> bytes:
        _, inputs = codec.decode_infer_request(request)
        outputs = dict(zip(names, session.run(names, inputs), strict=True))
        return codec.encode_infer_response(name, "", outputs)

    pool = ThreadPoolExecutor(1)

    async def in_a_thread(request: bytes, context: object) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(pool, infer, request)

    async def on_the_loop(request: bytes, context: object) -> bytes:
        return infer(request)

    if kind == "sync":
        _serve(port, ready, infer, sync=True)
    else:
        _serve(port, ready, in_a_thread if kind == "aio-thread" else on_the_loop)


def bench_latency(tmp: Path, rounds: int, requests: int) -> dict:
    """Median sequential latency of each server of `LATENCY_MODEL` and of in-process ORT, per
    round (module docstring)."""
    from stage_server.allocator import keep_freed_memory
    from stage_server.client import InferenceClient

    keep_freed_memory()
    threads = len(os.sched_getaffinity(0))
    path, model, plan = one_device_plan(LATENCY_MODEL)
    (spec,) = plan.inputs
    inputs = {spec.name: np.random.default_rng(0).random(spec.shape, dtype=np.float32)}
    session = stage_session(model, threads)
    want = session.run(None, inputs)[0]
    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        deployment = stack.enter_context(LocalDeployment(plan, path, tmp / "latency"))
        urls = {"moirai serve": deployment.grpc_url}
        for label, kind in BARE_SERVERS.items():
            urls[label], _ = stack.enter_context(bare_server(_model_server, LATENCY_MODEL, kind))
        for url in urls.values():
            with InferenceClient(url) as client:
                got = client.infer(LATENCY_MODEL, inputs, timeout_s=60)
            np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-4, atol=1e-5)
        for _ in range(rounds):
            for label, url in urls.items():
                ms = median_round_trip(url, LATENCY_MODEL, inputs, requests)
                times.setdefault(label, []).append(ms)
            ms = median_ms(lambda: session.run(None, inputs), requests)
            times.setdefault("in-process ONNX Runtime", []).append(ms)
    return {
        "model": LATENCY_MODEL,
        "threads": threads,
        "requests": requests,
        "rounds": times,
        "median_ms": {label: statistics.median(ms) for label, ms in times.items()},
    }


# --------------------------------------------------------------------- report
def report(results: dict) -> str:
    labels = list(results)
    out = [
        "# Stack cost (`bench/stack.py`)",
        "",
        "Goal: CPU of all serving processes per request <= 0.25 ms at 64 B, 0.4 ms at 0.57 MiB, "
        "2.0 ms at 4.7 MiB (a one-stage plan of one Identity node, `moirai serve`'s processes, "
        "3 client processes with 4 requests in flight each); a one-stage ResNet-50 plan serves "
        ">= 0.8x the requests/s of in-process ONNX Runtime at 16 in flight, same threads.",
        "",
    ]
    for label in labels:
        r = results[label]
        m = r["machine"]
        out.append(
            f"- **{label}**: {m['commit']}, {m['cores']} cores, load average {m['load_before']:.1f}"
            f" before / {m['load_after']:.1f} after, {m['date']}"
        )
    if any(results[label].get("stack") for label in labels):
        out += ["", "| label | tensor | protocol | processes | server CPU ms/request | req/s | "
                "client CPU ms/request | bare gRPC server CPU ms/request |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label in labels:
            for row in results[label].get("stack", []):
                for protocol in ("grpc", "http", "grpc+shm"):
                    if protocol in row:
                        p = row[protocol]
                        floor = row.get("floor") if protocol == "grpc" else None
                        bare = f"{floor['server_cpu_ms']:.2f}" if floor else ""
                        out.append(
                            f"| {label} | {row['size']} | {protocol} | {row['processes']} | "
                            f"**{p['server_cpu_ms']:.2f}** | {p['rps']:.0f} | "
                            f"{p['client_cpu_ms']:.2f} | "
                            f"{bare} |"
                        )
    if any(results[label].get("resnet") for label in labels):
        out += ["", "| label | threads | in flight | in-process ORT req/s | served req/s | ratio | "
                "in-process CPU ms/request | served CPU ms/request |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label in labels:
            r = results[label].get("resnet")
            if r:
                out.append(
                    f"| {label} | {r['threads']} | {r['inflight']} | {r['in_process_rps']:.2f} | "
                    f"{r['served_rps']:.2f} | **{r['ratio']:.2f}x** | "
                    f"{r['in_process_cpu_ms']:.1f} | {r['served_cpu_ms']:.1f} |"
                )
    for label in labels:
        rows = results[label].get("wait")
        if rows:
            title = (
                f"The answer's wait ({label}): bare gRPC server, 0.57 MiB request, 4 KiB answer, "
                "one client, median of sequential requests"
            )
            out += ["", title, "", "| answer waits (ms) | round trip less the wait (ms) |"]
            out.append("|---|---|")
            out += [f"| {r['wait_ms']:g} | {r['round_trip_less_wait_ms']:.2f} |" for r in rows]
    for label in labels:
        r = results[label].get("latency")
        if r:
            rounds = len(next(iter(r["rounds"].values())))
            ort = r["median_ms"]["in-process ONNX Runtime"]
            title = (
                f"A light model's latency ({label}): {r['model']}, one device of {r['threads']} "
                f"threads, one client, median of {r['requests']} sequential requests, median of "
                f"{rounds} rounds"
            )
            out += ["", title, "", "| server | latency (ms) | over in-process ORT (ms) |"]
            out.append("|---|---|---|")
            out += [f"| {k} | {v:.2f} | {v - ort:+.2f} |" for k, v in r["median_ms"].items()]
    return "\n".join(out) + "\n"


def _commit(tree: Path) -> str:
    import subprocess

    head = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    return f"`{head[:70]}`" if head else str(tree)


def child(part: str, window_s: float, rounds: int) -> dict:
    """One measurement, with this process's checkout (`MOIRAI_TREE`)."""
    with tempfile.TemporaryDirectory() as tmp:
        if part == "resnet":
            return bench_resnet(Path(tmp), window_s, rounds)
        if part == "wait":
            return {"rows": bench_wait(100 * rounds)}
        if part == "latency":
            return bench_latency(Path(tmp), rounds, 200)
        return bench_size(Path(tmp), part, window_s)


def run_child(tree: Path, part: str, window_s: float, rounds: int) -> dict:
    import subprocess

    command = [sys.executable, __file__, "--child", part, "--window", str(window_s)]
    command += ["--rounds", str(rounds)]
    done = subprocess.run(
        command,
        cwd=tree,
        env={**os.environ, "MOIRAI_TREE": str(tree)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{part} with {tree} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, one round")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=CHECKOUT",
        help="measure this checkout's servers under this label (repeatable; default after=.)",
    )
    parser.add_argument("--window", type=float, help="load window, seconds (default 10)")
    parser.add_argument("--rounds", type=int, help="ResNet-50 and latency rounds (default 3)")
    parser.add_argument(
        "--only", choices=("stack", "resnet", "wait", "latency"), help="one section alone"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    window = args.window or (4.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.child:
        print(json.dumps(child(args.child, window, rounds)))
        return
    trees = {}
    for entry in args.tree or [f"after={ROOT}"]:
        label, _, path = entry.partition("=")
        trees[label] = Path(path).resolve()
    parts = [*SIZES] if args.only in (None, "stack") else []
    parts += ["resnet"] if args.only in (None, "resnet") else []
    parts += ["wait"] if args.only in (None, "wait") else []
    parts += ["latency"] if args.only in (None, "latency") else []
    load_before = os.getloadavg()[0]
    results: dict = {label: {"stack": []} for label in trees}
    for part in parts:
        for label, tree in trees.items():
            got = run_child(tree, part, window, rounds)
            if part == "resnet":
                results[label]["resnet"] = got
            elif part == "wait":
                results[label]["wait"] = got["rows"]
            elif part == "latency":
                results[label]["latency"] = got
            else:
                results[label]["stack"].append(got)
            print(label, part, got, flush=True)
    for label, tree in trees.items():
        results[label]["machine"] = {
            "commit": _commit(tree),
            "cores": len(os.sched_getaffinity(0)),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["bench/stack.py", *sys.argv[1:]]),
        }
    text = report(results)
    if not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "stack.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "stack.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
