"""How far a LUT build can be trusted: the stability guard, the system figures, and thread advice.

A table is a snapshot of one machine over a few minutes. On a shared or virtual machine that snapshot
can be taken during a slow spell (efficientpose-a on ORT, 1 thread, measured 14.3 ms and 28.1 ms an
hour apart here, with about 15 % of CPU time stolen by the hypervisor), and nothing in the entries
shows it. So every build times *reference networks* (the uniform networks of ``lut_service.context``)
at checkpoints: at its start, between its parts, and at its end. ``StabilityGuard.guarded`` runs one
part between two checkpoints and measures it again while the references moved more than the
threshold, at most ``retries`` times; a table whose machine would not hold still is stored with
``"status": "unstable"`` and the figures that say why. docs/design.md section 5 has the method.

- system figures: ``cpu_times`` (``/proc/stat``), ``SystemWatch`` (steal share and load average)
- references: ``Reference``, ``reference_budget``, ``time_references``, ``drift_between``
- the guard: ``StabilityGuard`` (``checkpoint``, ``guarded``, ``section``)
- ``thread_advice``: which thread count ran a reference network fastest, from what the agent stored
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from lut_service.settings import Budget
from lut_service.timing import interleaved_samples

T = TypeVar("T")

log = logging.getLogger("lut_service.stability")


class Stopped(Exception):
    """The worker is stopping: the job is left running and resumed at the next start."""


# --------------------------------------------------------------------------- system figures


def cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot from ``/proc/stat``; None where it is absent.

    total = user + nice + system + idle + iowait + irq + softirq + steal (guest time is inside user)."""
    try:
        with open(path) as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    values = [int(v) for v in fields[1:9]]
    return values[7], sum(values)


def load_average() -> float | None:
    """The 1-minute load average (``/proc/loadavg``), None where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


class SystemWatch:
    """The share of CPU time the hypervisor stole and the load average over a build.

    ``/proc/stat`` is read at the start and in ``figures``; the load average at every ``sample``."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.cpu0 = cpu_times()
        self.loads: list[float] = []
        self.sample()

    def sample(self) -> float | None:
        load = load_average()
        if load is not None:
            self.loads.append(load)
        return load

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def figures(self) -> dict[str, Any]:
        """``steal_share`` (fraction of all CPU time since the start, None without /proc/stat),
        ``load_average`` (mean and max of the 1-minute figure), ``cpus`` and ``seconds``."""
        self.sample()
        now = cpu_times()
        steal = None
        if self.cpu0 is not None and now is not None and now[1] > self.cpu0[1]:
            steal = round((now[0] - self.cpu0[0]) / (now[1] - self.cpu0[1]), 4)
        loads = self.loads or [float("nan")]
        return {
            "steal_share": steal,
            "load_average": {"mean": round(float(np.mean(loads)), 2), "max": round(float(np.max(loads)), 2)},
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "seconds": round(self.seconds(), 1),
        }


# --------------------------------------------------------------------------- references


@dataclass
class Reference:
    """One reference network: its name (``uniform-<op>``), op list, and a runner's ``run(calls)``."""

    name: str
    ops: list[str]
    run: Callable[[int], float]


def reference_budget(budget: Budget) -> Budget:
    """The references' own bounded budget, whatever the entries' budget says (only its warm-up is kept):
    5 to 25 interleaved rounds, until IQR/median < 2 % or about 0.5 s per reference. A sample lasts at
    least 20 ms: it must span several scheduler slices, or a competing process would not show in its
    median."""
    return Budget(
        warmup_runs=max(1, min(budget.warmup_runs, 3)),
        warmup_s=min(budget.warmup_s, 0.05),
        min_samples=5,
        max_samples=25,
        target_rel_iqr=0.02,
        max_seconds=0.5,
        min_sample_ms=20.0,
    )


def time_references(references: list[Reference], budget: Budget, stop: Callable[[], bool]) -> dict[str, float]:
    """Median ms of every reference, interleaved (``timing.interleaved_samples``); ``Stopped`` when stopping."""
    samples = interleaved_samples([r.run for r in references], reference_budget(budget), stop)
    if samples is None:
        raise Stopped
    return {r.name: float(np.median(s)) for r, s in zip(references, samples, strict=True)}


def drift_between(before: dict[str, float], after: dict[str, float]) -> float:
    """Median over the references of after/before - 1 (0 when they share none)."""
    ratios = [after[name] / before[name] for name in before if name in after and before[name] > 0]
    return float(np.median(ratios)) - 1.0 if ratios else 0.0


