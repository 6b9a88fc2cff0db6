"""Serving on a GPU: a one-GPU plan served by `moirai serve`'s processes against in-process ONNX
Runtime's CUDA provider.

    .venv/bin/python bench/gpu.py [--models resnet50 squeezenet] [--workers 1 2 4] \
        [--window 6] [--max-batch-size 8] [--max-queue-delay-us 500] [--provider cuda|cpu]

Needs onnxruntime-gpu and an NVIDIA GPU (`--provider cpu` runs the same steps on the CPU
provider, to try the benchmark where there is none). For each zoo model (its batch made
symbolic), planned on this machine's first GPU alone (one stage):

1. **In-process ONNX Runtime**, the CUDA provider, the session options the stage servers use:
   latency (median of sequential runs from host arrays, as a user calls `run`), images/s of 1
   and of 4 Python threads calling `run` on one session at batch 1, and images/s at the largest
   batch (what batching can gain on this GPU at all).
2. **Served**, one stage server with the front end in its process, for each `--workers` (stages
   the server runs at once: one leaves the GPU idle while the host decodes, copies and encodes):
   latency (median of sequential requests from one client) and requests/s under 4 client
   processes x 4 requests in flight, with the CPU every serving process spent per request; and
   with dynamic batching at the largest worker count.

Every client checks its first answer against in-process ONNX Runtime on the same GPU. Prints a
table; writes bench/results/gpu.md and gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from loadgen import drive, median_ms  # noqa: E402

from moirai import zoo  # noqa: E402
from moirai.devices import DeviceSet, local_devices  # noqa: E402
from moirai.planning import plan_model  # noqa: E402
from moirai.runtime.local import LocalDeployment  # noqa: E402
from moirai.sessions import create_session  # noqa: E402
from stage_server.batchconfig import BatchingConfig  # noqa: E402
from stage_server.client import InferenceClient  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def one_device(provider: str) -> DeviceSet:
    """This machine's first GPU alone (or, with `cpu`, its CPU), as `moirai serve` sees it."""
    local = local_devices()
    kind = "gpu" if provider == "cuda" else "cpu"
    chosen = [d for d in local.devices if d.kind == kind][:1]
    if not chosen:
        sys.exit(
            "bench/gpu.py: no GPU here (this ONNX Runtime has no CUDA provider, or nvidia-smi "
            "does not answer); install onnxruntime-gpu, or try it with --provider cpu"
        )
    return DeviceSet(tuple(chosen), default_link=local.default_link)


def threads_rps(session: ort.InferenceSession, feeds: dict, threads: int, window_s: float) -> float:
    """Runs/s of `threads` Python threads calling `run` on one session."""
    stop, counts = threading.Event(), [0] * threads

    def worker(i: int) -> None:
        while not stop.is_set():
            session.run(None, feeds)
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(min(1.0, window_s / 4))
    n0, t0 = sum(counts), time.perf_counter()
    time.sleep(window_s)
    n1, t1 = sum(counts), time.perf_counter()
    stop.set()
    for t in pool:
        t.join()
    return (n1 - n0) / (t1 - t0)


