"""The HTTP API on a real tiny engine: classical localizer (no weights) and a tiny ONNX
extractor, indexed by `build_index` from the synthetic catalogue. Helpers here are shared with
test_serve_reliability.py and test_serve_browser.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import onnx
import pytest
from conftest import REPO as REPO_ROOT  # noqa: F401 - shared with the other test_serve modules
from conftest import draw_object, write_catalogue
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from PIL import Image

TINY_SIZE = 32  # extractor input side: 8x8 average pooling -> 3 x 4 x 4 = 48-d colour layout


# ----------------------------------------------------------------------------- shared helpers


def tiny_extractor(path: Path, size: int = TINY_SIZE) -> Path:
    """An extractor in the format `csearch export` writes: NCHW float RGB -> pooled features."""
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_extractor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3 * (size // 8) ** 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    for key, value in {"csearch.role": "extractor", "csearch.layout": "nchw", "csearch.preprocessing": "raw"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_tiny_index(root: Path, **search) -> Path:
    """root/catalogue (2 categories x 2 products x 3 images), root/index; returns the index."""
    from csearch.config import load_config
    from csearch.data import read_catalogue
    from csearch.pipeline import build_index

    root.mkdir(parents=True, exist_ok=True)
    catalogue = write_catalogue(root / "catalogue")
    overrides = {
        "localize.method": "classical",
        "localize.matting": "none",
        "embed.weights": "none",
        "embed.extractor": str(tiny_extractor(root / "extractor.onnx")),
        "preprocess.image_size": TINY_SIZE,
        **{f"search.{k}": v for k, v in search.items()},
    }
    build_index(read_catalogue(catalogue), load_config(None, overrides), root / "index", workers=1)
    return root / "index"


def catalogue_images(index_dir: Path) -> list[tuple[Path, str, str]]:
    """(path, category, product) of every catalogue image next to a tiny index."""
    root = index_dir.parent / "catalogue"
    return [(p, p.parts[-3], p.parts[-2]) for p in sorted(root.glob("*/*/*.png"))]


def encode(image: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **options)
    return buffer.getvalue()


def new_product_image(seed: int = 0, size=(64, 64)) -> bytes:
    """A product unlike any in the tiny catalogue (whose colours stay below 200 per channel),
    and unlike the one of any other seed below 200."""
    image, _ = draw_object(size, shape="ellipse", color=(255, (seed * 29) % 200, 255), noise=2.0, seed=seed)
    return encode(image)


def decode_data_url(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app):
    """Run `app` under a real uvicorn server on 127.0.0.1; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def open_engine(index_dir: Path):
    from csearch.pipeline import Engine

    return Engine.open(index_dir)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def client(tiny_index):
    """Read-only tests share one app (and never change its index)."""
    from csearch.serve import create_app

    with TestClient(create_app(open_engine(tiny_index), workers=2)) as test_client:
        yield test_client


@pytest.fixture
def writable_index(tiny_index, tmp_path) -> Path:
    """A private copy of the tiny index, for tests that add and remove."""
    return Path(shutil.copytree(tiny_index, tmp_path / "index"))


@pytest.fixture
def writable_client(writable_index):
    from csearch.serve import create_app

    with TestClient(create_app(open_engine(writable_index), workers=1)) as test_client:
        yield test_client


def search(client, data: bytes, **fields):
    return client.post(
        "/search", files={"file": ("photo.png", data, "image/png")}, data={k: str(v) for k, v in fields.items()}
    )


# ----------------------------------------------------------------------------- search


