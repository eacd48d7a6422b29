"""Supernet and cost model on random tensors: masking, both modes, gradients, derivation, counted costs."""

from __future__ import annotations

import math

import pytest
import torch

from pose.counting import count
from pose.models import PRESETS, PoseNet
from pose.space import CANDIDATE_OPS, SKIP, ArchSpec, TableSpec, get_space
from search.cost import CostTerm, count_table
from search.supernet import Supernet, sample_arch


def test_probs_are_masked_softmax_over_legal_ops():
    net = Supernet("small")
    with torch.no_grad():
        net.alpha.normal_()
    probs = net.probs()
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))
    skip = CANDIDATE_OPS.index(SKIP)
    for layer in get_space("small").layers():
        assert (probs[layer.index, skip] > 0) == (SKIP in layer.legal_ops())
    assert net.entropy() > 0
    assert {id(p) for p in net.arch_parameters()}.isdisjoint({id(p) for p in net.weight_parameters()})
    n_weights = sum(p.numel() for p in net.weight_parameters())
    assert n_weights + net.alpha.numel() == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("mode", ["mixed", "sampled"])
def test_both_modes_forward_backward(mode, tiny_space):
    torch.manual_seed(0)
    net = Supernet(tiny_space, joints=5, mode=mode)
    x = torch.randn(2, 3, 64, 64)
    for phase in ("weights", "arch", "eval"):
        net.zero_grad(set_to_none=True)
        out = net(x, phase)
        assert out.shape == (2, 5, 16, 16)
        if phase == "eval":
            continue
        out.pow(2).mean().backward()
        if phase == "weights":  # weight steps never move alpha
            assert net.alpha.grad is None or not net.alpha.grad.any()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.weight_parameters())
        else:  # the task loss alone reaches alpha (mixed: Eq. 3; sampled: straight-through Gumbel gate)
            assert net.alpha.grad is not None and net.alpha.grad.abs().sum() > 0


def test_sampled_arch_step_runs_one_path_per_layer(tiny_space):
    torch.manual_seed(0)
    net = Supernet(tiny_space, joints=5, mode="sampled")
    calls = []
    hooks = [
        c.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, op in enumerate(net.mixed)
        for c in op.candidates
    ]
    net(torch.randn(1, 3, 64, 64), "arch")
    for h in hooks:
        h.remove()
    assert sorted(calls) == list(range(len(net.mixed)))


def test_drop_path_skips_candidates_in_mixed_weight_steps(tiny_space):
    torch.manual_seed(0)
    net = Supernet(tiny_space, joints=5, mode="mixed", drop_path=0.5)
    ran = []
    hooks = [c.register_forward_hook(lambda m, i, o: ran.append(1)) for op in net.mixed for c in op.candidates]
    net(torch.randn(1, 3, 64, 64), "weights")
    dropped_run = len(ran)
    ran.clear()
    net(torch.randn(1, 3, 64, 64), "arch")
    for h in hooks:
        h.remove()
    assert len(ran) == sum(len(op.candidates) for op in net.mixed)
    assert len(net.mixed) <= dropped_run < len(ran)


def test_cost_gradient_reaches_alpha_and_prefers_cheap_ops():
    space = get_space("small")
    table = count_table("flops", TableSpec(space, (128, 128), joints=16))
    net = Supernet(space)
    term = CostTerm(table, lam=1.0, tau=10.0)
    loss = term.loss(net.probs())
    expected = table.expected(net.probs().double())
    assert math.isclose(float(loss.detach()), math.log(float(expected.detach())) / math.log(10.0), rel_tol=1e-5)
    loss.backward()
    grad = net.alpha.grad
    assert grad is not None and grad.abs().sum() > 0
    # d cost / d alpha_lo = p_lo (cost_lo - E_l): cheaper-than-average ops get a negative gradient
    probs = net.probs().detach().double()
    for layer in range(len(grad)):
        legal = probs[layer] > 0
        mean = float((probs[layer] * table.table[layer]).sum())
        for o in torch.nonzero(legal).flatten():
            assert (grad[layer, o] < 0) == (float(table.table[layer, o]) < mean)
    # one SGD step on the cost alone lowers the expected cost
    with torch.no_grad():
        net.alpha -= 10.0 * grad
        assert float(table.expected(net.probs().double())) < float(expected)


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_counted_cost_of_an_arch_matches_the_whole_network(kind):
    """fixed + sum of per-layer counts == pose.counting on the PoseNet of the derived ops (additivity)."""
    arch = PRESETS["efficientpose-a"]
    table = count_table(kind, TableSpec.for_arch(arch, input_hw=(128, 128), joints=16))
    counts = count(PoseNet(arch, 16), (128, 128))
    whole = counts.gflops_paper if kind == "flops" else counts.params / 1e6
    assert table.arch_cost(arch.ops) == pytest.approx(whole, rel=1e-9)


def test_derive_and_random_archs_are_valid_arch_specs(tmp_path, tiny_space):
    net = Supernet(tiny_space, joints=5)
    with torch.no_grad():
        net.alpha.normal_()
    arch = net.derive(name="t")
    arch.save(tmp_path / "arch.json")
    loaded = ArchSpec.load(tmp_path / "arch.json")
    assert loaded.ops == arch.ops
    probs = net.probs()
    assert [CANDIDATE_OPS[int(i)] for i in probs.argmax(-1)] == arch.ops
    assert PoseNet(loaded, 5)(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 16, 16)
    gen = torch.Generator().manual_seed(0)
    archs = [sample_arch("small", gen) for _ in range(5)]
    assert len({tuple(a.ops) for a in archs}) == 5
    assert Supernet("small").derive().space == "small"


def test_bad_settings_are_value_errors(tiny_space):
    with pytest.raises(ValueError, match="mode"):
        Supernet("small", mode="nope")  # type: ignore[arg-type]
    table = count_table("flops", TableSpec(get_space(tiny_space), (64, 64)))
    with pytest.raises(ValueError, match="tau"):
        CostTerm(table, 0.1, 1.0)
    with pytest.raises(ValueError, match="lambda"):
        CostTerm(table, -1.0, 10.0)
