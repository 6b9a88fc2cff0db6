"""The profile file and how it prices cost graphs: round trip, sharing a group's time among
finer tasks, provenance in the cost graph, and the errors a user meets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from profiling_support import FAST, ModelFile

from moirai.devices import DeviceSet, DeviceSpec
from moirai.fusion import Group
from moirai.graph import build_graph, load_model
from moirai.planning import build_costgraph, load
from moirai.planning.inputs import resolve_profile
from moirai.profile.analytic import AnalyticProfile
from moirai.profile.cache import ProfileCache
from moirai.profile.document import (
    DocumentProfile,
    GroupTiming,
    ProfileDocument,
    ProfileError,
    allocate,
    with_borders,
)
from moirai.profile.links import LinkSample, fit
from moirai.profile.measured import MeasuredProfile
from moirai.profile.targets import Target


def _cpu(name: str, threads: int | None = 1) -> DeviceSpec:
    return DeviceSpec(name, "cpu", "CPUExecutionProvider", 1e11, 1e10, 8 << 30, threads)


def _measured(model: ModelFile, tmp_path: Path) -> ProfileDocument:
    profiler = MeasuredProfile(
        model.path, model.input_shapes, settings=FAST, cache=ProfileCache.at(tmp_path)
    )
    document = profiler.measure({"cpu:threads=1": Target("cpu", threads=1)})
    link = fit([LinkSample(n, (0.5 + n / 1e6,)) for n in (1024, 65536, 1 << 20)])
    return ProfileDocument(document.model, document.devices, link)


def test_round_trip_through_a_file(tiny_bert: ModelFile, tmp_path: Path) -> None:
    document = _measured(tiny_bert, tmp_path)
    document.save(tmp_path / "profile.json")
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["format"] == "moirai.profile/v1"
    assert set(data["devices"]["cpu:threads=1"]) >= {"signature", "groups", "run_ms", "repeats"}
    assert ProfileDocument.load(tmp_path / "profile.json") == document


def test_file_prices_a_cost_graph_and_says_where_numbers_came_from(
    tiny_bert: ModelFile, tmp_path: Path
) -> None:
    document = _measured(tiny_bert, tmp_path)
    path = tmp_path / "profile.json"
    document.save(path)
    devices = DeviceSet((_cpu("cpu-0"), _cpu("cpu-1")))
    profile = resolve_profile(str(path), load(tiny_bert.path, tiny_bert.input_shapes))
    costgraph = build_costgraph(tiny_bert.path, devices, tiny_bert.input_shapes, profile)
    entry = document.devices["cpu:threads=1"]
    total = sum(t.compute_ms["cpu-0"] for t in costgraph.tasks)
    assert total == pytest.approx(entry.total_ms)
    assert all(t.compute_ms["cpu-0"] == t.compute_ms["cpu-1"] for t in costgraph.tasks)
    source = costgraph.extra["source"]
    assert source["profile"] == "measured" and source["profile_file"] == str(path)
    assert source["measured"]["cpu-1"]["profile_device"] == "cpu:threads=1"
    assert source["measured"]["cpu-1"]["onnxruntime"]
    assert costgraph.default_link.latency_ms == pytest.approx(document.link.latency_ms)
    assert source["link"]["path"] == "stage-server-loopback"
    assert all(t.extra["source"] == {"cpu-0": "trace", "cpu-1": "trace"} for t in costgraph.tasks)
    # Coarsened tasks are unions of groups: the times add up exactly.
    coarse = build_costgraph(tiny_bert.path, devices, tiny_bert.input_shapes, profile, 5)
    assert len(coarse.tasks) == 5
    assert sum(t.compute_ms["cpu-0"] for t in coarse.tasks) == pytest.approx(entry.total_ms)


def test_a_stage_border_is_priced_on_the_links_of_the_devices_that_pay_it(
    tiny_bert: ModelFile, tmp_path: Path
) -> None:
    """`cut_ms_per_mib` makes each link into or out of its device slower by half the price
    per MiB: both ends of a CPU-to-CPU hop pay, a device without a price pays nothing."""
    measured = _measured(tiny_bert, tmp_path)
    entry = dataclasses.replace(measured.devices["cpu:threads=1"], cut_ms_per_mib=0.8)
    document = ProfileDocument(measured.model, {"cpu:threads=1": entry}, measured.link)
    assert ProfileDocument.from_dict(document.to_dict()) == document
    devices = DeviceSet((_cpu("cpu-0"), _cpu("cpu-1")))
    costgraph = build_costgraph(
        tiny_bert.path, devices, tiny_bert.input_shapes, DocumentProfile(document)
    )
    mib = 1 << 20
    base = measured.link.link  # the measured loopback, as a profile without a price gives it
    link = costgraph.link("cpu-0", "cpu-1")
    assert link.latency_ms == base.latency_ms
    assert link.transfer_ms(mib) == pytest.approx(base.transfer_ms(mib) + 0.8)
    assert costgraph.extra["source"]["border_ms_per_mib"] == {"cpu-0": 0.8, "cpu-1": 0.8}
    one_end = with_borders(dataclasses.replace(costgraph, pair_links={}), base, {"cpu-0": 0.8})
    assert one_end[("cpu-1", "cpu-0")].transfer_ms(mib) == pytest.approx(
        base.transfer_ms(mib) + 0.4
    )


def test_a_group_spanning_tasks_is_shared_by_flops(tiny_bert: ModelFile) -> None:
    model = load_model(tiny_bert.path, tiny_bert.input_shapes)
    graph = build_graph(model)
    matmul, add = "layer0/ffn/up/MatMul", "layer0/ffn/up/Add"
    timing = GroupTiming((matmul, add), 10.0, 0.0, "trace")
    groups = [Group((matmul,), ((matmul,),)), Group((add,), ((add,),))]
    ms, methods = allocate(graph, [timing], groups)
    assert sum(ms) == pytest.approx(10.0)
    assert ms[0] > 100 * ms[1]  # the product holds nearly all the FLOPs
    assert methods == ["trace", "trace"]


def test_profile_of_another_model_or_shape_is_refused(
    tiny_bert: ModelFile, squeezenet: ModelFile, tmp_path: Path
) -> None:
    path = tmp_path / "profile.json"
    _measured(tiny_bert, tmp_path).save(path)
    with pytest.raises(ProfileError, match="another model"):
        resolve_profile(str(path), load(squeezenet.path))
    with pytest.raises(ProfileError, match="input shapes"):
        resolve_profile(
            str(path), load(tiny_bert.path, {"input_ids": [2, 16], "attention_mask": [2, 16]})
        )


def test_device_missing_from_the_profile_is_named(tiny_bert: ModelFile, tmp_path: Path) -> None:
    profile = DocumentProfile(_measured(tiny_bert, tmp_path))
    devices = DeviceSet((_cpu("big", threads=2),))
    with pytest.raises(ProfileError) as error:
        build_costgraph(tiny_bert.path, devices, tiny_bert.input_shapes, profile)
    assert "big (cpu:threads=2)" in str(error.value)
    assert "moirai profile --device big=cpu:threads=2" in str(error.value)


def test_a_device_takes_the_entry_of_its_own_name_first(
    tiny_bert: ModelFile, tmp_path: Path
) -> None:
    document = _measured(tiny_bert, tmp_path)
    entry = document.devices["cpu:threads=1"]
    doubled = type(entry)(
        **{
            **entry.__dict__,
            "groups": tuple(
                GroupTiming(g.ops, g.ms * 2, g.spread_ms, g.method) for g in entry.groups
            ),
        }
    )
    named = ProfileDocument(document.model, {**document.devices, "cpu-1": doubled})
    devices = DeviceSet((_cpu("cpu-0"), _cpu("cpu-1")))
    costgraph = build_costgraph(
        tiny_bert.path, devices, tiny_bert.input_shapes, DocumentProfile(named)
    )
    for task in costgraph.tasks:
        assert task.compute_ms["cpu-1"] == pytest.approx(2 * task.compute_ms["cpu-0"])


def test_merge_takes_the_union_of_devices(tiny_bert: ModelFile, tmp_path: Path) -> None:
    document = _measured(tiny_bert, tmp_path)
    other = ProfileDocument(document.model, {"pool-b": document.devices["cpu:threads=1"]})
    merged = document.merge(other)
    assert set(merged.devices) == {"cpu:threads=1", "pool-b"} and merged.link == document.link


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not a moirai.profile/v1"),
        ('{"format": "moirai.profile/v1", "model": {}}', "sha256"),
        (
            '{"format": "moirai.profile/v1", "model": {"sha256": "x"}, "devices": {"d": '
            '{"target": "cpu", "groups": [{"ops": ["a"], "ms": -1}]}}}',
            "finite and >= 0",
        ),
        (
            '{"format": "moirai.profile/v1", "model": {"sha256": "x"}, "devices": {"d": '
            '{"target": "tpu:0", "groups": []}}}',
            "cpu:threads=N",
        ),
    ],
)
def test_malformed_files_fail_in_one_line(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as error:
        ProfileDocument.load(path)
    assert "\n" not in str(error.value)


def test_resolve_analytic_and_measured(tiny_bert: ModelFile, tmp_path: Path) -> None:
    model = load(tiny_bert.path, tiny_bert.input_shapes)
    assert isinstance(resolve_profile("analytic", model), AnalyticProfile)
    measured = resolve_profile("measured", model, cache_dir=tmp_path)
    assert isinstance(measured, MeasuredProfile) and measured.cache is not None
    assert measured.cache.directory == tmp_path
    assert measured.link_probe is not None  # measured where the devices are: the link too
    with pytest.raises(ProfileError, match="cannot read profile"):
        resolve_profile(str(tmp_path / "missing.json"), model)
