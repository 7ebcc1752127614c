"""Retrieval evaluation: known answers on hand-made indexes, agreement with Engine.search, the
CLI's outputs, the caches, the shape re-rankers, the ablation and the figures.

Everything runs on tiny synthetic catalogues with a weight-free localizer (classical) and a
tiny ONNX extractor (4x4 colour layout), so the file takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import draw_object, write_catalogue
from onnx import TensorProto, helper

from csearch.config import Config, merge
from csearch.evaluation import ranking, shape
from csearch.evaluation.cache import ArrayCache, CachedLocalizer
from csearch.evaluation.features import QueryFeatures, compute_query_features, store_as_queries
from csearch.types import Record

SIZE = 32


def tiny_extractor(path: Path) -> Path:
    """NHWC [N, 32, 32, 3] in [0, 255] -> 48-d: mean colour of each cell of a 4x4 grid."""
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_extractor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 48])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    for key, value in {"csearch.role": "extractor", "csearch.layout": "nhwc", "csearch.preprocessing": "raw"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 12-image catalogue (2 categories x 2 products x 3 images), its index and query features."""
    from csearch.data import read_catalogue
    from csearch.evaluation.features import cached_models, gallery_index
    from csearch.pipeline import load_models, resolve_config

    root = tmp_path_factory.mktemp("retrieval")
    catalogue = write_catalogue(root / "catalogue", size=(64, 64))
    extractor = tiny_extractor(root / "tiny.onnx")
    config = resolve_config(
        merge(
            Config(),
            {
                "preprocess.image_size": SIZE,
                "localize.method": "classical",
                "localize.matting": "none",
                "embed.extractor": str(extractor),
                "search.mask_size": 16,
            },
        )
    )
    cache = root / "cache"
    models = cached_models(load_models(config), config, cache)
    gallery = read_catalogue(catalogue)
    store = gallery_index(gallery, config, models, cache)
    queries = compute_query_features(list(gallery.records), config, models)
    return {
        "root": root,
        "catalogue": catalogue,
        "extractor": extractor,
        "config": config,
        "store": store,
        "queries": queries,
        "gallery": gallery,
        "cache": cache,
    }


# --------------------------------------------------------------------------- known answers


