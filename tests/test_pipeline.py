"""End-to-end offline + online stages on a synthetic catalogue with weight-free models."""

from pathlib import Path

import numpy as np
import pytest

from csearch import indexing
from csearch.config import load_config
from csearch.data import read_catalogue
from csearch.errors import ConfigError, ModelMismatch, StoreError
from csearch.pipeline import Engine, build_index
from csearch.types import Prediction, Record


@pytest.fixture
def built(tmp_path, tiny_catalogue, tiny_config):
    catalogue = read_catalogue(tiny_catalogue)
    report = build_index(catalogue, tiny_config, tmp_path / "idx")
    return catalogue, report, tmp_path / "idx"


def test_index_then_query_finds_each_image_itself(built):
    catalogue, report, index = built
    assert report.added == len(catalogue.records) == 12 and not report.failures
    engine = Engine.open(index)
    for record in catalogue.records:
        result = engine.query(record.path, k=3)
        assert any(h.path == record.path and h.distance < 1e-3 for h in result.hits)
        assert result.hits[0].product == record.product
        assert [h.distance for h in result.hits] == sorted(h.distance for h in result.hits)
        assert set(result.timings_ms) >= {"decode", "localize", "embed", "search", "total"}
        assert result.localization.produced_by.startswith("classical")


def test_excluding_the_query_still_finds_its_product(built):
    catalogue, _, index = built
    engine = Engine.open(index)
    right = 0
    for record in catalogue.records:
        snapshot = engine.store.snapshot
        own = int(snapshot.ids[snapshot.paths.index(record.path)])
        hits = engine.query(record.path, k=20, exclude_ids=[own]).hits
        assert len(hits) == 11 and record.path not in [h.path for h in hits]
        right += hits[0].product == record.product
    assert right >= 10  # 12 queries; products differ by shape and colour


def test_k_beyond_the_index_returns_what_exists(built):
    catalogue, _, index = built
    assert len(Engine.open(index).query(catalogue.records[0].path, k=100).hits) == 12


@pytest.mark.parametrize(
    "settings",
    [
        {"k": 0},
        {"k": 1000},
        {"rerank": "ioux"},
        {"rerank_top": 0},
        {"category": "Nope"},  # not in the index: the error lists its categories
        {"restrict": True},  # the index has no classifier
        {"mask_size": 32},  # fixed by the index
    ],
)
def test_query_settings_obey_the_config_schema(built, settings):
    # the library, the CLI and the HTTP API share one set of rules (csearch.config, Engine.check_search)
    catalogue, _, index = built
    with pytest.raises(ConfigError):
        Engine.open(index).query(catalogue.records[0].path, **settings)


def test_resolved_config_records_model_files(built, tiny_extractor):
    _, report, index = built
    engine = Engine.open(index)
    assert engine.config.embed.extractor == str(tiny_extractor.resolve())
    recorded = engine.store.meta["models"]
    assert [Path(m["path"]) for m in recorded] == [tiny_extractor.resolve()]
    assert len(recorded[0]["sha256"]) == 64 and engine.store.meta["complete"] is True


def test_changed_or_moved_model_is_a_clear_error(built, tiny_extractor):
    _, _, index = built
    original = tiny_extractor.read_bytes()
    try:
        tiny_extractor.write_bytes(original + b"\0")
        with pytest.raises(ModelMismatch, match="changed since the index was built"):
            Engine.open(index)
        tiny_extractor.unlink()
        with pytest.raises(ModelMismatch, match="missing"):
            Engine.open(index)
    finally:
        tiny_extractor.write_bytes(original)


