"""Training targets: one unnormalised Gaussian (peak 1) per joint on the heatmap grid (docs/conventions.md §5)."""

from __future__ import annotations

import numpy as np


def gaussian_targets(
    joints: np.ndarray,
    visible: np.ndarray,
    input_hw: tuple[int, int],
    heatmap_hw: tuple[int, int],
    sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Joints in input-pixel coordinates (K, 2) -> (heatmaps K x H x W, weights K x 1).

    The weight is the visibility flag, set to 0 when the Gaussian lies entirely off the map, so such
    joints neither pull the prediction anywhere nor count in the loss.
    """
    num = joints.shape[0]
    hm_h, hm_w = heatmap_hw
    stride = np.array([input_hw[1] / hm_w, input_hw[0] / hm_h], dtype=np.float32)
    target = np.zeros((num, hm_h, hm_w), dtype=np.float32)
    weight = (np.asarray(visible).reshape(num, -1)[:, :1] > 0).astype(np.float32)
    radius = sigma * 3
    size = int(2 * radius + 1)
    xs = np.arange(size, dtype=np.float32)
    ys = xs[:, None]
    centre = size // 2
    gaussian = np.exp(-((xs - centre) ** 2 + (ys - centre) ** 2) / (2 * sigma**2))
    for j in range(num):
        if weight[j, 0] == 0:
            continue
        mu_x = int(joints[j, 0] / stride[0] + 0.5)
        mu_y = int(joints[j, 1] / stride[1] + 0.5)
        ul = (int(mu_x - radius), int(mu_y - radius))
        br = (int(mu_x + radius + 1), int(mu_y + radius + 1))
        if ul[0] >= hm_w or ul[1] >= hm_h or br[0] < 0 or br[1] < 0:
            weight[j, 0] = 0
            continue
        gx = max(0, -ul[0]), min(br[0], hm_w) - ul[0]
        gy = max(0, -ul[1]), min(br[1], hm_h) - ul[1]
        ix = max(0, ul[0]), min(br[0], hm_w)
        iy = max(0, ul[1]), min(br[1], hm_h)
        target[j, iy[0] : iy[1], ix[0] : ix[1]] = gaussian[gy[0] : gy[1], gx[0] : gx[1]]
    return target, weight
