"""The heatmap loss (paper Eq. 6), shared by training, evaluation and the search."""

from __future__ import annotations

from torch import Tensor


def heatmap_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """MSE per joint weighted by the target weight (paper Eq. 6; HRNet's JointsMSELoss: 0.5 x mean)."""
    if pred.shape != target.shape:
        raise ValueError(f"model output {tuple(pred.shape)} does not match the target heatmaps {tuple(target.shape)}")
    w = weight.reshape(weight.shape[0], weight.shape[1], 1, 1).to(pred.dtype)
    return 0.5 * ((pred * w - target * w) ** 2).mean()
