"""Evaluation: heatmap decoding, MPII PCKh and COCO OKS AP (docs/conventions.md §5-6).

``evaluate_model(model, dataset)`` runs top-down inference on every person box of a dataset and
returns the benchmark's metric dict in percent: for COCO layouts ``AP, AP50, AP75, APM, APL, AR``
(pycocotools COCOeval after rescoring and OKS-NMS), for MPII ``Head ... Ankle, Mean, Mean@0.1``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pose.data.coco import load_coco_api, load_json
from pose.data.dataset import PoseDataset, make_loader
from pose.data.mpii import MpiiGroundTruth, load_gt_valid
from pose.data.transforms import flip_back, transform_preds
from pose.keypoints import COCO, MPII_MAT_NAMES
from pose.loss import heatmap_loss

COCO_KEYS = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
MPII_KEYS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1")
IN_VIS_THRESHOLD = 0.2
OKS_NMS_THRESHOLD = 0.9


def primary_metric(metrics: dict[str, float]) -> str:
    """The number a benchmark ranks by: COCO AP, MPII PCKh@0.5 Mean."""
    return "AP" if "AP" in metrics else "Mean"


# --------------------------------------------------------------------------- decoding


def max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, H, W) -> argmax coordinates (N, K, 2) in heatmap pixels and peak values (N, K, 1)."""
    n, k, _, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    idx = flat.argmax(axis=2)
    maxvals = flat.max(axis=2)[..., None]
    coords = np.stack([idx % w, idx // w], axis=2).astype(np.float32)
    coords *= maxvals > 0.0
    return coords, maxvals.astype(np.float32)


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax, quarter-pixel shift toward the higher neighbour, inverse affine -> image coordinates."""
    coords, maxvals = max_preds(heatmaps)
    n, k, h, w = heatmaps.shape
    for i in range(n):
        for j in range(k):
            hm = heatmaps[i, j]
            px, py = int(np.floor(coords[i, j, 0] + 0.5)), int(np.floor(coords[i, j, 1] + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([hm[py, px + 1] - hm[py, px - 1], hm[py + 1, px] - hm[py - 1, px]])
                coords[i, j] += np.sign(diff) * 0.25
    preds = np.stack([transform_preds(coords[i], centers[i], scales[i], (w, h)) for i in range(n)])
    return preds.astype(np.float32), maxvals


def run_model(model: Any, images: torch.Tensor, flip_pairs=None, device: str | torch.device = "cpu") -> np.ndarray:
    """Heatmaps of a torch module or a numpy callable (ONNX); with ``flip_pairs``, the flip test:
    average with the flipped-back heatmaps of the mirrored input, shifted one pixel right."""

    def forward(batch: torch.Tensor) -> np.ndarray:
        if isinstance(model, nn.Module):
            with torch.no_grad():
                return model(batch.to(device)).float().cpu().numpy()
        return np.asarray(model(batch.numpy()))

    out = forward(images)
    if flip_pairs is not None:
        flipped = flip_back(forward(torch.flip(images, dims=[3])), flip_pairs)
        flipped[:, :, :, 1:] = flipped.copy()[:, :, :, :-1]
        out = (out + flipped) * 0.5
    return out


def predict(
    model: Any,
    dataset: PoseDataset,
    *,
    batch_size: int = 32,
    flip_test: bool = False,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Keypoints (N, K, 3: x, y, confidence) in image pixels for every sample, plus the validation loss."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    n, k = len(dataset), dataset.num_joints
    preds = np.zeros((n, k, 3), np.float32)
    valid = np.zeros(n, bool)
    centers, scales = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
    scores, image_ids = np.zeros(n, np.float32), np.zeros(n, np.int64)
    loss_sum, loss_count = 0.0, 0
    loader = make_loader(dataset, batch_size, workers=workers)
    flip_pairs = dataset.joint_set.flip_pairs if flip_test else None
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        if batch is None or isinstance(batch, dict):
            continue
        images, target, weight, meta = batch
        heatmaps = run_model(model, images, flip_pairs, device)
        loss_sum += float(heatmap_loss(torch.from_numpy(heatmaps), target, weight)) * len(images)
        loss_count += len(images)
        idx = meta["index"].numpy()
        c, s = meta["center"].numpy(), meta["scale"].numpy()
        coords, maxvals = decode_heatmaps(heatmaps, c, s)
        preds[idx, :, :2], preds[idx, :, 2:] = coords, maxvals
        valid[idx], centers[idx], scales[idx] = True, c, s
        scores[idx], image_ids[idx] = meta["score"].numpy(), meta["image_id"].numpy()
    if isinstance(model, nn.Module):
        model.train(was_training)
    return {
        "preds": preds,
        "valid": valid,
        "centers": centers,
        "scales": scales,
        "scores": scores,
        "image_ids": image_ids,
        "loss": np.float32(loss_sum / max(1, loss_count)),
    }


# --------------------------------------------------------------------------- MPII PCKh


def pckh(preds: np.ndarray, gt: MpiiGroundTruth, threshold: float = 0.5) -> dict[str, float]:
    """PCKh in percent; ``preds`` (N, 16, 2) are 0-based pixels in annotation order, ground truth 1-based.

    Head size = 0.6 x head-box diagonal; Mean weights joints by their visible counts and leaves out
    pelvis and thorax; Mean@0.1 is the same at threshold 0.1.
    """
    preds = np.asarray(preds, dtype=np.float64)[..., :2]
    if preds.shape[0] != gt.joints.shape[0] or preds.shape[1:] != (16, 2):
        raise ValueError(
            f"MPII predictions have shape {tuple(preds.shape)}, expected ({gt.joints.shape[0]}, 16, 2) "
            "(one [x, y] list of 16 joints per ground-truth sample, in annotation order)"
        )
    names = list(gt.joint_names) if len(gt.joint_names) == 16 else list(MPII_MAT_NAMES)
    visible = ~gt.missing  # (N, 16)
    err = np.linalg.norm(preds + 1.0 - gt.joints, axis=2)
    head = 0.6 * np.linalg.norm(gt.head_boxes[:, 1, :] - gt.head_boxes[:, 0, :], axis=1)
    scaled = err / np.maximum(head, 1e-12)[:, None]
    counts = visible.sum(axis=0).astype(np.float64)

    def per_joint(thr: float) -> np.ndarray:
        hits = ((scaled <= thr) & visible).sum(axis=0)
        return np.divide(100.0 * hits, counts, out=np.zeros(16), where=counts > 0)

    at, at01 = per_joint(threshold), per_joint(0.1)
    weights = counts.copy()
    weights[[names.index("pelv"), names.index("thor")]] = 0
    weights = weights / max(weights.sum(), 1.0)

    def pair(a: str, b: str) -> float:
        return float(0.5 * (at[names.index(a)] + at[names.index(b)]))

    return {
        "Head": float(at[names.index("head")]),
        "Shoulder": pair("lsho", "rsho"),
        "Elbow": pair("lelb", "relb"),
        "Wrist": pair("lwri", "rwri"),
        "Hip": pair("lhip", "rhip"),
        "Knee": pair("lkne", "rkne"),
        "Ankle": pair("lank", "rank"),
        "Mean": float((at * weights).sum()),
        "Mean@0.1": float((at01 * weights).sum()),
    }


# --------------------------------------------------------------------------- COCO OKS AP


def oks(g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas, vis_threshold=None) -> np.ndarray:
    """OKS of one pose ``g`` (K*3) against poses ``d`` (M, K*3), as in HRNet's oks_iou."""
    sigmas = np.asarray(sigmas)
    variances = (sigmas * 2) ** 2
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    out = np.zeros(len(d))
    for i, det in enumerate(d):
        dx, dy, vd = det[0::3] - xg, det[1::3] - yg, det[2::3]
        e = (dx**2 + dy**2) / variances / ((area_g + area_d[i]) / 2 + np.spacing(1)) / 2
        if vis_threshold is not None:
            e = e[(vg > vis_threshold) & (vd > vis_threshold)]
        out[i] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
    return out


def oks_nms(kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, threshold: float, sigmas, vis_threshold=None):
    """Greedy NMS on OKS: keep the best-scoring pose, drop the others whose OKS with it exceeds ``threshold``."""
    if len(kpts) == 0:
        return []
    flat = np.asarray(kpts).reshape(len(kpts), -1)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        overlaps = oks(flat[i], flat[order[1:]], areas[i], areas[order[1:]], sigmas, vis_threshold)
        order = order[1:][overlaps <= threshold]
    return keep


def coco_results(prediction: dict[str, np.ndarray], sigmas=COCO.sigmas) -> list[dict]:
    """Rescore (box score x mean confidence of joints above 0.2) and OKS-NMS per image -> COCO results."""
    preds, valid = prediction["preds"], prediction["valid"]
    areas = prediction["scales"][:, 0] * prediction["scales"][:, 1] * 200.0**2
    results = []
    for image_id in np.unique(prediction["image_ids"][valid]):
        idx = np.nonzero(valid & (prediction["image_ids"] == image_id))[0]
        rescored = []
        for i in idx:
            conf = preds[i, :, 2]
            above = conf[conf > IN_VIS_THRESHOLD]
            rescored.append(float(prediction["scores"][i]) * (float(above.mean()) if above.size else 0.0))
        rescored = np.array(rescored)
        keep = oks_nms(preds[idx], rescored, areas[idx], OKS_NMS_THRESHOLD, sigmas, IN_VIS_THRESHOLD)
        for j in keep:
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": 1,
                    "keypoints": [round(float(v), 3) for v in preds[idx[j]].reshape(-1)],
                    "score": float(rescored[j]),
                }
            )
    return results


