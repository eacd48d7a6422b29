"""The search under ``torchrun`` (``torchrun --standalone --nproc_per_node N -m search ...``): data split
across processes, alpha and weights kept identical, only rank 0 writes.

The aim is the 1-process search with the same global batch, not an approximation of it:

- every process builds the same supernet and draws the same random numbers (seeded per phase, as in
  one process), so sampled paths, drop-path and Gumbel noise agree;
- each global batch of the 1-process loader (same shuffle) is cut into ``world`` slices, one per process
  (``shard_loader``);
- batch norm statistics span all processes (``pose.distributed.SyncBatchNorm2d``);
- every process back-propagates its loss scaled by its share of the global batch (``share``), and
  ``sum_gradients`` adds the gradients of all processes: the sum is the gradient of the global mean loss,
  so the weight and alpha steps are those of one process, up to float rounding.

The cost tables are read once, by rank 0, and broadcast (``from_rank0``). gloo on CPU, nccl when the
search runs on CUDA (it runs on the CPU today). Outside ``torchrun`` every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from pose.distributed import sync_batchnorm, world_size

T = TypeVar("T")


def init() -> None:
    """Join the ``torchrun`` process group named by the environment (``WORLD_SIZE`` > 1); idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if os.environ.get("EFFPOSE_SEARCH_DEVICE") == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_writer() -> bool:
    """Only rank 0 writes files, prints epoch lines and asks agents."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def from_rank0(make: Callable[[], T]) -> T:
    """``make()`` on rank 0 only, its result sent to every process (an exception on rank 0 stops all)."""
    if world_size() == 1:
        return make()
    box: list[object] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", make())
        except Exception as exc:  # every rank raises it, instead of the others waiting forever
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]  # type: ignore[misc]
    if status == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def prepare(model: nn.Module) -> nn.Module:
    """Synchronised batch norm, and rank 0's parameters and buffers everywhere (they agree already when
    seeded alike; this makes it certain)."""
    if world_size() == 1:
        return model
    sync_batchnorm(model)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    return model


class RankSlices(Sampler[list[int]]):
    """Each batch of ``batches``, cut into ``world`` interleaved slices; this process's slice."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            part = list(batch)[self.rank :: self.world]
            if not part:  # a last batch smaller than the group: no process may run a step the others skip
                raise ValueError(
                    f"a batch of {len(batch)} samples cannot be shared by {self.world} processes: use a batch size "
                    "and a data set whose batches have at least as many samples as processes"
                )
            yield part


def shard_loader(loader: DataLoader) -> DataLoader:
    """This process's part of ``loader``: the same global batches in the same order (same sampler, same
    generator), each cut into one slice per process. ``loader`` itself outside ``torchrun``."""
    world = world_size()
    if world == 1:
        return loader
    return DataLoader(
        loader.dataset,
        batch_sampler=RankSlices(loader.batch_sampler, rank(), world),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        generator=loader.generator,
        worker_init_fn=loader.worker_init_fn,
    )


def share(local_samples: int) -> float:
    """This process's fraction of the global batch of this step (1.0 in one process)."""
    if world_size() == 1:
        return 1.0
    total = torch.tensor([float(local_samples)])
    dist.all_reduce(total)
    return local_samples / float(total)


def sum_gradients(params: Iterable[nn.Parameter], value: Tensor) -> float:
    """Add up the gradients of ``params`` over all processes (each back-propagated its loss times its
    ``share``) and return the sum of ``value`` (the scaled loss: the global mean loss), in one all-reduce.
    Gradients are float32 here (the search's dtype)."""
    if world_size() == 1:
        return float(value.detach())
    # a parameter off this step's path has no gradient, on every process alike (they sample the same path):
    # it stays None, so the optimizer skips it exactly as in one process
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [value.detach().reshape(1).to(torch.float32)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        size = g.numel()
        p.grad = flat[offset : offset + size].view_as(g).clone()
        offset += size
    return float(flat[-1])
