"""The keys the search needs are the keys the agent serves, across batch x joints x head x space.

The whole matrix runs through the agent's own request path (request body -> ``LutRequest`` ->
``routes.resolve_request``, whose keys the agent stores as the table's, and ``plan.plan_entries``, what
its worker profiles) against the search's reading of the same ``TableSpec`` (``search.cost.lut_table``).
A few cells also run end to end: a real agent builds the table and the search loads it by URL.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from lut_service.client import AgentClient
from lut_service.plan import plan_entries
from lut_service.routes import resolve_request
from lut_service.schemas import LutRequest
from lut_service.settings import Settings
from pose.space import LARGE, SMALL, TableSpec, get_space, table_keys
from search.cost import load_cost, lut_table

INLINE = get_space({"name": "inline", "stem_channels": 8, "stages": [[16, 2, 2], [24, 1, 2]]})
HEADS = [((64, 32), "plain", True), ((128,), "mbv2", False), ((32, 16, 16), "mbv1", True)]
MATRIX = list(itertools.product([1, 8], [16, 17], HEADS, [SMALL, LARGE, INLINE]))


def _spec(batch: int, joints: int, head: tuple, space, input_hw=(256, 192)) -> TableSpec:
    widths, style, sic = head
    return TableSpec(space, input_hw, batch, joints, widths, style, sic)


def _document(keys: list[str], spec: TableSpec) -> dict:
    """A LUT document as the agent renders one, every key with its own cost (its position + 1 ms)."""
    return {
        "id": "matrix",
        "device": {"id": "d"},
        "backend": "torch-cpu",
        **spec.as_fields(),
        "overhead_key": next(k for k in keys if k.startswith("overhead-")),
        "entries": [
            {"key": k, "median_ms": i + 1.0, "p10_ms": i + 1.0, "p90_ms": i + 1.0, "iqr_ms": 0.0, "samples": 3}
            for i, k in enumerate(keys)
        ],
    }


def _assert_search_uses_every_entry(doc: dict, spec: TableSpec) -> None:
    """``search.cost`` reads the document without a missing key, and every entry lands somewhere: in a
    (layer, op) cell or, for exactly the three fixed parts (stem, head, overhead), in the fixed cost."""
    table = lut_table(doc, spec, "matrix")
    by_cost = {e["median_ms"]: e["key"] for e in doc["entries"]}
    assert len(by_cost) == len(doc["entries"])  # distinct costs: a cell's value names its key
    in_cells = {by_cost[float(v)] for v in table.table.flatten() if v != 0}
    fixed = [e for e in doc["entries"] if e["key"] not in in_cells]
    assert sorted(e["key"].split("-", 1)[0] for e in fixed) == ["head", "overhead", "stem"]
    assert table.fixed == pytest.approx(sum(e["median_ms"] for e in fixed))
    assert (table.input_hw, table.batch) == (spec.input_hw, spec.batch)


@pytest.mark.parametrize(("batch", "joints", "head", "space"), MATRIX)
def test_agent_plans_exactly_what_the_search_needs(batch, joints, head, space):
    spec = _spec(batch, joints, head, space)
    body = {**spec.as_fields(space_by_name=True), "backend": "torch-cpu"}  # what the client sends
    resolved = resolve_request(LutRequest.model_validate(body), Settings())
    assert resolved.spec == spec
    served = resolved.keys  # stored as the table's keys; the document lists exactly these
    profiled = [entry.key for entry in plan_entries(TableSpec.from_fields(resolved.canonical))]
    assert served == profiled == table_keys(spec)
    assert len(set(served)) == len(served)
    _assert_search_uses_every_entry(_document(served, spec), spec)


def test_matrix_cells_have_different_keys():
    """Every axis of the matrix changes the keys: a table of one cell never serves another."""
    tables = {frozenset(table_keys(_spec(*cell))) for cell in MATRIX}
    assert len(tables) == len(MATRIX)


TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}
END_TO_END = [(1, 16, HEADS[0]), (8, 17, ((16,), "mbv2", False)), (1, 17, ((16, 8), "mbv1", True))]


@pytest.mark.parametrize(("batch", "joints", "head"), END_TO_END)
def test_real_agent_serves_what_the_search_loads(agent, tmp_path, monkeypatch, batch, joints, head):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the search's client cache
    spec = _spec(batch, joints, head, TINY, (32, 32))
    # The search asks the agent by URL (batch from the URL, the rest from its spec), as --cost does.
    table = load_cost(f"{agent.url}?backend=torch-cpu&batch={batch}", replace(spec, batch=1))
    with AgentClient(agent.url, cache_dir=tmp_path / "cache") as client:
        doc = client.get_lut(table.meta["id"], use_stale=False)
    assert [entry["key"] for entry in doc["entries"]] == table_keys(spec)
    assert (doc["batch"], doc["joints"], tuple(doc["head_widths"])) == (batch, joints, head[0])
    assert TableSpec.from_fields(doc) == spec
    fixed = [e["median_ms"] for e in doc["entries"] if e["key"].split("-", 1)[0] in ("stem", "head", "overhead")]
    assert table.fixed == pytest.approx(sum(fixed))  # the search's fixed cost is the agent's stem + head + overhead
    _assert_search_uses_every_entry(_document([entry["key"] for entry in doc["entries"]], spec), spec)
