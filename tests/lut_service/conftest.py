"""A real agent: ``effpose lut serve`` in a subprocess on 127.0.0.1 (``lut_service.local.LocalAgent``),
a free port and a SQLite file in tmp."""

from __future__ import annotations

from pathlib import Path

import pytest

from lut_service.local import LocalAgent

# Small timing budget so the suite stays fast; the agent reads it from the environment.
FAST_BUDGET = {
    "EFFPOSE_PROFILE_WARMUP_RUNS": "1",
    "EFFPOSE_PROFILE_WARMUP_S": "0",
    "EFFPOSE_PROFILE_MIN_SAMPLES": "3",
    "EFFPOSE_PROFILE_MAX_SAMPLES": "20",
    "EFFPOSE_PROFILE_MAX_SECONDS": "0.01",
    "EFFPOSE_PROFILE_MIN_SAMPLE_MS": "0",
    # No token and open reads unless a test asks for them (an outer EFFPOSE_TOKEN must not leak in).
    "EFFPOSE_TOKEN": "",
    "EFFPOSE_PROTECT_READS": "",
}


def make_agent(root: Path, env: dict[str, str] | None = None, name: str = "agent") -> LocalAgent:
    """An agent (not started) on ``root/NAME.db`` with the fast budget plus ``env``."""
    return LocalAgent(root / f"{name}.db", root / f"{name}.log", env={**FAST_BUDGET, **(env or {})}, log_level="info")


@pytest.fixture(scope="session")
def agent_factory():
    """``make_agent`` for tests that need their own agent (a token, limits, crashes)."""
    return make_agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent per test module (profiling the small space twice is the slow part; share it)."""
    with make_agent(tmp_path_factory.mktemp("agent")) as running:
        yield running


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
