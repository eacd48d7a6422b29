"""The supernet: stem + one mixed op of every legal candidate per searchable layer + the fixed slim head.

The candidates are exactly the modules of ``pose.ops`` (``make_layer_op``, ``Stem``, ``PoseHead``), so
a derived architecture is the same network ``pose.models.PoseNet`` builds and the same modules the
profiler agent times.

Architecture parameters live in one ``[layers, len(CANDIDATE_OPS)]`` tensor ``alpha``; illegal cells
(``skip`` where the shape changes) are masked to probability 0, so the cost tensor of ``search.cost``
has the same ``[layer, op]`` layout and the expected cost is one masked dot product (Eqs. 4-5).

Two modes:

``mixed``
    Eq. 3, every candidate runs and the outputs are summed with weights ``p = softmax(alpha)``.
    Exact gradients to alpha, memory and time grow with the number of candidates (~7x).

``sampled``
    One path per layer per step. Weight steps sample the path from ``p`` (ProxylessNAS). Architecture
    steps use the hard Gumbel-softmax straight-through estimator of GDAS: ``h = one_hot(argmax(g)) -
    g.detach() + g`` with ``g = softmax((log p + Gumbel) / T)``, and the layer output is
    ``h[i] * op_i(x)`` for the sampled ``i`` only. We chose this over ProxylessNAS' two-path binary
    gates because the gate gradient ``dL/dg_j = <dL/dy, op_j(x)>`` of the two-path estimator needs
    both sampled outputs kept for backward, i.e. about twice the activation memory of the derived
    network, while the hard Gumbel estimator needs only the one path that runs: its memory and time
    per step stay at one sub-network (the <= 1.5x target of ``benchmarks/search_cost.py``). The
    estimator is biased but unbiased in the forward value (the network that runs is exactly a
    sampled architecture) and the cost term stays the exact expectation over ``p``.

Drop-path: during weight steps in ``mixed`` mode each candidate of a layer is dropped with
probability ``drop_path`` (at least one survives) and the kept weights are renormalised; dropped
candidates are not computed. In ``sampled`` mode every weight step already drops all but one path.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pose.ops import PoseHead, Stem, make_layer_op
from pose.space import CANDIDATE_OPS, ArchSpec, Layer, SearchSpace, get_space, random_ops

Mode = Literal["mixed", "sampled"]
Phase = Literal["weights", "arch", "eval"]
MODES: tuple[str, ...] = ("mixed", "sampled")


class MixedOp(nn.Module):
    """The legal candidates of one layer; ``columns[j]`` is candidate j's column in ``alpha``."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.op_names = layer.legal_ops()
        self.columns = [CANDIDATE_OPS.index(op) for op in self.op_names]
        self.candidates = nn.ModuleList(make_layer_op(op, layer) for op in self.op_names)

    def forward_weighted(self, x: Tensor, weights: Tensor, active: list[int] | None = None) -> Tensor:
        """Eq. 3 over the ``active`` candidates (all when None); ``weights`` is indexed by candidate."""
        indices = range(len(self.candidates)) if active is None else active
        out: Tensor | None = None
        for j in indices:
            term = weights[j] * self.candidates[j](x)
            out = term if out is None else out + term
        assert out is not None
        return out


def space_of(space: str | dict | SearchSpace) -> SearchSpace:
    return get_space(space) if not isinstance(space, SearchSpace) else space


def arch_space_field(space: SearchSpace) -> str | dict:
    """What an ``ArchSpec`` stores for ``space``: the name of a built-in space, else the inline spec."""
    from pose.space import SPACES

    if space.name in SPACES and SPACES[space.name] == space:
        return space.name
    return space.to_spec().model_dump()


