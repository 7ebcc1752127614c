"""Localization: shared helpers, the none/classical/u2net backends, make_localizer (tiny ONNX)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import draw_object
from onnx_models import classifier_onnx, expected_u2net_saliency, fba_onnx, u2net_onnx

import csearch.localize
from csearch import errors
from csearch.config import LocalizeConfig
from csearch.localize import (
    ClassicalSaliency,
    Localizer,
    NoLocalizer,
    SaliencyLocalizer,
    U2NetSaliency,
    composite_on_white,
    localization_from_alpha,
    make_localizer,
)
from csearch.masks import pixel_box as mask_box


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {
        "u2net": u2net_onnx(root / "u2netp.onnx"),
        "fba": fba_onnx(root / "fba.onnx"),
        "classifier": classifier_onnx(root / "classifier.onnx"),
        "root": root,
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def check_localization(loc, image: np.ndarray) -> None:
    """The contract every backend's result must meet."""
    height, width = image.shape[:2]
    assert loc.alpha.dtype == np.float32 and loc.alpha.shape == (height, width)
    assert loc.alpha.min() >= 0.0 and loc.alpha.max() <= 1.0
    assert loc.mask.dtype == bool and loc.mask.shape == (height, width) and loc.mask.any()
    assert loc.cutout.dtype == np.uint8 and loc.cutout.shape == image.shape
    assert isinstance(loc.produced_by, str) and loc.produced_by
    x0, y0, x1, y1 = loc.box
    assert all(isinstance(v, int) for v in loc.box)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert loc.box == mask_box(loc.mask)


def true_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- helpers ----------------------------------------------------------------------------------


def test_mask_box_exclusive_end_and_edge_cases():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3, 2, 9, 5)
    one = np.zeros((10, 20), bool)
    one[9, 19] = True
    assert mask_box(one) == (19, 9, 20, 10)
    assert mask_box(np.zeros((10, 20), bool)) == (0, 0, 20, 10)


def test_composite_on_white():
    image = np.full((2, 2, 3), 100, np.uint8)
    alpha = np.array([[0.0, 1.0], [0.5, 2.0]], np.float32)
    out = composite_on_white(image, alpha)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == [255] * 3 and out[0, 1].tolist() == [100] * 3
    assert out[1, 0].tolist() == [178] * 3 and out[1, 1].tolist() == [100] * 3  # alpha clipped


def test_localization_from_alpha_fields():
    image, mask = draw_object((40, 50))
    loc = localization_from_alpha(image, mask.astype(np.float32), 0.5, "test")
    check_localization(loc, image)
    assert loc.produced_by == "test" and np.array_equal(loc.mask, mask)
    assert (loc.cutout[~mask] == 255).all() and np.array_equal(loc.cutout[mask], image[mask])


def test_localization_from_alpha_empty_is_explicit_full_image():
    image, _ = draw_object((40, 50))
    loc = localization_from_alpha(image, np.zeros((40, 50), np.float32), 0.5, "u2net")
    check_localization(loc, image)
    assert loc.produced_by == "u2net(empty->full)"
    assert loc.mask.all() and (loc.alpha == 1).all() and np.array_equal(loc.cutout, image)
    assert loc.box == (0, 0, 50, 40)


def test_localization_from_alpha_single_pixel():
    image = np.full((30, 30, 3), 255, np.uint8)
    alpha = np.zeros((30, 30), np.float32)
    alpha[7, 11] = 1.0
    loc = localization_from_alpha(image, alpha, 0.5, "test")
    check_localization(loc, image)
    assert loc.mask.sum() == 1 and loc.box == (11, 7, 12, 8)


def test_localization_from_alpha_rejects_wrong_shape():
    image, _ = draw_object((40, 50))
    with pytest.raises(ValueError, match="alpha shape"):
        localization_from_alpha(image, np.zeros((50, 40), np.float32), 0.5, "test")


# --- none ---------------------------------------------------------------------------------------


def test_none_backend_is_whole_image():
    image, _ = draw_object((40, 50))
    localizer = make_localizer(LocalizeConfig(method="none"))
    assert isinstance(localizer, NoLocalizer) and isinstance(localizer, Localizer)
    assert localizer.files == [] and localizer.name == "none"
    loc = localizer(image)
    check_localization(loc, image)
    assert loc.produced_by == "none" and loc.mask.all() and np.array_equal(loc.cutout, image)


def test_localizer_validates_its_input():
    with pytest.raises(errors.ImageError, match="uint8"):
        NoLocalizer()(np.zeros((8, 8, 3), np.float32))
    gray = NoLocalizer()(np.zeros((8, 9), np.uint8))  # grayscale is replicated to RGB
    assert gray.cutout.shape == (8, 9, 3)


