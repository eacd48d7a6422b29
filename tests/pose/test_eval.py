"""PCKh and OKS AP against small hand-computed cases; rescoring, OKS-NMS, stored predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effpose.cli import main
from pose.data import build_dataset, make_loader
from pose.data.mpii import MpiiGroundTruth
from pose.data.synthetic import generate_coco, generate_mpii
from pose.evaluate import (
    coco_ap,
    coco_results,
    evaluate_model,
    evaluate_predictions,
    oks,
    oks_nms,
    pckh,
)
from pose.keypoints import COCO, MPII_MAT_NAMES


def _mpii_case():
    rng = np.random.default_rng(0)
    gt = rng.uniform(20, 200, (2, 16, 2))  # 1-based
    missing = np.zeros((2, 16), bool)
    missing[1, 15] = True  # l-wrist unlabelled in sample 1
    heads = np.zeros((2, 2, 2))
    heads[:, 1, 1] = 50 / 3  # diagonal 16.67 -> head size 0.6 * 16.67 = 10 px; PCKh@0.5 -> 5 px
    truth = MpiiGroundTruth(joints=gt, missing=missing, head_boxes=heads, joint_names=MPII_MAT_NAMES)
    preds = gt - 1.0  # perfect, 0-based
    preds[0, 9, 0] += 6  # head: wrong at 0.5
    preds[0, 10, 1] += 4  # r-wrist: right at 0.5, wrong at 0.1 (1 px)
    preds[0, 5, 0] += 3  # l-ankle: same
    preds[0, 6] += 100  # pelvis: wrong, but left out of Mean
    preds[1] += np.array([0.3, 0.4])  # 0.5 px off: right at both thresholds
    return preds, truth


def test_pckh_hand_computed():
    preds, truth = _mpii_case()
    result = pckh(preds, truth)
    assert result["Head"] == pytest.approx(50.0)
    for part in ("Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle"):
        assert result[part] == pytest.approx(100.0)
    # 14 joints without pelvis/thorax, 27 visible (l-wrist once): one miss at 0.5, three at 0.1
    assert result["Mean"] == pytest.approx(100 * 26 / 27)
    assert result["Mean@0.1"] == pytest.approx(100 * 24 / 27)


def test_pckh_rejects_wrong_shape():
    preds, truth = _mpii_case()
    with pytest.raises(ValueError, match=r"expected \(2, 16, 2\)"):
        pckh(preds[:1], truth)


def _coco_gt(tmp_path, area=10000.0):
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(10, 90, (17, 2)), np.full((17, 1), 2)], axis=1)
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [0, 0, 100, 100],
                "area": area,
                "keypoints": kp.ravel().tolist(),
                "num_keypoints": 17,
            }
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return path, kp


def test_oks_ap_hand_computed(tmp_path):
    """Every keypoint offset so that its OKS term is 0.78: OKS 0.78 passes thresholds .50 .. .75 -> AP 60."""
    path, kp = _coco_gt(tmp_path)
    sigmas = np.array(COCO.sigmas)
    d = np.sqrt(-np.log(0.78) * 2 * 10000.0 * (2 * sigmas) ** 2)
    pred = kp.copy()
    pred[:, 0] += d
    assert oks(kp.ravel(), pred.ravel()[None], 10000.0, np.array([10000.0]), sigmas)[0] == pytest.approx(0.78)
    result = coco_ap(path, [{"image_id": 1, "category_id": 1, "keypoints": pred.ravel().tolist(), "score": 0.9}])
    assert result["AP"] == pytest.approx(60.0, abs=0.01)
    assert result["AP50"] == pytest.approx(100.0) and result["AP75"] == pytest.approx(100.0)
    assert result["APL"] == pytest.approx(60.0, abs=0.01) and result["APM"] is None  # no medium person
    assert result["AR"] == pytest.approx(60.0, abs=0.01)
    perfect = coco_ap(path, [{"image_id": 1, "category_id": 1, "keypoints": kp.ravel().tolist(), "score": 1.0}])
    assert perfect["AP"] == pytest.approx(100.0)


def test_oks_nms_and_rescoring():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.uniform(0, 100, (17, 2)), np.ones((17, 1))], axis=1)
    near = a.copy()
    near[:, :2] += 0.5
    far = a.copy()
    far[:, :2] += 60
    kpts = np.stack([near, a, far])
    keep = oks_nms(kpts, np.array([0.8, 0.9, 0.5]), np.full(3, 5000.0), 0.9, COCO.sigmas)
    assert keep == [1, 2]  # the duplicate of the best pose is suppressed, the distant pose kept
    conf = np.full(17, 0.1)
    conf[:4] = 0.8  # only joints above 0.2 count: mean 0.8
    prediction = {
        "preds": np.concatenate([a[None, :, :2], conf[None, :, None]], axis=2).astype(np.float32),
        "valid": np.array([True]),
        "scales": np.array([[0.5, 0.5]]),
        "scores": np.array([0.5]),
        "image_ids": np.array([3]),
    }
    (result,) = coco_results(prediction)
    assert result["score"] == pytest.approx(0.5 * 0.8) and result["image_id"] == 3


class Oracle:
    """A 'model' that answers with the dataset's own target heatmaps (tests decoding + metrics end to end)."""

    def __init__(self, dataset):
        self.batches = iter([batch[1].numpy() for batch in make_loader(dataset, 32)])

    def __call__(self, images):
        return next(self.batches)


def test_end_to_end_metrics_with_oracle_heatmaps(tmp_path):
    coco = build_dataset(f"coco:{generate_coco(tmp_path / 'c', 8, size=128)}", "val", (128, 96))
    metrics = evaluate_model(Oracle(coco), coco, progress=False)
    assert metrics["AP50"] > 90 and metrics["AP"] > 50  # the quantisation of a 1/4 heatmap costs some AP
    mpii = build_dataset(f"mpii:{generate_mpii(tmp_path / 'm', 8, size=128)}", "valid", (128, 128))
    metrics = evaluate_model(Oracle(mpii), mpii, progress=False)
    assert metrics["Mean"] > 95 and metrics["samples"] == len(mpii)


def test_stored_predictions_and_cli(tmp_path, capsys):
    root = generate_mpii(tmp_path / "m", 4, size=96)
    dataset = build_dataset(f"mpii:{root}", "valid", (64, 64))
    entries = json.loads((root / "annot" / "valid.json").read_text())
    preds = [[[x - 1, y - 1] for x, y in e["joints"]] for e in entries]  # ground truth, 0-based
    path = tmp_path / "preds.json"
    path.write_text(json.dumps({"preds": preds}))
    assert evaluate_predictions(path, dataset)["Mean"] == pytest.approx(100.0)
    assert main(["eval", "--predictions", str(path), "--data", f"mpii:{root}", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["Mean"] == pytest.approx(100.0) and out.count("\n") == 1
    path.write_text(json.dumps({"preds": preds[:-1]}))
    assert main(["eval", "--predictions", str(path), "--data", f"mpii:{root}"]) == 2
    assert "expected" in capsys.readouterr().err
