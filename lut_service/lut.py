"""LUT documents as cost tables: load, validate, look up, and predict whole-network latency.

Imported by the search (cost model) and the benchmarks; needs no agent and no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lut_service.schemas import LutDocument
from pose.space import ArchSpec, SearchSpace, TableSpec, arch_keys, get_space, layer_cells, random_ops


def validate_document(doc: dict[str, Any], source: str = "LUT document") -> LutDocument:
    try:
        return LutDocument.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(f"{source} is not a valid LUT document: {exc}") from None


def load_document(path: str | Path) -> dict[str, Any]:
    """Read and validate a LUT JSON file; ValueError/FileNotFoundError name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LUT file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"LUT file {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"LUT file {path} does not hold a JSON object")
    validate_document(doc, f"LUT file {path}")
    return doc


def save_document(doc: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file + rename): an interrupted write never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


@dataclass
class LutTable:
    """Median cost (ms) per key. ``skip`` (key None) costs zero."""

    costs: dict[str, float]
    spread: dict[str, float]  # IQR / median per key
    document: dict[str, Any]

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> LutTable:
        validate_document(doc)
        costs = {e["key"]: float(e["median_ms"]) for e in doc["entries"]}
        spread = {
            e["key"]: (float(e["iqr_ms"]) / float(e["median_ms"]) if e["median_ms"] > 0 else 0.0)
            for e in doc["entries"]
        }
        return cls(costs, spread, doc)

    @classmethod
    def load(cls, path: str | Path) -> LutTable:
        return cls.from_document(load_document(path))

    @property
    def backend(self) -> str:
        return self.document["backend"]

    @property
    def spec(self) -> TableSpec:
        """The table's identity (space, input, batch, joints, head, threads, dtype) as its document states it."""
        return TableSpec.from_fields(self.document)

    def __contains__(self, key: str) -> bool:
        return key in self.costs

    def cost(self, key: str | None) -> float:
        """Median milliseconds of ``key``; 0 for None (``skip``); KeyError naming the key when absent."""
        if key is None:
            return 0.0
        try:
            return self.costs[key]
        except KeyError:
            raise KeyError(f"LUT {self.document.get('id')} has no entry {key!r}") from None

    def missing(self, keys: list[str | None]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k is not None and k not in self.costs]

    def predict(self, arch: ArchSpec) -> float:
        """Predicted latency (ms) of the whole network: stem + head + overhead + chosen ops (Eq. 5), at this
        table's input size, batch and joints; KeyError when the table lacks a key of ``arch`` (e.g. another head)."""
        table = self.spec
        spec = TableSpec.for_arch(arch, input_hw=table.input_hw, batch=table.batch, joints=table.joints)
        keys = arch_keys(arch, spec)
        absent = self.missing(keys)
        if absent:
            raise KeyError(f"LUT {self.document.get('id')} lacks {len(absent)} keys for this arch, e.g. {absent[0]!r}")
        return sum(self.costs[k] for k in keys)


def document_summary(doc: dict[str, Any], slowest: int = 10) -> dict[str, Any]:
    """What ``effpose lut show`` prints: entries per stage, the slowest ops, and the spread of IQR/median."""
    import numpy as np

    batch = int(doc["batch"])
    stage_of: dict[str, int] = {}
    for layer, _, key in layer_cells(TableSpec.from_fields(doc)):
        stage_of.setdefault(key, layer.stage)
    per_stage: dict[str, dict[str, Any]] = {}
    for entry in doc["entries"]:
        key = entry["key"]
        group = f"stage {stage_of[key] + 1}" if key in stage_of else key.split("-", 1)[0]
        item = per_stage.setdefault(group, {"entries": 0, "min_ms": None, "max_ms": None})
        item["entries"] += 1
        item["min_ms"] = entry["median_ms"] if item["min_ms"] is None else min(item["min_ms"], entry["median_ms"])
        item["max_ms"] = entry["median_ms"] if item["max_ms"] is None else max(item["max_ms"], entry["median_ms"])
    rel = np.array([e["iqr_ms"] / e["median_ms"] for e in doc["entries"] if e["median_ms"] > 0] or [0.0])
    ranked = sorted(doc["entries"], key=lambda e: e["median_ms"], reverse=True)
    return {
        "id": doc["id"],
        "backend": doc["backend"],
        "device": doc["device"].get("cpu") if not doc["device"].get("gpus") else ", ".join(doc["device"]["gpus"]),
        "batch": batch,
        "threads": doc["threads"],
        "input": doc["input"],
        "entries": len(doc["entries"]),
        "per_stage": per_stage,
        "slowest": [{"key": e["key"], "median_ms": e["median_ms"]} for e in ranked[:slowest]],
        "iqr_over_median": {
            "min": float(rel.min()),
            "median": float(np.median(rel)),
            "p90": float(np.percentile(rel, 90)),
            "max": float(rel.max()),
        },
        "samples": {
            "min": min(e["samples"] for e in doc["entries"]),
            "max": max(e["samples"] for e in doc["entries"]),
        },
    }


