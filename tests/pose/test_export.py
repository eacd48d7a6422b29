"""ONNX export runs in a real ONNX Runtime session and matches PyTorch."""

import numpy as np
import pytest
import torch

from pose.export import OnnxPoseModel, export_onnx, parity
from pose.models import build_model


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Give BN layers non-trivial statistics so parity compares real, non-tiny activations."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["efficientpose-a", "mobilenetv2"])
def test_onnx_parity(tmp_path, name):
    model = _randomize_bn(build_model(name, joints=16))
    path = export_onnx(model, tmp_path / f"{name}.onnx", (128, 128), batch="dynamic")
    diff = parity(model, path, (128, 128), batch=2)
    assert diff <= 1e-4
    runner = OnnxPoseModel(path, device="cpu", threads=1)
    out = runner(np.random.default_rng(0).standard_normal((3, 3, 128, 128), dtype=np.float32))
    assert out.shape == (3, 16, 32, 32)
    assert float(np.abs(out).max()) > 1e-3  # the comparison above was not between two near-zero tensors


def test_missing_onnx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxPoseModel(tmp_path / "nope.onnx")
