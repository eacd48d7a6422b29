"""ONNX export with a parity check, and ONNX Runtime inference with the best available providers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17
PARITY_TOLERANCE = 1e-4


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_hw: tuple[int, int] = (256, 256),
    batch: int | str = 1,
    channels: int = 3,
) -> Path:
    """Export ``model`` in eval mode; ``batch="dynamic"`` makes the batch axis symbolic.

    ``channels`` is the input depth: 3 for a pose network, C_in when exporting a single op.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example_batch = 1 if batch == "dynamic" else int(batch)
    dummy = torch.randn(example_batch, channels, *input_hw)
    dynamic_axes = {"image": {0: "batch"}, "heatmaps": {0: "batch"}} if batch == "dynamic" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter is deterministic and needs no extra packages for these conv nets.
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=["image"],
                output_names=["heatmaps"],
                opset_version=OPSET,
                dynamic_axes=dynamic_axes,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    return path


def available_providers(device: str = "auto") -> list[str]:
    """ORT execution providers to use: CUDA first when present (``auto``/``cuda``), CPU always last."""
    have = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise RuntimeError(
                "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPoseModel:
    """Run an exported pose model: ``model(images)`` with images float32 (N, 3, H, W) -> heatmaps."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=available_providers(device))
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.input_hw = (shape[2], shape[3])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


@torch.no_grad()
def parity(model: nn.Module, onnx_path: str | Path, input_hw: tuple[int, int], batch: int = 1, seed: int = 0) -> float:
    """Max absolute difference between PyTorch and ONNX Runtime (CPU) on the same random input."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *input_hw, generator=generator)
    was_training = model.training
    model.eval()
    expected = model(images).numpy()
    model.train(was_training)
    got = OnnxPoseModel(onnx_path, device="cpu")(images.numpy())
    return float(np.abs(expected - got).max())
