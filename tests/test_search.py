"""Exact KNN against a brute-force reference (allowing ties), IoU, re-ranking orders."""

from __future__ import annotations

import numpy as np
import pytest
from drawing import triangle

from csearch import knn as knn_module
from csearch import search
from csearch.errors import UnknownNameError
from csearch.knn import knn, squared_norms
from csearch.masks import normalized_box as mask_box
from csearch.masks import pack_masks
from csearch.search import rerank, rerank_with_masks

ENGINES = ["numpy", "faiss", "auto"]


def gallery(n=500, dim=32, queries=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((queries, dim)).astype(np.float32))


def assert_matches_reference(vectors, queries, k, rows, got_rows, got_distances, tol=1e-4):
    """Same distances as a float64 brute force; every returned row really is at its distance
    (so a different choice among tied rows passes); rows unique and inside the subset."""
    subset = np.arange(len(vectors)) if rows is None else np.unique(rows)
    reference = np.sqrt(((vectors[subset][None].astype(np.float64) - queries[:, None]) ** 2).sum(-1))
    expected = np.sort(reference, axis=1)[:, :k]
    assert got_rows.shape == got_distances.shape == expected.shape
    np.testing.assert_allclose(got_distances, expected, atol=tol, rtol=tol)
    exact = np.sqrt(((vectors[got_rows].astype(np.float64) - queries[:, None]) ** 2).sum(-1))
    np.testing.assert_allclose(got_distances, exact, atol=tol, rtol=tol)
    for q in range(len(queries)):
        assert len(set(got_rows[q])) == k and set(got_rows[q]) <= set(subset)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks so that the per-chunk selection and the merge are exercised."""
    monkeypatch.setattr(knn_module, "CHUNK_BYTES", 4 * 32 * 100)
    monkeypatch.setattr(knn_module, "_chunk_rows", lambda queries, dim, gathered: 37)


# ---------------------------------------------------------------------------------------- knn


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 10, 64])
def test_knn_matches_brute_force(engine, k):
    vectors, queries = gallery()
    rows, distances = knn(vectors, queries, k, engine=engine)
    assert rows.dtype == np.int64 and distances.dtype == np.float32
    assert_matches_reference(vectors, queries, k, None, rows, distances)
    assert (np.diff(distances, axis=1) >= 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_knn_restricted_rows(engine, small_chunks):
    vectors, queries = gallery()
    subset = np.random.default_rng(1).choice(len(vectors), 120, replace=False)  # unsorted
    rows, distances = knn(vectors, queries, 7, rows=np.concatenate([subset, subset[:5]]), engine=engine)
    assert_matches_reference(vectors, queries, 7, subset, rows, distances)


@pytest.mark.parametrize("engine", ENGINES)
def test_knn_k_beyond_available(engine):
    vectors, queries = gallery(n=6)
    rows, distances = knn(vectors, queries, 50, engine=engine)
    assert rows.shape == (4, 6) and sorted(rows[0]) == list(range(6))
    rows, _ = knn(vectors, queries, 50, rows=[4, 1], engine=engine)
    assert rows.shape == (4, 2) and set(rows[0]) == {1, 4}
    rows, distances = knn(vectors, queries, 3, rows=np.zeros(0, np.int64), engine=engine)
    assert rows.shape == distances.shape == (4, 0)
    rows, distances = knn(vectors[:0], queries, 3, engine=engine)
    assert rows.shape == (4, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_single_query_and_exact_match(engine):
    vectors, _ = gallery()
    rows, distances = knn(vectors, vectors[17], 3, engine=engine)
    assert rows.shape == (1, 3) and rows[0, 0] == 17 and distances[0, 0] < 1e-3


def test_faiss_equals_numpy(small_chunks):
    vectors, queries = gallery(n=2000, dim=64, queries=25, seed=3)  # >= 20 queries: faiss' BLAS path
    numpy_rows, numpy_d = knn(vectors, queries, 10)
    faiss_rows, faiss_d = knn(vectors, queries, 10, engine="faiss")
    np.testing.assert_array_equal(numpy_rows, faiss_rows)  # random data: no near-ties
    np.testing.assert_allclose(numpy_d, faiss_d, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunked", [False, True])
def test_ties_go_to_the_lower_row(engine, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    vectors = base[rng.integers(0, 5, 300)]  # many exact duplicates, spread over the chunks
    query = base[2] + 0.01
    rows, distances = knn(vectors, query, 20, engine=engine)
    twins = np.flatnonzero((vectors == base[2]).all(axis=1))
    assert rows[0].tolist()[: min(20, len(twins))] == twins[:20].tolist()
    order = np.lexsort((rows[0], distances[0]))
    assert (order == np.arange(len(order))).all()  # sorted by (distance, row)


def test_precomputed_norms_give_the_same_answer():
    vectors, queries = gallery()
    plain = knn(vectors, queries, 5)
    with_norms = knn(vectors, queries, 5, sq_norms=squared_norms(vectors))
    np.testing.assert_array_equal(plain[0], with_norms[0])
    np.testing.assert_allclose(plain[1], with_norms[1], rtol=1e-6)


def test_memory_mapped_gallery(tmp_path):
    vectors, queries = gallery()
    np.save(tmp_path / "v.npy", vectors)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    for engine in ENGINES:
        np.testing.assert_array_equal(knn(mapped, queries, 5, engine=engine)[0], knn(vectors, queries, 5)[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v, q: knn(v.astype(np.float64), q, 3), "float32"),
        (lambda v, q: knn(v, q[:, :5], 3), "queries must be"),
        (lambda v, q: knn(v, np.full_like(q, np.nan), 3), "NaN"),
        (lambda v, q: knn(v, q, 0), "positive integer"),
        (lambda v, q: knn(v, q, 2.5), "positive integer"),
        (lambda v, q: knn(v, q, 3, rows=[0, len(v)]), "rows must lie"),
        (lambda v, q: knn(v, q, 3, rows=[0.5]), "integer"),
        (lambda v, q: knn(v, q, 3, sq_norms=np.zeros(3, np.float32)), "sq_norms"),
    ],
)
def test_knn_validates(call, message):
    vectors, queries = gallery(n=20)
    with pytest.raises(ValueError, match=message):
        call(vectors, queries)


def test_unknown_engine_lists_the_valid_ones():
    vectors, queries = gallery(n=20)
    with pytest.raises(UnknownNameError, match="numpy"):
        knn(vectors, queries, 3, engine="fiass")


# ----------------------------------------------------------------------------------- re-ranking


def test_rerank_none_orders_by_distance():
    order, scores = rerank([0.5, 0.2, 0.2, 1.0])
    assert order.tolist() == [1, 2, 0, 3]
    np.testing.assert_allclose(scores, 1 / (1 + np.array([0.2, 0.2, 0.5, 1.0])), rtol=1e-6)


def test_rerank_iou_is_the_papers_reordering():
    distances = [0.1, 0.2, 0.3, 0.4]
    ious = [0.5, 0.9, 0.5, 0.1]
    order, scores = rerank(distances, ious, "iou")
    assert order.tolist() == [1, 0, 2, 3]  # by IoU; the tie 0/2 keeps the nearer first
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.5, 0.1])


def test_rerank_fused_balances_distance_and_iou():
    distances, ious = [1.0, 2.0, 3.0], [0.0, 0.6, 1.0]
    order, scores = rerank(distances, ious, "fused", weight=0.5)
    # similarity 1, 0.5, 0 -> scores 0.5, 0.55, 0.5: the middle one wins, ties by distance
    assert order.tolist() == [1, 0, 2]
    np.testing.assert_allclose(scores, [0.55, 0.5, 0.5], rtol=1e-6)
    assert rerank(distances, ious, "fused", weight=0.0)[0].tolist() == [0, 1, 2]
    assert rerank(distances, ious, "fused", weight=1.0)[0].tolist() == [2, 1, 0]
    assert rerank([2.0, 2.0], [0.1, 0.3], "fused")[0].tolist() == [1, 0]  # equal distances
    assert rerank(distances, ious, "fused_crop")[0].tolist() == order.tolist()


def test_rerank_validates():
    with pytest.raises(UnknownNameError, match="fused"):
        rerank([1.0], [1.0], "fuse")
    with pytest.raises(ValueError, match="IoU"):
        rerank([1.0, 2.0], None, "iou")
    with pytest.raises(ValueError, match="weight"):
        rerank([1.0], [1.0], "fused", weight=2)
    assert rerank([], [], "iou")[0].shape == (0,)


@pytest.mark.parametrize("method", search.MASK_METHODS)  # geometric: tests/test_geometric.py
def test_rerank_with_masks(method):
    frames = np.zeros((4, 32, 32), bool)
    triangle(frames[0], 8, 8, 16, 16)  # the query
    frames[1, 0:4, 0:4] = True  # nearest, but a different shape elsewhere
    triangle(frames[2], 8, 8, 16, 16)  # the same mask
    triangle(frames[3], 8, 8, 16, 16, mirrored=True)
    bits, boxes = pack_masks(frames), np.stack([mask_box(m) for m in frames])
    order, scores, ious = rerank_with_masks(
        np.array([0.1, 0.2, 0.3]), bits[0], boxes[0], bits[1:], boxes[1:], mask_size=32, method=method, weight=0.8
    )
    if method == "none":
        assert ious is None and order.tolist() == [0, 1, 2]
    else:
        assert order[0] == 1 and ious[0] == 1.0  # the identical mask comes first
        assert (np.diff(scores) <= 0).all()


# ------------------------------------------------------------------------------- search_snapshot


def line_snapshot(tmp_path):
    """Items on a line at x = 0..7 (ids 0..7; categories a, b alternating); item 3's mask is
    the query's own, the others a small corner square."""
    from csearch.store import IndexStore

    n, size = 8, 16
    vectors = np.zeros((n, 4), np.float32)
    vectors[:, 0] = np.arange(n)
    masks = np.zeros((n, size, size), bool)
    masks[:, :4, :4] = True
    masks[3] = False
    triangle(masks[3], 4, 4, 8, 8)
    store = IndexStore.create(tmp_path / "line", meta={}, dim=4, mask_size=size)
    store.add(
        vectors=vectors,
        masks=masks,
        boxes=np.stack([mask_box(m) for m in masks]),
        paths=[f"/g{i}.png" for i in range(n)],
        categories=["a", "b"] * (n // 2),
        products=[f"p{i}" for i in range(n)],
    )
    return store.snapshot, masks[3]


def test_search_snapshot_reranks_only_the_top(tmp_path):
    from csearch.config import SearchConfig

    snapshot, query_mask = line_snapshot(tmp_path)
    query = np.zeros(4, np.float32)
    settings = SearchConfig(rerank="iou", rerank_top=5)
    ranking = search.search_snapshot(snapshot, query, query_mask, k=7, settings=settings)
    # KNN order 0..6; the top 5 re-ranked puts item 3 (the same mask) first, the rest keep KNN order
    assert ranking.ids.tolist() == [3, 0, 1, 2, 4, 5, 6]
    assert ranking.ious[0] == 1.0 and not np.isnan(ranking.ious[:5]).any() and np.isnan(ranking.ious[5:]).all()
    np.testing.assert_allclose(ranking.scores[5:], 1 / (1 + ranking.distances[5:]), rtol=1e-6)
    packed = search.search_snapshot(snapshot, query, pack_masks(query_mask[None])[0], k=3, settings=settings)
    assert packed.ids.tolist() == [3, 0, 1]  # packed bits are accepted too, and k < rerank_top cuts the top
    plain = search.search_snapshot(snapshot, query, query_mask, k=3, settings=SearchConfig())
    assert plain.ids.tolist() == [0, 1, 2] and np.isnan(plain.ious).all()
    assert set(ranking.timings) == {"search", "rerank"}


def test_search_snapshot_restricts_and_excludes(tmp_path):
    from csearch.config import SearchConfig

    snapshot, query_mask = line_snapshot(tmp_path)
    query = np.zeros(4, np.float32)
    found = search.search_snapshot(
        snapshot, query, query_mask, k=3, settings=SearchConfig(), categories=["b"], exclude_ids=[1, 99]
    )  # an id not in the index is ignored
    assert found.ids.tolist() == [3, 5, 7] and found.rows.tolist() == [3, 5, 7]
    reordered = search.search_snapshot(
        snapshot,
        query,
        query_mask,
        k=4,
        settings=SearchConfig(rerank_top=2),
        reorder=lambda rows, distances: np.array([1, 0]),
    )
    assert reordered.ids.tolist() == [1, 0, 2, 3]
    np.testing.assert_allclose(reordered.scores, 1 / (1 + reordered.distances), rtol=1e-6)  # KNN scores
    empty = search.search_snapshot(snapshot, query, query_mask, k=3, settings=SearchConfig(), categories=["z"])
    assert len(empty) == 0 and empty.ids.dtype == np.int64


# ------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("restricted", [False, True])
def test_blocks_search_like_their_concatenated_live_rows(engine, chunked, restricted, request):
    """A gallery kept in pieces, some with removed rows, answers like one array of its rows."""
    if chunked:
        request.getfixturevalue("small_chunks")
    rng = np.random.default_rng(5)
    pieces = [rng.standard_normal((n, 16)).astype(np.float32) for n in (90, 3, 120)]
    lives = [np.sort(rng.choice(90, 70, replace=False)), None, np.flatnonzero(rng.random(120) < 0.9)]
    blocks = [
        knn_module.Block(p, squared_norms(p) if i != 1 else None, live)
        for i, (p, live) in enumerate(zip(pieces, lives))
    ]
    flat = np.concatenate([p if live is None else p[live] for p, live in zip(pieces, lives)])
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    rows = rng.choice(len(flat), 60, replace=False) if restricted else None
    got = knn(blocks, queries, 12, rows=rows, engine=engine)
    expected = knn(flat, queries, 12, rows=rows)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)


def test_blocks_are_validated():
    good = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="float32"):
        knn([knn_module.Block(good), knn_module.Block(np.zeros((4, 7), np.float32))], good[0], 2)
    with pytest.raises(ValueError, match="live rows"):
        knn([knn_module.Block(good, None, np.array([1, 9]))], good[0], 2)
    with pytest.raises(ValueError, match="sq_norms"):
        knn([knn_module.Block(good)], good[0], 2, sq_norms=np.zeros(4, np.float32))
