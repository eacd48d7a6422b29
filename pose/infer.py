"""Top-down inference on images: person boxes (or the whole image) -> keypoints JSON + drawn skeletons.

Works with a training checkpoint (PyTorch, or ONNX Runtime through a temporary export) or an
exported ``.onnx`` file. Joints are coloured by confidence (red = low, green = high).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pose.data.coco import load_json
from pose.data.dataset import read_image
from pose.data.transforms import box_to_center_scale, crop, normalize_image
from pose.evaluate import decode_heatmaps, run_model
from pose.keypoints import JointSet, joint_set

LOW_CONFIDENCE = 0.2


def load_predictor(
    path: str | Path, backend: str = "torch", color_order: str | None = None, threads: int | None = None
):
    """(callable model, input_hw, colour order, number of joints) from a checkpoint or an ONNX file."""
    from pose.checkpoint import load_model
    from pose.export import OnnxPoseModel, export_onnx

    path = Path(path)
    if backend not in ("torch", "onnxruntime"):
        raise ValueError(f"unknown backend {backend!r}: expected torch or onnxruntime")
    if path.suffix == ".onnx":
        if backend == "torch":
            backend = "onnxruntime"  # an ONNX file can only run in ONNX Runtime
        model = OnnxPoseModel(path, device="cpu", threads=threads)
        out_shape = model.session.get_outputs()[0].shape
        joints = out_shape[1]
        if not isinstance(joints, int) or not all(isinstance(v, int) for v in model.input_hw):
            raise ValueError(f"ONNX model {path} needs fixed joint and input sizes, got {out_shape} / {model.input_hw}")
        return model, tuple(model.input_hw), color_order or "RGB", joints
    net, ckpt = load_model(path)
    input_hw = tuple(ckpt.get("input_hw") or (256, 256))
    order = color_order or ckpt.get("color_order", "RGB")
    joints = int(ckpt.get("joints", 16))
    if backend == "onnxruntime":
        tmp = Path(tempfile.mkdtemp(prefix="effpose-infer-")) / "model.onnx"
        export_onnx(net, tmp, input_hw, batch="dynamic")
        return OnnxPoseModel(tmp, device="cpu", threads=threads), input_hw, order, joints
    return net, input_hw, order, joints


def load_boxes(path: str | Path) -> dict[str, list[list[float]]]:
    """``{"image.jpg": [[x, y, w, h(, score)], ...]}`` or ``[{"image": name, "bbox": [...], "score": s}]``."""
    path = Path(path)
    data = load_json(path, "box file")
    boxes: dict[str, list[list[float]]] = {}
    if isinstance(data, dict):
        items = [(k, b) for k, v in data.items() for b in (v if isinstance(v, list) else [None])]
    elif isinstance(data, list):
        items = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or "image" not in entry or "bbox" not in entry:
                raise ValueError(f"box file {path}: entry {i} must be an object with 'image' and 'bbox'")
            items.append((entry["image"], list(entry["bbox"]) + [entry.get("score", 1.0)]))
    else:
        raise ValueError(f"box file {path} must map image names to [[x, y, w, h], ...] lists")
    for name, box in items:
        if not isinstance(box, list) or len(box) not in (4, 5) or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"box file {path}: boxes of {name!r} must be [x, y, w, h] or [x, y, w, h, score]")
        if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"box file {path}: a box of {name!r} has non-positive width or height: {box}")
        boxes.setdefault(str(name), []).append([float(v) for v in box])
    return boxes


def confidence_colour(conf: float) -> tuple[int, int, int]:
    """BGR colour from red (0) through yellow to green (1)."""
    c = float(np.clip(conf, 0.0, 1.0))
    return (0, int(255 * min(1.0, 2 * c)), int(255 * min(1.0, 2 * (1 - c))))


def draw_skeleton(image_bgr: np.ndarray, keypoints: np.ndarray, joints: JointSet, box=None) -> np.ndarray:
    """Edges in white where both ends are confident; joints as discs coloured by confidence."""
    out = image_bgr
    scale = max(1, int(round(max(out.shape[:2]) / 300)))
    if box is not None:
        x, y, w, h = (int(round(v)) for v in box[:4])
        cv2.rectangle(out, (x, y), (x + w, y + h), (255, 200, 0), scale)
    for a, b in joints.skeleton:
        if min(keypoints[a, 2], keypoints[b, 2]) < LOW_CONFIDENCE:
            continue
        pa = tuple(int(round(v)) for v in keypoints[a, :2])
        pb = tuple(int(round(v)) for v in keypoints[b, :2])
        cv2.line(out, pa, pb, (255, 255, 255), scale + 1, cv2.LINE_AA)
    for x, y, conf in keypoints:
        centre = (int(round(x)), int(round(y)))
        cv2.circle(
            out, centre, 2 * scale + 1, confidence_colour(conf), -1 if conf >= LOW_CONFIDENCE else scale, cv2.LINE_AA
        )
    return out


def infer(
    model_path: str | Path,
    images: list[str | Path],
    out: str | Path,
    *,
    boxes: str | Path | None = None,
    backend: str = "torch",
    color_order: str | None = None,
    flip_test: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run on each image, write ``OUT/keypoints.json`` and ``OUT/<name>`` with skeletons drawn."""
    model, input_hw, order, num_joints = load_predictor(model_path, backend, color_order)
    joints = joint_set(num_joints)
    box_map = load_boxes(boxes) if boxes is not None else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path in tqdm(list(images), desc="infer", disable=not progress, dynamic_ncols=True):
        image_path = Path(image_path)
        rgb = read_image(image_path, "RGB")
        height, width = rgb.shape[:2]
        person_boxes = box_map.get(str(image_path), box_map.get(image_path.name))
        if person_boxes is None:
            person_boxes = [[0.0, 0.0, float(width), float(height), 1.0]]
        source = rgb if order == "RGB" else rgb[:, :, ::-1]
        crops, centers, scales = [], [], []
        for box in person_boxes:
            center, scale = box_to_center_scale(box[:4], input_hw)
            patch, _ = crop(np.ascontiguousarray(source), center, scale, 0.0, input_hw)
            crops.append(normalize_image(patch, order))
            centers.append(center)
            scales.append(scale)
        batch = torch.from_numpy(np.stack(crops))
        heatmaps = run_model(model, batch, joints.flip_pairs if flip_test else None)
        coords, maxvals = decode_heatmaps(heatmaps, np.array(centers), np.array(scales))
        keypoints = np.concatenate([coords, maxvals], axis=2)
        drawn = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        people = []
        for box, kp in zip(person_boxes, keypoints, strict=True):
            draw_skeleton(drawn, kp, joints, box if boxes is not None else None)
            conf = kp[:, 2]
            score = (box[4] if len(box) > 4 else 1.0) * (
                float(conf[conf > LOW_CONFIDENCE].mean()) if (conf > LOW_CONFIDENCE).any() else 0.0
            )
            people.append(
                {"box": [round(v, 2) for v in box[:4]], "score": round(score, 4), "keypoints": np.round(kp, 3).tolist()}
            )
        suffix = image_path.suffix if image_path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
        drawn_path = out / f"{image_path.stem}_pose{suffix}"
        if not cv2.imwrite(str(drawn_path), drawn):
            raise RuntimeError(f"cannot write {drawn_path}")
        results.append({"image": str(image_path), "drawn": str(drawn_path), "people": people})
    backend = "onnxruntime" if Path(model_path).suffix == ".onnx" else backend
    doc = {
        "model": str(model_path),
        "backend": backend,
        "joints": list(joints.joints),
        "input_hw": list(input_hw),
        "images": results,
    }
    (out / "keypoints.json").write_text(json.dumps(doc, indent=1))
    return doc
