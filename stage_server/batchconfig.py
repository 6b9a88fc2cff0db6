"""Dynamic batching's settings, their command-line flags and the check that a model can be
batched, apart from the batcher (`stage_server.batching`) so that the CLI and the operator use
them without importing the serving stack.

Batching is set per model, as in Triton. A front end of several models takes each flag once per
model, `--max-batch-size MODEL=N`, and a value without `MODEL=` for every model that has no
value of its own (`from_args(args, model)`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moirai.errors import MoiraiError

if TYPE_CHECKING:
    from moirai.stageplan import TensorSpec


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of one model (`stage_server.batching`); `max_batch_size` 0 is off."""

    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise MoiraiError(
                f"--max-batch-size {self.max_batch_size}: give 0 (no batching) or more"
            )
        if not self.enabled and (self.preferred_batch_sizes or self.max_queue_delay_us):
            raise MoiraiError(
                "--preferred-batch-sizes and --max-queue-delay-us need --max-batch-size: "
                "batching is off without it"
            )
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise MoiraiError(
                    f"--preferred-batch-sizes {size}: give sizes from 1 to --max-batch-size "
                    f"{self.max_batch_size}"
                )
        if self.max_queue_delay_us < 0:
            raise MoiraiError(f"--max-queue-delay-us {self.max_queue_delay_us}: give 0 or more")
        object.__setattr__(
            self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes)))
        )

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 0

    @property
    def delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    def to_args(self, model: str | None = None) -> list[str]:
        """The command-line flags that give this configuration (`add_arguments`), to `model`
        only when named (a front end of several models)."""
        if not self.enabled:
            return []
        to = f"{model}=" if model else ""
        args = ["--max-batch-size", f"{to}{self.max_batch_size}"]
        if self.preferred_batch_sizes:
            sizes = ",".join(map(str, self.preferred_batch_sizes))
            args += ["--preferred-batch-sizes", f"{to}{sizes}"]
        if self.max_queue_delay_us:
            args += ["--max-queue-delay-us", f"{to}{self.max_queue_delay_us}"]
        return args


FLAGS = {
    "max_batch_size": "--max-batch-size",
    "preferred_batch_sizes": "--preferred-batch-sizes",
    "max_queue_delay_us": "--max-queue-delay-us",
}


def add_arguments(parser: Any) -> None:
    """`--max-batch-size`, `--preferred-batch-sizes`, `--max-queue-delay-us` (argparse), each
    `[MODEL=]VALUE` and repeatable (module docstring)."""
    parser.add_argument(
        "--max-batch-size",
        action="append",
        metavar="[MODEL=]N",
        help="batch concurrent requests along their first dimension, up to this many rows "
        "(default 0: no batching; the model needs a symbolic batch dimension); MODEL= sets it "
        "for one model of several",
    )
    parser.add_argument(
        "--preferred-batch-sizes",
        action="append",
        metavar="[MODEL=]N,N",
        help="batch sizes sent as soon as reached, e.g. 4,8 (default: --max-batch-size)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        action="append",
        metavar="[MODEL=]US",
        help="how long a request may wait for others to join its batch, microseconds "
        "(default 0: send at once what is queued)",
    )


def _value(args: Any, field: str, model: str | None) -> tuple[str, str]:
    """The value of a flag for `model` (its `MODEL=` value, else the bare one; "" when none),
    and the flag as written, for messages."""
    bare = named = None
    for text in getattr(args, field, None) or ():
        name, sep, value = str(text).partition("=")
        if not sep:
            bare = (text, text)
        elif name == model:
            named = (value, text)
    value, written = named or bare or ("", "")
    return value, f"{FLAGS[field]} {written}".strip()


def _number(args: Any, field: str, model: str | None) -> int:
    text, flag = _value(args, field, model)
    try:
        return int(text or 0)
    except ValueError:
        raise MoiraiError(f"{flag}: give a whole number (or MODEL=N for one model)") from None


def from_args(args: Any, model: str | None = None) -> BatchingConfig:
    """The configuration of the flags of `add_arguments` for `model` (None: the bare values)."""
    text, flag = _value(args, "preferred_batch_sizes", model)
    try:
        preferred = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise MoiraiError(
            f"{flag}: give sizes separated by commas, e.g. 4,8 (or MODEL=4,8 for one model)"
        ) from None
    size = _number(args, "max_batch_size", model)
    return BatchingConfig(size, preferred, _number(args, "max_queue_delay_us", model))


def check_model_names(args: Any, models: Sequence[str]) -> None:
    """Refuse a `MODEL=` value for a model that is not served."""
    for field, flag in FLAGS.items():
        for text in getattr(args, field, None) or ():
            name, sep, _ = str(text).partition("=")
            if sep and name not in models:
                raise MoiraiError(
                    f"{flag} {text}: no model {name!r} is served here; the models are "
                    + ", ".join(models)
                )


def check_batchable(
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    setting: str = "--max-batch-size",
) -> None:
    """Refuse batching for a model whose inputs and outputs do not all have an open first
    dimension: concatenating and splitting along it would be wrong. `setting` names what turned
    batching on, for the message."""
    for role, specs in (("input", inputs), ("output", outputs)):
        for t in specs:
            if not t.shape or t.shape[0] != -1:
                first = (
                    "no dimensions" if not t.shape else f"a fixed first dimension ({t.shape[0]})"
                )
                raise MoiraiError(
                    f"model {model!r} {role} {t.name!r} has {first}: batching needs a symbolic "
                    "batch dimension first in every input and output; export the model with a "
                    f"dynamic batch axis, or serve it without {setting}"
                )
