"""embed_batches: batching, progress, normalisation, validation (a fake extractor, plus one
real Keras extractor at a small input)."""

from __future__ import annotations

import numpy as np
import pytest

from csearch import errors
from csearch.embed import embed_batches, l2_normalize


class FakeExtractor:
    """Features = per-image channel means, padded to `dim`; records the batch sizes it saw."""

    name, dim, input_size, files = "fake", 4, 8, []

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
        self.batches.append(len(images))
        means = images.reshape(len(images), -1, 3).mean(axis=1)
        return np.concatenate([means, np.zeros((len(images), 1))], axis=1).astype(np.float32)


def make_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_batches_progress_and_raw_values():
    extractor, seen = FakeExtractor(), []
    batch = make_images(10)
    vectors = embed_batches(extractor, batch, batch_size=4, normalize=False, progress=seen.append)
    assert extractor.batches == [4, 4, 2] and seen == [4, 8, 10]
    assert vectors.dtype == np.float32 and vectors.shape == (10, 4)
    np.testing.assert_allclose(vectors[:, :3], batch.reshape(10, -1, 3).mean(axis=1), rtol=1e-6)


def test_iterables_match_arrays():
    batch = make_images(7)
    from_array = embed_batches(FakeExtractor(), batch, batch_size=3)
    extractor = FakeExtractor()
    from_generator = embed_batches(extractor, (image for image in batch), batch_size=3)
    assert extractor.batches == [3, 3, 1]
    np.testing.assert_array_equal(from_generator, from_array)
    np.testing.assert_array_equal(embed_batches(FakeExtractor(), list(batch), batch_size=32), from_array)


def test_normalisation_guards_zero_vectors():
    batch = make_images(3)
    batch[1] = 0  # a black image -> an all-zero feature vector
    vectors = embed_batches(FakeExtractor(), batch)
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(norms[[0, 2]], 1.0, rtol=1e-6)
    assert norms[1] == 0 and np.isfinite(vectors).all()
    np.testing.assert_array_equal(l2_normalize(np.zeros((2, 3))), np.zeros((2, 3), np.float32))


def test_empty_input_and_bad_arguments():
    assert embed_batches(FakeExtractor(), make_images(0)).shape == (0, 4)
    assert embed_batches(FakeExtractor(), iter([])).shape == (0, 4)
    for bad in (0, -1, 2.5):
        with pytest.raises(errors.ConfigError, match="batch_size must be a positive integer"):
            embed_batches(FakeExtractor(), make_images(2), batch_size=bad)


def test_wrong_feature_shape_is_reported():
    class Broken(FakeExtractor):
        def __call__(self, images):
            return np.zeros((len(images), 3), np.float32)

    with pytest.raises(errors.ModelMismatch, match=r"fake: expected features of shape \(2, 4\), got \(2, 3\)"):
        embed_batches(Broken(), make_images(2))


def test_real_keras_extractor_batched_equals_whole():
    from csearch.models import load_extractor

    extractor = load_extractor("mobilenetv2", None, image_size=32)
    batch = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    vectors = embed_batches(extractor, batch, batch_size=2)
    assert vectors.shape == (5, 1280)
    np.testing.assert_allclose(vectors, l2_normalize(extractor(batch)), rtol=1e-4, atol=1e-6)


def test_combined_views_add_squared_distances_with_their_weights():
    from csearch.embed import combine_views

    rng = np.random.default_rng(0)
    a, b = l2_normalize(rng.normal(size=(5, 8))), l2_normalize(rng.normal(size=(5, 8)))
    combined = combine_views(a, b, 0.25)
    assert combined.shape == (5, 16) and combined.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(combined, axis=1), 1.0, rtol=1e-6)  # unit views stay unit
    d2 = ((combined[0] - combined[3]) ** 2).sum()
    expected = 0.75 * ((a[0] - a[3]) ** 2).sum() + 0.25 * ((b[0] - b[3]) ** 2).sum()
    assert d2 == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        combine_views(a, b[:4], 0.5)
