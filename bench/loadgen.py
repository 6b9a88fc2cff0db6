"""Load from client processes, and the CPU the serving processes spend on it.

What every serving benchmark here measures the same way. One Python client process is itself a
bottleneck, so the load comes from several spawned processes, each keeping `inflight` requests
in flight over gRPC (or HTTP with binary tensors), its request encoded once and its answers not
decoded, so that the clients disturb the servers as little as possible. Each client's first
answer is checked against what it expects. Their malloc is tuned as the servers' are
(`stage_server.allocator`), so that a large request costs them no page faults. CPU is read for
every thread of the serving processes and their descendants (`moirai.runtime.cputime.cpu_ms`,
which `moirai demo` reports from too; the benchmarks import it from here). Sequential latency
is measured the same way everywhere too: `median_ms`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moirai.runtime.cputime import cpu_ms
from stage_server import codec
from stage_server.allocator import keep_freed_memory

Inputs = Mapping[str, np.ndarray]


def median_ms(call: Callable[[], object], times: int, warmup: int = 1) -> float:
    """The median milliseconds of `times` calls of `call`, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        spent.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(spent)


def _matches(got: np.ndarray, want: np.ndarray | None) -> bool:
    return want is None or np.allclose(got, want, rtol=1e-3, atol=1e-5)


def _grpc_client(url, model, inputs, want, inflight, timeout_s, count, stop, ok) -> None:
    keep_freed_memory()  # as the servers: no page faults per request (README)
    import grpc

    from stage_server.oip_grpc import SERVICE

    request = codec.encode_infer_request(model, inputs)

    async def main() -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(url, options=options) as channel:
            call = channel.unary_unary(f"/{SERVICE}/ModelInfer")
            got = codec.decode_infer_response(await call(request, timeout=timeout_s))
            ok.value = int(_matches(next(iter(got.values())), want))

            async def worker() -> None:
                while not stop.is_set():
                    await call(request, timeout=timeout_s)
                    with count.get_lock():
                        count.value += 1

            await asyncio.gather(*(worker() for _ in range(inflight)))

    asyncio.run(main())


def _shared_memory_client(url, model, inputs, want, inflight, timeout_s, count, stop, ok) -> None:
    """A gRPC client that hands its tensors over in shared memory (Triton's system shared-memory
    extension): a region for each request in flight, holding its inputs and then its outputs,
    whose sizes a first ordinary request tells."""
    keep_freed_memory()  # as the servers: no page faults per request (README)
    import uuid
    from multiprocessing import shared_memory

    import grpc

    from stage_server.oip_grpc import SERVICE
    from stage_server.protos import grpc_predict_v2_pb2 as oip

    segments: list[shared_memory.SharedMemory] = []

    async def main() -> None:
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(url, options=options) as channel:
            call = channel.unary_unary(f"/{SERVICE}/ModelInfer")
            register = channel.unary_unary(
                f"/{SERVICE}/SystemSharedMemoryRegister",
                request_serializer=oip.SystemSharedMemoryRegisterRequest.SerializeToString,
                response_deserializer=oip.SystemSharedMemoryRegisterResponse.FromString,
            )
            plain = codec.encode_infer_request(model, inputs)
            outputs = codec.decode_infer_response(await call(plain, timeout=timeout_s))
            tensors = [*inputs.items(), *outputs.items()]
            slot = sum(a.nbytes for _, a in tensors)
            requests = []
            for _ in range(inflight):
                segment = shared_memory.SharedMemory(f"moirai-bench-{uuid.uuid4().hex}", True, slot)
                segments.append(segment)
                await register(
                    oip.SystemSharedMemoryRegisterRequest(
                        name=segment.name, key="/" + segment.name, byte_size=slot
                    ),
                    timeout=timeout_s,
                )
                request, offset = oip.ModelInferRequest(model_name=model), 0
                for name, array in tensors:
                    if name in inputs:
                        np.ndarray(array.shape, array.dtype, segment.buf, offset)[:] = array
                        tensor = request.inputs.add(
                            name=name, datatype=codec.datatype_of(array), shape=array.shape
                        )
                    else:
                        tensor = request.outputs.add(name=name)
                    _place(tensor.parameters, segment.name, array.nbytes, offset)
                    offset += array.nbytes
                requests.append(request.SerializeToString())
            await call(requests[0], timeout=timeout_s)
            first = next(iter(outputs.values()))
            at = sum(a.nbytes for _, a in tensors[: len(inputs)])
            ok.value = int(
                _matches(np.ndarray(first.shape, first.dtype, segments[0].buf, at), want)
            )

            async def worker(request: bytes) -> None:
                while not stop.is_set():
                    await call(request, timeout=timeout_s)
                    with count.get_lock():
                        count.value += 1

            await asyncio.gather(*(worker(r) for r in requests))

    try:
        asyncio.run(main())
    finally:
        for segment in segments:
            segment.close()
            segment.unlink()