def _worst(*drifts: float) -> float:
    """The drift of largest magnitude, with its sign."""
    return max(drifts, key=abs)


def _part_drift(part: dict[str, Any]) -> float:
    """How far a part's references moved: across it, or between the checkpoints and inside it."""
    return max(abs(part["drift"]), abs(part.get("inside_drift", 0.0)))


# --------------------------------------------------------------------------- the guard


class StabilityGuard:
    """Reference timings at checkpoints around the parts of one build, and the verdict.

    Without references (none could be built) it records why, and every part runs once, unchecked."""

    def __init__(
        self,
        references: list[Reference],
        budget: Budget,
        stop: Callable[[], bool],
        watch: SystemWatch | None = None,
        unavailable: str | None = None,
    ) -> None:
        self.references = references
        self.budget = budget
        self.threshold = float(budget.stability_threshold)
        self.retries = int(budget.stability_retries)
        self.stop = stop
        self.watch = watch or SystemWatch()
        self.unavailable = unavailable if not references else None
        self.checkpoints: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []

    @property
    def last(self) -> dict[str, float] | None:
        return self.checkpoints[-1]["ms"] if self.checkpoints else None

    def checkpoint(self, label: str) -> dict[str, float] | None:
        """Time the references now (None without references); ``Stopped`` when stopping.

        References that cannot run (a whole network at the job's shape may not fit in memory where every
        single entry does) end the guard, not the build: it records why, and the rest runs unchecked."""
        if not self.references:
            return None
        try:
            ms = time_references(self.references, self.budget, self.stop)
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the references only ends the checks
            log.warning("reference networks failed at checkpoint %r, the build goes on unchecked: %s", label, exc)
            self.unavailable = f"the reference networks could not run ({label}): {type(exc).__name__}: {exc}"
            self.references = []
            return None
        self.checkpoints.append(
            {"label": label, "at_s": round(self.watch.seconds(), 2), "load_1m": self.watch.sample(), "ms": ms}
        )
        return ms

    def guarded(
        self,
        label: str,
        work: Callable[[], T],
        on_retry: Callable[[int], None] | None = None,
        inside: Callable[[], dict[str, float] | None] | None = None,
    ) -> T:
        """Run ``work()`` between two checkpoints; while the references moved more than the threshold
        across it, run it again (at most ``retries`` times; ``on_retry(attempt)`` first). The last
        attempt's result is returned whatever the verdict; ``parts`` records every attempt.

        ``inside()`` (after ``work``) gives the references' times as the part itself measured them, where
        it did (the in-context pass times the reference networks among its own): those must agree with
        the checkpoints too. A machine that switches between two speeds every few seconds (two vCPUs on
        one physical core or on two) can show the same speed at both checkpoints and another in between."""
        attempt = 0
        while True:
            before = self.last if self.last is not None else self.checkpoint("start")
            if before is None:  # no references, or they stopped running
                return work()
            result = work()
            during = inside() if inside is not None else None
            after = self.checkpoint(f"after {label}" + (f" (attempt {attempt + 1})" if attempt else ""))
            if after is None:
                return result
            record = {"part": label, "attempt": attempt + 1, "drift": round(drift_between(before, after), 4)}
            if during:
                record["inside_drift"] = round(_worst(drift_between(before, during), drift_between(after, during)), 4)
            ok = _part_drift(record) <= self.threshold
            self.parts.append({**record, "ok": ok})
            if ok or attempt >= self.retries:
                return result
            attempt += 1
            if on_retry is not None:
                on_retry(attempt + 1)

    def status(self) -> str:
        """``stable``, ``unstable`` (a part's final attempt moved beyond the threshold) or ``unchecked``."""
        if not self.references:
            return "unchecked"
        finals: dict[str, dict[str, Any]] = {}
        for part in self.parts:
            finals[part["part"]] = part
        return "stable" if all(part["ok"] for part in finals.values()) else "unstable"

    def section(self, resumed: bool = False) -> dict[str, Any]:
        """The document's ``stability``: verdict, drifts, checkpoints, references, steal and load."""
        first, last = (self.checkpoints[0]["ms"], self.checkpoints[-1]["ms"]) if self.checkpoints else ({}, {})
        finals = {part["part"]: part for part in self.parts}
        section: dict[str, Any] = {
            "status": self.status(),
            "drift": round(max((_part_drift(p) for p in finals.values()), default=0.0), 4),
            "start_to_end": round(drift_between(first, last), 4),
            "threshold": self.threshold,
            "retries": sum(1 for p in self.parts if p["attempt"] > 1),
            "max_retries": self.retries,
            **self.watch.figures(),
            "parts": self.parts,
            "checkpoints": self.checkpoints,
        }
        if self.references:
            section["references"] = [
                {"name": r.name, "ops": r.ops, "built_ms": round(last[r.name], 4)} for r in self.references
            ]
            section["reference"] = _primary(section["references"])
        if self.unavailable:
            section["reason"] = self.unavailable
        if resumed:
            section["resumed"] = True
        return section


