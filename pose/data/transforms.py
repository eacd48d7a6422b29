"""Geometry of top-down pose estimation (HRNet/SimpleBaseline conventions, docs/conventions.md §3).

A person is described by (center, scale, rotation): ``scale`` is the padded box size in units of
200 pixels. ``affine_matrix`` maps that box onto the network input (or heatmap); ``inv=True``
maps back, which is how predictions return to image coordinates.
"""

from __future__ import annotations

import cv2
import numpy as np

PIXEL_STD = 200.0
MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def box_to_center_scale(box: tuple[float, float, float, float], input_hw: tuple[int, int], padding: float = 1.25):
    """(x, y, w, h) box -> (center, scale): pad to the input aspect ratio, scale = (w, h) / 200 * padding."""
    x, y, w, h = (float(v) for v in box)
    aspect = input_hw[1] / input_hw[0]
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32)
    if center[0] != -1:
        scale = scale * padding
    return center, scale


def _rotate(point: np.ndarray, rad: float) -> np.ndarray:
    sn, cs = np.sin(rad), np.cos(rad)
    return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs], dtype=np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def affine_matrix(
    center: np.ndarray,
    scale: np.ndarray,
    rotation: float,
    output_wh: tuple[int, int],
    shift: tuple[float, float] = (0.0, 0.0),
    inv: bool = False,
) -> np.ndarray:
    """2x3 matrix taking the (center, scale, rotation) box to an output of size ``output_wh`` (w, h)."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        scale = np.array([scale, scale], dtype=np.float32)
    src_w = scale[0] * PIXEL_STD
    dst_w, dst_h = output_wh
    rad = np.pi * rotation / 180
    src_dir = _rotate(np.array([0, src_w * -0.5], dtype=np.float32), rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)
    shift = np.asarray(shift, dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = np.asarray(center, dtype=np.float32) + scale * PIXEL_STD * shift
    src[1] = src[0] + src_dir
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to an (..., 2) array of points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def transform_preds(coords: np.ndarray, center: np.ndarray, scale: np.ndarray, output_wh: tuple[int, int]):
    """Heatmap (or input) coordinates -> image coordinates through the inverse affine of the crop."""
    return apply_affine(coords, affine_matrix(center, scale, 0, output_wh, inv=True))


def crop(image: np.ndarray, center, scale, rotation: float, input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp the person box to the network input; returns (crop HxWx3, the 2x3 matrix used)."""
    matrix = affine_matrix(center, scale, rotation, (input_hw[1], input_hw[0]))
    out = cv2.warpAffine(image, matrix, (input_hw[1], input_hw[0]), flags=cv2.INTER_LINEAR)
    return out, matrix


def fliplr_joints(joints: np.ndarray, visible: np.ndarray, width: int, flip_pairs) -> tuple[np.ndarray, np.ndarray]:
    """Mirror joints of an image of ``width`` pixels and swap left/right joints."""
    joints = joints.copy()
    visible = visible.copy()
    joints[:, 0] = width - joints[:, 0] - 1
    for a, b in flip_pairs:
        joints[[a, b]] = joints[[b, a]]
        visible[[a, b]] = visible[[b, a]]
    return joints * (visible[:, :1] > 0), visible


def flip_back(heatmaps: np.ndarray, flip_pairs) -> np.ndarray:
    """Heatmaps of a flipped input (N, K, H, W) -> heatmaps in the original orientation."""
    out = heatmaps[..., ::-1].copy()
    for a, b in flip_pairs:
        out[:, [a, b]] = out[:, [b, a]]
    return out


def half_body(joints: np.ndarray, visible: np.ndarray, upper_body, input_hw: tuple[int, int], rng: np.random.Generator):
    """Center/scale of a random upper- or lower-body part (HRNet's half-body augmentation); None if too few joints."""
    upper = [j for j in range(len(joints)) if visible[j, 0] > 0 and j in upper_body]
    lower = [j for j in range(len(joints)) if visible[j, 0] > 0 and j not in upper_body]
    chosen = upper if (rng.random() < 0.5 and len(upper) > 2) or len(lower) <= 2 else lower
    if len(chosen) < 2:
        return None
    pts = joints[chosen, :2]
    center = pts.mean(axis=0)
    left_top, right_bottom = pts.min(axis=0), pts.max(axis=0)
    w, h = right_bottom - left_top
    aspect = input_hw[1] / input_hw[0]
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * 1.5
    return center.astype(np.float32), scale


def normalize_image(image: np.ndarray, color_order: str = "RGB") -> np.ndarray:
    """uint8 HxWx3 image in ``color_order`` -> float32 CHW normalised with ImageNet statistics."""
    mean, std = (MEAN_RGB, STD_RGB) if color_order == "RGB" else (MEAN_RGB[::-1], STD_RGB[::-1])
    out = (image.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))
