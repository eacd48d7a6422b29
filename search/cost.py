"""Cost model of the search: a ``[layer, op]`` cost tensor plus a fixed cost, from a LUT or counted locally.

Expected cost (Eqs. 4-5) = fixed (stem + head) + sum_l sum_o p_lo * cost_lo, differentiable w.r.t.
alpha through ``p``; the loss term is ``lambda * log_tau(cost)`` (Eq. 6). Because
``d log(cost) = d cost / cost``, the gradient does not depend on the unit of the cost, only on
``lambda / ln(tau)``.

Sources (``--cost``):

- ``flops`` / ``params``: counted with ``pose.counting`` on every candidate module at its layer's
  input shape (GFLOPs in the paper convention, millions of parameters); no agent needed.
- a LUT document file (what ``effpose lut build`` writes).
- ``http://HOST:PORT/v1/luts/ID``: one stored LUT, fetched with the ``lut_service`` client.
- ``http://HOST:PORT[?backend=NAME&threads=T&batch=B&dtype=D]``: an agent; the LUT of the space is
  requested first (the agent profiles missing keys), then fetched. Defaults: onnxruntime-cpu, 1
  thread, batch 1, float32. If the agent cannot be reached the client's last cached table is used
  with a warning, and without one the error says so. With ``&device=ID`` of another device (a fleet's
  agents share one store), that device's stored table of the same settings is taken instead: no agent
  profiles for another device.
- ``http://HOST:PORT/v1/luts?device=ID&backend=NAME&space=S&batch=B&threads=T`` (any of the filters):
  the one complete stored table, of any device of the agent's store, that the filters and the search's
  space, joints and head select (among several, those at the search's input size and batch); none or
  still several -> ``ValueError`` listing what the store has. A table id of another device works as well
  (``/v1/luts/ID``): every agent of a store serves every device's tables.

What a table is for is one ``pose.space.TableSpec`` (space, input size, batch, joints, head); its keys
are ``pose.space.table_keys(spec)``, the same function the agent plans its tables with. A table lacking a
needed key is a ``ValueError`` that lists the missing keys.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import torch
from torch import Tensor

from pose.counting import count
from pose.ops import PoseHead, Stem, make_layer_op
from pose.space import CANDIDATE_OPS, TableSpec, fixed_keys, layer_cells, table_keys

DEFAULT_BACKEND = "onnxruntime-cpu"


@dataclass
class CostTable:
    """Cost of every (layer, op) cell and of the fixed parts; illegal cells and ``skip`` cost 0."""

    name: str  # "flops", "params", "lut:<backend>"...
    unit: str
    table: Tensor  # [layers, len(CANDIDATE_OPS)]
    fixed: float
    source: str
    input_hw: tuple[int, int]
    batch: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def expected(self, probs: Tensor) -> Tensor:
        """Eqs. 4-5: fixed + sum_l sum_o p_lo * cost_lo (a scalar tensor with grad to alpha)."""
        return self.fixed + (probs * self.table.to(probs.dtype)).sum()

    def arch_cost(self, ops: list[str]) -> float:
        """Predicted cost of one architecture (the sum the argmax picks)."""
        return self.fixed + sum(float(self.table[i, CANDIDATE_OPS.index(op)]) for i, op in enumerate(ops))


@dataclass
class CostTerm:
    """One regulariser of the loss: ``lam * log_tau(expected cost)``."""

    cost: CostTable
    lam: float
    tau: float
    target: float | None = None  # a budget in the cost's unit; with one, ``search.budget`` replaces lam/tau

    def __post_init__(self) -> None:
        if self.tau <= 1.0:
            raise ValueError(f"tau must be > 1 (log base of the cost term), got {self.tau}")
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")

    def loss(self, probs: Tensor) -> Tensor:
        expected = self.cost.expected(probs)
        return self.lam * torch.log(expected.clamp_min(1e-12)) / math.log(self.tau)


# -- local counts ----------------------------------------------------------------------------------


def count_table(kind: str, spec: TableSpec) -> CostTable:
    """``flops`` (GFLOPs, paper convention) or ``params`` (millions) of each candidate at its layer shape
    for ``spec``'s input size and head (per image: the batch does not enter)."""
    if kind not in ("flops", "params"):
        raise ValueError(f"unknown counted cost {kind!r}; expected flops or params")

    def value(module: torch.nn.Module, hw: tuple[int, int], channels: int) -> float:
        counts = count(module, hw, in_channels=channels)
        return counts.gflops_paper if kind == "flops" else counts.params / 1e6

    space, input_hw = spec.space, spec.input_hw
    table = torch.zeros(space.num_layers, len(CANDIDATE_OPS), dtype=torch.float64)
    cache: dict[str, float] = {}
    for layer, op, key in layer_cells(spec):
        if key not in cache:
            cache[key] = value(make_layer_op(op, layer), (layer.in_h, layer.in_w), layer.c_in)
        table[layer.index, CANDIDATE_OPS.index(op)] = cache[key]
    stem = value(Stem(space.stem_channels), input_hw, 3)
    head_module = PoseHead(space.out_channels, spec.joints, spec.head_widths, spec.head_style, spec.sic)
    head_cost = value(head_module, space.backbone_output_hw(input_hw), space.out_channels)
    unit = "GFLOPs" if kind == "flops" else "Mparams"
    return CostTable(kind, unit, table, stem + head_cost, kind, input_hw, 1, {"stem": stem, "head": head_cost})


