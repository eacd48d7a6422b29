"""Run a profiler agent as a child process on 127.0.0.1: for ``effpose demo``, tests and benchmarks.

The agent always runs in its own process, as in production, so its single profiling worker never
shares an interpreter (or a GIL) with the caller's training or timing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _temp_log() -> Path:
    handle, name = tempfile.mkstemp(prefix="effpose-agent-", suffix=".log")
    os.close(handle)
    return Path(name)


class LocalAgent:
    """Start, stop and restart ``effpose lut serve`` on a SQLite file or any store URL (a fleet's
    PostgreSQL database); usable as a context manager."""

    def __init__(
        self,
        db_path: str | Path,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        log_level: str = "warning",
    ) -> None:
        text = str(db_path)
        self.store_url = text if "://" in text else None  # a SQLAlchemy URL instead of a SQLite path
        self.db_path = None if self.store_url else Path(text).resolve()
        if log_path is None:
            log_path = self.db_path.with_suffix(".agent.log") if self.db_path else _temp_log()
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return self.store_url or f"sqlite:///{self.db_path}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("agent is not running")
        return self.proc.pid

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no agent log)"

    def start(self, timeout_s: float = 60.0, port: int | None = None) -> LocalAgent:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "effpose", "lut", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--db", self.db_url, "--log-level", self.log_level]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"agent exited with code {code}:\n{self._tail()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"agent did not become healthy on {self.url} within {timeout_s:.0f} s:\n{self._tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown handlers run."""
        self.stop(signal.SIGKILL)

    def restart(self) -> LocalAgent:
        self.stop()
        return self.start()

    def __enter__(self) -> LocalAgent:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
