"""What the profiling tests share: quick settings and a model file with its input shapes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moirai.graph import InputShapes
from moirai.profile.measured import Settings

FAST = Settings(warmup=1, repeats=3, min_seconds=0, patience_seconds=0)


@dataclass(frozen=True)
class ModelFile:
    path: Path
    input_shapes: InputShapes | None
