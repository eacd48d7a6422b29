"""Budgets (``--target``): the regulariser, the repair step, one and two targets, convergence figures, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pose.space import CANDIDATE_OPS, SKIP, ArchSpec, SearchSpace, Stage, TableSpec
from search.budget import budget_loss, cost_range, legal_mask, repair
from search.cost import count_table
from search.loop import CHECKPOINT, LOG, load_search_checkpoint, run_search
from search.supernet import space_of

TWO_LAYERS = SearchSpace("two", 8, (Stage(8, 1, 2),))  # layer 0: no skip (first of stage), layer 1: skip legal


def _table(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _probs(rows: list[list[float]], space: SearchSpace) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float64).masked_fill(~legal_mask(space), 0.0)
    return p / p.sum(-1, keepdim=True)


# ops:            k3e3 k3e6 k5e3 k5e6 k7e3 k7e6 skip
COSTS = _table([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]])


def test_budget_loss_is_zero_at_the_target_and_follows_the_binding_term():
    at = budget_loss([torch.tensor(10.0), torch.tensor(4.0)], [10.0, 8.0])
    assert float(at) == pytest.approx(0.0)
    over = torch.tensor(12.0, requires_grad=True)
    under = torch.tensor(4.0, requires_grad=True)
    loss = budget_loss([over, under], [10.0, 8.0], beta=2.0)
    assert float(loss.detach()) == pytest.approx(2.0 * 0.2)
    loss.backward()
    assert float(over.grad) > 0 and float(under.grad) == 0.0  # only the binding budget is pushed
    low = torch.tensor(5.0, requires_grad=True)
    budget_loss([low], [10.0]).backward()
    assert float(low.grad) < 0  # under budget: the loss pulls the expected cost up, towards the target


def test_repair_overshoot_changes_one_layer_and_alpha_chooses_the_op():
    # argmax: k7e6 + k7e6 = 12 > target 9; k5e6 (4) beats k5e3 (3) in alpha, both make layer 1 fit
    probs = _probs([[0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.0], [0.0, 0.0, 0.2, 0.3, 0.0, 0.5, 0.0]], TWO_LAYERS)
    ops, changes = repair(["k7e6", "k7e6"], probs, [COSTS], [0.0], [9.0], TWO_LAYERS)
    assert len(changes) == 1
    assert changes[0].layer == 1 and changes[0].old == "k7e6" and changes[0].new == "k5e3"
    assert ops == ["k7e6", "k5e3"]
    assert sum(COSTS[i, CANDIDATE_OPS.index(op)] for i, op in enumerate(ops)) <= 9.0


def test_repair_prefers_the_op_alpha_likes_among_single_changes_that_fit():
    probs = _probs([[0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.0], [0.05, 0.4, 0.0, 0.0, 0.0, 0.5, 0.05]], TWO_LAYERS)
    ops, changes = repair(["k7e6", "k7e6"], probs, [COSTS], [0.0], [8.5], TWO_LAYERS)
    assert ops == ["k7e6", "k3e6"]  # 6 + 2 = 8 fits and is alpha's second choice for layer 1
    assert [c.reason for c in changes] == ["over budget"]


def test_repair_fills_an_under_used_budget_and_never_overshoots():
    probs = _probs([[0.3, 0.1, 0.1, 0.1, 0.1, 0.3, 0.0], [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3]], TWO_LAYERS)
    ops, changes = repair(["k3e3", SKIP], probs, [COSTS], [1.0], [10.0], TWO_LAYERS)
    cost = 1.0 + sum(float(COSTS[i, CANDIDATE_OPS.index(op)]) for i, op in enumerate(ops))
    assert 9.0 <= cost <= 10.0
    assert changes and all(c.reason == "under-used budget" for c in changes)


def test_repair_honours_two_budgets_at_once():
    flops = COSTS
    params = _table([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = _probs([[1.0] * 7, [1.0] * 7], TWO_LAYERS)
    ops, _ = repair(["k7e6", "k3e3"], probs, [flops, params], [0.0, 0.0], [7.0, 6.0], TWO_LAYERS)
    cols = [CANDIDATE_OPS.index(op) for op in ops]
    assert sum(float(flops[i, c]) for i, c in enumerate(cols)) <= 7.0
    assert sum(float(params[i, c]) for i, c in enumerate(cols)) <= 6.0


def test_repair_refuses_budgets_no_network_meets():
    probs = _probs([[1.0] * 7, [1.0] * 7], TWO_LAYERS)
    params = _table([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="no network of the space fits every budget"):
        repair(["k3e3", SKIP], probs, [COSTS, params], [0.0, 0.0], [1.5, 1.5], TWO_LAYERS)


def _tiny_lut(tmp_path: Path, space: dict, joints: int = 17) -> Path:
    """A LUT document of the tiny space at 64x64 whose ms are a fixed function of each key's FLOPs."""
    from search.cost import count_table as counted

    flops = counted("flops", TableSpec(space_of(space), (64, 64), joints=joints))
    from pose.space import layer_key, overhead_key

    entries: dict[str, float] = {}
    for layer in space_of(space).layers((64, 64)):
        for op in layer.legal_ops():
            key = layer_key(op, layer, 1)
            if key is not None:
                kernel = int(op[1])
                entries[key] = 40.0 * float(flops.table[layer.index, CANDIDATE_OPS.index(op)]) + 0.05 * kernel
    from pose.space import fixed_keys

    for key in fixed_keys(TableSpec(space_of(space), (64, 64), joints=joints)):
        entries[key] = 0.3
    doc = {
        "id": "tiny", "device": {"name": "test"}, "backend": "onnxruntime-cpu", "batch": 1, "dtype": "float32",
        "threads": 1, "input": [64, 64], "space": space, "joints": joints, "head_widths": [64, 32],
        "head_style": "plain", "sic": True, "overhead_key": overhead_key((64, 64), 1),
        "entries": [{"key": k, "median_ms": v, "p10_ms": v, "p90_ms": v, "iqr_ms": 0.0, "samples": 5}
                    for k, v in entries.items()],
    }  # fmt: skip
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(doc))
    return path


