"""End to end against a real agent process through the real client (conftest: lut_service.local.LocalAgent)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest
import torch

from lut_service.client import AgentClient, AgentError
from lut_service.lut import LutTable
from lut_service.plan import plan_entries
from pose.models import PRESETS
from pose.space import SMALL, TableSpec, fixed_keys, space_keys, table_keys

TINY_SPACE = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}
TINY2 = {"name": "tiny2", "stem_channels": 8, "stages": [[16, 2, 2]]}


def measurement_rows(db_path) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT id, key, backend, median_ms, created_at FROM measurements ORDER BY id").fetchall()


def jobs(db_path) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT id, lut_id, state, done, total FROM jobs ORDER BY created_at").fetchall()


@pytest.fixture(scope="module")
def small_luts(agent, tmp_path_factory):
    """The small-space LUT on both CPU backends, built once through the client."""
    cache = tmp_path_factory.mktemp("cache")
    with AgentClient(agent.url, cache_dir=cache) as client:
        return {
            backend: client.request_lut(TableSpec("small"), backend, progress=False)
            for backend in ("onnxruntime-cpu", "torch-cpu")
        }


def test_health_and_device(agent):
    with AgentClient(agent.url) as client:
        assert client.health()["status"] == "ok"
        device = client.device()
    assert {"torch-cpu", "onnxruntime-cpu"} <= set(device["backends"])
    assert device["fingerprint"]["torch"] == torch.__version__
    assert device["fingerprint"]["cpu"]
    if not torch.cuda.is_available():
        assert set(device["unavailable"]) == {"torch-cuda", "onnxruntime-cuda"}


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch-cpu"])
def test_small_lut(small_luts, backend):
    doc = small_luts[backend]
    keys = [entry["key"] for entry in doc["entries"]]
    assert len(keys) == len(set(keys))
    spec = TableSpec(SMALL)
    assert keys == table_keys(spec) == fixed_keys(spec) + space_keys(spec)
    assert keys == [entry.key for entry in plan_entries(spec)]
    assert doc["backend"] == backend and doc["batch"] == 1 and doc["threads"] == 1 and doc["dtype"] == "float32"
    assert doc["input"] == [256, 256] and doc["space"]["name"] == "small"
    assert doc["overhead_key"] in keys and doc["device"]["torch"] == torch.__version__
    for entry in doc["entries"]:
        assert entry["samples"] >= 3
        assert 0 <= entry["p10_ms"] <= entry["median_ms"] <= entry["p90_ms"] or entry["key"] == doc["overhead_key"]
        assert entry["iqr_ms"] >= 0
    table = LutTable.from_document(doc)
    arch = PRESETS["efficientpose-a"]
    assert table.predict(arch) > table.cost(doc["overhead_key"])
    assert table.cost(None) == 0.0


def test_complete_lut_is_returned_at_once(agent, small_luts):
    response = httpx.post(f"{agent.url}/v1/luts", json={"space": "small", "backend": "onnxruntime-cpu"})
    assert response.status_code == 200
    assert response.headers["etag"].startswith('"')
    assert response.json() == small_luts["onnxruntime-cpu"]


def test_etag_and_304(agent, small_luts, cache_dir):
    lut_id = small_luts["torch-cpu"]["id"]
    first = httpx.get(f"{agent.url}/v1/luts/{lut_id}")
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')  # strong
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = httpx.get(f"{agent.url}/v1/luts/{lut_id}", headers={"If-None-Match": header})
        assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
    assert httpx.get(f"{agent.url}/v1/luts/{lut_id}", headers={"If-None-Match": '"nope"'}).status_code == 200
    # The client's on-disk cache sends If-None-Match and serves the cached copy on 304.
    with AgentClient(agent.url, cache_dir=cache_dir) as client:
        assert client.get_lut(lut_id) == first.json()
        assert list(cache_dir.glob("*.json"))
        assert client.get_lut(lut_id) == first.json()


def test_restart_serves_same_table_without_profiling(agent, small_luts):
    before_rows = measurement_rows(agent.db_path)
    before_jobs = jobs(agent.db_path)
    lut_id = small_luts["onnxruntime-cpu"]["id"]
    etag = httpx.get(f"{agent.url}/v1/luts/{lut_id}").headers["etag"]
    agent.restart()
    with AgentClient(agent.url) as client:
        for backend, doc in small_luts.items():
            response = client.submit({"space": "small", "backend": backend})
            assert response.status_code == 200  # complete: no job
            assert response.json() == doc
    assert httpx.get(f"{agent.url}/v1/luts/{lut_id}", headers={"If-None-Match": etag}).status_code == 304
    assert measurement_rows(agent.db_path) == before_rows
    assert jobs(agent.db_path) == before_jobs


def test_identical_requests_share_one_job(agent):
    # A slow budget keeps the job unfinished while the other requests arrive.
    body = {"space": TINY_SPACE, "backend": "torch-cpu", "input": [64, 64], "budget": {"warmup_s": 0.2}}
    results: list[httpx.Response] = []

    def post() -> None:
        results.append(httpx.post(f"{agent.url}/v1/luts", json=body, timeout=30))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.status_code for r in results} == {202}
    accepted = {(r.json()["job_id"], r.json()["lut_id"]) for r in results}
    assert len(accepted) == 1
    job_id, lut_id = accepted.pop()
    assert all(r.headers["location"] == f"/v1/jobs/{job_id}" for r in results)
    # A different budget is not a different table: it joins the same job.
    other = httpx.post(f"{agent.url}/v1/luts", json={**body, "budget": {"warmup_s": 0.1}})
    assert other.status_code == 202 and other.json() == {"job_id": job_id, "lut_id": lut_id}
    with AgentClient(agent.url) as client:
        job = client.wait(job_id, progress=False, poll_s=0.1, timeout_s=120)
        # 9 entries and the build's last step (stability and fidelity checks, the document)
        assert job["state"] == "done" and job["done"] == job["total"] == 9 + 1 and job["errors"] == []
        doc = client.get_lut(lut_id, use_stale=False)
    assert len(doc["entries"]) == 9
    assert sum(1 for row in jobs(agent.db_path) if row[1] == lut_id) == 1


def test_unfinished_job_resumes_after_restart(agent):
    body = {"space": TINY_SPACE, "backend": "onnxruntime-cpu", "input": [96, 96], "budget": {"warmup_s": 0.3}}
    accepted = httpx.post(f"{agent.url}/v1/luts", json=body).json()
    job_id, deadline = accepted["job_id"], time.monotonic() + 120
    with AgentClient(agent.url) as client:  # stop only once some, not all, entries are stored
        while not 0 < (job := client.job(job_id))["done"] < job["total"]:
            assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.02)
    agent.stop()  # the worker stops between entries; the job stays 'running'
    (stopped,) = [row for row in jobs(agent.db_path) if row[0] == job_id]
    assert stopped[2] == "running" and 0 < stopped[3] < stopped[4], stopped
    before = measurement_rows(agent.db_path)
    agent.start()
    with AgentClient(agent.url) as client:
        job = client.wait(job_id, progress=False, poll_s=0.1, timeout_s=120)
        doc = client.get_lut(accepted["lut_id"], use_stale=False)
    assert job["state"] == "done" and job["done"] == job["total"] == 9 + 1  # entries, then the checks
    after = measurement_rows(agent.db_path)
    assert set(before) <= set(after)  # rows stored before the stop are kept as they were, not measured again
    assert len(after) - len(before) == 9 - stopped[3]  # only the missing entries were measured
    wanted = {entry["key"] for entry in doc["entries"]}
    keys = [row[1] for row in after if row[1] in wanted and row[2] == "onnxruntime-cpu"]
    assert len(keys) == len(set(keys)) == 9


def test_unknown_job_and_lut(agent):
    for path in ("/v1/jobs/nope", "/v1/luts/nope"):
        response = httpx.get(agent.url + path)
        assert response.status_code == 404 and "nope" in response.json()["detail"]


BAD_REQUESTS = [
    ({"space": "small", "backend": "tensorflow-cpu"}, 422, "backend"),
    ({"space": "medium", "backend": "torch-cpu"}, 422, "Input should be 'small' or 'large'"),
    ({"space": "/etc/passwd", "backend": "torch-cpu"}, 422, "/etc/passwd"),
    ({"space": {"stem_channels": 16, "stages": [[24, 3, 2]]}, "backend": "torch-cpu"}, 422, "stride must be 1 or 2"),
    ({"space": {"stem_channels": 16, "stages": [[24, 2, 0]]}, "backend": "torch-cpu"}, 422, "layers must be in 1..64"),
    ({"space": {"stem_channels": 16, "stages": []}, "backend": "torch-cpu"}, 422, "stages"),
    ({"space": {"stages": [[24, 2, 2]]}, "backend": "torch-cpu"}, 422, "stem_channels"),
    ({"space": "small", "backend": "torch-cpu", "input": [256]}, 422, "input"),
    ({"space": "small", "backend": "torch-cpu", "input": [65536, 65536], "batch": 4096}, 422, "limit"),
    ({"space": "small", "backend": "torch-cpu", "input": [4, 4]}, 422, "greater than or equal to 8"),
    ({"space": "small", "backend": "torch-cpu", "input": [4096, 4096]}, 422, "input 4096x4096 out of range"),
    ({"space": "small", "backend": "torch-cpu", "head_widths": [0]}, 422, "head_widths"),
    (
        {"space": {"stem_channels": 4096, "stages": [[4096, 1, 2]]}, "backend": "torch-cpu", "input": [8, 8]},
        422,
        "limit",
    ),
    ({"space": "small", "backend": "torch-cpu", "batch": 0}, 422, "batch"),
    ({"space": "small", "backend": "torch-cpu", "threads": 4096}, 422, "threads"),
    ({"space": "small", "backend": "torch-cpu", "dtype": "int4"}, 422, "dtype"),
    ({"space": "small", "backend": "torch-cpu", "head_style": "fancy"}, 422, "head_style"),
    ({"space": "small", "backend": "torch-cpu", "colour": 1}, 422, "colour"),
    ({"backend": "torch-cpu"}, 422, "space"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_4xx_naming_the_problem(agent, body, status, message):
    response = httpx.post(f"{agent.url}/v1/luts", json=body)
    assert response.status_code == status, response.text
    assert message in response.text
    # Through the client the same answer is an AgentError carrying the URL and the agent's message.
    with AgentClient(agent.url) as client, pytest.raises(AgentError, match=f"{agent.url}/v1/luts.*{status}"):
        client.submit(body)


@pytest.mark.parametrize("query", ["threads=78223837417398142899150276001792", "batch=10**19", "threads=0"])
def test_out_of_range_list_filters_get_422_naming_the_field(agent, query):
    """Found by the schema fuzzer: a filter beyond a stored column's range was a 500 from the database."""
    response = httpx.get(f"{agent.url}/v1/luts?{query.replace('10**19', str(10**19))}")
    assert response.status_code == 422, response.text
    assert query.split("=")[0] in response.text


