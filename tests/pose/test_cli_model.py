"""``effpose model info/export`` through the installed console script."""

import json
import subprocess
import sys

import onnxruntime as ort


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effpose", *args], capture_output=True, text=True, timeout=300)


def test_model_info_json_parses():
    result = run("model", "info", "efficientpose-a", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["params"] == 1_299_360
    assert round(info["gflops_paper"], 1) == 0.7
    assert info["gmacs"] < info["gflops_paper"]
    assert info["input"] == [256, 256] and info["heatmap"] == [16, 64, 64]
    assert [p["part"] for p in info["parts"]] == ["stem", "stage 1", "stage 2", "stage 3", "stage 4", "head"]


def test_model_info_table_and_arch_file(tmp_path):
    spec = {"space": "small", "ops": ["k3e3"] * 28, "head_widths": [64, 64]}
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(spec))
    result = run("model", "info", str(path), "--input", "256x192", "--joints", "17")
    assert result.returncode == 0, result.stderr
    assert "stage 4" in result.stdout and "17x64x48" in result.stdout


def test_model_info_bad_arch_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"space": "small", "ops": ["skip"] * 28}))
    result = run("model", "info", str(path))
    assert result.returncode == 2
    assert "layer 0" in result.stderr and "Traceback" not in result.stderr


def test_model_export_cli(tmp_path):
    onnx_path = tmp_path / "a.onnx"
    result = run("model", "export", "mobilenetv2", "--onnx", str(onnx_path), "--input", "128x96", "--joints", "17")
    assert result.returncode == 0, result.stderr
    assert "max |diff|" in result.stdout
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == [1, 17, 32, 24]
