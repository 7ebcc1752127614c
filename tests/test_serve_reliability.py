"""The service under bad input, concurrent writers and SIGKILL (issue 5, part 3)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serve import (
    REPO_ROOT,
    build_tiny_index,
    catalogue_images,
    encode,
    free_port,
    new_product_image,
    open_engine,
    search,
    serve_in_thread,
)

LIMIT = 1_000_000  # the upload limit the bad-input app runs with


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def solid_png(width: int, height: int) -> bytes:
    """A real one-colour RGB PNG, streamed row by row: 50 MP compresses to ~150 KB, and making
    it never holds the 150 MB of pixels."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes(3 * width)  # filter byte + black pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture(scope="module")
def good_photo(index_dir) -> tuple[bytes, str]:
    path, _, product = catalogue_images(index_dir)[4]
    return path.read_bytes(), product


@pytest.fixture(scope="module")
def client(index_dir):
    from csearch.serve import create_app

    with TestClient(
        create_app(open_engine(index_dir), workers=1, max_upload_bytes=LIMIT), raise_server_exceptions=False
    ) as test_client:
        yield test_client


def truncated_jpeg() -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(image, "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_FILES = {
    "not an image": (lambda: b"hello, this is text", 422, "not an image"),
    "truncated jpeg": (truncated_jpeg, 422, "truncated"),
    "zero bytes": (lambda: b"", 422, "empty"),
    "50 megapixels": (lambda: solid_png(8000, 6250), 422, "too large"),
    "tiny image": (lambda: encode(np.zeros((4, 4, 3), np.uint8)), 422, "too small"),
    "over the size limit": (lambda: bytes(LIMIT + 1), 413, "too large"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_upload_is_a_4xx_json_naming_the_problem_and_serving_goes_on(client, good_photo, case):
    make, status, words = BAD_FILES[case]
    response = client.post("/search", files={"file": ("photo.jpg", make(), "image/jpeg")})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert "/" not in response.json()["error"].split(":")[0]  # names the field, not a server path
    added = client.post(
        "/items", files={"file": ("photo.jpg", make(), "image/jpeg")}, data={"product": "p", "category": "c"}
    )
    assert added.status_code == status and words in added.json()["error"]
    data, product = good_photo
    assert search(client, data, k=1).json()["results"][0]["product"] == product


@pytest.mark.parametrize(
    "k, words",
    [
        ("0", "greater than or equal to 1"),
        ("-1", "greater than or equal to 1"),
        (str(10**9), "less than or equal to 100"),
        ("abc", "valid integer"),
        ("1.5", "valid integer"),
        ("", None),
    ],
)
def test_bad_k_is_422_naming_k(client, good_photo, k, words):
    response = search(client, good_photo[0], k=k)
    if words is None:  # an empty form field is the default, as browsers send it
        assert response.status_code == 200
        return
    assert response.status_code == 422
    assert response.json()["error"].startswith("k:") and words in response.json()["error"]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"restrict": "maybe"}, "restrict:"),
        ({"rerank_top": "0"}, "rerank_top:"),
        ({"category": "x" * 300}, "category:"),
    ],
)
def test_bad_switches_are_422(client, good_photo, fields, words):
    response = search(client, good_photo[0], **fields)
    assert response.status_code == 422 and words in response.json()["error"]


