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
