"""Shared tiny settings: a 4-stage inline space, 64x64 inputs and a few synthetic images keep each search ~seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from search.loop import SearchConfig

TINY_SPACE = {"name": "tiny", "stem_channels": 8, "stages": [[8, 2, 2], [16, 2, 2], [16, 2, 2], [24, 1, 2]]}


def _tiny_config(**overrides) -> SearchConfig:
    values = dict(
        space=TINY_SPACE,
        data="synthetic:8",
        costs=["flops"],
        lambdas=[0.0],
        taus=[10.0],
        mode="mixed",
        warmup_epochs=1,
        epochs=2,
        batch_size=4,
        input_hw=(64, 64),
        cost_input_hw=(64, 64),
        seed=0,
        arch_lr=0.05,
        max_batches=2,
        entropy_weight=0.0,  # tests of the cost terms see them alone; the commitment term is tested on its own
    )
    values.update(overrides)
    return SearchConfig(**values)


@pytest.fixture(scope="session", autouse=True)
def search_cache(tmp_path_factory: pytest.TempPathFactory):
    """One synthetic-data cache for the whole session (generated once, shared with subprocesses via the env)."""
    old = os.environ.get("EFFPOSE_CACHE_DIR")
    path = tmp_path_factory.mktemp("effpose-cache")
    os.environ["EFFPOSE_CACHE_DIR"] = str(path)
    yield Path(path)
    if old is None:
        os.environ.pop("EFFPOSE_CACHE_DIR", None)
    else:
        os.environ["EFFPOSE_CACHE_DIR"] = old


@pytest.fixture
def tiny_space() -> dict:
    return dict(TINY_SPACE)


@pytest.fixture(scope="session")
def make_config():
    """Factory of tiny ``SearchConfig`` objects (keyword overrides)."""
    return _tiny_config


def _kill_9_when_logged(proc, log: Path, lines: int = 1, what: str = "search") -> None:
    """SIGKILL ``proc`` as soon as ``log`` holds ``lines`` lines (that many checkpoints written)."""
    import signal
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            break
        if proc.poll() is not None:
            pytest.fail(f"{what} ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def kill_9_when_logged():
    """``kill_9_when_logged(proc, log, lines=1, what="search")``: the kill -9 step of the resume tests."""
    return _kill_9_when_logged