# -- LUT documents ---------------------------------------------------------------------------------


def _lut_costs(doc: dict[str, Any], source: str) -> dict[str, float]:
    """key -> cost in ms, read through ``lut_service.lut.LutTable`` (the agent's own reading of a document)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ValueError(f"LUT {source} is not a LUT document (no 'entries' list)")
    from lut_service.lut import LutTable

    table = LutTable.from_document(doc)
    return {entry["key"]: float(table.cost(entry["key"])) for entry in doc["entries"]}


def lut_table(doc: dict[str, Any], spec: TableSpec, source: str = "LUT") -> CostTable:
    """Cost tensor of ``spec``'s space and head from a LUT document, at the document's input size and batch;
    a key of ``table_keys`` missing from the document -> ValueError listing them."""
    try:
        spec = replace(spec, input_hw=(int(doc["input"][0]), int(doc["input"][1])), batch=int(doc.get("batch", 1)))
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ValueError(f"LUT {source} has no valid 'input' [H, W] / 'batch' fields: {exc}") from None
    costs = _lut_costs(doc, source)
    missing = [key for key in table_keys(spec) if key not in costs]
    if missing:
        hint = ""
        if "joints" in doc and int(doc["joints"]) != spec.joints:
            hint = f" (the LUT was built for {doc['joints']} joints, the data has {spec.joints})"
        (h, w), batch = spec.input_hw, spec.batch
        raise ValueError(
            f"LUT {source} lacks {len(missing)} key(s) needed by space {spec.space.name!r} at input "
            f"{h}x{w}, batch {batch}, {spec.joints} joints{hint}:\n  " + "\n  ".join(missing)
        )
    table = torch.zeros(spec.space.num_layers, len(CANDIDATE_OPS), dtype=torch.float64)
    for layer, op, key in layer_cells(spec):
        table[layer.index, CANDIDATE_OPS.index(op)] = costs[key]
    fixed = sum(costs[key] for key in fixed_keys(spec))
    backend = str(doc.get("backend", "lut"))
    meta = {k: doc.get(k) for k in ("id", "backend", "threads", "dtype", "device") if k in doc}
    meta["drift_reference"] = _trust(doc, source)
    return CostTable(f"lut:{backend}", "ms", table, fixed, source, spec.input_hw, spec.batch, meta)


def _trust(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Say on stderr how far the table can be trusted (its build's stability and shipped fidelity, and a
    warning in words when the machine would not hold still); return its ``lut.drift_reference``, the
    network ``search.loop`` re-times on the agent to report drift-corrected predictions."""
    from lut_service.lut import drift_reference
    from lut_service.stability import fidelity_line, stability_line, unstable_warning

    print(f"cost: LUT {source}: {stability_line(doc.get('stability'))}", file=sys.stderr)
    print(f"cost: LUT {source}: {fidelity_line(doc.get('fidelity'))}", file=sys.stderr)
    warning = unstable_warning(doc.get("stability"))
    if warning:
        print(f"cost: warning: LUT {source}: {warning}", file=sys.stderr)
    return drift_reference(doc)


def _index_path(agent) -> Path:  # noqa: ANN001 - lut_service.client.AgentClient
    return Path(agent.cache_dir) / "search-requests.json"


def _index_key(base: str, spec: TableSpec, backend: str) -> str:
    """The request's entry in the index (the same JSON as before ``TableSpec``, so old entries still match)."""
    fields = spec.as_fields(space_by_name=True)
    fields["input_hw"] = fields.pop("input")
    return json.dumps({"agent": base, "backend": backend, **fields}, sort_keys=True)


