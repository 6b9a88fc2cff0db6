"""The problem object: cheap infeasibility checks with one-line reasons; candidates."""

from __future__ import annotations

import json

import pytest

from moirai.costgraph import CostGraph, Device, Edge, Task
from moirai.errors import CostGraphError, InfeasibleError
from moirai.placement import PlacementProblem, solve
from moirai.placement.problem import gib

GB = 1 << 30


def cluster(gpu_mem: int = 8 * GB, cpu_mem: int = 8 * GB, task_mem: int = GB) -> CostGraph:
    return CostGraph(
        name="c",
        devices=(Device("gpu", gpu_mem, "gpu"), Device("cpu", cpu_mem)),
        tasks=tuple(
            Task(f"t{i}", {"gpu": 1.0, "cpu": 4.0} if i != 2 else {"cpu": 2.0}, task_mem)
            for i in range(4)
        ),
        edges=(Edge("t0", "t1", 10), Edge("t1", "t2", 10), Edge("t2", "t3", 10)),
    )


def test_total_memory_message() -> None:
    with pytest.raises(InfeasibleError) as e:
        PlacementProblem(cluster(gpu_mem=2 * GB, cpu_mem=1 * GB, task_mem=GB))
    assert str(e.value) == (
        "no placement fits: total task memory 4.0 GiB exceeds total device memory 3.0 GiB"
    )


def test_task_that_fits_nowhere_is_named() -> None:
    # t2 runs only on the CPU, which is too small for it
    with pytest.raises(InfeasibleError, match=r"task 't2' needs 2\.0 GiB .* cpu 1\.0 GiB"):
        PlacementProblem(cluster(gpu_mem=64 * GB, cpu_mem=GB, task_mem=2 * GB))


def test_pins() -> None:
    with pytest.raises(InfeasibleError, match="unknown task 'nope'"):
        PlacementProblem(cluster(), pins={"nope": "gpu"})
    with pytest.raises(InfeasibleError, match="unknown device 'tpu'; devices are gpu, cpu"):
        PlacementProblem(cluster(), pins={"t0": "tpu"})
    with pytest.raises(InfeasibleError, match="device 'gpu' cannot run task 't2'"):
        PlacementProblem(cluster(), pins={"t2": "gpu"})
    with pytest.raises(InfeasibleError, match=r"pins put 3\.0 GiB of task memory on 'gpu'"):
        PlacementProblem(
            cluster(gpu_mem=2 * GB, cpu_mem=8 * GB), pins=dict.fromkeys(("t0", "t1", "t3"), "gpu")
        )


