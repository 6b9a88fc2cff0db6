"""`moirai profile`: measure a model's fusion groups on devices and the link between stage
servers, and write a profile file for `--profile FILE`.

    moirai profile MODEL.onnx [--device cpu:threads=1 --device cuda:0 ...] \
        [--input-shape NAME=DIMS] [--warmup 3] [--repeats 10] [--min-seconds 1] \
        [--patience-seconds 10] [--method auto|trace|submodel] [--no-links] \
        [--cache-dir DIR | --no-cache] [-o profile.json]

Devices are `cpu`, `cpu:threads=N`, `cuda` or `cuda:ID`, each optionally named (`NAME=TARGET`);
by default, the devices `moirai serve --devices local` would use. Progress goes to stderr while
profiling; a summary (per device: how it was timed, the whole model's run time, the sum of the
groups, the heaviest groups; the fitted link) goes to stdout. Measurements are cached (see
`moirai.profile.cache`), so profiling again is instant and adding a device measures only that
device. See `moirai.profile.document` for the file format.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from moirai.cli.options import non_negative_float, output_file, output_folder
from moirai.errors import MoiraiError

if TYPE_CHECKING:  # the profiling modules load ONNX Runtime and gRPC: only when run
    from moirai.profile.document import ProfileDocument
    from moirai.profile.targets import Target


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure a model's fusion groups on devices and the link between them"
    )
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="[NAME=]TARGET",
        help="cpu, cpu:threads=N, cuda or cuda:ID (repeatable; default: this machine's devices "
        "in every grouping `moirai serve` chooses from)",
    )
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=DIMS", help="e.g. x=1x3x224x224"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs, at least (default 10)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="time the whole model for at least this long, with more runs of a quick model "
        "(default 1)",
    )
    p.add_argument(
        "--patience-seconds",
        type=non_negative_float,
        default=10.0,
        help="then take turns up to this much longer, until each device had quiet turns "
        "(default 10; see moirai.profile.turns)",
    )
    p.add_argument(
        "--method",
        choices=("auto", "trace", "submodel"),
        default="auto",
        help="auto: ONNX Runtime's per-node trace on CPU, group sub-models on CUDA and as the "
        "fallback (default); trace: fail rather than fall back; submodel: every group alone",
    )
    p.add_argument(
        "--no-links", action="store_true", help="skip measuring the link between stage servers"
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir", type=output_folder, help="profile cache (default ~/.cache/moirai/profiles)"
    )
    cache.add_argument("--no-cache", action="store_true", help="measure again, cache nothing")
    p.add_argument("-o", "--output", type=output_file, help="write the profile file here")
    p.set_defaults(func=run)


def _progress(message: str) -> None:
    print(f"moirai profile: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import onnxruntime

    from moirai.planning import parse_input_shapes
    from moirai.profile.cache import ProfileCache
    from moirai.profile.measured import MeasuredProfile, Settings
    from moirai.profile.targets import parse_device
    from moirai.runtime.linkprobe import measure_loopback

    if not args.verbose:  # e.g. ONNX Runtime 1.31's warning for every CUDA session it builds
        onnxruntime.set_default_logger_severity(3)
    named = [parse_device(text) for text in args.device] or _local_targets()
    targets: dict[str, Target] = {}
    for name, target in named:
        if name in targets:
            raise MoiraiError(f"--device {name} is given twice: name one of them, e.g. b={target}")
        targets[name] = target
    for target in targets.values():
        target.check_available()
    profiler = MeasuredProfile(
        args.model,
        parse_input_shapes(args.input_shape) or None,
        settings=Settings(
            args.warmup, args.repeats, args.method, args.min_seconds, args.patience_seconds
        ),
        cache=None if args.no_cache else ProfileCache.at(args.cache_dir),
        link_probe=None if args.no_links else measure_loopback,
        progress=_progress,
    )
    document = profiler.measure(targets)
    print(_summary(document, profiler.cache_status))
    if args.output:
        document.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _local_targets() -> list[tuple[str, Target]]:
    from moirai.planning.inputs import LOCAL, resolve_devices
    from moirai.profile.targets import Target

    targets = dict.fromkeys(Target.of(d) for ds in resolve_devices(LOCAL) for d in ds.devices)
    return [(t.key, t) for t in targets]


def _summary(document: ProfileDocument, cache_status: dict[str, str]) -> str:
    model = document.model
    lines = [f"{model['name']} (sha256 {str(model['sha256'])[:12]}…)"]
    header = f"  {'device':<18} {'groups':>6} {'timed by':<22} {'run ms':>9} {'Σ groups ms':>12}"
    lines.append(header + f" {'kernels ms':>11} {'call ms':>8}  measured")
    for name, entry in document.devices.items():
        methods = Counter(g.method for g in entry.groups)
        how = ", ".join(f"{m} {n}" for m, n in methods.most_common())
        run = "-" if entry.run_ms is None else f"{entry.run_ms:.3f}"
        kernels = "-" if entry.kernel_ms is None else f"{entry.kernel_ms:.3f}"
        lines.append(
            f"  {name:<18} {len(entry.groups):>6} {how:<22} {run:>9} {entry.total_ms:>12.3f} "
            f"{kernels:>11} {entry.call_overhead_ms:>8.3f}  {cache_status.get(name, '')}"
        )
        heaviest = sorted(entry.groups, key=lambda g: -g.ms)[:3]
        lines.append(
            "    heaviest groups: "
            + "; ".join(f"{g.ms:.3f} ± {g.spread_ms / 2:.3f} ms {g.ops[-1]}" for g in heaviest)
        )
    link = document.link
    if link is not None:
        lines.append(
            f"  link ({link.path}): {link.latency_ms:.3f} ms + bytes / "
            f"{link.bandwidth_bytes_per_s / 1e9:.3f} GB/s; R² {link.r2:.3f}, largest relative "
            f"residual {link.max_relative_residual:.0%} over {len(link.samples)} sizes"
        )
    return "\n".join(lines)
