"""moirai_operator.fetch against a real HTTP server on loopback: external data fetched next to
the model under one digest, and the limits (total timeout, size cap, internal redirects)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import onnx
import pytest
from moirai_operator.fetch import ModelDigestError, ModelUnreachableError, fetch, main
from onnx import TensorProto, helper, numpy_helper


def _model(folder: Path, location: str = "m.onnx.data") -> Path:
    w = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    path = folder / "m.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path, save_as_external_data=True, location=location)
    return path


def _digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    root: Path

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.end_headers()
        elif url.path == "/drip":  # a byte every 0.2 s: every read is quick, the whole is slow
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif url.path == "/endless":  # no Content-Length, more than any cap
            self.send_response(200)
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x" * 65536)
        elif url.path == "/huge":  # says so up front
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        else:
            file = self.root / url.path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "store"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"root": root})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", root
    httpd.shutdown()
    httpd.server_close()


def test_external_data_is_fetched_next_to_the_model_under_one_digest(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = server
    source = _model(root)
    data = root / "m.onnx.data"
    digest = _digest(source, data)  # cat m.onnx m.onnx.data | sha256sum
    dest = tmp_path / "pod" / "model.onnx"
    assert fetch(f"{base}/m.onnx", dest, digest) == dest
    assert (dest.parent / "m.onnx.data").read_bytes() == data.read_bytes()
    # A changed weight file no longer passes, in the store or in place.
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelDigestError, match=r"cat model\.onnx model\.onnx\.data"):
        fetch(f"{base}/m.onnx", tmp_path / "again" / "model.onnx", digest)
    with pytest.raises(ModelDigestError):
        fetch(str(source), dest, digest)


def test_a_single_file_keeps_its_plain_digest(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    path = root / "one.onnx"
    model = onnx.load(_model(root))
    onnx.save(model, path)  # weights back in the file
    dest = tmp_path / "model.onnx"
    assert fetch(f"{base}/one.onnx", dest, _digest(path)) == dest


@pytest.mark.parametrize("location", ["../escape.data", "/etc/passwd"])
def test_locations_outside_the_models_folder_are_refused(
    server: tuple[str, Path], tmp_path: Path, location: str
) -> None:
    base, root = server
    source = _model(root)
    model = onnx.load(source, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, source)
    dest = tmp_path / "pod" / "model.onnx"
    with pytest.raises(ModelUnreachableError, match="inside the model's folder"):
        fetch(f"{base}/m.onnx", dest)
    assert not (tmp_path / "escape.data").exists()


def test_a_volume_model_needs_its_data_beside_it(tmp_path: Path) -> None:
    source = _model(tmp_path)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelUnreachableError, match=r"m\.onnx\.data, which is not next to it"):
        fetch(str(source), tmp_path / "unused.onnx")


def test_redirects_to_internal_addresses_are_refused_unless_allowed(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, root = server
    _model(root)
    port = urlparse(base).port
    elsewhere = f"{base}/redirect?to=http://localhost:{port}/m.onnx"  # another host: loopback
    with pytest.raises(ModelUnreachableError, match="loopback or link-local") as e:
        fetch(elsewhere, tmp_path / "a" / "model.onnx")
    assert "\n" not in str(e.value)
    assert fetch(elsewhere, tmp_path / "b" / "model.onnx", allow_internal=True).exists()
    metadata = f"{base}/redirect?to=http://169.254.169.254/latest/meta-data/"
    with pytest.raises(ModelUnreachableError, match="metadata address"):
        fetch(metadata, tmp_path / "c" / "model.onnx")
    same_host = f"{base}/redirect?to=/m.onnx"
    assert fetch(same_host, tmp_path / "d" / "model.onnx").exists()


def test_the_size_cap_is_kept_with_and_without_a_length(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = server
    for path in ("/huge", "/endless"):
        dest = tmp_path / path.strip("/") / "model.onnx"
        with pytest.raises(ModelUnreachableError, match="larger than the size cap"):
            fetch(f"{base}{path}", dest, max_bytes=1 << 20)
        assert list(dest.parent.iterdir()) == []  # no partial file left


def test_the_total_timeout_holds_although_every_read_is_quick(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = server
    dest = tmp_path / "slow" / "model.onnx"
    started = time.monotonic()
    with pytest.raises(ModelUnreachableError, match="longer than the total timeout"):
        fetch(f"{base}/drip", dest, timeout=5.0, total_timeout=1.0)
    assert time.monotonic() - started < 30  # not the 200 s the drip would take
    assert list(dest.parent.iterdir()) == []


def test_the_command_says_one_line(
    server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = server
    dest = str(tmp_path / "model.onnx")
    assert main([f"{base}/huge", dest, "--max-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moirai: ") and err.count("\n") == 1
