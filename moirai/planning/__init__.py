"""Planning: from an ONNX model and devices to a stage plan with its served prediction.

One pipeline, one module per step, imported in this order:

- `cpu`: this machine's CPU as planning devices (how its cores are grouped into stage servers);
- `costgraph`: the model loaded once (`load`) and its placement problem (`build_costgraph`:
  fusion groups priced by a profile);
- `inputs`: the one resolver of devices, input shapes and profile that `moirai place`,
  `moirai serve`, `moirai demo` and the operator share (`resolve`);
- `prediction`: what a stage plan takes as served (stages, hops, the gateway, the client);
- `pipeline`: `plan_model` (cost graph → solver → stage plan → served prediction, with `auto`'s
  single-device comparison as a named step) and `describe`.

The solvers (`moirai.placement`) read only the cost graph; the stage plan's format is
`moirai.stageplan`, built by `moirai.partition`.
"""

from moirai.planning.costgraph import LoadedModel, build_costgraph, load
from moirai.planning.inputs import PlanningInputs, parse_input_shapes, resolve
from moirai.planning.pipeline import Planned, describe, plan_model
from moirai.planning.prediction import Prediction, predict

__all__ = [
    "LoadedModel",
    "Planned",
    "PlanningInputs",
    "Prediction",
    "build_costgraph",
    "describe",
    "load",
    "parse_input_shapes",
    "plan_model",
    "predict",
    "resolve",
]
