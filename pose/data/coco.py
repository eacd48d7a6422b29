"""COCO keypoints reader: ``ROOT/annotations/person_keypoints_{split}.json`` + ``ROOT/images/{split}/``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO as CocoApi

from pose.data.dataset import Augment, PoseDataset, Record
from pose.data.transforms import box_to_center_scale
from pose.keypoints import COCO

COCO_AUGMENT = Augment(scale_factor=0.35, rotation_factor=45.0, half_body_prob=0.3)


def load_json(path: Path, what: str = "annotation file"):
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is corrupt or truncated: {exc}") from exc


def load_coco_api(annotation_file: str | Path) -> CocoApi:
    """pycocotools COCO object built from a validated file (its chatter kept off stdout)."""
    path = Path(annotation_file)
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path} is not a COCO document (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {path} has no '{key}' list")
    for ann in data["annotations"]:
        kp = ann.get("keypoints")
        if ann.get("category_id") == 1 and kp is not None and len(kp) != 3 * COCO.num_joints:
            raise ValueError(
                f"annotation file {path}: annotation {ann.get('id')} has {len(kp)} keypoint values, "
                f"expected {3 * COCO.num_joints}"
            )
        if "bbox" not in ann or "image_id" not in ann:
            raise ValueError(f"annotation file {path}: annotation {ann.get('id')} lacks 'bbox' or 'image_id'")
    api = CocoApi()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def coco_records(api: CocoApi, image_dir: Path, input_hw: tuple[int, int]) -> list[Record]:
    """Person instances with at least one labelled keypoint, cleaned boxes -> center/scale (HRNet)."""
    records = []
    for image_id in sorted(api.getImgIds()):
        info = api.imgs[image_id]
        width, height = info.get("width", 0), info.get("height", 0)
        for ann in api.loadAnns(api.getAnnIds(imgIds=image_id, iscrowd=False)):
            if ann.get("category_id") != 1 or max(ann.get("keypoints") or [0]) == 0:
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = max(0, x), max(0, y)
            x2 = min(width - 1, x1 + max(0, w - 1)) if width else x1 + max(0, w - 1)
            y2 = min(height - 1, y1 + max(0, h - 1)) if height else y1 + max(0, h - 1)
            if ann.get("area", 1) <= 0 or x2 < x1 or y2 < y1:
                continue
            kp = np.array(ann["keypoints"], dtype=np.float32).reshape(-1, 3)
            center, scale = box_to_center_scale((x1, y1, x2 - x1, y2 - y1), input_hw)
            records.append(
                Record(
                    image=str(image_dir / info["file_name"]),
                    center=center,
                    scale=scale,
                    joints=kp[:, :2].copy(),
                    visible=(kp[:, 2] > 0).astype(np.float32),
                    image_id=int(image_id),
                    area=float(ann.get("area", w * h)),
                )
            )
    return records


def detection_records(
    api: CocoApi, image_dir: Path, boxes_file: str | Path, input_hw: tuple[int, int], min_score: float = 0.0
) -> list[Record]:
    """Person boxes from a COCO detection-results JSON ([{image_id, category_id, bbox, score}])."""
    path = Path(boxes_file)
    dets = load_json(path, "box file")
    if not isinstance(dets, list):
        raise ValueError(f"box file {path} must be a JSON list of {{image_id, bbox, score}} objects")
    records = []
    for i, det in enumerate(dets):
        if not isinstance(det, dict) or "bbox" not in det or "image_id" not in det:
            raise ValueError(f"box file {path}: entry {i} lacks 'image_id' or 'bbox'")
        if det.get("category_id", 1) != 1 or det.get("score", 1.0) <= min_score:
            continue
        if det["image_id"] not in api.imgs:
            raise ValueError(f"box file {path}: entry {i} names image_id {det['image_id']} not in the annotations")
        center, scale = box_to_center_scale(det["bbox"], input_hw)
        k = COCO.num_joints
        records.append(
            Record(
                image=str(image_dir / api.imgs[det["image_id"]]["file_name"]),
                center=center,
                scale=scale,
                joints=np.zeros((k, 2), np.float32),
                visible=np.zeros(k, np.float32),
                image_id=int(det["image_id"]),
                score=float(det.get("score", 1.0)),
            )
        )
    return records


def coco_dataset(
    root: str | Path,
    split: str,
    input_hw: tuple[int, int],
    *,
    train: bool,
    boxes: str | Path | None = None,
    **kwargs,
) -> PoseDataset:
    root = Path(root)
    annotation_file = root / "annotations" / f"person_keypoints_{split}.json"
    api = load_coco_api(annotation_file)
    image_dir = root / "images" / split
    if boxes is not None:
        records = detection_records(api, image_dir, boxes, input_hw)
    else:
        records = coco_records(api, image_dir, input_hw)
    if not records:
        raise ValueError(f"annotation file {annotation_file} has no person with a labelled keypoint")
    dataset = PoseDataset(
        records, COCO, input_hw, kind="coco", augment=COCO_AUGMENT if train else None, root=root, **kwargs
    )
    dataset.coco = api  # type: ignore[attr-defined]
    dataset.annotation_file = annotation_file  # type: ignore[attr-defined]
    return dataset
