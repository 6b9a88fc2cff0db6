"""The placement result, `moirai.placement/v1` (see `../shared/formats/costgraph.md`).

Every solver returns a `Placement`. Its `makespan_ms` is always the makespan of its own
`schedule` and `transfers` under Moirai's execution model, re-checked by the simulator, whatever
the solver believed.

The objective decides what `lower_bound_ms` and `gap` refer to: the makespan for `latency`; for
`throughput`, the pipelined period `period_ms` (the busiest device or port per request, a
device's transfers included when it pays for them, see `moirai.placement.simulate.loads`), while
`makespan_ms` still reports one request's latency.

Moirai extends a transfer with `arrive_ms` where its receiver does part of the hop on its own
device (a CPU: `moirai.placement.simulate`, hop work): the end of that work, when the consumer
may start; absent otherwise (the data is in at `end_ms`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from moirai.errors import MoiraiError
from moirai.textfile import read_json, write_json

FORMAT = "moirai.placement/v1"
Status = Literal["optimal", "feasible", "heuristic", "infeasible"]
STATUSES = ("optimal", "feasible", "heuristic", "infeasible")


@dataclass(frozen=True)
class ScheduledTask:
    task: str
    device: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class ScheduledTransfer:
    src: str
    dst: str
    from_device: str
    to_device: str
    start_ms: float
    end_ms: float
    arrive_ms: float | None = None
    """When the receiver has done its share of the hop (`moirai.placement.simulate`: the
    consumer may start); None when it does none (the data is in at `end_ms`)."""

    @property
    def arrival_ms(self) -> float:
        """When the consumer may start: `arrive_ms`, or `end_ms` where the receiver does no
        share of the hop."""
        return self.end_ms if self.arrive_ms is None else self.arrive_ms


@dataclass
class Placement:
    costgraph: str
    solver: str
    status: Status
    makespan_ms: float
    lower_bound_ms: float
    solve_seconds: float
    assignment: dict[str, str]
    schedule: list[ScheduledTask] = field(default_factory=list)
    transfers: list[ScheduledTransfer] = field(default_factory=list)
    objective: str = "latency"
    period_ms: float | None = None
    """Pipelined period of the assignment (always set by the solvers; the throughput objective)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Informative keys: solver notes, rounding error, candidates per task."""

    @property
    def objective_ms(self) -> float:
        """The value the solver minimised: the makespan, or the period for `throughput`."""
        if self.objective == "throughput" and self.period_ms is not None:
            return self.period_ms
        return self.makespan_ms

    @property
    def gap(self) -> float:
        """Relative optimality gap of the objective against the lower bound (0 when proven)."""
        value = self.objective_ms
        if value <= 0:
            return 0.0
        return max(0.0, (value - self.lower_bound_ms) / value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "costgraph": self.costgraph,
            "solver": self.solver,
            "status": self.status,
            "objective": self.objective,
            "makespan_ms": self.makespan_ms,
            **({"period_ms": self.period_ms} if self.period_ms is not None else {}),
            "lower_bound_ms": self.lower_bound_ms,
            "gap": self.gap,
            "solve_seconds": self.solve_seconds,
            **self.extra,
            "assignment": dict(self.assignment),
            "schedule": [asdict(s) for s in self.schedule],
            "transfers": [
                {
                    "src": t.src,
                    "dst": t.dst,
                    "from": t.from_device,
                    "to": t.to_device,
                    "start_ms": t.start_ms,
                    "end_ms": t.end_ms,
                    **({"arrive_ms": t.arrive_ms} if t.arrive_ms is not None else {}),
                }
                for t in self.transfers
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "placement") -> Placement:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MoiraiError(f"{where}: not a {FORMAT} document (check its 'format' field)")
        try:
            known = {
                "format",
                "costgraph",
                "solver",
                "status",
                "objective",
                "makespan_ms",
                "period_ms",
                "lower_bound_ms",
                "gap",
                "solve_seconds",
                "assignment",
                "schedule",
                "transfers",
            }
            status = data["status"]
            if status not in STATUSES:
                raise MoiraiError(f"{where}.status is {status!r}: use one of {', '.join(STATUSES)}")
            return cls(
                costgraph=str(data["costgraph"]),
                solver=str(data["solver"]),
                status=status,
                objective=str(data.get("objective", "latency")),
                makespan_ms=float(data["makespan_ms"]),
                period_ms=float(data["period_ms"]) if "period_ms" in data else None,
                lower_bound_ms=float(data.get("lower_bound_ms", 0.0)),
                solve_seconds=float(data.get("solve_seconds", 0.0)),
                assignment={str(k): str(v) for k, v in data["assignment"].items()},
                schedule=[ScheduledTask(**s) for s in data.get("schedule", [])],
                transfers=[
                    ScheduledTransfer(
                        src=t["src"],
                        dst=t["dst"],
                        from_device=t["from"],
                        to_device=t["to"],
                        start_ms=float(t["start_ms"]),
                        end_ms=float(t["end_ms"]),
                        arrive_ms=float(t["arrive_ms"]) if "arrive_ms" in t else None,
                    )
                    for t in data.get("transfers", [])
                ],
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MoiraiError(f"{where}: malformed placement ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        return cls.from_dict(read_json(path, "placement", MoiraiError), str(path))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), "placement")