def random_archs(space: str | dict[str, Any] | SearchSpace, count: int, seed: int = 0) -> list[list[str]]:
    """``count`` random legal op lists of ``space`` (uniform over each layer's legal ops), reproducible."""
    import random

    rng = random.Random(seed)
    search_space = get_space(space)
    return [random_ops(search_space, rng) for _ in range(count)]


def fidelity(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """How well LUT sums predict measured latency: shares within +-5/10 % (fractions), MAPE, mean signed
    error (bias, a fraction), Kendall tau and Spearman rho of the two rankings."""
    import numpy as np
    from scipy import stats

    pred = np.asarray(predicted, dtype=np.float64)
    meas = np.asarray(measured, dtype=np.float64)
    rel = pred / meas - 1.0
    tau = stats.kendalltau(pred, meas).statistic if len(pred) > 1 else float("nan")
    rho = stats.spearmanr(pred, meas).statistic if len(pred) > 1 else float("nan")
    return {
        "within_5pct": float(np.mean(np.abs(rel) <= 0.05)),
        "within_10pct": float(np.mean(np.abs(rel) <= 0.10)),
        "mape": float(np.mean(np.abs(rel))),
        "bias": float(np.mean(rel)),
        "kendall_tau": float(tau),
        "spearman": float(rho),
    }


# Interleaved rounds per network (each an untimed and a timed call of every network): 15 at batch 1
# (the median's error must stay well under the ~1 % gaps that decide Kendall tau among 50 random
# networks); at batch 8 a call takes ~0.1 s, so 5 rounds keep a 50-network validation to about 2 min.
NETWORK_BUDGET: dict[int, dict[str, int]] = {1: {"min_samples": 15}, 8: {"min_samples": 5, "warmup_runs": 1}}


def network_budget(batch: int) -> dict[str, int] | None:
    """The interleaved rounds a validation asks for at ``batch`` (``NETWORK_BUDGET``)."""
    return NETWORK_BUDGET.get(batch, NETWORK_BUDGET[8] if batch > 8 else None)


def uniform_ops(spec: TableSpec) -> list[list[str]]:
    """One op list per MBConv op with that op in every searchable layer: the build's uniform networks."""
    from pose.space import MBCONV_OPS

    n_layers = len(spec.space.layers(spec.input_hw))
    return [[op] * n_layers for op in MBCONV_OPS]


def drift_reference(doc: dict[str, Any]) -> dict[str, Any]:
    """The network that use-time drift checks re-time, with its time at the build (small, JSON-ready).

    The build's primary reference when the document has a ``stability`` section (``built_ms`` is its
    median at the build's last checkpoint); for an older document, the uniform network of a middle op,
    priced by the table itself (an in-context table's uniform networks add up to their measured time)."""
    spec = TableSpec.from_fields(doc)
    ref = (doc.get("stability") or {}).get("reference")
    if ref:
        name, ops, built, source = ref["name"], list(ref["ops"]), float(ref["built_ms"]), "build checkpoint"
    else:
        ops = uniform_ops(spec)[2]
        name, built, source = f"uniform-{ops[0]}", LutTable.from_document(doc).predict(spec.arch(ops)), "table sum"
    return {
        "name": name,
        "ops": ops,
        "built_ms": built,
        "source": source,
        "backend": doc["backend"],
        "lut_id": doc.get("id"),
        "device_id": (doc.get("device") or {}).get("id"),
        "table": spec.as_fields(space_by_name=True),
    }


def drift_now(
    client: Any, source: dict[str, Any], archs: list[list[str]] | None = None, budget: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Re-time the table's reference network on the agent now: how far the machine moved since the build.

    ``source`` is a LUT document or its ``drift_reference``. ``archs`` (op lists of the same table) are
    timed in the same interleaved networks job, so they and the reference see the same machine.
    Returns ``{"reference", "built_ms", "now_ms", "factor", "clock", "latencies"}``: ``factor`` = now /
    built, the correction a prediction of the table needs to match the machine as it is now
    (``latencies`` are those of ``archs``, in order). The one function behind the drift the demo, the
    search summary and ``effpose lut validate`` report."""
    ref = source if "entries" not in source else drift_reference(source)
    spec = TableSpec.from_fields(ref["table"])
    archs = list(archs or [])
    budget = budget if budget is not None else network_budget(spec.batch)
    result = client.measure_networks(spec, [*archs, ref["ops"]], ref["backend"], budget=budget, progress=False)
    now_ms = float(result["latencies"][-1]["median_ms"])
    return {
        "reference": ref["name"],
        "built_ms": round(ref["built_ms"], 4),
        "now_ms": round(now_ms, 4),
        "factor": round(now_ms / ref["built_ms"], 4) if ref["built_ms"] > 0 else 1.0,
        "source": ref["source"],
        "clock": result["clock"],
        "latencies": result["latencies"][:-1],
    }


def measure_with_drift(
    client: Any, spec: TableSpec, archs: list[list[str]], backend: str, reference: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Latencies of ``archs`` on the agent (``measure_networks``' result) and, when ``reference`` (a
    ``drift_reference``) was built on this agent's device, the drift since that build (``drift_now``),
    timed in the same job; None for the drift otherwise (another device's table says nothing of this one)."""
    if reference is not None and reference.get("device_id") == client.device().get("id"):
        drift = drift_now(client, reference, archs)
        return {"clock": drift["clock"], "latencies": drift.pop("latencies")}, drift
    return client.measure_networks(spec, archs, backend, progress=False), None


def drift_words(drift: dict[str, Any]) -> str:
    """One line on what ``drift_now`` found, for people: raw predictions vs drift-corrected ones."""
    change = drift["factor"] - 1.0
    pace = "slower" if change > 0 else "faster"
    return (
        f"reference {drift['reference']}: {drift['built_ms']:.2f} ms when the table was built, "
        f"{drift['now_ms']:.2f} ms now ({abs(change):.1%} {pace}); 'corrected' predictions are the table's "
        f"raw sums x {drift['factor']:.3f}"
    )


def predictions(doc: dict[str, Any], archs: list[list[str]]) -> list[float]:
    """The table's raw sums for op lists of its own space and head."""
    table = LutTable.from_document(doc)
    spec = table.spec
    return [table.predict(spec.arch(ops)) for ops in archs]


def score_networks(archs: list[list[str]], predicted: list[float], latencies: list[dict[str, Any]]) -> dict[str, Any]:
    """``fidelity`` of predicted against measured medians, plus the per-network pairs (``archs``)."""
    measured = [float(lat["median_ms"]) for lat in latencies]
    return {
        **fidelity(predicted, measured),
        "archs": [
            {"ops": ops, "predicted_ms": round(p, 4), "measured_ms": round(m, 4), "iqr_ms": round(lat["iqr_ms"], 4)}
            for ops, p, m, lat in zip(archs, predicted, measured, latencies, strict=True)
        ],
    }


def validate_on_agent(
    client: Any, spec: TableSpec, backend: str, samples: int = 50, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """LUT fidelity on an agent (``effpose lut validate`` and benchmarks/lut_fidelity.py): get the LUT of
    ``spec``, time ``samples`` random legal architectures end to end on the agent (interleaved, one job),
    score the LUT sums against them. ``client`` is a ``lut_service.client.AgentClient``. The LUT build
    never sees these architectures, so every one is held out.

    The same job also times one uniform network per MBConv op (every layer that op: the networks the
    agent's in-context build measured). Their measured/predicted ratio is the machine's *drift* since
    the LUT was built (load, frequency, memory traffic of other processes), reported as ``drift`` and as
    ``drift_corrected`` scores (predictions times that ratio); the build's own reference, re-timed in
    the same job (``drift_now``), is ``drift_now``. The headline scores never use either."""
    import numpy as np

    doc = client.request_lut(spec, backend, progress=progress)
    archs = random_archs(spec.space, samples, seed)
    references = uniform_ops(spec)
    now = drift_now(client, doc, archs + references, budget=network_budget(spec.batch))
    latencies = now.pop("latencies")
    predicted = predictions(doc, archs)
    ref_ratio = [
        lat["median_ms"] / p for p, lat in zip(predictions(doc, references), latencies[len(archs) :], strict=True)
    ]
    drift = float(np.median(ref_ratio))
    scored = score_networks(archs, predicted, latencies[: len(archs)])
    return {
        "backend": backend,
        "threads": spec.threads,
        "batch": spec.batch,
        "space": spec.space.name,
        "samples": len(archs),
        **{k: v for k, v in scored.items() if k != "archs"},
        "drift": drift - 1.0,
        "drift_corrected": fidelity(
            [p * drift for p in predicted], [lat["median_ms"] for lat in latencies[: len(archs)]]
        ),
        "drift_now": now,
        "drift_now_corrected": fidelity(
            [p * now["factor"] for p in predicted], [lat["median_ms"] for lat in latencies[: len(archs)]]
        ),
        "clock": now["clock"],
        "lut_id": doc["id"],
        "stability": doc.get("stability"),
        "build_fidelity": {k: v for k, v in (doc.get("fidelity") or {}).items() if k != "archs"} or None,
        "archs": scored["archs"],
    }
