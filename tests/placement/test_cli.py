"""`moirai place`: the table, the files it writes, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moirai.cli import main
from moirai.placement import Placement, PlacementProblem, check

from .instances import fork, random_costgraph


@pytest.fixture
def costgraph_file(tmp_path: Path) -> Path:
    path = tmp_path / "cg.json"
    random_costgraph(seed=3, tasks=10, devices=3).save(path)
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("moirai: ")
    assert match in err[0], err[0]
    assert "Traceback" not in err[0]


def test_place_costgraph_writes_a_checked_plan(
    tmp_path: Path, costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    gantt = tmp_path / "plan.png"
    argv = ["place", "--costgraph", str(costgraph_file), "--time-limit", "10", "--threads", "2"]
    assert main([*argv, "-o", str(out), "--gantt", str(gantt), "--pin", "t0=d1"]) == 0
    captured = capsys.readouterr()
    assert "auto(" in captured.out and "makespan ms" in captured.out and "busy %" in captured.out
    assert "moirai: [" in captured.err  # progress
    plan = Placement.load(out)
    assert plan.assignment["t0"] == "d1"
    from moirai.costgraph import CostGraph

    assert check(PlacementProblem(CostGraph.load(costgraph_file), pins={"t0": "d1"}), plan) > 0
    assert gantt.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("tasks", "limit"), [(10, "10"), (80, "1")])
def test_the_report_says_which_bound_binds_and_why_the_search_ended(
    tmp_path: Path, tasks: int, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether more time could pay: the binding bound and the search's end, as the plan says
    (a small instance is proven optimal, a larger one in a second usually is not)."""
    path, out = tmp_path / "cg.json", tmp_path / "plan.json"
    random_costgraph(seed=5, tasks=tasks, devices=4).save(path)
    assert (
        main(["place", "--costgraph", str(path), "--time-limit", limit, "-q", "-o", str(out)]) == 0
    )
    plan = Placement.load(out)
    ended = "proven optimal" if plan.status == "optimal" else "ended by the time limit"
    line = f"binding bound: {plan.extra['bound_from']}; {ended}"
    assert line in capsys.readouterr().out


