"""The accuracy proxy: the data, input size and training recipe that score a derived network.

A search is only as good as the number it is judged by. On this CPU the real datasets are out of
reach, so a derived network is trained briefly on synthetic people and scored by PCKh@0.5 Mean on the
generator's fixed validation split (the same images whatever the training seed). A proxy is useful only
if it ranks networks of known capacity in the known order; ``benchmarks/proxy_ranking.py`` checks
efficientpose-c > efficientpose-a > ``minimal_arch()`` over several seeds and records the spread.

``PROXY`` is the recipe the benchmarks use; why each value was chosen is in benchmarks/README.md
("Proxy ranking"). In short: the easy synthetic level (one person per image), because on the crowded
standard level every network stayed near 20 % after a short run; 64x64, because efficientpose-c
costs about 2.4x efficientpose-a per sample and 128x128 another 4x; batch 8 and Adam 3e-3, because
more and larger steps per CPU second help every network; residual blocks zero-initialised, because
with the default init the deeper network trained slower and the short run ranked c < a < minimal
(depth-dependent training speed, not capacity); 8 epochs from the time budget (~3 CPU minutes for a
small-space network). Call ``train_and_score(arch, PROXY, seed, out)`` for every network of an
experiment, with the same seeds, and compare the ``Mean`` it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pose.evaluate import MPII_KEYS
from pose.space import SKIP, ArchSpec, get_space
from pose.train import TrainConfig, train

__all__ = ["PROXY", "QUICK_PROXY", "Proxy", "minimal_arch", "train_and_score"]


@dataclass(frozen=True)
class Proxy:
    """One scoring recipe. Everything that changes a score is here, so two scores are comparable
    exactly when they were made with equal ``Proxy`` values (and the same seed)."""

    name: str
    data: str  # a synthetic-mpii data SPEC: PCKh@0.5 Mean is the score
    input_hw: tuple[int, int]
    epochs: int
    batch_size: int
    lr: float  # Adam; x0.1 at the synthetic recipe's milestones (pose.train.recipe_for)
    zero_init_residual: bool = True  # residual blocks start as the identity: depth does not slow early training
    threads: int = 1  # one torch thread: on a shared machine a thread team waits on descheduled partners
    flip_test: bool = False

    def config(self, arch: str | Path, seed: int) -> TrainConfig:
        """The training run this proxy makes of ``arch``: evaluated once, after the last epoch."""
        return TrainConfig(
            arch=arch,
            data=self.data,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            input_hw=self.input_hw,
            seed=seed,
            eval_every=self.epochs,
            flip_test=self.flip_test,
            threads=self.threads,
            device="cpu",
            zero_init_residual=self.zero_init_residual,
        )


PROXY = Proxy(
    name="proxy-v1",
    data="synthetic-mpii-easy:1024",
    input_hw=(64, 64),
    epochs=8,
    batch_size=8,
    lr=3e-3,
)
# Smoke-test size: seconds, not a judgement.
QUICK_PROXY = Proxy(name="quick", data="synthetic-mpii-easy:16", input_hw=(64, 64), epochs=2, batch_size=8, lr=3e-3)


def minimal_arch(space: str = "small") -> ArchSpec:
    """The least capable legal network of ``space``: ``k3e3`` where ``skip`` is illegal, ``skip`` elsewhere."""
    ops = ["k3e3" if layer.skip_reason() else SKIP for layer in get_space(space).layers()]
    return ArchSpec(space=space, ops=ops, name=f"minimal-{space}")


def _arch_path(arch: str | Path | ArchSpec, out: Path) -> str | Path:
    """TrainConfig takes a preset name or an arch-spec file; an ArchSpec is written next to the run."""
    if not isinstance(arch, ArchSpec):
        return arch
    out.mkdir(parents=True, exist_ok=True)
    path = out / "arch.json"
    arch.save(path)
    return path


def train_and_score(
    arch: str | Path | ArchSpec,
    proxy: Proxy = PROXY,
    seed: int = 0,
    out: str | Path = "proxy-run",
    *,
    log=None,
) -> dict[str, Any]:
    """Train ``arch`` with ``proxy`` into the fresh folder ``out`` and score it.

    Returns the proxy's name, the seed, ``Mean`` (PCKh@0.5 Mean, %, after the last epoch), the other
    PCKh values under ``pckh``, the final training loss, wall and CPU seconds, and the run folder.
    """
    out = Path(out)
    start = time.perf_counter()
    summary = train(proxy.config(_arch_path(arch, out), seed), out, progress=False, log=log or (lambda _m: None))
    last = summary["last"] or {}
    if summary["metric"] != "Mean" or "Mean" not in last:
        raise ValueError(f"proxy {proxy.name}: data {proxy.data} gave no PCKh (metric {summary['metric']})")
    return {
        "proxy": proxy.name,
        "arch": arch.name if isinstance(arch, ArchSpec) else str(arch),
        "seed": seed,
        "Mean": float(last["Mean"]),
        "pckh": {key: float(last[key]) for key in MPII_KEYS if key in last},
        "train_loss": float(last["train_loss"]),
        "val_loss": float(last["val_loss"]),
        "epochs": summary["epochs_run"],
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": summary["cpu_seconds"],
        "out": str(out),
    }
