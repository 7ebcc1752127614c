"""Matting: trimap construction, closed-form matting (pymatting), the FBA ONNX runner."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import draw_object
from onnx_models import classifier_onnx, fba_onnx, u2net_onnx

from csearch import errors
from csearch.config import LocalizeConfig
from csearch.localize import FBAMatting, TrimapMatting, alpha_pymatting, make_localizer, make_trimap
from csearch.localize.matting import BG, FG, UNKNOWN, fba_inputs, trimap_distance_channels, two_channel_trimap


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def soft_object(size=(64, 72), shape="ellipse", seed=0):
    """A drawn object with anti-aliased (blurred) edges, its true mask and a soft saliency."""
    image, mask = draw_object(size, shape, (200, 40, 40), noise=2.0, seed=seed)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return image, mask, mask.astype(np.float32)


# --- trimap -------------------------------------------------------------------------------------


@pytest.mark.parametrize("band", [0, 1, 5, 11, 12])
def test_trimap_band_width_across_a_straight_edge(band):
    saliency = np.zeros((60, 80), np.float32)
    saliency[:, 40:] = 1.0  # vertical edge between columns 39 and 40
    trimap = make_trimap(saliency, 0.5, band)
    assert trimap.dtype == np.uint8 and set(np.unique(trimap)) <= {BG, UNKNOWN, FG}
    row = trimap[30]
    assert (row == UNKNOWN).sum() == band
    unknown_cols = np.flatnonzero(row == UNKNOWN)
    if band:
        assert unknown_cols[0] == 40 - (band - band // 2) and unknown_cols[-1] == 40 + band // 2 - 1
    assert (row[:40] != FG).all() and (row[40:] != BG).all()  # known labels never cross the edge


def test_trimap_regions_nest_in_the_mask():
    _, mask, saliency = soft_object()
    trimap = make_trimap(saliency, 0.5, 11)
    assert ((trimap == FG) <= mask).all() and ((trimap == BG) <= ~mask).all()
    assert (trimap == FG).any() and (trimap == BG).any() and (trimap == UNKNOWN).any()


def test_trimap_keeps_seeds_for_objects_thinner_than_the_band():
    saliency = np.zeros((40, 40), np.float32)
    saliency[10:30, 19:22] = 1.0  # 3 px wide, band 11 would erode it away
    trimap = make_trimap(saliency, 0.5, 11)
    assert (trimap == FG).any() and ((trimap == FG) <= (saliency > 0.5)).all()
    frame = np.ones((20, 20), np.float32)
    frame[9, 9] = 0.0  # a single background pixel
    assert (make_trimap(frame, 0.5, 11) == BG).any()


def test_trimap_empty_and_full_saliency():
    assert (make_trimap(np.zeros((10, 12)), 0.5, 5) == BG).all()
    assert (make_trimap(np.ones((10, 12)), 0.5, 5) == FG).all()
    with pytest.raises(ValueError, match="band"):
        make_trimap(np.zeros((10, 12)), 0.5, -1)


# --- closed-form matting ------------------------------------------------------------------------


def test_pymatting_alpha_consistent_with_trimap():
    image, mask, saliency = soft_object()
    trimap = make_trimap(saliency, 0.5, 7)
    alpha = alpha_pymatting(image, trimap)
    assert alpha.dtype == np.float32 and alpha.shape == mask.shape
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert (alpha[trimap == FG] == 1.0).all() and (alpha[trimap == BG] == 0.0).all()
    assert iou(alpha > 0.5, mask) >= 0.95


def test_pymatting_crop_solves_the_same_system_as_the_whole_image():
    from pymatting import estimate_alpha_cf

    image, _, _ = soft_object((48, 56), "rect")
    saliency = np.zeros((48, 56), np.float32)
    saliency[14:34, 16:40] = 1.0  # well inside the frame, so the crop is strictly smaller
    trimap = make_trimap(saliency, 0.5, 5)
    whole = estimate_alpha_cf(image / 255.0, trimap / 255.0)
    np.testing.assert_allclose(alpha_pymatting(image, trimap), whole, atol=1e-4)


def test_pymatting_notices_go_to_the_log_not_stdout(capsys, caplog):
    import sys

    image, _, saliency = soft_object((20, 24))
    alpha_pymatting(image, make_trimap(saliency, 0.5, 3))
    with caplog.at_level("DEBUG", logger="csearch.localize.matting"):
        sys.modules["pymatting.preconditioner.ichol"].print("PERFORMANCE WARNING:")
    assert capsys.readouterr().out == ""
    assert "PERFORMANCE WARNING" in caplog.text


def test_pymatting_downscaled_solve_is_close():
    image, mask, saliency = soft_object((64, 72))
    trimap = make_trimap(saliency, 0.5, 9)
    alpha = alpha_pymatting(image, trimap, scale=0.5)
    assert alpha.shape == mask.shape and (alpha[trimap == FG] == 1).all() and (alpha[trimap == BG] == 0).all()
    assert iou(alpha > 0.5, mask) >= 0.9


def test_pymatting_degenerate_trimaps():
    image, _, _ = soft_object((20, 24))
    no_unknown = np.where(np.arange(24) < 12, BG, FG).astype(np.uint8)[None].repeat(20, 0)
    np.testing.assert_array_equal(alpha_pymatting(image, no_unknown), no_unknown / 255.0)
    only_bg = np.full((20, 24), BG, np.uint8)
    only_bg[5:10, 5:10] = UNKNOWN  # unknown pixels bounded by background only
    assert (alpha_pymatting(image, only_bg) == 0).all()
    with pytest.raises(ValueError, match="neither"):
        alpha_pymatting(image, np.full((20, 24), UNKNOWN, np.uint8))
    with pytest.raises(ValueError, match="trimap"):
        alpha_pymatting(image, np.zeros((20, 23), np.uint8))
    with pytest.raises(ValueError, match="scale"):
        alpha_pymatting(image, only_bg, scale=0)


def test_matting_failure_is_explicit(monkeypatch):
    """A solver that fails on an image leaves the saliency as alpha, and the backend says so."""
    import csearch.localize.matting as matting

    def diverge(*args, **kwargs):
        raise ValueError("Conjugate gradient descent did not converge within 10000 iterations")

    monkeypatch.setattr("pymatting.estimate_alpha_cf", diverge)
    image, mask, saliency = soft_object()
    with pytest.raises(matting.MattingFailed, match="converge"):
        alpha_pymatting(image, make_trimap(saliency, 0.5, 5))
    loc = make_localizer(LocalizeConfig(method="classical", matting="pymatting", band=5))(image)
    assert loc.produced_by == "classical+pymatting(failed->classical)" and iou(loc.mask, mask) >= 0.8


def test_classical_with_pymatting_end_to_end():
    image, mask, _ = soft_object((64, 72), "triangle")
    localizer = make_localizer(LocalizeConfig(method="classical", matting="pymatting", band=7))
    loc = localizer(image)
    assert loc.produced_by == "classical+pymatting"
    assert loc.alpha.dtype == np.float32 and iou(loc.mask, mask) >= 0.9
    assert (loc.cutout[loc.alpha == 0] == 255).all()


# --- FBA ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fba_path(tmp_path_factory):
    return fba_onnx(tmp_path_factory.mktemp("fba") / "fba.onnx")


def test_two_channel_trimap_order_is_bg_then_fg():
    trimap = np.array([[BG, UNKNOWN, FG]], np.uint8)
    two = two_channel_trimap(trimap)
    assert two.shape == (1, 3, 2) and two[0, :, 0].tolist() == [1, 0, 0] and two[0, :, 1].tolist() == [0, 0, 1]


def test_trimap_distance_channels_follow_the_reference_formula():
    trimap = np.full((40, 40), UNKNOWN, np.uint8)
    trimap[:, :5] = BG
    trimap[:, 30:] = FG
    channels = trimap_distance_channels(two_channel_trimap(trimap))
    assert channels.shape == (40, 40, 6) and channels.dtype == np.float32
    assert (channels[:, :5, :3] == 1).all() and (channels[:, 30:, 3:] == 1).all()
    d = 10  # column 14 is 10 px from the background (last bg column 4), 16 from the foreground
    for j, scale in enumerate((0.02, 0.08, 0.16)):
        sigma2 = 2 * (scale * 320) ** 2
        assert channels[20, 14, j] == pytest.approx(np.exp(-(d**2) / sigma2), rel=1e-3)
        assert channels[20, 14, 3 + j] == pytest.approx(np.exp(-(16**2) / sigma2), rel=1e-3)
    absent = trimap_distance_channels(two_channel_trimap(np.full((8, 8), UNKNOWN, np.uint8)))
    assert (absent == 0).all()  # like the reference, a missing region leaves its channels at 0


def test_fba_inputs_are_padded_to_multiples_of_8():
    image, _, saliency = soft_object((61, 75))
    inputs = fba_inputs(image, make_trimap(saliency, 0.5, 7))
    shapes = {name: array.shape for name, array in inputs.items()}
    assert shapes == {
        "image": (1, 3, 64, 80),
        "two_chan_trimap": (1, 2, 64, 80),
        "image_n": (1, 3, 64, 80),
        "trimap_transformed": (1, 6, 64, 80),
    }
    assert all(array.dtype == np.float32 for array in inputs.values())
    assert inputs["image"].min() >= 0.0 and inputs["image"].max() <= 1.0
    np.testing.assert_allclose(inputs["image_n"][0, 0], (inputs["image"][0, 0] - 0.485) / 0.229, atol=1e-5)


def test_fba_runner_on_tiny_model(fba_path):
    image, mask, saliency = soft_object((61, 75))  # not a multiple of 8: the tiny graph fails unpadded
    trimap = make_trimap(saliency, 0.5, 7)
    fba = FBAMatting(fba_path, threads=1)
    alpha = fba(image, trimap)
    assert alpha.dtype == np.float32 and alpha.shape == (61, 75)
    assert (alpha[trimap == FG] == 1).all() and (alpha[trimap == BG] == 0).all()
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert iou(alpha > 0.5, mask) >= 0.9
    assert fba.files == [fba_path.resolve()]
    matting = TrimapMatting(fba, "fba", 0.5, 7, files=fba.files)
    np.testing.assert_array_equal(matting(image, saliency), alpha)


@pytest.mark.parametrize("builder", [u2net_onnx, classifier_onnx])
def test_fba_wrong_model_is_model_mismatch(tmp_path, builder):
    path = builder(tmp_path / "wrong.onnx")
    with pytest.raises(errors.ModelMismatch) as info:
        FBAMatting(path)
    assert str(path) in str(info.value) and "two_chan_trimap" in str(info.value)


def test_fba_missing_file(tmp_path):
    with pytest.raises(errors.WeightsNotFound, match="FBA"):
        FBAMatting(tmp_path / "fba.onnx")
