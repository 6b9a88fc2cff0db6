"""Run a stage plan's stages one after the other in this process.

This is the reference semantics of a plan: the chained servers must produce exactly what this
produces, and this must reproduce the whole model (the property tests check both). It cuts every
stage with `moirai.stagecut.extract_stage` and runs it in its own ONNX Runtime session, exactly
as the stage servers do, only without the network.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from moirai.sessions import create_session
from moirai.stagecut import extract_stage
from moirai.stageplan import StagePlan


def run_sequential(
    model: onnx.ModelProto, plan: StagePlan, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The model's outputs, computed stage by stage in plan order."""
    env: dict[str, np.ndarray] = dict(inputs)
    for stage in plan.stages:
        session = create_session(extract_stage(model, plan, stage.id), plan.device(stage.device))
        results = session.run(list(stage.outputs), {t: env[t] for t in stage.inputs})
        env.update(zip(stage.outputs, results, strict=True))
    return {o.name: env[o.name] for o in plan.outputs}
