"""The search loop end to end on tiny synthetic data: cost pressure, both modes, resume, kill -9, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pose.space import CANDIDATE_OPS, SKIP, ArchSpec, TableSpec
from search.budget import legal_mask
from search.cost import count_table
from search.loop import CHECKPOINT, LOG, load_search_checkpoint, run_random_search, run_search
from search.supernet import space_of


def _alpha(out: Path) -> torch.Tensor:
    return load_search_checkpoint(out / CHECKPOINT)["supernet"]["alpha"]


REFERENCE = dict(lambdas=[0.5], warmup_epochs=1, epochs=2, seed=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_config):
    """One uninterrupted tiny search that the resume and kill -9 tests must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_search(make_config(**REFERENCE), out, progress=False)
    return out, summary


def test_large_lambda_derives_a_cheaper_network(tmp_path, make_config):
    flops = {}
    for lam in (0.0, 20.0):
        cfg = make_config(lambdas=[lam], warmup_epochs=0, epochs=2)
        summary = run_search(cfg, tmp_path / f"lam{lam}", progress=False)
        flops[lam] = summary["predicted_cost"]["flops"]["value"]
        arch = ArchSpec.load(summary["arch"])
        assert arch.ops == summary["ops"]
        history = [json.loads(line) for line in (tmp_path / f"lam{lam}" / LOG).read_text().splitlines()]
        assert [r["epoch"] for r in history] == [1, 2]
        assert {"expected_cost", "entropy", "val_loss"} <= set(history[-1])
        if lam > 0:  # the expected cost falls once alpha is trained
            assert history[-1]["expected_cost"]["flops"] < history[0]["expected_cost"]["flops"]
    assert flops[20.0] < flops[0.0]
    for name in ("arch.json", "arch.png", "search.png", "search.json", LOG, CHECKPOINT):
        assert (tmp_path / "lam20.0" / name).is_file()


def test_large_lambda_converges_to_the_per_layer_argmin_of_the_table(tmp_path, make_config):
    """With the cost dominating, every layer ends at its cheapest legal op (``skip`` where legal)."""
    space = space_of(make_config().space)
    table = count_table("flops", TableSpec(space, (64, 64), joints=17))
    mask = legal_mask(space)
    cheapest = [CANDIDATE_OPS[int(i)] for i in table.table.masked_fill(~mask, float("inf")).argmin(-1)]
    assert SKIP in cheapest and "k3e3" in cheapest  # the test means something: both kinds of layer occur
    cfg = make_config(lambdas=[20.0], warmup_epochs=0, epochs=6, arch_lr=0.3)
    summary = run_search(cfg, tmp_path, progress=False)
    assert summary["ops"] == cheapest
    assert summary["predicted_cost"]["flops"]["value"] == pytest.approx(table.arch_cost(cheapest))


@pytest.mark.parametrize("mode", ["mixed", "sampled"])
def test_both_modes_run_and_write_outputs(tmp_path, make_config, mode):
    summary = run_search(make_config(mode=mode, lambdas=[0.5], epochs=1), tmp_path, progress=False)
    assert summary["mode"] == mode
    assert ArchSpec.load(tmp_path / "arch.json").ops == summary["ops"]
    assert (tmp_path / "arch.png").stat().st_size > 1000
    ckpt = load_search_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt["epoch"] == 2
    assert ckpt["opt_a"]["state"], "alpha optimizer took steps"


def test_resume_restores_alpha_and_optimizer_state(tmp_path, make_config, reference):
    ref_out, ref_summary = reference
    cfg = make_config(**REFERENCE)
    assert run_search(cfg, tmp_path / "part", progress=False, stop_after_epoch=2) is None
    part = load_search_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert part["epoch"] == 2
    with pytest.raises(ValueError, match="--resume"):
        run_search(cfg, tmp_path / "part", progress=False)  # never silently overwrite a checkpoint
    with pytest.raises(ValueError, match="other settings.*lambdas"):
        run_search(make_config(**{**REFERENCE, "lambdas": [0.7]}), tmp_path / "part", resume=True, progress=False)
    resumed = run_search(cfg, tmp_path / "part", resume=True, progress=False)
    a = load_search_checkpoint(ref_out / CHECKPOINT)
    b = load_search_checkpoint(tmp_path / "part" / CHECKPOINT)
    assert torch.equal(a["supernet"]["alpha"], b["supernet"]["alpha"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["opt_a"]["state"][0][key], b["opt_a"]["state"][0][key])
    assert a["opt_a"]["state"][0]["step"] == b["opt_a"]["state"][0]["step"]
    assert all(
        torch.equal(x["momentum_buffer"], y["momentum_buffer"])
        for x, y in zip(a["opt_w"]["state"].values(), b["opt_w"]["state"].values(), strict=True)
    )
    assert a["sched"] == b["sched"]
    assert resumed["ops"] == ref_summary["ops"]
    lines = (tmp_path / "part" / LOG).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "effpose.cli", "search", *args]


