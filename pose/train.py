"""Training of a derived network (paper Sec. 4, REFERENCE §6), single process or ``torchrun`` DDP.

``train(...)`` is the whole run (the CLI and the demo call it); ``train_one_epoch`` is reusable
(the loss is ``pose.loss.heatmap_loss``). A run writes ``OUT/last.pt`` after every epoch
(atomically), ``OUT/best.pt`` when the validation metric improves, ``OUT/metrics.jsonl`` and
``OUT/training.png``. Everything random is derived from the seed and the epoch (model init, sample
order, augmentation), so ``--resume`` continues exactly as an uninterrupted run would have.

Multi-process: ``torchrun --nproc_per_node N -m pose.train ARCH --data SPEC --out DIR``: gloo on
CPU, nccl on GPU, a distributed sampler, and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
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
from pose.data import SPEC_HELP, DataSpec, build_datasets, default_input_hw, make_loader, parse_spec
from pose.evaluate import evaluate_model
from pose.loss import heatmap_loss
from pose.models import arch_description, build_model, heatmap_shape, resolve_arch
from pose.space import parse_hw


@dataclass
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...]  # epochs at which the lr is multiplied by 0.1
    warmup_iters: int = 0


def recipe_for(data: DataSpec, epochs: int | None = None) -> Recipe:
    """REFERENCE §6: MPII Adam 1e-3, batch 32, 200 epochs, x0.1 at 150/170; COCO batch 128, 500-iter
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


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    clock=time.time,
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


