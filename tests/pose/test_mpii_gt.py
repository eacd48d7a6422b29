"""MPII ground truth written in the layout of the real ``annot/gt_valid.mat`` (the file HRNet ships), read
back by ``load_gt_valid`` and scored by PCKh against predictions whose result is known by hand.

The real file, as ``scipy.io.loadmat`` returns it: ``dataset_joints`` a 1x16 cell of 1x1 cells of char
arrays (so HRNet's ``np.where(dataset_joints == 'head')[1][0]`` finds a column), ``jnt_missing`` 16xN,
``pos_gt_src`` 16x2xN and ``headboxes_src`` 2x2xN (corner x coordinate x sample), all in 1-based pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from effpose.cli import main
from pose.data.mpii import load_gt_valid
from pose.data.synthetic import generate_mpii
from pose.evaluate import pckh
from pose.keypoints import MPII_MAT_NAMES

HEAD, LWRI = MPII_MAT_NAMES.index("head"), MPII_MAT_NAMES.index("lwri")


def write_real_layout(path: Path, joints: np.ndarray, missing: np.ndarray, head_boxes: np.ndarray) -> Path:
    """``joints`` (N, 16, 2), ``missing`` (N, 16) bool, ``head_boxes`` (N, 2, 2) [[x1, y1], [x2, y2]], 1-based."""
    names = np.empty((1, 16), dtype=object)  # a MATLAB cell ...
    for i, name in enumerate(MPII_MAT_NAMES):
        cell = np.empty((1, 1), dtype=object)  # ... of 1x1 cells of char arrays
        cell[0, 0] = name
        names[0, i] = cell
    savemat(
        path,
        {
            "dataset_joints": names,
            "jnt_missing": missing.T.astype(np.float64),
            "pos_gt_src": joints.transpose(1, 2, 0).astype(np.float64),
            "headboxes_src": head_boxes.transpose(1, 2, 0).astype(np.float64),
        },
    )
    return path


def _three_people() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three samples with head sizes 30, 6 and 15 px (0.6 x the head-box diagonal, boxes off the origin)."""
    rng = np.random.default_rng(3)
    joints = np.round(rng.uniform(40, 400, (3, 16, 2)), 1)  # 1-based
    missing = np.zeros((3, 16), bool)
    missing[0, HEAD] = True
    missing[1, LWRI] = True
    joints[missing] = -1  # what a missing joint holds does not matter
    corners = np.array([[100.0, 50.0], [220.0, 310.0], [31.0, 77.0]])
    sides = np.array([[30.0, 40.0], [6.0, 8.0], [15.0, 20.0]])  # diagonals 50, 10, 25
    head_boxes = np.stack([corners, corners + sides], axis=1)
    return joints, missing, head_boxes, np.array([30.0, 6.0, 15.0])


@pytest.fixture
def gt_file(tmp_path):
    joints, missing, head_boxes, _ = _three_people()
    return write_real_layout(tmp_path / "gt_valid.mat", joints, missing, head_boxes)


def test_fixture_has_the_real_layout(gt_file):
    mat = loadmat(str(gt_file))
    names = mat["dataset_joints"]
    assert names.shape == (1, 16) and names.dtype == object
    assert names[0, 0].shape == (1, 1) and names[0, 0].dtype == object  # a cell inside the cell
    assert names[0, 0][0, 0].dtype.kind == "U" and str(names[0, 0][0, 0][0]) == "rank"
    assert np.where(names == "head")[1][0] == HEAD  # HRNet's lookup works on it
    assert mat["jnt_missing"].shape == (16, 3)
    assert mat["pos_gt_src"].shape == (16, 2, 3)
    assert mat["headboxes_src"].shape == (2, 2, 3)


def test_reader_returns_samples_first_and_keeps_one_based_pixels(gt_file):
    joints, missing, head_boxes, _ = _three_people()
    gt = load_gt_valid(gt_file)
    assert gt.joint_names == MPII_MAT_NAMES
    np.testing.assert_array_equal(gt.joints, joints)
    np.testing.assert_array_equal(gt.missing, missing)
    np.testing.assert_array_equal(gt.head_boxes, head_boxes)