def _remember(agent, index_key: str, lut_id: str) -> None:  # noqa: ANN001
    """Map this request to the LUT id it got, so an unreachable agent can fall back to the cached table."""
    path = _index_path(agent)
    try:
        index = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        index = {}
    index[index_key] = lut_id
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(path)
    except OSError as exc:
        print(f"cost: warning: cannot write {path}: {exc}", file=sys.stderr)


def _cached_document(agent, index_key: str) -> dict[str, Any] | None:  # noqa: ANN001
    try:
        lut_id = json.loads(_index_path(agent).read_text()).get(index_key)
    except (OSError, ValueError, AttributeError):
        return None
    if lut_id is None:
        return None
    cached = agent.cached(lut_id)
    return None if cached is None else {"etag": cached[0], "document": cached[1]}


def _agent_document(url: str, spec: TableSpec) -> dict[str, Any]:
    """A LUT of ``spec`` from an agent URL: ``/v1/luts/ID`` fetched (and completed through the agent when it
    lacks keys of this space), the table a ``/v1/luts?...`` filter selects, or the agent's LUT of ``spec``
    with the URL's backend/threads/batch/dtype (another ``device``'s stored one, read-only)."""
    from lut_service.client import fetch_lut

    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    if parts.path.rstrip("/") == "/v1/luts":
        return _listed_document(base, url, _list_filters(url, parts.query), spec)
    if "/v1/luts/" not in parts.path:
        request, backend = _query_request(url, parts.query, spec)
        device = parse_qs(parts.query).get("device", [None])[-1]
        if device is not None and device != _agent_device(base):
            filters = {"device": device, "backend": backend, "batch": request.batch, "threads": request.threads}
            return _listed_document(base, url, filters, request)
        return _request_document(base, request, backend)
    doc = fetch_lut(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
    stored = replace(spec, input_hw=(int(doc["input"][0]), int(doc["input"][1])), batch=int(doc["batch"]))
    have = {e["key"] for e in doc["entries"]}
    if all(key in have for key in table_keys(stored)):
        return doc
    owner = str(doc.get("device", {}).get("id"))
    if owner != _agent_device(base):
        raise ValueError(
            f"LUT {url} of device {owner} lacks keys of space {spec.space.name!r}; only that device's agent can "
            "measure them: pass its URL, or a table of this agent's device"
        )
    # the stored table lacks keys of this space: ask the agent for them with the same settings
    print(f"cost: LUT {url} lacks keys of space {spec.space.name!r}; requesting them from {base}", file=sys.stderr)
    request = replace(stored, threads=int(doc["threads"]), dtype=str(doc["dtype"]))
    return _request_document(base, request, str(doc["backend"]))


def _query_request(url: str, query_text: str, spec: TableSpec) -> tuple[TableSpec, str]:
    """``spec`` with the URL's ``batch``/``threads``/``dtype``, and its ``backend`` (default onnxruntime-cpu)."""
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    unknown = set(query) - {"backend", "threads", "batch", "dtype", "device"}
    if unknown:
        raise ValueError(
            f"agent URL {url}: unknown parameter(s) {', '.join(sorted(unknown))}; "
            "expected backend, threads, batch, dtype, device"
        )
    try:
        request = replace(
            spec,
            batch=int(query.get("batch", spec.batch)),
            threads=int(query.get("threads", spec.threads)),
            dtype=query.get("dtype", spec.dtype),
        )
    except ValueError as exc:
        raise ValueError(f"agent URL {url}: {exc}") from None
    return request, query.get("backend", DEFAULT_BACKEND)


LIST_FILTERS = ("device", "backend", "space", "batch", "threads")


def _list_filters(url: str, query_text: str) -> dict[str, str]:
    """The ``GET /v1/luts`` filters of a list URL (unknown ones are an error, not ignored)."""
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    unknown = set(query) - set(LIST_FILTERS)
    if unknown:
        raise ValueError(
            f"LUT list URL {url}: unknown filter(s) {', '.join(sorted(unknown))}; expected {', '.join(LIST_FILTERS)}"
        )
    return query


def _agent_device(base: str) -> str:
    from lut_service.client import AgentClient

    with AgentClient(base) as agent:
        return str(agent.device()["id"])


def _fits(lut: dict[str, Any], spec: TableSpec) -> bool:
    """A listed table is of ``spec``'s space, joints and head (its input size and batch may differ)."""
    head = (list(spec.head_widths), spec.head_style, spec.sic)
    same_head = (lut["head_widths"], lut["head_style"], lut["sic"]) == head
    return lut["complete"] and lut["space"] == spec.space.name and lut["joints"] == spec.joints and same_head


def _describe(lut: dict[str, Any]) -> str:
    h, w = lut["input"]
    state = "complete" if lut["complete"] else f"{lut['entries']}/{lut['total']} entries"
    return (
        f"{lut['id']} (device {lut['device_id']}, {lut['backend']}, {lut['space']} {h}x{w}, batch {lut['batch']}, "
        f"threads {lut['threads']}, {lut['joints']} joints, {state})"
    )


def _listed_document(base: str, url: str, filters: dict[str, Any], spec: TableSpec) -> dict[str, Any]:
    """The one complete stored table the filters select for ``spec`` (any device of the agent's store)."""
    from lut_service.client import AgentClient

    with AgentClient(base) as agent:
        listed = agent.list_luts(**filters)
        usable = [lut for lut in listed if _fits(lut, spec)]
        exact = [lut for lut in usable if lut["input"] == list(spec.input_hw) and lut["batch"] == spec.batch]
        chosen = exact or usable
        if len(chosen) != 1:
            what = f"space {spec.space.name!r}, {spec.joints} joints, head {list(spec.head_widths)}"
            shown = listed or agent.list_luts()  # nothing passed the filters: show what there is
            found = "\n  ".join(_describe(lut) for lut in shown[:20]) or "none"
            problem = "no complete table" if not chosen else f"{len(chosen)} complete tables"
            raise ValueError(
                f"{url}: {problem} of {what} match the filters {filters}; add or change device=, backend=, "
                f"batch=, threads= (GET {base}/v1/luts, or `effpose lut list --agent {base}`). The store has:\n  "
                + found
            )
        print(f"cost: {url} -> {_describe(chosen[0])}", file=sys.stderr)
        return agent.get_lut(chosen[0]["id"])


def _request_document(base: str, spec: TableSpec, backend: str) -> dict[str, Any]:
    """Request (or fetch) the LUT of ``spec`` through the ``lut_service`` client.

    The client retries connection errors and 5xx answers with backoff. When the agent stays unreachable or
    failing, the table this same request got last time is taken from the client's ETag cache with a warning;
    without one the error says what to do.
    """
    from lut_service.client import AgentClient, AgentError

    index_key = _index_key(base, spec, backend)
    with AgentClient(base) as agent:
        try:
            doc = agent.request_lut(spec, backend)
        except AgentError as exc:
            if exc.status is not None and exc.status < 500:
                raise  # the agent refused the request itself: a cached table would hide the problem
            cached = _cached_document(agent, index_key)
            if cached is None:
                raise RuntimeError(
                    f"{exc}; and no cached LUT for this request exists in {agent.cache_dir} "
                    f"(start the agent with `effpose lut serve`, or pass a LUT file saved by `effpose lut build`)"
                ) from None
            print(
                f"cost: warning: {exc}; using the last cached LUT {cached['document'].get('id')} "
                f"(ETag {cached['etag']}) from {agent.cache_dir}",
                file=sys.stderr,
            )
            return cached["document"]
        _remember(agent, index_key, str(doc["id"]))
        return doc


def load_cost(source: str, spec: TableSpec) -> CostTable:
    """Resolve one ``--cost`` value to a ``CostTable`` of ``spec`` (see the module docstring for the forms).

    A LUT's own input size and batch win over ``spec``'s; its space and head must be ``spec``'s."""
    if source in ("flops", "params"):
        return count_table(source, spec)
    if source.startswith(("http://", "https://")):
        return lut_table(_agent_document(source, spec), spec, source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"cost {source!r} is not flops, params, an http(s) agent/LUT URL or an existing LUT file")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"LUT file {path} is not valid JSON: {exc}") from None
    return lut_table(doc, spec, str(path))


def build_terms(sources: list[str], lambdas: list[float], taus: list[float], spec: TableSpec) -> list[CostTerm]:
    """One ``CostTerm`` per source; a single lambda/tau applies to all, else one per source in order."""

    def spread(values: list[float], what: str) -> list[float]:
        if len(values) == 1:
            return values * len(sources)
        if len(values) != len(sources):
            raise ValueError(f"got {len(sources)} --cost but {len(values)} --{what}: give one, or one per --cost")
        return values

    lams, taus_ = spread(lambdas, "lambda"), spread(taus, "tau")
    terms = []
    for source, lam, tau in zip(sources, lams, taus_, strict=True):
        print(f"cost: loading {source}", file=sys.stderr)
        table = load_cost(source, spec)
        taken = {t.cost.name for t in terms}
        if table.name in taken:  # two LUTs of one backend (e.g. two agents): keep the names apart
            table.name = f"{table.name}#{sum(1 for n in taken if n.split('#')[0] == table.name) + 1}"
        terms.append(CostTerm(table, lam, tau))
    return terms
