"""Parameter and FLOPs counting in the two conventions a user needs to tell apart (docs/conventions.md §9).

``gflops_paper``: multiply-adds of conv/linear layers, each counted as weight elements x *output*
H x W (so a transposed conv is counted at its output resolution), divided by 2**30. This is what
SimpleBaseline, HRNet and EfficientPose print. ``gmacs``: the true multiply-adds (a transposed conv
at its input resolution), divided by 1e9. BN and ReLU are ignored in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Counts:
    params: int
    paper_macs: int  # paper convention, raw count
    true_macs: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (paper, true)

    @property
    def gflops_paper(self) -> float:
        return self.paper_macs / 2**30

    @property
    def gmacs(self) -> float:
        return self.true_macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count(model: nn.Module, input_hw: tuple[int, int], in_channels: int = 3) -> Counts:
    """Count parameters and multiply-adds with one forward pass of a batch-1 input.

    ``in_channels`` lets the search count a single candidate op at its layer's input shape.
    """
    per_module: dict[str, tuple[int, int]] = {}
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            weight = module.weight.numel()
            if isinstance(module, nn.Linear):
                rows = output.numel() // output.shape[-1]
                per_module[name] = (weight * rows, weight * rows)
                return
            out_hw = output.shape[-2] * output.shape[-1]
            in_hw = inputs[0].shape[-2] * inputs[0].shape[-1]
            true_hw = in_hw if isinstance(module, nn.ConvTranspose2d) else out_hw
            per_module[name] = (weight * out_hw, weight * true_hw)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, *input_hw))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    paper = sum(v[0] for v in per_module.values())
    true = sum(v[1] for v in per_module.values())
    return Counts(count_params(model), paper, true, per_module)


def group_counts(model: nn.Module, counts: Counts, depth: int = 1) -> dict[str, tuple[int, int, int]]:
    """Aggregate (params, paper MACs, true MACs) by module-name prefix of ``depth`` dotted parts."""
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        prefix = ".".join(name.split(".")[:depth])
        groups.setdefault(prefix, [0, 0, 0])[0] += param.numel()
    for name, (paper, true) in counts.per_module.items():
        prefix = ".".join(name.split(".")[:depth])
        entry = groups.setdefault(prefix, [0, 0, 0])
        entry[1] += paper
        entry[2] += true
    return {k: (v[0], v[1], v[2]) for k, v in groups.items()}
