"""moirai.devices: the devices file, its one-line errors, and this machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import onnxruntime
import pytest
import yaml

from moirai import devices as module
from moirai.costgraph import Link
from moirai.devices import DEFAULT_LINK, load_devices, local_devices, parse_devices
from moirai.errors import DevicesError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "devices"

GPU = {
    "name": "a100",
    "kind": "gpu",
    "peak_flops": 19.5e12,
    "memory_bandwidth_bytes_per_s": 1.555e12,
    "memory_bytes": 40e9,
}
CPU = {
    "name": "xeon",
    "kind": "cpu",
    "threads": 20,
    "peak_flops": "3.2e12",  # YAML 1.1 reads this as text: accepted
    "memory_bandwidth_bytes_per_s": 140.8e9,
    "memory_bytes": 192e9,
}


def _links(**links: object) -> dict[str, object]:
    return {"devices": [{**GPU, "count": 2}], "links": links}


def test_example_files_load() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"bench-3.yaml", "bench-4.yaml", "local-cpu.yaml"}
    sizes = {f.name: len(load_devices(f).devices) for f in files}
    assert sizes["bench-3.yaml"] == 3 and sizes["bench-4.yaml"] == 4
    cluster = load_devices(EXAMPLES / "heterogeneous-cluster.yaml")
    kinds = {(d.kind, d.peak_flops) for d in cluster.devices}
    assert len({f for k, f in kinds if k == "gpu"}) == 2 and any(k == "cpu" for k, _ in kinds)


def test_defaults_and_conversion() -> None:
    devices = parse_devices({"devices": [GPU, CPU]})
    gpu, cpu = devices.devices
    assert gpu.provider == "CUDAExecutionProvider" and cpu.provider == "CPUExecutionProvider"
    assert cpu.peak_flops == 3.2e12 and cpu.threads == 20 and gpu.threads is None
    assert devices.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert devices.default_link == DEFAULT_LINK
    device = cpu.to_costgraph()
    assert device.name == "xeon" and device.kind == "cpu" and device.memory_bytes == 192e9
    assert device.extra["provider"] == "CPUExecutionProvider" and device.extra["threads"] == 20
    assert cpu.efficiency is None and "efficiency" not in device.extra
    (tuned,) = parse_devices({"devices": [{**CPU, "efficiency": "0.4"}]}).devices
    assert tuned.efficiency == 0.4 and tuned.to_costgraph().extra["efficiency"] == 0.4
    assert cpu.to_costgraph().pays_for_transfers and not gpu.to_costgraph().pays_for_transfers
    (offload,) = parse_devices({"devices": [{**CPU, "transfers_occupy_device": False}]}).devices
    assert not offload.to_costgraph().pays_for_transfers


def test_count_expands_names_and_pairs() -> None:
    devices = parse_devices(
        {
            "devices": [{**GPU, "name": "t4", "count": 3}, CPU],
            "links": {
                "default": {"bandwidth_bytes_per_s": 1e9, "latency_ms": 0.1},
                "pairs": [
                    {"src": "t4", "dst": "t4", "bandwidth_bytes_per_s": 16e9},
                    {"src": "xeon", "dst": "t4-0", "bandwidth_bytes_per_s": 2e9},
                    {"src": "t4-0", "dst": "xeon", "bandwidth_bytes_per_s": 3e9},
                ],
            },
        }
    )
    assert [d.name for d in devices.devices] == ["t4-0", "t4-1", "t4-2", "xeon"]
    assert [d.device_id for d in devices.devices[:3]] == [0, 1, 2]
    assert devices.default_link == Link(1e9, 0.1)
    links = devices.pair_links
    assert links[("t4-0", "t4-2")] == links[("t4-2", "t4-0")] == Link(16e9, 0.0)
    assert ("t4-0", "t4-0") not in links
    # One direction given: mirrored; both given: each keeps its own.
    assert links[("xeon", "t4-0")] == Link(2e9) and links[("t4-0", "xeon")] == Link(3e9)
    assert ("xeon", "t4-1") not in links


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"devices": [CPU]}))
    assert load_devices(path).devices[0].name == "xeon"


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([], "a mapping with 'devices'"),
        ({"devices": []}, "devices must be a non-empty list"),
        ({"devices": [GPU], "extra": 1}, "unknown key 'extra'"),
        ({"devices": [{**GPU, "peak_flop": 1}]}, "devices[0]: unknown key 'peak_flop'"),
        (
            {"devices": [{k: v for k, v in GPU.items() if k != "memory_bytes"}]},
            "memory_bytes is missing",
        ),
        ({"devices": [{**GPU, "kind": "tpu"}]}, "devices[0].kind is 'tpu'"),
        ({"devices": [{**GPU, "peak_flops": -1}]}, "devices[0].peak_flops is -1"),
        ({"devices": [{**GPU, "memory_bytes": "lots"}]}, "memory_bytes must be a number"),
        ({"devices": [{**GPU, "count": 0}]}, "count is 0"),
        ({"devices": [{**CPU, "efficiency": 0}]}, "efficiency is 0: it must be finite and > 0"),
        ({"devices": [{**CPU, "efficiency": 1.5}]}, "efficiency is 1.5: it is a fraction"),
        ({"devices": [{**CPU, "efficiency": "half"}]}, "efficiency must be a number"),
        (
            {"devices": [{**CPU, "transfers_occupy_device": "no"}]},
            "transfers_occupy_device is 'no': use true or false",
        ),
        ({"devices": [{**GPU, "provider": "cuda"}]}, "provider 'cuda' is not"),
        ({"devices": [{**GPU, "name": "a b"}]}, "name 'a b' must be"),
        ({"devices": [GPU, GPU]}, "'a100' appears twice"),
        ({"devices": [{**GPU, "count": 2}, {**GPU, "name": "a100-1"}]}, "'a100-1' appears twice"),
        (
            {
                "devices": [GPU],
                "links": {"pairs": [{"src": "a100", "dst": "gpu9", "bandwidth_bytes_per_s": 1}]},
            },
            "pairs[0].dst 'gpu9' is not a device; devices are a100",
        ),
        (
            {"devices": [GPU], "links": {"default": {"latency_ms": 1}}},
            "bandwidth_bytes_per_s is missing",
        ),
        (
            {"devices": [GPU], "links": {"default": {"bandwidth_bytes_per_s": 0}}},
            "must be finite and > 0",
        ),
    ],
)
def test_bad_devices_one_line_naming_the_field(document: object, needle: str) -> None:
    with pytest.raises(DevicesError) as e:
        parse_devices(document, "d.yaml")
    message = str(e.value)
    assert needle in message and "\n" not in message and message.startswith("d.yaml")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DevicesError, match="cannot read devices file"):
        load_devices(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [\n  {name: a\n")
    with pytest.raises(DevicesError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_devices(bad)


def test_local_devices_describe_this_machine() -> None:
    devices = local_devices()
    cpu = devices.devices[0]
    assert cpu.kind == "cpu" and cpu.provider == "CPUExecutionProvider"
    assert cpu.threads >= 1 and cpu.memory_bytes > 2**28 and cpu.peak_flops > 1e9
    assert all(d.kind == "gpu" for d in devices.devices[1:])


def test_local_gpus_from_nvidia_smi(monkeypatch) -> None:
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPU"]
    )
    monkeypatch.setattr(module.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    answer = "NVIDIA A100-SXM4-40GB, 40960\nTesla T4, 15360\nSome Future GPU, 1024\n"
    monkeypatch.setattr(
        module.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=answer, stderr=""),
    )
    _, a100, t4, unknown = local_devices().devices
    assert (a100.name, a100.device_id, a100.peak_flops) == ("gpu-0", 0, 19.5e12)
    assert a100.memory_bytes == 40960 * 2**20 and a100.provider == "CUDAExecutionProvider"
    assert (t4.name, t4.memory_bandwidth_bytes_per_s) == ("gpu-1", 0.32e12)
    assert unknown.peak_flops == 8.1e12  # the most modest known figures


def test_count_is_capped_before_expanding() -> None:
    """`count: 100000000` expanded every name and then checked duplicates quadratically: a hang."""
    with pytest.raises(DevicesError, match=r"devices\[0\]\.count is 100000000: at most 4096"):
        parse_devices({"devices": [{**GPU, "count": 100_000_000}]}, "d.yaml")
    assert len(parse_devices({"devices": [{**GPU, "count": module.MAX_COUNT}]}).devices) == 4096
