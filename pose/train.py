"""Training of a derived network (paper Sec. 4, docs/conventions.md §7), single process or ``torchrun`` DDP.

``train(...)`` is the whole run (the CLI and the demo call it); ``train_one_epoch`` is reusable
(the loss is ``pose.loss.heatmap_loss``). A run writes ``OUT/last.pt`` after every epoch
(atomically), ``OUT/best.pt`` when the validation metric improves, ``OUT/metrics.jsonl`` and
``OUT/training.png``. Everything random is derived from the seed and the epoch (model init, sample
order, augmentation), so ``--resume`` continues exactly as an uninterrupted run would have.

``train(TrainConfig(arch, data, ...), out)`` is the API; ``effpose train`` (``pose.commands``) maps its
flags onto a ``TrainConfig``. Multi-process: ``torchrun --nproc_per_node N -m effpose train ARCH --data SPEC
--out DIR``: gloo on CPU, nccl on GPU, a distributed sampler, batch norm over the global batch
(``pose.distributed``, so N processes train what one process with the same global batch trains), and
only rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from pose.checkpoint import load_checkpoint, save_atomic
from pose.data import DataSpec, PoseDataset, build_datasets, default_input_hw, make_loader, parse_spec
from pose.distributed import sync_batchnorm
from pose.evaluate import evaluate_model
from pose.loss import heatmap_loss
from pose.models import arch_description, build_model, heatmap_shape, resolve_arch, zero_init_residuals


@dataclass
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...]  # epochs at which the lr is multiplied by 0.1
    warmup_iters: int = 0


def recipe_for(data: DataSpec, epochs: int | None = None) -> Recipe:
    """docs/conventions.md §7: MPII Adam 1e-3, batch 32, 200 epochs, x0.1 at 150/170; COCO batch 128, 500-iter
    warm-up, 240 epochs (x0.1 at 170/200, the HRNet schedule). Synthetic data: a short run.
    With a different epoch count the milestones keep their relative position."""
    if data.synthetic:
        base = Recipe(30, 32, 1e-3, (22, 26), 0)
    elif data.kind == "mpii":
        base = Recipe(200, 32, 1e-3, (150, 170), 0)
    else:
        base = Recipe(240, 128, 1e-3, (170, 200), 500)
    if epochs is not None and epochs != base.epochs:
        if epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {epochs}")
        base.milestones = tuple(max(1, round(m * epochs / base.epochs)) for m in base.milestones)
        base.epochs = epochs
    return base


def lr_factor(step: int, iters_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of the base lr at iteration ``step``: linear warm-up, then x0.1 at each milestone."""
    epoch = step // max(1, iters_per_epoch)
    factor = 0.1 ** sum(1 for m in recipe.milestones if epoch >= m)
    if recipe.warmup_iters and step < recipe.warmup_iters:
        factor *= (step + 1) / recipe.warmup_iters
    return factor


@dataclass
class TrainConfig:
    """What to train and how; ``None`` takes the data's recipe (``recipe_for``) or the dataset default.

    Run controls (the output folder, resuming, stopping early, progress bars) are arguments of ``train``,
    as for ``search.loop.run_search``.
    """

    arch: str | Path  # a preset, a baseline or an arch-spec JSON file
    data: str  # a data SPEC (pose.data.parse_spec)
    epochs: int | None = None
    batch_size: int | None = None  # global: split across DDP processes
    lr: float | None = None
    input_hw: tuple[int, int] | None = None
    workers: int = 0
    seed: int = 0  # model init, sample order and augmentation
    max_minutes: float | None = None  # wall-clock budget: evaluate, save and stop once spent
    max_cpu_minutes: float | None = None  # the same in this process's CPU time (fair on a shared machine)
    on_bad_image: str = "fail"  # "fail" | "skip" (and count) unreadable images
    color_order: str | None = None  # default: the arch spec's, else RGB
    eval_every: int = 1  # evaluate every N epochs, and after the last
    flip_test: bool = False
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # torch CPU threads per process
    train_split: str | None = None
    val_split: str | None = None
    zero_init_residual: bool = False  # residual blocks start as the identity (pose.models.zero_init_residuals)

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.max_minutes and self.max_cpu_minutes:
            raise ValueError(
                "give either a wall-clock (--max-minutes) or a CPU-time (--max-cpu-minutes) budget, not both"
            )