def test_missing_fields_and_wrong_content_types(client, good_photo):
    data = good_photo[0]
    missing = client.post("/search", files={"photo": ("a.png", data, "image/png")})
    assert missing.status_code == 422 and missing.json()["error"].startswith("file:")
    as_text = client.post("/search", files={"k": (None, "3")}, data={"file": "not a file"})
    assert as_text.status_code == 422 and "file" in as_text.json()["error"]
    for kwargs in (
        {"json": {"file": "x"}},
        {"content": data, "headers": {"content-type": "image/png"}},
        {"data": {"k": "3"}},
        {"content": b""},
    ):
        response = client.post("/search", **kwargs)
        assert response.status_code == 415, response.text
        assert "multipart/form-data" in response.json()["error"]
    no_product = client.post("/items", files={"file": ("a.png", data, "image/png")}, data={"category": "c"})
    assert no_product.status_code == 422 and no_product.json()["error"].startswith("product:")
    broken = client.post("/search", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert 400 <= broken.status_code < 500 and broken.json()["error"]
    assert client.get("/search").status_code == 405
    assert client.get("/no-such-page").status_code == 404
    assert search(client, data, k=1).status_code == 200


def test_a_declared_part_type_is_not_trusted(client, good_photo):
    """The image is sniffed from its bytes; the client's file name and type are ignored."""
    data, product = good_photo
    response = client.post("/search", files={"file": ("notes.txt", data, "text/plain")}, data={"k": "1"})
    assert response.status_code == 200 and response.json()["results"][0]["product"] == product


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_searches_while_items_are_added_and_removed(tmp_path):
    """8 clients x 50 searches on a real server, while a writer adds and removes items."""
    from csearch.serve import create_app
    from csearch.store import IndexStore

    index_dir = build_tiny_index(tmp_path / "tiny")
    queries = [(p.read_bytes(), product) for p, _, product in catalogue_images(index_dir)]
    failures, added_alive, writer_ops = [], {}, []
    done = threading.Event()

    def searcher(number: int, base: str):
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(50):
                data, product = queries[(number * 50 + i) % len(queries)]
                response = http.post("/search", files={"file": ("q.png", data, "image/png")}, data={"k": "3"})
                if response.status_code != 200:
                    failures.append(f"search {response.status_code}: {response.text}")
                elif response.json()["results"][0]["product"] != product:
                    failures.append(f"wrong answer {response.json()['results'][0]} for {product}")

    def writer(base: str):
        with httpx.Client(base_url=base, timeout=60) as http:
            seed = 0
            while not done.is_set() or seed < 6:
                seed += 1
                data = new_product_image(seed=seed)
                response = http.post(
                    "/items",
                    files={"file": ("n.png", data, "image/png")},
                    data={"product": f"new-{seed}", "category": "new"},
                )
                if response.status_code != 201:
                    failures.append(f"add {response.status_code}: {response.text}")
                    continue
                item_id = response.json()["id"]
                top = search(http, data, k=1).json()["results"][0]
                if top["product"] != f"new-{seed}":
                    failures.append(f"added item {item_id} not visible to the next search: {top}")
                added_alive[item_id] = data
                writer_ops.append("add")
                if seed % 2 == 0:
                    victim = min(added_alive)
                    if http.delete(f"/items/{victim}").status_code != 200:
                        failures.append(f"remove {victim} failed")
                    del added_alive[victim]
                    writer_ops.append("remove")

    app = create_app(open_engine(index_dir), workers=2)
    with serve_in_thread(app) as base:
        threads = [threading.Thread(target=searcher, args=(n, base)) for n in range(8)]
        write_thread = threading.Thread(target=writer, args=(base,))
        for thread in threads + [write_thread]:
            thread.start()
        for thread in threads:
            thread.join(300)
        done.set()
        write_thread.join(120)
        stats = httpx.get(f"{base}/stats").json()

    assert not failures, failures[:5]
    assert writer_ops.count("add") >= 6 and writer_ops.count("remove") >= 3
    assert app.state.service.counts["search"] >= 8 * 50
    # the index on disk is whole: a fresh reader sees exactly the surviving items
    store = IndexStore.open(index_dir).snapshot
    assert len(store) == 12 + len(added_alive) == stats["items"]
    assert np.all(np.diff(store.ids) > 0)
    assert set(added_alive) <= {int(i) for i in store.ids}
    assert all(Path(p).is_file() for p in store.paths)
    uploads = sorted(p.name for p in (index_dir / "uploads").iterdir())
    assert len(uploads) == len(added_alive)  # removed items' uploads were deleted, none leaked
    engine = open_engine(index_dir)
    for data in added_alive.values():
        assert engine.query(data, k=1).hits[0].id in added_alive


# ----------------------------------------------------------------------------- SIGKILL


def spawn_server(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CSEARCH_API_KEY", None)  # loopback without a key: writes open, as these tests expect
    return subprocess.Popen(
        [sys.executable, "-m", "csearch", "serve", str(index_dir), "--port", str(port), "--workers", "1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_healthy(base: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early:\n{log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy after {timeout} s:\n{log.read_text()[-2000:]}")


def cli_query(index_dir: Path, image: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "csearch", "query", str(index_dir), str(image), "-k", "1", "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_sigkill_right_after_an_acknowledged_add_loses_nothing(tmp_path):
    index_dir = build_tiny_index(tmp_path / "tiny")
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    server = spawn_server(index_dir, port, log)
    try:
        wait_healthy(base, server, log)
        data = new_product_image(seed=42)
        response = httpx.post(
            f"{base}/items",
            files={"file": ("n.png", data, "image/png")},
            data={"product": "survivor", "category": "new"},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        item_id = response.json()["id"]
        # a second add in flight when the process dies: whatever happens to it, the index stays whole
        in_flight = threading.Thread(target=lambda: _post_quietly(base, new_product_image(seed=43)))
        in_flight.start()
        time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        in_flight.join(30)
    finally:
        if server.poll() is None:
            server.kill()

    query = tmp_path / "query.png"
    query.write_bytes(data)
    result = cli_query(index_dir, query)  # also proves no stale lock blocks a reader
    assert result["results"][0]["id"] == item_id and result["results"][0]["product"] == "survivor"

    server = spawn_server(index_dir, port, log)
    try:
        wait_healthy(base, server, log)
        item = httpx.get(f"{base}/items/{item_id}").json()
        assert item["product"] == "survivor"
        assert httpx.get(f"{base}{item['image_url']}").content == data
        top = httpx.post(f"{base}/search", files={"file": ("q.png", data, "image/png")}, data={"k": "1"}).json()
        assert top["results"][0]["id"] == item_id
        # the restarted server can still write (the killed one's lock died with it)
        again = httpx.post(
            f"{base}/items",
            files={"file": ("n.png", new_product_image(seed=44), "image/png")},
            data={"product": "after", "category": "new"},
            timeout=60,
        )
        assert again.status_code == 201
    finally:
        server.terminate()
        server.wait(30)


def _post_quietly(base: str, data: bytes) -> None:
    with contextlib.suppress(httpx.TransportError):  # the server was killed mid-request: expected
        httpx.post(
            f"{base}/items",
            files={"file": ("n.png", data, "image/png")},
            data={"product": "in-flight", "category": "new"},
            timeout=30,
        )
