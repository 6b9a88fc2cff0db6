"""`moirai infer`: send one inference request to a gateway and print the outputs.

    moirai infer --model NAME --input x=x.npy [--input mask=[[1,0]]] [--inputs inputs.json] \
        [--url 127.0.0.1:8001] [--output y] [--save DIR] [--timeout 30]

An input is a .npy file or a JSON value; `--inputs` reads a JSON object {name: value}. JSON values
take the input's datatype from the model's metadata. `--save` writes each output as NAME.npy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moirai.errors import MoiraiError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="send an inference request to a gateway")
    p.add_argument("--url", default="127.0.0.1:8001", help="gateway gRPC address")
    p.add_argument("--model", required=True, help="model name (as `moirai serve` prints it)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy|JSON")
    p.add_argument("--inputs", type=Path, help="JSON file: {name: nested list}")
    p.add_argument("--output", action="append", default=[], help="outputs to return (default all)")
    p.add_argument("--save", type=Path, help="write each output to DIR/NAME.npy")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline, seconds")
    p.set_defaults(func=run)


def _values(args: argparse.Namespace) -> dict[str, object]:
    values: dict[str, object] = {}
    if args.inputs:
        try:
            data = json.loads(args.inputs.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MoiraiError(f"--inputs {args.inputs}: {e}") from None
        if not isinstance(data, dict):
            raise MoiraiError(f"--inputs {args.inputs}: must be a JSON object {{name: value}}")
        values.update(data)
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep:
            raise MoiraiError(f"--input {item!r}: write NAME=FILE.npy or NAME=JSON")
        if value.endswith(".npy"):
            try:
                values[name] = np.load(value)
            except (OSError, ValueError) as e:
                raise MoiraiError(f"--input {name}: cannot read {value} ({e})") from None
        else:
            try:
                values[name] = json.loads(value)
            except json.JSONDecodeError as e:
                raise MoiraiError(f"--input {name}: not JSON ({e.msg})") from None
    if not values:
        raise MoiraiError("give the inputs with --input NAME=FILE.npy|JSON or --inputs FILE.json")
    return values


def run(args: argparse.Namespace) -> int:
    import grpc

    from stage_server.client import InferenceClient
    from stage_server.codec import DTYPES

    values = _values(args)
    with InferenceClient(args.url) as client:
        try:
            meta = client.metadata(args.model, timeout_s=args.timeout)
            dtypes = {t.name: DTYPES.get(t.datatype) for t in meta.inputs}
            inputs = {
                name: v if isinstance(v, np.ndarray) else np.asarray(v, dtype=dtypes.get(name))
                for name, v in values.items()
            }
            outputs = client.infer(args.model, inputs, args.output, timeout_s=args.timeout)
        except grpc.RpcError as e:
            raise MoiraiError(f"{args.url}: {e.code().name}: {e.details()}") from None
    for name, array in outputs.items():
        print(f"{name}: {array.dtype} {list(array.shape)}")
        print(np.array2string(array, threshold=20, edgeitems=3))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.save(args.save / f"{name}.npy", array)
    return 0
