"""The thin seam between the search and ``pose``'s data and loss: open a training set from a SPEC,
unpack a batch, the heatmap loss of Eq. 6 and a heatmap PCK for the random-search baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pose.loss import heatmap_loss  # noqa: F401  (re-exported: Eq. 6 L_MSE, the one training uses)


def open_train_set(spec: str, input_hw: tuple[int, int], seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """The training split of ``spec`` twice (with augmentation for the steps, without for validation;
    same records in the same order) and its joint count."""
    from pose.data import build_dataset

    augmented = build_dataset(spec, "train", input_hw, train=True, seed=seed)
    plain = build_dataset(spec, "train", input_hw, train=False, seed=seed)
    if len(augmented) != len(plain):
        raise RuntimeError(f"data {spec!r}: the training split changed while it was being read")
    return augmented, plain, int(augmented.num_joints)


def pose_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int, seed: int) -> DataLoader:
    from pose.data.dataset import make_loader

    return make_loader(dataset, batch_size, shuffle=shuffle, workers=workers, seed=seed)


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Augmentation of ``pose.data`` is drawn from (seed, epoch, index): tell the dataset the epoch."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """(images, target heatmaps, target weights [N, K, 1]) of a ``pose.data`` batch; None when every image
    of the batch was unreadable and skipped."""
    if batch is None or isinstance(batch, dict):
        return None
    return batch[0], batch[1], batch[2]


@torch.no_grad()
def heatmap_accuracy(pred: Tensor, target: Tensor, weight: Tensor, threshold: float = 0.5) -> tuple[float, float]:
    """(correct, counted) joints: argmax distance / (heatmap size / 10) below ``threshold`` (HRNet's accuracy)."""
    n, k, h, w = pred.shape
    vis = (weight.reshape(n, k) > 0) & (target.reshape(n, k, -1).amax(-1) > 0)

    def argmax_xy(maps: Tensor) -> Tensor:
        idx = maps.reshape(n, k, -1).argmax(-1)
        return torch.stack([idx % w, idx // w], dim=-1).float()

    norm = torch.tensor([w / 10.0, h / 10.0])
    dist = ((argmax_xy(pred) - argmax_xy(target)) / norm).norm(dim=-1)
    correct = ((dist < threshold) & vis).sum()
    return float(correct), float(vis.sum())
