"""A fleet: agents of several devices on one store, on a SQLite file and on a real PostgreSQL server.

Two devices are simulated on this machine with the test-only ``EFFPOSE_DEVICE_ID_OVERRIDE``; the crash
loop uses the test-only ``EFFPOSE_TEST_KILL_AT_KEY`` (the agent SIGKILLs itself when it is about to store
that key, as a measurement that takes the process down would). Everything is real: agent processes on
127.0.0.1, SIGKILL, the store read through SQLAlchemy as an operator would. No timed assertions.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import text

from effpose.cli import main
from lut_service.client import AgentClient
from lut_service.db import make_engine
from lut_service.local import LocalAgent
from pose.space import TableSpec, table_keys
from search.cost import load_cost

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}  # 9 keys at 64x64
CRASH_SPACE = {"name": "crash", "stem_channels": 8, "stages": [[16, 2, 2], [24, 2, 2]]}  # 27 keys


def body(space: dict, **extra) -> dict:
    return {"space": space, "backend": "torch-cpu", "input": [64, 64], **extra}


class Store:
    """The shared store, read as an operator would (plain SQL through SQLAlchemy)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def rows(self, device: str) -> dict[str, tuple]:
        """Measurement rows (id, median, samples) of one device, by key."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT key, id, median_ms, samples FROM measurements WHERE device_id = :d"), {"d": device}
            ).all()
        return {key: tuple(rest) for key, *rest in rows}

    def job(self, job_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT state, done, total, device_id, claimed_by, attempts FROM jobs WHERE id = :j"),
                {"j": job_id},
            ).one()
        return dict(row._mapping)

    def duplicates(self) -> int:
        with self.engine.connect() as conn:
            total = conn.execute(text("SELECT COUNT(*) FROM measurements")).scalar()
            distinct = conn.execute(
                text(
                    "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, backend, key, batch, dtype, threads, clock "
                    "FROM measurements) AS entries"
                )
            ).scalar()
        return total - distinct


@pytest.fixture
def store(store_url):
    opened = Store(store_url)
    yield opened
    opened.engine.dispose()


# What a table holds is not under test here: no held-out fidelity networks, no re-measured parts.
LEAN = {"EFFPOSE_PROFILE_FIDELITY_NETWORKS": "0", "EFFPOSE_PROFILE_STABILITY_RETRIES": "0"}


def fleet_agent(factory, root, store_url: str, device: str, **env: str) -> LocalAgent:
    return factory(root, {**LEAN, "EFFPOSE_DEVICE_ID_OVERRIDE": device, **env}, device, store_url)


def start_together(*agents: LocalAgent) -> None:
    """Start agents at the same moment (they migrate the empty store concurrently)."""
    errors: list[Exception] = []

    def start(agent: LocalAgent) -> None:
        try:
            agent.start()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def post(agent: LocalAgent, request: dict) -> dict:
    response = httpx.post(f"{agent.url}/v1/luts", json=request, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def wait_done(agent: LocalAgent, job_id: str) -> dict:
    with AgentClient(agent.url) as client:
        return client.wait(job_id, progress=False, poll_s=0.1, timeout_s=300)


def holder_pid(job: dict) -> int:
    return int(job["claimed_by"].split(":")[1])


def test_two_devices_share_one_store(store_url, store, tmp_path, agent_factory, capsys, monkeypatch, wait_for):
    """Two agents (devices dev-a, dev-b) start together on one empty store and profile at the same time.
    dev-a's is SIGKILLed mid-job: dev-b finishes, never takes dev-a's orphaned job (it runs a later job of
    its own first) and leaves dev-a's rows as they were; restarted, dev-a's agent resumes exactly its job and
    keeps what it had stored. Nothing is lost or duplicated, each job ran in its own device's agent process,
    every agent lists and serves both devices' tables, and the search finds dev-b's table through dev-a's
    agent by device id, by a list filter and by table id."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = fleet_agent(agent_factory, tmp_path, store_url, "dev-a")
    b = fleet_agent(agent_factory, tmp_path, store_url, "dev-b")
    start_together(a, b)
    try:
        job_a, lut_a = post(a, body(CRASH_SPACE, budget={"warmup_s": 0.1})).values()
        job_b, lut_b = post(b, body(TINY)).values()
        wait_for(lambda: store.job(job_a)["done"] >= 1, poll_s=0.005)
        a.kill()
        orphan, kept = store.job(job_a), store.rows("dev-a")
        assert orphan["state"] == "running" and 1 <= len(kept) == orphan["done"] < 27
        assert holder_pid(orphan) != b.pid

        assert wait_done(b, job_b)["state"] == "done"
        # had dev-b's worker been willing to take dev-a's running job, it would have taken it before this
        # later job of its own (running jobs come before queued ones)
        later = post(b, body(TINY, input=[48, 48]))
        assert wait_done(b, later["job_id"])["state"] == "done"
        assert store.job(job_a) == orphan and store.rows("dev-a") == kept
        b_rows = store.rows("dev-b")
        refused = httpx.get(f"{b.url}/v1/luts/{lut_a}", timeout=10)
        assert refused.status_code == 409 and "dev-a" in refused.json()["detail"]

        a.start()
        assert wait_done(a, job_a)["state"] == "done"
        resumed = store.job(job_a)
        assert holder_pid(resumed) == a.pid and resumed["attempts"] == 1  # it had made progress: no strike
        rows = store.rows("dev-a")
        assert sorted(rows) == sorted(table_keys(TableSpec(CRASH_SPACE, (64, 64))))
        assert all(rows[key] == row for key, row in kept.items())
        assert store.rows("dev-b") == b_rows and store.duplicates() == 0
        tiny_keys = set(table_keys(TableSpec(TINY, (64, 64)))) | set(table_keys(TableSpec(TINY, (48, 48))))
        assert set(b_rows) == tiny_keys
        for job_id in (job_b, later["job_id"]):
            job = store.job(job_id)
            assert job["device_id"] == "dev-b" and holder_pid(job) == b.pid and job["attempts"] == 1
        assert store.job(job_a)["device_id"] == "dev-a"
        check_serving(a, b, lut_a, lut_b, capsys)
        check_search(a, b, lut_a, lut_b)
    finally:
        a.stop()
        b.stop()


