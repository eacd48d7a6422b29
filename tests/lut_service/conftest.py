"""A real agent: ``effpose lut serve`` in a subprocess on 127.0.0.1, a free port and a SQLite file in tmp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# Small timing budget so the suite stays fast; the agent reads it from the environment.
FAST_BUDGET = {
    "EFFPOSE_PROFILE_WARMUP_RUNS": "1",
    "EFFPOSE_PROFILE_WARMUP_S": "0",
    "EFFPOSE_PROFILE_MIN_SAMPLES": "3",
    "EFFPOSE_PROFILE_MAX_SAMPLES": "20",
    "EFFPOSE_PROFILE_MAX_SECONDS": "0.01",
    "EFFPOSE_PROFILE_MIN_SAMPLE_MS": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agent:
    """Start/stop/restart one agent process on a fixed database file."""

    def __init__(self, db_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.db_path = db_path
        self.log_path = log_path
        self.env = {**os.environ, **FAST_BUDGET, **(env or {})}
        self.env.pop("EFFPOSE_TOKEN", None)
        self.env.pop("EFFPOSE_DB_URL", None)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def start(self, timeout: float = 60.0) -> Agent:
        self.port = free_port()
        log = open(self.log_path, "a")
        cmd = [sys.executable, "-m", "effpose", "lut", "serve", "--port", str(self.port), "--db", self.db_url]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"agent did not become healthy in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> Agent:
        self.stop()
        return self.start()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent per test module (profiling the small space twice is the slow part; share it)."""
    root = tmp_path_factory.mktemp("agent")
    running = Agent(root / "agent.db", root / "agent.log").start()
    yield running
    running.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
