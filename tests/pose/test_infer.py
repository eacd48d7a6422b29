"""Inference from a checkpoint (PyTorch and ONNX Runtime) and from an ONNX file; eval of a checkpoint."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from effpose.cli import main
from pose.checkpoint import save_atomic
from pose.data.synthetic import generate_coco
from pose.export import export_onnx
from pose.infer import confidence_colour, infer, load_boxes
from pose.models import arch_description, build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    root = generate_coco(tmp / "coco", 2, seed=4, size=128)
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 17).eval()
    ckpt = {
        "model": model.state_dict(),
        "arch": arch_description("mobilenetv2"),
        "joints": 17,
        "input_hw": [64, 48],
        "color_order": "RGB",
    }
    save_atomic(ckpt, tmp / "model.pt")
    onnx = export_onnx(model, tmp / "model.onnx", (64, 48), batch="dynamic")
    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    return tmp, root, images, onnx


def test_infer_torch_onnx_and_checkpoint_via_ort_agree(setup):
    tmp, _, images, onnx = setup
    boxes = tmp / "boxes.json"
    boxes.write_text(json.dumps({images[0].name: [[10, 10, 60, 100, 0.9], [50, 20, 40, 80]]}))
    docs = {}
    for name, model, backend in (
        ("torch", tmp / "model.pt", "torch"),
        ("ort", tmp / "model.pt", "onnxruntime"),
        ("onnx", onnx, "onnxruntime"),
    ):
        docs[name] = infer(model, images, tmp / name, boxes=boxes, backend=backend, progress=False)
    doc = docs["torch"]
    assert doc["joints"][0] == "nose" and len(doc["images"]) == 2
    first, second = doc["images"]
    assert len(first["people"]) == 2 and len(second["people"]) == 1  # second image: whole-image box
    assert second["people"][0]["box"] == [0, 0, 128, 128]
    for person in first["people"]:
        kp = np.array(person["keypoints"])
        assert kp.shape == (17, 3) and np.isfinite(kp).all()
    drawn = cv2.imread(first["drawn"])
    assert drawn.shape == (128, 128, 3) and not np.array_equal(drawn, cv2.imread(str(images[0])))
    assert json.loads((tmp / "torch" / "keypoints.json").read_text())["images"][0]["image"] == str(images[0])
    for other in ("ort", "onnx"):
        for a, b in zip(docs["torch"]["images"], docs[other]["images"], strict=True):
            for pa, pb in zip(a["people"], b["people"], strict=True):
                np.testing.assert_allclose(pa["keypoints"], pb["keypoints"], atol=2e-2)


def test_infer_cli_and_bad_input(setup, capsys):
    tmp, _, images, _ = setup
    out = tmp / "cli"
    assert main(["infer", str(tmp / "model.pt"), str(images[0]), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["people"] == 1 and (out / "keypoints.json").is_file()
    missing = tmp / "nope.jpg"
    assert main(["infer", str(tmp / "model.pt"), str(missing), "--out", str(out)]) == 2
    assert f"image file {missing} does not exist" in capsys.readouterr().err
    bad = tmp / "bad.jpg"
    bad.write_bytes(b"GIF89a broken")
    assert main(["infer", str(tmp / "model.pt"), str(bad), "--out", str(out)]) == 2
    assert f"image file {bad} cannot be decoded" in capsys.readouterr().err
    boxes = tmp / "bad_boxes.json"
    boxes.write_text(json.dumps({"a.jpg": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="must be \\[x, y, w, h\\]"):
        load_boxes(boxes)
    assert main(["infer", str(tmp / "missing.pt"), str(images[0]), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_checkpoint_cli(setup, capsys):
    tmp, root, _, onnx = setup
    args = ["eval", str(tmp / "model.pt"), "--data", f"coco:{root}", "--flip-test", "--json"]
    assert main(args + ["--save-predictions", str(tmp / "preds.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"AP", "AP50", "AP75", "APM", "APL", "AR"} <= set(metrics)
    assert main(["eval", "--predictions", str(tmp / "preds.json"), "--data", f"coco:{root}", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["AP"] == pytest.approx(metrics["AP"])
    assert main(["eval", str(onnx), "--data", f"coco:{root}", "--json"]) == 0
    assert "AP" in json.loads(capsys.readouterr().out)
    assert main(["eval", "--data", f"coco:{root}"]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err

    gt = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    (tmp / "dets.json").write_text(json.dumps(dets))
    assert (
        main(["eval", str(tmp / "model.pt"), "--data", f"coco:{root}", "--boxes", str(tmp / "dets.json"), "--json"])
        == 0
    )
    assert "AP" in json.loads(capsys.readouterr().out)
    (tmp / "dets.json").write_text(json.dumps([{"image_id": 999, "bbox": [0, 0, 5, 5], "score": 1}]))
    assert main(["eval", str(tmp / "model.pt"), "--data", f"coco:{root}", "--boxes", str(tmp / "dets.json")]) == 2
    assert "image_id 999" in capsys.readouterr().err


def test_confidence_colours():
    assert confidence_colour(0.0) == (0, 0, 255)  # red (BGR)
    assert confidence_colour(1.0) == (0, 255, 0)  # green
