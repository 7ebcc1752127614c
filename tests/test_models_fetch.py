"""`csearch models fetch`: downloads from a local HTTP server on 127.0.0.1 (no network needed),
checksums, atomic install, resume after an interrupted download, one-line errors, `--from DIR`,
and the EfficientNet-Lite conversion path on a tiny TFLite model of the same structure.

The real EfficientNet-Lite0 archive cannot be reached from the test machines: its conversion is
tested here on a miniature with the same interface (float32 [1, 224, 224, 3] input, MEAN-pooled
1280-d features feeding a FULLY_CONNECTED layer and a softmax)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from csearch import models
from csearch.cli import main
from csearch.models import fetch

TINY = bytes(range(256)) * 400  # 100 KiB: several read chunks, so a connection can drop half-way
LITE0 = models.get_spec("efficientnet_lite0")
U2NETP = models.get_spec("u2netp")


class Server:
    """A local HTTP server whose behaviour each test sets: the files it serves, how many responses
    it cuts off half-way, and whether it honours Range requests. It logs every GET."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drops = 0  # responses still to cut off half-way
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range") and server.honour_range:
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    body = body[: len(body) // 2]  # then the connection closes (HTTP/1.0)
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("CSEARCH_HOME", str(path))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    return path


def tiny_spec(monkeypatch, url: str, data: bytes = TINY, **fields) -> models.ModelSpec:
    """A registered ONNX-like model whose official URL is `url`, pinned to `data`'s sha256."""
    fields = {"sha256": hashlib.sha256(data).hexdigest(), **fields}
    spec = models.ModelSpec(
        name="tiny",
        role="saliency",
        input_size=8,
        dim=None,
        preprocessing="imagenet",
        weights_file="tiny.onnx",
        description="test file",
        source="the test server",
        url=url,
        **fields,
    )
    monkeypatch.setitem(models.REGISTRY, "tiny", spec)
    return spec


def one_error(capfd) -> str:
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("csearch: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ downloads


def test_download_checks_sha256_and_installs(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    assert main(["models", "fetch", "tiny", "--json"]) == 0
    (row,) = json.loads(capfd.readouterr().out)
    assert row["action"] == "downloaded" and row["sha256"] == hashlib.sha256(TINY).hexdigest()
    assert (home / "tiny.onnx").read_bytes() == TINY and sorted(p.name for p in home.iterdir()) == ["tiny.onnx"]
    assert models.find_weights("tiny") == home / "tiny.onnx"
    assert main(["models", "fetch", "tiny"]) == 0  # already there: kept, no second download
    assert "tiny: present" in capfd.readouterr().out and len(server.requests) == 1
    assert main(["models", "fetch", "tiny", "--force"]) == 0 and len(server.requests) == 2


def test_publisher_md5_is_checked(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx", sha256=None, url_md5="0" * 32)
    assert main(["models", "fetch", "tiny"]) == 2
    assert "md5 mismatch for tiny.onnx" in one_error(capfd) and not list(home.iterdir())


def test_sha256_mismatch_is_one_line_and_installs_nothing(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY[::-1]
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    assert main(["models", "fetch", "tiny"]) == 2
    line = one_error(capfd)
    assert "tiny: sha256 mismatch for tiny.onnx" in line and "nothing was installed" in line
    assert not list(home.iterdir())  # no final file, no .part


def test_interrupted_download_resumes_with_range(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    server.drops = 1
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    assert main(["models", "fetch", "tiny"]) == 0
    assert (home / "tiny.onnx").read_bytes() == TINY
    assert server.requests == [("/tiny.onnx", None), ("/tiny.onnx", f"bytes={len(TINY) // 2}-")]


def test_download_cut_every_time_keeps_the_part_and_the_next_run_resumes(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    server.drops = fetch.ATTEMPTS
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    assert main(["models", "fetch", "tiny"]) == 2
    assert "rerun to resume" in one_error(capfd)
    part = home / ("tiny.onnx" + fetch.PART)
    kept = part.stat().st_size
    assert 0 < kept < len(TINY) and not (home / "tiny.onnx").exists()
    assert main(["models", "fetch", "tiny"]) == 0
    assert server.requests[-1] == ("/tiny.onnx", f"bytes={kept}-")
    assert (home / "tiny.onnx").read_bytes() == TINY and not part.exists()


def test_server_ignoring_range_gets_a_fresh_download(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    server.drops, server.honour_range = 1, False
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    assert main(["models", "fetch", "tiny"]) == 0
    assert (home / "tiny.onnx").read_bytes() == TINY and server.requests[1][1] is not None


def test_no_network_is_one_line(home, monkeypatch, capfd):
    tiny_spec(monkeypatch, f"http://127.0.0.1:{free_port()}/tiny.onnx")  # nothing listens there
    assert main(["models", "fetch", "tiny"]) == 2
    line = one_error(capfd)
    assert "tiny: download of http://127.0.0.1" in line and "--from DIR" in line
    assert not list(home.iterdir())


def test_http_404_is_one_line(server, home, monkeypatch, capfd):
    tiny_spec(monkeypatch, f"{server.url}/gone.onnx")
    assert main(["models", "fetch", "tiny"]) == 2
    assert "HTTP 404" in one_error(capfd)


def test_subprocess_failure_has_no_traceback(tmp_path):
    env = {"CSEARCH_HOME": str(tmp_path / "home"), fetch.MIRROR_ENV: f"http://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [sys.executable, "-m", "csearch", "models", "fetch", "u2netp"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("csearch: error:")]
    assert line.startswith("csearch: error: u2netp: download of http://127.0.0.1:")


# ------------------------------------------------------------------------------ --from and mirrors


def test_from_dir_copies_and_checks(tmp_path, home, monkeypatch, capfd):
    source = tmp_path / "mirror"
    source.mkdir()
    tiny_spec(monkeypatch, "https://example.invalid/tiny.onnx")
    assert main(["models", "fetch", "tiny", "--from", str(source)]) == 2
    assert f"tiny: {source} has no tiny.onnx" in one_error(capfd)
    (source / "tiny.onnx").write_bytes(TINY[:-1])
    assert main(["models", "fetch", "tiny", "--from", str(source)]) == 2
    assert "sha256 mismatch" in one_error(capfd) and not list(home.iterdir())
    (source / "tiny.onnx").write_bytes(TINY)
    assert main(["models", "fetch", "tiny", "--from", str(source)]) == 0
    assert "tiny: copied" in capfd.readouterr().out and (home / "tiny.onnx").read_bytes() == TINY
    assert main(["models", "fetch", "tiny", "--from", str(tmp_path / "nope")]) == 2
    assert "not a folder" in one_error(capfd)


def test_mirror_url_from_environment(server, home, monkeypatch, capfd):
    server.files["/mirror/tiny.onnx"] = TINY
    tiny_spec(monkeypatch, "https://example.invalid/releases/tiny.onnx")
    monkeypatch.setenv(fetch.MIRROR_ENV, f"{server.url}/mirror/")
    assert main(["models", "fetch", "tiny"]) == 0
    assert server.requests == [("/mirror/tiny.onnx", None)]


def test_existing_file_that_differs_is_refused_without_force(server, home, monkeypatch, capfd):
    server.files["/tiny.onnx"] = TINY
    tiny_spec(monkeypatch, f"{server.url}/tiny.onnx")
    home.mkdir()
    (home / "tiny.onnx").write_bytes(b"someone else's file")
    assert main(["models", "fetch", "tiny"]) == 2
    assert "--force" in one_error(capfd) and not server.requests
    assert main(["models", "fetch", "tiny", "--force"]) == 0 and (home / "tiny.onnx").read_bytes() == TINY


def test_model_without_download_says_how_to_get_it(home, capfd):
    assert main(["models", "fetch", "fba"]) == 2
    line = one_error(capfd)
    assert "fba: no official download" in line and "export_onnx.py" in line and "--from DIR" in line


def test_defaults_are_the_default_config_models():
    assert fetch.default_names() == ["efficientnet_lite0", "u2netp"]


def test_list_names_the_fetch_command_for_missing_models(home, capfd):
    assert main(["models"]) == 0
    out = capfd.readouterr().out
    assert f"missing: `csearch models fetch u2netp` (downloads {U2NETP.url})" in out
    assert "`csearch models fetch efficientnet_lite0` (builds it from https://storage.googleapis.com/" in out
    assert main(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capfd.readouterr().out)}
    assert rows["u2netp"]["default"] and not rows["resnet50"]["default"]
    assert rows["resnet50"]["url"] == models.get_spec("resnet50").keras_url


@pytest.mark.shared_models
def test_from_shared_models_installs_the_pinned_files(shared_models, home, capfd):
    assert main(["models", "fetch", "--from", str(shared_models), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capfd.readouterr().out)}
    assert set(rows) == {"efficientnet_lite0", "u2netp"}
    assert rows["u2netp"]["sha256"] == U2NETP.sha256 == models.file_sha256(home / "u2netp.onnx")
    assert rows["efficientnet_lite0"]["sha256"] == LITE0.sha256
    assert models.resolve_weights("u2netp") == home / "u2netp.onnx"


@pytest.mark.shared_models
def test_real_u2netp_over_http_matches_sha256_and_rembg_md5(shared_models, server, home, monkeypatch, capfd):
    server.files["/u2netp.onnx"] = (shared_models / "u2netp.onnx").read_bytes()
    monkeypatch.setenv(fetch.MIRROR_ENV, server.url)
    assert main(["models", "fetch", "u2netp"]) == 0
    assert models.file_sha256(home / "u2netp.onnx") == U2NETP.sha256
    assert hashlib.md5((home / "u2netp.onnx").read_bytes()).hexdigest() == U2NETP.url_md5


# ---------------------------------------------------------------------------- the Lite0 conversion


def lite_like_tflite(pooling: str = "avg_pool", size: int = 224, dim: int = 1280, classes: int = 10) -> bytes:
    """EfficientNet-Lite's structure in miniature, exported the way the release's fp32 file was
    (a TF graph with an `images` input and a softmax output): conv stem with ReLU6, a depthwise +
    1x1 block with a residual add, a 1x1 head to `dim` channels, pooling, a classifier layer with
    bias, softmax. `pooling`: "avg_pool" (a VALID average pool over the whole map, then a squeeze:
    what the release's `local_pooling=True` builds for TFLite) or "mean" (a global mean)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def weight(*shape):
        return tf.constant(rng.normal(0, 0.3, shape).astype(np.float32))

    stem, depthwise, project, head = weight(3, 3, 3, 8), weight(3, 3, 8, 1), weight(1, 1, 8, 8), weight(1, 1, 8, dim)
    fc, bias = weight(dim, classes), weight(classes)

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="images")])
    def model(x):
        x = tf.nn.relu6(tf.nn.conv2d(x, stem, 8, "SAME"))
        y = tf.nn.relu6(tf.nn.depthwise_conv2d(x, depthwise, [1, 1, 1, 1], "SAME"))
        x = x + tf.nn.conv2d(y, project, 1, "SAME")
        x = tf.nn.relu6(tf.nn.conv2d(x, head, 1, "SAME"))
        if pooling == "avg_pool":
            side = x.shape[1]
            pooled = tf.squeeze(tf.nn.avg_pool(x, [1, side, side, 1], [1, 1, 1, 1], "VALID"), [1, 2])
        else:
            pooled = tf.reduce_mean(x, [1, 2])
        return tf.nn.softmax(tf.matmul(pooled, fc) + bias)

    return tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lite_archive() -> tuple[bytes, bytes]:
    tflite = lite_like_tflite("avg_pool")
    return tflite, tar_gz({LITE0.archive_member: tflite, "efficientnet-lite0/model.ckpt.index": b"x"})


def archive_name() -> str:
    return Path(LITE0.url).name


@pytest.mark.slow
def test_lite0_is_built_from_the_release_and_checked(lite_archive, server, home, monkeypatch, capfd, tmp_path):
    tflite, archive = lite_archive
    server.files[f"/{archive_name()}"] = archive
    monkeypatch.setenv(fetch.MIRROR_ENV, server.url)  # serves the official file name
    assert main(["models", "fetch", "efficientnet_lite0", "--json"]) == 0
    (row,) = json.loads(capfd.readouterr().out)
    target = home / LITE0.weights_file
    assert row["action"] == "built" and row["sha256"] == models.file_sha256(target)
    record = json.loads((home / (LITE0.weights_file + fetch.RECORD)).read_text())
    assert record["sha256"] == row["sha256"] and record["source"]["url"] == LITE0.url
    assert record["source"]["member_sha256"] == hashlib.sha256(tflite).hexdigest()
    assert max(record["check"]["max_relative_diff"].values()) < record["check"]["tolerance"]
    assert not (home / archive_name()).exists()  # the archive is dropped once built

    # the interface of the reference file, and csearch's extractor runs it
    import onnx

    graph = onnx.load(str(target)).graph
    assert [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input] == [
        ("input", [1, 3, 224, 224])
    ]
    assert [o.name for o in graph.output] == ["features", "logits"]
    extractor = models.load_extractor("efficientnet_lite0")
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    assert extractor(images).shape == (2, 1280)

    # the built file counts as present (by its record), and a mirror of it is accepted by its record
    assert main(["models", "fetch", "efficientnet_lite0"]) == 0 and "present" in capfd.readouterr().out
    other = tmp_path / "other"
    monkeypatch.setenv("CSEARCH_HOME", str(other))
    assert main(["models", "fetch", "efficientnet_lite0", "--from", str(home)]) == 0
    assert models.file_sha256(other / LITE0.weights_file) == row["sha256"]
    (home / (LITE0.weights_file + fetch.RECORD)).unlink()  # without its record a built file is refused
    assert main(["models", "fetch", "efficientnet_lite0", "--from", str(home), "--force"]) == 2
    assert "neither the reference file" in one_error(capfd)


@pytest.mark.slow
def test_conversion_checks_pooled_features_against_tflite(tmp_path):
    """The check itself, on the global-mean variant: a converted graph whose features are wrong
    fails it."""
    from csearch import errors
    from csearch.models import convert

    tflite = lite_like_tflite("mean")
    archive = tar_gz({LITE0.archive_member: tflite})
    (tmp_path / "a.tar.gz").write_bytes(archive)
    built = convert.convert(LITE0, tmp_path / "a.tar.gz")
    interpreter = convert.tflite_interpreter(tflite)
    layer = convert.classifier_layer(interpreter)
    assert convert.check_outputs(built.data, interpreter, layer, LITE0)[convert.FEATURES] < 1e-5
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(built.data)  # the same graph with the head's weights off by 1 %
    head = max(model.graph.initializer, key=lambda t: np.prod(t.dims) if len(t.dims) == 4 else 0)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.01, head.name))
    with pytest.raises(errors.ModelMismatch, match="converted model's features differ from the TFLite model's"):
        convert.check_outputs(model.SerializeToString(), interpreter, layer, LITE0)


def test_archive_without_the_tflite_file_is_one_line_and_kept(server, home, monkeypatch, capfd):
    server.files[f"/{archive_name()}"] = tar_gz({"efficientnet-lite0/other.tflite": b"x"})
    monkeypatch.setenv(fetch.MIRROR_ENV, server.url)
    assert main(["models", "fetch", "efficientnet_lite0"]) == 2
    line = one_error(capfd)
    assert "building efficientnet_lite0_imagenet.onnx" in line and "other.tflite" in line
    assert (home / archive_name()).is_file() and not (home / LITE0.weights_file).exists()
