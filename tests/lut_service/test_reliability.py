"""Issue 7, agent side: crashes (kill -9), concurrent clients, limits, timeouts and partial failure, auth.

Everything runs for real: agent subprocesses on 127.0.0.1 (``LocalAgent``), SIGKILL, real SQLite files,
threads of real HTTP clients. Nothing here asserts a duration (read latency under a writing worker is
measured by benchmarks/read_latency.py, against an idle-worker baseline); ``PROMPT_S`` bounds socket waits.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lut_service.client import AgentClient, AgentError
from lut_service.local import free_port
from pose.space import TableSpec

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Two stages of two layers: 27 unique keys at 64x64, each cheap.
CRASH_SPACE = {"name": "crash", "stem_channels": 8, "stages": [[16, 2, 2], [24, 2, 2]]}
TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}
PROMPT_S = 5.0  # the generous bound for "answers promptly"


# -- database helpers (plain sqlite3, as an operator would look) -------------------------------------
def db_rows(db_path: Path, lut_id: str | None = None) -> dict[str, tuple]:
    """Measurement rows (id, median, samples) by key; only the LUT's keys when ``lut_id`` is given."""
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT key, id, median_ms, samples, backend FROM measurements").fetchall()
        keys = None
        if lut_id is not None:
            keys = set(json.loads(conn.execute("SELECT keys FROM luts WHERE id = ?", (lut_id,)).fetchone()[0]))
    return {key: rest for key, *rest in rows if keys is None or key in keys}


def check_db(db_path: Path) -> None:
    """The file passes SQLite's integrity check and holds no duplicate measurement."""
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        total, distinct = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT device_id || '|' || backend || '|' || key || '|' || batch || '|' "
            "|| dtype || '|' || threads || '|' || clock) FROM measurements"
        ).fetchone()
        assert total == distinct


def job_row(db_path: Path, job_id: str) -> tuple:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT state, done, total FROM jobs WHERE id = ?", (job_id,)).fetchone()


# -- 1. crash safety -------------------------------------------------------------------------------
def test_kill9_mid_job_resumes_keeps_entries_and_never_duplicates(tmp_path, agent_factory, wait_for):
    """SIGKILL the agent at random moments of a profiling job (up to three times); after each restart on
    the same SQLite file the job resumes, every entry stored before a kill is kept as it was (not measured
    again), none is duplicated, and the job ends done."""
    agent = agent_factory(tmp_path).start()
    rng = random.Random(7)
    body = {"space": CRASH_SPACE, "backend": "torch-cpu", "input": [64, 64], "budget": {"warmup_s": 0.1}}
    try:
        accepted = httpx.post(f"{agent.url}/v1/luts", json=body, timeout=30).json()
        job_id, lut_id = accepted["job_id"], accepted["lut_id"]
        kept: dict[str, tuple] = {}
        kills = 0
        # CPU backends store entries in a burst after their in-context pass: the second kill comes the
        # moment progress shows (inside the burst of writes), the others at random moments.
        for delay in (rng.uniform(0.0, 0.6), 0.0, rng.uniform(0.0, 0.3)):
            # the job is running and has stored an entry since the last start; kill at a random moment after
            stored = len(kept)
            wait_for(lambda n=stored: job_row(agent.db_path, job_id)[1] > n, poll_s=0.005)
            time.sleep(delay)
            if job_row(agent.db_path, job_id)[0] == "done":
                break
            agent.kill()
            kills += 1
            check_db(agent.db_path)
            state, done, total = job_row(agent.db_path, job_id)
            rows = db_rows(agent.db_path, lut_id)
            assert state == "running" and len(rows) == done < total  # the counter moves with the rows
            for key, row in kept.items():
                assert rows[key] == row, f"{key} changed after a restart: measured again"
            kept = rows
            print(f"kill -9 #{kills} at {done}/{total} entries stored")
            agent.start()
        assert kills >= 1
        with AgentClient(agent.url) as client:
            job = client.wait(job_id, progress=False, poll_s=0.1, timeout_s=120)
            doc = client.get_lut(lut_id, use_stale=False)
        # 27 entries, then the build's checks (stability guard, held-out fidelity) as its last step
        assert job["state"] == "done" and job["done"] == job["total"] == 27 + 1 and job["errors"] == []
        rows = db_rows(agent.db_path, lut_id)
        assert len(rows) == 27 == len(doc["entries"])
        for key, row in kept.items():
            assert rows[key] == row
        check_db(agent.db_path)
        with sqlite3.connect(agent.db_path) as conn:  # the unique constraint itself refuses a duplicate
            columns = "device_id, backend, key, batch, dtype, threads, clock, median_ms, p10_ms, p90_ms, iqr_ms, "
            columns += "samples, raw_median_ms, overhead_ms, created_at"
            with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
                conn.execute(f"INSERT INTO measurements ({columns}) SELECT {columns} FROM measurements LIMIT 1")
            assert conn.execute("SELECT COUNT(*) FROM jobs WHERE lut_id = ?", (lut_id,)).fetchone() == (1,)
    finally:
        agent.stop()


