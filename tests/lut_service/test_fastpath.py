"""The ASGI shortcut for cached LUT documents answers exactly what the FastAPI route answers."""

from __future__ import annotations

import httpx
import pytest

from lut_service.client import AgentClient
from pose.space import TableSpec

HEADERS = ("etag", "content-type", "content-length")


@pytest.fixture(scope="module")
def lut_id(agent, tmp_path_factory) -> str:
    with AgentClient(agent.url, cache_dir=tmp_path_factory.mktemp("cache")) as client:
        # any complete table will do: a tiny one at 64x64 builds in seconds instead of a minute
        spec = TableSpec({"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 2]]}, (64, 64))
        return client.request_lut(spec, "torch-cpu", progress=False)["id"]


def test_cached_answer_equals_route_answer(agent, lut_id):
    agent.restart()  # empty in-memory cache: the first GET goes through the route and fills it
    url = f"{agent.url}/v1/luts/{lut_id}"
    miss = httpx.get(url)
    hit = httpx.get(url)
    assert miss.status_code == hit.status_code == 200
    assert miss.content == hit.content
    assert [miss.headers[h] for h in HEADERS] == [hit.headers[h] for h in HEADERS]
    etag = hit.headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = httpx.get(url, headers={"If-None-Match": header})
        assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
    assert httpx.get(url, headers={"If-None-Match": '"other"'}).content == hit.content


def test_everything_else_goes_through_fastapi(agent, lut_id):
    httpx.get(f"{agent.url}/v1/luts/{lut_id}")  # cached now
    unknown = httpx.get(f"{agent.url}/v1/luts/not-a-lut")
    assert unknown.status_code == 404 and "not-a-lut" in unknown.json()["detail"]
    assert httpx.get(f"{agent.url}/v1/luts/{lut_id}/extra").status_code == 404
    assert httpx.post(f"{agent.url}/v1/luts/{lut_id}").status_code == 405