def test_search_answers_the_cli_fields_with_urls_not_paths(client, tiny_index):
    path, category, product = catalogue_images(tiny_index)[7]
    response = search(client, path.read_bytes(), k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = open_engine(tiny_index).query(str(path), k=4).to_dict()
    assert body["category"] == expected["category"]
    assert [r["id"] for r in body["results"]] == [r["id"] for r in expected["results"]]
    for got, want in zip(body["results"], expected["results"]):
        assert {"id", "product", "category", "distance", "iou", "score", "image_url"} <= got.keys()
        assert "path" not in got
        assert got["image_url"] == f"/items/{want['id']}/image"
        assert got["distance"] == pytest.approx(want["distance"], abs=1e-6)
        assert (got["product"], got["category"]) == (want["product"], want["category"])
    assert body["results"][0]["product"] == product
    assert str(tiny_index.parent) not in response.text  # no server path leaks
    assert {"localize", "embed", "search", "total", "queue"} <= body["timings_ms"].keys()


def test_search_switches_k_category_and_rerank(client, tiny_index):
    path, category, _ = catalogue_images(tiny_index)[0]
    data = path.read_bytes()
    assert len(search(client, data, k=2).json()["results"]) == 2
    other = "jar" if category == "bottle" else "bottle"
    restricted = search(client, data, k=5, category=other).json()
    assert restricted["category"] == other
    assert {r["category"] for r in restricted["results"]} == {other}
    reranked = search(client, data, k=3, rerank="iou").json()["results"]
    assert all(r["iou"] is not None and 0 <= r["iou"] <= 1 for r in reranked)
    assert all(r["iou"] is None for r in search(client, data, k=3, rerank="none").json()["results"])


def test_search_rejects_unknown_category_and_rerank_naming_the_valid_ones(client, tiny_index):
    data = catalogue_images(tiny_index)[0][0].read_bytes()
    response = search(client, data, category="jars")
    assert response.status_code == 422
    assert "jars" in response.json()["error"] and "jar" in response.json()["error"]
    response = search(client, data, rerank="iuo")
    assert response.status_code == 422 and "iou" in response.json()["error"]


def test_search_visuals_are_the_cutout_and_the_compared_mask(client, tiny_index):
    data = catalogue_images(tiny_index)[3][0].read_bytes()
    body = search(client, data, visuals="true").json()
    cutout = decode_data_url(body["cutout"])
    assert cutout.format == "JPEG" and max(cutout.size) <= 320
    mask = decode_data_url(body["query_mask"])
    assert mask.size == (64, 64) and mask.mode == "RGBA"
    alpha = np.asarray(mask)[:, :, 3] > 0
    assert 0 < alpha.mean() < 1  # the object, not the whole frame
    assert body["localizer"] == "classical"
    assert "cutout" not in search(client, data).json() or search(client, data).json()["cutout"] is None


# ----------------------------------------------------------------------------- items


def test_item_image_thumbnail_and_mask_by_id(client, tiny_index):
    path, category, product = catalogue_images(tiny_index)[0]
    hit = search(client, path.read_bytes(), k=1).json()["results"][0]
    image = client.get(hit["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    served_path = Path(open_engine(tiny_index).store.snapshot.item(hit["id"])["path"])
    assert image.content == served_path.read_bytes()
    thumb = client.get(hit["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    mask = Image.open(io.BytesIO(client.get(hit["mask_url"]).content))
    assert mask.size == (64, 64)
    item = client.get(f"/items/{hit['id']}").json()
    assert (item["product"], item["category"]) == (product, category)


@pytest.mark.parametrize("suffix", ["", "/image", "/thumbnail", "/mask"])
@pytest.mark.parametrize(
    "bad_id, status",
    [("999999", 404), ("abc", 422), ("-1", 422), ("1.5", 422), (str(10**30), 422), ("..%2F..%2Fetc%2Fpasswd", 404)],
)
def test_malformed_or_unknown_ids_are_4xx_json(client, bad_id, status, suffix):
    response = client.get(f"/items/{bad_id}{suffix}")
    assert response.status_code in (status, 404), response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]


def test_add_then_search_then_remove_is_durable_and_immediate(writable_client, writable_index):
    data = new_product_image(seed=1)
    response = writable_client.post(
        "/items", files={"file": ("x.png", data, "image/png")}, data={"product": "magenta-ball", "category": "ball"}
    )
    assert response.status_code == 201, response.text
    added = response.json()
    assert added["product"] == "magenta-ball" and response.headers["location"] == f"/items/{added['id']}"
    stored = list((writable_index / "uploads").glob("*.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == data
    # visible to the next search, and durable: a fresh engine (another reader) sees it
    assert search(writable_client, data, k=1).json()["results"][0]["id"] == added["id"]
    assert open_engine(writable_index).query(data, k=1).hits[0].id == added["id"]
    assert writable_client.get(added["image_url"]).content == data
    assert "ball" in writable_client.get("/stats").json()["categories"]

    removed = writable_client.delete(f"/items/{added['id']}")
    assert removed.status_code == 200 and removed.json()["removed"] is True
    assert all(r["id"] != added["id"] for r in search(writable_client, data, k=20).json()["results"])
    assert added["id"] not in open_engine(writable_index).store.snapshot.ids
    assert writable_client.get(added["image_url"]).status_code == 404
    assert writable_client.delete(f"/items/{added['id']}").status_code == 404
    assert not list((writable_index / "uploads").glob("*.png"))  # the service's own copy is gone


def test_removing_a_catalogue_item_keeps_the_users_file(writable_client, tiny_index):
    path, _, _ = catalogue_images(tiny_index)[0]
    item_id = search(writable_client, path.read_bytes(), k=1).json()["results"][0]["id"]
    assert writable_client.delete(f"/items/{item_id}").status_code == 200
    assert path.is_file()


def test_add_validates_before_touching_the_disk(writable_client, writable_index):
    response = writable_client.post(
        "/items", files={"file": ("x.png", b"not an image", "image/png")}, data={"product": "p", "category": "c"}
    )
    assert response.status_code == 422 and "not an image" in response.json()["error"]
    response = writable_client.post(
        "/items", files={"file": ("x.png", new_product_image(), "image/png")}, data={"product": "  ", "category": "c"}
    )
    assert response.status_code == 422 and "product" in response.json()["error"]
    assert not list((writable_index / "uploads").glob("*")) if (writable_index / "uploads").exists() else True
    assert writable_client.get("/health").json()["items"] == 12


# ----------------------------------------------------------------------------- info and page


def test_health_stats_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["classifier"] is False and health["writes"] == "open"  # no key, not read-only
    stats = client.get("/stats").json()
    assert stats["items"] == 12
    assert stats["categories"] == {"bottle": 6, "jar": 6}
    assert stats["products"] == 4
    assert stats["models"]["localizer"] == "classical"
    assert stats["models"]["extractor"] == "extractor.onnx"
    assert [f["name"] for f in stats["models"]["files"]] == ["extractor.onnx"]
    assert stats["index"]["bytes"] > 0
    assert stats["service"]["workers"] == 2
    spec = client.get("/openapi.json").json()
    routes = {"/search", "/items", "/items/{item_id}", "/items/{item_id}/image", "/health", "/stats"}
    assert routes <= spec["paths"].keys()
    assert "multipart/form-data" in spec["paths"]["/search"]["post"]["requestBody"]["content"]
    # the two writes document the key (either header) and their 401/403; reads need nothing
    for path, method in (("/items", "post"), ("/items/{item_id}", "delete")):
        operation = spec["paths"][path][method]
        assert {name for need in operation["security"] for name in need} == {"HTTPBearer", "APIKeyHeader"}
        assert {"401", "403"} <= operation["responses"].keys()
    assert "security" not in spec["paths"]["/search"]["post"]
    assert "security" not in spec["paths"]["/items/{item_id}"]["get"]


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../__init__.py").status_code == 404
    favicon = client.get("/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon" href="/static/favicon.svg"' in page.text


def test_docs_are_served_without_a_cdn(client):
    """FastAPI's Swagger UI loads from a CDN (a blank page offline): /docs is the package's own
    page over /openapi.json (rendered in the browser test), and no static file names another host."""
    from csearch.serve.app import STATIC_DIR

    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in docs.headers["content-security-policy"]
    assert '<script src="/static/docs.js"' in docs.text
    assert client.get("/static/docs.js").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc also needs a CDN: not offered
    for path in STATIC_DIR.iterdir():
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # an XML namespace, never fetched


# ----------------------------------------------------------------------------- workers and overload


class GatedLocalizer:
    """Wraps a localizer so a test decides when each call may finish."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate = inner, gate
        self.name, self.files = inner.name, inner.files
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        assert self.gate.wait(30), "test gate never opened"
        return self.inner(image)


def gated_engine(index_dir: Path, gate: threading.Event):
    from csearch.pipeline import Engine, Models

    engine = open_engine(index_dir)
    models = Models(GatedLocalizer(engine.models.localizer, gate), engine.models.extractor)
    return Engine(engine.store, engine.config, models)


def test_overload_queues_up_to_the_limit_then_503(tiny_index):
    from csearch.serve import create_app

    gate = threading.Event()
    app = create_app(gated_engine(tiny_index, gate), workers=1, queue_limit=2)
    data = catalogue_images(tiny_index)[0][0].read_bytes()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

            def one():
                return http.post("/search", files={"file": ("q.png", data, "image/png")})

            waiting = [asyncio.ensure_future(one()) for _ in range(3)]  # 1 running + 2 queued
            while app.state.service.pool.in_use < 3:
                await asyncio.sleep(0.01)
            refused = await one()
            health = await http.get("/health")  # cheap routes never wait for the pool
            gate.set()
            return refused, health, await asyncio.gather(*waiting)

    refused, health, served = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]
    assert health.status_code == 200 and health.json()["in_progress"] == 3
    assert [r.status_code for r in served] == [200, 200, 200]
    assert app.state.service.pool.in_use == 0  # every slot came back
    assert app.state.service.pool.rejected == 1


def test_pool_runs_jobs_first_in_first_out():
    from csearch.serve.pool import WorkerPool

    pool = WorkerPool(engines=[object()], queue_limit=20)
    order = []

    async def scenario():
        gate = threading.Event()

        async def submit(number):
            with pool.admit() as slot:
                await pool.run(slot, lambda engine, n: (gate.wait(5), order.append(n)), number)

        tasks = []
        for number in range(10):
            tasks.append(asyncio.ensure_future(submit(number)))
            await asyncio.sleep(0)  # each submits before the next
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    pool.shutdown()
    assert order == list(range(10))


def test_each_worker_owns_its_models(tiny_index):
    from csearch.pipeline import load_models
    from csearch.serve import create_app

    engine = open_engine(tiny_index)
    made = []

    def factory():
        made.append(load_models(engine.config))
        return made[-1]

    app = create_app(engine, workers=3, model_factory=factory)
    engines = app.state.service.pool.engines
    assert len(made) == 2  # the opened engine's models serve the first worker
    assert len({id(e.models.localizer) for e in engines}) == 3
    assert len({id(e.models.extractor) for e in engines}) == 3
    assert len({id(e.store) for e in engines}) == 1  # one shared index


def test_upload_limit_by_declared_length_and_by_streamed_bytes(tiny_index):
    """The whole body counts, whatever part carries the bytes, and it is refused as it streams."""
    from csearch.serve import create_app
    from csearch.serve.limits import FORM_OVERHEAD

    limit = 200_000
    app = create_app(open_engine(tiny_index), workers=1, max_upload_bytes=limit)
    photo = catalogue_images(tiny_index)[0][0].read_bytes()
    padding = bytes(limit + FORM_OVERHEAD)
    with TestClient(app) as http:
        big_file = http.post("/search", files={"file": ("big.png", bytes(limit + 1), "image/png")})
        assert big_file.status_code == 413 and "too large" in big_file.json()["error"]
        declared = http.post(
            "/search",
            files={"file": ("a.png", photo, "image/png"), "padding": ("pad.bin", padding, "application/octet-stream")},
        )
        assert declared.status_code == 413 and declared.json()["type"] == "too_large"

        def chunks():  # no Content-Length: the limit must trip while the body streams in
            yield (
                b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + photo + b"\r\n"
            )
            yield b'--x\r\nContent-Disposition: form-data; name="padding"; filename="p"\r\n\r\n'
            for start in range(0, len(padding), FORM_OVERHEAD):
                yield padding[start : start + FORM_OVERHEAD]
            yield b"\r\n--x--\r\n"

        streamed = http.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413 and streamed.json()["type"] == "too_large"
        small = b"".join(list(chunks())[:1]) + b"--x--\r\n"  # the same form without padding is served
        ok = http.post("/search", content=iter([small]), headers={"content-type": "multipart/form-data; boundary=x"})
        assert ok.status_code == 200, ok.text


def test_changes_by_another_process_are_seen(writable_client, writable_index, tiny_index):
    """A writer elsewhere (here a second IndexStore, as `csearch remove` would open) commits;
    the server's next request sees it through store.refresh()."""
    from csearch.store import IndexStore

    path, _, _ = catalogue_images(tiny_index)[0]
    data = path.read_bytes()
    first = search(writable_client, data, k=1).json()["results"][0]["id"]
    IndexStore.open(writable_index).remove([first])
    assert writable_client.get(f"/items/{first}").status_code == 404
    assert all(r["id"] != first for r in search(writable_client, data, k=20).json()["results"])
    assert writable_client.get("/health").json()["items"] == 11


def test_parameters_in_the_url_are_refused_not_ignored(client, tiny_index):
    data = catalogue_images(tiny_index)[0][0].read_bytes()
    response = client.post("/search?k=3", files={"file": ("q.png", data, "image/png")})
    assert response.status_code == 422 and response.json()["error"].startswith("k:")


def test_a_search_reads_every_column_from_one_snapshot(tiny_index):
    """Columns read separately could straddle a concurrent commit: the workers share one store
    and rely on `Engine.search` reading a single snapshot per query."""
    from csearch.pipeline import Engine

    engine = open_engine(tiny_index)

    class OnlySnapshots:
        def __init__(self):
            self.taken = 0

        @property
        def snapshot(self):
            self.taken += 1
            return engine.store.snapshot

        def __getattr__(self, name):
            raise AssertionError(f"search read store.{name} outside a snapshot")

    store = OnlySnapshots()
    path = catalogue_images(tiny_index)[5][0]
    result = Engine(store, engine.config, engine.models).query(str(path), k=3, rerank="iou")
    assert store.taken == 1
    assert [h.id for h in result.hits] == [h.id for h in engine.query(str(path), k=3, rerank="iou").hits]


class AlwaysJar:
    """A stand-in category classifier (the classify stage has its own tests): always 'jar'."""

    image_size, color, files = 32, "rgb", []

    def predict_top(self, images, n=1):
        from csearch.types import Prediction

        return [Prediction("jar", 0.9, (("jar", 0.9), ("bottle", 0.1))[:n]) for _ in images]


def test_predicted_category_restricts_unless_switched_off(tiny_index):
    from csearch.pipeline import Engine, Models
    from csearch.serve import create_app

    opened = open_engine(tiny_index)
    models = Models(opened.models.localizer, opened.models.extractor, AlwaysJar())
    app = create_app(Engine(opened.store, opened.config, models), workers=1)
    bottle = next(p for p, category, _ in catalogue_images(tiny_index) if category == "bottle")
    with TestClient(app) as http:
        assert http.get("/health").json()["classifier"] is True  # the page then offers "predicted"
        restricted = search(http, bottle.read_bytes(), k=5).json()
        assert restricted["category"] == "jar"
        assert {r["category"] for r in restricted["results"]} == {"jar"}
        everywhere = search(http, bottle.read_bytes(), k=5, restrict="false").json()
        assert everywhere["results"][0]["category"] == "bottle"


# ----------------------------------------------------------------------------- write access

KEY = "k3y-For-Tests_0123456789"


def add_item(http, headers=None, data: Optional[bytes] = None):
    return http.post(
        "/items",
        files={"file": ("x.png", data or new_product_image(seed=7), "image/png")},
        data={"product": "guarded", "category": "ball"},
        headers=headers or {},
    )


def test_writes_need_the_api_key_reads_stay_open(writable_index, tiny_index):
    from csearch.serve import create_app
    from csearch.serve.limits import DEFAULT_MAX_UPLOAD_BYTES

    photo = catalogue_images(tiny_index)[0][0].read_bytes()
    with TestClient(create_app(open_engine(writable_index), workers=1, api_key=KEY)) as http:
        assert http.get("/health").json()["writes"] == "api_key"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}):
            refused = add_item(http, headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.json()["type"] == "unauthorized" and "API key" in refused.json()["error"]
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert http.delete("/items/0", headers=headers).status_code == 401
        # refused before the body is read: an unauthorised oversized upload is 401, not 413
        assert add_item(http, data=bytes(DEFAULT_MAX_UPLOAD_BYTES + 1)).status_code == 401
        assert http.get("/health").json()["items"] == 12 and not (writable_index / "uploads").exists()

        added = add_item(http, {"Authorization": f"Bearer {KEY}"})
        assert added.status_code == 201, added.text
        assert http.delete(f"/items/{added.json()['id']}", headers={"X-API-Key": KEY}).status_code == 200
        # reads need no key
        assert search(http, photo, k=1).status_code == 200
        assert http.get("/items/0").status_code == 200 and http.get("/items/0/thumbnail").status_code == 200
        assert http.get("/stats").status_code == 200 and http.get("/openapi.json").status_code == 200


def test_read_only_refuses_every_write_with_403(writable_index, tiny_index):
    from csearch.serve import create_app

    with TestClient(create_app(open_engine(writable_index), workers=1, api_key=KEY, read_only=True)) as http:
        assert http.get("/health").json()["writes"] == "read_only"
        for response in (add_item(http, {"X-API-Key": KEY}), http.delete("/items/0", headers={"X-API-Key": KEY})):
            assert response.status_code == 403 and response.json()["type"] == "read_only"
            assert "read-only" in response.json()["error"]
        assert search(http, catalogue_images(tiny_index)[0][0].read_bytes(), k=1).status_code == 200
    assert len(open_engine(writable_index).store.snapshot) == 12


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    from csearch.errors import ConfigError
    from csearch.serve.auth import API_KEY_ENV, is_loopback, load_api_key

    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    assert load_api_key(None, {}) is None
    assert load_api_key(None, {API_KEY_ENV: f"{KEY}\n"}) == KEY
    assert load_api_key(str(key_file), {}) == KEY
    assert load_api_key(str(key_file), {API_KEY_ENV: "other"}) == KEY  # the flag wins over the environment
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text("two words")
    bad = [
        (str(tmp_path / "empty"), {}, "empty"),
        (str(tmp_path / "missing"), {}, "cannot read"),
        (str(tmp_path), {}, "cannot read"),  # a folder
        (str(tmp_path / "spaced"), {}, "printable ASCII"),
        (None, {API_KEY_ENV: " "}, "empty"),
    ]
    for key_file_arg, environ, message in bad:
        with pytest.raises(ConfigError, match=message) as caught:
            load_api_key(key_file_arg, environ)
        assert "\n" not in str(caught.value)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com", ""))


@pytest.fixture
def captured_server(monkeypatch):
    """`csearch serve` up to the point where it would bind: uvicorn.run records the app instead."""
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    monkeypatch.delenv("CSEARCH_API_KEY", raising=False)
    return started


def test_serve_refuses_open_writes_on_a_public_host_before_loading(captured_server, monkeypatch, capsys, tmp_path):
    from csearch.cli import main
    from csearch.pipeline import Engine

    def no_loading(*args, **kwargs):
        raise AssertionError("the index was opened before the host was checked")

    monkeypatch.setattr(Engine, "open", classmethod(no_loading))
    (tmp_path / "empty-key").write_text("")
    refusals = [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),
        (["--host", "192.168.1.20", "--port", "8123"], "CSEARCH_API_KEY"),
        (["--api-key-file", str(tmp_path / "missing")], "cannot read"),
        (["--api-key-file", str(tmp_path / "empty-key"), "--host", "0.0.0.0"], "empty"),
        (["--max-upload-mb", "0"], "MiB"),
    ]
    for flags, message in refusals:
        assert main(["serve", str(tmp_path / "index"), *flags]) == 2, flags
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("csearch: error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not captured_server  # never reached uvicorn


def test_serve_flags_reach_the_app(captured_server, writable_index, tmp_path, monkeypatch, caplog):
    from csearch.cli import main

    caplog.set_level("INFO", logger="csearch")
    assert main(["serve", str(writable_index), "--workers", "1"]) == 0  # loopback, no key: open writes, said so
    assert captured_server["host"] == "127.0.0.1" and "open to anyone on this machine" in caplog.text
    with TestClient(captured_server["app"]) as http:
        assert http.get("/health").json()["writes"] == "open"
        # open writes, but not for another web site's page (a multipart POST needs no CORS preflight)
        for origin in ("http://evil.example", "null"):
            refused = add_item(http, {"Origin": origin})
            assert refused.status_code == 403 and refused.json()["type"] == "cross_origin"
        assert add_item(http, {"Origin": "http://testserver"}).status_code == 201  # the page's own origin

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    public = ["--host", "0.0.0.0", "--workers", "1", "--max-upload-mb", "0.5"]
    assert main(["serve", str(writable_index), *public, "--api-key-file", str(key_file)]) == 0
    with TestClient(captured_server["app"]) as http:
        assert add_item(http).status_code == 401
        assert add_item(http, {"Authorization": f"Bearer {KEY}"}).status_code == 201
        assert http.get("/stats").json()["service"]["max_upload_bytes"] == 2**19  # MiB, as the help says

    monkeypatch.setenv("CSEARCH_API_KEY", "from-the-environment")
    assert main(["serve", str(writable_index), *public]) == 0
    with TestClient(captured_server["app"]) as http:
        assert add_item(http, {"X-API-Key": KEY}).status_code == 401
        assert add_item(http, {"X-API-Key": "from-the-environment"}).status_code == 201

    monkeypatch.delenv("CSEARCH_API_KEY")
    assert main(["serve", str(writable_index), *public, "--read-only"]) == 0
    with TestClient(captured_server["app"]) as http:
        assert add_item(http).status_code == 403


def test_serve_help_says_mib_and_never_takes_a_key_on_the_command_line(capsys):
    from csearch.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "upload size limit in MiB (default 10)" in text and " MB" not in text
    assert "--api-key-file" in text and "--read-only" in text and "(default 8000)" in text
    assert "--api-key " not in text and "--api-key=" not in text
