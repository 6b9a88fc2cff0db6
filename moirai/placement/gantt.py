"""Draw a plan as a Gantt chart (matplotlib, imported only here and only when drawing).

One row per device with its tasks, and under it a thin row with the transfers it sends (each
coloured by its destination device), so congestion on send ports is visible at a glance.

A device that pays for its transfers (a CPU: `moirai.placement.simulate`, hop work) also does
part of each hop on its own time and computes nothing meanwhile: half the hop's time from the
transfer's start on the sender, and half before its arrival on the receiver. That work is drawn
on the device's own row, cross-hatched and coloured by the hop's other end, so the gaps it
leaves between tasks are explained. `bars` says what is drawn, `figure` draws it and
`draw_gantt` writes it to a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moirai.costgraph import CostGraph
from moirai.placement.result import Placement
from moirai.placement.simulate import hop_spans

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HATCH = {"task": None, "transfer": "//", "hop": "xx"}


@dataclass(frozen=True)
class Bar:
    """One bar: on `row` (a device, or `DEVICE send`), coloured by device `colour`."""

    row: str
    start_ms: float
    end_ms: float
    kind: Literal["task", "transfer", "hop"]
    colour: str
    label: str


def bars(plan: Placement, costgraph: CostGraph) -> list[Bar]:
    """Every bar of `plan`'s chart: its tasks, its transfers (on the sender's send row) and the
    hop work of the devices that pay for their transfers (module docstring)."""
    out = [Bar(s.device, s.start_ms, s.end_ms, "task", s.device, s.task) for s in plan.schedule]
    for x in plan.transfers:
        label = f"{x.src}->{x.dst}"
        a, b = x.from_device, x.to_device
        out.append(Bar(f"{a} send", x.start_ms, x.end_ms, "transfer", b, label))
        send, receive = hop_spans(x, costgraph)
        if send is not None:
            out.append(Bar(a, *send, "hop", b, f"hop {label}"))
        if receive is not None:
            out.append(Bar(b, *receive, "hop", a, f"hop {label}"))
    return out


def draw_gantt(plan: Placement, costgraph: CostGraph, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(plan, costgraph)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(plan: Placement, costgraph: CostGraph) -> Figure:
    """The chart of `plan` as a matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(costgraph.device_names)
    rows: list[str] = []
    for d in devices:
        rows += [d, f"{d} send"]
    y = {name: len(rows) - 1 - n for n, name in enumerate(rows)}
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.5))
    for bar in bars(plan, costgraph):
        ax.barh(
            y[bar.row],
            bar.end_ms - bar.start_ms,
            left=bar.start_ms,
            height=0.4 if bar.kind == "transfer" else 0.8,
            color=colours(devices.index(bar.colour) % 10),
            hatch=HATCH[bar.kind],
            edgecolor="black",
            linewidth=0.3,
        )
    ax.set_yticks([y[r] for r in rows], rows)
    ax.set_xlabel("time (ms)")
    ax.set_title(
        f"{plan.costgraph}: {plan.solver}, makespan {plan.makespan_ms:.3f} ms "
        f"({plan.status}, gap {plan.gap:.1%}); transfers coloured by destination, "
        "hop work (xx) by the other end"
    )
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    fig.tight_layout()
    return fig