def _between(low: float, high: float, share: float) -> float:
    return low + share * (high - low)


def test_search_honours_one_lut_target(tmp_path, make_config, tiny_space):
    lut = _tiny_lut(tmp_path, tiny_space)
    from search.cost import load_cost

    table = load_cost(str(lut), TableSpec(space_of(tiny_space), (64, 64), joints=17))
    low, high = cost_range(table.table, table.fixed, space_of(tiny_space))
    target = _between(low, high, 0.5)
    cfg = make_config(costs=[str(lut)], targets=[target], mode="sampled", epochs=2, arch_lr=0.1)
    summary = run_search(cfg, tmp_path / "one", progress=False)
    predicted = summary["predicted_cost"]["lut:onnxruntime-cpu"]
    assert predicted["target"] == target and predicted["within"]
    assert 0.9 * target <= predicted["value"] <= target
    assert ArchSpec.load(summary["arch"]).ops == summary["ops"]
    assert summary["repair"]["argmax_ops"] and isinstance(summary["repair"]["changes"], list)


def test_search_honours_two_targets_at_once(tmp_path, make_config, tiny_space):
    lut = _tiny_lut(tmp_path, tiny_space)
    space = space_of(tiny_space)
    flops = count_table("flops", TableSpec(space, (64, 64), joints=17))
    f_low, f_high = cost_range(flops.table, flops.fixed, space)
    from search.cost import load_cost

    table = load_cost(str(lut), TableSpec(space, (64, 64), joints=17))
    l_low, l_high = cost_range(table.table, table.fixed, space)
    targets = [_between(l_low, l_high, 0.7), _between(f_low, f_high, 0.4)]
    cfg = make_config(costs=[str(lut), "flops"], targets=targets, epochs=2)
    summary = run_search(cfg, tmp_path / "two", progress=False)
    used = []
    for name in ("lut:onnxruntime-cpu", "flops"):
        entry = summary["predicted_cost"][name]
        assert entry["within"], entry
        used.append(entry["used"])
    assert max(used) >= 0.9


def test_target_pulls_the_expected_cost_towards_it_from_both_sides(tmp_path, make_config, tiny_space):
    space = space_of(tiny_space)
    flops = count_table("flops", TableSpec(space, (64, 64), joints=17))
    low, high = cost_range(flops.table, flops.fixed, space)
    for share in (0.1, 0.9):
        target = _between(low, high, share)
        cfg = make_config(targets=[target], lambdas=[0.0], warmup_epochs=0, epochs=3, arch_lr=0.2)
        out = tmp_path / f"s{share}"
        run_search(cfg, out, progress=False)
        history = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
        first, last = history[0]["utilisation"]["flops"], history[-1]["utilisation"]["flops"]
        # epoch 1's figures are after one alpha pass already: compare with the uniform start via the start gap
        start = float(flops.expected(_uniform(space))) / target
        assert abs(last - 1) < abs(start - 1), (share, start, first, last)


def _uniform(space: SearchSpace) -> torch.Tensor:
    mask = legal_mask(space).double()
    return mask / mask.sum(-1, keepdim=True)