def test_malformed_json_body(agent):
    response = httpx.post(f"{agent.url}/v1/luts", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("backend", ["torch-cuda", "onnxruntime-cuda"])
def test_unavailable_backend(agent, backend):
    response = httpx.post(f"{agent.url}/v1/luts", json={"space": "small", "backend": backend})
    assert response.status_code == 400
    assert f"backend {backend!r} is not available on this device" in response.json()["detail"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch-cuda", "onnxruntime-cuda"])
def test_cuda_lut(agent, backend):
    with AgentClient(agent.url) as client:
        device = client.device()
        if backend not in device["backends"]:
            pytest.skip(device["unavailable"][backend])
        doc = client.request_lut(TableSpec(TINY_SPACE, (64, 64), batch=2), backend, progress=False)
    assert doc["device"]["gpus"] and len(doc["entries"]) == 9
    assert all(entry["median_ms"] >= 0 for entry in doc["entries"])


def test_document_is_canonical_json(agent, small_luts):
    lut_id = small_luts["onnxruntime-cpu"]["id"]
    body = httpx.get(f"{agent.url}/v1/luts/{lut_id}").content
    assert json.loads(body) == small_luts["onnxruntime-cpu"]
    assert httpx.get(f"{agent.url}/v1/luts/{lut_id}").content == body


def test_measure_networks_end_to_end(agent):
    archs = [["k3e3", "skip"], ["k7e6", "k5e3"]]
    with AgentClient(agent.url) as client:
        result = client.measure_networks(TableSpec(TINY2, (64, 64)), archs, "onnxruntime-cpu", progress=False)
    assert result["clock"] == "thread-cpu" and len(result["latencies"]) == 2
    assert all(lat["median_ms"] > 0 and lat["samples"] >= 3 for lat in result["latencies"])


@pytest.mark.parametrize(
    ("archs", "message"),
    [
        ([["k3e3"]], "archs[0]: space 'tiny2' has 2 searchable layers, arch lists 1 ops"),
        ([["k3e3", "k3e3"], ["skip", "k3e3"]], "archs[1]: layer 0 (stage 1): skip is not allowed"),
        ([["k9e9", "k3e3"]], "unknown op 'k9e9'"),
        ([], "archs"),
    ],
)
def test_measure_networks_rejects_bad_archs(agent, archs, message):
    body = {"space": TINY2, "archs": archs, "backend": "torch-cpu", "input": [64, 64]}
    response = httpx.post(f"{agent.url}/v1/networks", json=body)
    assert response.status_code == 422 and message in response.text, response.text
