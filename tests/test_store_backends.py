"""Every store behaviour against every backend (issue 13, parts 1 and 3): the local index folder,
Milvus Lite, and a real Milvus server (the 2.3.5 binary the PyPI `milvus` package ships), which a
session fixture starts once on a free 127.0.0.1 port and SIGKILLs at the end. Plus: SIGKILL
during a Milvus-backed `csearch add`, two `csearch serve` replicas on one Milvus server, and
`csearch index --store` giving the same top-k as the local store. Weight-free models throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from csearch.config import SearchConfig
from csearch.errors import StoreError
from csearch.search import search_snapshot
from csearch.store import IndexStore, VectorSnapshot, VectorStore
from csearch.store.open import STORE_FILE, create_store, open_store, parse_store, store_uri
from tests.conftest import REPO, write_catalogue, write_tiny_extractor

SERVER_WAIT = 20.0  # seconds a replica may take to see another's write (the server's bounded staleness is 5 s)
BACKENDS = ["local", "milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)]
MILVUS = ["milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)]


# ----------------------------------------------------------------------------- the Milvus server


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """HOST:PORT of a Milvus 2.3.5 server (PyPI `milvus`), started once per test session with a
    temporary data folder on a free port; SIGTERM, then SIGKILL after 5 s (it ignores SIGTERM)."""
    from milvus import MilvusServer

    server = MilvusServer(wait_for_started=False)
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus-server")))
    server.listen_port = free_port()  # start() takes the first free port from here
    server.start()
    try:
        server.wait_started(timeout=240_000)
        yield f"127.0.0.1:{server.listen_port}"
    finally:
        process, server.server_proc = server.server_proc, None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        server.stop()  # closes its log files


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_string(backend: str, request) -> str:
    if backend == "local":
        return "local"
    if backend == "milvus-lite":
        return "milvus-lite:items.db"
    address = request.getfixturevalue("milvus_server")
    return f"milvus://{address}/t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def store_at(request, tmp_path):
    """A factory: create_store(INDEX_DIR, <this backend>, ...) -> store; closes what it made."""
    made = []

    def make(directory=None, meta=None, dim=16, mask_size=8):
        store = create_store(
            directory or tmp_path / "index", store_string(request.param, request), meta or {}, dim, mask_size
        )
        made.append(store)
        return store

    make.backend = request.param
    yield make
    for store in made:
        if hasattr(store, "close"):
            store.close()


# ----------------------------------------------------------------------------- data


def items(n: int, dim: int = 16, size: int = 8, seed: int = 0, categories=("a", "b", "c", None)) -> dict:
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, 0.5, (n, 2))
    return {
        "vectors": rng.normal(size=(n, dim)).astype(np.float32),
        "masks": rng.random((n, size, size)) > 0.5,
        "boxes": np.concatenate([x0, x0 + rng.uniform(0, 0.5, (n, 2))], axis=1).astype(np.float32),
        "paths": [f"/catalogue/{seed}/{i}.png" for i in range(n)],
        "categories": [categories[i % len(categories)] for i in range(n)],
        "products": [None if i % 5 == 0 else f"product {seed}-{i // 3} ✓" for i in range(n)],
    }


def top_ids(snapshot, vector, k: int, categories=None) -> tuple[list, np.ndarray]:
    mask = np.zeros((snapshot.mask_size, snapshot.mask_size), bool)
    ranking = search_snapshot(snapshot, vector, mask, k=k, settings=SearchConfig(), categories=categories)
    return ranking.ids.tolist(), ranking.distances


def assert_same_topk(got, expected) -> None:
    """The same ids up to distance ties within 1e-5 (issue 13's definition of the same top-k)."""
    (ids, distances), (ref_ids, ref_distances) = got, expected
    assert len(ids) == len(ref_ids)
    np.testing.assert_allclose(distances, ref_distances, atol=1e-5)
    for i, (a, b) in enumerate(zip(ids, ref_ids)):
        tied = np.abs(ref_distances - ref_distances[i]) <= 1e-5
        assert a == b or a in np.asarray(ref_ids)[tied], (i, ids, ref_ids)


# ----------------------------------------------------------------------------- every backend


def test_add_remove_and_filtered_search_match_the_local_store(store_at, tmp_path):
    store = store_at()
    assert isinstance(store, VectorStore) and isinstance(store.snapshot, VectorSnapshot)  # the protocol
    reference = IndexStore.create(tmp_path / "reference", meta={}, dim=16, mask_size=8)
    first, second = items(120, seed=1), items(80, seed=2)
    for batch in (first, second):
        ids = store.add(**batch)
        assert np.array_equal(ids, reference.add(**batch))
        assert ids.dtype == np.int64 and np.all(np.diff(ids) == 1)
    gone = [0, 7, 33, 150, 199]
    assert store.remove(gone) == reference.remove(gone) == 5
    with pytest.raises(StoreError, match="not in index"):
        store.remove([7])
    assert store.remove([7, 8], missing_ok=True) == reference.remove([7, 8], missing_ok=True) == 1

    snapshot, expected = store.snapshot, reference.snapshot
    assert len(store) == len(snapshot) == len(expected) == 194
    assert np.array_equal(snapshot.ids, expected.ids)  # iterate: live ids, ascending
    rows = np.arange(len(expected))
    assert snapshot.records(rows) == expected.records(rows)
    for column in ("ids", "vectors", "sq_norms", "masks", "boxes"):
        assert np.array_equal(snapshot.gather(column, rows[::7]), expected.gather(column, rows[::7])), column
    assert np.array_equal(snapshot.masks(rows[:5]), expected.masks(rows[:5]))
    assert snapshot.category_counts() == expected.category_counts()
    assert (snapshot.paths, snapshot.categories, snapshot.products) == (
        expected.paths,
        expected.categories,
        expected.products,
    )
    queries = np.random.default_rng(9).normal(size=(6, 16)).astype(np.float32)
    for vector in queries:
        assert_same_topk(top_ids(snapshot, vector, 10), top_ids(expected, vector, 10))
        for categories in (["a"], ["b", "c"], [None]):
            assert_same_topk(top_ids(snapshot, vector, 10, categories), top_ids(expected, vector, 10, categories))
    assert not set(gone) & set(top_ids(snapshot, queries[0], 100)[0])


def test_snapshots_never_change_and_refresh_follows_another_writer(store_at, tmp_path):
    writer = store_at(tmp_path / "index")
    writer.add(**items(10))
    reader = open_store(tmp_path / "index")  # another handle: a replica, or another process
    before = reader.snapshot
    ids = writer.add(**items(5, seed=3))
    writer.remove([0, 1])
    assert len(writer) == 13  # a writer sees its own writes at once
    assert len(before) == 10 and before.ids.tolist() == list(range(10))  # the reader's view is fixed
    deadline = time.monotonic() + SERVER_WAIT
    while not reader.refresh():  # the server's Bounded reads may lag a few seconds
        assert time.monotonic() < deadline, "the reader never saw the writer's changes"
        time.sleep(0.2)
    assert reader.snapshot.ids.tolist() == list(range(2, 10)) + ids.tolist()
    assert len(before) == 10 and before.records([0])[0]["id"] == 0  # still the old version
    assert not reader.refresh()  # nothing new: no reload
    if hasattr(reader, "close"):
        reader.close()


def test_meta_extras_and_reopening(store_at, tmp_path):
    store = store_at(tmp_path / "index", meta={"config": {"k": 5}, "complete": False}, dim=8, mask_size=16)
    rng = np.random.default_rng(4)
    features = rng.integers(0, 256, (6, 5, 7), dtype=np.uint8)
    ids = store.add(**items(6, dim=8, size=16), extras={"local_features": features})
    assert store.snapshot.extras == {"local_features": {"shape": [5, 7], "dtype": "uint8"}}
    with pytest.raises(StoreError, match="local_features"):
        store.add(**items(2, dim=8, size=16, seed=5))  # the index stores it for every item
    with pytest.raises(StoreError, match="local_features"):
        store.add(**items(2, dim=8, size=16, seed=5), extras={"local_features": features[:2, :4]})
    store.update_meta({"complete": True, "catalogue": "/c"})
    store.remove([int(ids[-1])])  # the highest id: still never given out again
    if hasattr(store, "close"):
        store.close()

    again = open_store(tmp_path / "index")
    assert again.meta == {"config": {"k": 5}, "complete": True, "catalogue": "/c"}
    assert (again.dim, again.mask_size, len(again)) == (8, 16, 5)
    rows = again.snapshot.rows_for_ids(ids[[4, 0]])
    assert np.array_equal(again.snapshot.gather("local_features", rows), features[[4, 0]])
    more = again.add(**items(2, dim=8, size=16, seed=6), extras={"local_features": features[:2]})
    assert more.tolist() == [6, 7]
    assert np.array_equal(again.snapshot.gather("local_features", again.snapshot.rows_for_ids(more)), features[:2])
    with pytest.raises(StoreError, match="no column"):
        again.snapshot.gather("nope", [0])
    if hasattr(again, "close"):
        again.close()


def test_bad_writes_are_one_line_store_errors(store_at):
    store = store_at()
    store.add(**items(3))
    good = items(2)
    for bad, match in [
        ({**good, "vectors": good["vectors"][:, :8]}, "dimension"),
        ({**good, "masks": good["masks"][:, :4]}, "masks"),
        ({**good, "paths": ["only one"]}, "paths"),
    ]:
        with pytest.raises(StoreError, match=match) as caught:
            store.add(**bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(StoreError, match="integers"):
        store.remove(["x"])
    assert len(store) == 3 and store.remove([], missing_ok=True) == 0


def test_a_fresh_index_has_no_extras_until_its_first_add_declares_them(store_at):
    store = store_at()
    assert store.snapshot.extras == {} and len(store.snapshot.gather("ids", [])) == 0
    store.add(**items(2))
    with pytest.raises(StoreError, match="no extras column"):  # its items were added without one
        store.add(**items(2, seed=1), extras={"local_features": np.zeros((2, 3), np.uint8)})


# ----------------------------------------------------------------------------- Milvus only


@pytest.mark.parametrize("backend", MILVUS)
def test_concurrent_writers_never_share_an_id(backend, request, tmp_path):
    uri = store_string(backend, request)
    create_store(tmp_path / "index", uri, {}, 16, 8).close()
    stores = [open_store(tmp_path / "index") for _ in range(3)]
    got, errors = [], []

    def write(store, seed):
        try:
            for batch in range(4):
                got.append(store.add(**items(3, seed=seed * 10 + batch)).tolist())
        except Exception as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    ids = [i for batch in got for i in batch]
    assert len(ids) == len(set(ids)) == 36
    reader = stores[0]
    wait_for(lambda: reader.refresh() or len(reader) == 36, "the other writers' items")
    assert sorted(reader.snapshot.ids.tolist()) == sorted(ids)
    for store in stores:
        store.close()


@pytest.mark.parametrize("backend", MILVUS)
def test_milvus_own_filtered_search_agrees(backend, request, tmp_path):
    store = create_store(tmp_path / "index", store_string(backend, request), {}, 16, 8)
    store.add(**items(60, seed=8))
    store.remove([5, 6])
    queries = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float32)
    for categories in (None, ["a"], ["b", "c"], [None]):
        ids, distances = store.search_server(queries, 5, categories)
        for q, vector in enumerate(queries):
            expected = top_ids(store.snapshot, vector, 5, categories)
            assert_same_topk((ids[q].tolist(), distances[q]), (expected[0], expected[1]))
    store.close()


@pytest.mark.parametrize("backend", MILVUS)
def test_store_ann_picks_the_collection_index(backend, request, tmp_path):
    store = create_store(tmp_path / "index", store_string(backend, request), {}, 16, 8, ann="hnsw")
    batch = items(40, seed=3)
    store.add(**batch)
    index = store._client.describe_index(store.target.collection, "vector")
    assert (index["index_type"], index["params"]["M"]) == ("HNSW", 16)  # nested params reach Milvus
    ids, distances = store.search_server(batch["vectors"][:4], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and np.allclose(distances[:, 0], 0, atol=1e-3)
    store.close()
    with pytest.raises(StoreError, match="store.ann"):
        create_store(tmp_path / "other", store_string(backend, request), {}, 16, 8, ann="lsh")


def test_a_reader_behind_the_pruned_change_log_reads_everything_again(tmp_path, monkeypatch):
    from csearch.store import milvus

    writer = create_store(tmp_path / "index", "milvus-lite:items.db", {}, 16, 8)
    writer.add(**items(6))
    reader = open_store(tmp_path / "index")
    monkeypatch.setattr(milvus, "PRUNE_EVERY", 1)
    monkeypatch.setattr(milvus, "CHANGE_TTL_MS", -1000)  # every change row is pruned at once
    ids = writer.add(**items(3, seed=1))
    writer.remove([1])
    rows = writer._client.query(writer.target.meta_collection, filter='kind == "change"', output_fields=["key"])
    assert rows == []  # the reader cannot learn what changed from the log...
    assert reader.refresh()  # ...so the watermark makes it read everything
    assert reader.snapshot.ids.tolist() == [0, 2, 3, 4, 5, *ids.tolist()]
    assert not reader.refresh()
    writer.close()


@pytest.mark.parametrize("backend", MILVUS)
def test_a_reader_of_an_overwritten_index_follows_the_new_one(backend, request, tmp_path):
    uri = store_string(backend, request)
    create_store(tmp_path / "index", uri, {"build": 1}, 16, 8).add(**items(4))
    reader = open_store(tmp_path / "index")
    assert len(reader) == 4
    again = create_store(tmp_path / "index", uri, {"build": 2}, 16, 8, overwrite=True)
    again.add(**items(2, seed=1))
    wait_for(lambda: reader.refresh() or reader.meta == {"build": 2}, "the reader to see the new index")
    assert reader.meta == {"build": 2} and reader.snapshot.paths == items(2, seed=1)["paths"]
    again.close()


def test_store_strings(tmp_path):
    assert parse_store("local", tmp_path) is None
    lite = parse_store("milvus-lite:sub/items.db", tmp_path)
    assert lite.lite and lite.uri == str(tmp_path / "sub" / "items.db") and lite.label == "milvus-lite:sub/items.db"
    assert parse_store("milvus-lite:/abs/x.db", tmp_path).uri == "/abs/x.db"
    server = parse_store("milvus://db.example:19530/catalogue_1", tmp_path)
    assert (server.uri, server.collection, server.lite) == ("http://db.example:19530", "catalogue_1", False)
    for bad, match in [
        ("milvus-lite:items", r"\.db"),
        ("milvus://host/c", "HOST:PORT"),
        ("milvus://host:19530/", "COLLECTION"),
        ("milvus://host:19530/9bad", "COLLECTION"),
        ("milvus://user:secret@host:19530/c", "credentials"),
        ("faiss", "valid: local"),
    ]:
        with pytest.raises(StoreError, match=match) as caught:
            parse_store(bad, tmp_path)
        assert "secret" not in str(caught.value)


def test_an_unreachable_server_or_missing_pymilvus_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="cannot open the Milvus server") as caught:
        create_store(tmp_path / "index", f"milvus://127.0.0.1:{free_port()}/c", {}, 4, 8)
    assert "\n" not in str(caught.value)
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if the [milvus] extra were not installed
    with pytest.raises(StoreError, match=r"pip install -e '\.\[milvus\]'"):
        create_store(tmp_path / "index", "milvus-lite:items.db", {}, 4, 8)


@pytest.mark.slow
def test_a_missing_collection_is_one_line(milvus_server, tmp_path):
    index = tmp_path / "index"
    create_store(index, f"milvus://{milvus_server}/t_{uuid.uuid4().hex[:12]}", {}, 4, 8).close()
    (index / STORE_FILE).write_text(json.dumps({"format": "csearch-store", "store": f"milvus://{milvus_server}/gone"}))
    result = run_csearch("list", index)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"csearch: error: Milvus collection 'gone' does not exist (milvus://{milvus_server}/gone)"
    )


