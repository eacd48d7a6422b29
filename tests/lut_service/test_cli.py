"""``effpose lut build|show`` as a user runs them, against the real agent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lut_service.local import free_port


def effpose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effpose", *args], capture_output=True, text=True, timeout=300)


def test_build_and_show(agent, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 2]]}))
    out = tmp_path / "lut.json"
    built = effpose(
        "lut", "build", "--agent", agent.url, "--space", str(space), "--backend", "torch-cpu",
        "--input", "64x64", "--joints", "17", "-o", str(out), "--json",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    doc = json.loads(out.read_text())
    assert result["id"] == doc["id"] and result["entries"] == len(doc["entries"]) == 15
    assert doc["joints"] == 17 and doc["input"] == [64, 64]
    shown = effpose("lut", "show", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["entries"] == 15 and set(summary["per_stage"]) == {"stem", "head", "overhead", "stage 1"}
    assert set(summary["iqr_over_median"]) == {"min", "median", "p90", "max"}
    text = effpose("lut", "show", str(out))
    assert text.returncode == 0 and "slowest" in text.stdout and "IQR/median" in text.stdout


def test_build_errors_are_clear(agent, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = effpose(
        "lut", "build", "--agent", dead, "--space", "small", "--backend", "torch-cpu", "-o", str(tmp_path / "x.json"),
        "--retries", "0",
    )  # fmt: skip
    assert result.returncode == 2 and dead in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    bad = effpose(
        "lut", "build", "--agent", agent.url, "--space", "nosuch", "--backend", "torch-cpu",
        "-o", str(tmp_path / "y.json"),
    )  # fmt: skip
    assert bad.returncode == 2 and "nosuch" in bad.stderr
    missing = effpose("lut", "show", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "none.json" in missing.stderr


def test_validate_reports_fidelity(agent, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"name": "tiny2", "stem_channels": 8, "stages": [[16, 2, 2]]}))
    result = effpose(
        "lut", "validate", "--agent", agent.url, "--space", str(space), "--backend", "onnxruntime-cpu",
        "--input", "64x64", "--samples", "4", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 4 and len(report["archs"]) == 4
    for name in ("within_5pct", "within_10pct", "mape", "bias", "kendall_tau", "spearman"):
        assert name in report
    archs = report["archs"]
    assert all(a["predicted_ms"] > 0 and a["measured_ms"] > 0 for a in archs)
    # The scores recomputed from the report's own per-arch numbers. Those are rounded to 4 decimals, so
    # each relative error is known to within ``slack``: an arch that close to a threshold may count either way.
    rel = [a["predicted_ms"] / a["measured_ms"] - 1 for a in archs]
    slack = [
        1e-4 * (1 / a["predicted_ms"] + 1 / a["measured_ms"]) * (2 + abs(r)) for a, r in zip(archs, rel, strict=True)
    ]
    for name, limit in (("within_5pct", 0.05), ("within_10pct", 0.10)):
        surely = sum(abs(r) + e <= limit for r, e in zip(rel, slack, strict=True)) / len(rel)
        maybe = sum(abs(r) - e <= limit for r, e in zip(rel, slack, strict=True)) / len(rel)
        assert surely <= report[name] <= maybe, (name, report[name], rel)
    assert report["mape"] == pytest.approx(sum(map(abs, rel)) / len(rel), abs=max(slack))
    assert report["bias"] == pytest.approx(sum(rel) / len(rel), abs=max(slack))
