"""Geometry: affine crop and its inverse, flips with the flip pairs, targets and heatmap decoding."""

from __future__ import annotations

import numpy as np
import pytest

from pose.data.targets import gaussian_targets
from pose.data.transforms import (
    affine_matrix,
    apply_affine,
    box_to_center_scale,
    crop,
    flip_back,
    fliplr_joints,
    transform_preds,
)
from pose.evaluate import decode_heatmaps, max_preds
from pose.keypoints import COCO, MPII


def test_box_to_center_scale_pads_to_aspect():
    center, scale = box_to_center_scale((10, 20, 50, 100), (256, 192))
    assert center.tolist() == [35.0, 70.0]
    # 50x100 is narrower than 3:4 -> width grows to 75, then both x1.25, in units of 200 px
    assert scale == pytest.approx([75 / 200 * 1.25, 100 / 200 * 1.25])


@pytest.mark.parametrize("rotation", [0.0, 30.0, -45.0])
def test_affine_round_trip(rotation):
    rng = np.random.default_rng(0)
    center, scale = np.array([120.0, 80.0]), np.array([0.9, 1.2])
    fwd = affine_matrix(center, scale, rotation, (48, 64))
    inv = affine_matrix(center, scale, rotation, (48, 64), inv=True)
    points = rng.uniform(0, 200, (10, 2))
    np.testing.assert_allclose(apply_affine(apply_affine(points, fwd), inv), points, atol=1e-3)
    # the box center lands in the middle of the output
    np.testing.assert_allclose(apply_affine(center, fwd), [24, 32], atol=1e-4)


def test_transform_preds_inverts_the_heatmap_crop():
    center, scale = np.array([100.0, 90.0]), np.array([0.6, 0.8])
    image_points = np.array([[80.0, 60.0], [110.5, 120.25], [100.0, 90.0]])
    on_heatmap = apply_affine(image_points, affine_matrix(center, scale, 0, (12, 16)))
    np.testing.assert_allclose(transform_preds(on_heatmap, center, scale, (12, 16)), image_points, atol=1e-3)


def test_crop_moves_pixels_where_the_matrix_says():
    image = np.zeros((100, 120, 3), np.uint8)
    image[40, 70] = 255
    patch, matrix = crop(image, np.array([60.0, 50.0]), np.array([0.5, 0.5]), 0, (50, 50))
    x, y = apply_affine(np.array([70.0, 40.0]), matrix)
    py, px = np.unravel_index(patch[..., 0].argmax(), patch.shape[:2])
    assert abs(px - x) <= 1 and abs(py - y) <= 1


@pytest.mark.parametrize("joints", [COCO, MPII])
def test_fliplr_twice_is_identity_and_swaps_pairs(joints):
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 99, (joints.num_joints, 2))
    vis = np.ones((joints.num_joints, 2))
    flipped, fvis = fliplr_joints(pts, vis, 100, joints.flip_pairs)
    a, b = joints.flip_pairs[0]
    assert flipped[a, 0] == pytest.approx(99 - pts[b, 0]) and flipped[a, 1] == pytest.approx(pts[b, 1])
    back, _ = fliplr_joints(flipped, fvis, 100, joints.flip_pairs)
    np.testing.assert_allclose(back, pts)


def test_flip_back_matches_flipping_the_image():
    """Heatmaps of a mirrored person, flipped back, equal the heatmaps of the person (up to the pixel grid)."""
    rng = np.random.default_rng(2)
    pts = rng.uniform(2, 60, (17, 2))
    vis = np.ones(17)
    hm, _ = gaussian_targets(pts, vis, (64, 64), (64, 64), 2)
    mirrored, _ = fliplr_joints(pts, np.ones((17, 2)), 64, COCO.flip_pairs)
    hm_mirrored, _ = gaussian_targets(mirrored, vis, (64, 64), (64, 64), 2)
    np.testing.assert_allclose(flip_back(hm_mirrored[None], COCO.flip_pairs)[0], hm, atol=1e-6)
    np.testing.assert_allclose(flip_back(flip_back(hm[None], COCO.flip_pairs), COCO.flip_pairs)[0], hm)


def test_gaussian_targets_and_weights():
    joints = np.array([[32.0, 16.0], [-50.0, 10.0], [10.0, 10.0], [63.0, 63.0]])
    target, weight = gaussian_targets(joints, np.array([1, 1, 0, 1]), (64, 64), (16, 16), sigma=2)
    assert target.shape == (4, 16, 16)
    assert weight.ravel().tolist() == [1, 0, 0, 1]  # off the map -> 0; unlabelled -> 0
    assert target[0, 4, 8] == pytest.approx(1.0) and target[0, 4, 10] == pytest.approx(np.exp(-4 / 8))
    assert target[1].sum() == 0 and target[2].sum() == 0
    assert target[3, 15, 15] == pytest.approx(np.exp(-2 / 8))  # centre (16, 16) just off the map, tail on it


def test_decode_quarter_shift_and_inverse_affine():
    hm = np.zeros((1, 1, 16, 12), np.float32)
    hm[0, 0, 5, 7] = 1.0
    hm[0, 0, 5, 8] = 0.6  # right neighbour higher than left -> +0.25 in x
    hm[0, 0, 4, 7] = 0.5  # upper neighbour higher than lower -> -0.25 in y
    coords, maxvals = max_preds(hm)
    assert coords[0, 0].tolist() == [7, 5] and maxvals[0, 0, 0] == 1.0
    center, scale = np.array([[50.0, 60.0]]), np.array([[0.6, 0.8]])
    preds, _ = decode_heatmaps(hm, center, scale)
    expected = transform_preds(np.array([[7.25, 4.75]]), center[0], scale[0], (12, 16))
    np.testing.assert_allclose(preds[0], expected, atol=1e-4)
    # heatmap pixel size in image pixels: 0.6 * 200 / 12 = 10
    assert preds[0, 0, 0] == pytest.approx(50 + (7.25 - 6) * 10, abs=1e-3)
