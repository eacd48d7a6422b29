"""Issue 12: a table you can trust on any day. The stability guard trips on a real slowdown, every
document carries its stability and fidelity figures, drift is measured at use time, every entry says how
it was measured, and a fallback to timing alone is counted.

Real agents (``LocalAgent`` subprocesses), real torch/ORT timings, a real CPU-burning process pinned to
the agent's core. The only timing-dependent assertions compare a machine with and without that burner
(the burner takes half of the core, so the same network takes about twice as long on the wall clock)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lut_service.client import AgentClient
from lut_service.lut import drift_now, fidelity, load_document
from lut_service.settings import Budget
from lut_service.stability import Reference, StabilityGuard, SystemWatch, cpu_times, unstable_warning
from lut_service.ui import fidelity_points
from pose.space import TableSpec, get_space, table_keys

TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 2], [24, 1, 2]]}
KEYS = len(table_keys(TableSpec(get_space(TINY), (64, 64))))  # overhead, stem, head and the layer keys
BURN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def tiny_spec(threads: int = 1) -> TableSpec:
    """TINY at 64x64 with the default head (what ``effpose lut build --space FILE --input 64x64`` asks for)."""
    return TableSpec(get_space(TINY), (64, 64), threads=threads)


def pin(pid: int, cpu: int) -> None:
    """Every thread of process ``pid`` (threads it starts later inherit it) onto CPU ``cpu``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