def test_memory_limits_and_candidates() -> None:
    p = PlacementProblem(cluster(), memory_limits={"gpu": GB // 2})
    gpu = p.device_index["gpu"]
    assert all(gpu not in c for c in p.cand)  # 1 GiB tasks no longer fit the GPU
    plan = solve(cluster(), "auto", time_limit=5, threads=1, memory_limits={"gpu": GB // 2})
    assert set(plan.assignment.values()) == {"cpu"}


def test_unknown_objective() -> None:
    with pytest.raises(InfeasibleError, match="unknown objective"):
        PlacementProblem(cluster(), objective="speed")  # type: ignore[arg-type]


def test_bin_packing_infeasibility_is_proven_by_cpsat() -> None:
    # total memory fits (9 of 10 GiB) but three 3 GiB tasks cannot share two 5 GiB devices
    cg = CostGraph(
        name="pack",
        devices=(Device("a", 5 * GB), Device("b", 5 * GB)),
        tasks=tuple(Task(f"t{i}", {"a": 1.0, "b": 1.0}, 3 * GB) for i in range(3)),
        edges=(),
    )
    with pytest.raises(InfeasibleError, match="no placement fits"):
        solve(cg, "cpsat", time_limit=5, threads=1)
    for solver in ("auto", "heft", "getf", "msct"):  # first-fit fails; the exact packing proves it
        with pytest.raises(InfeasibleError, match=r"no placement fits .*\(proven\)"):
            solve(cg, solver, time_limit=5, threads=1)


def test_transfers_occupy_device_defaults_by_kind_in_memory_and_to_false_in_a_file() -> None:
    """Built in memory (Moirai's own devices), a CPU pays for its transfers and a GPU does not;
    a file states it, and a device read without the key follows the format's execution model,
    which has no hop work whatever the device's kind (an instance from elsewhere)."""
    assert PlacementProblem(cluster()).pays_for_transfers == [False, True]  # gpu, cpu
    data = cluster().to_dict()
    assert [d["transfers_occupy_device"] for d in data["devices"]] == [False, True]  # resolved
    assert PlacementProblem(CostGraph.from_dict(data)).pays_for_transfers == [False, True]
    del data["devices"][1]["transfers_occupy_device"]
    assert PlacementProblem(CostGraph.from_dict(data)).pays_for_transfers == [False, False]
    data["devices"][0]["transfers_occupy_device"] = True
    cg = CostGraph.from_dict(data)
    assert PlacementProblem(cg).pays_for_transfers == [True, False]
    assert CostGraph.from_dict(cg.to_dict()) == cg
    assert "transfers_occupy_device" not in cg.devices[0].extra
    data["devices"][1]["transfers_occupy_device"] = "yes"
    with pytest.raises(CostGraphError, match=r"devices\[1\]\.transfers_occupy_device must be"):
        CostGraph.from_dict(data)


@pytest.mark.parametrize(
    ("path", "where"),
    [
        (("devices", 0, "memory_bytes"), r"devices\[0\]\.memory_bytes"),
        (("tasks", 1, "memory_bytes"), r"tasks\[1\]\.memory_bytes"),
        (("edges", 0, "bytes"), r"edges\[0\]\.bytes"),
    ],
)
def test_byte_counts_must_be_finite(path: tuple[str, int, str], where: str) -> None:
    """`1e400` in JSON is infinity; int(inf) was an OverflowError traceback."""
    data = json.loads(json.dumps(cluster().to_dict()))
    kind, index, key = path
    data[kind][index][key] = json.loads("1e400")
    with pytest.raises(CostGraphError, match=where + r" is inf: .* must be finite"):
        CostGraph.from_dict(data)


def test_edges_between_the_same_tasks_become_one_transfer_of_their_summed_time() -> None:
    """A file may give an edge per tensor. Refused once, since the MILP called such a graph
    infeasible ('no placement fits the device memories (proven)'); now the tensors travel as one
    transfer, priced per pair of devices from each one's own time (explicit or by the link)."""
    data = json.loads(json.dumps(cluster().to_dict()))
    first = data["edges"][0]
    twin = {"src": first["src"], "dst": first["dst"], "bytes": 10**6}
    twin["transfer_ms"] = {"gpu": {"cpu": 0.25}}  # cpu -> gpu: by the link
    data["edges"].append(twin)
    cg = CostGraph.from_dict(data)
    alone = CostGraph.from_dict(cluster().to_dict())
    assert len(cg.edges) == len(alone.edges)
    merged, was = cg.edges[0], alone.edges[0]
    assert merged.bytes == was.bytes + 10**6
    link = cg.link("cpu", "gpu").transfer_ms(10**6)
    assert cg.transfer_ms(merged, "gpu", "cpu") == pytest.approx(
        alone.transfer_ms(was, "gpu", "cpu") + 0.25
    )
    assert cg.transfer_ms(merged, "cpu", "gpu") == pytest.approx(
        alone.transfer_ms(was, "cpu", "gpu") + link
    )
    for solver in ("milp", "cpsat", "auto"):
        assert solve(cg, solver, time_limit=10, threads=1).status == "optimal"


def test_an_edge_without_bytes_is_refused_unless_every_pair_is_timed() -> None:
    """It was priced as 0 bytes, silently: a typo ('byts') made every transfer free."""
    data = json.loads(json.dumps(cluster().to_dict()))
    data["edges"][0]["byts"] = data["edges"][0].pop("bytes")
    with pytest.raises(CostGraphError, match=r"edges\[0\]\.bytes is missing: give the tensor"):
        CostGraph.from_dict(data)
    # Timed between every pair of devices, an edge needs no size: it would never be read.
    data["edges"][0]["transfer_ms"] = {"gpu": {"cpu": 0.5}, "cpu": {"gpu": 0.7}}
    cg = CostGraph.from_dict(data)
    assert cg.transfer_ms(cg.edges[0], "cpu", "gpu") == 0.7


def test_a_costgraph_files_device_kind_is_informative() -> None:
    """The format leaves `kind` to the writer ("GPU", "npu", none at all); only Moirai's own
    devices are limited to what it can serve on (`moirai.devices`)."""
    data = cluster().to_dict()
    data["devices"][0]["kind"] = "GPU"
    data["devices"][1]["kind"] = "npu"
    cg = CostGraph.from_dict(data)
    assert [d.kind for d in cg.devices] == ["GPU", "npu"]
    assert PlacementProblem(cg).pays_for_transfers == [False, True]  # as the file says


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (3 << 30, "3.0 GiB"),
        (130 << 20, "130.0 MiB"),
        (1 << 19, "0.5 MiB"),
        (14, "14 B"),
        (0, "0.0 MiB"),
    ],
)
def test_memory_reads_in_a_unit_that_shows_it(nbytes: int, text: str) -> None:
    """Cost graphs from elsewhere count memory in small units: 14 bytes used to read 0.0 MiB."""
    assert gib(nbytes) == text
