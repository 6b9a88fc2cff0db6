"""This machine's CPU as planning devices: how its cores are grouped into stage servers.

`moirai.devices.local_devices` describes the CPU as one device with every core. Serving on it
can use that one device, or cut it into N devices of cores/N threads each (`split_cpu`), each a
stage server of its own pinned to its own cores by the local runtime (`core_sets`); the link
between two of them is the serving loopback (`SERVING_LOOPBACK`, unless a measured profile
brings its own).
"""

from __future__ import annotations

import dataclasses

from moirai.costgraph import Link
from moirai.devices import DeviceSet, available_cores
from moirai.errors import MoiraiError
from moirai.stageplan import StagePlan

MAX_LOCAL_CPU_DEVICES = 4
# What one hop between local stage servers costs, as the solver should see it. Measured on the
# 2-core development machine (bench/results/runtime.md): over the same-host fast path a push
# takes about 0.35 ms of wall time plus 1-1.4 GB/s, and with pipelined requests about 0.35 ms of
# CPU on each end. That is one end's cost: the throughput objective charges it to each CPU end
# (a CPU stage server pays for its transfers on its own core, docs/throughput-model.md), and a
# latency plan waits for it once per hop. A measured profile (`--profile measured`) brings its
# own measured link instead.
SERVING_LOOPBACK = Link(bandwidth_bytes_per_s=1.0e9, latency_ms=0.35)


def split_cpu(devices: DeviceSet, parts: int | None = None) -> DeviceSet:
    """Cut each CPU device into `parts` devices of equal thread count and peak (by default one
    per core, at most `MAX_LOCAL_CPU_DEVICES`), linked by `SERVING_LOOPBACK`."""
    cpus = [d for d in devices.devices if d.kind == "cpu"]
    out = []
    for d in devices.devices:
        if d.kind != "cpu":
            out.append(d)
            continue
        threads = d.threads or len(available_cores())
        n = parts or min(threads, MAX_LOCAL_CPU_DEVICES)
        if not 1 <= n <= threads:
            raise MoiraiError(
                f"--cpu-devices {n}: {d.name} has {threads} cores; use 1 to {threads}"
            )
        prefix = d.name.rsplit("-", 1)[0] if len(cpus) == 1 else d.name
        out += [
            dataclasses.replace(
                d,
                name=f"{prefix}-{i}",
                threads=threads // n,
                peak_flops=d.peak_flops / n,
                memory_bandwidth_bytes_per_s=d.memory_bandwidth_bytes_per_s / n,
                memory_bytes=d.memory_bytes // n,
                device_id=i,
            )
            for i in range(n)
        ]
    return dataclasses.replace(devices, devices=tuple(out), default_link=SERVING_LOOPBACK)


def core_sets(plan: StagePlan) -> dict[str, list[int]]:
    """Disjoint cores for the plan's CPU devices, in plan order (empty when they do not fit)."""
    cores = available_cores()
    out: dict[str, list[int]] = {}
    start = 0
    for d in plan.devices:
        if d.kind == "cpu" and d.threads:
            if start + d.threads > len(cores):
                return {}
            out[d.name] = cores[start : start + d.threads]
            start += d.threads
    return out
