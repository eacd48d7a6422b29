"""A search fed by a live profiler agent on 127.0.0.1, and the fallbacks when the agent goes away."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lut_service.local import LocalAgent
from lut_service.lut import LutTable
from pose.space import ArchSpec, TableSpec

# A tiny timing budget (read by the agent from its environment) keeps profiling to seconds.
FAST_BUDGET = {
    "EFFPOSE_PROFILE_WARMUP_RUNS": "1",
    "EFFPOSE_PROFILE_WARMUP_S": "0",
    "EFFPOSE_PROFILE_MIN_SAMPLES": "3",
    "EFFPOSE_PROFILE_MAX_SAMPLES": "20",
    "EFFPOSE_PROFILE_MAX_SECONDS": "0.01",
    "EFFPOSE_PROFILE_MIN_SAMPLE_MS": "0",
    "EFFPOSE_PROFILE_FIDELITY_NETWORKS": "2",  # fewer held-out networks (default 5)
    "EFFPOSE_PROFILE_STABILITY_RETRIES": "0",  # the guard still reports; it does not re-measure
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent")
    # EFFPOSE_TOKEN="" : an outer token must not turn authentication on for this agent
    with LocalAgent(root / "a.db", root / "agent.log", env={**FAST_BUDGET, "EFFPOSE_TOKEN": ""}) as running:
        yield running


def _failing_server(port: int) -> http.server.ThreadingHTTPServer:
    """A real HTTP server on the agent's address that answers 500 to everything (a broken agent)."""

    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            body = b'{"detail": "internal error"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _fail

        def log_message(self, *args) -> None:
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _search(
    tmp_path: Path, out: str, cache: Path, *costs: str, lambdas=("0.1",), space_file: Path
) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "effpose.cli", "search", "--space", str(space_file), "--data", "synthetic:8",
            "--input", "64x64", "--cost-input", "64x64", "--warmup-epochs", "0", "--epochs", "1",
            "--batch-size", "4", "--max-batches", "1", "--no-progress", "--json",
            "--out", str(tmp_path / out)]  # fmt: skip
    for cost in costs:
        args += ["--cost", cost]
    for lam in lambdas:
        args += ["--lambda", lam]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_search_with_a_live_agent_then_cached_table_then_clear_error(tmp_path, agent, tiny_space):
    url = agent.url
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    cache = tmp_path / "cache"
    agent_cost = f"{url}?backend=torch-cpu&threads=1"
    # two cost terms at once: FLOPs and the agent's torch-cpu latency, each with its own lambda
    result = _search(tmp_path, "live", cache, "flops", agent_cost, lambdas=("0.1", "0.2"), space_file=space_file)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["predicted_cost"]) == {"flops", "lut:torch-cpu"}
    assert summary["predicted_cost"]["lut:torch-cpu"]["unit"] == "ms"
    # the prediction is the LUT's own whole-network prediction of the derived architecture
    from lut_service.client import AgentClient

    with AgentClient(url, cache_dir=tmp_path / "other-cache") as client:
        doc = client.request_lut(TableSpec(tiny_space, (64, 64), joints=summary["joints"]), "torch-cpu", progress=False)
    arch = ArchSpec.load(tmp_path / "live" / "arch.json")
    predicted = LutTable.from_document(doc).predict(arch)
    assert summary["predicted_cost"]["lut:torch-cpu"]["value"] == pytest.approx(predicted, rel=1e-9)

    # agent failing (every request answers 500) on the same address: retries, then the cached table
    agent.kill()
    port = int(url.rsplit(":", 1)[1])
    server = _failing_server(port)
    try:
        result = _search(tmp_path, "failing", cache, agent_cost, space_file=space_file)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert "answered 500" in result.stderr and "using the last cached LUT" in result.stderr

    # agent gone: after the client's retries the search uses the cached table of this request, with a warning
    result = _search(tmp_path, "cached", cache, agent_cost, space_file=space_file)
    assert result.returncode == 0, result.stderr
    assert "unreachable" in result.stderr and "using the last cached LUT" in result.stderr
    assert json.loads(result.stdout)["predicted_cost"]["lut:torch-cpu"]["value"] > 0

    # no cache for this request: a clear error, exit code 2, no traceback
    result = _search(tmp_path, "none", tmp_path / "empty-cache", agent_cost, space_file=space_file)
    assert result.returncode == 2
    assert "effpose search: error:" in result.stderr and "no cached LUT" in result.stderr
    assert "Traceback" not in result.stderr