WRITER = """
import sys
from lut_service import crud
from lut_service.db import init_db, make_engine, session_scope
from lut_service.models import Job, Lut
from lut_service.timing import Timing

sessions = init_db(make_engine(sys.argv[1]))
start = int(sys.argv[2])
with session_scope(sessions) as s:
    crud.ensure_device(s, "dev", {"cpu": "test"})
    if s.get(Lut, "lut") is None:
        s.add(Lut(id="lut", device_id="dev", backend="b", batch=1, dtype="float32", threads=1,
                  request={"clock": "wall"}, keys=[]))
        s.flush()
        s.add(Job(id="job", lut_id="lut", state="running", done=0, total=0, errors=[], budget={}))
i = start
while True:
    # exactly the worker's write: the entry and the job's progress in one transaction
    with session_scope(sessions) as s:
        timing = Timing(median_ms=i, p10_ms=i, p90_ms=i, iqr_ms=0.0, samples=i)
        crud.upsert_measurement(s, device_id="dev", backend="b", key=f"k{i:06d}", batch=1, dtype="float32",
                                threads=1, timing=timing)
        s.get(Job, "job").done += 1
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_database_writes_loses_and_duplicates_nothing(tmp_path):
    """A process writing entries in a tight loop (the worker's transaction) is SIGKILLed at random moments,
    five times; the file stays intact, every committed entry is there once, and the progress counter
    always equals the rows (both or neither were written)."""
    db = tmp_path / "writes.db"
    url = f"sqlite:///{db}"
    rng = random.Random(3)
    confirmed: set[int] = set()
    next_i = 0
    for run in range(1, 6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(next_i)], stdout=subprocess.PIPE, bufsize=0, cwd=ROOT
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # unbuffered: reads up to its newline, nothing more
        assert first.strip(), "writer did not start"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        confirmed |= {int(x) for x in (first + out).decode().split()}
        check_db(db)
        with sqlite3.connect(db) as conn:
            keys = [int(k[1:]) for (k,) in conn.execute("SELECT key FROM measurements")]
            samples = dict(conn.execute("SELECT key, samples FROM measurements").fetchall())
            done = conn.execute("SELECT done FROM jobs WHERE id = 'job'").fetchone()[0]
        assert len(keys) == len(set(keys))
        assert confirmed <= set(keys)  # nothing committed is lost
        assert set(keys) - confirmed <= {max(keys)}  # at most the one committed just before its print
        assert all(samples[f"k{i:06d}"] == i for i in keys)  # no torn row
        # the next run starts at the last confirmed entry: it may rewrite one committed row (an upsert)
        next_i = max(confirmed) + 1
        # progress and rows move together; a restart may rewrite one row (counted again, not duplicated)
        assert len(keys) <= done <= len(keys) + run
    assert len(confirmed) > 50


# -- 2. concurrency, reads during writes -------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory, agent_factory):
    """An agent with a token and tight, configured limits (shared by the limit, auth and concurrency tests)."""
    env = {
        "EFFPOSE_TOKEN": TOKEN,
        "EFFPOSE_MAX_BODY_BYTES": "65536",
        "EFFPOSE_MAX_BATCH": "8",
        "EFFPOSE_MAX_INPUT_SIDE": "512",
        "EFFPOSE_MAX_LAYERS": "40",
        "EFFPOSE_MAX_CHANNELS": "512",
        "EFFPOSE_MAX_NETWORKS": "4",
        "EFFPOSE_MAX_TENSOR_ELEMENTS": "8000000",
    }
    with agent_factory(tmp_path_factory.mktemp("guarded"), env) as running:
        yield running


def test_twenty_clients_one_job_identical_tables(guarded):
    body = {"space": TINY, "backend": "onnxruntime-cpu", "input": [72, 72], "budget": {"warmup_s": 0.05}}
    barrier = threading.Barrier(20)
    results: list[tuple[int, str, bytes, str]] = []
    failures: list[BaseException] = []

    def client() -> None:
        try:
            with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) as http:
                barrier.wait()
                posted = http.post("/v1/luts", json=body)
                if posted.status_code == 202:
                    job_id, lut_id = posted.json()["job_id"], posted.json()["lut_id"]
                    while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                        time.sleep(0.05)
                    assert job["state"] == "done", job
                else:
                    assert posted.status_code == 200, posted.text
                    job_id, lut_id = "", posted.json()["id"]
                got = http.get(f"/v1/luts/{lut_id}")
                assert got.status_code == 200, got.text
                results.append((posted.status_code, job_id, got.content, got.headers["etag"]))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures, failures[0]
    assert len(results) == 20
    assert len({job_id for status, job_id, _, _ in results if status == 202}) == 1
    assert len({content for _, _, content, _ in results}) == 1  # byte-identical tables
    assert len({etag for *_, etag in results}) == 1
    lut_id = json.loads(results[0][2])["id"]
    with sqlite3.connect(guarded.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE lut_id = ?", (lut_id,)).fetchone() == (1,)
    check_db(guarded.db_path)


def test_reads_are_served_while_the_worker_writes(guarded, wait_for):
    with AgentClient(guarded.url, token=TOKEN) as client:
        ready = client.request_lut(TableSpec(TINY, (64, 64)), "torch-cpu", progress=False)
    body = {"space": CRASH_SPACE, "backend": "torch-cpu", "input": [80, 80], "budget": {"warmup_s": 0.1}}
    accepted = httpx.post(f"{guarded.url}/v1/luts", json=body, headers=AUTH).json()
    job_url = f"{guarded.url}/v1/jobs/{accepted['job_id']}"
    wait_for(lambda: httpx.get(job_url).json()["state"] == "running")
    first_done = httpx.get(job_url).json()["done"]
    paths = {
        "health": "/v1/health",
        "job": f"/v1/jobs/{accepted['job_id']}",
        "lut complete": f"/v1/luts/{ready['id']}",
        "lut incomplete": f"/v1/luts/{accepted['lut_id']}",
        "device": "/v1/device",
    }
    rounds = 0
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        # read everything over and over until the job is done: its entries are written meanwhile
        while (job := http.get(paths["job"]).json())["state"] == "running":
            for name, path in paths.items():
                response = http.get(path)
                expected = (409, 200) if name == "lut incomplete" else (200,)  # 200 once the last entry landed
                assert response.status_code in expected, response.text
            rounds += 1
    assert job["state"] == "done" and job["done"] == job["total"] > first_done and rounds >= 1


# -- 3. limits, timeouts, partial failure ------------------------------------------------------------
def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


HUGE = {"space": "small", "backend": "onnxruntime-cpu", "input": [65536, 65536], "batch": 4096}
LIMITED = [
    (HUGE, "max_input_side"),
    ({"space": "small", "backend": "torch-cpu", "batch": 9}, "batch 9 exceeds the limit of 8 (max_batch"),
    ({"space": "small", "backend": "torch-cpu", "input": [600, 64]}, "limit of 512 (max_input_side"),
    ({"space": {"stem_channels": 8, "stages": [[16, 2, 64]]}, "backend": "torch-cpu"}, "64 layers, above the limit"),
    ({"space": {"stem_channels": 8, "stages": [[1024, 2, 1]]}, "backend": "torch-cpu"}, "stages[0] channels = 1024"),
    ({"space": {"stem_channels": 600, "stages": [[16, 2, 1]]}, "backend": "torch-cpu"}, "stem_channels = 600"),
    ({"space": "small", "backend": "torch-cpu", "head_widths": [1000]}, "head_widths[0] = 1000 channels"),
    ({"space": "small", "backend": "torch-cpu", "input": [512, 512], "batch": 8}, "max_tensor_elements"),
]


@pytest.mark.parametrize(("body", "message"), LIMITED)
def test_limits_answer_422_naming_the_limit_before_allocating(guarded, body, message):
    before = peak_rss_kib(guarded.pid)
    for path, extra in (("/v1/luts", {}), ("/v1/networks", {"archs": [["k3e3"]]})):
        response = httpx.post(f"{guarded.url}{path}", json={**body, **extra}, headers=AUTH, timeout=30)
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"]
    assert peak_rss_kib(guarded.pid) - before < 64 * 1024  # nothing near the requested size was allocated


def test_networks_count_is_limited(guarded):
    body = {"space": TINY, "backend": "torch-cpu", "input": [64, 64], "archs": [["k3e3"]] * 5}
    response = httpx.post(f"{guarded.url}/v1/networks", json=body, headers=AUTH)
    assert response.status_code == 422 and "(max_networks, EFFPOSE_MAX_NETWORKS)" in response.json()["detail"]


def test_request_body_limit_413_before_reading(guarded):
    # Only the headers are sent: a 413 comes back although not one byte of the announced gigabyte arrived.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=PROMPT_S) as sock:
        sock.sendall(
            b"POST /v1/luts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000000000\r\n\r\n".encode()
        )
        answer = read_all(sock)
    assert answer.startswith("HTTP/1.1 413") and "EFFPOSE_MAX_BODY_BYTES" in answer
    # A chunked body (no Content-Length) is cut off once it passes the limit.
    big = json.dumps({"space": "small", "backend": "torch-cpu", "pad": "x" * 70_000}).encode()

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    response = httpx.post(f"{guarded.url}/v1/luts", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and "65536 bytes" in response.json()["detail"]
    # the same body under the limit is parsed (and refused for its unknown field, not its size)
    small = httpx.post(
        f"{guarded.url}/v1/luts", json={"space": "small", "backend": "torch-cpu", "pad": 1}, headers=AUTH
    )
    assert small.status_code == 422 and "pad" in small.text
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=PROMPT_S) as sock:
        sock.sendall(f"POST /v1/luts HTTP/1.1\r\nHost: x\r\n{auth_line()}Content-Length: x\r\n\r\n{{}}".encode())
        assert read_all(sock).startswith("HTTP/1.1 400")  # uvicorn (or the guard) refuses a bad length


def auth_line() -> str:
    return f"Authorization: Bearer {TOKEN}\r\n"


def read_all(sock: socket.socket) -> str:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"}" in data:
                break
    except TimeoutError:
        pass
    return data.decode(errors="replace")


def test_timeouts_are_recorded_and_the_job_reports_partial_failure(guarded):
    """Every entry must take 5000 back-to-back calls within 0.5 s: the near-empty overhead probe does, the
    large ops at 128x128 cannot. Their timeouts are recorded per entry, the rest is measured and kept, and
    the job ends ``failed`` with ``partial``; asking again measures only the missing entries."""
    slow = {"min_samples": 5000, "max_samples": 5000, "max_seconds": 120, "target_rel_iqr": 0, "timeout_s": 0.5}
    body = {"space": TINY, "backend": "torch-cpu", "input": [128, 128], "budget": slow}
    with AgentClient(guarded.url, token=TOKEN) as client:
        accepted = client.submit(body).json()
        with pytest.raises(AgentError, match="failed .*errors; .* stored, request again"):
            client.wait(accepted["job_id"], progress=False, poll_s=0.1, timeout_s=120)
        job = client.job(accepted["job_id"])
        assert job["state"] == "failed" and job["partial"] is True
        assert 0 < job["done"] < 9 and job["done"] + len(job["errors"]) == 9 == job["total"] - 1
        for error in job["errors"]:
            assert "MeasurementTimeout" in error["error"] and "timeout of 0.5 s" in error["error"]
        stored = db_rows(guarded.db_path, accepted["lut_id"])
        assert {e["key"] for e in job["errors"]}.isdisjoint(stored) and len(stored) == job["done"]
        assert any(key.startswith("overhead-") for key in stored)
        # the GET of the incomplete table says what is missing; a new request retries only those
        incomplete = httpx.get(f"{guarded.url}/v1/luts/{accepted['lut_id']}")
        assert incomplete.status_code == 409 and f"({job['done']}/9 entries)" in incomplete.text
        retry = client.submit({**body, "budget": None}).json()
        assert retry["job_id"] != accepted["job_id"]
        assert client.wait(retry["job_id"], progress=False, poll_s=0.1, timeout_s=120)["state"] == "done"
    after = db_rows(guarded.db_path, accepted["lut_id"])
    assert len(after) == 9 and all(after[key] == row for key, row in stored.items())


def test_out_of_memory_is_recorded_per_entry_and_the_agent_goes_on(tmp_path, agent_factory):
    """A real out-of-memory: the agent's address space is capped (RLIMIT_AS, set from outside with
    prlimit) a few hundred MB above what it uses, then asked for 512x512 inputs at batch 16. The large
    entries fail to allocate and are recorded with their error; the small ones are stored; the job is a
    partial failure; the agent and its worker stay up, and after a restart it serves the next job."""
    import resource

    agent = agent_factory(tmp_path).start()
    try:
        size_kib = int(
            next(x for x in Path(f"/proc/{agent.pid}/status").read_text().splitlines() if "VmSize" in x).split()[1]
        )
        limit = size_kib * 1024 + 300 * 2**20
        resource.prlimit(agent.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        space = {"name": "oom", "stem_channels": 8, "stages": [[16, 2, 1], [16, 2, 1], [24, 2, 1], [32, 2, 1]]}
        body = {"space": space, "backend": "torch-cpu", "input": [512, 512], "batch": 16}
        with AgentClient(agent.url) as client:
            accepted = client.submit(body).json()
            with pytest.raises(AgentError, match="failed"):
                client.wait(accepted["job_id"], progress=False, poll_s=0.2, timeout_s=180)
            job = client.job(accepted["job_id"])
            assert job["state"] == "failed" and job["partial"] is True
            assert job["done"] + len(job["errors"]) == 27 == job["total"] - 1, job  # no checks without the entries
            assert any("allocate" in e["error"] or "memory" in e["error"].lower() for e in job["errors"])
            assert len(db_rows(agent.db_path, accepted["lut_id"])) == job["done"]
            assert client.health()["worker_alive"] is True
        # After an allocation failure inside oneDNN, torch in that process can keep failing ("could not
        # create a primitive") even for small ops once memory is back: restart it, as a supervisor would.
        agent.restart()
        with AgentClient(agent.url) as client:
            doc = client.request_lut(TableSpec(TINY, (64, 64)), "torch-cpu", progress=False, timeout_s=120)
        assert len(doc["entries"]) == 9
        assert len(db_rows(agent.db_path, accepted["lut_id"])) == job["done"]  # the partial table is kept
        check_db(agent.db_path)
    finally:
        agent.stop()


# -- 4. authentication -------------------------------------------------------------------------------
def test_every_write_needs_the_token(guarded):
    schema = httpx.get(f"{guarded.url}/openapi.json").json()
    writes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if m not in ("get", "head")]
    assert ("POST", "/v1/luts") in writes and ("POST", "/v1/networks") in writes
    writes += [("PUT", "/v1/luts/x"), ("DELETE", "/v1/jobs/x"), ("PATCH", "/v1/luts"), ("POST", "/v1/health")]
    wrong = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    body = {"space": TINY, "backend": "torch-cpu", "input": [64, 64], "archs": [["k3e3"]]}
    for method, path in writes:
        for headers in wrong:
            response = httpx.request(method, f"{guarded.url}{path}", json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["detail"] and TOKEN not in response.text
    # an unauthenticated body is never parsed: garbage and oversized bodies get 401, not 422/413
    assert httpx.post(f"{guarded.url}/v1/luts", content=b"{not json").status_code == 401
    assert httpx.post(f"{guarded.url}/v1/luts", content=b"x" * 100_000).status_code == 401
    # with the token the same requests reach the API (scheme is case-insensitive)
    for headers in (AUTH, {"Authorization": f"bearer {TOKEN}"}):
        response = httpx.post(f"{guarded.url}/v1/networks", json=body, headers=headers)
        assert response.status_code == 202, response.text
    # reads stay open by default
    for path in ("/v1/health", "/v1/device", "/v1/jobs/nope", "/v1/luts/nope", "/openapi.json"):
        assert httpx.get(f"{guarded.url}{path}").status_code in (200, 404)


def test_client_and_cli_send_the_token(guarded, tmp_path, monkeypatch):
    with AgentClient(guarded.url, cache_dir=tmp_path) as client, pytest.raises(AgentError, match="401"):
        client.submit({"space": TINY, "backend": "torch-cpu", "input": [64, 64]})
    monkeypatch.setenv("EFFPOSE_TOKEN", TOKEN)
    with AgentClient(guarded.url, cache_dir=tmp_path) as client:  # from the environment
        doc = client.request_lut(TableSpec(TINY, (64, 64)), "torch-cpu", progress=False)
    assert len(doc["entries"]) == 9
    # the search's --cost URL goes through the same client, so it passes EFFPOSE_TOKEN too
    from search.cost import load_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    table = load_cost(f"{guarded.url}?backend=torch-cpu", TableSpec(TINY, (64, 64)))
    assert table.name == "lut:torch-cpu" and table.unit == "ms" and table.meta["id"] == doc["id"]
    fixed = [e["median_ms"] for e in doc["entries"] if e["key"].split("-")[0] in ("stem", "head", "overhead")]
    assert len(fixed) == 3 and table.fixed == pytest.approx(sum(fixed))
    monkeypatch.delenv("EFFPOSE_TOKEN")
    with pytest.raises(AgentError, match="401"):
        load_cost(f"{guarded.url}?backend=torch-cpu", TableSpec(TINY, (80, 80)))
    space = tmp_path / "tiny.json"
    space.write_text(json.dumps(TINY))
    cmd = [sys.executable, "-m", "effpose", "lut", "build", "--agent", guarded.url, "--space", str(space)]
    cmd += ["--backend", "torch-cpu", "--input", "64x64", "-o", str(tmp_path / "lut.json"), "--json", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "EFFPOSE_TOKEN"}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "401" in refused.stderr and "Traceback" not in refused.stderr
    built = subprocess.run(cmd, env={**env, "EFFPOSE_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["entries"] == 9


def test_protected_reads_cover_the_cached_fast_path(tmp_path, agent_factory):
    agent = agent_factory(tmp_path, {"EFFPOSE_TOKEN": TOKEN, "EFFPOSE_PROTECT_READS": "1"}).start()
    try:
        with AgentClient(agent.url, token=TOKEN, cache_dir=tmp_path / "cache") as client:
            doc = client.request_lut(TableSpec(TINY, (64, 64)), "torch-cpu", progress=False)
            again = client.submit({"space": TINY, "backend": "torch-cpu", "input": [64, 64]})
        lut_url = f"{agent.url}/v1/luts/{doc['id']}"
        first = httpx.get(lut_url, headers=AUTH)
        etag = first.headers["etag"]
        assert first.status_code == 200 and httpx.get(lut_url, headers=AUTH).content == first.content  # cached
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"If-None-Match": etag}):
            response = httpx.get(lut_url, headers=headers)  # the fast path must not answer these
            assert response.status_code == 401 and doc["id"] not in response.text
        assert httpx.get(lut_url, headers={**AUTH, "If-None-Match": etag}).status_code == 304
        for path in ("/v1/device", "/v1/jobs/x", "/openapi.json", "/docs"):
            assert httpx.get(f"{agent.url}{path}").status_code == 401
            assert httpx.get(f"{agent.url}{path}", headers=AUTH).status_code in (200, 404)
        assert httpx.get(f"{agent.url}/v1/health").status_code == 200  # healthchecks carry no token
        assert again.status_code == 200
    finally:
        agent.stop()


def test_serve_binds_loopback_by_default_and_refuses_protected_reads_without_token(tmp_path, wait_for):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFPOSE_")}
    bad = subprocess.run(
        [sys.executable, "-m", "effpose", "lut", "serve", "--db", f"sqlite:///{tmp_path}/x.db"],
        env={**env, "EFFPOSE_PROTECT_READS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "EFFPOSE_PROTECT_READS=1 needs EFFPOSE_TOKEN" in bad.stderr
    port = free_port()
    cmd = [sys.executable, "-m", "effpose", "lut", "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path}/a.db"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port) or proc.poll() is not None, timeout_s=60, poll_s=0.2)
        assert proc.poll() is None
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                    listening.add(address)
        assert listening == {"0100007F"}  # 127.0.0.1 only
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_settings_read_security_and_limits_from_the_environment(monkeypatch):
    from lut_service.guard import bearer_matches
    from lut_service.settings import Settings

    for name in [k for k in os.environ if k.startswith("EFFPOSE_")]:
        monkeypatch.delenv(name)
    default = Settings.from_env()
    assert default.host == "127.0.0.1" and default.token is None and default.protect_reads is False
    monkeypatch.setenv("EFFPOSE_TOKEN", TOKEN)
    monkeypatch.setenv("EFFPOSE_PROTECT_READS", "yes")
    monkeypatch.setenv("EFFPOSE_MAX_LAYERS", "12")
    monkeypatch.setenv("EFFPOSE_PROFILE_TIMEOUT_S", "2.5")
    settings = Settings.from_env()
    assert settings.token == TOKEN and settings.protect_reads and settings.max_layers == 12
    assert settings.budget.timeout_s == 2.5
    for var, value, message in (
        ("EFFPOSE_PROTECT_READS", "maybe", "EFFPOSE_PROTECT_READS='maybe'"),
        ("EFFPOSE_MAX_CHANNELS", "many", "EFFPOSE_MAX_CHANNELS='many' is not an integer"),
        ("EFFPOSE_MAX_BODY_BYTES", "0", "must be at least 1"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv(var, value)
            with pytest.raises(ValueError, match=re.escape(message)):
                Settings.from_env()
    headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
    assert bearer_matches(headers, TOKEN.encode())
    assert not bearer_matches([(b"authorization", b"Bearer ")], TOKEN.encode())
    assert not bearer_matches([], TOKEN.encode())


def test_docker_compose_keeps_the_token_in_an_uncommitted_env_file():
    compose = (ROOT / "docker-compose.yml").read_text()
    ports = re.findall(r"^\s*-\s*\"?([\w.:]*:\d+:\d+)\"?\s*$", compose, flags=re.MULTILINE)
    # lut-cpu, lut-gpu, and the fleet's db, fleet-cpu, fleet-gpu: every one on the host's loopback only
    assert len(ports) == 5 and all(p.startswith("127.0.0.1:") for p in ports), ports
    assert "path: .env" in compose and "EFFPOSE_TOKEN" not in compose.split("services:")[1]
    assert "EFFPOSE_TOKEN=" in (ROOT / ".env.example").read_text()
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a checkout without git metadata cannot tell
        assert tracked.stdout.strip() == ""
