"""`moirai infer`: send one inference request to a gateway and print the outputs.

    moirai infer --model NAME --input x=x.npy [--input mask=[[1,0]]] [--inputs inputs.json] \
        [--url 127.0.0.1:8001] [--output y] [--save DIR] [--timeout 30]

An input is a .npy file or a JSON value; `--inputs` reads a JSON object {name: value}. JSON values
take the input's datatype from the model's metadata: numbers, or strings for a `BYTES` input
(`--input city='[["a"], ["b"]]'`; a .npy of numpy strings works too). `--save` writes each output
as NAME.npy (string outputs as numpy strings, which np.load reads without pickle), a `/` in the
name written as `_` (`head/probs` → `head_probs.npy`).

The metadata call comes first and waits at most `CONNECT_S`: an address where nothing answers
(a firewall that drops packets, a port that is not the gateway's gRPC port) fails in seconds
with what to check, not at the end of `--timeout` as a bare DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moirai.cli.options import output_folder, positive_float
from moirai.errors import MoiraiError

CONNECT_S = 5.0
"""How long the gateway has to answer the metadata call that opens every `moirai infer`."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="send an inference request to a gateway")
    p.add_argument("--url", default="127.0.0.1:8001", help="gateway gRPC address")
    p.add_argument("--model", required=True, help="model name (as `moirai serve` prints it)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy|JSON")
    p.add_argument("--inputs", type=Path, help="JSON file: {name: nested list}")
    p.add_argument("--output", action="append", default=[], help="outputs to return (default all)")
    p.add_argument("--save", type=output_folder, help="write each output to DIR/NAME.npy")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="deadline, seconds")
    p.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="file holding the endpoint's bearer token, if it needs one (default: "
        "$MOIRAI_AUTH_TOKEN)",
    )
    p.add_argument(
        "--tls-ca-file",
        metavar="FILE",
        help="PEM certificates to trust: call an endpoint that serves TLS (for a self-signed "
        "one, its --tls-cert-file; default: plaintext)",
    )
    p.set_defaults(func=run)


def _values(args: argparse.Namespace) -> dict[str, object]:
    values: dict[str, object] = {}
    if args.inputs:
        try:
            data = json.loads(args.inputs.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise MoiraiError(f"--inputs {args.inputs}: cannot read it as JSON ({e})") from None
        if not isinstance(data, dict):
            raise MoiraiError(f"--inputs {args.inputs}: must be a JSON object {{name: value}}")
        values.update(data)
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep:
            raise MoiraiError(f"--input {item!r}: write NAME=FILE.npy or NAME=JSON")
        if name in values:
            raise MoiraiError(f"--input {name} is given twice (with --input or in --inputs)")
        if value.endswith(".npy"):
            try:
                values[name] = np.load(value)
            except (OSError, ValueError) as e:
                raise MoiraiError(f"--input {name}: cannot read {value} ({e})") from None
        else:
            try:
                values[name] = json.loads(value)
            except json.JSONDecodeError as e:
                raise MoiraiError(
                    f"--input {name}: {value!r} is neither a FILE.npy nor JSON ({e.msg})"
                ) from None
    if not values:
        raise MoiraiError("give the inputs with --input NAME=FILE.npy|JSON or --inputs FILE.json")
    return values


def _array(name: str, value: object, datatype: str | None) -> np.ndarray:
    """An input as the array to send: a .npy array as it is, a JSON value as the model's
    datatype for the input (numbers only: numpy would turn "1" or null into a float; strings
    only for BYTES)."""
    from stage_server.codec import BYTES, DTYPES

    if isinstance(value, np.ndarray):
        array = value
    elif datatype == BYTES:
        array = np.asarray(value, dtype=object)
        if not all(isinstance(v, str) for v in array.ravel().tolist()):
            raise MoiraiError(
                f"--input {name}: the model takes strings (BYTES): give a JSON list of strings, "
                f"not {value!r:.40}"
            )
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            raise MoiraiError(
                f"--input {name}: nested lists of different lengths; give a rectangular array"
            ) from None
        if array.dtype.kind not in "biuf":
            raise MoiraiError(f"--input {name}: give numbers (or true/false), not {value!r:.40}")
        dtype = DTYPES.get(datatype or "")
        if dtype is not None:
            if dtype.kind in "biu" and array.dtype.kind == "f":
                raise MoiraiError(
                    f"--input {name}: the model takes {datatype}, so give whole numbers"
                )
            try:
                array = np.asarray(value, dtype=dtype)
            except OverflowError:
                raise MoiraiError(
                    f"--input {name}: a value is out of range for {datatype}"
                ) from None
    if array.dtype.kind in "OUS" and datatype in (BYTES, None):  # strings, for a BYTES input
        return array
    if array.dtype not in DTYPES.values():
        raise MoiraiError(
            f"--input {name}: dtype {array.dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in DTYPES.values())} (numpy strings for a BYTES input)"
        )
    return array


def run(args: argparse.Namespace) -> int:
    import grpc

    from stage_server.auth import AUTH_TOKEN_ENV, read_token
    from stage_server.client import InferenceClient
    from stage_server.settings import read_pem

    host, _, port = args.url.rpartition(":")
    if "://" in args.url or not host or not port.isdigit():  # gRPC would take port 443
        raise MoiraiError(
            f"--url {args.url}: give HOST:PORT of the gateway's gRPC port, e.g. 127.0.0.1:8001"
        )
    values = _values(args)
    connect_s = min(CONNECT_S, args.timeout)
    token = read_token(args.auth_token_file, AUTH_TOKEN_ENV, "--auth-token-file")
    tls_ca = read_pem(args.tls_ca_file, "--tls-ca-file") if args.tls_ca_file else None
    with InferenceClient(args.url, token, tls_ca) as client:
        try:
            meta = client.metadata(args.model, timeout_s=connect_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                limit = f"--timeout {connect_s:g}" if connect_s < CONNECT_S else f"{connect_s:g}"
                raise MoiraiError(
                    f"--url {args.url}: no answer within {limit} s; is the gateway running "
                    "there, and is this its gRPC port (not the HTTP one)?"
                ) from None
            raise MoiraiError(f"gateway {args.url}: {e.code().name}: {e.details()}") from None
        datatypes = {t.name: t.datatype for t in meta.inputs}
        inputs = {name: _array(name, v, datatypes.get(name)) for name, v in values.items()}
        try:
            outputs = client.infer(args.model, inputs, args.output, timeout_s=args.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
                e.details() or ""
            ):  # refused by gRPC from the request's size alone, before any check of its inputs
                takes = ", ".join(f"{t.name} {list(t.shape)}" for t in meta.inputs)
                raise MoiraiError(
                    f"gateway {args.url}: the request is larger than the endpoint takes "
                    f"({e.details()}); model {args.model!r} takes {takes} (-1: any size): "
                    "check the inputs' shapes, or raise the server's --max-request-bytes"
                ) from None
            raise MoiraiError(f"gateway {args.url}: {e.code().name}: {e.details()}") from None
    files = {name: f"{name.replace('/', '_')}.npy" for name in outputs}
    if args.save and len(set(files.values())) < len(files):
        raise MoiraiError(
            f"--save {args.save}: outputs {', '.join(map(repr, files))} would share a file "
            "name; ask for one at a time with --output"
        )
    for name, array in outputs.items():
        print(f"{name}: {array.dtype} {list(array.shape)}")
        print(np.array2string(array, threshold=20, edgeitems=3))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.save(args.save / files[name], array.astype(str) if array.dtype == object else array)
            print(f"saved to {args.save / files[name]}")
    return 0