# --- classical ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["ellipse", "rect", "triangle"])
@pytest.mark.parametrize(
    "color,background,noise",
    [
        ((200, 30, 30), (255, 255, 255), 0.0),
        ((60, 60, 200), (255, 255, 255), 8.0),
        ((180, 180, 180), (255, 255, 255), 4.0),  # light grey on white
        ((230, 200, 40), (90, 140, 90), 8.0),  # coloured background
        ((20, 20, 20), (0, 0, 0), 0.0),  # dark on black
    ],
)
def test_classical_finds_object_on_plain_background(shape, color, background, noise):
    image, mask = draw_object((96, 128), shape, color, background, noise=noise, seed=1)
    loc = make_localizer(LocalizeConfig(method="classical", matting="none"))(image)
    check_localization(loc, image)
    assert loc.produced_by == "classical"
    assert iou(loc.mask, mask) >= 0.9
    assert (loc.cutout[~loc.mask] == 255).all()


def test_classical_object_touching_border_and_large_image():
    # taller than WORK_SIDE, so it is detected at reduced size and resized back
    image, mask = draw_object((480, 360), "rect", (40, 120, 200), box=(90, 0, 270, 480))
    loc = make_localizer(LocalizeConfig(method="classical", matting="none"))(image)
    check_localization(loc, image)
    assert iou(loc.mask, mask) >= 0.9


def test_classical_fills_white_label_inside_object():
    image, mask = draw_object((96, 128), "rect", (30, 90, 30))
    image[40:56, 50:78] = 255  # a white label on a white-background product photo
    saliency = ClassicalSaliency().predict(image)
    assert iou(saliency > 0.5, mask) >= 0.95