def hand_store(tmp_path, vectors, products, categories):
    from csearch.store import IndexStore

    vectors = np.asarray(vectors, np.float32)
    store = IndexStore.create(tmp_path / "hand", meta={}, dim=vectors.shape[1], mask_size=8)
    n = len(vectors)
    masks = np.zeros((n, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    store.add(
        vectors=vectors,
        masks=masks,
        boxes=np.tile([[0.25, 0.25, 0.75, 0.75]], (n, 1)),
        paths=[str(tmp_path / f"g{i}.png") for i in range(n)],
        categories=categories,
        products=products,
    )
    return store


def hand_queries(vectors, products, categories, paths=None):
    vectors = np.asarray(vectors, np.float32)
    n = len(vectors)
    masks = np.zeros((n, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    paths = paths or [f"/q{i}.png" for i in range(n)]
    return QueryFeatures(
        [Record(p, c, pr) for p, c, pr in zip(paths, categories, products)],
        vectors,
        masks,
        np.tile(np.float32([[0.25, 0.25, 0.75, 0.75]]), (n, 1)),
        ["test"] * n,
    )


def test_metrics_on_a_hand_made_index(tmp_path):
    # gallery on a line: x = 0, 1, 2, 3 with products A, B, A, C
    store = hand_store(tmp_path, [[0, 0], [1, 0], [2, 0], [3, 0]], ["A", "B", "A", "C"], ["k", "k", "k", "m"])
    # q0 (A) at x=0.9: ranking B(0.1), A(0.9), A(1.1), C -> first hit at rank 2
    # q1 (C) at x=3: ranking C first; q2 (Z) has no relevant item and is dropped
    queries = hand_queries([[0.9, 0], [3, 0], [0, 0]], ["A", "C", "Z"], ["k", "m", "k"])
    result = ranking.rank_queries(store, queries, Config(), "off")
    assert result.kept.tolist() == [0, 1]
    assert [list(r) for r in result.rankings] == [[1, 0, 2, 3], [3, 2, 1, 0]]
    assert result.metrics["recall@1"] == pytest.approx(0.5)
    assert result.metrics["mrr"] == pytest.approx((0.5 + 1) / 2)
    # AP@10: q0 = (1/2 + 2/3) / 2, q1 = 1
    assert result.metrics["map@10"] == pytest.approx(((0.5 + 2 / 3) / 2 + 1) / 2)
    # oracle restriction to category k removes B? no: B is in k too; restricting q1 to m keeps C only
    oracle = ranking.rank_queries(store, queries, Config(), "oracle")
    assert [list(r) for r in oracle.rankings] == [[1, 0, 2], [3]]


def test_a_query_in_the_gallery_is_excluded_from_its_own_results(tmp_path):
    store = hand_store(tmp_path, [[0, 0], [5, 0], [0.5, 0]], ["A", "B", "A"], ["k", "k", "k"])
    queries = hand_queries([[0, 0]], ["A"], ["k"], paths=[store.snapshot.paths[0]])
    result = ranking.rank_queries(store, queries, Config(), "off")
    assert 0 not in result.rankings[0].tolist()
    assert result.n_relevant.tolist() == [1]  # the other A; itself does not count
    assert result.metrics["recall@1"] == 1.0
    kept_self = ranking.rank_queries(store, queries, Config(), "off", exclude_self=False)
    assert kept_self.rankings[0][0] == 0 and kept_self.n_relevant.tolist() == [2]


def test_predicted_restriction_uses_the_classifier_not_the_labels(tmp_path):
    store = hand_store(tmp_path, [[0, 0], [1, 0]], ["A", "B"], ["k", "m"])
    queries = hand_queries([[0, 0]], ["A"], ["k"])
    queries.probs, queries.class_names = np.float32([[0.2, 0.8]]), ["k", "m"]  # wrongly predicts m
    config = Config()
    wrong = ranking.rank_queries(store, queries, config, "predicted")
    assert wrong.rankings[0].tolist() == [1] and wrong.metrics["recall@1"] == 0.0
    top2 = ranking.rank_queries(store, queries, merge(config, {"classify.top_n": 2}), "predicted")
    assert top2.metrics["recall@1"] == 1.0
    assert ranking.category_accuracy(queries) == 0.0


# --------------------------------------------------------------------------- real pipeline path


@pytest.mark.parametrize("method", ["none", "iou", "iou_crop", "fused"])
@pytest.mark.parametrize("k", [5, 9])  # within and past the re-ranked top 6
def test_rankings_start_with_what_engine_search_returns(setup, method, k):
    from csearch.pipeline import Engine

    store, queries = setup["store"], setup["queries"]
    gallery = store.snapshot
    config = merge(setup["config"], {"search.rerank": method, "search.rerank_top": 6})
    engine = Engine(store, config, models=None)
    result = ranking.rank_queries(store, queries, config, "off")
    excluded = ranking.self_rows(gallery, queries.records)
    assert len(result.kept) == 12
    for position, q in enumerate(result.kept):
        hits, _ = engine.search(
            queries.vectors[q],
            queries.masks[q],
            k,
            None,
            config,
            exclude_ids=gallery.ids[excluded[q]],
            box=queries.boxes[q],
        )
        assert [h.id for h in hits] == gallery.ids[result.rankings[position][:k]].tolist()
        assert all((h.iou is None) == (method == "none" or rank >= 6) for rank, h in enumerate(hits))


def test_store_as_queries_round_trips_the_index(setup):
    gallery = setup["store"].snapshot
    loo = store_as_queries(setup["store"])
    assert len(loo) == len(gallery)
    np.testing.assert_array_equal(loo.vectors, gallery.vectors)


def test_query_features_save_and_load(setup, tmp_path):
    queries = setup["queries"]
    queries.save(tmp_path / "q.npz")
    back = QueryFeatures.load(tmp_path / "q.npz")
    np.testing.assert_array_equal(back.vectors, queries.vectors)
    np.testing.assert_array_equal(back.masks, queries.masks)
    assert back.records == queries.records and back.backends == queries.backends


@pytest.mark.parametrize("rerank", ["iou", "geometric"])  # geometric: query local features reach the search
def test_cli_writes_retrieval_json_with_the_promised_keys(setup, tmp_path, capfd, rerank):
    from csearch import evaluate

    out = tmp_path / "out"
    code = evaluate.main(
        [
            "retrieval",
            "--gallery",
            str(setup["catalogue"]),
            "--queries",
            str(setup["catalogue"]),
            "--out",
            str(out),
            "--extractor",
            str(setup["extractor"]),
            "--localizer",
            "classical",
            "--matting",
            "none",
            "--image-size",
            str(SIZE),
            "--set",
            "search.mask_size=16",
            "--cache-dir",
            str(setup["cache"]),
            "--rerank",
            rerank,
            "--rerank-top",
            "5",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads((out / "retrieval.json").read_text())
    for key in (
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@20",
        "map@10",
        "r_precision",
        "mrr",
        "category_accuracy",
        "latency_ms_p50",
        "latency_ms_p95",
        "n_queries",
        "n_gallery",
    ):
        assert key in report
    for key in ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr"):
        assert 0.0 <= report[key] <= 1.0
    assert report["n_queries"] == 12 and report["n_gallery"] == 12
    assert report["category_accuracy"] is None and report["restriction"] == "off"
    assert report["config"]["search"]["rerank"] == rerank
    assert report["ranking_mismatches_vs_engine"] == 0
    assert set(report["latency_ms"]) >= {"decode", "localize", "embed", "search", "rerank", "total"}
    captured = capfd.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["n_queries"] == 12
    assert "recall@1" in captured.err
    assert (out / "config.yaml").is_file()


# --------------------------------------------------------------------------- caches


def test_cached_localizer_returns_exactly_what_a_fresh_call_returns(tmp_path):
    from csearch.config import LocalizeConfig
    from csearch.localize import make_localizer

    image, _ = draw_object((48, 64), shape="ellipse", noise=3.0, seed=1)
    localizer = make_localizer(LocalizeConfig(method="classical", matting="none"))
    fresh = localizer(image)
    cache = ArrayCache(tmp_path)
    cached = CachedLocalizer(make_localizer(LocalizeConfig(method="classical", matting="none")), cache, {"t": 1})
    cached(image)  # miss: computes and stores
    hit = cached(image)
    assert cache.hits == 1
    np.testing.assert_array_equal(hit.alpha, fresh.alpha)
    np.testing.assert_array_equal(hit.mask, fresh.mask)
    np.testing.assert_array_equal(hit.cutout, fresh.cutout)
    assert hit.box == fresh.box and hit.produced_by == fresh.produced_by
    entries = lambda: len(list(tmp_path.rglob("*.npz")))  # noqa: E731
    assert entries() == 2  # the localization, and the saliency under it
    CachedLocalizer(localizer, cache, {"t": 2})(image)  # other settings: a new localization entry,
    assert entries() == 3  # but the saliency model's output is shared
    assert not hasattr(localizer.saliency, "cache")  # wrapping never changes the caller's localizer


def test_saliency_cache_is_keyed_by_the_models_source_too(tmp_path, monkeypatch):
    """A file-backed saliency model's post-processing lives in Python (U²-Net's min-max stretch and
    minimum object area): editing that source must miss the cache, not reuse old maps."""
    import importlib
    import sys

    from csearch.evaluation.cache import CachedSaliency

    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"weights")
    module = tmp_path / "fake_saliency.py"
    source = (
        "import numpy as np\nclass Saliency:\n    name = 'fake'\n    input_size = 8\n"
        "    def __init__(self, files):\n        self.files = files\n"
        "    def predict(self, image):\n        return np.full(image.shape[:2], {value}, np.float32)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    image = np.zeros((8, 8, 3), np.uint8)
    cache = ArrayCache(tmp_path / "cache")
    results = []
    for value in (0.25, 0.75):
        module.write_text(source.format(value=value))
        sys.modules.pop("fake_saliency", None)
        model = importlib.import_module("fake_saliency").Saliency([weights])
        results.append(float(CachedSaliency(model, cache).predict(image).max()))
    assert results == [0.25, 0.75]


def test_localization_cache_is_keyed_by_every_localize_source(monkeypatch):
    """u2net.py post-processes the network's map: editing it must miss the localization cache."""
    from csearch.evaluation import cache

    before = cache.localize_source_digest()
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p: "edited" if Path(p).name == "u2net.py" else real(p))
    assert cache.localize_source_digest() != before


def test_cached_extractor_embeds_each_image_once(setup, tmp_path):
    from csearch.evaluation.cache import CachedExtractor
    from csearch.models import load_extractor

    calls = []
    bare = load_extractor(str(setup["extractor"]), None, SIZE)

    class Counting:
        name, dim, input_size, files = bare.name, bare.dim, bare.input_size, bare.files

        def __call__(self, images):
            calls.append(len(images))
            return bare(images)

    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    cached = CachedExtractor(Counting(), ArrayCache(tmp_path))
    first = cached(images[:2])
    both = cached(images)  # two hits, one miss
    assert calls == [2, 1]
    np.testing.assert_array_equal(both, bare(images))
    np.testing.assert_array_equal(first, both[:2])


def test_write_only_cache_never_reads(tmp_path):
    calls = []

    class Counting:
        name, files = "counting", []

        def __call__(self, image):
            from csearch.localize.base import full_localization

            calls.append(1)
            return full_localization(image, "counting")

    image, _ = draw_object((32, 32))
    cache = ArrayCache(tmp_path)
    CachedLocalizer(Counting(), cache, {})(image)
    CachedLocalizer(Counting(), cache, {}, read=False)(image)
    assert len(calls) == 2
    CachedLocalizer(Counting(), cache, {})(image)
    assert len(calls) == 2
    deferred = ArrayCache(tmp_path / "deferred", defer=True)
    CachedLocalizer(Counting(), deferred, {}, read=False)(image)
    assert not list((tmp_path / "deferred").rglob("*.npz"))  # nothing written inside the timed call
    deferred.flush()
    assert len(list((tmp_path / "deferred").rglob("*.npz"))) == 1


# --------------------------------------------------------------------------- shape re-rankers


def test_aspect_fused_prefers_the_same_proportions_only_with_weight():
    distances = np.array([1.0, 1.1])
    query_box = np.float32([0.4, 0.1, 0.6, 0.9])  # tall
    boxes = np.float32([[0.1, 0.4, 0.9, 0.6], [0.4, 0.1, 0.6, 0.9]])  # wide, tall
    assert shape.aspect_fused(distances, query_box, boxes, 0.0).tolist() == [0, 1]
    # sim = (1, 0), agreement = (1/16, 1): with w = 0.6 the tall box wins (0.6 > 0.4375)
    assert shape.aspect_fused(distances, query_box, boxes, 0.6).tolist() == [1, 0]


def test_iou_gate_only_reorders_near_ties():
    distances = np.array([1.0, 1.01, 1.5])
    ious = np.array([0.1, 0.9, 1.0])
    assert shape.iou_gate(distances, ious, 0.05).tolist() == [1, 0, 2]
    assert shape.iou_gate(distances, ious, 0.0).tolist() == [0, 1, 2]


def test_iou_rrf_weight_moves_the_best_iou_up():
    distances = np.array([1.0, 1.1, 1.2])
    ious = np.array([0.0, 0.1, 0.9])
    assert shape.iou_rrf(distances, ious, 0.0).tolist() == [0, 1, 2]
    assert shape.iou_rrf(distances, ious, 5.0)[0] == 2


# --------------------------------------------------------------------------- ablation, figures


def test_ablation_rows_and_table(setup):
    from csearch.evaluation import ablation

    base = setup["config"]
    variants = [
        ablation.Variant("pipeline", "evaluated"),
        ablation.Variant("localization", "none", (("localize.method", "none"),)),
        ablation.Variant("re-ranking", "iou", search=(("search.rerank", "iou"), ("search.rerank_top", 5))),
        ablation.Variant("restriction", "oracle", restriction="oracle"),
        ablation.Variant("re-ranking", "aspect_fused", shape=("aspect_fused", False)),
        ablation.Variant("views", "cut-out only", (("embed.views", "cutout"),)),
    ]
    rows = ablation.run_variants(base, setup["gallery"], setup["gallery"], setup["cache"], variants=variants)
    assert [r["group"] for r in rows] == [
        "pipeline",
        "localization",
        "re-ranking",
        "restriction",
        "re-ranking",
        "views",
    ]
    assert rows[0]["feature_key"] != rows[1]["feature_key"]
    assert rows[2]["feature_key"] == rows[0]["feature_key"]  # search-only rows reuse the features
    assert rows[4]["tuning"]["tuned"] and "tuned on gallery LOO" in rows[4]["variant"]
    assert rows[5]["feature_key"] not in (rows[0]["feature_key"], rows[1]["feature_key"])
    assert rows[0]["n_gallery"] == rows[5]["n_gallery"] == len(setup["gallery"].records)
    table = ablation.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "+0.000" in table


def test_plan_covers_every_module():
    from csearch.evaluation import ablation

    groups = {v.group for v in ablation.plan(Config(), has_classifier=True)}
    assert groups == {
        "pipeline",
        "baseline",
        "localization",
        "restriction",
        "re-ranking",
        "views",
        "colour",
        "extractor",
    }
    names = [v.name for v in ablation.plan(Config(), has_classifier=False)]
    assert not any("predicted" in n for n in names)


def test_figures_are_written(setup, tmp_path):
    from csearch.evaluation import figures

    store, queries = setup["store"], setup["queries"]
    result = ranking.rank_queries(store, queries, setup["config"], "off")
    paths = [
        figures.figure9_grid(store, queries, result, tmp_path / "f9.png", queries=2, top=3),
        figures.figure4_masks(store, queries, result, tmp_path / "f4.png", queries=1, top=3),
    ]
    localizers = figures.comparison_localizers(setup["config"])  # u2net left out: no weights here
    paths.append(
        figures.figure6_localization(
            [r.path for r in queries.records[:2]], {"classical": localizers["classical"]}, tmp_path / "f6.png"
        )
    )
    for path in paths:
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_retrieval_reuses_an_index(setup, tmp_path, capfd):
    """`python -m csearch.evaluate retrieval --index DIR`: the index's models, no re-indexing."""
    from csearch import evaluate

    index = setup["store"].directory
    out = tmp_path / "out"
    code = evaluate.main(
        [
            "retrieval",
            "--index",
            str(index),
            "--queries",
            str(setup["catalogue"]),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--limit",
            "4",
        ]
    )
    assert code == 0
    report = json.loads((out / "retrieval.json").read_text())
    assert report["n_queries"] == 4 and report["n_gallery"] == 12
    assert report["config"]["localize"]["method"] == "classical"
    assert not (tmp_path / "cache" / "index").exists()  # nothing was indexed
    bad = evaluate.main(["retrieval", "--queries", str(setup["catalogue"]), "--out", str(out)])
    assert bad == 2 and "--gallery" in capfd.readouterr().err


def test_predicted_rows_restrict_even_when_the_pipeline_does_not(tmp_path):
    from csearch.evaluation import ablation

    unrestricted = merge(Config(), {"search.restrict": False})
    rows = [v for v in ablation.plan(unrestricted, has_classifier=True) if v.restriction == "predicted"]
    assert rows and all(ablation.variant_config_overrides(v)["search.restrict"] is True for v in rows)
