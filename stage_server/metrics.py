"""The gateway's Prometheus metrics.

Each gateway owns its registry (not the process-wide default), so several gateways in one
process (the tests) keep their numbers apart. Per-stage compute, queue and transfer times come
from the timings that travel with each request along the chain (`moirai.stage.v1.Timing`): the
gateway observes them when a request completes, so one scrape of the gateway shows the whole
pipeline.

A front end of several models shows every model's registry in one exposition, each sample
labelled with its `model` (`merged_exposition`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from stage_server.wire import Timing

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
_STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self, stage_devices: Mapping[str, str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._devices = dict(stage_devices)
        self._stage_children: dict[tuple[str, str], Histogram] = {}
        self.request_seconds = Histogram(
            "moirai_request_duration_seconds",
            "End-to-end latency of successful inference requests at the gateway.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "moirai_requests_in_flight",
            "Inference requests the gateway is serving now.",
            registry=self.registry,
        )
        self.errors = Counter(
            "moirai_request_errors_total",
            "Failed requests by gRPC status code.",
            ["code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "moirai_stage_seconds",
            "Per-stage time of served requests: kind is compute (running the sub-model), "
            "queue (waiting for the device) or transfer (tensors arriving at the stage).",
            ["stage", "device", "kind"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stage_up = Gauge(
            "moirai_stage_server_up",
            "1 while the stage server of a device reports SERVING to the gateway.",
            ["device"],
            registry=self.registry,
        )

    def observe_timings(self, timings: Iterable[Timing]) -> None:
        for t in timings:
            key = (t.stage, t.kind)
            child = self._stage_children.get(key)
            if child is None:  # labels() takes a lock and builds a key: once per series
                device = self._devices.get(t.stage, "gateway")
                child = self._stage_children[key] = self.stage_seconds.labels(
                    t.stage, device, t.kind
                )
            child.observe(t.ms / 1000.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Merged:
    """A collector of several registries: `common`'s samples as they are, and each model's with
    a `model` label, one metric family per name."""

    def __init__(self, models: Mapping[str, CollectorRegistry], common: CollectorRegistry) -> None:
        self._models = models
        self._common = common

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sources = [("", self._common), *self._models.items()]
        for model, registry in sources:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    labels = {"model": model, **sample.labels} if model else sample.labels
                    merged.samples.append(sample._replace(labels=labels))
        yield from families.values()


def merged_exposition(models: Mapping[str, CollectorRegistry], common: CollectorRegistry) -> bytes:
    """The Prometheus exposition of several models' registries, each sample labelled with its
    model, and of `common` (the front end's own) unlabelled."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(models, common))
    return generate_latest(registry)
