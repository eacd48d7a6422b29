"""``effpose demo`` end to end on tiny sizes: real agent, LUT, search, training, evaluation, export, latency."""

import json

import pytest

from effpose.cli import main
from effpose.demo import DemoConfig, run_demo

FAST_AGENT = {
    "EFFPOSE_PROFILE_WARMUP_RUNS": "1",
    "EFFPOSE_PROFILE_WARMUP_S": "0",
    "EFFPOSE_PROFILE_MIN_SAMPLES": "3",
    "EFFPOSE_PROFILE_MAX_SAMPLES": "10",
    "EFFPOSE_PROFILE_MAX_SECONDS": "0.01",
    "EFFPOSE_PROFILE_MIN_SAMPLE_MS": "0",
    "EFFPOSE_PROFILE_FIDELITY_NETWORKS": "2",  # fewer held-out networks (default 5)
    "EFFPOSE_PROFILE_STABILITY_RETRIES": "0",  # the guard still reports; it does not re-measure
}


def test_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    for name, value in FAST_AGENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EFFPOSE_CACHE_DIR", str(tmp_path / "cache"))
    summary = run_demo(
        DemoConfig(
            out=tmp_path / "demo",
            images=8,
            search_epochs=2,
            warmup_epochs=0,
            max_batches=2,
            train_minutes=0.05,
            latency_rounds=3,
        )
    )
    out = tmp_path / "demo"
    assert json.loads((out / "summary.json").read_text())["arch"]["ops"] == summary["arch"]["ops"]
    for plot in summary["plots"]:
        assert (out / plot).is_file(), plot
    assert (out / "derived.onnx").is_file() and summary["onnx"]["parity_max_abs_diff"] < 1e-4
    assert summary["accuracy"]["metric"] == "Mean" and 0.0 <= summary["accuracy"]["value"] <= 100.0
    for row in summary["models"].values():
        assert row["lut_predicted_ms"] > 0 and row["agent_measured_ms"] > 0 and row["onnx_wall_ms"] > 0
    # the derived network is priced from the same LUT the search used, and fits the budget it was given
    assert summary["lut"]["entries"] >= 48
    budget = summary["budget"]
    assert budget["predicted_ms"] == summary["models"]["derived"]["lut_predicted_ms"]
    assert budget["predicted_ms"] <= budget["target_ms"] + 1e-3
    reference = summary["models"]["efficientpose-a"]["lut_predicted_ms"]
    assert budget["target_ms"] == pytest.approx(0.6 * reference, rel=1e-3)
    assert budget["measured_ms"] == summary["models"]["derived"]["agent_measured_ms"]
    assert "final_entropy" in summary["convergence"]
    # the table's reference network re-timed with both networks: raw and drift-corrected, both labelled
    drift = summary["drift"]
    assert drift["reference"].startswith("uniform-") and drift["source"] == "build checkpoint"
    assert drift["factor"] == pytest.approx(drift["now_ms"] / drift["built_ms"], rel=1e-3)
    for row in summary["models"].values():
        assert row["lut_corrected_ms"] == pytest.approx(row["lut_predicted_ms"] * drift["factor"], abs=2e-3)
    assert any(line.startswith("stability: ") for line in summary["lut"]["trust"])
    from effpose.demo import print_summary

    print_summary(summary)
    printed = capsys.readouterr().out
    assert "LUT x d" in printed and f"reference {drift['reference']}: {drift['built_ms']:.2f} ms" in printed


def test_demo_help_lists_options(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--train-minutes" in capsys.readouterr().out
