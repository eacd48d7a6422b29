"""Readers on generated COCO and MPII files, the synthetic generator and the dataset items."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effpose.cli import main
from pose.data import build_dataset, build_datasets, make_loader, parse_spec
from pose.data.mpii import load_gt_valid
from pose.data.synthetic import generate_coco, generate_mpii, synthetic_root
from pose.keypoints import COCO, MPII


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return generate_coco(tmp_path_factory.mktemp("coco"), 8, seed=3, size=128)


@pytest.fixture(scope="module")
def mpii_root(tmp_path_factory):
    return generate_mpii(tmp_path_factory.mktemp("mpii"), 8, seed=3, size=128)


def test_coco_layout_and_reader(coco_root):
    doc = json.loads((coco_root / "annotations" / "person_keypoints_train2017.json").read_text())
    assert len(doc["images"]) == 8
    assert len(json.loads((coco_root / "annotations" / "person_keypoints_val2017.json").read_text())["images"]) == 2
    for image in doc["images"]:
        assert (coco_root / "images" / "train2017" / image["file_name"]).is_file()
    labelled = [a for a in doc["annotations"] if a["num_keypoints"] > 0]
    for ann in doc["annotations"]:
        kp = np.array(ann["keypoints"]).reshape(17, 3)
        assert set(kp[:, 2]) <= {0, 1, 2}
        assert (kp[kp[:, 2] == 0, :2] == 0).all()  # unlabelled joints carry no coordinates
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum())
        inside = kp[kp[:, 2] > 0, :2]
        assert ((inside >= 0) & (inside <= 127)).all()  # labelled joints lie inside the image
    visibilities = np.concatenate([np.array(a["keypoints"])[2::3] for a in doc["annotations"]])
    assert (visibilities == 2).any() and (visibilities == 1).any()  # visible and occluded joints both occur

    dataset = build_dataset(f"coco:{coco_root}", "train", (64, 48), train=True)
    assert dataset.kind == "coco" and dataset.num_joints == 17
    assert len(dataset) == len(labelled)
    image, target, weight, meta = dataset[0]
    assert image.shape == (3, 64, 48) and image.dtype == torch.float32
    assert target.shape == (17, 16, 12) and weight.shape == (17, 1)
    assert abs(float(image.mean())) < 3  # normalised, not 0..255
    assert set(meta) >= {"center", "scale", "rotation", "joints", "image_id", "index"}
    val = build_dataset(f"coco:{coco_root}", "val", (64, 48))
    assert val.augment is None and val.coco is not None


def test_targets_peak_at_joints_in_eval_mode(coco_root):
    dataset = build_dataset(f"coco:{coco_root}", "val", (64, 48))
    for i in range(len(dataset)):
        _, target, weight, meta = dataset[i]
        for j in range(17):
            if weight[j, 0] > 0:
                y, x = np.unravel_index(int(target[j].argmax()), target[j].shape)
                expected = meta["joints_input"][j] / 4
                assert abs(x - expected[0]) <= 0.5 + 1e-4 and abs(y - expected[1]) <= 0.5 + 1e-4
                assert float(target[j].max()) == pytest.approx(1.0)
            else:
                assert float(target[j].abs().sum()) == 0 or meta["joints"][j, 2] == 0


def test_mpii_layout_reader_and_gt(mpii_root):
    entries = json.loads((mpii_root / "annot" / "valid.json").read_text())
    gt = load_gt_valid(mpii_root / "annot" / "gt_valid.mat")
    assert gt.joints.shape == (len(entries), 16, 2) and gt.head_boxes.shape == (len(entries), 2, 2)
    assert gt.joint_names[9] == "head"
    for i, entry in enumerate(entries):
        vis = np.array(entry["joints_vis"]) > 0
        assert (gt.missing[i] == ~vis).all()
        np.testing.assert_allclose(gt.joints[i][vis], np.array(entry["joints"])[vis], atol=1e-6)
    dataset = build_dataset(f"mpii:{mpii_root}", "valid", (64, 64))
    assert len(dataset) == len(entries) and dataset.num_joints == 16
    rec, entry = dataset.records[0], entries[0]
    # on-load adjustments: center[1] += 15 * scale, scale *= 1.25, 1-based -> 0-based
    assert rec.center[1] == pytest.approx(entry["center"][1] + 15 * entry["scale"] - 1, abs=1e-4)
    assert rec.scale[0] == pytest.approx(entry["scale"] * 1.25)
    vis = np.array(entry["joints_vis"]) > 0
    np.testing.assert_allclose(rec.joints[vis], np.array(entry["joints"])[vis] - 1, atol=1e-5)
    # the person box (center/scale) contains its labelled joints
    half = rec.scale[0] * 200 / 2
    assert (np.abs(rec.joints[vis] - rec.center) <= half).all()
    image, target, weight, _ = dataset[0]
    assert image.shape == (3, 64, 64) and target.shape == (16, 16, 16)


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = generate_coco(tmp_path / "a", 3, seed=5, size=96)
    b = generate_coco(tmp_path / "b", 3, seed=5, size=96)
    c = generate_coco(tmp_path / "c", 3, seed=6, size=96)
    name = "annotations/person_keypoints_train2017.json"
    assert (a / name).read_text() == (b / name).read_text()
    assert (a / name).read_text() != (c / name).read_text()


def test_synthetic_spec_generates_into_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFPOSE_CACHE_DIR", str(tmp_path / "cache"))
    spec = parse_spec("synthetic:4")
    assert spec.synthetic and spec.kind == "coco" and spec.images == 4
    train, val = build_datasets("synthetic:4", (64, 48))
    root = synthetic_root(4, "coco")
    assert str(root).startswith(str(tmp_path / "cache")) and (root / "DONE").is_file()
    stamp = (root / "DONE").stat().st_mtime_ns
    build_datasets("synthetic:4", (64, 48))  # second use reads the cache
    assert (root / "DONE").stat().st_mtime_ns == stamp
    assert train.kind == "coco" and len(train) > 0 and len(val) > 0
    mpii_train, _ = build_datasets("synthetic-mpii:4", (64, 64))
    assert mpii_train.kind == "mpii" and mpii_train.num_joints == 16


@pytest.mark.parametrize("spec", ["", "synthetic:x", "synthetic:0", "imagenet:/tmp", "coco:"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="data spec"):
        parse_spec(spec)


def test_missing_root():
    with pytest.raises(FileNotFoundError, match="not a directory"):
        parse_spec("coco:/nonexistent/effpose-data")


def test_loader_with_workers(coco_root):
    dataset = build_dataset(f"coco:{coco_root}", "train", (64, 48), train=True)
    batches = list(make_loader(dataset, 4, workers=2))
    assert sum(len(b[0]) for b in batches) == len(dataset)
    again = list(make_loader(dataset, 4, workers=0))
    torch.testing.assert_close(batches[0][0], again[0][0])  # augmentation does not depend on the worker


def test_cli_data_synth(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "2", "--keypoints", "mpii", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_images"] == 2 and (tmp_path / "s" / "annot" / "gt_valid.mat").is_file()
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "2"]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err


def test_flip_pairs_mirror_names():
    for joints in (COCO, MPII):
        for a, b in joints.flip_pairs:
            na, nb = joints.joints[a], joints.joints[b]
            assert {na.split("_")[0], nb.split("_")[0]} in ({"left", "right"}, {"l", "r"})
            assert na.split("_", 1)[1] == nb.split("_", 1)[1]
        index = joints.flip_index()
        assert (index[index] == np.arange(joints.num_joints)).all()