def train(
    arch: str | Path,
    data: str,
    out: str | Path,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    input_hw: tuple[int, int] | None = None,
    workers: int = 0,
    resume: bool = False,
    seed: int = 0,
    max_minutes: float | None = None,
    max_cpu_minutes: float | None = None,
    on_bad_image: str = "fail",
    color_order: str | None = None,
    eval_every: int = 1,
    flip_test: bool = False,
    device: str = "auto",
    progress: bool = True,
    log=None,
    until_epoch: int | None = None,
    threads: int | None = None,
    splits: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Train ``arch`` on ``data`` into ``out``; returns a summary (best metric, epochs, paths, skipped images).

    ``until_epoch`` stops this invocation after that epoch while the schedule still follows ``epochs``
    (training in stages; ``resume=True`` continues).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    start_time, start_cpu = time.time(), time.process_time()
    if max_minutes and max_cpu_minutes:
        raise ValueError("give either a wall-clock (--max-minutes) or a CPU-time (--max-cpu-minutes) budget, not both")
    # the CPU-time budget counts this process's CPU seconds, so a run on a shared machine is not cut short
    clock = time.process_time if max_cpu_minutes else time.time
    budget = max_cpu_minutes or max_minutes
    deadline = clock() + budget * 60 if budget else None
    rank, world, dev = _setup_distributed(device)
    is_main = rank == 0
    progress = progress and is_main

    def say(message: str) -> None:
        if is_main:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(message)

    out = Path(out)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.jsonl"
    if last_path.exists() and not resume:
        raise ValueError(f"{out} already holds a training run ({last_path}); pass --resume or choose another --out")
    resolved = resolve_arch(arch)  # fails early on an unknown name
    spec = parse_spec(data, seed=0)
    recipe = recipe_for(spec, epochs)
    if batch_size is not None:
        recipe.batch_size = batch_size
    if lr is not None:
        recipe.lr = lr
    input_hw = tuple(input_hw or default_input_hw(spec))
    if is_main:
        spec.resolve()  # generate synthetic data once, before other ranks look for it
    if world > 1:
        dist.barrier()
    if color_order is None:  # an arch spec may name the channel order its weights expect
        color_order = getattr(resolved, "color_order", None) or "RGB"
    train_set, val_set = build_datasets(
        spec, input_hw, color_order=color_order, on_bad_image=on_bad_image, seed=seed, splits=splits
    )
    joints = train_set.num_joints

    _seed_all(seed)
    model = build_model(arch, joints)
    expected = (joints, input_hw[0] // 4, input_hw[1] // 4)
    if heatmap_shape(model, input_hw) != expected:
        raise ValueError(f"{arch} maps {input_hw} to heatmaps {heatmap_shape(model, input_hw)}, expected {expected}")
    model.to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=world > 1)
    per_rank_batch = max(1, recipe.batch_size // world)
    loader = make_loader(train_set, per_rank_batch, sampler=sampler, workers=workers, seed=seed, drop_last=False)
    iters_per_epoch = len(loader)
    if recipe.warmup_iters > iters_per_epoch * recipe.epochs // 10:
        # a warm-up longer than a tenth of a (short) run would leave it at a tiny lr throughout
        recipe.warmup_iters = iters_per_epoch * recipe.epochs // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, iters_per_epoch, recipe))

    start_epoch, best, best_epoch, history = 0, None, None, []
    metric = "AP" if spec.kind == "coco" else "Mean"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if ckpt.get("arch") != arch_description(arch) or ckpt.get("input_hw") != list(input_hw):
            raise ValueError(f"{last_path} was trained with another architecture or input size; cannot resume it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, best, best_epoch = int(ckpt["epoch"]), ckpt.get("best"), ckpt.get("best_epoch")
        if metrics_path.exists():
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [h for h in history if h["epoch"] <= start_epoch]
        say(f"resuming {last_path} after epoch {start_epoch} (best {metric} {best})")
    elif resume:
        say(f"--resume: no {last_path} yet, starting a new run")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    say(
        f"training {arch} on {data}: {len(train_set)} train / {len(val_set)} val samples, input {input_hw[0]}x"
        f"{input_hw[1]}, {recipe.epochs} epochs, batch {recipe.batch_size} ({world} process(es)), lr {recipe.lr:g}, "
        f"milestones {list(recipe.milestones)}, warm-up {recipe.warmup_iters} iters, device {dev}"
    )
    total_skipped = sum(h.get("skipped", 0) for h in history)
    epoch = start_epoch
    stopped = False
    for epoch in range(start_epoch, recipe.epochs):
        epoch_start = time.time()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        stats = train_one_epoch(
            train_model,
            loader,
            optimizer,
            scheduler=scheduler,
            device=dev,
            epoch=epoch,
            deadline=deadline,
            clock=clock,
            progress=progress,
        )
        stopped = stats["stopped"]
        skipped = stats["skipped"]
        if world > 1:
            counts = torch.tensor([float(skipped), stats["loss"] * stats["samples"], float(stats["samples"])])
            dist.all_reduce(counts)
            skipped, stats["loss"] = int(counts[0]), float(counts[1] / max(1.0, counts[2]))
        total_skipped += skipped
        last = epoch + 1 == recipe.epochs or stopped or (until_epoch is not None and epoch + 1 >= until_epoch)
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "skipped": skipped,
            "partial": stopped,
        }
        if is_main:
            if (epoch + 1) % max(1, eval_every) == 0 or last:
                metrics = evaluate_model(
                    model, val_set, flip_test=flip_test, batch_size=recipe.batch_size, device=dev, progress=progress
                )
                entry["val_loss"] = metrics.pop("loss")
                entry.update({k: v for k, v in metrics.items() if k != "samples"})
                if best is None or entry[metric] > best:
                    best, best_epoch = entry[metric], epoch + 1
            entry["time_s"] = round(time.time() - epoch_start, 2)
            history.append(entry)
            ckpt = {
                "model": model.state_dict(),
                "arch": arch_description(arch),
                "arch_name": str(arch),
                "joints": joints,
                "input_hw": list(input_hw),
                "color_order": color_order,
                "dataset": spec.kind,
                "data": data,
                "epoch": epoch + 1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "recipe": asdict(recipe),
                "seed": seed,
                "metric": metric,
                "metrics": {k: v for k, v in entry.items()},
                "best": best,
                "best_epoch": best_epoch,
            }
            save_atomic(ckpt, last_path)
            if best_epoch == epoch + 1:
                save_atomic(ckpt, best_path)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
            plot_history(history, out / "training.png", metric)
            shown = f" val {metric} {entry[metric]:.2f} (best {best:.2f} @ {best_epoch})" if metric in entry else ""
            say(
                f"epoch {epoch + 1}/{recipe.epochs} loss {stats['loss']:.6f}{shown} lr {entry['lr']:.2e} "
                f"skipped {skipped} {entry['time_s']:.1f}s" + (" [time budget reached]" if stopped else "")
            )
        if world > 1:
            dist.barrier()
        if stopped or (until_epoch is not None and epoch + 1 >= until_epoch):
            break
    if world > 1:
        dist.barrier()
    return {
        "out": str(out),
        "arch": str(arch),
        "data": data,
        "epochs_run": (epoch + 1) if recipe.epochs > start_epoch else start_epoch,
        "epochs": recipe.epochs,
        "metric": metric,
        "best": best,
        "best_epoch": best_epoch,
        "last": history[-1] if history else None,
        "skipped_images": total_skipped,
        "stopped_by_time_budget": stopped,
        "seconds": round(time.time() - start_time, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "world_size": world,
    }


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH", help="a preset, a baseline or an arch-spec JSON file")
    parser.add_argument("--data", required=True, metavar="SPEC", help=SPEC_HELP)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="run folder (last.pt, best.pt, metrics.jsonl, training.png)"
    )
    parser.add_argument("--epochs", type=int, help="default: 200 (mpii), 240 (coco), 30 (synthetic)")
    parser.add_argument("--batch-size", type=int, help="global batch size (default 32; coco 128)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument(
        "--input",
        type=parse_hw,
        help="input HxW (default coco 256x192, mpii 256x256, synthetic 128x96, synthetic-mpii 128x128)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, sample order and augmentation")
    parser.add_argument("--max-minutes", type=float, help="stop (evaluate and save) once this much time has passed")
    parser.add_argument("--max-cpu-minutes", type=float, help="the same budget in CPU time of this process")
    parser.add_argument(
        "--on-bad-image", choices=("fail", "skip"), default="fail", help="unreadable images: stop, or skip and count"
    )
    parser.add_argument("--color-order", choices=("RGB", "BGR"), help="channel order fed to the model (default RGB)")
    parser.add_argument("--train-split", help="training split folder (default train2017 / train)")
    parser.add_argument("--val-split", help="validation split folder (default val2017 / valid)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--flip-test", action="store_true", help="use the flip test in the per-epoch evaluation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")


def cmd_train(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    try:
        summary = _train_from_args(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(summary))
        else:
            best = "n/a" if summary["best"] is None else f"{summary['best']:.2f}"
            print(
                f"done: {summary['epochs_run']} epochs, best {summary['metric']} {best} "
                f"(epoch {summary['best_epoch']}), "
                f"{summary['skipped_images']} unreadable images skipped; wrote {summary['out']}/last.pt, best.pt, "
                "metrics.jsonl, training.png"
            )
    return 0


def _train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return train(
        args.arch,
        args.data,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        input_hw=args.input,
        workers=args.workers,
        resume=args.resume,
        seed=args.seed,
        max_minutes=args.max_minutes,
        max_cpu_minutes=args.max_cpu_minutes,
        on_bad_image=args.on_bad_image,
        color_order=args.color_order,
        eval_every=args.eval_every,
        flip_test=args.flip_test,
        device=args.device,
        threads=args.threads,
        splits=(args.train_split, args.val_split),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m pose.train`` (the torchrun entry): same arguments as ``effpose train``."""
    parser = argparse.ArgumentParser(prog="python -m pose.train", description="train a pose network")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"pose.train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