def test_compare_runs_every_solver(
    costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["place", "--costgraph", str(costgraph_file), "--compare", "--time-limit", "5", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("heft", "getf", "msct", "single", "milp-highs", "cpsat", "auto("):
        assert name in out


def test_costgraph_out_and_throughput(
    tmp_path: Path, costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "again.json"
    plan = tmp_path / "plan.json"
    argv = ["place", "--costgraph", str(costgraph_file), "--objective", "throughput", "-q"]
    assert main([*argv, "--solver", "cpsat", "--costgraph-out", str(again), "-o", str(plan)]) == 0
    assert json.loads(again.read_text())["format"] == "moirai.costgraph/v1"
    out = capsys.readouterr().out
    assert "objective throughput" in out
    # the device table shows each device's busy time per request: the busiest is the period
    rows = [
        line.split() for line in out.splitlines() if line.split()[:1] in (["d0"], ["d1"], ["d2"])
    ]
    busiest = max(float(row[2]) for row in rows)
    assert busiest == pytest.approx(json.loads(plan.read_text())["period_ms"], abs=1e-4)
    assert any(row[3] == "100.0%" for row in rows)


def test_cyclic_costgraph(
    tmp_path: Path, costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(costgraph_file.read_text())
    data["edges"].append({"src": "t9", "dst": "t0", "bytes": 1})
    data["edges"].append({"src": "t0", "dst": "t9", "bytes": 1})
    bad = tmp_path / "cyclic.json"
    bad.write_text(json.dumps(data))
    _one_line_error(capsys, ["place", "--costgraph", str(bad)], "cycle")


def test_memory_infeasible_cluster(
    tmp_path: Path, costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(costgraph_file.read_text())
    for d in data["devices"]:
        d["memory_bytes"] = 1000
    bad = tmp_path / "small.json"
    bad.write_text(json.dumps(data))
    _one_line_error(capsys, ["place", "--costgraph", str(bad)], "no placement fits")


def test_unknown_devices(
    tmp_path: Path, costgraph_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(
        capsys,
        ["place", "--costgraph", str(costgraph_file), "--pin", "t0=tpu"],
        "unknown device 'tpu'",
    )
    data = json.loads(costgraph_file.read_text())
    data["tasks"][0]["compute_ms"]["tpu"] = 1.0
    bad = tmp_path / "tpu.json"
    bad.write_text(json.dumps(data))
    _one_line_error(capsys, ["place", "--costgraph", str(bad)], "unknown device 'tpu'")


def test_usage_errors(costgraph_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, ["place"], "nothing to place")
    _one_line_error(capsys, ["place", "model.onnx"], "needs --devices")
    _one_line_error(
        capsys, ["place", "--costgraph", str(costgraph_file), "--pin", "t0"], "TASK=DEVICE"
    )
    _one_line_error(capsys, ["place", "--costgraph", "/nonexistent.json"], "cannot read")


def test_place_an_onnx_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moirai import zoo

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cg.json"
    argv = [
        "place",
        str(zoo.get("squeezenet")),
        "--devices",
        str(root / "examples/devices/bench-3.yaml"),
    ]
    assert main([*argv, "--time-limit", "10", "-q", "--costgraph-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nodes ->" in text and "groups" in text
    assert json.loads(out.read_text())["source"]["fusion_groups"] > 0


def test_truncated_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moirai import zoo

    root = Path(__file__).resolve().parents[2]
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(zoo.get("squeezenet").read_bytes()[:5000])
    argv = ["place", str(bad), "--devices", str(root / "examples/devices/bench-3.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moirai: ")


def test_place_writes_every_message_as_a_moirai_line(tmp_path: Path) -> None:
    """The library's log lines read like the command's own (`moirai: ...`, no timestamps and
    logger names), and stdout holds the report alone; a real process, as a user runs it."""
    from moirai import zoo

    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "moirai", "place", str(zoo.get("squeezenet"))]
    argv += ["--devices", str(root / "examples/devices/bench-3.yaml"), "--time-limit", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    lines = done.stderr.splitlines()
    assert any("fusion groups" in line for line in lines), done.stderr  # a library log line
    assert all(line.startswith("moirai: ") for line in lines), done.stderr
    assert done.stdout.lstrip().startswith("light_squeezenet:"), done.stdout


def _fork_on_two_cpus(tmp_path: Path, occupy: bool | None) -> Path:
    """`instances.fork` on two CPUs as a file, its devices saying `transfers_occupy_device` as
    `occupy` says (None: not at all)."""
    doc = fork("cpu").to_dict()
    for device in doc["devices"]:
        del device["transfers_occupy_device"]
        if occupy is not None:
            device["transfers_occupy_device"] = occupy
    path = tmp_path / f"fork-{occupy}.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_costgraph_file_is_solved_under_the_formats_execution_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device's `kind` is informative in a cost graph file: CPUs that do not say
    `transfers_occupy_device` do no hop work, as the format defines; saying it adds it. The
    report says which model it solved."""
    makespans = {}
    for occupy in (None, False, True):
        out = tmp_path / f"plan-{occupy}.json"
        argv = ["place", "--costgraph", str(_fork_on_two_cpus(tmp_path, occupy))]
        assert main([*argv, "--time-limit", "10", "--threads", "1", "-q", "-o", str(out)]) == 0
        report = capsys.readouterr().out
        said = "hop work (transfers take the device's own time) on x, y"
        assert (said if occupy else "execution model: the cost graph format's") in report
        plan = Placement.load(out)
        assert plan.status == "optimal"
        makespans[occupy] = plan.makespan_ms
    # the fork's optima (test_bounds): 7 ms without hop work, 8 with it (the split no longer pays)
    assert makespans[None] == makespans[False] == pytest.approx(7.0)
    assert makespans[True] == pytest.approx(8.0)