@pytest.mark.parametrize("background,noise", [((255, 255, 255), 0.0), ((128, 128, 128), 10.0), ((0, 0, 0), 12.0)])
def test_classical_uniform_image_is_explicit_fallback(background, noise):
    image = np.full((64, 64, 3), background, np.float64)
    image += np.random.default_rng(0).normal(0, noise, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    loc = make_localizer(LocalizeConfig(method="classical", matting="none"))(image)
    check_localization(loc, image)
    assert loc.produced_by == "classical(empty->full)" and loc.mask.all()


def test_classical_cluttered_scene_is_explicit_fallback():
    """No plain border, no background model: an explicit fallback rather than a guessed blob."""
    rng = np.random.default_rng(0)
    clutter = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    image = np.kron(clutter, np.ones((8, 8, 1), np.uint8))  # 8x8 px patches of random colours
    image[30:66, 40:88] = (200, 30, 30)
    loc = make_localizer(LocalizeConfig(method="classical", matting="none"))(image)
    assert loc.produced_by == "classical(empty->full)"


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (64, 64)])
def test_classical_single_pixel_and_tiny_images_do_not_crash(size):
    image = np.full(size + (3,), 255, np.uint8)
    image[size[0] // 2, size[1] // 2] = (255, 0, 0)
    loc = make_localizer(LocalizeConfig(method="classical", matting="none"))(image)
    check_localization(loc, image)
    assert loc.produced_by.startswith("classical")


# --- u2net (tiny ONNX with U²-Net's interface) --------------------------------------------------


def test_u2net_saliency_matches_the_graph_at_native_size(onnx_dir):
    image, _ = draw_object((320, 320), noise=6.0)
    saliency = U2NetSaliency(onnx_dir["u2net"]).predict(image)
    raw = expected_u2net_saliency(image.astype(np.float32) / 255.0)
    expected = (raw - raw.min()) / (raw.max() - raw.min())  # min-max, as the reference does
    assert saliency.dtype == np.float32 and saliency.shape == (320, 320)
    np.testing.assert_allclose(saliency, expected, atol=1e-3)


@pytest.mark.parametrize("input_size", [64, 320])
def test_u2net_saliency_at_image_resolution(onnx_dir, input_size):
    image, mask = draw_object((90, 130))
    model = U2NetSaliency(onnx_dir["u2net"], input_size=input_size, threads=1)
    saliency = model.predict(image)
    assert saliency.dtype == np.float32 and saliency.shape == (90, 130)
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert iou(saliency > 0.5, mask) >= 0.9
    assert model.files == [onnx_dir["u2net"].resolve()]


def test_u2net_localizer_box_and_white_cutout(onnx_dir):
    image, mask = draw_object((90, 130), "rect", box=(20, 10, 70, 60))
    cfg = LocalizeConfig(method="u2net", model=str(onnx_dir["u2net"]), matting="none")
    localizer = make_localizer(cfg, input_size=64)
    assert isinstance(localizer, SaliencyLocalizer) and localizer.files == [onnx_dir["u2net"].resolve()]
    loc = localizer(image)
    check_localization(loc, image)
    assert loc.produced_by == "u2net"
    assert np.abs(np.subtract(loc.box, true_box(mask))).max() <= 2  # 64 px network input, resized back
    assert (loc.cutout[loc.alpha == 0] == 255).all()
    assert iou(loc.mask, mask) >= 0.9


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (400, 90)])
def test_u2net_any_image_size(onnx_dir, size):
    image = np.full(size + (3,), 255, np.uint8)
    image[size[0] // 2, size[1] // 2] = (0, 0, 200)
    cfg = LocalizeConfig(model=str(onnx_dir["u2net"]), matting="pymatting", band=5)
    loc = make_localizer(cfg, input_size=64)(image)
    check_localization(loc, image)
    assert loc.produced_by.startswith("u2net+pymatting")


@pytest.mark.parametrize("object_color", [None, (250, 250, 250)])
def test_u2net_no_confident_object_is_explicit_fallback(onnx_dir, object_color):
    """Uniform, or an object so faint that the network is nowhere confident: no min-max
    stretching of noise into an object."""
    image = np.full((50, 60, 3), 255, np.uint8)
    if object_color:
        image[10:30, 20:40] = object_color
    localizer = make_localizer(LocalizeConfig(model=str(onnx_dir["u2net"]), matting="none"), input_size=64)
    loc = localizer(image)
    check_localization(loc, image)
    assert loc.produced_by == "u2net(empty->full)"


@pytest.mark.parametrize("which", ["classifier", "fba", "garbage"])
def test_u2net_wrong_model_file_is_model_mismatch(onnx_dir, which):
    path = onnx_dir["root"] / "garbage.onnx"
    path.write_bytes(b"definitely not a protobuf \x00\xff" * 10)
    path = path if which == "garbage" else onnx_dir[which]
    with pytest.raises(errors.ModelMismatch) as info:
        U2NetSaliency(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert which == "garbage" or "input.1" in message


def test_u2net_missing_file_is_weights_not_found(tmp_path):
    with pytest.raises(errors.WeightsNotFound, match="nope.onnx"):
        U2NetSaliency(tmp_path / "nope.onnx")
    with pytest.raises(errors.WeightsNotFound, match="nope.onnx"):
        make_localizer(LocalizeConfig(model=str(tmp_path / "nope.onnx")))


def test_normalize_min_max():
    from csearch.localize.u2net import normalize_min_max

    np.testing.assert_allclose(normalize_min_max(np.array([[0.2, 0.6], [1.0, 0.2]])), [[0, 0.5], [1, 0]], atol=1e-6)
    assert (normalize_min_max(np.array([[0.1, 0.3]])) == 0).all()  # nothing confident: no object
    speck = np.zeros((100, 100))
    speck[50, 50] = 0.9  # 0.01 % confident: a sticker, not a subject
    assert (normalize_min_max(speck) == 0).all()
    speck[40:50, 40:50] = 0.9  # 1 %
    assert normalize_min_max(speck).max() == 1
    assert (normalize_min_max(np.full((2, 2), 0.9)) == 0).all()  # constant: no evidence
    assert (normalize_min_max(np.array([[np.nan, 1.0]])) == 0).all()


def test_u2net_rejects_bad_input_size(onnx_dir):
    with pytest.raises(ValueError, match="multiple of 32"):
        U2NetSaliency(onnx_dir["u2net"], input_size=100)


# --- make_localizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,valid", [("method", "u2nett", "u2net"), ("matting", "fab", "fba")])
def test_make_localizer_unknown_names_list_valid_ones(field, value, valid):
    with pytest.raises(errors.UnknownNameError) as info:
        make_localizer(LocalizeConfig(**{field: value}))
    assert valid in str(info.value) and "Valid:" in str(info.value)


def fake_registry(monkeypatch, paths: dict):
    """Stand-in for csearch.models.resolve_weights(name, weights) -> Path, as csearch.localize uses it."""
    calls = []

    def resolve_weights(name, weights):
        calls.append((name, weights))
        if name not in paths:
            raise errors.WeightsNotFound(f"{name}.onnx not found; put it in $CSEARCH_HOME")
        return paths[name]

    monkeypatch.setattr(csearch.localize, "resolve_weights", resolve_weights)
    return calls


def test_make_localizer_resolves_default_models_through_registry(onnx_dir, monkeypatch):
    calls = fake_registry(monkeypatch, {"u2netp": onnx_dir["u2net"], "fba": onnx_dir["fba"]})
    localizer = make_localizer(LocalizeConfig(method="u2net", model=None, matting="fba"), input_size=64)
    assert calls == [("u2netp", "imagenet"), ("fba", "imagenet")]
    assert localizer.name == "u2net+fba"
    assert localizer.files == [onnx_dir["u2net"].resolve(), onnx_dir["fba"].resolve()]
    image, mask = draw_object((60, 70))
    loc = localizer(image)
    check_localization(loc, image)
    assert loc.produced_by == "u2net+fba" and iou(loc.mask, mask) >= 0.9


def test_make_localizer_registry_name_and_missing_weights(onnx_dir, monkeypatch):
    calls = fake_registry(monkeypatch, {"u2net": onnx_dir["u2net"]})
    make_localizer(LocalizeConfig(model="u2net", matting="none"), input_size=64)
    assert calls == [("u2net", "imagenet")]
    with pytest.raises(errors.WeightsNotFound, match="fba.onnx"):
        make_localizer(LocalizeConfig(model="u2net", matting="fba"))


def test_make_localizer_classical_needs_no_files():
    localizer = make_localizer(LocalizeConfig(method="classical", matting="pymatting"))
    assert localizer.files == [] and localizer.name == "classical+pymatting"
