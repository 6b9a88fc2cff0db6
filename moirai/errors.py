"""Errors a user can act on.

Every error raised for bad input or an impossible request derives from `MoiraiError`. Its message
is one line that names the offending field or file and says how to fix it; the CLI prints it as
`moirai: <message>` and exits with status 2, the servers map it to a status code, and the operator
to a condition. Anything else escaping is a bug and keeps its traceback.
"""


class MoiraiError(Exception):
    """Base class: bad input or an impossible request, explained in one line."""


class ModelError(MoiraiError):
    """The ONNX model cannot be loaded, checked or shaped."""


class CostGraphError(MoiraiError):
    """A cost graph (file or in memory) violates `moirai.costgraph/v1`."""


class DevicesError(MoiraiError):
    """A devices file is invalid."""


class InfeasibleError(MoiraiError):
    """No placement satisfies the constraints (memory, runnable devices, pins)."""


class SolverError(MoiraiError):
    """A solver is unknown, unavailable, or failed."""


class StoppedError(SolverError):
    """A solve was stopped (`SolveOptions.stop`) before it found any plan."""


def one_line(message: object, limit: int | None = 200) -> str:
    """`message` (an exception: ONNX Runtime's and the API server's span lines) on one line,
    cut to `limit` characters with "..." (None: whole), to quote inside a one-line error."""
    text = " ".join(str(message).split())
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."