def test_interrupted_index_resumes(tmp_path, tiny_catalogue, tiny_config, monkeypatch):
    monkeypatch.setattr(indexing, "CHUNK", 4)
    catalogue = read_catalogue(tiny_catalogue)
    seen = []

    def interrupt_after_two_chunks(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(catalogue, tiny_config, tmp_path / "idx", on_commit=interrupt_after_two_chunks)
    partial = Engine.open(tmp_path / "idx")
    assert len(partial.store) == 8 and partial.store.meta["complete"] is False
    report = build_index(catalogue, tiny_config, tmp_path / "idx")
    assert (report.added, report.skipped_existing) == (4, 8)
    engine = Engine.open(tmp_path / "idx")
    assert len(engine.store) == 12 and len(set(engine.store.snapshot.paths)) == 12


def test_other_settings_at_same_out_are_refused(built, tiny_catalogue, tiny_config):
    _, _, index = built
    other = load_config(
        overrides={
            "embed.extractor": tiny_config.embed.extractor,
            "localize.method": "none",
            "preprocess.image_size": 32,
        }
    )
    with pytest.raises(StoreError, match="other settings"):
        build_index(read_catalogue(tiny_catalogue), other, index)


def test_random_weights_are_refused_for_an_index(tmp_path, tiny_catalogue):
    config = load_config(overrides={"embed.extractor": "mobilenet", "embed.weights": "none", "localize.method": "none"})
    with pytest.raises(ConfigError, match="needs fixed weights"):
        build_index(read_catalogue(tiny_catalogue), config, tmp_path / "idx")


def test_bad_images_are_listed_not_fatal(tmp_path, tiny_catalogue, tiny_config):
    (tiny_catalogue / "jar" / "jar-p0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tiny_catalogue / "jar" / "jar-p0" / "empty.png").write_bytes(b"")
    report = build_index(read_catalogue(tiny_catalogue), tiny_config, tmp_path / "idx")
    assert report.added == 12
    reasons = dict(report.failures)
    assert len(reasons) == 2 and all(Path(p).name in ("broken.jpg", "empty.png") for p in reasons)


def test_add_and_remove_without_rebuild(built, tmp_path):
    catalogue, _, index = built
    engine = Engine.open(index)
    first = catalogue.records[0]
    hit = engine.query(first.path, k=1).hits[0]
    assert engine.remove([hit.id]) == 1
    assert engine.query(first.path, k=1).hits[0].path != first.path
    copy = tmp_path / "again.png"
    copy.write_bytes(Path(first.path).read_bytes())
    ids, failures = engine.add([Record(str(copy), first.category, first.product)])
    assert (len(ids), failures) == (1, [])
    again = Engine.open(index).query(first.path, k=1).hits[0]
    assert again.path == str(copy.resolve()) and again.id == ids[0] > hit.id


class FixedClassifier:
    """A classifier that always predicts one category: enough to test the restriction logic."""

    image_size, color, files = 32, "rgb", []

    def __init__(self, category):
        self.category = category

    def predict_top(self, images, n):
        return [Prediction(self.category, 0.9, ((self.category, 0.9), ("other", 0.1))[:n])] * len(images)


def test_queries_are_restricted_to_the_predicted_category(built):
    catalogue, _, index = built
    engine = Engine.open(index)
    engine.models.classifier = FixedClassifier("jar")
    bottle = next(r for r in catalogue.records if r.category == "bottle")
    result = engine.query(bottle.path, k=20)
    assert result.category == "jar" and {h.category for h in result.hits} == {"jar"}
    unrestricted = engine.query(bottle.path, k=20, restrict=False)
    assert {h.category for h in unrestricted.hits} == {"jar", "bottle"}
    explicit = engine.query(bottle.path, k=20, category="bottle")
    assert explicit.category == "bottle" and {h.category for h in explicit.hits} == {"bottle"}


@pytest.mark.parametrize("method", ["iou", "fused", "iou_crop", "fused_crop"])
def test_rerank_methods_return_ious_and_ranked_scores(built, method):
    catalogue, _, index = built
    result = Engine.open(index).query(catalogue.records[0].path, k=5, rerank=method, rerank_top=10)
    assert len(result.hits) == 5 and all(h.iou is not None and 0 <= h.iou <= 1 for h in result.hits)
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert result.hits[0].product == catalogue.records[0].product  # itself or a twin: IoU ~1


@pytest.mark.parametrize("source", ["photo", "cutout"])
def test_classifier_sees_the_photo_or_the_cutout(tmp_path, source):
    from csearch.localize import make_localizer
    from csearch.pipeline import prepare_image
    from csearch.preprocess import model_input
    from tests.conftest import draw_object

    image, _ = draw_object((96, 128), noise=20.0, background=(40, 160, 40))
    config = load_config(
        overrides={"localize.method": "classical", "localize.matting": "none", "classify.input": source}
    )
    prepared = prepare_image(image, config, make_localizer(config.localize), FixedClassifier("jar"))
    whole = model_input(image, 32, "rgb")
    assert prepared.classifier_input.shape == (32, 32, 3)
    assert np.array_equal(prepared.classifier_input, whole) == (source == "photo")


def test_unknown_classifier_input_is_a_config_error():
    # rejected when the config is loaded, before any model or image is touched
    with pytest.raises(ConfigError, match="classify.input 'crop'.*Valid: cutout, photo"):
        load_config(overrides={"localize.method": "none", "classify.input": "crop"})


# --------------------------------------------------------------------------- views


def test_two_views_index_the_cutout_and_the_whole_photo(built, tiny_extractor):
    """Default embed.views = cutout+photo: each vector is [sqrt(1-w) cut-out, sqrt(w) photo]."""
    from csearch.embed import embed_batches
    from csearch.models import load_extractor
    from csearch.preprocess import load_image, model_input

    catalogue, _, index = built
    engine = Engine.open(index)
    assert engine.config.embed.views == "cutout+photo"
    extractor = load_extractor(str(tiny_extractor), None, image_size=32)
    assert engine.store.dim == 2 * extractor.dim
    record = catalogue.records[0]
    prepared = engine.prepare(record.path)
    image = load_image(record.path)
    photo = model_input(image, 32, "rgb", (0, 0, image.shape[1], image.shape[0]))
    assert np.array_equal(prepared.photo_input, photo)
    assert not np.array_equal(prepared.extractor_input, photo)  # the classical cut-out differs
    w = engine.config.embed.photo_weight
    expected = np.concatenate(
        [
            np.sqrt(1 - w) * embed_batches(extractor, prepared.extractor_input[None])[0],
            np.sqrt(w) * embed_batches(extractor, photo[None])[0],
        ]
    )
    np.testing.assert_allclose(engine.embed(prepared), expected, atol=1e-6)
    snapshot = engine.store.snapshot
    stored = np.asarray(snapshot.vectors)[snapshot.paths.index(str(Path(record.path).resolve()))]
    np.testing.assert_allclose(stored, expected, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, views", [({"embed.views": "cutout"}, 1), ({"localize.method": "none"}, 1), ({}, 2)]
)
def test_vector_length_follows_the_views(tmp_path, tiny_catalogue, tiny_config, overrides, views):
    from csearch.config import merge

    config = merge(tiny_config, overrides)
    build_index(read_catalogue(tiny_catalogue), config, tmp_path / "idx")
    engine = Engine.open(tmp_path / "idx")
    assert engine.store.dim == 24 * views  # the tiny extractor gives 24-d features
    record = read_catalogue(tiny_catalogue).records[5]
    assert engine.query(record.path, k=1).hits[0].path == str(Path(record.path).resolve())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embed.views": "both"}, "embed.views 'both'.*Valid: cutout"),
        ({"embed.photo_weight": 1.0}, "photo_weight' must be > 0 and < 1"),
    ],
)
def test_bad_views_are_config_errors(tmp_path, tiny_config, overrides, message):
    from csearch.config import merge

    with pytest.raises(ConfigError, match=message):
        merge(tiny_config, overrides)
    assert not (tmp_path / "idx").exists()


