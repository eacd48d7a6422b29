"""Batch norm over every process of a ``torchrun`` group, so a multi-process run computes what one process
with the same global batch computes.

Without it each process normalises with the statistics of its own slice of the batch, and a 2-process
run trains a different network than a 1-process run with the same global batch. ``torch.nn.SyncBatchNorm``
does this on GPUs only; ``SyncBatchNorm2d`` works on any device, with any backend (gloo on CPU): the
batch mean and variance are all-reduced (two passes, as precise as ``F.batch_norm``), and the
all-reduce is differentiable, so every process's gradient includes the other processes' samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every process's loss depends on every
    process's input through the sum."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: ANN001 - autograd context
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        out = grad.clone()
        dist.all_reduce(out)
        return out


def sum_over_processes(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over every process of the default group, differentiable."""
    return _SumOverProcesses.apply(tensor)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span every process of the default group.

    Same parameters and buffers as ``nn.BatchNorm2d`` (checkpoints load either way); in eval mode, and
    in a single process, it is exactly ``nn.BatchNorm2d``. Every process must call it equally often."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = (0, 2, 3)
        wide = x.double()  # sums in float64, as the CPU kernel of batch norm accumulates them
        local = torch.cat([wide.sum(dims), wide.new_full((1,), x.numel() / channels)])
        total = sum_over_processes(local)
        count = total[-1]
        mean = total[:channels] / count
        centred = wide - mean.view(1, -1, 1, 1)
        var = sum_over_processes((centred * centred).sum(dims)) / count  # biased, as batch norm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(x.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(x.dtype), alpha=momentum)
        out = (centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)).to(x.dtype)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.BatchNorm2d`` in ``module`` a ``SyncBatchNorm2d``, in place: the same object,
    parameters and buffers (optimizers built before stay valid); returns ``module``. A no-op outside a
    multi-process group."""
    if world_size() > 1:
        for child in module.modules():
            if type(child) is nn.BatchNorm2d:
                child.__class__ = SyncBatchNorm2d
    return module
