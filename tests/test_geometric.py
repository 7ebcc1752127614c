"""Geometric re-ranking (csearch.geometric): synthetic prints warped by a known homography, the
fixed-size record, the fusion with the KNN order, the store's extras columns, and the index +
query path with weight-free models (tests/conftest.py)."""

import cv2
import numpy as np
import pytest
from PIL import Image

from csearch import geometric
from csearch.config import load_config
from csearch.data import read_catalogue
from csearch.errors import ConfigError, StoreError
from csearch.geometric import LOCAL_FEATURES, LocalSpec
from csearch.pipeline import Engine, build_index
from csearch.search import rerank, search_snapshot
from csearch.store import IndexStore
from csearch.types import Record

KINDS = ("orb", "sift")
H = np.array([[0.9, 0.12, 18.0], [-0.06, 0.95, 9.0], [2e-4, 1e-4, 1.0]])


def texture(seed: int, size: int = 240) -> np.ndarray:
    """A synthetic printed package: coloured shapes and text on white, RGB uint8."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 255, np.uint8)
    for _ in range(50):
        color = tuple(int(v) for v in rng.integers(0, 230, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.circle(image, (x, y), int(rng.integers(3, 20)), color, -1)
        elif kind == 1:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(4, 40)), y + int(rng.integers(4, 40))), color, -1)
        else:
            text = "ABKXYZ"[int(rng.integers(6))] + str(int(rng.integers(100)))
            cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.4, 1.2)), color, 2)
    return image


def warp(image: np.ndarray, homography: np.ndarray = H) -> np.ndarray:
    size = image.shape[1], image.shape[0]
    return cv2.warpPerspective(image, homography, size, borderValue=(255, 255, 255))


# ------------------------------------------------------------------------------ features, matching


@pytest.mark.parametrize("kind", KINDS)
def test_a_warped_print_verifies_and_its_homography_is_recovered(kind):
    spec = LocalSpec(kind, 256)
    original, other = texture(1), texture(2)
    query = geometric.extract(warp(original), spec)
    same, homography = geometric.inliers(query, geometric.extract(original, spec))
    unrelated, _ = geometric.inliers(query, geometric.extract(other, spec))
    assert same >= 40 and same > 4 * max(unrelated, 1)
    # the homography maps the catalogue image's points onto the query's, like H
    corners = np.array([[30, 30], [200, 40], [60, 210], [190, 190]], np.float32)[:, None]
    found = cv2.perspectiveTransform(corners, homography)
    expected = cv2.perspectiveTransform(corners, H.astype(np.float32))
    assert np.abs(found - expected).max() < 3.0


@pytest.mark.parametrize("kind", KINDS)
def test_the_record_is_fixed_size_and_round_trips(kind):
    spec = LocalSpec(kind, 64)
    points, descriptors = geometric.detect(cv2.cvtColor(texture(3), cv2.COLOR_RGB2GRAY), kind, 64)
    assert 16 <= len(points) <= 64
    record = geometric.encode(points, descriptors, spec)
    assert record.dtype == np.uint8 and record.shape == (spec.record_bytes,)
    assert spec.record_bytes == 4 + 64 * (4 + geometric.DESCRIPTOR_BYTES[kind])
    decoded_kind, decoded_points, decoded_descriptors = geometric.decode(record)
    assert decoded_kind == kind and len(decoded_points) == len(points)
    assert np.abs(decoded_points - points).max() <= 0.5 / geometric.QUANT + 1e-6
    assert np.array_equal(decoded_descriptors, descriptors)
    empty = geometric.extract(np.full((50, 50, 3), 255, np.uint8), spec)  # nothing to detect
    assert empty.shape == record.shape and len(geometric.decode(empty)[1]) == 0
    with pytest.raises(ValueError):
        geometric.decode(record[:-1])


def test_orb_and_sift_records_are_not_compared():
    image = texture(4)
    with pytest.raises(ValueError, match="cannot match"):
        geometric.inliers(
            geometric.extract(image, LocalSpec("orb", 64)), geometric.extract(image, LocalSpec("sift", 64))
        )


@pytest.mark.parametrize("kind", KINDS)
def test_reranking_moves_the_true_match_to_the_top(kind):
    spec = LocalSpec(kind, 256)
    query = geometric.extract(warp(texture(10)), spec)
    # KNN put four unrelated prints first and the true one last
    gallery = [texture(s) for s in (11, 12, 13, 14)] + [texture(10)]
    candidates = np.stack([geometric.extract(image, spec) for image in gallery])
    distances = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    order, scores, inliers = geometric.rerank_geometric(distances, query, candidates, min_inliers=15)
    assert order[0] == 4 and inliers[0] >= 15
    assert list(order[1:]) == [0, 1, 2, 3]  # the unverified keep the KNN order
    assert np.all(np.diff(scores) <= 0) and scores[0] > 15 and np.all(scores[1:] <= 1)


def test_prints_without_texture_keep_the_knn_order():
    spec = LocalSpec("sift", 128)
    plain = np.full((120, 120, 3), 200, np.uint8)
    cv2.circle(plain, (60, 60), 30, (30, 160, 40), -1)  # produce: a smooth blob, no print
    query = geometric.extract(plain, spec)
    candidates = np.stack([geometric.extract(np.roll(plain, s, axis=1), spec) for s in (0, 5, 10)])
    order, scores, _ = geometric.rerank_geometric(np.array([0.3, 0.1, 0.2]), query, candidates, 15)
    assert list(order) == [1, 2, 0] and np.allclose(scores, 1 / (1 + np.array([0.1, 0.2, 0.3])))


def test_a_conclusive_match_stops_the_matching(monkeypatch):
    spec = LocalSpec("sift", 256)
    query = geometric.extract(warp(texture(20)), spec)
    candidates = np.stack([geometric.extract(texture(s), spec) for s in (20, 21, 22)])
    monkeypatch.setattr(geometric, "STOP_FACTOR", 2)
    order, _, inliers = geometric.rerank_geometric(np.array([0.1, 0.2, 0.3]), query, candidates, 10)
    assert order[0] == 0 and inliers[0] >= 20 and list(inliers[1:]) == [-1, -1]  # never matched


def test_mask_rerank_refuses_geometric():
    with pytest.raises(ValueError, match="local features"):
        rerank(np.array([0.1, 0.2]), np.array([0.5, 0.5]), "geometric")


# ------------------------------------------------------------------------------ the store's extras


def _add(store, n, seed, extras=True, width=10):
    rng = np.random.default_rng(seed)
    columns = {LOCAL_FEATURES: rng.integers(0, 256, (n, width), dtype=np.uint8)} if extras else None
    store.add(
        rng.random((n, 4), dtype=np.float32),
        np.zeros((n, 8, 8), bool),
        np.tile(np.array([0, 0, 1, 1], np.float32), (n, 1)),
        [f"/catalogue/{seed}-{i}.png" for i in range(n)],
        extras=columns,
    )
    return None if columns is None else columns[LOCAL_FEATURES]


def test_extras_survive_remove_reopen_merge_and_compaction(tmp_path):
    store = IndexStore.create(tmp_path / "idx", {}, dim=4, mask_size=8)
    rows = [_add(store, 3, seed) for seed in range(12)]  # 12 segments of 3: the merge policy runs
    expected = np.concatenate(rows)
    assert np.array_equal(store.snapshot.gather(LOCAL_FEATURES, np.arange(36)), expected)
    store.remove([1, 20])
    keep = np.setdiff1d(np.arange(36), [1, 20])
    reopened = IndexStore.open(tmp_path / "idx")
    assert np.array_equal(reopened.snapshot.gather(LOCAL_FEATURES, [0, 1, 33]), expected[keep][[0, 1, 33]])
    reopened.compact()
    segments = sorted((tmp_path / "idx").glob("seg-*"))
    assert len(segments) == 1 and (segments[0] / f"{LOCAL_FEATURES}.npy").is_file()
    again = IndexStore.open(tmp_path / "idx").snapshot
    assert again.extras == {LOCAL_FEATURES: {"shape": [10], "dtype": "uint8"}}
    assert np.array_equal(again.gather(LOCAL_FEATURES, np.arange(34)), expected[keep])


def test_an_index_with_extras_needs_them_in_every_add(tmp_path):
    store = IndexStore.create(tmp_path / "idx", {}, dim=4, mask_size=8)
    _add(store, 2, 0)
    with pytest.raises(StoreError, match="lacks it"):
        _add(store, 2, 1, extras=False)
    with pytest.raises(StoreError, match=r"uint8 \(2, 10\)"):
        _add(store, 2, 1, width=11)
    assert len(store) == 2


def test_an_index_without_extras_keeps_working_and_refuses_new_columns(tmp_path):
    store = IndexStore.create(tmp_path / "idx", {}, dim=4, mask_size=8)
    _add(store, 2, 0, extras=False)
    _add(store, 2, 1, extras=False)
    assert len(IndexStore.open(tmp_path / "idx")) == 4 and store.snapshot.extras == {}
    with pytest.raises(StoreError, match="has no extras column"):
        _add(store, 2, 2)
    with pytest.raises(StoreError, match="has no column 'local_features'"):
        store.snapshot.gather(LOCAL_FEATURES, [0])


# ------------------------------------------------------------------------------ index and query


@pytest.fixture
def print_catalogue(tmp_path):
    """ROOT/pack/<product>/img<i>.png: three printed products, two slightly shifted photos each."""
    root = tmp_path / "prints"
    for product in range(3):
        folder = root / "pack" / f"print-{product}"
        folder.mkdir(parents=True)
        for i in range(2):
            shift = np.array([[1, 0, 4 * i], [0, 1, 3 * i], [0, 0, 1]], np.float64)
            Image.fromarray(warp(texture(100 + product), shift)).save(folder / f"img{i}.png")
    return root


def _config(tiny_extractor, rerank):
    return load_config(
        overrides={
            "embed.extractor": str(tiny_extractor),
            "localize.method": "none",
            "preprocess.image_size": 32,
            "embed.batch_size": 4,
            "search.rerank": rerank,
            "search.rerank_top": 6,
            "search.keypoints": 200,
        }
    )


def test_index_and_query_with_geometric_reranking(tmp_path, tiny_extractor, print_catalogue, monkeypatch):
    monkeypatch.setattr(geometric, "STOP_FACTOR", None)  # match every candidate: both photos verify
    index = tmp_path / "idx"
    build_index(read_catalogue(print_catalogue), _config(tiny_extractor, "geometric"), index)
    engine = Engine.open(index)
    spec = LocalSpec("sift", 200)
    assert engine.store.meta[LOCAL_FEATURES] == spec.to_meta()
    assert engine.store.snapshot.gather(LOCAL_FEATURES, np.arange(6)).shape == (6, spec.record_bytes)
    for product in range(3):
        photo = tmp_path / f"query{product}.png"
        Image.fromarray(warp(texture(100 + product))).save(photo)
        result = engine.query(photo, k=3)
        assert result.hits[0].product == result.hits[1].product == f"print-{product}"
        assert result.hits[0].score > 15 > result.hits[2].score  # verified, then the KNN order
        assert "local_features" in result.timings_ms
    # an add stores the local features too; a query may not ask for other features than the index's
    added, _ = engine.add([Record(str(tmp_path / f"query{i}.png"), "pack", f"print-{i}") for i in (0, 1)])
    assert len(added) == 2 and len(engine.store.snapshot.gather(LOCAL_FEATURES, np.arange(8))) == 8
    with pytest.raises(ConfigError, match="fixed by the index"):
        engine.query(tmp_path / "query0.png", geometric_features="orb")


def test_geometric_on_an_index_without_local_features_is_one_line(tmp_path, tiny_extractor, print_catalogue):
    index = tmp_path / "idx"
    catalogue = read_catalogue(print_catalogue)
    build_index(catalogue, _config(tiny_extractor, "none"), index)
    engine = Engine.open(index)
    assert engine.store.meta[LOCAL_FEATURES] is None and engine.store.snapshot.extras == {}
    with pytest.raises(ConfigError, match="--set search.rerank=geometric") as info:
        engine.query(catalogue.records[0].path, rerank="geometric")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--set search.rerank=geometric"):  # the library path says the same
        settings = load_config(overrides={"search.rerank": "geometric"}).search
        search_snapshot(
            engine.store.snapshot,
            np.zeros(engine.store.dim, np.float32),
            np.zeros(64, np.uint8),
            k=1,
            settings=settings,
        )
