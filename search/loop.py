"""The search loop of docs/design.md §6 (paper recipe: docs/conventions.md §8), plus the random-search baseline.

Training set split 80/20 (weights / architecture), weight-only warm-up epochs, then epochs that
alternate one pass of weight steps (SGD momentum 0.9, wd 1e-4, lr cosine to 0) with one pass of
architecture steps (Adam on alpha, default lr 0.05) on ``MSE + regulariser + w_H * entropy``: the
regulariser is ``sum_i lambda_i * log_tau_i(cost_i)`` for terms without a target and the budget loss of
``search.budget`` for those with one; ``w_H`` ramps from 0 to ``entropy_weight`` so alpha commits.
Each phase is one function (``weight_phase``, ``alpha_phase``, ``epoch_figures``,
``save_search_checkpoint``); ``derive_and_write`` takes the argmax, repairs it to the budgets and
writes the results.

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
from search import distributed
from search.budget import budget_loss, check_targets, cost_range, repair
from search.cost import CostTable, CostTerm, build_terms
from search.data import heatmap_accuracy, heatmap_loss, open_train_set, pose_loader, set_epoch, unpack_batch
from search.supernet import Supernet, sample_arch, space_of

CHECKPOINT = "search.pt"
TASK_TERMS = ("mse", "log-mse")
RANDOM_CHECKPOINT = "random.pt"
LOG = "log.jsonl"


@dataclass
class SearchConfig:
    """Every knob of a search. The defaults are the recipe measured to converge on this project's synthetic
    proxy on a 2-core CPU (a decided small-space architecture in minutes); why each value, with the runs
    behind it, is in docs/design.md ("Search defaults"). On real data at 256x256 pass ``--input`` and
    ``--data`` and expect proportionally longer epochs."""

    space: str | dict = "small"
    data: str = "synthetic-mpii-easy:1024"  # the proxy's data (pose.proxy.PROXY): the search learns what is judged
    costs: list[str] = field(default_factory=lambda: ["flops"])
    lambdas: list[float] = field(default_factory=lambda: [0.02])
    taus: list[float] = field(default_factory=lambda: [10.0])
    mode: str = "sampled"  # one path per step: ~1x a training step, mixed is ~4x (benchmarks/search_cost.py)
    warmup_epochs: int = 2  # weights first, so the first alpha steps compare trained candidates
    epochs: int = 8  # ~100 alpha steps at the defaults: enough to commit at arch_lr 0.05
    batch_size: int = 16
    input_hw: tuple[int, int] = (64, 64)
    cost_input_hw: tuple[int, int] = (256, 256)
    seed: int = 0
    weight_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    arch_lr: float = 0.05  # Adam moves each alpha ~lr per step; the paper's 3e-4 needs ~20k steps, we take ~100
    arch_fraction: float = 0.2
    drop_path: float = 0.2
    gumbel_temperature: float = 5.0  # GDAS-style annealing: soft gradients early, near one-hot late
    gumbel_temperature_end: float | None = 0.5  # annealed geometrically to this over the search epochs
    targets: list[float] | None = None  # one budget per cost, in its unit (ms, GFLOPs, Mparams)
    beta: float = 1.0  # weight of the budget loss (search.budget)
    entropy_weight: float = 1.0  # commitment term, ramped linearly from 0 over the search epochs
    task_term: str = "mse"  # "log-mse": alpha sees log(MSE), a relative loss change, like the budget's relative cost
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
        """Raise ValueError naming the first bad setting (before any data is read or agent asked)."""
        if self.mode not in ("mixed", "sampled"):
            raise ValueError(f"--mode must be mixed or sampled, got {self.mode!r}")
        if self.task_term not in TASK_TERMS:
            raise ValueError(f"--task-term must be one of {', '.join(TASK_TERMS)}, got {self.task_term!r}")
        if self.warmup_epochs < 0 or self.epochs < 0:
            raise ValueError("--warmup-epochs and --epochs must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.arch_fraction < 1.0:
            raise ValueError(f"arch_fraction must be in (0, 1), got {self.arch_fraction}")
        if any(v % 16 for v in self.input_hw):
            raise ValueError(f"--input must be a multiple of 16 in both sides, got {self.input_hw}")
        self._validate_costs()
        self._validate_schedule()

    def _validate_costs(self) -> None:
        if not self.costs:
            raise ValueError("at least one --cost is needed")
        for what, values in (("lambda", self.lambdas), ("tau", self.taus)):
            if len(values) not in (1, len(self.costs)):
                raise ValueError(
                    f"got {len(self.costs)} --cost but {len(values)} --{what}: give one, or one per --cost"
                )
        if self.targets is not None and len(self.targets) != len(self.costs):
            raise ValueError(f"got {len(self.costs)} --cost but {len(self.targets)} --target: give one per --cost")
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

    def _validate_schedule(self) -> None:
        if self.gumbel_temperature <= 0 or (self.gumbel_temperature_end or 1.0) <= 0:
            raise ValueError("--temperature and --temperature-end must be > 0")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.entropy_weight < 0:
            raise ValueError(f"--entropy-weight must be >= 0, got {self.entropy_weight}")


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


def phase_loader(dataset: Dataset, cfg: SearchConfig, shuffle: bool, seed: int) -> DataLoader:
    """``pose.data``'s loader (its collate drops unreadable images) with a generator seeded per phase."""
    return pose_loader(dataset, cfg.batch_size, shuffle=shuffle, workers=cfg.workers, seed=seed)