class Burner:
    """A process spinning on one CPU (started and stopped by the test)."""

    def __init__(self, cpu: int) -> None:
        self.cpu, self.proc = cpu, None

    def start(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", BURN, str(self.cpu)])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def rows(db_path: Path) -> dict[str, str | None]:
    with sqlite3.connect(db_path) as conn:
        return dict(conn.execute("SELECT key, method FROM measurements").fetchall())


# -- the guard, on a real slowdown ---------------------------------------------------------------------
def test_guard_trips_on_a_forced_slowdown_and_everyone_says_so(tmp_path, agent_factory, capsys, monkeypatch):
    """The agent is pinned to one CPU and times on the wall clock. A burner pinned to that CPU starts as
    the in-context pass begins and stops when its re-measurement begins: the references moved across both
    attempts, the one retry allowed is spent, and the table is stored ``unstable``. ``lut build``, ``lut
    show`` and the search's cost loader warn; ``drift_now`` sees the burner as drift at use time."""
    cpu = max(os.sched_getaffinity(0))
    env = {"EFFPOSE_PROFILE_CLOCK": "wall", "EFFPOSE_PROFILE_STABILITY_RETRIES": "1"}
    env["EFFPOSE_PROFILE_FIDELITY_NETWORKS"] = "2"
    agent = agent_factory(tmp_path, env).start()
    burner = Burner(cpu)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        pin(agent.pid, cpu)
        spec = tiny_spec()
        with AgentClient(agent.url, cache_dir=tmp_path / "c") as client:
            # a pass of at least ~1.5 s (instrumented rounds until max_seconds x keys / 2), so the burner
            # starts well inside it
            body = {**spec.as_fields(space_by_name=True), "backend": "torch-cpu", "budget": {"max_seconds": 0.3}}
            accepted = client.submit(body).json()
            phases = []
            deadline = time.monotonic() + 180
            while (job := client.job(accepted["job_id"]))["state"] in ("queued", "running"):
                phase = (job.get("result") or {}).get("phase", "")
                if not phases or phases[-1] != phase:
                    phases.append(phase)
                if "in-context pass (attempt 1)" in phase:
                    burner.start()
                elif "in-context pass (attempt 2)" in phase or "held-out" in phase:
                    burner.stop()
                assert time.monotonic() < deadline, phases
                time.sleep(0.02)
            burner.stop()
            assert job["state"] == "done", job
            doc = client.get_lut(accepted["lut_id"], use_stale=False)
            stability = doc["stability"]
            parts = [p for p in stability["parts"] if p["part"] == "in-context entries"]
            assert [p["attempt"] for p in parts] == [1, 2], (phases, stability["parts"])
            assert parts[0]["drift"] > stability["threshold"] and parts[1]["drift"] < -stability["threshold"]
            assert stability["status"] == "unstable" and stability["retries"] >= 1
            assert job["result"]["stability"]["status"] == "unstable"
            assert "would not hold still" in unstable_warning(stability)

            # drift at use time: the same reference, now with and without the burner
            quiet = drift_now(client, doc)
            burner.start()
            time.sleep(0.2)
            busy = drift_now(client, doc)
            burner.stop()
            assert busy["reference"] == quiet["reference"] == stability["reference"]["name"]
            assert busy["built_ms"] == quiet["built_ms"] == round(stability["reference"]["built_ms"], 4)
            assert busy["factor"] == round(busy["now_ms"] / busy["built_ms"], 4)
            assert busy["factor"] > 1.2 * quiet["factor"], (quiet, busy)

        # everyone who reads the table says so, in words: `lut build` (the table is complete: no new build)
        from effpose.cli import main

        (tmp_path / "tiny.json").write_text(json.dumps(TINY))
        out = tmp_path / "lut.json"
        capsys.readouterr()
        cli = ["lut", "build", "--agent", agent.url, "--space", str(tmp_path / "tiny.json"), "--input", "64x64"]
        assert main([*cli, "--backend", "torch-cpu", "-o", str(out), "--quiet"]) == 0
        built = capsys.readouterr()
        assert "warning: this table was built while the machine would not hold still" in built.err
        assert load_document(out)["id"] == doc["id"]
    finally:
        burner.stop()
        agent.stop()
    assert main(["lut", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "stability: unstable" in shown and "WARNING: this table was built while the machine" in shown
    assert "fidelity (2 held-out random networks" in shown

    from search.cost import load_cost

    load_cost(str(out), spec)
    err = capsys.readouterr().err
    assert "warning" in err and "would not hold still" in err and "fidelity (2 held-out" in err


# -- fields every document carries ----------------------------------------------------------------------
def test_document_carries_stability_fidelity_methods_and_advice(agent, tmp_path):
    """A plain build (the test suite's fast budget and two held-out networks, the default guard): the
    figures are in the document and consistent with themselves."""
    defaults = Budget()
    assert (defaults.stability_threshold, defaults.stability_retries, defaults.fidelity_networks) == (0.03, 2, 5)
    with AgentClient(agent.url, cache_dir=tmp_path / "c") as client:
        accepted = client.submit({**tiny_spec().as_fields(space_by_name=True), "backend": "onnxruntime-cpu"}).json()
        job = client.wait(accepted["job_id"], progress=False, poll_s=0.1, timeout_s=180)
        doc = client.get_lut(accepted["lut_id"], use_stale=False)
        device = client.device()
    assert job["done"] == job["total"] == KEYS + 1
    stability = doc["stability"]
    assert stability["status"] in ("stable", "unstable") and stability["threshold"] == 0.03
    assert set(stability) >= {"drift", "start_to_end", "steal_share", "load_average", "cpus", "checkpoints"}
    assert isinstance(stability["steal_share"], float) and 0 <= stability["steal_share"] < 1  # Linux /proc/stat
    assert stability["load_average"]["max"] >= stability["load_average"]["mean"] >= 0
    labels = [c["label"] for c in stability["checkpoints"]]
    assert labels[0] == "start" and len(labels) >= 3  # start, after the entries, after the held-out networks
    assert {r["name"] for r in stability["references"]} == {"uniform-k3e3", "uniform-k5e6", "uniform-k7e6"}
    assert stability["reference"] in stability["references"]

    section = doc["fidelity"]
    assert section["networks"] == len(section["archs"]) == 2  # EFFPOSE_PROFILE_FIDELITY_NETWORKS in conftest
    pairs = [(a["predicted_ms"], a["measured_ms"]) for a in section["archs"]]
    recomputed = fidelity([p for p, _ in pairs], [m for _, m in pairs])
    for name in ("within_5pct", "within_10pct", "kendall_tau"):
        assert section[name] == pytest.approx(recomputed[name], abs=1e-3)
    assert sorted(fidelity_points(section)) == sorted((m, p) for p, m in pairs)  # the dashboard's scatter

    methods = {e["key"]: e["method"] for e in doc["entries"]}
    assert {m for k, m in methods.items() if k.startswith("overhead-")} == {"alone"}
    assert {m for k, m in methods.items() if not k.startswith("overhead-")} == {"in-context"}
    assert {e["clock"] for e in doc["entries"]} == {"thread-cpu"}
    stored = rows(agent.db_path)
    assert all(stored[key] == method for key, method in methods.items())
    assert job["result"]["methods"] == {"alone": 1, "in-context": KEYS - 1} and job["result"]["fallbacks"] == 0

    advice = [a for a in doc["thread_advice"] if a["space"] == "tiny"]
    assert advice and advice[0]["ms_by_threads"]["1"] > 0
    assert any(a["backend"] == "onnxruntime-cpu" and a["space"] == "tiny" for a in device["thread_advice"])


def test_fallback_to_timing_alone_is_counted_and_recorded(tmp_path, agent_factory):
    """The in-context pass cannot finish under its deadline (8 x the entry timeout: 200 interleaved rounds
    of six whole networks take several times 8 s) but each op alone can (200 calls of one op take a few
    tenths of a second): the pass fails, every entry is timed alone, the job result counts the fallback
    with its reason, and each entry says ``alone``."""
    no_checks = {"EFFPOSE_PROFILE_FIDELITY_NETWORKS": "0", "EFFPOSE_PROFILE_STABILITY_RETRIES": "0"}
    agent = agent_factory(tmp_path, no_checks).start()
    spec = TableSpec(get_space(TINY), (32, 32), head_widths=(16,))
    slow = {"min_samples": 200, "max_samples": 200, "target_rel_iqr": 0, "max_seconds": 120, "timeout_s": 1.0}
    body = {**spec.as_fields(space_by_name=True), "backend": "torch-cpu", "budget": slow}
    try:
        with AgentClient(agent.url, cache_dir=tmp_path / "c") as client:
            accepted = client.submit(body).json()
            job = client.wait(accepted["job_id"], progress=False, poll_s=0.2, timeout_s=240)
            doc = client.get_lut(accepted["lut_id"], use_stale=False)
    finally:
        agent.stop()
    keys = len(table_keys(spec))
    assert job["state"] == "done" and job["errors"] == []
    result = job["result"]
    assert result["fallbacks"] == keys - 1 and "MeasurementTimeout" in result["fallback_reason"]
    assert result["methods"] == {"alone": keys}
    assert {e["method"] for e in doc["entries"]} == {"alone"}
    assert set(rows(agent.db_path).values()) == {"alone"}
    assert "fidelity" not in doc and doc["stability"]["status"] in ("stable", "unstable")


def test_thread_advice_names_the_fastest_thread_count(tmp_path, agent_factory):
    """Tables at 1 and 2 threads: the device endpoint and the second document compare their references."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable CPUs")
    no_checks = {"EFFPOSE_PROFILE_FIDELITY_NETWORKS": "0", "EFFPOSE_PROFILE_STABILITY_RETRIES": "0"}
    agent = agent_factory(tmp_path, no_checks).start()
    try:
        with AgentClient(agent.url, cache_dir=tmp_path / "c") as client:
            for threads in (1, 2):  # small networks at 32x32: two quick builds
                spec = TableSpec(get_space(TINY), (32, 32), head_widths=(16,), threads=threads)
                doc = client.request_lut(spec, "onnxruntime-cpu", progress=False, timeout_s=180)
            device = client.device()
    finally:
        agent.stop()
    (advice,) = [a for a in device["thread_advice"] if a["space"] == "tiny"]
    assert set(advice["ms_by_threads"]) == {"1", "2"}
    fastest = min(advice["ms_by_threads"], key=advice["ms_by_threads"].get)
    assert advice["fastest_threads"] == int(fastest) and f"{fastest} thread(s) ran" in advice["advice"]
    assert doc["thread_advice"] == [advice] and "fidelity" not in doc


# -- the guard's logic and the system figures, without timing --------------------------------------------
def test_guard_measures_a_drifted_part_again_and_gives_up_after_its_retries():
    """The guard's logic on a scripted machine: a reference whose time is whatever ``machine`` says, and
    parts of work that change it (a slowdown that stays, then one that keeps growing)."""
    machine = {"ms": 1.0}
    reference = Reference("scripted", ["k3e3"], lambda calls: machine["ms"])
    budget = Budget(warmup_runs=0, warmup_s=0, stability_retries=2)

    def slows_down_once() -> str:
        machine["ms"] = 2.0
        return "result"

    guard = StabilityGuard([reference], budget, lambda: False)
    guard.checkpoint("start")
    assert guard.guarded("part", slows_down_once) == "result"
    assert [(p["attempt"], p["ok"]) for p in guard.parts] == [(1, False), (2, True)]
    assert guard.parts[0]["drift"] == pytest.approx(1.0) and guard.status() == "stable"

    def keeps_slowing_down() -> None:
        machine["ms"] *= 1.5

    guard = StabilityGuard([reference], budget, lambda: False)
    guard.checkpoint("start")
    guard.guarded("part", keeps_slowing_down)
    assert [p["attempt"] for p in guard.parts] == [1, 2, 3] and guard.status() == "unstable"
    section = guard.section()
    assert section["status"] == "unstable" and section["retries"] == 2 and len(section["checkpoints"]) == 4
    assert section["drift"] == pytest.approx(0.5) and section["start_to_end"] == pytest.approx(1.5**3 - 1)
    assert section["reference"]["built_ms"] == pytest.approx(machine["ms"])
    assert "moved by 50.0%" in unstable_warning(section)

    # a machine with two speeds: the same at both checkpoints, another while the part measured
    machine["ms"] = 1.0
    guard = StabilityGuard([reference], budget, lambda: False)
    guard.checkpoint("start")
    inside = iter([{"scripted": 0.75}, {"scripted": 1.01}])
    guard.guarded("part", lambda: None, inside=lambda: next(inside))
    assert [(p["attempt"], p["ok"], p["drift"]) for p in guard.parts] == [(1, False, 0.0), (2, True, 0.0)]
    assert guard.parts[0]["inside_drift"] == pytest.approx(-0.25) and guard.status() == "stable"
    assert guard.section()["drift"] == pytest.approx(0.01)

    # references that stop running (out of memory at the job's shape) end the checks, not the build
    def runs_out_of_memory(calls: int) -> float:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    guard = StabilityGuard([Reference("big", ["k7e6"], runs_out_of_memory)], budget, lambda: False)
    assert guard.guarded("part", lambda: "entries") == "entries"
    assert guard.status() == "unchecked" and "can't allocate memory" in guard.section()["reason"]

    unchecked = StabilityGuard([], budget, lambda: False, unavailable="no GPU")
    assert unchecked.guarded("part", lambda: 7) == 7 and unchecked.section()["status"] == "unchecked"


def test_cpu_times_read_steal_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 5 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    assert cpu_times(str(stat)) == (40, 1000)
    assert cpu_times(str(tmp_path / "missing")) is None
    assert cpu_times() is not None  # this Linux machine has /proc/stat
    figures = SystemWatch().figures()
    assert set(figures) == {"steal_share", "load_average", "cpus", "seconds"}
