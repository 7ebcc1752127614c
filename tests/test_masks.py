"""csearch.masks: packing (the index's stored format), resizing, boxes and IoU."""

import numpy as np
import pytest
from drawing import triangle

from csearch.masks import crop_masks, mask_iou, mask_iou_cropped, pack_masks, pixel_box, resize_mask, unpack_masks
from csearch.masks import normalized_box as mask_box

# -------------------------------------------------------------------------------------- masks


def test_pack_unpack_round_trip_any_size():
    rng = np.random.default_rng(0)
    for size in (5, 16, 64):
        masks = rng.random((3, size, size)) < 0.4
        bits = pack_masks(masks)
        assert bits.shape == (3, (size * size + 7) // 8) and bits.dtype == np.uint8
        np.testing.assert_array_equal(unpack_masks(bits, size), masks)
    assert pack_masks(np.ones((1, 64, 64), bool)).shape == (1, 512)
    with pytest.raises(ValueError):
        pack_masks(np.ones((1, 4, 4), np.uint8))


def test_resize_mask_is_area_interpolation():
    mask = np.zeros((128, 96), bool)
    mask[32:96, 24:72] = True  # block-aligned for 128/64 = 2 and 96/64 = 1.5
    small = resize_mask(mask, 64)
    expected = np.zeros((64, 64), bool)
    expected[16:48, 16:48] = True
    np.testing.assert_array_equal(small, expected)
    np.testing.assert_array_equal(resize_mask(np.eye(2, dtype=bool), 4), np.kron(np.eye(2), np.ones((2, 2))) > 0)
    tiny = np.zeros((640, 640), bool)
    tiny[300, 300] = True  # far below one output cell: kept rather than lost
    assert resize_mask(tiny, 64).sum() == 1 and resize_mask(tiny, 64)[30, 30]
    assert not resize_mask(np.zeros((10, 10), bool), 64).any()
    with pytest.raises(ValueError):
        resize_mask(np.zeros((10, 10)), 8)


def test_crop_masks_removes_position_and_scale():
    frame = np.zeros((2, 64, 64), bool)
    frame[0, 8:24, 8:16] = True  # the same 2:1 rectangle, small at the top left ...
    frame[1, 16:48, 32:48] = True  # ... and twice as big to the right
    boxes = np.stack([mask_box(m) for m in frame])
    np.testing.assert_allclose(boxes[0], [8 / 64, 8 / 64, 16 / 64, 24 / 64])
    crops = crop_masks(frame, boxes, 32)
    assert crops.all()  # a box around a rectangle is filled by it
    np.testing.assert_array_equal(mask_box(np.zeros((4, 4), bool)), [0, 0, 1, 1])


# ---------------------------------------------------------------------------------------- IoU


@pytest.mark.parametrize("size", [5, 16, 64])
def test_mask_iou_matches_boolean_computation(size):
    rng = np.random.default_rng(size)
    masks = rng.random((30, size, size)) < rng.random((30, 1, 1))
    masks[3] = False
    query = masks[0]
    expected = [(query & m).sum() / (query | m).sum() for m in masks]
    bits = pack_masks(masks)
    np.testing.assert_allclose(mask_iou(bits[0], bits), expected, rtol=1e-6)
    assert mask_iou(bits[0], bits)[0] == 1.0


def test_iou_of_two_empty_masks_is_zero():
    empty = pack_masks(np.zeros((2, 8, 8), bool))
    assert mask_iou(empty[0], empty).tolist() == [0.0, 0.0]


def test_mask_iou_validates():
    with pytest.raises(ValueError):
        mask_iou(np.zeros(8, np.uint8), np.zeros((2, 4), np.uint8))


def test_cropped_iou_compares_shapes_not_positions():
    frames = np.zeros((4, 64, 64), bool)
    triangle(frames[0], 4, 4, 16, 8)  # the query: small, top left
    triangle(frames[1], 24, 32, 32, 16)  # the same shape, twice as big, elsewhere
    triangle(frames[2], 4, 4, 16, 8, mirrored=True)  # the mirror image, in the query's box
    frames[3, 40:56, 4:12] = True  # a rectangle: its crop is the full square
    bits, boxes = pack_masks(frames), np.stack([mask_box(m) for m in frames])
    full = mask_iou(bits[0], bits[1:])
    cropped = mask_iou_cropped(bits[0], boxes[0], bits[1:], boxes[1:], mask_size=64, crop_size=32)
    assert full[0] == 0.0 and cropped[0] > 0.9
    assert cropped[1] < 0.2
    assert cropped[2] == pytest.approx(0.5, abs=0.1)  # the triangle covers about half its box


def test_pixel_and_normalized_boxes_agree():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    assert pixel_box(mask) == (3, 2, 9, 5)
    np.testing.assert_allclose(mask_box(mask), [3 / 20, 2 / 10, 9 / 20, 5 / 10])
    assert pixel_box(np.zeros((10, 20), bool)) == (0, 0, 20, 10)