def _place(parameters, region: str, nbytes: int, offset: int) -> None:
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = nbytes
    parameters["shared_memory_offset"].int64_param = offset


def _http_client(url, model, inputs, want, inflight, timeout_s, count, stop, ok) -> None:
    keep_freed_memory()  # as the servers: no page faults per request (README)
    import aiohttp

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(x.shape),
                    "datatype": codec.datatype_of(x),
                    "parameters": {"binary_data_size": x.nbytes},
                }
                for name, x in inputs.items()
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + b"".join(np.ascontiguousarray(x).tobytes() for x in inputs.values())
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    target = f"http://{url}/v2/models/{model}/infer"
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def main() -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(target, data=body, headers=headers) as r:
                r.raise_for_status()
                raw = await r.read()
            length = int(r.headers["Inference-Header-Content-Length"])
            first = json.loads(raw[:length])["outputs"][0]
            size = first["parameters"]["binary_data_size"]
            dtype = codec.numpy_dtype(first["datatype"], first["name"])
            got = np.frombuffer(raw[length : length + size], dtype).reshape(first["shape"])
            ok.value = int(_matches(got, want))

            async def worker() -> None:
                while not stop.is_set():
                    async with session.post(target, data=body, headers=headers) as r:
                        await r.read()
                        r.raise_for_status()
                    with count.get_lock():
                        count.value += 1

            await asyncio.gather(*(worker() for _ in range(inflight)))

    asyncio.run(main())


def drive(
    url: str,
    model: str,
    inputs: Inputs | Sequence[Inputs],
    *,
    pids: Sequence[int],
    want: np.ndarray | Sequence[np.ndarray] | None = None,
    http: bool = False,
    shared_memory: bool = False,
    processes: int = 3,
    inflight: int = 4,
    warmup_s: float = 2.0,
    window_s: float = 10.0,
    timeout_s: float = 600.0,
    snapshot: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Drive the servers at `url` from `processes` client processes with `inflight` requests
    each; after every client's first answer and `warmup_s`, measure over `window_s`.

    `shared_memory`: over gRPC with the tensors in shared memory (the servers must allow it).
    `inputs` is one request for every client or one per client; `want`, the first output each
    client must get first (one for all, one per client, or None: any answer). `pids` are the
    serving processes whose CPU is counted (their descendants too). `snapshot`, when given, is
    called as the window opens and closes (`snapshots` in the result: a server's metrics, say).
    Returns the requests completed in the window, requests/s, and the CPU milliseconds per
    request of the servers and of the clients."""
    per_client = list(inputs) if isinstance(inputs, Sequence) else [inputs] * processes
    wants = list(want) if isinstance(want, Sequence) else [want] * processes
    if len(per_client) != processes or len(wants) != processes:
        raise ValueError(f"give inputs and want once, or once for each of {processes} clients")
    ctx = mp.get_context("spawn")  # no inherited gRPC state
    count, stop = ctx.Value("q", 0), ctx.Event()
    oks = [ctx.Value("i", -1) for _ in range(processes)]
    target = _http_client if http else _shared_memory_client if shared_memory else _grpc_client
    clients = [
        ctx.Process(
            target=target,
            args=(url, model, dict(x), w, inflight, timeout_s, count, stop, ok),
            daemon=True,
        )
        for x, w, ok in zip(per_client, wants, oks, strict=True)
    ]
    for c in clients:
        c.start()
    try:
        end = time.monotonic() + timeout_s
        while any(ok.value == -1 for ok in oks):  # each client's first answer is in
            if time.monotonic() > end or not all(c.is_alive() for c in clients):
                raise SystemExit("the clients did not get their first answers")
            time.sleep(0.1)
        if any(ok.value != 1 for ok in oks):
            raise SystemExit(f"a client got a wrong first answer: {[ok.value for ok in oks]}")
        time.sleep(warmup_s)
        client_pids = [c.pid for c in clients if c.pid is not None]
        first = snapshot() if snapshot else None
        s0, c0, n0, t0 = cpu_ms(pids), cpu_ms(client_pids), count.value, time.perf_counter()
        time.sleep(window_s)
        s1, c1, n1, t1 = cpu_ms(pids), cpu_ms(client_pids), count.value, time.perf_counter()
        last = snapshot() if snapshot else None
    finally:
        stop.set()
        for c in clients:
            c.join(30)
            if c.is_alive():
                c.kill()
    n = n1 - n0
    result: dict[str, Any] = {
        "requests": n,
        "rps": n / (t1 - t0),
        "server_cpu_ms": (s1 - s0) / max(n, 1),
        "client_cpu_ms": (c1 - c0) / max(n, 1),
    }
    if snapshot:
        result["snapshots"] = (first, last)
    return result
