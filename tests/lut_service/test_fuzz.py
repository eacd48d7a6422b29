"""Schemathesis against the live agent's own OpenAPI (uvicorn subprocess on 127.0.0.1): no 5xx, and
every answer (status, content type, headers, body) conforms to the schema. Bounded: a few dozen
examples per operation, under a minute in all.

The agent runs with tight limits and a tiny timing budget, so the jobs that valid random requests
queue are cheap; ``positive_data_acceptance`` is not checked on purpose, since a schema-valid request
over a configured limit (batch, input, layers, channels) is refused with 422 by design.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lut_service.app import create_app
from lut_service.settings import Settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

LIMITS = {
    "EFFPOSE_MAX_INPUT_SIDE": "64",
    "EFFPOSE_MAX_BATCH": "2",
    "EFFPOSE_MAX_LAYERS": "6",
    "EFFPOSE_MAX_CHANNELS": "64",
    "EFFPOSE_MAX_KEYS": "60",
    "EFFPOSE_MAX_NETWORKS": "2",
    "EFFPOSE_PROFILE_TIMEOUT_S": "2",
}


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory, agent_factory):
    with agent_factory(tmp_path_factory.mktemp("fuzz"), LIMITS) as running:
        yield running


# The schema the agent serves at /openapi.json, read from the same app object (no server needed to
# collect one test per operation); the requests go to the live agent.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(db_url="sqlite://")).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


def test_served_schema_is_the_one_fuzzed(fuzz_agent):
    served = httpx.get(f"{fuzz_agent.url}/openapi.json").json()
    assert served["paths"].keys() == SCHEMA.raw_schema["paths"].keys()
    assert len(OPERATIONS) >= 6


# Negative (schema-violating) data only where there is something to violate: the request bodies.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS]
CASES += [(op, GenerationMode.NEGATIVE) for op in OPERATIONS if op.method.upper() == "POST"]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES])
def test_api_conforms_to_its_schema(fuzz_agent, operation, mode):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.call_and_validate(base_url=fuzz_agent.url, checks=CHECKS, timeout=30)

    check()


def test_success_answers_conform_too(fuzz_agent):
    """Random ids and bodies rarely hit the success paths; walk them explicitly with the same checks:
    202 and 200 of POST /v1/luts, a running and a done job, 409 while incomplete, the document, 304."""
    ops = {op.label: op for op in OPERATIONS}
    url = fuzz_agent.url
    body = {"space": {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}, "backend": "torch-cpu"}
    body |= {"input": [64, 64], "budget": {"warmup_s": 0.3}}

    def call(label: str, headers: dict[str, str] | None = None, **kwargs):
        case = ops[label].Case(**kwargs)
        return case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=30)

    accepted = call("POST /v1/luts", body=body)
    assert accepted.status_code == 202
    job_id, lut_id = accepted.json()["job_id"], accepted.json()["lut_id"]
    assert call("GET /v1/luts/{lut_id}", path_parameters={"lut_id": lut_id}).status_code == 409
    while (job := call("GET /v1/jobs/{job_id}", path_parameters={"job_id": job_id})).json()["state"] != "done":
        assert job.json()["state"] in ("queued", "running")
    assert call("POST /v1/luts", body=body).status_code == 200  # complete: the document itself
    document = call("GET /v1/luts/{lut_id}", path_parameters={"lut_id": lut_id})
    assert document.status_code == 200
    etag = document.headers["etag"]
    etag = etag[0] if isinstance(etag, list) else etag  # schemathesis keeps header values as lists
    cached = call("GET /v1/luts/{lut_id}", path_parameters={"lut_id": lut_id}, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    networks = {k: v for k, v in body.items() if k != "budget"} | {"archs": [["k3e3"]]}
    job_id = call("POST /v1/networks", body=networks).json()["job_id"]
    while (job := call("GET /v1/jobs/{job_id}", path_parameters={"job_id": job_id})).json()["state"] != "done":
        assert job.json()["state"] in ("queued", "running")
    assert len(job.json()["result"]["latencies"]) == 1
