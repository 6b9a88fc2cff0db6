"""Dynamic batching's settings, their command-line flags and the check that a model can be
batched, apart from the batcher (`stage_server.batching`) so that the CLI and the operator use
them without importing the serving stack."""

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

    def to_args(self) -> list[str]:
        """The command-line flags that give this configuration (`add_arguments`)."""
        if not self.enabled:
            return []
        args = ["--max-batch-size", str(self.max_batch_size)]
        if self.preferred_batch_sizes:
            args += ["--preferred-batch-sizes", ",".join(map(str, self.preferred_batch_sizes))]
        if self.max_queue_delay_us:
            args += ["--max-queue-delay-us", str(self.max_queue_delay_us)]
        return args


def add_arguments(parser: Any) -> None:
    """`--max-batch-size`, `--preferred-batch-sizes`, `--max-queue-delay-us` (argparse)."""
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        metavar="N",
        help="batch concurrent requests along their first dimension, up to this many rows "
        "(default 0: no batching; the model needs a symbolic batch dimension)",
    )
    parser.add_argument(
        "--preferred-batch-sizes",
        default="",
        metavar="N,N",
        help="batch sizes sent as soon as reached, e.g. 4,8 (default: --max-batch-size)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        metavar="US",
        help="how long a request may wait for others to join its batch, microseconds "
        "(default 0: send at once what is queued)",
    )


def from_args(args: Any) -> BatchingConfig:
    """The configuration of the flags of `add_arguments`."""
    text = str(args.preferred_batch_sizes or "").replace(" ", "")
    try:
        preferred = tuple(int(s) for s in text.split(",") if s)
    except ValueError:
        raise MoiraiError(
            f"--preferred-batch-sizes {args.preferred_batch_sizes!r}: give sizes separated by "
            "commas, e.g. 4,8"
        ) from None
    return BatchingConfig(args.max_batch_size, preferred, args.max_queue_delay_us)


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
