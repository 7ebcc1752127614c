"""ANN in the local store (store.ann: hnsw | ivf): recall against exact search, consistency with
adds and removes, exact category-restricted search, persistence, interruption, `csearch optimize`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from csearch.cli import main
from csearch.config import SearchConfig
from csearch.errors import StoreError
from csearch.knn import knn
from csearch.search import search_snapshot
from csearch.store import IndexStore
from csearch.store import ann as ann_module
from csearch.store.ann import ensure, optimize

REPO = Path(__file__).resolve().parents[1]
DIM, SIZE, CLUSTERS = 48, 8, 40
NO_MASK = np.zeros((SIZE, SIZE), bool)


def clustered(n, seed=0, centers_seed=1):
    """Synthetic clustered vectors (Gaussian blobs around CLUSTERS centres) and their cluster."""
    centers = np.random.default_rng(centers_seed).normal(size=(CLUSTERS, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLUSTERS, n)
    return (centers[labels] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32), labels


def add(store, vectors, labels, prefix="p"):
    n = len(vectors)
    return store.add(
        vectors,
        np.zeros((n, SIZE, SIZE), bool),
        np.zeros((n, 4), np.float32),
        [f"/catalogue/{prefix}{i}.jpg" for i in range(n)],
        [f"c{label % 8}" for label in labels],
    )


def make_index(path, n=3000, kind=None):
    store = IndexStore.create(path, {"config": {"store": {"ann": "none"}}}, dim=DIM, mask_size=SIZE)
    add(store, *clustered(n))
    if kind:
        optimize(store, kind)
    return store


def search(snapshot, vector, k=10, **kwargs):
    return search_snapshot(snapshot, vector, NO_MASK, k=k, settings=SearchConfig(k=k, mask_size=SIZE), **kwargs)


def exact_ids(snapshot, queries, k, rows=None):
    found, _ = knn(snapshot.blocks(), queries, k, rows=rows)
    return snapshot.gather("ids", found.reshape(-1)).reshape(found.shape)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_at_10_against_exact_is_high_and_the_ann_is_what_searched(tmp_path, kind):
    store = make_index(tmp_path / "index", kind=kind)
    snapshot = IndexStore.open(tmp_path / "index").snapshot
    assert snapshot.ann is not None and snapshot.ann.kind == kind
    queries, _ = clustered(100, seed=7)
    truth = exact_ids(snapshot, queries, 10)
    recall = np.mean([len(set(search(snapshot, q).ids) & set(t)) / 10 for q, t in zip(queries, truth)])
    assert recall >= 0.9, recall
    # the ANN proposed few candidates: the search did not fall back to ranking every row
    rows = snapshot.ann.candidate_rows(queries[0], 10)
    assert rows is not None and len(rows) <= 10 < len(store)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_removed_items_never_come_back(tmp_path, kind):
    store = make_index(tmp_path / "index", kind=kind)
    queries, _ = clustered(20, seed=3)
    before = store.snapshot
    removed = np.unique(exact_ids(before, queries, 10))  # the true top 10 of every query
    store.remove(removed)
    snapshot = IndexStore.open(tmp_path / "index").snapshot
    assert snapshot.ann is not None and snapshot.ann.dead_fraction > 0  # the ANN still holds them
    for query in queries:
        got = search(snapshot, query).ids
        assert len(got) == 10 and not set(got) & set(removed.tolist())
    # even asking the ANN directly, a removed item is never a candidate
    rows, _ = snapshot.ann.candidates(queries, 30)
    assert not set(snapshot.gather("ids", rows[rows >= 0]).tolist()) & set(removed.tolist())


def test_items_added_after_the_build_are_found(tmp_path):
    store = make_index(tmp_path / "index", kind="hnsw")
    queries, labels = clustered(5, seed=11)
    new = add(store, queries.copy(), labels, prefix="new")  # each query's exact duplicate
    snapshot = store.snapshot
    assert snapshot.manifest["ann"]["next_id"] == new[0]  # not in the ANN: searched exactly
    for query, item in zip(queries, new):
        result = search(snapshot, query)
        assert result.ids[0] == item and result.distances[0] < 1e-2  # 0 up to float32 rounding
    # and a fresh build covers them
    ensure(store, "hnsw")
    assert store.snapshot.manifest["ann"]["next_id"] == new[-1] + 1
    assert search(IndexStore.open(tmp_path / "index").snapshot, queries[2]).ids[0] == new[2]


def test_excluded_ids_are_not_returned(tmp_path):
    store = make_index(tmp_path / "index", kind="hnsw")
    query = store.snapshot.gather("vectors", [5])[0]
    assert search(store.snapshot, query).ids[0] == 5
    got = search(store.snapshot, query, exclude_ids=[5])
    assert 5 not in got.ids and len(got) == 10


def test_category_restricted_search_stays_exact(tmp_path, monkeypatch):
    store = make_index(tmp_path / "index", kind="hnsw")
    snapshot = store.snapshot
    queries, _ = clustered(10, seed=5)

    def refuse(*args, **kwargs):
        raise AssertionError("a restricted search consulted the ANN")

    monkeypatch.setattr(ann_module.AnnView, "candidate_rows", refuse)
    rows = snapshot.rows_for_categories(["c3"])
    truth = exact_ids(snapshot, queries, 10, rows=rows)
    for query, expected in zip(queries, truth):
        np.testing.assert_array_equal(search(snapshot, query, categories=["c3"]).ids, expected)


def test_the_ann_is_persisted_reloaded_and_dropped(tmp_path):
    path = tmp_path / "index"
    make_index(path, kind="ivf")
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["ann"]
    assert entry["kind"] == "ivf" and entry["count"] == 3000 and (path / entry["file"]).is_file()
    assert manifest["meta"]["config"]["store"]["ann"] == "ivf"  # the index's recorded store.ann
    reopened = IndexStore.open(path)
    assert reopened.snapshot.ann.kind == "ivf" and reopened.snapshot.ann.ann.index.ntotal == 3000
    # switching kind replaces the file; none deletes it and every search is exact again
    optimize(reopened, "hnsw")
    assert not (path / entry["file"]).exists()
    assert IndexStore.open(path).snapshot.ann.kind == "hnsw"
    summary = optimize(reopened)  # the recorded kind, now hnsw
    assert summary["ann"] == "hnsw" and summary["previous"] == "hnsw"
    optimize(reopened, "none")
    assert IndexStore.open(path).snapshot.ann is None
    assert not list(path.glob("ann-*"))
    assert IndexStore.open(path).meta["config"]["store"]["ann"] == "none"


def test_an_unusable_ann_file_means_exact_search_with_a_warning(tmp_path, caplog):
    path = tmp_path / "index"
    make_index(path, kind="hnsw")
    entry = json.loads((path / "manifest.json").read_text())["ann"]
    (path / entry["file"]).write_bytes(b"not a faiss index")
    snapshot = IndexStore.open(path).snapshot
    with caplog.at_level("WARNING", logger="csearch"):
        assert snapshot.ann is None
    assert "csearch optimize" in caplog.text
    query = snapshot.gather("vectors", [9])[0]
    np.testing.assert_array_equal(search(snapshot, query).ids, exact_ids(snapshot, query[None], 10)[0])


def test_mostly_removed_ann_is_not_used(tmp_path, caplog):
    store = make_index(tmp_path / "index", n=400, kind="hnsw")
    store.remove(np.arange(0, 300))
    snapshot = store.snapshot
    with caplog.at_level("WARNING", logger="csearch"):
        assert snapshot.ann is None
    assert "were removed" in caplog.text
    query = snapshot.gather("vectors", [0])[0]
    np.testing.assert_array_equal(search(snapshot, query).ids, exact_ids(snapshot, query[None], 10)[0])


INTERRUPT = """
import os, sys
from csearch.store import IndexStore
from csearch.store import ann
real = ann._write_index
def write_then_die(index, directory, name):
    real(index, directory, name)  # the file is in place, the manifest does not name it yet
    os._exit(9)
