"""What splitting a model over two CPU devices of this machine costs, as served.

    .venv/bin/python bench/splitcost.py [--stages 9] [--rows 256] [--requests 300] [--rounds 3]

A chain of `stages` MatMuls ([rows, 512] × [512, 512], each over the stage server's 0.5 ms
inline limit, so each runs as a real stage does) is served by `moirai serve`'s real processes
(`moirai.runtime.local.LocalDeployment`, two one-thread CPU devices pinned to their own cores)
twice: whole on cpu-0 (one stage), and alternating between cpu-0 and cpu-1 (one stage per
MatMul; with an odd count the last stage is on cpu-0, the front end's process, so every crossing
is a hop between stages). For each, over `requests` sequential requests from one client: the
mean latency and the mean compute the stage servers report (`moirai_stage_seconds{kind=
"compute"}` from /metrics), so that

- the *rest* (latency less compute) of the split less the rest of the whole chain, per crossing,
  is what a served hop costs; set beside the link probe's price of the same bytes
  (`moirai.runtime.linkprobe`, what planning prices a hop at);
- the split's compute over the whole chain's is what cutting costs the stages themselves.

Rounds alternate the two plans so that both see the same machine; the table has every round.
Writes bench/results/splitcost.md and splitcost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from moirai.partition import build_plan
from moirai.runtime.linkprobe import measure_loopback
from moirai.runtime.local import LocalDeployment
from moirai.stageplan import DeviceSpec
from stage_server.client import InferenceClient

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 512
DEVICES = [DeviceSpec("cpu-0", threads=1), DeviceSpec("cpu-1", threads=1)]


def chain(stages: int, rows: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, weights, prev = [], [], "x"
    for i in range(stages):
        w = rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        out = "y" if i == stages - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    value = (TensorProto.FLOAT, [rows, WIDTH])
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", *value)],
        [helper.make_tensor_value_info("y", *value)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def compute_ms(deployment: LocalDeployment) -> float:
    """The stage servers' compute so far, summed over stages and requests."""
    with urllib.request.urlopen(f"http://{deployment.metrics_url}/metrics") as response:
        text = response.read().decode()
    return 1000.0 * sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moirai_stage_seconds_sum" and sample.labels.get("kind") == "compute"
    )


def serve(
    model: onnx.ModelProto, path: Path, x: np.ndarray, split: bool, requests: int
) -> dict[str, float]:
    nodes = [n.name for n in model.graph.node]
    plan = build_plan(
        model,
        {n: f"cpu-{i % 2 if split else 0}" for i, n in enumerate(nodes)},
        DEVICES,
        model_name="chain",
    )
    with (
        tempfile.TemporaryDirectory() as work,
        LocalDeployment(plan, path, Path(work)) as deployment,
        InferenceClient(deployment.grpc_url) as client,
    ):
        for _ in range(30):
            client.infer("chain", {"x": x})
        before = compute_ms(deployment)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            client.infer("chain", {"x": x})
            times.append((time.perf_counter() - start) * 1000.0)
        compute = (compute_ms(deployment) - before) / requests
    mean = statistics.fmean(times)
    return {
        "stages": len(plan.stages),
        "mean_ms": mean,
        "compute_ms": compute,
        "rest_ms": mean - compute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=9, help="MatMuls in the chain")
    parser.add_argument("--rows", type=int, default=256, help="rows of each tensor")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = chain(args.stages, args.rows)
    x = np.random.default_rng(1).standard_normal((args.rows, WIDTH)).astype(np.float32)
    nbytes = args.rows * WIDTH * 4
    crossings = args.stages - 1 + (args.stages % 2 == 0)  # an even chain ends on cpu-1
    load = os.getloadavg()[0]
    link = measure_loopback()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "chain.onnx"
        onnx.save(model, path)
        for r in range(args.rounds):
            whole = serve(model, path, x, False, args.requests)
            split = serve(model, path, x, True, args.requests)
            rounds.append(
                {
                    "round": r + 1,
                    "whole": whole,
                    "split": split,
                    "hop_ms": (split["rest_ms"] - whole["rest_ms"]) / crossings,
                    "compute_ratio": split["compute_ms"] / whole["compute_ms"],
                }
            )
            print(
                f"round {r + 1}: hop {rounds[-1]['hop_ms']:.3f} ms, split compute "
                f"{rounds[-1]['compute_ratio']:.3f}x",
                flush=True,
            )
    result = {
        "stages": args.stages,
        "rows": args.rows,
        "tensor_bytes": nbytes,
        "crossings": crossings,
        "link": {
            "latency_ms": link.latency_ms,
            "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
        },
        "link_hop_ms": link.predict_ms(nbytes),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "splitcost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "splitcost.md").write_text(report(result))
    print(report(result))


def report(result: dict[str, Any]) -> str:
    kib = result["tensor_bytes"] / 1024
    lines = [
        "# Split cost (`bench/splitcost.py`)",
        "",
        f"A chain of {result['stages']} MatMul stages, {kib:.0f} KiB tensors, served whole on "
        f"one one-thread CPU device and alternating between two ({result['crossings']} "
        f"crossings); load average {result['load_before']:.1f} before / "
        f"{result['load_after']:.1f} after. The link probe prices a hop of these bytes at "
        f"**{result['link_hop_ms']:.3f} ms** ({result['link']['latency_ms']:.3f} ms + bytes / "
        f"{result['link']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s).",
        "",
        "| round | whole: latency ms | whole: compute ms | split: latency ms | split: compute ms "
        "| served hop ms | split compute / whole |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        w, s = r["whole"], r["split"]
        lines.append(
            f"| {r['round']} | {w['mean_ms']:.2f} | {w['compute_ms']:.2f} | {s['mean_ms']:.2f} "
            f"| {s['compute_ms']:.2f} | **{r['hop_ms']:.3f}** | **{r['compute_ratio']:.3f}x** |"
        )
    hops = [r["hop_ms"] for r in result["rounds"]]
    ratios = [r["compute_ratio"] for r in result["rounds"]]
    lines += [
        "",
        f"Median over rounds: a served hop {statistics.median(hops):.3f} ms; the split's stages "
        f"compute {statistics.median(ratios):.3f}x the whole chain's time.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