def test_convergence_figures_are_recorded(tmp_path, make_config):
    cfg = make_config(epochs=3, entropy_weight=0.5)
    summary = run_search(cfg, tmp_path, progress=False)
    history = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    search = [r for r in history if r["phase"] == "search"]
    assert [r["changed_layers"] is None for r in history] == [True] + [False] * (len(history) - 1)
    assert all(isinstance(r["changed_layers"], int) and r["entropy"] > 0 for r in search)
    assert [r["entropy_weight"] for r in search] == pytest.approx([0.0, 0.25, 0.5])
    conv = summary["convergence"]
    assert conv["final_entropy"] == pytest.approx(search[-1]["entropy"])
    assert conv["entropy_vs_uniform"] == pytest.approx(search[-1]["entropy"] / conv["uniform_entropy"])
    assert conv["changed_layers_last_two"] == [r["changed_layers"] for r in search[-2:]]
    assert (tmp_path / "search.png").stat().st_size > 1000


def test_impossible_target_is_refused_with_the_cheapest_cost(tmp_path, tiny_space):
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    result = subprocess.run(
        [sys.executable, "-m", "effpose.cli", "search", "--space", str(space_file), "--data", "synthetic:8",
         "--input", "64x64", "--cost-input", "64x64", "--cost", "flops", "--target", "0.0001",
         "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "impossible budget for flops" in result.stderr and "cheapest legal network" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "effpose.cli", "search", "--cost", "flops", "--cost", "params", "--target", "1",
         "--out", str(tmp_path / "o2"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "2 --cost but 1 --target" in result.stderr


def test_search_with_targets_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, tiny_space, kill_9_when_logged):
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    space = space_of(tiny_space)
    flops = count_table("flops", TableSpec(space, (64, 64), joints=17))
    target = _between(*cost_range(flops.table, flops.fixed, space), 0.5)
    common = [
        sys.executable, "-m", "effpose.cli", "search", "--space", str(space_file), "--data", "synthetic:8",
        "--cost", "flops", "--target", f"{target:.6f}", "--mode", "sampled", "--temperature-end", "0.3",
        "--entropy-weight", "0.2", "--warmup-epochs", "1", "--epochs", "3", "--batch-size", "4",
        "--input", "64x64", "--cost-input", "64x64", "--arch-lr", "0.05", "--max-batches", "2", "--seed", "5",
        "--no-progress", "--threads", str(torch.get_num_threads()), "--json",
    ]  # fmt: skip
    ref = subprocess.run([*common, "--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*common, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_9_when_logged(proc, out / LOG, lines=2)  # two epochs checkpointed: the first search epoch is done
    assert 2 <= load_search_checkpoint(out / CHECKPOINT)["epoch"] < 4
    resumed = subprocess.run([*common, "--out", str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(ref.stdout), json.loads(resumed.stdout)
    assert a["ops"] == b["ops"] and a["repair"] == b["repair"] and a["predicted_cost"] == b["predicted_cost"]
    alpha_a = load_search_checkpoint(tmp_path / "ref" / CHECKPOINT)["supernet"]["alpha"]
    assert torch.equal(alpha_a, load_search_checkpoint(out / CHECKPOINT)["supernet"]["alpha"])


def test_log_mse_task_term_changes_what_alpha_learns_and_still_logs_the_mse(tmp_path, make_config):
    space = space_of(make_config().space)
    flops = count_table("flops", TableSpec(space, (64, 64), joints=17))
    low, high = cost_range(flops.table, flops.fixed, space)
    probs, logged = {}, {}
    for term in ("mse", "log-mse"):
        cfg = make_config(targets=[_between(low, high, 0.5)], task_term=term, epochs=2, arch_lr=0.1)
        summary = run_search(cfg, tmp_path / term, progress=False)
        assert summary["config"]["task_term"] == term
        probs[term] = torch.tensor(summary["probs"])
        records = [json.loads(line) for line in (tmp_path / term / LOG).read_text().splitlines()]
        logged[term] = [r["arch_mse"] for r in records if r["phase"] == "search"]
    # the log's gradient is dMSE/MSE (~100x the MSE's here), so against the same budget term alpha moves elsewhere
    assert not torch.allclose(probs["mse"], probs["log-mse"], atol=1e-4)
    # the logged figure is the MSE itself under both terms (never its log, which is negative)
    assert logged["log-mse"] and all(0 < v < 1 for v in logged["log-mse"])


def test_unknown_task_term_is_refused():
    from search.loop import SearchConfig

    with pytest.raises(ValueError, match="--task-term must be one of mse, log-mse"):
        SearchConfig(task_term="ce").validate()