# ----------------------------------------------------------------------------- the CLI end to end


def run_csearch(*argv, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "csearch", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("catalogue")
    return write_catalogue(root / "catalogue"), write_tiny_extractor(root / "tiny.onnx")


def tiny_flags(extractor: Path) -> list[str]:
    return ["--extractor", str(extractor), "--localizer", "classical", "--matting", "none", "--image-size", "32"]


def query_hits(index: Path, image: Path) -> tuple[list, np.ndarray]:
    result = run_csearch("query", index, image, "-k", "5", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["results"]
    return [h["id"] for h in hits], np.array([h["distance"] for h in hits])


@pytest.mark.parametrize("backend", MILVUS)
def test_csearch_index_into_milvus_gives_the_same_top_k_as_local(backend, request, catalogue, tmp_path):
    images, extractor = catalogue
    local, milvus = tmp_path / "local", tmp_path / "milvus"
    uri = store_string(backend, request)
    assert run_csearch("index", images, "--out", local, *tiny_flags(extractor)).returncode == 0
    done = run_csearch("index", images, "--out", milvus, "--store", uri, "--json", *tiny_flags(extractor))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Loading faiss" not in done.stderr  # Milvus' own chatter is quiet
    assert json.loads(done.stdout)["items"] == 12
    assert store_uri(local) == "local" and not (local / STORE_FILE).exists()  # the default is unchanged
    assert store_uri(milvus) == uri and sorted(p.name for p in milvus.iterdir()) == sorted(
        ["config.yaml", STORE_FILE] + (["items.db"] if backend == "milvus-lite" else [])
    )
    for image in sorted(images.rglob("*.png"))[::4]:
        got, expected = (query_hits(index, image) for index in (milvus, local))
        assert_same_topk(got, expected)
    listed = json.loads(run_csearch("list", milvus, "--json").stdout)
    assert listed == json.loads(run_csearch("list", local, "--json").stdout)
    assert json.loads(run_csearch("remove", milvus, "3", "--json").stdout) == {"removed": 1, "items": 11}
    again = run_csearch("index", images, "--out", milvus, "--store", uri, "--json", *tiny_flags(extractor))
    assert json.loads(again.stdout)["resumed"] == 11  # resumes: the removed image is indexed again


KILL_AFTER_TWO_ADDS = """
import os, signal, sys
from csearch import indexing
from csearch.cli import main
from csearch.store.milvus import MilvusStore

indexing.COMMIT_SECONDS = 0  # one store.add per image
add, acknowledged = MilvusStore.add, []

def add_then_die(self, *args, **kwargs):
    ids = add(self, *args, **kwargs)
    with open(sys.argv[3], "a") as log:  # what csearch add was told is stored: ids, then their paths
        print(*ids.tolist(), *kwargs["paths"], file=log)
    acknowledged.append(ids)
    if len(acknowledged) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return ids

MilvusStore.add = add_then_die
sys.exit(main(["add", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize("backend", MILVUS)
def test_sigkill_during_csearch_add_loses_no_acknowledged_item(backend, request, catalogue, tmp_path):
    images, extractor = catalogue
    index, uri = tmp_path / "index", store_string(backend, request)
    assert run_csearch("index", images, "--out", index, "--store", uri, *tiny_flags(extractor)).returncode == 0
    more = write_catalogue(tmp_path / "more", categories=("cup",), products=2, images=3, seed=7)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_ADDS, str(index), str(more), str(tmp_path / "acknowledged")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    acknowledged = [line.split() for line in (tmp_path / "acknowledged").read_text().splitlines()]
    assert len(acknowledged) == 2
    store = open_store(index)
    for item_id, path in acknowledged:
        assert store.snapshot.item(int(item_id))["path"] == path
    assert len(store) == 14
    store.close()
    resumed = run_csearch("add", index, more, "--json")
    assert json.loads(resumed.stdout) == {"added": 4, "failed": 0, "items": 18}, resumed.stderr
    paths = json.loads(run_csearch("list", index, "--json").stdout)
    assert len({i["path"] for i in paths["items"]}) == paths["count"] == 18  # nothing twice


# ----------------------------------------------------------------------------- service replicas


def spawn_server(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CSEARCH_API_KEY", None)  # loopback without a key: writes are open
    return subprocess.Popen(
        [sys.executable, "-m", "csearch", "serve", str(index_dir), "--port", str(port), "--workers", "1"],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_for(check, what: str, timeout: float = SERVER_WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_serve_replicas_share_one_milvus_server(milvus_server, catalogue, tmp_path):
    import httpx

    from tests.test_serve import new_product_image

    images, extractor = catalogue
    first = tmp_path / "replica-1" / "index"
    uri = f"milvus://{milvus_server}/t_{uuid.uuid4().hex[:12]}"
    assert run_csearch("index", images, "--out", first, "--store", uri, *tiny_flags(extractor)).returncode == 0
    second = tmp_path / "replica-2" / "index"
    shutil.copytree(first, second)  # each replica has its own copy of the folder...
    shared = tmp_path / "shared-uploads"  # ...and the uploads live on storage both see (docs/deployment.md)
    shared.mkdir()
    for folder in (first, second):
        (folder / "uploads").symlink_to(shared, target_is_directory=True)
    ports = [free_port(), free_port()]
    servers = [spawn_server(f, p, tmp_path / f"serve-{p}.log") for f, p in zip((first, second), ports)]
    one, two = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        for base, server, port in zip((one, two), servers, ports):
            wait_for(lambda s=server, b=base: s.poll() is not None or _healthy(b), f"{base}/health", timeout=120)
            assert server.poll() is None, (tmp_path / f"serve-{port}.log").read_text()[-2000:]
        photo = new_product_image(seed=5)
        added = httpx.post(
            f"{one}/items", files={"file": ("n.png", photo, "image/png")}, data={"product": "new", "category": "cup"}
        )
        assert added.status_code == 201, added.text
        item = added.json()["id"]

        def top(base):
            found = httpx.post(f"{base}/search", files={"file": ("q.png", photo, "image/png")}, data={"k": "1"})
            return found.json()["results"][0]["id"]

        assert top(one) == item  # the writer sees its own add at once
        wait_for(lambda: top(two) == item, "replica 2 to find the item added through replica 1")
        assert httpx.get(f"{two}/items/{item}").json()["product"] == "new"
        assert httpx.get(f"{two}/items/{item}/image").content == photo  # the shared upload
        assert httpx.delete(f"{two}/items/{item}").status_code == 200
        assert top(two) != item
        wait_for(lambda: httpx.get(f"{one}/items/{item}").status_code == 404, "replica 1 to see the removal")
        assert top(one) != item
        stats = [httpx.get(f"{base}/stats").json()["items"] for base in (one, two)]
        assert stats == [12, 12]
    finally:
        for server in servers:
            server.kill()
            server.wait(30)


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