class Supernet(nn.Module):
    """Stem, one ``MixedOp`` per searchable layer, fixed head; ``alpha`` holds the architecture parameters."""

    def __init__(
        self,
        space: str | dict | SearchSpace,
        joints: int = 16,
        head_widths: tuple[int, ...] = (64, 32),
        head_style: str = "plain",
        sic: bool = True,
        mode: Mode = "mixed",
        drop_path: float = 0.2,
        gumbel_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if gumbel_temperature <= 0:
            raise ValueError(f"gumbel_temperature must be > 0, got {gumbel_temperature}")
        self.space = space_of(space)
        self.joints = joints
        self.head_widths = tuple(head_widths)
        self.head_style = head_style
        self.sic = sic
        self.mode: Mode = mode
        self.drop_path = drop_path
        self.gumbel_temperature = gumbel_temperature
        layers = self.space.layers()
        self.stage_of_layer = [layer.stage for layer in layers]
        self.stem = Stem(self.space.stem_channels)
        self.mixed = nn.ModuleList(MixedOp(layer) for layer in layers)
        self.head = PoseHead(self.space.out_channels, joints, self.head_widths, head_style, sic)
        mask = torch.zeros(len(layers), len(CANDIDATE_OPS), dtype=torch.bool)
        for i, op in enumerate(self.mixed):
            mask[i, op.columns] = True
        self.register_buffer("mask", mask, persistent=False)
        self.alpha = nn.Parameter(torch.zeros(len(layers), len(CANDIDATE_OPS)))

    # -- parameters -------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "alpha"]

    # -- probabilities ----------------------------------------------------------------------------
    def probs(self) -> Tensor:
        """Eq. 2 per layer over the legal ops; illegal cells are exactly 0. Shape ``[layers, ops]``."""
        return self.alpha.masked_fill(~self.mask, float("-inf")).softmax(dim=-1)

    def entropy(self) -> Tensor:
        """Mean entropy (nats) of the per-layer op distributions: falls as the search commits."""
        p = self.probs()
        logp = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
        return -(p * logp).sum(-1).mean()

    def uniform_entropy(self) -> float:
        """Mean entropy of uniform op distributions over the legal ops (where the search starts)."""
        return float(self.mask.sum(-1).double().log().mean())

    def derive_ops(self) -> list[str]:
        """argmax of alpha over the legal ops of every layer."""
        masked = self.alpha.detach().masked_fill(~self.mask, float("-inf"))
        return [CANDIDATE_OPS[int(i)] for i in masked.argmax(dim=-1)]

    def derive(self, name: str | None = None) -> ArchSpec:
        return ArchSpec(
            space=arch_space_field(self.space),
            ops=self.derive_ops(),
            head_widths=self.head_widths,
            head_style=self.head_style,  # type: ignore[arg-type]
            sic=self.sic,
            name=name,
        )

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, phase: Phase = "eval") -> Tensor:
        x = self.stem(x)
        probs = self.probs()
        for i, op in enumerate(self.mixed):
            p = probs[i, op.columns]
            x = self._layer(op, x, p, phase)
        return self.head(x)

    def _layer(self, op: MixedOp, x: Tensor, p: Tensor, phase: Phase) -> Tensor:
        n = len(op.candidates)
        if self.mode == "mixed":
            if phase == "weights":
                p = p.detach()
                if self.drop_path > 0 and n > 1:
                    keep = torch.rand(n) >= self.drop_path
                    if not keep.any():
                        keep[torch.randint(n, (1,))] = True
                    active = [int(j) for j in keep.nonzero().flatten()]
                    weights = torch.zeros_like(p)
                    weights[active] = p[active] / p[active].sum()
                    return op.forward_weighted(x, weights, active)
            return op.forward_weighted(x, p)
        # sampled mode: one path per layer
        if phase == "weights":
            j = int(torch.multinomial(p.detach(), 1))
            return op.candidates[j](x)
        if phase == "arch":
            gumbel = -torch.empty_like(p).exponential_().log()
            soft = F.softmax((p.clamp_min(1e-30).log() + gumbel) / self.gumbel_temperature, dim=-1)
            j = int(soft.argmax())
            hard = torch.zeros_like(soft)
            hard[j] = 1.0
            gate = hard - soft.detach() + soft
            return gate[j] * op.candidates[j](x)
        j = int(p.argmax())
        return op.candidates[j](x)


def sample_arch(
    space: str | dict | SearchSpace, generator: torch.Generator, head: dict | None = None, name: str | None = None
) -> ArchSpec:
    """A uniformly random legal architecture of ``space`` (the random-search baseline of Table 3)."""
    space = space_of(space)
    ops = random_ops(space, random.Random(int(torch.randint(2**62, (1,), generator=generator))))
    return ArchSpec(space=arch_space_field(space), ops=ops, name=name, **(head or {}))
