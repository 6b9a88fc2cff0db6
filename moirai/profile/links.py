"""Measured links: what a hop from one stage server to the next costs, fitted as
`latency + bytes / bandwidth`.

The samples come from a real hop between two stage servers (`moirai.runtime.linkprobe`, which
runs the serving stack; profiling takes it as a `LinkProbe` so that it does not depend on the
server package). Payloads go from 1 KiB to 64 MiB by powers of 4, each size summarised by its
median, so a stray slow call (a garbage collection, a scheduler hiccup) does not move the fit.
The fit is weighted least squares on relative error (weights 1/t²), because
the sizes span five orders of magnitude and ordinary least squares would let the largest
payloads decide the intercept alone; a few Huber-reweighted iterations then discount sizes that
sit far off the line. A negative intercept is refitted through the origin. The fit records R²
(on the per-size medians) and the largest relative residual, so a reader can see whether the
line describes the link.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moirai.costgraph import Link
from moirai.errors import MoiraiError

KIB = 1024
DEFAULT_SIZES = tuple(KIB * 4**i for i in range(9))  # 1 KiB ... 64 MiB
PATH = "stage-server-loopback"
LINK_METHOD_VERSION = 2
"""Bump when the way links are measured changes: cached links then miss (1: bare Push)."""
_HUBER_K = 1.345  # the usual Huber constant, in units of the residuals' robust scale


class LinkProbe(Protocol):
    """Measures the hop between two local stage servers for each payload size and fits it."""

    def __call__(
        self, sizes: Sequence[int], *, progress: Callable[[str], None] | None = None
    ) -> LinkFit: ...


@dataclass(frozen=True)
class LinkSample:
    """Push durations of one payload size."""

    bytes: int
    ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    @property
    def spread_ms(self) -> float:
        """Interquartile range."""
        if len(self.ms) < 2:
            return 0.0
        q = statistics.quantiles(self.ms, n=4, method="inclusive")
        return q[2] - q[0]


@dataclass(frozen=True)
class LinkFit:
    """`latency_ms + bytes / bandwidth_bytes_per_s * 1000`, with how well it fits."""

    latency_ms: float
    bandwidth_bytes_per_s: float
    r2: float
    max_relative_residual: float
    samples: tuple[LinkSample, ...]
    path: str = PATH
    """How it was measured: `stage-server-loopback` (a stage server on this machine)."""

    @property
    def link(self) -> Link:
        return Link(bandwidth_bytes_per_s=self.bandwidth_bytes_per_s, latency_ms=self.latency_ms)

    def predict_ms(self, nbytes: int) -> float:
        return self.link.transfer_ms(nbytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "latency_ms": self.latency_ms,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "r2": self.r2,
            "max_relative_residual": self.max_relative_residual,
            "samples": [
                {
                    "bytes": s.bytes,
                    "median_ms": s.median_ms,
                    "spread_ms": s.spread_ms,
                    "ms": list(s.ms),
                }
                for s in self.samples
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> LinkFit:
        return cls(
            latency_ms=float(data["latency_ms"]),
            bandwidth_bytes_per_s=float(data["bandwidth_bytes_per_s"]),
            r2=float(data["r2"]),
            max_relative_residual=float(data["max_relative_residual"]),
            samples=tuple(
                LinkSample(int(s["bytes"]), tuple(float(x) for x in s["ms"]))
                for s in data.get("samples", [])
            ),
            path=str(data.get("path", PATH)),
        )


# ------------------------------------------------------------------------- fit
def fit(samples: Sequence[LinkSample], path: str = PATH) -> LinkFit:
    """Robust fit of `t = latency + bytes / bandwidth` (module docstring)."""
    if len({s.bytes for s in samples}) < 2:
        raise MoiraiError("a link fit needs samples of at least two payload sizes")
    x = np.array([s.bytes for s in samples], dtype=float)
    t = np.array([s.median_ms for s in samples], dtype=float)
    base = 1.0 / np.maximum(t, 1e-9) ** 2
    weights = base.copy()
    intercept, slope = _weighted_line(x, t, weights)
    for _ in range(5):
        relative = (t - intercept - slope * x) / np.maximum(t, 1e-9)
        scale = 1.4826 * float(np.median(np.abs(relative))) or 1e-12
        u = np.abs(relative) / (_HUBER_K * scale)
        weights = base * np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
        intercept, slope = _weighted_line(x, t, weights)
    if intercept < 0:
        intercept, slope = 0.0, float(np.sum(weights * x * t) / np.sum(weights * x * x))
    if slope <= 0:
        raise MoiraiError(
            "the link measurements do not grow with payload size: the link is too noisy to fit "
            "(measure again on a quieter machine, or with more repeats)"
        )
    predicted = intercept + slope * x
    total = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum((t - predicted) ** 2)) / total if total > 0 else 1.0
    return LinkFit(
        latency_ms=float(intercept),
        bandwidth_bytes_per_s=1000.0 / slope,
        r2=r2,
        max_relative_residual=float(np.max(np.abs(t - predicted) / t)),
        samples=tuple(samples),
        path=path,
    )


def _weighted_line(x: np.ndarray, t: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Intercept and slope minimising Σ w (t − a − b x)²."""
    sw, sx, st = w.sum(), (w * x).sum(), (w * t).sum()
    sxx, sxt = (w * x * x).sum(), (w * x * t).sum()
    det = sw * sxx - sx * sx
    slope = (sw * sxt - sx * st) / det
    return float((st - slope * sx) / sw), float(slope)