def test_kill_9_mid_search_then_resume_ends_with_the_same_alpha(tmp_path, tiny_space, reference, kill_9_when_logged):
    """SIGKILL right after the first epoch's checkpoint, resume in a new process: same alpha as the reference."""
    ref_out, ref_summary = reference
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    common = [
        "--space", str(space_file), "--data", "synthetic:8", "--cost", "flops", "--lambda", "0.5", "--mode", "mixed",
        "--entropy-weight", "0",
        "--warmup-epochs", "1", "--epochs", "2", "--batch-size", "4", "--input", "64x64",
        "--cost-input", "64x64", "--arch-lr", "0.05", "--max-batches", "2", "--seed", "3", "--no-progress",
        "--threads", str(torch.get_num_threads()),  # bit-identical results need the reference's thread count
    ]  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(out)), stderr=subprocess.PIPE, text=True)
    kill_9_when_logged(proc, out / LOG)  # as soon as the first epoch is checkpointed
    assert proc.returncode == -signal.SIGKILL
    epoch_at_kill = load_search_checkpoint(out / CHECKPOINT)["epoch"]
    assert 1 <= epoch_at_kill < 3
    resumed = subprocess.run(_cli(*common, "--out", str(out), "--resume", "--json"), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert json.loads(resumed.stdout)["ops"] == ref_summary["ops"]
    assert torch.equal(_alpha(out), _alpha(ref_out))
    assert [json.loads(x)["epoch"] for x in (out / LOG).read_text().splitlines()] == [1, 2, 3]
    assert not list(out.glob(".*.tmp")), "no temporary checkpoint left behind"


def test_lut_missing_keys_error_lists_them(tmp_path, tiny_space):
    from pose.space import overhead_key, table_keys

    space = space_of(tiny_space)
    keys = table_keys(TableSpec(space, (64, 64), joints=17))
    dropped = keys[3:5]
    doc = {
        "id": "t", "device": {"name": "test"}, "backend": "onnxruntime-cpu", "batch": 1, "dtype": "float32",
        "threads": 1, "input": [64, 64], "space": tiny_space, "joints": 17, "head_widths": [64, 32],
        "head_style": "plain", "sic": True, "overhead_key": overhead_key((64, 64), 1),
        "entries": [{"key": k, "median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1, "iqr_ms": 0.1, "samples": 5}
                    for k in keys if k not in dropped],
    }  # fmt: skip
    lut = tmp_path / "lut.json"
    lut.write_text(json.dumps(doc))
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    result = subprocess.run(
        _cli("--space", str(space_file), "--data", "synthetic:8", "--input", "64x64", "--cost", str(lut),
             "--out", str(tmp_path / "o"), "--no-progress"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "effpose search: error:" in result.stderr and "lacks 2 key(s)" in result.stderr
    for key in dropped:
        assert key in result.stderr
    assert "Traceback" not in result.stderr
    # the complete table works and its prediction is the sum of the arch's keys
    doc["entries"] += [{"key": k, "median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.1, "iqr_ms": 0.1, "samples": 5}
                       for k in dropped]  # fmt: skip
    lut.write_text(json.dumps(doc))
    from search.cost import load_cost

    table = load_cost(str(lut), TableSpec(space, joints=17))
    assert table.unit == "ms" and table.name == "lut:onnxruntime-cpu"
    assert table.fixed == pytest.approx(3.0)  # stem, head, per-call overhead at 1 ms each


def test_random_search_baseline_picks_the_best_by_validation_accuracy(tmp_path, make_config):
    summary = run_random_search(make_config(), tmp_path, n=3, short_epochs=1, progress=False)
    results = summary["random"]["results"]
    assert len(results) == 3
    best = max(results, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert summary["ops"] == best["ops"] == ArchSpec.load(tmp_path / "arch.json").ops
    assert len((tmp_path / "random.jsonl").read_text().splitlines()) == 3


def test_derived_arch_json_is_accepted_by_model_info_and_train(reference, tmp_path):
    ref_out, _ = reference
    arch = str(ref_out / "arch.json")
    info = subprocess.run([sys.executable, "-m", "effpose.cli", "model", "info", arch, "--input", "64x64", "--json"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["params"] > 0
    train = subprocess.run(
        [sys.executable, "-m", "effpose.cli", "train", arch, "--data", "synthetic:8", "--epochs", "1",
         "--batch-size", "8", "--input", "64x64", "--out", str(tmp_path / "train"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "train" / "last.pt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cost", "nonsense"], "--cost 'nonsense' is not flops"),
        (["--cost", "flops", "--cost", "params", "--lambda", "1", "--lambda", "2", "--lambda", "3"], "3 --lambda"),
        (["--tau", "1"], "--tau must be > 1"),
        (["--space", "medium"], "unknown search space 'medium'"),
        (["--data", "nope:x"], "bad data spec 'nope:x'"),
        (["--input", "60x60"], "multiple of 16"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, args, message):
    result = subprocess.run(_cli(*args, "--out", str(tmp_path / "o"), "--no-progress"), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "effpose search: error:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_random_search_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, tiny_space, kill_9_when_logged):
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    common = [
        "--space", str(space_file), "--data", "synthetic:8", "--cost", "flops", "--random", "3",
        "--short-epochs", "1", "--batch-size", "4", "--input", "64x64", "--cost-input", "64x64",
        "--max-batches", "2", "--seed", "4", "--no-progress", "--threads", str(torch.get_num_threads()), "--json",
    ]  # fmt: skip
    ref = subprocess.run(_cli(*common, "--out", str(tmp_path / "ref")), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    log = out / "random.jsonl"
    kill_9_when_logged(proc, log, what="random search")  # once the first architecture is checkpointed
    done = len(log.read_text().splitlines())
    assert 1 <= done < 3
    resumed = subprocess.run(_cli(*common, "--out", str(out), "--resume"), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(ref.stdout)["random"], json.loads(resumed.stdout)["random"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a["results"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in b["results"]] == strip
    assert a["best"]["ops"] == b["best"]["ops"]
