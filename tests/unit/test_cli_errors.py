"""Bad command lines, as a clumsy or hostile user types them: every one ends with exit status 2 and
a message naming the flag, before any work starts, never with a traceback or a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from moirai.cli import infer, main
from moirai.errors import MoiraiError
from moirai.runtime.local import free_ports

COSTGRAPH = {
    "format": "moirai.costgraph/v1",
    "name": "tiny",
    "devices": [{"name": "d0", "memory_bytes": 1000}, {"name": "d1", "memory_bytes": 1000}],
    "tasks": [
        {"id": "t0", "compute_ms": {"d0": 1, "d1": 2}, "memory_bytes": 10},
        {"id": "t1", "compute_ms": {"d0": 1, "d1": 2}, "memory_bytes": 10},
    ],
    "edges": [{"src": "t0", "dst": "t1", "bytes": 100}],
}


@pytest.fixture
def costgraph(tmp_path: Path) -> str:
    path = tmp_path / "cg.json"
    path.write_text(json.dumps(COSTGRAPH), encoding="utf-8")
    return str(path)


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], flag: str) -> str:
    """argparse refused `argv` with status 2 and one line naming `flag`; that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moirai: argument "), err
    assert f"{flag}: " in err[0], err
    assert err[0].endswith(f"(see `moirai {argv[0]} --help`)")
    return err[0]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """`moirai ARGV` exits 2 with one `moirai: ` line and no traceback; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moirai: "), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["place", "m.onnx", "--time-limit", "nan"], "--time-limit"),  # solved with no limit
        (["place", "m.onnx", "--time-limit", "inf"], "--time-limit"),
        (["place", "m.onnx", "--time-limit", "0"], "--time-limit"),
        (["place", "m.onnx", "--max-tasks", "0"], "--max-tasks"),  # a ValueError traceback
        (["place", "m.onnx", "--threads", "0"], "--threads"),  # silently all cores
        (["serve", "m.onnx", "--time-limit", "-1"], "--time-limit"),
        (["serve", "m.onnx", "--cpu-devices", "0"], "--cpu-devices"),
        (["serve", "m.onnx", "--grpc-port", "0"], "--grpc-port"),
        (["serve", "m.onnx", "--http-port", "70000"], "--http-port"),
        (["serve", "m.onnx", "--timeout", "nan"], "--timeout"),
        (["demo", "--requests", "0"], "--requests"),  # a StatisticsError traceback
        (["demo", "--concurrency", "0"], "--concurrency"),  # a throughput of nonsense
        (["demo", "--window", "0"], "--window"),  # no request counted: a division by zero
        (["infer", "--model", "m", "--timeout", "-1"], "--timeout"),
        (["gateway", "--max-request-bytes", "-1"], "--max-request-bytes"),
        (["stage", "--workers", "0"], "--workers"),
        (["profile", "m.onnx", "--patience-seconds", "-1"], "--patience-seconds"),
        (["profile", "m.onnx", "--patience-seconds", "nan"], "--patience-seconds"),
    ],
)
def test_numbers_out_of_range_are_refused_while_parsing(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    usage_error(capsys, argv, flag)


def test_a_port_from_the_environment_that_is_no_number(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MOIRAI_PORT=abc used to crash every subcommand while the parser was built."""
    monkeypatch.setenv("MOIRAI_PORT", "abc")
    assert "'abc' is not a port number" in usage_error(capsys, ["stage"], "--port")