def _primary(references: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference with the median built time: the one network use-time drift checks re-time."""
    ranked = sorted(references, key=lambda r: r["built_ms"])
    return ranked[(len(ranked) - 1) // 2]


def unstable_warning(stability: dict[str, Any] | None) -> str | None:
    """A plain-words warning for a table whose machine would not hold still (None when it did)."""
    if not isinstance(stability, dict) or stability.get("status") != "unstable":
        return None
    steal = stability.get("steal_share")
    load = (stability.get("load_average") or {}).get("mean")
    why = []
    if isinstance(steal, int | float):
        why.append(f"the hypervisor took {steal:.0%} of the CPU time")
    if isinstance(load, int | float):
        why.append(f"the load average was {load:.1f}")
    return (
        f"this table was built while the machine would not hold still: its reference networks moved by "
        f"{stability.get('drift', 0):.1%} within the build (more than the {stability.get('threshold', 0):.0%} "
        f"allowed, after {stability.get('retries', 0)} re-measurements)"
        + (f"; {' and '.join(why)}" if why else "")
        + ". Its latencies may be off by about that much; rebuild it on a quieter machine, or compare "
        "predictions with drift-corrected ones."
    )


# --------------------------------------------------------------------------- thread advice


def _table_group(fields: dict[str, Any]) -> str:
    """Which measurements are comparable across thread counts: backend, batch, input, space and head."""
    keep = ("backend", "batch", "dtype", "input", "space", "joints", "head_widths", "head_style", "sic")
    return json.dumps({k: fields.get(k) for k in keep}, sort_keys=True)


def _network_name(ops: list[str]) -> str:
    return f"uniform-{ops[0]}" if ops and len(set(ops)) == 1 else f"network {'-'.join(ops)[:40]}"


def _collect(documents: list[dict[str, Any]], networks: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict:
    """group -> network ops -> threads -> [(ms, clock)] from build references and networks jobs."""
    found: dict[str, dict[tuple[str, ...], dict[int, list[tuple[float, str]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for doc in documents:
        stability = doc.get("stability") or {}
        for ref in stability.get("references") or []:
            found[_table_group(doc)][tuple(ref["ops"])][int(doc["threads"])].append((ref["built_ms"], doc["clock"]))
    for payload, result in networks:
        for ops, latency in zip(payload.get("archs", []), (result or {}).get("latencies", []), strict=False):
            row = (float(latency["median_ms"]), str(result.get("clock")))
            found[_table_group(payload)][tuple(ops)][int(payload["threads"])].append(row)
    return found


def thread_advice(
    documents: list[dict[str, Any]], networks: list[tuple[dict[str, Any], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Per table group (backend, batch, input, space, head): the network measured at the most thread
    counts, its median ms per thread count, and the fastest count. From the references every build
    stores and the results of networks jobs (``lut validate``, the demo, the search): nothing is timed."""
    advice = []
    for group, nets in _collect(documents, networks).items():
        ops, by_threads = max(nets.items(), key=lambda item: (len(item[1]), item[0][0] == item[0][-1]))
        ms = {t: float(np.median([m for m, _ in rows])) for t, rows in sorted(by_threads.items())}
        fastest = min(ms, key=lambda t: ms[t])
        fields = json.loads(group)
        space = fields["space"].get("name") if isinstance(fields["space"], dict) else fields["space"]
        item = {
            "backend": fields["backend"],
            "batch": fields["batch"],
            "input": fields["input"],
            "space": space,
            "network": _network_name(list(ops)),
            "ms_by_threads": {str(t): round(v, 4) for t, v in ms.items()},
            "clock_by_threads": {str(t): sorted({c for _, c in by_threads[t]}) for t in ms},
            "fastest_threads": fastest if len(ms) > 1 else None,
        }
        item["advice"] = advice_text(item)
        advice.append(item)
    return sorted(advice, key=lambda a: (a["backend"], a["batch"], str(a["input"]), str(a["space"])))


def advice_from_store(
    session: Any, device_id: str, extra_documents: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``thread_advice`` from this device's stored tables and finished networks jobs (``extra_documents``:
    e.g. the build in progress, as a document-shaped dict with ``stability``)."""
    from lut_service import crud

    documents = [json.loads(lut.document) for lut in crud.list_luts(session, device_id=device_id) if lut.document]
    networks = [
        (job.payload, job.result)
        for job in crud.list_jobs(session, limit=1000)
        if job.kind == "networks" and job.state == "done" and job.payload and job.result
        and getattr(job, "device_id", device_id) in (device_id, None)
    ]  # fmt: skip
    return thread_advice(documents + list(extra_documents or []), networks)


def advice_text(item: dict[str, Any]) -> str:
    """One sentence: which thread count is fastest, by how much, or that only one count was measured."""
    ms = {int(t): v for t, v in item["ms_by_threads"].items()}
    where = f"{item['backend']}, batch {item['batch']}, {item['space']} space"
    if len(ms) < 2:
        ((threads, value),) = ms.items()
        return (
            f"{where}: only {threads} thread(s) measured on this device so far ({item['network']} {value:.2f} ms); "
            "build the table at another thread count to compare"
        )
    fastest = item["fastest_threads"]
    others = ", ".join(f"{t}: {v:.2f} ms" for t, v in ms.items() if t != fastest)
    return f"{where}: {fastest} thread(s) ran {item['network']} fastest on this device ({ms[fastest]:.2f} ms; {others})"


# --------------------------------------------------------------------------- words for people


def stability_line(stability: dict[str, Any] | None) -> str:
    """One line on how still the machine held during the build (``effpose lut show``, the search)."""
    if not isinstance(stability, dict):
        return "stability: not recorded (a table built before builds checked it)"
    status = stability.get("status", "?")
    if status in ("not measured", "unchecked"):
        return f"stability: {status} ({stability.get('reason', 'no reference networks')})"
    steal, load = stability.get("steal_share"), stability.get("load_average") or {}
    figures = [f"steal {steal:.1%} of CPU time" if isinstance(steal, int | float) else "steal not available"]
    if isinstance(load.get("mean"), int | float):
        figures.append(f"load average {load['mean']:.1f} (max {load.get('max', load['mean']):.1f})")
    return (
        f"stability: {status}: reference networks moved at most {stability.get('drift', 0):.1%} across a part of "
        f"the build (threshold {stability.get('threshold', 0):.0%}, {stability.get('retries', 0)} re-measurement(s)), "
        f"{stability.get('start_to_end', 0):+.1%} from start to end; {', '.join(figures)} over "
        f"{stability.get('seconds', 0):.0f} s"
    )


def fidelity_line(fidelity: dict[str, Any] | None) -> str:
    """One line on the held-out networks the build timed (``effpose lut show``, the search)."""
    if not isinstance(fidelity, dict) or "within_5pct" not in fidelity:
        return "fidelity: none shipped (built with fidelity_networks=0, or before builds timed held-out networks)"
    line = (
        f"fidelity ({fidelity.get('networks', '?')} held-out random networks timed by the build): within +-5% "
        f"{fidelity['within_5pct']:.0%}, +-10% {fidelity['within_10pct']:.0%}, MAPE {fidelity['mape']:.1%}, "
        f"bias {fidelity['bias']:+.1%}, Kendall tau {fidelity['kendall_tau']:.2f}"
    )
    if isinstance(fidelity.get("drift"), int | float):
        line += f"; reference drift at the end {fidelity['drift']:+.1%}"
    return line


def describe(doc: dict[str, Any]) -> list[str]:
    """What a user should know before trusting a table: stability, fidelity, methods, thread advice."""
    lines = [stability_line(doc.get("stability")), fidelity_line(doc.get("fidelity"))]
    methods = Counter(str(e.get("method") or "unknown") for e in doc.get("entries", []))
    lines.append("entries measured: " + ", ".join(f"{n} {m}" for m, n in sorted(methods.items())))
    lines += [f"threads: {item['advice']}" for item in doc.get("thread_advice") or []]
    warning = unstable_warning(doc.get("stability"))
    if warning:
        lines.append(f"WARNING: {warning}")
    return lines