def check_serving(a: LocalAgent, b: LocalAgent, lut_a: str, lut_b: str, capsys) -> None:
    """Both agents serve both devices' tables byte for byte, list them with fingerprints, and so does the CLI."""
    for lut_id in (lut_a, lut_b):
        served = [httpx.get(f"{agent.url}/v1/luts/{lut_id}", timeout=10) for agent in (a, b)]
        assert [r.status_code for r in served] == [200, 200] and served[0].content == served[1].content
    assert json.loads(served[0].content)["device"]["id"] == "dev-b"

    listed = httpx.get(f"{a.url}/v1/luts", params={"device": "dev-b", "space": "tiny"}, timeout=10).json()["luts"]
    assert len(listed) == 2 and lut_b in {lut["id"] for lut in listed} and all(lut["complete"] for lut in listed)
    device = listed[0]["device"]
    assert device["id"] == "dev-b" and device["device_id_override"] == "dev-b" and device["cpu"]
    assert httpx.get(f"{b.url}/v1/luts", params={"backend": "onnxruntime-cpu"}, timeout=10).json() == {"luts": []}
    one = httpx.get(f"{b.url}/v1/luts", params={"space": "crash", "batch": 1, "threads": 1}, timeout=10).json()
    assert [lut["id"] for lut in one["luts"]] == [lut_a] and one["luts"][0]["entries"] == 27

    assert main(["lut", "list", "--agent", b.url, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(lut["device_id"] for lut in printed["luts"]) == ["dev-a", "dev-b", "dev-b"]
    assert main(["lut", "list", "--agent", b.url, "--device", "dev-a"]) == 0
    line = capsys.readouterr().out
    assert lut_a in line and "device dev-a" in line and lut_b not in line


def check_search(a: LocalAgent, b: LocalAgent, lut_a: str, lut_b: str) -> None:
    """``--cost`` forms that name another device's table, through either agent."""
    spec = TableSpec(TINY, (64, 64))
    for url in (
        f"{a.url}/v1/luts?device=dev-b&backend=torch-cpu",
        f"{a.url}?device=dev-b&backend=torch-cpu",
        f"{a.url}/v1/luts/{lut_b}",
    ):
        cost = load_cost(url, spec)
        assert cost.meta["id"] == lut_b and cost.meta["device"]["id"] == "dev-b", url
    crash = TableSpec(CRASH_SPACE, (64, 64))
    assert load_cost(f"{b.url}/v1/luts?device=dev-a", crash).meta["id"] == lut_a
    with pytest.raises(ValueError, match="no complete table") as refused:
        load_cost(f"{a.url}/v1/luts?device=dev-b&backend=onnxruntime-cpu", spec)
    assert lut_b in str(refused.value)  # what the store has is listed
    with pytest.raises(ValueError, match="2 complete tables"):
        load_cost(f"{a.url}/v1/luts?device=dev-b&space=tiny&batch=1", replace(spec, input_hw=(32, 32)))
    with pytest.raises(ValueError, match="unknown filter"):
        load_cost(f"{a.url}/v1/luts?dev=dev-b", spec)


def run_until_killed(agent: LocalAgent) -> None:
    """Start the agent and wait for its worker to kill it (the test hook): before or after it is healthy."""
    try:
        agent.start()
    except RuntimeError as exc:
        assert "code -9" in str(exc), exc
        return
    assert agent.proc is not None and agent.proc.wait(120) == -9
    agent.stop()


# One store is enough here: the claims are the same SQL on both, and SQLite's crash resume is covered by
# test_two_devices_share_one_store[sqlite] and test_reliability.py (four agent starts make this one slow).
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_a_job_that_kills_its_agent_fails_after_three_attempts(store_url, store, tmp_path, agent_factory, wait_for):
    """A job whose measurement kills the agent process is started three times, then marked failed with the
    reason; the entries of its table already stored are kept and the agent goes on serving and profiling.

    The table differs from one built before only in its head, so every start of its job goes straight to
    the head entry, whose storing kills the agent (``EFFPOSE_TEST_KILL_AT_KEY``): no start makes progress."""
    spec = TableSpec(TINY, (64, 64))
    kill_key = next(key for key in table_keys(spec) if key.startswith("head-"))
    agent = fleet_agent(agent_factory, tmp_path, store_url, "dev-c", EFFPOSE_TEST_KILL_AT_KEY=kill_key)
    agent.start()
    first = post(agent, body(TINY, head_widths=[32]))
    assert wait_done(agent, first["job_id"])["state"] == "done"
    job_id, lut_id = post(agent, body(TINY)).values()
    assert agent.proc is not None and agent.proc.wait(120) == -9
    agent.stop()
    stored = store.rows("dev-c")
    assert store.job(job_id)["attempts"] == 1 and kill_key not in stored
    for attempt in (2, 3):
        run_until_killed(agent)
        assert store.job(job_id)["attempts"] == attempt and store.rows("dev-c") == stored
    assert store.job(job_id)["state"] == "running"

    with agent:
        job = wait_for(lambda: (j := agent_job(agent, job_id))["state"] != "running" and j)
        assert job["state"] == "failed" and job["attempts"] == 3 and job["device_id"] == "dev-c"
        assert [e["key"] for e in job["errors"]] == ["job"]
        reason = job["errors"][0]["error"]
        assert "stopped 3 times" in reason and f"the {len(table_keys(spec)) - 1} entries stored are kept" in reason
        assert store.rows("dev-c") == stored  # kept
        assert httpx.get(f"{agent.url}/v1/health", timeout=10).json()["worker_alive"]
        assert httpx.get(f"{agent.url}/v1/luts/{lut_id}", timeout=10).status_code == 409
        other = post(agent, body(TINY, input=[48, 48]))  # the kill key is not in it: profiled as usual
        assert wait_done(agent, other["job_id"])["state"] == "done"
        assert store.rows("dev-c").items() >= stored.items()


def agent_job(agent: LocalAgent, job_id: str) -> dict:
    return httpx.get(f"{agent.url}/v1/jobs/{job_id}", timeout=10).json()


def test_docker_compose_fleet_profile():
    """The fleet services: a db with a named volume and a pg_isready healthcheck, and agents that reach it by
    URL and wait for it, all under a profile, so the single SQLite agent stays the default service."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "profiles" not in services["lut-cpu"] and services["lut-cpu"]["environment"]["EFFPOSE_DB_URL"].startswith(
        "sqlite:"
    )
    db = services["db"]
    assert "fleet" in db["profiles"] and db["image"].startswith("postgres")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"]) and "fleet-db" in compose["volumes"]
    assert db["volumes"] == ["fleet-db:/var/lib/postgresql/data"]
    for name, profile in (("fleet-cpu", "fleet"), ("fleet-gpu", "fleet-gpu")):
        agent = services[name]
        assert agent["profiles"] == [profile] and agent["depends_on"]["db"]["condition"] == "service_healthy"
        url = agent["environment"]["EFFPOSE_DB_URL"]
        assert (
            url.startswith("postgresql+psycopg://effpose:${EFFPOSE_DB_PASSWORD")
            and "@${EFFPOSE_DB_HOST:-db}:5432/" in url
        )
    assert "EFFPOSE_DB_PASSWORD=" in (ROOT / ".env.example").read_text()