def _stop_everywhere(stop: bool) -> bool:
    """All ranks agree to stop when any rank has run out of time (else DDP would hang)."""
    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    device: str | torch.device = "cpu",
    epoch: int = 0,
    deadline: float | None = None,
    clock: Callable[[], float] = time.time,
    progress: bool = True,
) -> dict[str, Any]:
    """One pass over ``loader`` (batches from ``pose.data.collate``); ``scheduler`` steps per iteration.

    Returns mean loss, samples seen, images skipped as unreadable, and whether the deadline cut it short.
    """
    model.train()
    total, samples, skipped, iters, stopped = 0.0, 0, 0, 0, False
    bar = tqdm(
        loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, dynamic_ncols=True, file=sys.stderr
    )
    for batch in bar:
        if batch is None:
            continue
        if isinstance(batch, dict):  # every image of the batch was unreadable
            skipped += batch["skipped"]
            continue
        images, target, weight, meta = batch
        skipped += int(meta["skipped"])
        images, target, weight = images.to(device), target.to(device), weight.to(device)
        loss = heatmap_loss(model(images), target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(images)
        samples += len(images)
        iters += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.6f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if deadline is not None and _stop_everywhere(clock() >= deadline):
            stopped = True
            break
    return {"loss": total / max(1, samples), "samples": samples, "skipped": skipped, "iters": iters, "stopped": stopped}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def plot_history(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Loss (train, val) and the validation metric per epoch, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax1.plot(*zip(*val, strict=True), "s-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("heatmap MSE loss")
    ax1.set_yscale("log")
    ax1.legend()
    acc = [(h["epoch"], h[metric]) for h in history if h.get(metric) is not None]
    if acc:
        ax2.plot(*zip(*acc, strict=True), "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"validation {'AP' if metric == 'AP' else 'PCKh@0.5'} (%)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, dev


@dataclass
class _Run:
    """The live objects of one training run: built by ``_build_run``, advanced one epoch at a time."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    spec: DataSpec
    recipe: Recipe
    input_hw: tuple[int, int]
    color_order: str
    train_set: PoseDataset
    val_set: PoseDataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: DistributedSampler
    loader: DataLoader
    log: Callable[[str], None] | None = None
    train_model: nn.Module | None = None  # ``model``, or its DDP wrapper
    start_epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def metric(self) -> str:
        return "AP" if self.spec.kind == "coco" else "Mean"

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def say(self, message: str) -> None:
        if self.is_main:
            (self.log or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def _deadline(cfg: TrainConfig) -> tuple[Callable[[], float], float | None]:
    """The clock the budget is read on and the time it runs out (None: no budget)."""
    # the CPU-time budget counts this process's CPU seconds, so a run on a shared machine is not cut short
    clock = time.process_time if cfg.max_cpu_minutes else time.time
    budget = cfg.max_cpu_minutes or cfg.max_minutes
    return clock, (clock() + budget * 60 if budget else None)


def _recipe(cfg: TrainConfig, spec: DataSpec) -> Recipe:
    recipe = recipe_for(spec, cfg.epochs)
    if cfg.batch_size is not None:
        recipe.batch_size = cfg.batch_size
    if cfg.lr is not None:
        recipe.lr = cfg.lr
    return recipe


def _build_run(
    cfg: TrainConfig,
    out: Path,
    rank: int,
    world: int,
    dev: torch.device,
    resume: bool,
    log: Callable[[str], None] | None,
) -> _Run:
    """Data, model, optimizer, loader and schedule of a fresh run (resuming loads into them afterwards)."""
    if (out / "last.pt").exists() and not resume:
        raise ValueError(
            f"{out} already holds a training run ({out / 'last.pt'}); pass --resume or choose another --out"
        )
    resolved = resolve_arch(cfg.arch)  # fails early on an unknown name
    spec = parse_spec(cfg.data, seed=0)
    recipe = _recipe(cfg, spec)
    input_hw = tuple(cfg.input_hw or default_input_hw(spec))
    if rank == 0:
        spec.resolve()  # generate synthetic data once, before other ranks look for it
    if world > 1:
        dist.barrier()
    # an arch spec may name the channel order its weights expect
    color_order = cfg.color_order or getattr(resolved, "color_order", None) or "RGB"
    train_set, val_set = build_datasets(
        spec,
        input_hw,
        color_order=color_order,
        on_bad_image=cfg.on_bad_image,
        seed=cfg.seed,
        splits=(cfg.train_split, cfg.val_split),
    )
    _seed_all(cfg.seed)
    model = build_model(cfg.arch, train_set.num_joints)
    if cfg.zero_init_residual:
        zero_init_residuals(model)
    expected = (train_set.num_joints, input_hw[0] // 4, input_hw[1] // 4)
    if heatmap_shape(model, input_hw) != expected:
        raise ValueError(
            f"{cfg.arch} maps {input_hw} to heatmaps {heatmap_shape(model, input_hw)}, expected {expected}"
        )
    model.to(dev)
    # several processes: batch norm over the global batch, so they train what one process would
    sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=world > 1
    )
    per_rank_batch = max(1, recipe.batch_size // world)
    loader = make_loader(train_set, per_rank_batch, sampler=sampler, workers=cfg.workers, seed=cfg.seed)
    iters_per_epoch = len(loader)
    if recipe.warmup_iters > iters_per_epoch * recipe.epochs // 10:
        # a warm-up longer than a tenth of a (short) run would leave it at a tiny lr throughout
        recipe.warmup_iters = iters_per_epoch * recipe.epochs // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, iters_per_epoch, recipe))
    return _Run(
        cfg=cfg,
        out=out,
        rank=rank,
        world=world,
        device=dev,
        spec=spec,
        recipe=recipe,
        input_hw=input_hw,
        color_order=color_order,
        train_set=train_set,
        val_set=val_set,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        loader=loader,
        log=log,
    )


def _resume(run: _Run) -> None:
    """Load OUT/last.pt (model, optimizer, schedule, RNG, best so far) and the metrics up to its epoch."""
    if not run.last_path.exists():
        run.say(f"--resume: no {run.last_path} yet, starting a new run")
        return
    ckpt = load_checkpoint(run.last_path)
    if ckpt.get("arch") != arch_description(run.cfg.arch) or ckpt.get("input_hw") != list(run.input_hw):
        raise ValueError(f"{run.last_path} was trained with another architecture or input size; cannot resume it")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    run.start_epoch, run.best, run.best_epoch = int(ckpt["epoch"]), ckpt.get("best"), ckpt.get("best_epoch")
    if run.metrics_path.exists():
        lines = run.metrics_path.read_text().splitlines()
        run.history = [h for h in (json.loads(line) for line in lines if line.strip()) if h["epoch"] <= run.start_epoch]
    run.say(f"resuming {run.last_path} after epoch {run.start_epoch} (best {run.metric} {run.best})")


def _checkpoint(run: _Run, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "arch": arch_description(run.cfg.arch),
        "arch_name": str(run.cfg.arch),
        "joints": run.train_set.num_joints,
        "input_hw": list(run.input_hw),
        "color_order": run.color_order,
        "dataset": run.spec.kind,
        "data": run.cfg.data,
        "epoch": entry["epoch"],
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": _rng_state(),
        "recipe": asdict(run.recipe),
        "seed": run.cfg.seed,
        "metric": run.metric,
        "metrics": dict(entry),
        "best": run.best,
        "best_epoch": run.best_epoch,
    }


def _evaluate_into(run: _Run, entry: dict[str, Any], progress: bool) -> None:
    """Validation loss and metric into ``entry``; track the best epoch."""
    metrics = evaluate_model(
        run.model,
        run.val_set,
        flip_test=run.cfg.flip_test,
        batch_size=run.recipe.batch_size,
        device=run.device,
        progress=progress,
    )
    entry["val_loss"] = metrics.pop("loss")
    entry.update({k: v for k, v in metrics.items() if k != "samples"})
    if run.best is None or entry[run.metric] > run.best:
        run.best, run.best_epoch = entry[run.metric], entry["epoch"]


def _save_epoch(run: _Run, entry: dict[str, Any]) -> None:
    """Rank 0: last.pt (and best.pt), one metrics line, the plot, one log line."""
    ckpt = _checkpoint(run, entry)
    save_atomic(ckpt, run.last_path)
    if run.best_epoch == entry["epoch"]:
        save_atomic(ckpt, run.out / "best.pt")
    with run.metrics_path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    plot_history(run.history, run.out / "training.png", run.metric)
    metric = run.metric
    shown = f" val {metric} {entry[metric]:.2f} (best {run.best:.2f} @ {run.best_epoch})" if metric in entry else ""
    run.say(
        f"epoch {entry['epoch']}/{run.recipe.epochs} loss {entry['train_loss']:.6f}{shown} lr {entry['lr']:.2e} "
        f"skipped {entry['skipped']} {entry['time_s']:.1f}s" + (" [time budget reached]" if entry["partial"] else "")
    )


def _run_epoch(
    run: _Run, epoch: int, *, clock: Callable[[], float], deadline: float | None, progress: bool, last: bool
) -> dict[str, Any]:
    """Train one epoch on every rank; rank 0 evaluates (when due or ``last``) and saves. Returns the entry."""
    epoch_start = time.time()
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    stats = train_one_epoch(
        run.train_model or run.model,
        run.loader,
        run.optimizer,
        scheduler=run.scheduler,
        device=run.device,
        epoch=epoch,
        deadline=deadline,
        clock=clock,
        progress=progress,
    )
    skipped = stats["skipped"]
    if run.world > 1:
        counts = torch.tensor([float(skipped), stats["loss"] * stats["samples"], float(stats["samples"])])
        dist.all_reduce(counts)
        skipped, stats["loss"] = int(counts[0]), float(counts[1] / max(1.0, counts[2]))
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": stats["loss"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "skipped": skipped,
        "partial": stats["stopped"],
    }
    if run.is_main:
        if (epoch + 1) % max(1, run.cfg.eval_every) == 0 or last or stats["stopped"]:
            _evaluate_into(run, entry, progress)
        entry["time_s"] = round(time.time() - epoch_start, 2)
        run.history.append(entry)
        _save_epoch(run, entry)
    if run.world > 1:
        dist.barrier()
    return entry


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    until_epoch: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``cfg.data`` into ``out``; returns a summary (best metric, epochs, paths, skipped images).

    ``resume`` continues from ``out/last.pt``; ``until_epoch`` stops this invocation after that epoch
    while the schedule still follows ``cfg.epochs`` (training in stages); ``log`` receives rank 0's
    progress lines (default: stderr).
    """
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    start_time, start_cpu = time.time(), time.process_time()
    clock, deadline = _deadline(cfg)
    rank, world, dev = _setup_distributed(cfg.device)
    progress = progress and rank == 0
    run = _build_run(cfg, Path(out), rank, world, dev, resume, log)
    if resume:
        _resume(run)
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        run.metrics_path.write_text("".join(json.dumps(h) + "\n" for h in run.history))
    run.train_model = run.model
    if world > 1:
        device_ids = [dev.index] if dev.type == "cuda" else None
        run.train_model = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
    recipe = run.recipe
    run.say(
        f"training {cfg.arch} on {cfg.data}: {len(run.train_set)} train / {len(run.val_set)} val samples, input "
        f"{run.input_hw[0]}x{run.input_hw[1]}, {recipe.epochs} epochs, batch {recipe.batch_size} ({world} "
        f"process(es)), lr {recipe.lr:g}, milestones {list(recipe.milestones)}, warm-up {recipe.warmup_iters} "
        f"iters, device {dev}"
    )
    total_skipped = sum(h.get("skipped", 0) for h in run.history)
    epochs_run, stopped = run.start_epoch, False
    for epoch in range(run.start_epoch, recipe.epochs):
        final = epoch + 1 == recipe.epochs or (until_epoch is not None and epoch + 1 >= until_epoch)
        entry = _run_epoch(run, epoch, clock=clock, deadline=deadline, progress=progress, last=final)
        total_skipped += entry["skipped"]
        epochs_run, stopped = epoch + 1, entry["partial"]
        if stopped or (until_epoch is not None and epoch + 1 >= until_epoch):
            break
    if world > 1:
        dist.barrier()
    return {
        "out": str(run.out),
        "arch": str(cfg.arch),
        "data": cfg.data,
        "epochs_run": epochs_run,
        "epochs": recipe.epochs,
        "metric": run.metric,
        "best": run.best,
        "best_epoch": run.best_epoch,
        "last": run.history[-1] if run.history else None,
        "skipped_images": total_skipped,
        "stopped_by_time_budget": stopped,
        "seconds": round(time.time() - start_time, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "world_size": world,
    }


if __name__ == "__main__":  # the old torchrun entry point: say where it went instead of doing nothing
    sys.exit("python -m pose.train is now `effpose train`; several processes: torchrun ... -m effpose train ARCH ...")
