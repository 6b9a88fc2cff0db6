"""Draw a plan as a Gantt chart (matplotlib, imported only here and only when drawing).

One row per device with its tasks, and under it a thin row with the transfers it sends (each
coloured by its destination device), so congestion on send ports is visible at a glance.
"""

from __future__ import annotations

from pathlib import Path

from moirai.placement.result import Placement


def draw_gantt(plan: Placement, devices: list[str], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[str] = []
    for d in devices:
        rows += [d, f"{d} send"]
    y = {name: len(rows) - 1 - n for n, name in enumerate(rows)}
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.5))
    for s in plan.schedule:
        k = devices.index(s.device)
        ax.barh(
            y[s.device],
            s.end_ms - s.start_ms,
            left=s.start_ms,
            height=0.8,
            color=colours(k % 10),
            edgecolor="black",
            linewidth=0.3,
        )
    for x in plan.transfers:
        k = devices.index(x.to_device)
        ax.barh(
            y[f"{x.from_device} send"],
            x.end_ms - x.start_ms,
            left=x.start_ms,
            height=0.4,
            color=colours(k % 10),
            hatch="//",
            edgecolor="black",
            linewidth=0.3,
        )
    ax.set_yticks([y[r] for r in rows], rows)
    ax.set_xlabel("time (ms)")
    ax.set_title(
        f"{plan.costgraph}: {plan.solver}, makespan {plan.makespan_ms:.3f} ms "
        f"({plan.status}, gap {plan.gap:.1%}); transfers coloured by destination"
    )
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