def take_batches(loader: DataLoader, max_batches: int | None):
    """(images, targets, weights) of at most ``max_batches`` batches; batches left empty by skipped images vanish
    (under torchrun that would leave the other processes waiting: it is an error there)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        unpacked = unpack_batch(batch)
        if unpacked is not None:
            yield unpacked
        elif distributed.world_size() > 1:
            raise RuntimeError(f"rank {distributed.rank()}: every image of a batch slice was unreadable")


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
            "target": t.target,
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
            d.get("target"),
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


@dataclass
class SearchRun:
    """Everything one search shares between its epochs (built fresh or restored from the checkpoint)."""

    net: Supernet
    terms: list[CostTerm]
    opt_w: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    dataset: Dataset
    weight_set: Dataset
    arch_set: Dataset
    val_set: Dataset
    joints: int
    split: list[list[int]]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0


def _cost_terms(cfg: SearchConfig, space: SearchSpace, joints: int) -> list[CostTerm]:
    """One cost term per ``--cost``; a search with ``--target`` checks at once that every budget can be met."""
    spec = TableSpec(space, cfg.cost_input_hw, 1, joints, tuple(cfg.head_widths), cfg.head_style, cfg.sic)
    terms = build_terms(cfg.costs, cfg.lambdas, cfg.taus, spec)
    if cfg.targets:
        for term, target in zip(terms, cfg.targets, strict=True):
            term.target = float(target)
        ranges = [cost_range(t.cost.table, t.cost.fixed, space) for t in terms]
        check_targets([t.cost.name for t in terms], [t.cost.unit for t in terms], ranges, list(cfg.targets))
    return terms


def _open_checkpoint(cfg: SearchConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        if not resume:
            raise ValueError(f"{out} already holds a search checkpoint ({ckpt_path}); pass --resume or another --out")
        state = load_search_checkpoint(ckpt_path)
        _check_same_config(state["config"], cfg, ckpt_path)
        return state
    if resume:
        print(f"search: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    return None


def build_run(cfg: SearchConfig, state: dict[str, Any] | None) -> SearchRun:
    """The supernet, optimizers, data splits and cost terms of a search, restored from ``state`` if given."""
    space: SearchSpace = space_of(cfg.space)
    dataset, plain, joints = open_train_set(cfg.data, cfg.input_hw, seed=cfg.seed)
    weight_idx, arch_idx = split_indices(len(dataset), cfg.arch_fraction, cfg.seed)
    if state is not None:
        terms = deserialize_costs(state["costs"])
    else:  # read once (an agent may be asked), the same tables everywhere under torchrun
        terms = distributed.from_rank0(lambda: _cost_terms(cfg, space, joints))
    seed_everything(cfg.seed)
    net = Supernet(
        space, joints, tuple(cfg.head_widths), cfg.head_style, cfg.sic, cfg.mode, cfg.drop_path, cfg.gumbel_temperature
    )
    distributed.prepare(net)  # under torchrun: synchronised batch norm, rank 0's initial weights
    opt_w = torch.optim.SGD(
        net.weight_parameters(), lr=cfg.weight_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr)
    total = cfg.warmup_epochs + cfg.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=max(1, total), eta_min=0.0)
    run = SearchRun(
        net, terms, opt_w, opt_a, sched, dataset, Subset(dataset, weight_idx), Subset(dataset, arch_idx),
        Subset(plain, arch_idx), joints, [weight_idx, arch_idx],
    )  # fmt: skip
    if state is not None:
        _restore(run, state, cfg)
    return run


def _restore(run: SearchRun, state: dict[str, Any], cfg: SearchConfig) -> None:
    if state["split"] != run.split:
        raise ValueError(f"--resume: the data set behind {cfg.data!r} changed since the checkpoint was written")
    run.net.load_state_dict(state["supernet"])
    run.opt_w.load_state_dict(state["opt_w"])
    run.opt_a.load_state_dict(state["opt_a"])
    run.sched.load_state_dict(state["sched"])
    set_rng_state(state["rng"])
    run.history = list(state["history"])
    run.start_epoch = int(state["epoch"])
    if state.get("threads") not in (None, torch.get_num_threads()):
        print(
            f"search: warning: checkpoint written with {state['threads']} torch threads, resuming with "
            f"{torch.get_num_threads()}: the result may differ in the last bits from an uninterrupted run",
            file=sys.stderr,
        )


def _bar(loader: DataLoader, cfg: SearchConfig, desc: str, progress: bool) -> tqdm:
    total = min(len(loader), cfg.max_batches or len(loader))
    return tqdm(
        take_batches(loader, cfg.max_batches),
        desc=desc,
        file=sys.stderr,
        disable=not progress,
        total=total,
        leave=False,
    )


def weight_phase(run: SearchRun, cfg: SearchConfig, epoch: int, label: str, progress: bool) -> float | None:
    """One pass of weight steps over the weight split (alpha fixed, one sampled path in sampled mode)."""
    seed_everything(phase_seed(cfg.seed, epoch, 0))
    set_epoch(run.dataset, epoch)
    loader = distributed.shard_loader(phase_loader(run.weight_set, cfg, True, phase_seed(cfg.seed, epoch, 0)))
    run.net.train()
    losses = []
    bar = _bar(loader, cfg, f"{label} weights", progress)
    for images, target, weight in bar:
        run.opt_w.zero_grad(set_to_none=True)
        share = distributed.share(len(images))  # 1.0 in one process
        loss = heatmap_loss(run.net(images, "weights"), target, weight) * share
        loss.backward()
        losses.append(distributed.sum_gradients(run.net.weight_parameters(), loss))
        run.opt_w.step()
        bar.set_postfix(loss=f"{losses[-1]:.2e}")
    run.sched.step()
    return float(np.mean(losses)) if losses else None


def regulariser(terms: list[CostTerm], probs: Tensor, beta: float) -> Tensor:
    """Cost part of the alpha loss: ``lambda * log_tau`` per term without a target, one budget loss for the rest."""
    free = sum((t.loss(probs) for t in terms if t.target is None), torch.zeros(()))
    budgeted = [t for t in terms if t.target is not None]
    expected = [t.cost.expected(probs) for t in budgeted]
    return free + budget_loss(expected, [float(t.target) for t in budgeted], beta)


def search_schedule(cfg: SearchConfig, epoch: int) -> dict[str, float]:
    """Gumbel temperature and commitment weight of a search epoch: both annealed geometrically / linearly from
    the first search epoch to the last (warm-up epochs get the start values)."""
    step = max(0, epoch - cfg.warmup_epochs)
    frac = step / max(1, cfg.epochs - 1)
    t0, t1 = cfg.gumbel_temperature, cfg.gumbel_temperature_end or cfg.gumbel_temperature
    return {"gumbel_temperature": t0 * (t1 / t0) ** frac, "entropy_weight": cfg.entropy_weight * frac}


def alpha_phase(run: SearchRun, cfg: SearchConfig, epoch: int, label: str, progress: bool) -> dict[str, Any]:
    """One pass of alpha steps on ``task + cost regulariser + w_H * entropy`` over the architecture split, where the
    task term is the heatmap MSE or, with ``task_term="log-mse"``, its log: a scale-free accuracy signal whose
    gradient is ``dMSE / MSE``, so a 1 % loss change weighs what a 1 % budget overshoot weighs at ``beta`` 1."""
    schedule = search_schedule(cfg, epoch)
    run.net.gumbel_temperature = schedule["gumbel_temperature"]
    seed_everything(phase_seed(cfg.seed, epoch, 1))
    loader = distributed.shard_loader(phase_loader(run.arch_set, cfg, True, phase_seed(cfg.seed, epoch, 1)))
    arch_losses, cost_losses = [], []
    for p in run.net.weight_parameters():
        p.requires_grad_(False)
    try:
        bar = _bar(loader, cfg, f"{label} alpha", progress)
        for images, target, weight in bar:
            run.opt_a.zero_grad(set_to_none=True)
            share = distributed.share(len(images))  # 1.0 in one process
            mse = heatmap_loss(run.net(images, "arch"), target, weight)
            task = torch.log(mse) if cfg.task_term == "log-mse" else mse
            reg = regulariser(run.terms, run.net.probs(), cfg.beta)
            (task * share + share * (reg + schedule["entropy_weight"] * run.net.entropy())).backward()
            arch_losses.append(distributed.sum_gradients(run.net.arch_parameters(), mse.detach() * share))
            run.opt_a.step()
            cost_losses.append(float(reg.detach()))
            bar.set_postfix(mse=f"{arch_losses[-1]:.2e}", cost=f"{cost_losses[-1]:.3f}")
    finally:
        for p in run.net.weight_parameters():
            p.requires_grad_(True)
    return {
        "arch_mse": float(np.mean(arch_losses)) if arch_losses else None,
        "cost_loss": float(np.mean(cost_losses)) if cost_losses else None,
        **schedule,
    }


@torch.no_grad()
def epoch_figures(run: SearchRun, cfg: SearchConfig, epoch: int) -> dict[str, Any]:
    """Validation loss, entropy, changed argmax layers, expected and derived cost (and budget use) after an epoch."""
    seed_everything(phase_seed(cfg.seed, epoch, 2))
    figures: dict[str, Any] = {"val_loss": evaluate_loss(run.net, run.val_set, cfg, lambda m, x: m(x, "eval"))}
    probs = run.net.probs().double()
    ops = run.net.derive_ops()
    previous = run.history[-1]["derived_ops"] if run.history else None
    figures["entropy"] = float(run.net.entropy())
    figures["changed_layers"] = None if previous is None else sum(a != b for a, b in zip(previous, ops, strict=True))
    figures["expected_cost"] = {t.cost.name: float(t.cost.expected(probs)) for t in run.terms}
    figures["derived_cost"] = {t.cost.name: t.cost.arch_cost(ops) for t in run.terms}
    figures["derived_ops"] = ops
    targets = {t.cost.name: t.target for t in run.terms if t.target is not None}
    if targets:
        figures["utilisation"] = {k: figures["expected_cost"][k] / v for k, v in targets.items()}
    return figures


def save_search_checkpoint(run: SearchRun, cfg: SearchConfig, epoch: int, path: Path) -> None:
    save_atomic(
        {
            "kind": "effpose-search",
            "config": cfg.to_json(),
            "epoch": epoch + 1,
            "supernet": run.net.state_dict(),
            "opt_w": run.opt_w.state_dict(),
            "opt_a": run.opt_a.state_dict(),
            "sched": run.sched.state_dict(),
            "rng": rng_state(),
            "history": run.history,
            "costs": serialize_costs(run.terms),
            "split": run.split,
            "joints": run.joints,
            "threads": torch.get_num_threads(),
        },
        path,
    )


def _epoch_line(label: str, record: dict[str, Any]) -> str:
    costs = " ".join(f"{k}={v:.4g}" for k, v in record["expected_cost"].items())
    changed = "" if record.get("changed_layers") is None else f" changed {record['changed_layers']}"
    return (
        f"{label}: train {record['train_loss']:.3e} val {record['val_loss']:.3e} entropy {record['entropy']:.3f}"
        f"{changed} expected {costs} ({record['seconds']:.1f}s)"
    )


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
    distributed.init()  # under torchrun: join its process group (only rank 0 writes below)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, _open_checkpoint(cfg, out, resume))
    distributed.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    total = cfg.warmup_epochs + cfg.epochs
    if run.start_epoch and distributed.is_writer():
        print(f"search: resuming {out} after epoch {run.start_epoch}/{total}", file=sys.stderr)
    if distributed.is_writer():
        write_log(out / LOG, run.history)
    for epoch in range(run.start_epoch, total):
        t0 = time.perf_counter()
        searching = epoch >= cfg.warmup_epochs
        label = f"epoch {epoch + 1}/{total} {'search' if searching else 'warm-up'}"
        record: dict[str, Any] = {
            "epoch": epoch + 1, "phase": "search" if searching else "warmup", "lr": run.opt_w.param_groups[0]["lr"]
        }  # fmt: skip
        record["train_loss"] = weight_phase(run, cfg, epoch, label, progress)
        if searching:
            record.update(alpha_phase(run, cfg, epoch, label, progress))
        record.update(epoch_figures(run, cfg, epoch))
        record["seconds"] = round(time.perf_counter() - t0, 3)
        run.history.append(record)
        if distributed.is_writer():
            save_search_checkpoint(run, cfg, epoch, out / CHECKPOINT)
            write_log(out / LOG, run.history)
            print(_epoch_line(label, record), file=sys.stderr)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < total:
            distributed.barrier()
            return None
    summary = derive_and_write(out, run, cfg) if distributed.is_writer() else None
    distributed.barrier()
    return summary


def derive_and_write(out: Path, run: SearchRun, cfg: SearchConfig) -> dict[str, Any]:
    """The argmax network, repaired to honour the budgets (``search.budget.repair``), written with its summary."""
    space = run.net.space
    arch = run.net.derive(name=f"search-{space.name}-{cfg.mode}")
    extra: dict[str, Any] = {}
    budgeted = [t for t in run.terms if t.target is not None]
    with torch.no_grad():
        probs = run.net.probs().double()
    if budgeted:
        ops, changes = repair(
            arch.ops, probs, [t.cost.table for t in budgeted], [t.cost.fixed for t in budgeted],
            [float(t.target) for t in budgeted], space,
        )  # fmt: skip
        extra["repair"] = {"argmax_ops": arch.ops, "changes": [c.to_json() for c in changes]}
        arch = arch.model_copy(update={"ops": ops})
    extra["probs"] = [[round(float(v), 5) for v in row] for row in probs]
    with torch.no_grad():
        extra["entropy"] = float(run.net.entropy())
    extra["expected_cost"] = {t.cost.name: float(t.cost.expected(probs)) for t in run.terms}
    extra["convergence"] = convergence(run.history, run.net.uniform_entropy())
    extra["measured"] = measure_on_agents(run.terms, arch, run.joints)
    return write_results(out, arch, run.terms, run.history, cfg, run.joints, extra)


def measure_on_agents(terms: list[CostTerm], arch: ArchSpec, joints: int) -> dict[str, dict[str, Any]]:
    """End-to-end latency of ``arch`` measured (``POST /v1/networks``) on every agent a cost term came from.

    A LUT file has no agent to ask; an unreachable agent is reported on stderr and left out, since the
    search result stands without it."""
    from urllib.parse import urlsplit, urlunsplit

    from lut_service.client import AgentClient, AgentError
    from lut_service.lut import measure_with_drift

    measured = {}
    for term in terms:
        source, meta = term.cost.source, term.cost.meta
        if not source.startswith(("http://", "https://")) or "backend" not in meta:
            continue
        parts = urlsplit(source)
        base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        spec = TableSpec.for_arch(
            arch, input_hw=term.cost.input_hw, batch=term.cost.batch, joints=joints,
            threads=int(meta.get("threads", 1)), dtype=str(meta.get("dtype", "float32")),
        )  # fmt: skip
        try:
            with AgentClient(base) as agent:  # with the table's reference: its drift since the build
                reference = meta.get("drift_reference")
                result, drift = measure_with_drift(agent, spec, [arch.ops], str(meta["backend"]), reference)
        except (AgentError, OSError) as exc:
            print(f"search: warning: cannot measure the derived network on {base}: {exc}", file=sys.stderr)
            continue
        latency = result["latencies"][0]
        measured[term.cost.name] = {
            "agent": base, "backend": meta["backend"], "threads": spec.threads, "batch": spec.batch,
            "ms": float(latency["median_ms"]), "clock": result.get("clock"), "drift": drift,
        }  # fmt: skip
    return measured


def convergence(history: list[dict[str, Any]], uniform_entropy: float) -> dict[str, Any]:
    """Is the search decided? Final entropy against uniform, and whether the argmax held over the last 2 epochs."""
    search = [r for r in history if r["phase"] == "search"]
    if not search:
        return {"decided": False, "reason": "no search epoch ran"}
    ratio = search[-1]["entropy"] / uniform_entropy
    stable = len(search) >= 3 and all(r.get("changed_layers") == 0 for r in search[-2:])
    return {
        "final_entropy": search[-1]["entropy"],
        "uniform_entropy": uniform_entropy,
        "entropy_vs_uniform": ratio,
        "changed_layers_last_two": [r.get("changed_layers") for r in search[-2:]],
        "decided": bool(ratio <= 0.5 and stable),
    }


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Dataset, cfg: SearchConfig, forward) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    loader = phase_loader(dataset, cfg, False, 0)
    for images, target, weight in take_batches(loader, cfg.max_batches):
        total += float(heatmap_loss(forward(model, images), target, weight)) * images.shape[0]
        count += images.shape[0]
    model.train(was_training)
    return total / max(1, count)


def budget_report(terms: list[CostTerm], ops: list[str]) -> dict[str, dict[str, Any]]:
    """Predicted cost of ``ops`` per term, with its target and the share of it used when there is one."""
    report = {}
    for t in terms:
        value = t.cost.arch_cost(ops)
        entry: dict[str, Any] = {
            "value": value,
            "unit": t.cost.unit,
            "input": list(t.cost.input_hw),
            "batch": t.cost.batch,
            "source": t.cost.source,
        }
        if t.target is not None:
            entry.update(target=t.target, used=value / t.target, within=value <= t.target * (1 + 1e-9))
        report[t.cost.name] = entry
    return report


def write_results(
    out: Path,
    arch: ArchSpec,
    terms: list[CostTerm],
    history: list[dict[str, Any]],
    cfg: SearchConfig,
    joints: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write arch.json, the pictures and search.json; return the summary printed by ``--json``."""
    from search.plots import plot_arch, plot_history

    arch.save(out / "arch.json")
    predicted = budget_report(terms, arch.ops)
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
        "config": cfg.to_json(),  # what produced it, for a user who finds search.json later
    }
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
    terms = _cost_terms(cfg, space, joints)
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
            loader = phase_loader(weight_set, cfg, True, phase_seed(cfg.seed, i * 1000 + epoch, 4))
            model.train()
            for images, target, weight in take_batches(loader, cfg.max_batches):
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
    return write_results(
        out,
        arch,
        terms,
        [],
        cfg,
        joints,
        {"random": {"n": n, "short_epochs": short_epochs, "best": best, "results": results}},
    )


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, cfg: SearchConfig) -> tuple[float, float]:
    model.eval()
    correct, visible, loss_sum, count = 0.0, 0.0, 0.0, 0
    for images, target, weight in take_batches(phase_loader(dataset, cfg, False, 0), cfg.max_batches):
        pred = model(images)
        loss_sum += float(heatmap_loss(pred, target, weight)) * images.shape[0]
        count += images.shape[0]
        c, v = heatmap_accuracy(pred, target, weight)
        correct += c
        visible += v
    return (correct / visible if visible else 0.0), loss_sum / max(1, count)