ann._write_index = write_then_die
ann.optimize(IndexStore.open(sys.argv[1]), "ivf")
"""


def test_an_interrupted_optimize_leaves_a_working_index(tmp_path):
    path = tmp_path / "index"
    store = make_index(path, kind="hnsw")
    before = json.loads((path / "manifest.json").read_text())
    result = subprocess.run([sys.executable, "-c", INTERRUPT, str(path)], cwd=REPO, timeout=300)
    assert result.returncode == 9
    assert json.loads((path / "manifest.json").read_text()) == before  # nothing was committed
    assert any(p.name.endswith("-ivf.faiss") for p in path.iterdir())  # the orphan
    snapshot = IndexStore.open(path).snapshot
    assert snapshot.ann.kind == "hnsw"  # still the previous ANN
    query = snapshot.gather("vectors", [3])[0]
    assert search(snapshot, query).ids[0] == 3
    store.remove([0])  # the next write collects the orphan
    assert not any(p.name.endswith("-ivf.faiss") for p in path.iterdir())
    assert IndexStore.open(path).snapshot.ann.kind == "hnsw"


def test_an_index_replaced_during_the_build_is_not_given_the_stale_ann(tmp_path, monkeypatch):
    path = tmp_path / "index"
    store = make_index(path, n=200)
    real_build = ann_module.build

    def build_while_replaced(snapshot, kind, progress=None):
        index = real_build(snapshot, kind, progress)
        IndexStore.create(path, {}, dim=DIM, mask_size=SIZE, overwrite=True)
        return index

    monkeypatch.setattr(ann_module, "build", build_while_replaced)
    with pytest.raises(StoreError, match="replaced while"):
        optimize(store, "hnsw")
    assert "ann" not in json.loads((path / "manifest.json").read_text())


def test_build_index_builds_the_configured_ann(tmp_path, tiny_catalogue, tiny_config):
    from dataclasses import replace

    from csearch.data import read_catalogue
    from csearch.pipeline import build_index

    config = replace(tiny_config, store=replace(tiny_config.store, ann="hnsw"))
    build_index(read_catalogue(str(tiny_catalogue)), config, tmp_path / "i")
    snapshot = IndexStore.open(tmp_path / "i").snapshot
    assert snapshot.ann.kind == "hnsw" and snapshot.manifest["ann"]["count"] == len(snapshot) == 12
    # a query through the engine (no classifier: unrestricted, so through the ANN) finds the image itself
    from csearch.pipeline import Engine

    image = sorted(tiny_catalogue.rglob("*.png"))[4]
    hits = Engine.open(tmp_path / "i").query(str(image), k=3).hits
    assert len(hits) == 3 and Path(hits[0].path) == image.resolve()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_optimize_builds_and_reports_json(tmp_path, capfd):
    path = tmp_path / "index"
    make_index(path, n=500)
    assert main(["optimize", str(path), "--ann", "ivf", "--json"]) == 0
    out = capfd.readouterr().out
    summary = json.loads(out)
    assert out.count("\n") == 1 and summary["ann"] == "ivf" and summary["items"] == 500
    assert Path(summary["file"]).is_file() and IndexStore.open(path).snapshot.ann.kind == "ivf"
    assert main(["optimize", str(path), "--ann", "none"]) == 0
    assert IndexStore.open(path).snapshot.ann is None


def test_cli_optimize_refuses_a_bad_kind_in_one_line(tmp_path, capfd):
    path = tmp_path / "index"
    make_index(path, n=50)
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(path), "--ann", "flat"])
    assert info.value.code == 2
    err = capfd.readouterr().err
    assert "invalid choice: 'flat'" in err and "hnsw" in err
    assert "ann" not in json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("where", ["missing", "not_an_index"])
def test_cli_optimize_of_no_index_is_one_line(tmp_path, capfd, where):
    path = tmp_path / "nothing"
    if where == "not_an_index":
        path.mkdir()
    assert main(["optimize", str(path), "--ann", "hnsw"]) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "Traceback" not in err


def test_cli_optimize_refuses_a_milvus_index_without_connecting(tmp_path, capfd):
    from csearch.store.open import STORE_FILE, STORE_FORMAT

    path = tmp_path / "milvus-index"
    path.mkdir()
    (path / STORE_FILE).write_text(json.dumps({"format": STORE_FORMAT, "store": "milvus://127.0.0.1:9/items"}))
    assert main(["optimize", str(path), "--ann", "hnsw"]) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "milvus://127.0.0.1:9/items" in err and "collection's own" in err