def coco_ap(gt: Any, results: list[dict]) -> dict[str, float | None]:
    """pycocotools COCOeval (iouType keypoints) in percent; ``gt`` is a COCO api object or annotation path."""
    from pycocotools.cocoeval import COCOeval

    api = gt if not isinstance(gt, (str, Path)) else load_coco_api(gt)
    if not results:
        return {key: 0.0 for key in COCO_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = api.loadRes(results)
        evaluator = COCOeval(api, dt, "keypoints")
        evaluator.params.useSegm = None
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a category has no ground truth (e.g. no large person): None here
    return {
        key: (float(value) * 100.0 if value >= 0 else None)
        for key, value in zip(COCO_KEYS, evaluator.stats, strict=True)
    }


# --------------------------------------------------------------------------- entry points


def metrics_from_prediction(dataset: PoseDataset, prediction: dict[str, np.ndarray]) -> dict[str, float]:
    if dataset.kind == "coco":
        return coco_ap(dataset.coco, coco_results(prediction, dataset.joint_set.sigmas or COCO.sigmas))
    gt = mpii_ground_truth(dataset)
    return pckh(prediction["preds"][..., :2], gt)


def mpii_ground_truth(dataset: PoseDataset) -> MpiiGroundTruth:
    """The split's gt_*.mat (reference layout: annot/gt_valid.mat)."""
    gt_file = Path(dataset.gt_file)  # type: ignore[attr-defined]
    if not gt_file.is_file():
        raise FileNotFoundError(f"MPII evaluation needs the ground-truth file {gt_file} (head boxes for PCKh)")
    gt = load_gt_valid(gt_file)
    if gt.joints.shape[0] != len(dataset):
        raise ValueError(
            f"MPII ground-truth file {gt_file} has {gt.joints.shape[0]} samples but "
            f"{dataset.annotation_file} has {len(dataset)}"  # type: ignore[attr-defined]
        )
    return gt


def evaluate_model(
    model: Any,
    dataset: PoseDataset,
    *,
    flip_test: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """The benchmark metric dict (percent) of ``model`` on ``dataset``, plus ``loss`` (validation MSE)."""
    prediction = predict(
        model, dataset, batch_size=batch_size, flip_test=flip_test, workers=workers, device=device, progress=progress
    )
    metrics = metrics_from_prediction(dataset, prediction)
    metrics["loss"] = float(prediction["loss"])
    metrics["samples"] = int(prediction["valid"].sum())
    return metrics


def evaluate_predictions(path: str | Path, dataset: PoseDataset) -> dict[str, float]:
    """Stored predictions: a COCO keypoint results JSON, or MPII ``{"preds": [[[x, y] x 16] per sample]}``."""
    path = Path(path)
    data = load_json(path, "predictions file")
    if dataset.kind == "coco":
        if not isinstance(data, list):
            raise ValueError(f"predictions file {path} must be a COCO keypoint results list for COCO data")
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or not {"image_id", "keypoints", "score"} <= set(entry):
                raise ValueError(f"predictions file {path}: entry {i} lacks image_id, keypoints or score")
            if len(entry["keypoints"]) != 3 * COCO.num_joints:
                raise ValueError(f"predictions file {path}: entry {i} has {len(entry['keypoints'])} keypoint values")
            if entry["image_id"] not in dataset.coco.imgs:  # type: ignore[attr-defined]
                raise ValueError(f"predictions file {path}: entry {i} names unknown image_id {entry['image_id']}")
            entry.setdefault("category_id", 1)
        return coco_ap(dataset.coco, data)  # type: ignore[attr-defined]
    if not isinstance(data, dict) or "preds" not in data:
        raise ValueError(f'predictions file {path} must be {{"preds": [[[x, y] x 16] per sample]}} for MPII data')
    try:
        preds = np.asarray(data["preds"], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"predictions file {path}: 'preds' is not a rectangular array of numbers") from exc
    return pckh(preds[..., :2] if preds.ndim == 3 else preds, mpii_ground_truth(dataset))


def save_predictions(path: str | Path, dataset: PoseDataset, prediction: dict[str, np.ndarray]) -> None:
    """Write predictions in the format ``evaluate_predictions`` reads back."""
    path = Path(path)
    if dataset.kind == "coco":
        doc: Any = coco_results(prediction, dataset.joint_set.sigmas or COCO.sigmas)
    else:
        doc = {"preds": np.round(prediction["preds"][..., :2], 3).tolist()}
    path.write_text(json.dumps(doc))