def test_pckh_perfect_predictions_score_100(gt_file):
    joints, *_ = _three_people()
    result = pckh(joints - 1.0, load_gt_valid(gt_file))  # predictions are 0-based
    assert all(value == pytest.approx(100.0) for value in result.values()), result


def test_pckh_catches_predictions_left_one_based(gt_file):
    joints, *_ = _three_people()
    result = pckh(joints, load_gt_valid(gt_file))  # sqrt(2) px off: inside every 0.5 threshold (3 px and up)
    assert result["Mean"] == pytest.approx(100.0)
    # at 0.1 (3, 0.6 and 1.5 px) the second sample misses all its 14 counted joints; 40 are visible in all
    # (3 x 14, less the missing head and l-wrist)
    assert result["Mean@0.1"] == pytest.approx(100 * (13 + 14) / 40)


def test_pckh_shifted_across_the_thresholds(gt_file):
    joints, _, _, head = _three_people()
    direction = np.array([0.6, 0.8])  # unit vector: the error equals the shift
    factors = np.array([0.49, 0.51, 0.09])  # just inside 0.5; just outside 0.5; inside 0.1
    preds = joints - 1.0 + (factors * head)[:, None, None] * direction
    result = pckh(preds, load_gt_valid(gt_file))
    # a joint seen in all three samples: hit in samples 0 and 2 -> 2/3
    for part in ("Shoulder", "Elbow", "Hip", "Knee", "Ankle"):
        assert result[part] == pytest.approx(200 / 3), part
    assert result["Head"] == pytest.approx(50.0)  # missing in 0: a miss (1) and a hit (2)
    assert result["Wrist"] == pytest.approx((100.0 + 200 / 3) / 2)  # l-wrist missing in 1, the miss
    assert result["Mean"] == pytest.approx(100 * (13 + 14) / 40)
    assert result["Mean@0.1"] == pytest.approx(100 * 14 / 40)


def test_reader_accepts_one_sample_and_rejects_a_transposed_field(tmp_path):
    joints, missing, head_boxes, _ = _three_people()
    one = tmp_path / "one.mat"  # MATLAB stores a 16x2x1 array as 16x2 (and 2x2x1 as 2x2)
    savemat(one, {"jnt_missing": missing[:1].T, "pos_gt_src": joints[0], "headboxes_src": head_boxes[0]})
    assert loadmat(str(one))["pos_gt_src"].shape == (16, 2)
    gt = load_gt_valid(one)
    assert gt.joints.shape == (1, 16, 2) and gt.head_boxes.shape == (1, 2, 2) and gt.missing.shape == (1, 16)
    np.testing.assert_array_equal(gt.head_boxes[0], head_boxes[0])
    bad = tmp_path / "bad.mat"
    savemat(bad, {"jnt_missing": missing.T, "pos_gt_src": joints, "headboxes_src": head_boxes.transpose(1, 2, 0)})
    with pytest.raises(ValueError, match=r"'pos_gt_src' has shape \(3, 16, 2\), expected 16x2xN"):
        load_gt_valid(bad)


def test_eval_of_stored_predictions_against_a_real_layout_file(tmp_path, capsys):
    root = generate_mpii(tmp_path / "mpii", 4, seed=5, size=128)
    entries = json.loads((root / "annot" / "valid.json").read_text())
    joints = np.array([entry["joints"] for entry in entries], dtype=np.float64)  # 1-based, as in the file
    missing = np.array([entry["joints_vis"] for entry in entries]) == 0
    corners = joints[:, MPII_MAT_NAMES.index("head")][:, None, :] + np.array([[-6.0, -8.0], [6.0, 8.0]])
    write_real_layout(root / "annot" / "gt_valid.mat", joints, missing, corners)  # head size 12 px
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"preds": (joints - 1.0).tolist()}))
    args = ["eval", "--data", f"mpii:{root}", "--predictions", str(preds), "--split", "valid", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["Mean"] == pytest.approx(100.0)
    shifted = joints - 1.0 + np.array([0.0, 7.0])  # 7 px > 0.5 x 12: every joint a miss
    preds.write_text(json.dumps({"preds": shifted.tolist()}))
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["Mean"] == pytest.approx(0.0)
