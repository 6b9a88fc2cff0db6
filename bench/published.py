"""The Moirai paper's published placement instances, read as cost graphs.

The paper's reference implementation (the `moirai-placement/moirai` repository on GitHub, folder
`sample-data/`) gives its instances as spreadsheets (`.xls`): the header row names the columns,
then one row per task:

- `task`: the task's number;
- `c_task`: its communication nodes, one per successor that a transfer feeds (comma-separated,
  in the order of `dir_succ`); a successor past the end of that list is fed without a transfer
  (the edges out of a virtual input node);
- `dir_succ`: its successors; `dir_succ_add`: both lists together (not needed here);
- `p0` ... : its time on each device;
- `pcAB`: the time of each of its communication nodes from device A to device B
  (comma-separated, in the order of `c_task`; 0 on one device);
- `mi`: its memory; the first task's row also carries each device's memory (`m0` ...).

A row whose first cell is not a number (a note) is skipped. Times are read as milliseconds.
The instances are kept out of this repository (issue 13 measures Moirai on them as held-out
instances); `bench/placement.py --set published --published DIR` reads them from a copy of that
folder. The devices carry no `kind` and no hop work: the cost graph format's own execution model,
the paper's. Reading `.xls` takes `xlrd` (`pip install xlrd`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moirai.costgraph import FORMAT, CostGraph


def _cells(value: Any) -> list[str]:
    """A cell's comma-separated entries ('' is none; a number is one)."""
    if isinstance(value, str):
        return [v for v in (v.strip() for v in value.split(",")) if v]
    return [] if value is None else [str(value)]


def read_xls(path: Path) -> CostGraph:
    """One spreadsheet of the paper's instances as a cost graph (see the module docstring)."""
    try:
        import xlrd
    except ImportError:
        raise SystemExit(
            "reading the paper's .xls instances takes xlrd: pip install xlrd"
        ) from None
    sheet = xlrd.open_workbook(str(path)).sheets()[0]
    rows = [sheet.row_values(r) for r in range(sheet.nrows)]
    return costgraph(path.stem, rows, str(path))


def costgraph(name: str, rows: list[list[Any]], where: str) -> CostGraph:
    """A sheet's rows (the header first; cells as xlrd gives them: numbers as floats, text as
    str) as a cost graph named `name`; `where` names the file in errors."""
    header = [str(h) for h in rows[0]]
    column = {h: c for c, h in enumerate(header)}
    devices = [h[1:] for h in header if h[:1] == "p" and h[1:].isdigit()]
    body = [r for r in rows[1:] if isinstance(r[0], float)]
    if not body:
        raise SystemExit(f"{where}: no task rows")
    names = {d: f"d{d}" for d in devices}
    tasks, edges = [], []
    for row in body:
        task = f"t{int(row[0])}"
        tasks.append(
            {
                "id": task,
                "compute_ms": {names[d]: float(row[column[f"p{d}"]]) for d in devices},
                "memory_bytes": int(float(row[column["mi"]] or 0)),
            }
        )
        comms = _cells(row[column["c_task"]])
        times = {
            (a, b): [float(v) for v in _cells(row[column[f"pc{a}{b}"]])]
            for a in devices
            for b in devices
            if a != b
        }
        for q, succ in enumerate(_cells(row[column["dir_succ"]])):
            fed = q < len(comms)
            matrix = {
                names[a]: {names[b]: times[a, b][q] if fed else 0.0 for b in devices if b != a}
                for a in devices
            }
            # bytes is unknown here and only informative (every pair is timed); older checkouts,
            # the baseline among them, require the field
            edges.append(
                {"src": task, "dst": f"t{int(float(succ))}", "bytes": 0, "transfer_ms": matrix}
            )
    first = body[0]
    return CostGraph.from_dict(
        {
            "format": FORMAT,
            "name": name,
            "devices": [
                {"name": names[d], "memory_bytes": int(float(first[column[f"m{d}"]]))}
                for d in devices
            ],
            "tasks": tasks,
            "edges": edges,
        },
        where=where,
    )


def instances(folder: Path) -> list[tuple[str, Path]]:
    """(name, spreadsheet) of every instance in `folder`, by name."""
    found = sorted(folder.glob("*.xls"))
    if not found:
        raise SystemExit(f"{folder}: no .xls files (the paper repository's sample-data folder)")
    return [(f"published-{p.stem}", p) for p in found]
