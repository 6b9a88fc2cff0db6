"""The device catalogue: built-in entries, overrides, unknown GPU products, device entries."""

from __future__ import annotations

from pathlib import Path

import pytest
from moirai_operator.catalogue import Catalogue, CatalogueError, devices_document
from moirai_operator.planning import device_set
from moirai_operator.pools import match_pool, node_facts
from moirai_operator.spec import PoolSpec
from operator_bodies import GIB, make_node


def test_builtin_catalogue_loads_and_knows_common_gpus() -> None:
    cat = Catalogue.load()
    for product in ("Tesla-T4", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"):
        entry, known = cat.gpu(product)
        assert known and entry["peakFlops"] > 1e12
    assert cat.gpu("Imaginary-GPU") == (cat.raw["gpus"]["default"], False)


def test_override_file_merges_over_builtin(tmp_path: Path) -> None:
    extra = tmp_path / "cat.yaml"
    extra.write_text(
        "gpus:\n  My-GPU: {peakFlops: 1.0e13, memoryBandwidthBytesPerS: 1.0e12, "
        "memoryBytes: 1000, efficiency: 0.8}\ncpu: {efficiency: 0.6}\n"
    )
    cat = Catalogue.load(extra)
    assert cat.gpu("My-GPU")[1] and cat.gpu("Tesla-T4")[1]
    assert cat.raw["cpu"]["peakFlopsPerCore"] == 1.0e11  # merged, not replaced
    gpu = match_pool(
        PoolSpec("g", "gpu"), [node_facts(make_node("a", "g", gpus=1, product="My-GPU"))]
    )
    t4 = match_pool(
        PoolSpec("t", "gpu"), [node_facts(make_node("b", "t", gpus=1, product="Tesla-T4"))]
    )
    cpu = match_pool(PoolSpec("c", "cpu", threads_per_device=2), [node_facts(make_node("c", "c"))])
    doc = devices_document([gpu, t4, cpu], cat)
    # An entry's own efficiency becomes the device's; the peaks stay as published.
    assert [d.efficiency for d in doc.devices] == [0.8, None, 0.6]
    assert [d.efficiency for d in device_set(doc).devices] == [0.8, None, 0.6]
    assert doc.devices[0].peak_flops == 1.0e13 and doc.devices[2].peak_flops == 2.0e11


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("efficiency: 0.5\n", r"top-level `efficiency` is no longer read.*cpu\.efficiency"),
        ("cpu: {efficiency: 1.5}\n", r"cpu\.efficiency is 1\.5: .* in \(0, 1\]"),
        ("gpus: {Tesla-T4: {efficiency: 0}}\n", r"gpus\.Tesla-T4\.efficiency is 0"),
        ("gpus: {Tesla-T4: {efficiency: fast}}\n", "missing or has a bad entry"),
    ],
)
def test_bad_efficiency_is_reported(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(CatalogueError, match=message):
        Catalogue.load(bad)


def test_malformed_override_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  X: {peakFlops: 0, memoryBandwidthBytesPerS: 1, memoryBytes: 1}\n")
    with pytest.raises(CatalogueError, match=r"gpus\.X\.peakFlops must be > 0"):
        Catalogue.load(bad)
    with pytest.raises(CatalogueError, match="device catalogue"):
        Catalogue.load(tmp_path / "missing.yaml")


def test_devices_document_one_entry_per_slot() -> None:
    cat = Catalogue.load()
    gpu = match_pool(
        PoolSpec("g", "gpu", max_devices=3),
        [node_facts(make_node("a", "g", gpus=4, product="Tesla-T4"))],
    )
    cpu = match_pool(
        PoolSpec("c", "cpu", threads_per_device=4, max_devices=2),
        [node_facts(make_node("b", "c", cpu="8", memory="16Gi"))],
    )
    doc = devices_document([gpu, cpu], cat)
    assert [d.name for d in doc.devices] == ["g-0", "g-1", "g-2", "c-0", "c-1"]
    g0, c0 = doc.devices[0], doc.devices[3]
    assert g0.provider == "CUDAExecutionProvider" and g0.memory_bytes == 16106127360
    # Published peaks, unscaled: the cost model alone applies an efficiency (its default).
    assert (g0.peak_flops, g0.memory_bandwidth_bytes_per_s, g0.efficiency) == (8.1e12, 3.2e11, None)
    assert c0.provider == "CPUExecutionProvider" and c0.threads == 4
    assert (c0.peak_flops, c0.memory_bandwidth_bytes_per_s, c0.efficiency) == (4e11, 4e10, None)
    assert c0.memory_bytes == 8 * GIB  # 16 GiB shared by the node's two slots
    assert doc.notes == ()


def test_unknown_gpu_product_is_planned_with_default_and_noted() -> None:
    m = match_pool(PoolSpec("g", "gpu"), [node_facts(make_node("a", "g", gpus=1, product="Z"))])
    doc = devices_document([m], Catalogue.load())
    assert doc.notes and "GPU product Z is not in the device catalogue" in doc.notes[0]
