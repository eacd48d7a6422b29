"""A real agent: ``effpose lut serve`` in a subprocess on 127.0.0.1 (``lut_service.local.LocalAgent``),
a free port and a SQLite file in tmp."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lut_service.local import LocalAgent

# Small timing budget so the suite stays fast; the agent reads it from the environment.
FAST_BUDGET = {
    "EFFPOSE_PROFILE_WARMUP_RUNS": "1",
    "EFFPOSE_PROFILE_WARMUP_S": "0",
    "EFFPOSE_PROFILE_MIN_SAMPLES": "3",
    "EFFPOSE_PROFILE_MAX_SAMPLES": "20",
    "EFFPOSE_PROFILE_MAX_SECONDS": "0.01",
    "EFFPOSE_PROFILE_MIN_SAMPLE_MS": "0",
    "EFFPOSE_PROFILE_FIDELITY_NETWORKS": "2",  # held-out networks per build (default 5): fewer, faster
    # the guard still checks and reports every part, but does not measure it again: on a busy test
    # machine its retries tripled some builds; the guard's own tests (test_trust.py) set their retries
    "EFFPOSE_PROFILE_STABILITY_RETRIES": "0",
    # No token and open reads unless a test asks for them (an outer EFFPOSE_TOKEN must not leak in).
    "EFFPOSE_TOKEN": "",
    "EFFPOSE_PROTECT_READS": "",
}


def make_agent(
    root: Path, env: dict[str, str] | None = None, name: str = "agent", store: str | None = None
) -> LocalAgent:
    """An agent (not started) on ``root/NAME.db`` (or the store URL ``store``) with the fast budget plus ``env``."""
    db = store or root / f"{name}.db"
    return LocalAgent(db, root / f"{name}.log", env={**FAST_BUDGET, **(env or {})}, log_level="info")


@pytest.fixture(scope="session")
def agent_factory():
    """``make_agent`` for tests that need their own agent (a token, limits, crashes)."""
    return make_agent


def _wait_for(predicate: Callable[[], Any], timeout_s: float = 120.0, poll_s: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture(scope="session")
def wait_for():
    """``wait_for(predicate, timeout_s=120, poll_s=0.05)``: the polling loop the crash and fleet tests share."""
    return _wait_for


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent per test module (profiling the small space twice is the slow part; share it)."""
    with make_agent(tmp_path_factory.mktemp("agent")) as running:
        yield running


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- stores: the same tests on a SQLite file and on a real PostgreSQL server --------------------------
# .ci/postgres.sh starts a throwaway server and exports EFFPOSE_TEST_PG_URL; .ci/run sets
# EFFPOSE_REQUIRE_PG=1 there, so in CI a server that is missing or refuses connections fails the tests.


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The URL of the test PostgreSQL server (its ``postgres`` database), or a skip naming the reason."""
    url = os.environ.get("EFFPOSE_TEST_PG_URL", "")
    reason = None
    if not url:
        reason = "no PostgreSQL server: EFFPOSE_TEST_PG_URL is unset (run the tests under .ci/postgres.sh)"
    else:
        try:
            engine = create_engine(url)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
        except Exception as exc:
            reason = f"PostgreSQL at {make_url(url).render_as_string(hide_password=True)} is unreachable: {exc}"
    if reason is not None:
        if os.environ.get("EFFPOSE_REQUIRE_PG") == "1":
            pytest.fail(f"EFFPOSE_REQUIRE_PG=1 but {reason}")
        pytest.skip(reason)
    return url


def pg_database(server_url: str, name: str) -> str:
    """Create the empty database ``name`` on the server; its URL."""
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(server_url: str, name: str) -> None:
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty store: a SQLite file in tmp, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    server = request.getfixturevalue("pg_server")
    name = f"effpose_test_{uuid.uuid4().hex[:12]}"
    url = pg_database(server, name)
    try:
        yield url
    finally:
        drop_pg_database(server, name)
