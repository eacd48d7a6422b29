"""The top-down dataset shared by the COCO and MPII readers: one sample = one person box.

Readers turn their annotation files into ``records`` (image path, center, scale, joints, visibility);
this class reads the image, applies augmentation and the affine crop and builds Gaussian targets.
Augmentation randomness is drawn from ``(seed, epoch, index)`` so a run is reproducible whatever
the number of DataLoader workers, and a resumed run sees exactly the samples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from pose.data.targets import gaussian_targets
from pose.data.transforms import crop, fliplr_joints, half_body, normalize_image
from pose.keypoints import JointSet


@dataclass
class Augment:
    """Training augmentation (docs/conventions.md §4); ``None`` in a dataset means evaluation mode."""

    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6
    flip: bool = True
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8


@dataclass
class Record:
    image: str
    center: np.ndarray
    scale: np.ndarray
    joints: np.ndarray  # (K, 2) image pixels, 0-based
    visible: np.ndarray  # (K,) 0/1 labelled
    image_id: int = 0
    score: float = 1.0
    area: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path, color_order: str = "RGB") -> np.ndarray:
    """Read an image as uint8 HxWx3 in ``color_order``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"image file {path} cannot be decoded (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color_order == "RGB" else image


class PoseDataset(Dataset):
    """Items: (image float CHW normalised, target K x H/4 x W/4, target_weight K x 1, meta dict).

    With ``on_bad_image="skip"`` an unreadable image yields ``None``; ``collate`` drops it and counts
    it in ``meta["skipped"]``. With ``"fail"`` the error (naming the file) propagates.
    """

    def __init__(
        self,
        records: list[Record],
        joint_set: JointSet,
        input_hw: tuple[int, int],
        *,
        kind: str,
        augment: Augment | None = None,
        color_order: str = "RGB",
        sigma: float = 2.0,
        on_bad_image: str = "fail",
        seed: int = 0,
        root: str | Path | None = None,
    ) -> None:
        if on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
        if color_order not in ("RGB", "BGR"):
            raise ValueError(f"color_order must be RGB or BGR, got {color_order!r}")
        self.records = records
        self.joint_set = joint_set
        self.input_hw = tuple(input_hw)
        self.heatmap_hw = (input_hw[0] // 4, input_hw[1] // 4)
        self.kind = kind
        self.augment = augment
        self.color_order = color_order
        self.sigma = sigma
        self.on_bad_image = on_bad_image
        self.seed = seed
        self.epoch = 0
        self.root = root

    @property
    def num_joints(self) -> int:
        return self.joint_set.num_joints

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            image = read_image(rec.image, self.color_order)
        except (FileNotFoundError, ValueError):
            if self.on_bad_image == "skip":
                return None
            raise
        center = rec.center.astype(np.float32).copy()
        scale = rec.scale.astype(np.float32).copy()
        joints = rec.joints.astype(np.float32).copy()
        visible = np.repeat(rec.visible.reshape(-1, 1).astype(np.float32), 2, axis=1)
        rotation = 0.0
        flipped = False
        if self.augment is not None:
            aug = self.augment
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if aug.half_body_prob > 0 and visible[:, 0].sum() > aug.half_body_min_joints:
                if rng.random() < aug.half_body_prob:
                    part = half_body(joints, visible, self.joint_set.upper_body, self.input_hw, rng)
                    if part is not None:
                        center, scale = part
            sf, rf = aug.scale_factor, aug.rotation_factor
            scale = scale * np.clip(rng.normal() * sf + 1, 1 - sf, 1 + sf)
            r = float(np.clip(rng.normal() * rf, -2 * rf, 2 * rf))
            rotation = r if rng.random() <= aug.rotation_prob else 0.0
            if aug.flip and rng.random() <= 0.5:
                flipped = True
                image = image[:, ::-1]
                joints, visible = fliplr_joints(joints, visible, image.shape[1], self.joint_set.flip_pairs)
                center[0] = image.shape[1] - center[0] - 1
        patch, matrix = crop(np.ascontiguousarray(image), center, scale, rotation, self.input_hw)
        joints_in = joints @ matrix[:, :2].T + matrix[:, 2]
        target, weight = gaussian_targets(joints_in, visible[:, 0], self.input_hw, self.heatmap_hw, self.sigma)
        meta = {
            "index": index,
            "image_id": rec.image_id,
            "center": center,
            "scale": scale,
            "rotation": rotation,
            "flipped": flipped,
            "score": np.float32(rec.score),
            "joints": np.concatenate([joints, visible[:, :1]], axis=1).astype(np.float32),
            "joints_input": joints_in.astype(np.float32),
        }
        return (
            torch.from_numpy(normalize_image(patch, self.color_order)),
            torch.from_numpy(target),
            torch.from_numpy(weight),
            meta,
        )


def collate(batch: list):
    """Drop samples whose image could not be read (``on_bad_image="skip"``) and count them."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None if not batch else {"skipped": skipped}
    images, targets, weights, meta = default_collate(kept)
    meta["skipped"] = skipped
    return images, targets, weights, meta


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )
