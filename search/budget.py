"""Latency / FLOPs / params budgets: the regulariser that holds the expected cost at a target, and the repair
step that makes the derived (argmax) network honour every target.

Formulation (chosen after TuNAS' absolute reward, generalised to several budgets)::

    u_i   = E_p[cost_i] / T_i                       utilisation of budget i (Eqs. 4-5 over T_i)
    L_bud = beta * | max_i u_i - 1 |                added to the heatmap MSE in every alpha step

Why this form:

- ``|u - 1|`` pulls the expected cost *up* when the search is under budget and *down* when it is over, so
  the search lands at the target instead of far below it (TuNAS reports the same against MnasNet's soft
  ``(LAT/T)^w``, which is flat below the target: there the accuracy signal alone must push the cost up,
  and on a weak proxy it does not). A one-sided Lagrange multiplier (dual ascent) has the same flaw
  below the target: the multiplier decays to 0 and nothing spends the budget.
- ``max_i`` makes several budgets one constraint: ``u_i <= 1 for all i`` is ``max_i u_i <= 1``. The
  gradient flows through the binding budget only, which sits at its target; the others stay under
  theirs. This is the joint multi-device search (say a CPU agent at 15 ms and a FLOPs cap at 0.5).
- The loss is scale-free (every ``u_i`` is 1 at its target), so ``beta`` does not depend on the unit
  or the data, unlike ``lambda``. Alpha is trained with Adam, whose step size is set by the learning
  rate, so ``beta`` only sets how much the budget outweighs the MSE per alpha cell. The default 1.0 makes
  the budget dominate whenever ``u`` is off target by more than a few per cent; at the target its sign
  flips from step to step and averages out, which is meant to leave the MSE to decide *which* layers
  spend the budget. Measured (``benchmarks/budget_search.py``): on the synthetic CPU proxy it does not.
  The MSE's pull on alpha is too weak, every search spreads medium ops over all layers, and random
  networks of equal latency score higher. ``--task-term log-mse`` (a 100x stronger task gradient)
  changes neither.

The expected cost is a property of ``p``, not of the argmax network, so after the search the derived
network is checked against every target and, where needed, repaired (``repair``):

- **Overshoot** (some ``cost_i > T_i``): first look for one single-layer change that makes the network
  feasible under every budget; among those, take the op alpha prefers most. If no single change is
  enough, take the change that removes the most violation (``sum_i max(0, cost_i/T_i - 1)``), ties
  to alpha, and repeat. This changes as few layers as the greedy order can, and alpha picks the ops.
- **Under-use** (every ``cost_i < 0.9 T_i``): add the single-layer change, most preferred by alpha, that
  raises the binding utilisation and stays feasible, until some ``cost_i >= 0.9 T_i`` or no change fits.

The summary lists every changed layer with its old and new op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pose.space import CANDIDATE_OPS, SearchSpace

FILL_FRACTION = 0.9  # the derived network should spend at least this share of one budget
DEFAULT_BETA = 1.0


@dataclass(frozen=True)
class Change:
    """One layer the repair step changed."""

    layer: int
    old: str
    new: str
    reason: str  # "over budget" or "under-used budget"

    def to_json(self) -> dict[str, object]:
        return {"layer": self.layer, "old": self.old, "new": self.new, "reason": self.reason}


def budget_loss(expected: list[Tensor], targets: list[float], beta: float = DEFAULT_BETA) -> Tensor:
    """``beta * |max_i E[cost_i]/T_i - 1|`` (module docstring); ``expected`` are scalar tensors with grad."""
    if not expected:
        return torch.zeros(())
    utilisation = torch.stack([e / t for e, t in zip(expected, targets, strict=True)])
    return beta * (utilisation.max() - 1.0).abs()


def legal_mask(space: SearchSpace) -> Tensor:
    """``[layers, ops]`` boolean mask of the legal cells of ``space`` (``skip`` only where it is allowed)."""
    layers = space.layers()
    mask = torch.zeros(len(layers), len(CANDIDATE_OPS), dtype=torch.bool)
    for layer in layers:
        for op in layer.legal_ops():
            mask[layer.index, CANDIDATE_OPS.index(op)] = True
    return mask


def _costs(tables: list[Tensor], fixed: list[float], cols: list[int]) -> list[float]:
    rows = torch.arange(len(cols))
    return [f + float(t[rows, torch.tensor(cols)].sum()) for t, f in zip(tables, fixed, strict=True)]


def _violation(costs: list[float], targets: list[float]) -> float:
    return sum(max(0.0, c / t - 1.0) for c, t in zip(costs, targets, strict=True))


def _utilisation(costs: list[float], targets: list[float]) -> float:
    return max(c / t for c, t in zip(costs, targets, strict=True))


@dataclass
class _Problem:
    tables: list[Tensor]  # per budget, [layers, ops] float64
    fixed: list[float]
    targets: list[float]
    mask: Tensor
    logp: Tensor  # [layers, ops]

    def costs(self, cols: list[int]) -> list[float]:
        return _costs(self.tables, self.fixed, cols)

    def moves(self, cols: list[int]):  # noqa: ANN201 - generator of (layer, col, new costs, logp)
        """Every single-layer change of ``cols`` with the costs it leads to and alpha's log-probability."""
        base = self.costs(cols)
        for layer, current in enumerate(cols):
            for col in torch.nonzero(self.mask[layer]).flatten().tolist():
                if col == current:
                    continue
                new = [
                    c + float(t[layer, col] - t[layer, current]) for c, t in zip(base, self.tables, strict=True)
                ]
                yield layer, col, new, float(self.logp[layer, col])


def _fix_overshoot(problem: _Problem, cols: list[int], changes: list[Change]) -> bool:
    """One greedy step of the overshoot repair; False when no change reduces the violation."""
    targets = problem.targets
    violation = _violation(problem.costs(cols), targets)
    feasible, best = None, None
    for layer, col, new, logp in problem.moves(cols):
        v = _violation(new, targets)
        if v == 0.0 and (feasible is None or logp > feasible[2]):
            feasible = (layer, col, logp)
        gain = violation - v
        if gain > 1e-12 and (best is None or (gain, logp) > (best[2], best[3])):
            best = (layer, col, gain, logp)
    pick = feasible or (best[:2] if best else None)
    if pick is None:
        return False
    layer, col = pick[0], pick[1]
    changes.append(Change(layer, CANDIDATE_OPS[cols[layer]], CANDIDATE_OPS[col], "over budget"))
    cols[layer] = col
    return True


def _fill(problem: _Problem, cols: list[int], changes: list[Change]) -> bool:
    """One step of the under-use repair; False when no feasible change raises the utilisation."""
    targets = problem.targets
    used = _utilisation(problem.costs(cols), targets)
    best = None
    for layer, col, new, logp in problem.moves(cols):
        if _violation(new, targets) > 0.0 or _utilisation(new, targets) <= used + 1e-12:
            continue
        if best is None or logp > best[2]:
            best = (layer, col, logp)
    if best is None:
        return False
    layer, col = best[0], best[1]
    changes.append(Change(layer, CANDIDATE_OPS[cols[layer]], CANDIDATE_OPS[col], "under-used budget"))
    cols[layer] = col
    return True


def repair(
    ops: list[str],
    probs: Tensor,
    tables: list[Tensor],
    fixed: list[float],
    targets: list[float],
    space: SearchSpace,
) -> tuple[list[str], list[Change]]:
    """Make ``ops`` honour every ``cost_i <= T_i`` and spend >= 90 % of one budget (module docstring).

    Raises ValueError when no network of the space fits every budget.
    """
    mask = legal_mask(space)
    problem = _Problem([t.double() for t in tables], list(fixed), list(targets), mask, probs.clamp_min(1e-30).log())
    cols = [CANDIDATE_OPS.index(op) for op in ops]
    changes: list[Change] = []
    for _ in range(4 * len(cols) * len(CANDIDATE_OPS)):
        if _violation(problem.costs(cols), targets) == 0.0 or not _fix_overshoot(problem, cols, changes):
            break
    costs = problem.costs(cols)
    if _violation(costs, targets) > 0.0:
        raise ValueError(
            "no network of the space fits every budget: the repair step got to "
            + ", ".join(f"{c:.4g} vs target {t:.4g}" for c, t in zip(costs, targets, strict=True))
        )
    for _ in range(4 * len(cols) * len(CANDIDATE_OPS)):
        if _utilisation(problem.costs(cols), targets) >= FILL_FRACTION or not _fill(problem, cols, changes):
            break
    return [CANDIDATE_OPS[c] for c in cols], changes


def cost_range(table: Tensor, fixed: float, space: SearchSpace) -> tuple[float, float]:
    """(cheapest, costliest) legal network of ``space`` under one cost table (each layer on its own)."""
    mask = legal_mask(space)
    t = table.double()
    low = t.masked_fill(~mask, float("inf")).min(-1).values.sum()
    high = t.masked_fill(~mask, float("-inf")).max(-1).values.sum()
    return fixed + float(low), fixed + float(high)


def check_targets(names: list[str], units: list[str], ranges: list[tuple[float, float]], targets: list[float]) -> None:
    """Refuse a budget no network can meet, naming the term, its unit and the cheapest network's cost."""
    for name, unit, (low, _), target in zip(names, units, ranges, targets, strict=True):
        if target <= 0:
            raise ValueError(f"--target for {name} must be > 0 {unit}, got {target}")
        if low > target:
            raise ValueError(
                f"impossible budget for {name}: the cheapest legal network of the space costs {low:.4g} {unit}, "
                f"more than the target {target:.4g} {unit}"
            )
