"""MPII reader: ``ROOT/annot/{train,valid}.json`` (HRNet format), ``ROOT/images/``, ``ROOT/annot/gt_valid.mat``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from pose.data.coco import load_json
from pose.data.dataset import Augment, PoseDataset, Record
from pose.keypoints import MPII, MPII_MAT_NAMES

MPII_AUGMENT = Augment(scale_factor=0.25, rotation_factor=30.0, half_body_prob=0.0)


def mpii_records(annotation_file: Path, image_dir: Path) -> list[Record]:
    """On load: center[1] += 15 * scale, scale *= 1.25, 1-based -> 0-based (docs/conventions.md §2)."""
    data = load_json(annotation_file)
    if not isinstance(data, list):
        raise ValueError(f"annotation file {annotation_file} must be a JSON list of person entries")
    records = []
    k = MPII.num_joints
    for i, entry in enumerate(data):
        try:
            center = np.array(entry["center"], dtype=np.float32)
            scale = float(entry["scale"])
            joints = np.array(entry["joints"], dtype=np.float32).reshape(k, 2)
            visible = np.array(entry["joints_vis"], dtype=np.float32).reshape(k)
            image = image_dir / entry["image"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"annotation file {annotation_file}: entry {i} is malformed ({type(exc).__name__}: {exc}); "
                "expected image, center [x, y], scale, joints [[x, y] x 16], joints_vis [16]"
            ) from exc
        if center[0] != -1:
            center[1] += 15 * scale
            scale *= 1.25
        records.append(
            Record(
                image=str(image),
                center=center - 1,
                scale=np.array([scale, scale], dtype=np.float32),
                joints=joints - 1,
                visible=(visible > 0).astype(np.float32),
                image_id=i,
            )
        )
    return records


@dataclass
class MpiiGroundTruth:
    """The reference evaluation file: joints (N, 16, 2) 1-based, missing (N, 16) bool, head boxes (N, 2, 2)."""

    joints: np.ndarray
    missing: np.ndarray
    head_boxes: np.ndarray
    joint_names: tuple[str, ...]


def _matlab_string(value) -> str:
    """Unwrap MATLAB cell/char nesting as loadmat returns it (object arrays of 1-element arrays).

    The real file holds a 1x16 cell of 1x1 cells of char arrays; a plain cell of char arrays works too.
    """
    while isinstance(value, np.ndarray):
        if value.size != 1:
            return "".join(str(v) for v in value.ravel())
        value = value.ravel()[0]
    return str(value)


def _gt_array(mat: dict, key: str, lead: tuple[int, ...], path: Path) -> np.ndarray:
    """``mat[key]`` as float64 of shape ``lead + (N,)``; MATLAB drops the trailing N when it is 1."""
    if key not in mat:
        raise ValueError(f"MPII ground-truth file {path} has no '{key}' field")
    value = np.asarray(mat[key], dtype=np.float64)
    if value.shape == lead:
        value = value[..., None]
    if value.shape[:-1] != lead:
        expected = "x".join(map(str, lead))
        raise ValueError(f"MPII ground-truth file {path}: '{key}' has shape {value.shape}, expected {expected}xN")
    return value


def load_gt_valid(path: str | Path) -> MpiiGroundTruth:
    """Read the reference ``gt_valid.mat``: ``pos_gt_src`` 16x2xN and ``headboxes_src`` 2x2xN in 1-based
    pixels, ``jnt_missing`` 16xN, ``dataset_joints`` the joint names (optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MPII ground-truth file {path} does not exist")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for damaged files
        raise ValueError(f"MPII ground-truth file {path} cannot be read: {exc}") from exc
    missing = _gt_array(mat, "jnt_missing", (16,), path)
    pos = _gt_array(mat, "pos_gt_src", (16, 2), path)
    heads = _gt_array(mat, "headboxes_src", (2, 2), path)
    if not missing.shape[-1] == pos.shape[-1] == heads.shape[-1]:
        raise ValueError(
            f"MPII ground-truth file {path}: jnt_missing, pos_gt_src and headboxes_src hold "
            f"{missing.shape[-1]}, {pos.shape[-1]} and {heads.shape[-1]} samples"
        )
    names = MPII_MAT_NAMES
    if "dataset_joints" in mat:
        names = tuple(_matlab_string(n) for n in np.ravel(mat["dataset_joints"]))
        if sorted(names) != sorted(MPII_MAT_NAMES):
            raise ValueError(f"MPII ground-truth file {path}: dataset_joints {names} are not the 16 MPII joints")
    return MpiiGroundTruth(
        joints=pos.transpose(2, 0, 1),
        missing=missing.T.astype(bool),
        head_boxes=heads.transpose(2, 0, 1),
        joint_names=names,
    )


def mpii_dataset(root: str | Path, split: str, input_hw: tuple[int, int], *, train: bool, **kwargs) -> PoseDataset:
    root = Path(root)
    annotation_file = root / "annot" / f"{split}.json"
    records = mpii_records(annotation_file, root / "images")
    if not records:
        raise ValueError(f"annotation file {annotation_file} has no person entries")
    dataset = PoseDataset(
        records, MPII, input_hw, kind="mpii", augment=MPII_AUGMENT if train else None, root=root, **kwargs
    )
    dataset.annotation_file = annotation_file  # type: ignore[attr-defined]
    dataset.gt_file = root / "annot" / f"gt_{split}.mat"  # type: ignore[attr-defined]
    return dataset