@pytest.mark.parametrize("flag", ["--output", "--costgraph-out", "--gantt"])
def test_place_outputs_are_checked_before_solving(
    tmp_path: Path, costgraph: str, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """A missing folder or a folder as the file used to fail after the solve, losing it."""
    missing = tmp_path / "no-such-folder" / "out"
    message = usage_error(capsys, ["place", "--costgraph", costgraph, flag, str(missing)], flag)
    assert "does not exist" in message
    message = usage_error(capsys, ["place", "--costgraph", costgraph, flag, str(tmp_path)], flag)
    assert "is a folder" in message


@pytest.mark.parametrize(
    "argv",
    [
        ["place", "absent.onnx", "--devices", "local"],
        ["serve", "absent.onnx"],
        ["demo"],
    ],
    ids=["place", "serve", "demo"],
)
def test_an_unknown_solver_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """It was refused only once the model was loaded and profiled (minutes, measured); the
    model does not exist here, so nothing read it first."""
    message = usage_error(capsys, [*argv, "--solver", "magic"], "--solver")
    assert "unknown solver 'magic': use one of " in message and "auto" in message


def test_a_gantt_file_matplotlib_cannot_write_is_refused_before_solving(
    tmp_path: Path, costgraph: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--gantt plan.txt` ended a finished solve in matplotlib's ValueError traceback."""
    argv = ["place", "--costgraph", costgraph, "--gantt", str(tmp_path / "plan.txt")]
    message = usage_error(capsys, argv, "--gantt")
    assert "name a picture file, ending in one of " in message and ".png" in message


@pytest.mark.parametrize(
    "flags",
    [["--devices", "local"], ["--profile", "analytic"], ["--input-shape", "x=1"]],
    ids=["devices", "profile", "input-shape"],
)
def test_a_models_flags_beside_a_cost_graph_are_refused(
    costgraph: str, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    """They were ignored: the cost graph was planned as it is."""
    message = one_line_error(capsys, ["place", "--costgraph", costgraph, *flags])
    assert message == (
        f"moirai: {flags[0]} applies to MODEL.onnx: a cost graph names its own devices and "
        "times (write one with --costgraph-out)"
    )


def test_profile_output_is_checked_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["profile", "m.onnx", "-o", str(tmp_path / "no-such-folder" / "p.json")]
    assert "does not exist" in usage_error(capsys, argv, "-o/--output")


@pytest.mark.parametrize("limit", ["inf", "nan", "lots"])
def test_memory_limit_must_be_a_finite_number(
    costgraph: str, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    """`inf` used to end in an OverflowError traceback."""
    argv = ["place", "--costgraph", costgraph, "-q", "--memory-limit", f"d0={limit}"]
    assert "--memory-limit d0=" in one_line_error(capsys, argv)


@pytest.mark.parametrize(
    ("value", "datatype", "needle"),
    [
        ([["a", "b"]], "FP32", "give numbers"),  # used to be a ValueError traceback
        (["1", "2"], "FP32", "give numbers"),  # numpy would read "1" as 1.0
        ([None, 1.0], "FP32", "give numbers"),  # ... and null as nan
        ({"a": 1}, "FP32", "give numbers"),  # a TypeError traceback
        ([[1, 2], [3]], "FP32", "different lengths"),
        ([1.5, 2], "INT64", "whole numbers"),  # numpy would cut 1.5 to 1
        ([1000], "INT8", "out of range for INT8"),
        ([-1], "UINT8", "out of range for UINT8"),
        (np.array(["a"]), "FP32", "dtype <U1 is not supported"),
        ([1, 2], "BYTES", "the model takes strings (BYTES)"),
        ([["a"], [None]], "BYTES", "the model takes strings (BYTES)"),
    ],
)
def test_infer_values_that_are_no_tensor(value: object, datatype: str, needle: str) -> None:
    with pytest.raises(MoiraiError, match="--input x: ") as e:
        infer._array("x", value, datatype)
    assert needle in str(e.value)


def test_infer_values_take_the_models_datatype() -> None:
    assert infer._array("x", [[1, 2]], "FP32").dtype == np.float32
    assert infer._array("x", [True, 0], "BOOL").tolist() == [True, False]
    assert infer._array("x", [3, 4], "UINT8").dtype == np.uint8
    npy = np.zeros(3, np.float64)
    assert infer._array("x", npy, "FP32") is npy  # a file's array goes as it is; the gateway checks
    cities = infer._array("city", [["a"], ["ünï"]], "BYTES")
    assert cities.dtype == object and cities.tolist() == [["a"], ["ünï"]]
    npy = np.array(["a", "bc"])
    assert infer._array("city", npy, "BYTES") is npy


def test_infer_inputs_file_that_is_not_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "inputs.json"
    path.write_bytes(b"\x08\xb7\xff\x00")
    message = one_line_error(capsys, ["infer", "--model", "m", "--inputs", str(path)])
    assert f"--inputs {path}: cannot read it as JSON" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "127.0.0.1", "127.0.0.1:grpc"])
def test_infer_url_that_is_no_host_and_port(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a port, gRPC called port 443 ('ipv4:127.0.0.1:443: Connection refused')."""
    argv = ["infer", "--model", "m", "--input", "x=[1]", "--url", url]
    assert "give HOST:PORT of the gateway's gRPC port" in one_line_error(capsys, argv)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (not an HTTP/2 server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_infer_where_nothing_answers_fails_at_the_connect_limit(
    silent_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to wait for the whole --timeout, then say only 'Deadline Exceeded'."""
    monkeypatch.setattr(infer, "CONNECT_S", 0.5)
    url = f"127.0.0.1:{silent_port}"
    argv = ["infer", "--model", "m", "--input", "x=[1]", "--url", url, "--timeout", "600"]
    message = one_line_error(capsys, argv)
    assert f"--url {url}: no answer within 0.5 s" in message and "gRPC port" in message


def test_infer_within_a_timeout_under_the_connect_limit_names_the_timeout(
    silent_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--timeout 0.2` was reported as 'no answer within 0.2 s', as if that were the connect
    limit: the flag that set it is named."""
    url = f"127.0.0.1:{silent_port}"
    argv = ["infer", "--model", "m", "--input", "x=[1]", "--url", url, "--timeout", "0.2"]
    assert f"--url {url}: no answer within --timeout 0.2 s; " in one_line_error(capsys, argv)


def test_infer_where_the_port_is_closed(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        argv = ["infer", "--model", "m", "--input", "x=[1]", "--url", f"127.0.0.1:{port}"]
        assert "UNAVAILABLE" in one_line_error(capsys, argv)


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so-reuseport"])
def test_serve_on_a_port_in_use_fails_before_planning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reuse_port: bool
) -> None:
    """Also when the holder set SO_REUSEPORT, as every gRPC server does: a second gateway then
    used to bind the same port, and died later on its chain socket with a traceback. The model
    does not exist: the port is checked first."""
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        other = port - 1 if port > 1024 else port + 1
        argv = ["serve", str(tmp_path / "missing.onnx"), "--grpc-port", str(port)]
        message = one_line_error(capsys, [*argv, "--http-port", str(other)])
        assert f"--grpc-port {port}: 127.0.0.1:{port} is taken" in message


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        # port 0 (any free one) for the other ports: these are checked first
        (["gateway", "--plan", "missing.json", "--http-port", "0", "--grpc-port"], "--grpc-port"),
        (["gateway", "--plan", "missing.json", "--http-port", "0", "--grpc-port", "0",
          "--chain-port"], "--chain-port"),
        (["stage", "--plan", "p.json", "--model", "m.onnx", "--device", "d", "--port"], "--port"),
    ],
)  # fmt: skip
def test_daemons_on_a_grpc_servers_port(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """A gateway or stage server on the port of a running gRPC server (SO_REUSEPORT) used to bind
    it as well, then die on its same-host socket with a traceback."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        message = one_line_error(capsys, [*argv, str(port)])
        assert message == (
            f"moirai: {flag} {port}: 127.0.0.1:{port} is taken; stop what serves there or pick "
            "another port"
        )


def test_serve_with_one_port_for_both_protocols(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", str(tmp_path / "m.onnx"), "--grpc-port", "18123", "--http-port", "18123"]
    assert "give two ports" in one_line_error(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["serve", "m.onnx", "--workdir"], "--workdir"),  # a FileExistsError after planning
        (["infer", "--model", "m", "--save"], "--save"),  # ... after the request
        (["profile", "m.onnx", "--cache-dir"], "--cache-dir"),  # ... after measuring
    ],
)
def test_folders_that_are_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    file = tmp_path / "file"
    file.write_text("", encoding="utf-8")
    assert "is a file, not a folder" in usage_error(capsys, [*argv, str(file)], flag)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["serve", "m.onnx", "--workdir"], "--workdir"),
        (["infer", "--model", "m", "--save"], "--save"),
        (["profile", "m.onnx", "--cache-dir"], "--cache-dir"),
    ],
)
def test_folders_that_cannot_be_made(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """Refused before any work (planning, the request, measuring), in one line."""
    assert "cannot create folder" in usage_error(capsys, [*argv, "/proc/moirai/out"], flag)


@pytest.mark.parametrize("flag", ["-o", "--costgraph-out", "--gantt"])
def test_place_output_the_system_refuses(
    costgraph: str, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """/proc passes every check a folder can (it exists, root may write in it), yet refuses a
    new file: one line naming the file, not a traceback."""
    argv = ["place", "--costgraph", costgraph, "--solver", "heft", "-q", flag, "/proc/x.png"]
    assert one_line_error(capsys, argv).startswith("moirai: /proc/x.png: ")


@pytest.mark.parametrize("flag", ["--pin", "--memory-limit"])
def test_place_pairs_given_twice(
    costgraph: str, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """The last one used to win silently."""
    values = ["t0=d0", "t0=d1"] if flag == "--pin" else ["d0=100", "d0=200"]
    argv = ["place", "--costgraph", costgraph, "-q", flag, values[0], flag, values[1]]
    assert f"{flag} {values[0].split('=')[0]} is given twice" in one_line_error(capsys, argv)


def test_infer_input_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "inputs.json"
    path.write_text('{"x": [1]}', encoding="utf-8")
    argv = ["infer", "--model", "m", "--inputs", str(path), "--input", "x=[2]"]
    assert "--input x is given twice" in one_line_error(capsys, argv)


@pytest.mark.parametrize(
    ("flags", "what"),
    [
        (["place", "{model}", "--devices", "{binary}"], "a devices file"),
        (["place", "--costgraph", "{binary}"], "a cost graph"),
        (["place", "{model}", "--devices", "local", "--profile", "{binary}"], "a profile"),
        (["gateway", "--plan", "{binary}"], "a stage plan"),
    ],
)
def test_a_model_where_a_text_file_belongs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], what: str
) -> None:
    """An .onnx file passed for a YAML/JSON one was a UnicodeDecodeError traceback."""
    binary = tmp_path / "model.onnx"
    binary.write_bytes(b"\x08\x07\x12\x07pytorch\xff\xfe\x00graph")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    argv = [f.format(binary=binary, model=model) for f in flags]
    line = one_line_error(capsys, argv)
    assert f"{binary}: not a YAML/JSON text file" in line and f"so not {what}" in line, line


def test_a_placement_file_that_is_not_text(tmp_path: Path) -> None:
    from moirai.placement import Placement

    binary = tmp_path / "plan.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MoiraiError, match=r"not a YAML/JSON text file .*, so not a placement"):
        Placement.load(binary)


@pytest.mark.parametrize("command", ["place", "profile"])
def test_input_shape_given_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The last one used to win silently."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    argv = [command, str(model), "--input-shape", "x=2x4", "--input-shape", "x=3x4"]
    if command == "place":
        argv += ["--devices", "local"]
    line = one_line_error(capsys, argv)
    assert "--input-shape x is given twice (x=2x4 and x=3x4)" in line, line


def test_ctrl_c_while_the_subcommands_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during the imports at start-up was a KeyboardInterrupt traceback."""
    import moirai.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(moirai.cli, "build_parser", interrupted)
    assert main(["place", "--help"]) == 130
    assert capsys.readouterr().err == "moirai: interrupted\n"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--preferred-batch-sizes", "4"], "need --max-batch-size"),
        (["--max-queue-delay-us", "100"], "need --max-batch-size"),
        (["--max-batch-size", "4", "--preferred-batch-sizes", "8"], "--preferred-batch-sizes 8"),
        (["--max-batch-size", "4", "--preferred-batch-sizes", "2,x"], "separated by commas"),
        (["--max-batch-size", "-2"], "--max-batch-size -2"),
        (["--max-batch-size", "4", "--max-queue-delay-us", "-1"], "--max-queue-delay-us -1"),
    ],
)
def test_serve_batching_flags_that_make_no_sense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    """Refused before planning (the model file does not even exist)."""
    argv = ["serve", str(tmp_path / "missing.onnx"), *flags]
    assert needle in one_line_error(capsys, argv)


def test_serve_batching_a_model_with_a_fixed_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before planning (it used to be refused after profiling and solving, which take
    minutes on a large model), and so before any server starts."""
    import moirai.cli.serve

    def planned(*args: object, **kwargs: object) -> None:
        raise AssertionError("planned a model that cannot be batched")

    monkeypatch.setattr(moirai.cli.serve, "plan_from_args", planned)
    import onnx
    from onnx import TensorProto, helper

    from moirai.runtime.local import free_ports

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), path)
    grpc_port, http_port = free_ports(2)
    argv = [
        "serve", str(path), "--max-batch-size", "8", "--time-limit", "2", "--profile", "analytic",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
    ]  # fmt: skip
    message = one_line_error(capsys, argv)
    assert "input 'x' has a fixed first dimension (1)" in message
    assert "without --max-batch-size" in message


def test_gateway_chain_port_apart_from_the_public_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """The stages' pushes never share the public endpoint's port."""
    argv = ["gateway", "--plan", "missing.json", "--grpc-port", "18125", "--chain-port", "18125"]
    assert one_line_error(capsys, argv) == (
        "moirai: --chain-port 18125 is also a front-end port: the stages' pushes need a port "
        "of their own, apart from the public endpoint"
    )


def test_metrics_port_apart_from_the_http_port(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gateway", "--plan", "missing.json", "--http-port", "18126", "--metrics-port", "18126"]
    assert one_line_error(capsys, argv) == (
        "moirai: --http-port and --metrics-port are both 18126: give two ports"
    )


@pytest.mark.parametrize("content", [None, "  \n"], ids=["missing", "empty"])
@pytest.mark.parametrize(
    "argv",
    [
        ["gateway", "--plan", "missing.json", "--grpc-port", "0", "--http-port", "0"],
        ["serve", "missing.onnx", "--grpc-port", "{0}", "--http-port", "{1}"],
        ["infer", "--model", "m", "--input", "x=[1]"],
    ],
    ids=["gateway", "serve", "infer"],
)
def test_a_token_file_that_gives_no_token_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    ports = [str(p) for p in free_ports(2)]
    argv = [a.format(*ports) for a in argv]
    message = one_line_error(capsys, [*argv, "--auth-token-file", str(path)])
    reason = (
        "cannot read the token (No such file or directory)"
        if content is None
        else ("the file is empty; write the token into it")
    )
    assert message == f"moirai: --auth-token-file {path}: {reason}"


@pytest.mark.parametrize(
    ("devices", "cpus", "says"),
    [
        (["a", "b"], ["0"], "--cpus 0: with several --device, name the device: --cpus a=0"),
        (["a"], ["b=0"], "--cpus b=0: 'b' is not a --device of this server (a)"),
        (["a"], ["x"], "--cpus x: write core numbers, e.g. 0,1"),  # "invalid literal for int()"
        (["a"], ["4096"], "--cpus 4096: cannot pin to these cores (not all of them are available"),
    ],
)
def test_stage_cores_of_each_device(
    capsys: pytest.CaptureFixture[str], devices: list[str], cpus: list[str], says: str
) -> None:
    port = str(free_ports(1)[0])
    argv = ["stage", "--plan", "p.json", "--model", "m.onnx", "--port", port]
    argv += [a for d in devices for a in ("--device", d)] + [a for c in cpus for a in ("--cpus", c)]
    assert one_line_error(capsys, argv).startswith(f"moirai: {says}")


def test_stage_threads_apply_to_one_device(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stage", "--plan", "p.json", "--model", "m.onnx", "--device", "a", "--device", "b"]
    assert "--threads / --cuda-device apply to one --device" in one_line_error(
        capsys, [*argv, "--threads", "2"]
    )


def test_profile_patience_seconds_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--patience-seconds` is the profile settings' `patience_seconds` (0: no turns beyond the
    base window)."""
    from moirai.profile import measured

    seen: list[measured.Settings] = []

    class Stop(Exception):
        pass

    def profiler(*_: object, settings: measured.Settings, **__: object) -> None:
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(measured, "MeasuredProfile", profiler)
    for flag, patience in (([], 10.0), (["--patience-seconds", "0"], 0.0)):
        with pytest.raises(Stop):
            main(["profile", "m.onnx", "--device", "cpu", *flag])
        assert seen.pop().patience_seconds == patience


@pytest.mark.parametrize(
    "argv",
    [
        ["stage", "--plan", "{plan}", "--model", "m.onnx", "--device", "d", "--port", "{port}"],
        ["gateway", "--plan", "{plan}", "--grpc-port", "0", "--http-port", "0"],
    ],
    ids=["stage", "gateway"],
)
@pytest.mark.parametrize("plan", ["missing.json", "not-a-plan.json"])
def test_a_bad_plan_is_the_only_line(tmp_path: Path, argv: list[str], plan: str) -> None:
    """A real process (its logging as the CLI sets it up): the warning that the chain has no
    token came first, above the plan's error."""
    (tmp_path / "not-a-plan.json").write_text('{"format": "moirai.costgraph/v1"}')
    (port,) = free_ports(1)
    argv = [a.format(plan=tmp_path / plan, port=port) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "MOIRAI_CHAIN_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "moirai", *argv], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moirai: {tmp_path / plan}: "), err


def test_sigterm_while_planning_unwinds_as_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM used to end `moirai place` (and `serve`) where it stood: a signal sent while it
    profiled left its temporary folders behind (moirai-profile-*, moirai-fusion-*). Now it
    unwinds as Ctrl-C does, and ends with status 143."""
    import onnx
    from serving import models

    path = tmp_path / "wide.onnx"
    onnx.save(models.mlp(width=512, batch=128), path)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "MOIRAI_CACHE": str(tmp_path / "cache"), "TMPDIR": str(temp)}
    argv = [sys.executable, "-m", "moirai", "place", str(path), "--devices", "local"]
    with subprocess.Popen(
        [*argv, "--cpu-devices", "1"], stderr=subprocess.PIPE, text=True, env=env
    ) as place:
        assert place.stderr is not None
        for line in place.stderr:
            if "whole model, run" in line:  # profiling, in its temporary folder
                break
        assert list(temp.glob("moirai-*")), "no temporary folder while profiling"
        place.terminate()
        rest = place.stderr.read()
        assert place.wait(timeout=60) == 143, rest
    assert rest.strip().splitlines()[-1] == "moirai: terminated", rest
    assert "Traceback" not in rest
    assert not list(temp.glob("moirai-*"))  # (ONNX Runtime keeps its .ses file there)


def test_a_model_onnx_runtime_cannot_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator ONNX Runtime lacks: planning places it node by node (`moirai.fusion`), and
    the measured profile (serve's default) then ended in ONNX Runtime's traceback, as did a
    stage server on an analytic plan. Now each says so in one line."""
    import onnx
    from onnx import TensorProto, helper

    from moirai.sessions import create_session
    from moirai.stageplan import DeviceSpec

    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Mystery", ["a"], ["y"], domain="example.unknown"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)],
    )
    with pytest.raises(MoiraiError, match=r"ONNX Runtime cannot run 'custom' on cpu-0: .*Mystery"):
        create_session(model, DeviceSpec("cpu-0", threads=1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    monkeypatch.setenv("MOIRAI_CACHE", str(tmp_path / "cache"))
    argv = ["place", str(path), "--devices", "local", "--cpu-devices", "1", "--profile", "measured"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "ONNX Runtime cannot run " in err[-1] and "Mystery" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_a_cache_folder_that_cannot_be_made_names_what_each_command_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moirai place --devices local` (serve and demo too) was told to use --cache-dir or
    --no-cache, flags only `moirai profile` has."""
    import onnx
    from serving import models

    onnx.save(models.mlp(width=8, depth=1), tmp_path / "m.onnx")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MOIRAI_CACHE", str(tmp_path / "file"))
    argv = ["place", str(tmp_path / "m.onnx"), "--devices", "local", "--cpu-devices", "1"]
    message = one_line_error(capsys, argv)
    assert message.startswith(f"moirai: {tmp_path / 'file' / 'profiles'}: cannot create"), message
    assert "set MOIRAI_CACHE to a folder you can write" in message


def test_a_warning_said_again_word_for_word_is_said_once_by_a_command_that_ends() -> None:
    """Planning analyses one model per device profiled: the first `moirai place` of a
    QDQ-quantised MobileNetV3 (torchvision, quantize_static) said the same warning 5 times.
    A server's log keeps every warning: one that comes back later is news."""
    import io
    import logging

    from moirai import cli

    def said(command: str) -> list[str]:
        handler = cli._handler(command)
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        logger = logging.getLogger("moirai.test_once")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            for _ in range(3):
                logger.warning("CPU fusions from the extended level only: %s", "why")
            logger.warning("another")
            logger.info("progress")
            logger.info("progress")
        finally:
            logger.removeHandler(handler)
        return stream.getvalue().splitlines()

    assert said("place") == [
        "moirai: warning: CPU fusions from the extended level only: why",
        "moirai: warning: another",
        "moirai: progress",
        "moirai: progress",
    ]
    assert len(said("serve")) == 6