def feeds_for(session: ort.InferenceSession, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for a zoo model whose first dimension is the batch."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in session.get_inputs():
        shape = (batch, *value.shape[1:])
        if "int" in value.type:
            out[value.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            out[value.name] = rng.random(shape).astype(np.float32)
    return out


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{name}.onnx"
    model = zoo.with_symbolic_batch(onnx.load(str(zoo.get(name))))
    onnx.save(model, path)
    devices = one_device(args.provider)
    plan = plan_model(path, devices, objective="latency", time_limit=5).plan
    device = plan.device(plan.used_devices[0])
    session = create_session(model, device)
    print(f"{name}: {len(plan.stages)} stage(s) on {device.name}; providers "
          f"{session.get_providers()}", flush=True)  # fmt: skip
    clients = [feeds_for(session, 1, seed) for seed in range(args.processes)]
    wants = [next(iter(session.run(None, x))) for x in clients]
    big = feeds_for(session, args.max_batch_size, 99)
    row: dict[str, Any] = {"model": name, "device": device.name, "stages": len(plan.stages)}
    row["ort"] = {
        "latency_ms": median_ms(lambda: session.run(None, clients[0]), args.requests),
        "rps_1_thread": threads_rps(session, clients[0], 1, args.window / 2),
        "rps_4_threads": threads_rps(session, clients[0], 4, args.window / 2),
        f"images_per_s_batch_{args.max_batch_size}": args.max_batch_size
        * threads_rps(session, big, 1, args.window / 2),
    }
    print(f"  in-process ORT: {row['ort']}", flush=True)
    variants = [(w, BatchingConfig()) for w in args.workers]
    batching = BatchingConfig(args.max_batch_size, (), args.max_queue_delay_us)
    variants.append((max(args.workers), batching))
    row["served"] = []
    for i, (workers, config) in enumerate(variants):
        label = f"workers {workers}" + (", batched" if config.max_batch_size else "")
        d = LocalDeployment(plan, path, tmp / f"{name}-{i}", workers=workers, batching=config)
        with d, InferenceClient(d.grpc_url) as client:
            latency = median_ms(
                lambda: client.infer(plan.model_name, clients[0], timeout_s=60), args.requests
            )
            load = drive(
                d.grpc_url,
                plan.model_name,
                clients,
                pids=list(d.pids.values()),
                want=wants,
                processes=args.processes,
                inflight=args.inflight,
                warmup_s=2,
                window_s=args.window,
            )
        served = {
            "variant": label,
            "latency_ms": latency,
            "rps": load["rps"],
            "server_cpu_ms": load["server_cpu_ms"],
        }
        row["served"].append(served)
        print(f"  served, {label}: {served}", flush=True)
    return row


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Serving on a GPU (`bench/gpu.py`)",
        "",
        f"{args.processes} client processes x {args.inflight} requests in flight over gRPC, "
        f"{args.window:.0f} s windows; latency: median of {args.requests} sequential requests. "
        f"In-process ONNX Runtime: the stage servers' session options on the same device. "
        f"Load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        "| model | serving | latency ms | requests/s | vs ORT 4 threads | server CPU ms/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        o = r["ort"]
        best = max(o["rps_1_thread"], o["rps_4_threads"])
        lines.append(
            f"| {r['model']} | in-process ORT, 1 / 4 threads | {o['latency_ms']:.2f} | "
            f"{o['rps_1_thread']:.0f} / {o['rps_4_threads']:.0f} | 1.00x | - |"
        )
        for s in r["served"]:
            lines.append(
                f"| {r['model']} | served, {s['variant']} | {s['latency_ms']:.2f} | "
                f"{s['rps']:.0f} | {s['rps'] / best:.2f}x | {s['server_cpu_ms']:.2f} |"
            )
        batch_key = next(k for k in o if k.startswith("images_per_s_batch"))
        lines.append(
            f"| {r['model']} | in-process ORT, {batch_key.removeprefix('images_per_s_')} | - | "
            f"{o[batch_key]:.0f} images/s | {o[batch_key] / best:.2f}x | - |"
        )
    lines += ["", f"Reproduce: `.venv/bin/python {' '.join(sys.argv)}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"], choices=zoo.names())
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--window", type=float, default=6.0, help="load window, seconds")
    parser.add_argument("--requests", type=int, default=30, help="latency: requests timed")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--inflight", type=int, default=4, help="requests in flight per client")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moirai-bench-gpu-") as tmp:
        for name in args.models:
            try:
                rows.append(bench_model(name, args, Path(tmp)))
            except Exception as e:  # one model's failure must not lose the others' figures
                print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
    text = report(rows, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text(text, encoding="utf-8")
    (args.out / "gpu.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
