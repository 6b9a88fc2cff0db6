"""`bench/published.py`: the paper's published instances read as cost graphs. The instances stay
out of the repository, so a sheet of three tasks is written here as `xlrd` gives one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from published import costgraph

HEADER = [
    "task",
    "c_task",
    "dir_succ",
    "dir_succ_add",
    "p0",
    "p1",
    "pc01",
    "pc10",
    "mi",
    "m0",
    "m1",
]
ROWS = [
    HEADER,
    # t1 feeds t2 and t3 through two communication nodes, one time per direction each
    [1.0, "4,5", "2,3", "2,3,4,5", 1.0, 2.0, "0.5,0.7", "0.6,0.8", 10.0, 100.0, 200.0],
    # a successor past its communication nodes is fed without a transfer; a number cell is one
    [2.0, "", 3.0, "", 3.0, 1.5, "", "", 20.0, "", ""],
    ["a note under the tasks", "", "", "", "", "", "", "", "", "", ""],
    [3.0, "", "", "", 1.0, 1.0, "", "", "", "", ""],
]


def test_a_sheet_reads_as_the_cost_graph_it_describes() -> None:
    cg = costgraph("tiny", ROWS, "tiny.xls")
    assert cg.name == "tiny"
    assert [(d.name, d.memory_bytes) for d in cg.devices] == [("d0", 100), ("d1", 200)]
    assert [(t.id, t.compute_ms, t.memory_bytes) for t in cg.tasks] == [
        ("t1", {"d0": 1.0, "d1": 2.0}, 10),
        ("t2", {"d0": 3.0, "d1": 1.5}, 20),
        ("t3", {"d0": 1.0, "d1": 1.0}, 0),
    ]
    transfers = {(e.src, e.dst): e.transfer_ms for e in cg.edges}
    assert transfers == {
        ("t1", "t2"): {"d0": {"d1": 0.5}, "d1": {"d0": 0.6}},
        ("t1", "t3"): {"d0": {"d1": 0.7}, "d1": {"d0": 0.8}},
        ("t2", "t3"): {"d0": {"d1": 0.0}, "d1": {"d0": 0.0}},
    }
    assert not any(d.pays_for_transfers for d in cg.devices)  # the format's execution model


def test_a_sheet_without_task_rows_is_one_line() -> None:
    with pytest.raises(SystemExit, match=r"empty\.xls: no task rows"):
        costgraph("empty", [HEADER, ["a note", *[""] * 10]], "empty.xls")