def test_an_index_from_before_views_opens_as_one_view(tmp_path, tiny_catalogue, tiny_config):
    """Indexes written before embed.views / classify.input existed keep the behaviour they were built with."""
    import json

    from csearch.config import merge

    build_index(
        read_catalogue(tiny_catalogue),
        merge(tiny_config, {"embed.views": "cutout", "classify.input": "cutout"}),
        tmp_path / "idx",
    )
    manifest = tmp_path / "idx" / "manifest.json"
    data = json.loads(manifest.read_text())
    meta = data["meta"]
    del meta["config"]["embed"]["views"], meta["config"]["embed"]["photo_weight"], meta["config"]["classify"]["input"]
    manifest.write_text(json.dumps(data))
    engine = Engine.open(tmp_path / "idx")
    assert (engine.config.embed.views, engine.config.classify.input) == ("cutout", "cutout")
    assert engine.store.dim == 24


def test_vectors_of_another_length_than_the_config_are_refused(tmp_path, tiny_catalogue, tiny_config):
    import json

    build_index(read_catalogue(tiny_catalogue), tiny_config, tmp_path / "idx")
    manifest = tmp_path / "idx" / "manifest.json"
    data = json.loads(manifest.read_text())
    meta = data["meta"]
    meta["config"]["embed"]["views"] = "cutout"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelMismatch, match="48-d vectors but its config gives 24-d"):
        Engine.open(tmp_path / "idx")


def test_localizer_threads_policy(monkeypatch, tiny_config, tmp_path, tiny_catalogue):
    """Queries give the localizer every core (one stream), the service a share per worker, and an
    explicit localize.threads always wins."""
    import os

    from csearch import localize
    from csearch.config import merge
    from csearch.resolve import load_models, query_threads

    seen = []
    real = localize.make_localizer
    monkeypatch.setattr(localize, "make_localizer", lambda cfg, threads=None, **kw: seen.append(threads) or real(cfg))
    load_models(tiny_config, localizer_threads=3)
    load_models(merge(tiny_config, {"localize.threads": 1}), localizer_threads=3)
    assert seen == [3, 1]
    build_index(read_catalogue(tiny_catalogue), tiny_config, tmp_path / "idx")
    seen.clear()
    Engine.open(tmp_path / "idx")
    assert seen == [max(1, os.cpu_count() or 1)]
    assert query_threads(workers=os.cpu_count() or 1) == 1 and query_threads(workers=10**6) == 1
