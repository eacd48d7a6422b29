"""The search loop of REFERENCE §6, scaled by configuration, plus the random-search baseline.

Training set split 80/20 (weights / architecture), weight-only warm-up epochs, then epochs that
alternate one pass of weight steps (SGD momentum 0.9, wd 1e-4, lr cosine to 0) with one pass of
architecture steps (Adam 3e-4) on ``MSE + sum_i lambda_i * log_tau_i(cost_i)``.

Reproducibility and resume: every phase of every epoch reseeds torch, numpy and random from
``(seed, epoch, phase)`` and the data loader shuffles with its own generator seeded the same way, so
a run resumed from the checkpoint of epoch k replays epochs k+1... exactly as the uninterrupted run
does. The checkpoint (written atomically after every epoch) still holds the RNG states, both
optimizers, the scheduler, alpha, weights, the cost tables and the history, so nothing depends on the
agent being reachable on resume.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from pose.checkpoint import save_atomic
from pose.models import PoseNet
from pose.space import ArchSpec, SearchSpace, TableSpec
from search.cost import CostTable, CostTerm, build_terms
from search.data import heatmap_accuracy, heatmap_loss, open_train_set, pose_loader, set_epoch, unpack_batch
from search.supernet import Supernet, sample_arch, space_of

CHECKPOINT = "search.pt"
RANDOM_CHECKPOINT = "random.pt"
LOG = "log.jsonl"


@dataclass
class SearchConfig:
    """Every knob of a search; the defaults make a small-space search run in minutes on a laptop CPU."""

    space: str | dict = "small"
    data: str = "synthetic:64"
    costs: list[str] = field(default_factory=lambda: ["flops"])
    lambdas: list[float] = field(default_factory=lambda: [0.02])
    taus: list[float] = field(default_factory=lambda: [10.0])
    mode: str = "mixed"
    warmup_epochs: int = 2
    epochs: int = 4
    batch_size: int = 8
    input_hw: tuple[int, int] = (128, 128)
    cost_input_hw: tuple[int, int] = (256, 256)
    seed: int = 0
    weight_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    arch_lr: float = 3e-4
    arch_fraction: float = 0.2
    drop_path: float = 0.2
    gumbel_temperature: float = 1.0
    head_widths: tuple[int, ...] = (64, 32)
    head_style: str = "plain"
    sic: bool = True
    workers: int = 0
    max_batches: int | None = None  # cap per phase and epoch (smoke runs)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_hw"] = list(self.input_hw)
        data["cost_input_hw"] = list(self.cost_input_hw)
        data["head_widths"] = list(self.head_widths)
        return data

    def validate(self) -> None:
        if self.mode not in ("mixed", "sampled"):
            raise ValueError(f"--mode must be mixed or sampled, got {self.mode!r}")
        if self.warmup_epochs < 0 or self.epochs < 0:
            raise ValueError("--warmup-epochs and --epochs must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.arch_fraction < 1.0:
            raise ValueError(f"arch_fraction must be in (0, 1), got {self.arch_fraction}")
        if not self.costs:
            raise ValueError("at least one --cost is needed")
        for what, values in (("lambda", self.lambdas), ("tau", self.taus)):
            if len(values) not in (1, len(self.costs)):
                raise ValueError(
                    f"got {len(self.costs)} --cost but {len(values)} --{what}: give one, or one per --cost"
                )
        if any(t <= 1.0 for t in self.taus):
            raise ValueError(f"--tau must be > 1 (the log base of the cost term), got {self.taus}")
        if any(lam < 0 for lam in self.lambdas):
            raise ValueError(f"--lambda must be >= 0, got {self.lambdas}")
        for cost in self.costs:
            if cost not in ("flops", "params") and not cost.startswith(("http://", "https://")):
                if not Path(cost).is_file():
                    raise ValueError(
                        f"--cost {cost!r} is not flops, params, an http(s) agent/LUT URL or an existing LUT file"
                    )
        if any(v % 16 for v in self.input_hw):
            raise ValueError(f"--input must be a multiple of 16 in both sides, got {self.input_hw}")


# -- helpers ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def phase_seed(seed: int, epoch: int, phase: int) -> int:
    return (seed * 1_000_003 + epoch * 7 + phase) % 2**31


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (weights, arch) split of ``n`` samples; the arch part is ``fraction`` of them."""
    if n < 2:
        raise ValueError(f"the training set has {n} sample(s); the search needs at least 2 to split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_arch = min(n - 1, max(1, round(n * fraction)))
    return sorted(perm[n_arch:]), sorted(perm[:n_arch])


def make_loader(dataset: Dataset, cfg: SearchConfig, shuffle: bool, seed: int) -> DataLoader:
    """``pose.data``'s loader (its collate drops unreadable images) with a generator seeded per phase."""
    return pose_loader(dataset, cfg.batch_size, shuffle=shuffle, workers=cfg.workers, seed=seed)


def limited(loader: DataLoader, max_batches: int | None):
    """(images, targets, weights) of at most ``max_batches`` batches; batches left empty by skipped images vanish."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        unpacked = unpack_batch(batch)
        if unpacked is not None:
            yield unpacked


def serialize_costs(terms: list[CostTerm]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.cost.name,
            "unit": t.cost.unit,
            "table": t.cost.table,
            "fixed": t.cost.fixed,
            "source": t.cost.source,
            "input_hw": list(t.cost.input_hw),
            "batch": t.cost.batch,
            "meta": t.cost.meta,
            "lam": t.lam,
            "tau": t.tau,
        }
        for t in terms
    ]


def deserialize_costs(items: list[dict[str, Any]]) -> list[CostTerm]:
    return [
        CostTerm(
            CostTable(
                d["name"], d["unit"], d["table"], d["fixed"], d["source"], tuple(d["input_hw"]), d["batch"], d["meta"]
            ),
            d["lam"],
            d["tau"],
        )
        for d in items
    ]


def load_search_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"search checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != "effpose-search":
        raise ValueError(f"{path} is not an effpose search checkpoint")
    return data


def _check_same_config(stored: dict[str, Any], cfg: SearchConfig, path: Path) -> None:
    current = json.loads(json.dumps(cfg.to_json()))
    stored = json.loads(json.dumps(stored))
    free = {"workers"}  # settings that cannot change the result may differ on resume
    diff = sorted(k for k in (set(stored) | set(current)) - free if stored.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ValueError(f"--resume: {path} was written by a search with other settings ({details})")


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite the JSONL log from the checkpointed history (a resumed run never duplicates lines)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    tmp.replace(path)


# -- the differentiable search ---------------------------------------------------------------------


def _cost_values(terms: list[CostTerm], probs: Tensor, ops: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    expected = {t.cost.name: float(t.cost.expected(probs.double())) for t in terms}
    derived = {t.cost.name: t.cost.arch_cost(ops) for t in terms}
    return expected, derived


def run_search(
    cfg: SearchConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any] | None:
    """Run (or resume) a differentiable search; write OUT/arch.json, plots, log; return the summary.

    ``stop_after_epoch`` ends the run (returning None, checkpoint written) once that many epochs are done:
    a time-boxed run to be continued with ``resume=True``.
    """
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"{out} already holds a search checkpoint ({ckpt_path}); pass --resume or another --out")
        state = load_search_checkpoint(ckpt_path)
        _check_same_config(state["config"], cfg, ckpt_path)
    elif resume:
        print(f"search: no checkpoint in {out}, starting from scratch", file=sys.stderr)

    space: SearchSpace = space_of(cfg.space)
    dataset, plain, joints = open_train_set(cfg.data, cfg.input_hw, seed=cfg.seed)
    weight_idx, arch_idx = split_indices(len(dataset), cfg.arch_fraction, cfg.seed)
    weight_set, arch_set, val_set = Subset(dataset, weight_idx), Subset(dataset, arch_idx), Subset(plain, arch_idx)
    spec = TableSpec(space, cfg.cost_input_hw, 1, joints, tuple(cfg.head_widths), cfg.head_style, cfg.sic)
    if state is not None:
        terms = deserialize_costs(state["costs"])
    else:
        terms = build_terms(cfg.costs, cfg.lambdas, cfg.taus, spec)

    seed_everything(cfg.seed)
    net = Supernet(
        space, joints, tuple(cfg.head_widths), cfg.head_style, cfg.sic, cfg.mode, cfg.drop_path, cfg.gumbel_temperature
    )
    total_epochs = cfg.warmup_epochs + cfg.epochs
    opt_w = torch.optim.SGD(
        net.weight_parameters(), lr=cfg.weight_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=max(1, total_epochs), eta_min=0.0)
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        net.load_state_dict(state["supernet"])
        opt_w.load_state_dict(state["opt_w"])
        opt_a.load_state_dict(state["opt_a"])
        sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"])
        history = list(state["history"])
        start = int(state["epoch"])
        if state["split"] != [weight_idx, arch_idx]:
            raise ValueError(f"--resume: the data set behind {cfg.data!r} changed since {ckpt_path} was written")
        print(f"search: resuming {out} after epoch {start}/{total_epochs}", file=sys.stderr)
        if state.get("threads") not in (None, torch.get_num_threads()):
            print(
                f"search: warning: checkpoint written with {state['threads']} torch threads, resuming with "
                f"{torch.get_num_threads()}: the result may differ in the last bits from an uninterrupted run",
                file=sys.stderr,
            )
    write_log(out / LOG, history)

    for epoch in range(start, total_epochs):
        t0 = time.perf_counter()
        searching = epoch >= cfg.warmup_epochs
        label = f"epoch {epoch + 1}/{total_epochs} {'search' if searching else 'warm-up'}"
        lr = opt_w.param_groups[0]["lr"]
        # weights
        seed_everything(phase_seed(cfg.seed, epoch, 0))
        set_epoch(dataset, epoch)
        loader = make_loader(weight_set, cfg, True, phase_seed(cfg.seed, epoch, 0))
        net.train()
        losses = []
        bar = tqdm(
            limited(loader, cfg.max_batches),
            desc=f"{label} weights",
            file=sys.stderr,
            disable=not progress,
            total=min(len(loader), cfg.max_batches or len(loader)),
            leave=False,
        )
        for images, target, weight in bar:
            opt_w.zero_grad(set_to_none=True)
            loss = heatmap_loss(net(images, "weights"), target, weight)
            loss.backward()
            opt_w.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.2e}")
        sched.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": "search" if searching else "warmup",
            "lr": lr,
            "train_loss": float(np.mean(losses)) if losses else None,
        }
        # architecture
        if searching:
            seed_everything(phase_seed(cfg.seed, epoch, 1))
            loader = make_loader(arch_set, cfg, True, phase_seed(cfg.seed, epoch, 1))
            arch_losses, cost_losses = [], []
            for p in net.weight_parameters():
                p.requires_grad_(False)
            try:
                bar = tqdm(
                    limited(loader, cfg.max_batches),
                    desc=f"{label} alpha",
                    file=sys.stderr,
                    disable=not progress,
                    total=min(len(loader), cfg.max_batches or len(loader)),
                    leave=False,
                )
                for images, target, weight in bar:
                    opt_a.zero_grad(set_to_none=True)
                    mse = heatmap_loss(net(images, "arch"), target, weight)
                    probs = net.probs()
                    reg = sum((t.loss(probs) for t in terms), torch.zeros(()))
                    (mse + reg).backward()
                    opt_a.step()
                    arch_losses.append(mse.item())
                    cost_losses.append(float(reg.detach()))
                    bar.set_postfix(mse=f"{arch_losses[-1]:.2e}", cost=f"{cost_losses[-1]:.3f}")
            finally:
                for p in net.weight_parameters():
                    p.requires_grad_(True)
            record["arch_mse"] = float(np.mean(arch_losses)) if arch_losses else None
            record["cost_loss"] = float(np.mean(cost_losses)) if cost_losses else None
        # validation on the architecture split
        seed_everything(phase_seed(cfg.seed, epoch, 2))
        record["val_loss"] = evaluate_loss(net, val_set, cfg, lambda m, x: m(x, "eval"))
        with torch.no_grad():
            probs = net.probs()
            ops = net.derive_ops()
            expected, derived = _cost_values(terms, probs, ops)
            record["entropy"] = float(net.entropy())
        record["expected_cost"] = expected
        record["derived_cost"] = derived
        record["derived_ops"] = ops
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        save_atomic(
            {
                "kind": "effpose-search",
                "config": cfg.to_json(),
                "epoch": epoch + 1,
                "supernet": net.state_dict(),
                "opt_w": opt_w.state_dict(),
                "opt_a": opt_a.state_dict(),
                "sched": sched.state_dict(),
                "rng": rng_state(),
                "history": history,
                "costs": serialize_costs(terms),
                "split": [weight_idx, arch_idx],
                "joints": joints,
                "threads": torch.get_num_threads(),
            },
            ckpt_path,
        )
        write_log(out / LOG, history)
        costs_text = " ".join(f"{k}={v:.4g}" for k, v in expected.items())
        print(
            f"{label}: train {record['train_loss']:.3e} val {record['val_loss']:.3e} "
            f"entropy {record['entropy']:.3f} expected {costs_text} ({record['seconds']:.1f}s)",
            file=sys.stderr,
        )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < total_epochs:
            return None

    arch = net.derive(name=f"search-{space.name}-{cfg.mode}")
    return finish(out, arch, terms, net, history, cfg, joints)


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Dataset, cfg: SearchConfig, forward) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    loader = make_loader(dataset, cfg, False, 0)
    for images, target, weight in limited(loader, cfg.max_batches):
        total += float(heatmap_loss(forward(model, images), target, weight)) * images.shape[0]
        count += images.shape[0]
    model.train(was_training)
    return total / max(1, count)


def finish(
    out: Path,
    arch: ArchSpec,
    terms: list[CostTerm],
    net: Supernet | None,
    history: list[dict[str, Any]],
    cfg: SearchConfig,
    joints: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write arch.json, the pictures and search.json; return the summary printed by ``--json``."""
    from search.plots import plot_arch, plot_history

    arch.save(out / "arch.json")
    predicted = {
        t.cost.name: {
            "value": t.cost.arch_cost(arch.ops),
            "unit": t.cost.unit,
            "input": list(t.cost.input_hw),
            "batch": t.cost.batch,
            "source": t.cost.source,
        }
        for t in terms
    }
    plot_arch(
        arch, out / "arch.png", title=", ".join(f"{k} {v['value']:.4g} {v['unit']}" for k, v in predicted.items())
    )
    if history and "entropy" in history[0]:
        plot_history(history, out / "search.png")
    summary: dict[str, Any] = {
        "out": str(out),
        "arch": str(out / "arch.json"),
        "ops": arch.ops,
        "space": arch.search_space.name,
        "joints": joints,
        "predicted_cost": predicted,
        "epochs": len(history),
        "mode": cfg.mode,
    }
    if net is not None:
        with torch.no_grad():
            summary["probs"] = [[round(float(v), 5) for v in row] for row in net.probs()]
            summary["entropy"] = float(net.entropy())
            summary["expected_cost"] = {t.cost.name: float(t.cost.expected(net.probs().double())) for t in terms}
    if history:
        summary["final"] = history[-1]
    summary.update(extra or {})
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- random-search baseline ------------------------------------------------------------------------


def run_random_search(
    cfg: SearchConfig, out: str | Path, n: int, short_epochs: int, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Table 3: N random legal architectures, each trained ``short_epochs`` from scratch (Adam 1e-3) on the
    weight split, the best by validation accuracy (heatmap PCK on the 20% split) wins."""
    cfg.validate()
    if n < 1 or short_epochs < 1:
        raise ValueError(f"--random and --short-epochs must be >= 1, got {n} and {short_epochs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / RANDOM_CHECKPOINT
    results: list[dict[str, Any]] = []
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"{out} already holds a random-search checkpoint; pass --resume or another --out")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["n"] != n or state["short_epochs"] != short_epochs:
            raise ValueError(
                f"--resume: {ckpt_path} was written with --random {state['n']} --short-epochs {state['short_epochs']}"
            )
        _check_same_config(state["config"], cfg, ckpt_path)
        results = list(state["results"])
    space = space_of(cfg.space)
    dataset, plain, joints = open_train_set(cfg.data, cfg.input_hw, seed=cfg.seed)
    weight_idx, arch_idx = split_indices(len(dataset), cfg.arch_fraction, cfg.seed)
    weight_set, val_set = Subset(dataset, weight_idx), Subset(plain, arch_idx)
    spec = TableSpec(space, cfg.cost_input_hw, 1, joints, tuple(cfg.head_widths), cfg.head_style, cfg.sic)
    terms = build_terms(cfg.costs, cfg.lambdas, cfg.taus, spec)
    generator = torch.Generator().manual_seed(cfg.seed)
    head_kwargs = {"head_widths": tuple(cfg.head_widths), "head_style": cfg.head_style, "sic": cfg.sic}
    archs = [sample_arch(space, generator, head_kwargs, name=f"random-{i}") for i in range(n)]
    outer = tqdm(range(n), desc="random search", file=sys.stderr, disable=not progress, initial=len(results))
    for i in range(len(results), n):
        arch = archs[i]
        seed_everything(phase_seed(cfg.seed, i, 3))
        model = PoseNet(arch, joints)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for epoch in range(short_epochs):
            set_epoch(dataset, epoch)
            loader = make_loader(weight_set, cfg, True, phase_seed(cfg.seed, i * 1000 + epoch, 4))
            model.train()
            for images, target, weight in limited(loader, cfg.max_batches):
                optimizer.zero_grad(set_to_none=True)
                loss = heatmap_loss(model(images), target, weight)
                loss.backward()
                optimizer.step()
        accuracy, val_loss = evaluate_accuracy(model, val_set, cfg)
        results.append(
            {
                "index": i,
                "ops": arch.ops,
                "val_accuracy": accuracy,
                "val_loss": val_loss,
                "cost": {t.cost.name: t.cost.arch_cost(arch.ops) for t in terms},
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        save_atomic(
            {
                "kind": "effpose-random-search",
                "config": cfg.to_json(),
                "n": n,
                "short_epochs": short_epochs,
                "results": results,
            },
            ckpt_path,
        )
        write_log(out / "random.jsonl", results)
        outer.update(1)
        outer.set_postfix(best=f"{max(r['val_accuracy'] for r in results):.3f}")
    outer.close()
    best = max(results, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    arch = archs[best["index"]].model_copy(update={"name": f"random-best-{space.name}"})
    return finish(
        out,
        arch,
        terms,
        None,
        [],
        cfg,
        joints,
        {"random": {"n": n, "short_epochs": short_epochs, "best": best, "results": results}},
    )


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, cfg: SearchConfig) -> tuple[float, float]:
    model.eval()
    correct, visible, loss_sum, count = 0.0, 0.0, 0.0, 0
    for images, target, weight in limited(make_loader(dataset, cfg, False, 0), cfg.max_batches):
        pred = model(images)
        loss_sum += float(heatmap_loss(pred, target, weight)) * images.shape[0]
        count += images.shape[0]
        c, v = heatmap_accuracy(pred, target, weight)
        correct += c
        visible += v
    return (correct / visible if visible else 0.0), loss_sum / max(1, count)
