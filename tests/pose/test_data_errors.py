"""Bad input: corrupt or truncated annotation files, missing and undecodable images -> errors naming the file;
training can skip unreadable images and count them."""

from __future__ import annotations

import json
import shutil

import pytest

from effpose.cli import main
from pose.data import build_dataset, make_loader
from pose.data.mpii import load_gt_valid
from pose.data.synthetic import generate_coco, generate_mpii
from pose.train import TrainConfig, train


@pytest.fixture
def coco_root(tmp_path):
    return generate_coco(tmp_path / "coco", 4, seed=1, size=96)


def _annotation(root, split="train2017"):
    return root / "annotations" / f"person_keypoints_{split}.json"


def test_truncated_annotation_file(coco_root):
    path = _annotation(coco_root)
    path.write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match=f"{path}.*corrupt or truncated"):
        build_dataset(f"coco:{coco_root}", "train", (64, 48))


def test_annotation_file_of_the_wrong_shape(coco_root):
    path = _annotation(coco_root)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=f"{path} has no 'annotations' list"):
        build_dataset(f"coco:{coco_root}", "train", (64, 48))
    doc = {
        "images": [],
        "categories": [],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1, "keypoints": [1, 2, 2]}],
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="annotation 7 has 3 keypoint values"):
        build_dataset(f"coco:{coco_root}", "train", (64, 48))


def test_missing_annotation_file(coco_root):
    _annotation(coco_root).unlink()
    with pytest.raises(FileNotFoundError, match="person_keypoints_train2017.json does not exist"):
        build_dataset(f"coco:{coco_root}", "train", (64, 48))


def test_missing_and_undecodable_images(coco_root):
    dataset = build_dataset(f"coco:{coco_root}", "train", (64, 48))
    missing = dataset.records[0].image
    shutil.move(missing, missing + ".gone")
    with pytest.raises(FileNotFoundError, match=f"image file {missing} does not exist"):
        dataset[0]
    shutil.move(missing + ".gone", missing)
    with open(missing, "wb") as handle:
        handle.write(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match=f"image file {missing} cannot be decoded"):
        dataset[0]


def test_skip_and_count_in_loader(coco_root):
    dataset = build_dataset(f"coco:{coco_root}", "train", (64, 48), on_bad_image="skip")
    broken = {r.image for r in dataset.records[:2]}
    for image in broken:
        open(image, "wb").close()  # empty file: does not decode
    bad_samples = sum(1 for r in dataset.records if r.image in broken)
    batches = list(make_loader(dataset, 3))
    skipped = sum((b["skipped"] if isinstance(b, dict) else int(b[3]["skipped"])) for b in batches if b is not None)
    kept = sum(len(b[0]) for b in batches if b is not None and not isinstance(b, dict))
    assert skipped == bad_samples and kept == len(dataset) - bad_samples


def test_training_skips_and_counts_unreadable_images(coco_root, tmp_path):
    train_set = build_dataset(f"coco:{coco_root}", "train", (64, 48))
    image = train_set.records[0].image
    open(image, "wb").close()
    bad_samples = sum(1 for r in train_set.records if r.image == image)
    with pytest.raises(ValueError, match=f"image file {image} cannot be decoded"):
        train(
            TrainConfig("mobilenetv2", f"coco:{coco_root}", epochs=1, input_hw=(64, 48), batch_size=4),
            tmp_path / "fail",
            progress=False,
        )
    cfg = TrainConfig(
        "mobilenetv2", f"coco:{coco_root}", epochs=2, input_hw=(64, 48), batch_size=4, on_bad_image="skip"
    )
    summary = train(cfg, tmp_path / "skip", progress=False)
    assert summary["skipped_images"] == 2 * bad_samples
    lines = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped"] for line in lines] == [bad_samples, bad_samples]


def test_cli_reports_bad_annotation_without_traceback(coco_root, capsys):
    path = _annotation(coco_root, "val2017")
    path.write_text("{not json")
    assert main(["eval", "--predictions", str(path), "--data", f"coco:{coco_root}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_mpii_bad_files(tmp_path):
    root = generate_mpii(tmp_path / "mpii", 2, seed=1, size=96)
    gt = root / "annot" / "gt_valid.mat"
    gt.write_bytes(gt.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{gt} cannot be read"):
        load_gt_valid(gt)
    valid = root / "annot" / "valid.json"
    valid.write_text(json.dumps([{"image": "x.jpg", "center": [1, 2]}]))
    with pytest.raises(ValueError, match=f"{valid}: entry 0 is malformed"):
        build_dataset(f"mpii:{root}", "valid", (64, 64))
    valid.write_text("[{")
    with pytest.raises(ValueError, match=f"{valid} is corrupt or truncated"):
        build_dataset(f"mpii:{root}", "valid", (64, 64))
