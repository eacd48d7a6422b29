"""One LUT build job: its entries, the stability guard around them, held-out fidelity, the document.

The profiling worker (``lut_service.worker``) hands each ``kind="lut"`` job to ``LutBuild``. A build:

1. times the per-call overhead entry alone (every other entry is stored net of it);
2. prepares its reference networks: uniform networks of the table (``REFERENCE_OPS``); on CPU
   backends they are the in-context pass's own networks, so no extra session is built;
3. times them (checkpoint ``start``), then measures the missing entries as one guarded part (in
   context: one pass over the uniform networks; alone: in thirds), each part measured again while the
   references moved more than ``stability_threshold`` across it (``stability.StabilityGuard``);
4. times ``fidelity_networks`` held-out random networks (another guarded part) and scores the stored
   table against them;
5. renders the document with ``stability``, ``fidelity`` and ``thread_advice``.

``job.result`` says what the build is doing (``phase``), how its entries were measured and how many fell
back to being timed alone, and at the end the stability verdict and fidelity summary. Entries are
committed as each part is accepted, so an agent stopped or killed mid-job resumes from the first part
with a missing key; a resumed job times its references and fidelity afresh.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from lut_service import crud
from lut_service.context import CONTEXT_BACKENDS, close_runners, context_nets, measure_parts, name_head, part_runners
from lut_service.db import session_scope
from lut_service.lut import fidelity, network_budget, random_archs, score_networks
from lut_service.models import Job, Lut
from lut_service.plan import PlannedEntry, plan_entries
from lut_service.settings import Budget
from lut_service.stability import Reference, StabilityGuard, Stopped, SystemWatch, advice_from_store, drift_between
from lut_service.timing import Runner, Timing, interleaved_samples, make_runner, measure, overhead_probe, timing_stats
from pose.space import MBCONV_OPS, TableSpec, arch_keys

log = logging.getLogger("lut_service.build")
T = TypeVar("T")

REFERENCE_OPS = (MBCONV_OPS[0], MBCONV_OPS[3], MBCONV_OPS[-1])  # cheapest, a middle one, the widest
FIDELITY_SEED = 12  # held-out networks of a build (validation uses seeds 0 and 1)
ALONE_PARTS = 3  # entries timed alone are guarded in this many parts


def reference_name(op: str) -> str:
    """A reference network's name (the uniform network of ``op``), in checkpoints and in-context totals alike."""
    return f"uniform-{op}"


class MeasurementTimeout(RuntimeError):
    """One entry (or one networks job) ran past its ``timeout_s``."""


def deadline_check(timeout_s: float, what: str = "measurement") -> Callable[[], None]:
    """A callable that raises ``MeasurementTimeout`` once ``timeout_s`` seconds have passed since now."""
    deadline = time.monotonic() + timeout_s

    def check() -> None:
        if time.monotonic() > deadline:
            raise MeasurementTimeout(
                f"{what} exceeded its timeout of {timeout_s:g} s (budget timeout_s, EFFPOSE_PROFILE_TIMEOUT_S)"
            )

    return check


def measure_entry(
    entry: PlannedEntry,
    backend: str,
    threads: int,
    budget: Budget,
    workdir: Path,
    stop: Callable[[], bool] | None = None,
    clock: str = "auto",
) -> Timing:
    """Build the entry's module from ``pose`` and time it (the overhead entry with the backend's probe).

    ``budget.timeout_s`` bounds the whole entry: it is checked after building and exporting and before
    every call of the op (outside the timed region), so a slow entry stops within one call of its limit.
    """
    check = deadline_check(budget.timeout_s)
    if entry.kind == "overhead":
        batch, _, h, w = entry.input_shape
        module, shape = overhead_probe(backend, batch, (h, w))
    else:
        module, shape = entry.build(), entry.input_shape
    check()
    runner = make_runner(backend, module, shape, threads, workdir, clock)
    try:
        check()

        def run(calls: int) -> float:
            check()
            return runner.run(calls)

        return measure(run, budget, stop)
    finally:
        runner.close()


def fidelity_budget(budget: Budget, batch: int) -> Budget:
    """The held-out networks' bounded budget: the rounds ``lut validate`` asks for at this batch (15 at
    batch 1, 5 above), at most 40, until IQR/median < 2 % or about 0.5 s per network."""
    rounds = (network_budget(batch) or {}).get("min_samples", budget.min_samples)
    return replace(
        budget, min_samples=rounds, max_samples=max(rounds, 40), target_rel_iqr=0.02, max_seconds=0.5,
        warmup_runs=max(1, min(budget.warmup_runs, 3)), warmup_s=min(budget.warmup_s, 0.05),
    )  # fmt: skip


class PassFailed(RuntimeError):
    """The in-context pass raised: its entries fall back to being timed alone (counted, logged)."""


@dataclass
class Table:
    """What one job builds: the LUT row's identity, read once at the start."""

    job_id: str
    lut_id: str
    device_id: str
    backend: str
    spec: TableSpec
    clock: str
    keys: list[str]


class LutBuild:
    """One run of one LUT job (``run``); ``stop()`` true means the worker is stopping."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        budget: Budget,
        stop: Callable[[], bool],
    ) -> None:
        self.factory, self.stop = factory, stop
        with session_scope(factory) as session:
            job = session.get(Job, job_id)
            lut = session.get(Lut, job.lut_id)
            request = dict(lut.request)
            self.table = Table(
                job_id, lut.id, lut.device_id, lut.backend, TableSpec.from_fields(request), request["clock"], lut.keys
            )
            self.have = {key: row.raw_median_ms for key, row in crud.stored_measurements(session, lut).items()}
            self.budget = budget.merged(job.budget)
            job.state, job.errors, job.done, job.total = "running", [], len(self.have), crud.build_steps(lut)
            job.result = {"phase": "starting", "methods": {}, "fallbacks": 0}
        self.reused = len(self.have)
        self.errors: dict[str, str] = {}  # key -> error of its last attempt
        self.methods: Counter[str] = Counter()
        self.fallbacks, self.fallback_reason = 0, None
        self.runners: list[Runner] = []
        self.context_runners: list[Runner] | None = None
        self.context_totals: dict[str, float] | None = None  # the reference networks as the in-context pass timed them
        self.workdir = Path(tempfile.mkdtemp(prefix="effpose-lut-"))
        self.watch = SystemWatch()
        self.guard: StabilityGuard | None = None
        self.context_error: str | None = None  # why the in-context pass's networks could not be built

    def error_list(self) -> list[dict[str, str]]:
        return [{"key": key, "error": error} for key, error in self.errors.items()]

    # -- the job ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Build the table; a stop leaves the job running (resumed at the next start)."""
        try:
            self._build()
        except Stopped:
            log.info("job %s stopped; it resumes at the next start", self.table.job_id)
        finally:
            close_runners(self.runners)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _build(self) -> None:
        entries = sorted(plan_entries(self.table.spec), key=lambda e: e.kind != "overhead")
        overhead_ms = self._overhead(entries[0])
        self.guard = self._guard()
        self.phase("timing the reference networks (checkpoint start)")
        self.guard.checkpoint("start")
        missing = [e for e in entries[1:] if e.key not in self.have]
        if missing and self.context_runners is not None:
            missing = self._in_context(missing, overhead_ms)
        elif missing and self.context_error is not None:
            self._fallback(len(missing), self.context_error)
        if missing:
            self._alone(missing, overhead_ms)
        self._finish(self._fidelity())

    def phase(self, text: str) -> None:
        """Say what the build is doing now (``job.result.phase``, polled by clients and the dashboard)."""
        self._check_stop()
        with session_scope(self.factory) as session:
            session.get(Job, self.table.job_id).result = self._result(text)

    def _result(self, phase: str, **final: Any) -> dict[str, Any]:
        return {
            "phase": phase,
            "methods": dict(self.methods),
            "fallbacks": self.fallbacks,
            "fallback_reason": self.fallback_reason,
            **final,
        }

    def _check_stop(self) -> None:
        if self.stop():
            raise Stopped

    # -- entries ----------------------------------------------------------------------------------
    def _overhead(self, entry: PlannedEntry) -> float:
        """The overhead entry's raw median: stored, or timed alone now and stored."""
        if entry.key in self.have:
            return self.have[entry.key]
        self.phase("timing the per-call overhead")
        timing = self._time_alone(entry)
        if timing is None:
            return 0.0
        self._store({entry.key: (timing, 0.0)}, "alone")
        return timing.median_ms

    def _time_alone(self, entry: PlannedEntry) -> Timing | None:
        """One entry timed alone; an error is recorded on the job (None) and the build goes on."""
        t = self.table
        try:
            timing = measure_entry(entry, t.backend, t.spec.threads, self.budget, self.workdir, self.stop, t.clock)
        except Exception as exc:  # a backend error or out of memory: record it, go on
            log.warning("measuring %s failed: %s", entry.key, traceback.format_exc(limit=3))
            self.errors[entry.key] = f"{type(exc).__name__}: {exc}"
            with session_scope(self.factory) as session:
                session.get(Job, t.job_id).errors = self.error_list()
            return None
        self._check_stop()  # possibly cut short: not stored
        return timing

    def _store(self, timings: dict[str, tuple[Timing, float]], method: str) -> None:
        """Entries (timing, overhead to subtract) and the job's progress, in one commit."""
        t = self.table
        how = crud.Provenance(t.clock, method)
        with session_scope(self.factory) as session:
            for key, (timing, subtract) in timings.items():
                crud.upsert_measurement(
                    session, device_id=t.device_id, backend=t.backend, key=key, batch=t.spec.batch,
                    dtype=t.spec.dtype, threads=t.spec.threads, timing=timing, overhead_ms=subtract, provenance=how,
                )  # fmt: skip
            session.get(Job, t.job_id).done += len(timings)
        self.methods[method] += len(timings)
        self.have.update({key: timing.median_ms for key, (timing, _) in timings.items()})

    def _in_context(self, missing: list[PlannedEntry], overhead_ms: float) -> list[PlannedEntry]:
        """Every missing entry from one guarded in-context pass; returns those it could not give."""
        try:
            timings = self.guard.guarded(
                "in-context entries",
                self._attempts("in-context pass", lambda: self._context_pass(overhead_ms)),
                inside=lambda: self.context_totals,
            )
        except PassFailed as exc:
            self._fallback(len(missing), str(exc))
            return missing
        self._store({e.key: (timings[e.key], 0.0) for e in missing if e.key in timings}, "in-context")
        rest = [e for e in missing if e.key not in timings]
        if rest:
            self._fallback(len(rest), "the in-context pass did not cover these keys")
        return rest

    def _context_pass(self, overhead_ms: float) -> dict[str, Timing]:
        """``context.measure_parts`` on the build's uniform networks, under 8x the entry timeout."""
        check = deadline_check(self.budget.timeout_s * 8, "in-context measurement")
        nets = context_nets(self.table.spec)
        totals: list[float] = []
        try:
            timings = measure_parts(
                self.table.backend, nets, self.context_runners, overhead_ms, self.budget,
                lambda: self.stop() or check() is not None, totals_ms=totals,
            )  # fmt: skip
        except Exception as exc:
            log.warning("in-context measurement failed, timing entries alone: %s", traceback.format_exc(limit=3))
            raise PassFailed(f"{type(exc).__name__}: {exc}") from exc
        if timings is None:
            raise Stopped
        # the reference networks as this pass timed them, for the guard (same names as its references)
        self.context_totals = {reference_name(net.op): ms for net, ms in zip(nets, totals, strict=True)}
        return name_head(timings, self.table.spec)

    def _fallback(self, count: int, reason: str) -> None:
        """Entries meant to be timed in context are timed alone instead: logged and counted, never silent."""
        log.warning("job %s: %d entries fall back to being timed alone: %s", self.table.job_id, count, reason)
        self.fallbacks += count
        self.fallback_reason = reason

    def _alone(self, missing: list[PlannedEntry], overhead_ms: float) -> None:
        """Entries timed one by one, in ``ALONE_PARTS`` guarded parts, each stored once accepted."""
        size = max(1, -(-len(missing) // ALONE_PARTS))
        for start in range(0, len(missing), size):
            part = missing[start : start + size]
            label = f"entries {start + 1}-{start + len(part)} of {len(missing)} alone"
            work = self._attempts(label, lambda part=part: self._time_part(part, overhead_ms))
            self._store(self.guard.guarded(label, work), "alone")

    def _time_part(self, part: list[PlannedEntry], overhead_ms: float) -> dict[str, tuple[Timing, float]]:
        out = {}
        for entry in part:
            timing = self._time_alone(entry)
            if timing is not None:
                out[entry.key] = (timing, overhead_ms)
        return out

    def _attempts(self, label: str, work: Callable[[], T]) -> Callable[[], T]:
        """``work`` that first says which attempt of ``label`` it is (``phase``)."""
        count = 0

        def attempt() -> T:
            nonlocal count
            count += 1
            self.phase(f"{label} (attempt {count})")
            return work()

        return attempt

    # -- references and fidelity --------------------------------------------------------------------
    def _guard(self) -> StabilityGuard:
        """The reference networks (the in-context pass's runners where there is one) and their guard."""
        self.phase("preparing the reference networks")
        t = self.table
        nets = context_nets(t.spec)
        wanted = [i for i, net in enumerate(nets) if net.op in REFERENCE_OPS]
        try:
            if t.backend in CONTEXT_BACKENDS and any(e not in self.have for e in t.keys):
                runners = part_runners(t.backend, nets, t.spec, self.workdir, t.clock, self.stop)
                if runners is None:
                    raise Stopped
                self.runners += runners
                self.context_runners = runners
                chosen = [runners[i] for i in wanted]
            else:
                chosen = [self._runner(nets[i].arch.ops) for i in wanted]
        except Stopped:
            raise
        except Exception as exc:
            log.warning("reference networks unavailable: %s", traceback.format_exc(limit=3))
            reason = f"the reference networks could not be built: {type(exc).__name__}: {exc}"
            if t.backend in CONTEXT_BACKENDS:
                self.context_error = f"the in-context networks could not be built: {type(exc).__name__}: {exc}"
            return StabilityGuard([], self.budget, self.stop, self.watch, unavailable=reason)
        refs = [
            Reference(reference_name(nets[i].op), list(nets[i].arch.ops), r.run)
            for i, r in zip(wanted, chosen, strict=True)
        ]
        return StabilityGuard(refs, self.budget, self.stop, self.watch)

    def _runner(self, ops: list[str]) -> Runner:
        from pose.models import PoseNet

        t = self.table
        model = PoseNet(t.spec.arch(ops), t.spec.joints)
        runner = make_runner(
            t.backend, model, (t.spec.batch, 3, *t.spec.input_hw), t.spec.threads, self.workdir, t.clock
        )
        self.runners.append(runner)
        return runner

    def _fidelity(self) -> dict[str, Any] | None:
        """Held-out random networks timed (a guarded part) and scored against the stored table."""
        count = int(self.budget.fidelity_networks)
        if count <= 0 or self.errors:
            self.guard.guarded("end", lambda: self.phase("timing the reference networks (checkpoint end)"))
            return None
        self.phase(f"preparing {count} held-out networks")
        archs = random_archs(self.table.spec.space, count, FIDELITY_SEED)
        runners = [self._runner(ops) for ops in archs]
        budget = fidelity_budget(self.budget, self.table.spec.batch)

        def timed() -> list[list[float]]:
            samples = interleaved_samples([r.run for r in runners], budget, self.stop)
            if samples is None:
                raise Stopped
            return samples

        samples = self.guard.guarded("held-out networks", self._attempts(f"timing {count} held-out networks", timed))
        close_runners(runners)
        self.runners = [r for r in self.runners if r not in runners]
        return self._score(archs, [vars(timing_stats(s)) for s in samples])

    def _score(self, archs: list[list[str]], latencies: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``fidelity`` section: scores, per-network pairs, and the references' drift from the table."""
        with session_scope(self.factory) as session:
            lut = session.get(Lut, self.table.lut_id)
            medians = {key: row.median_ms for key, row in crud.stored_measurements(session, lut).items()}
        spec = self.table.spec

        def predict(ops: list[str]) -> float:
            return sum(medians[k] for k in arch_keys(spec.arch(ops), spec))

        predicted = [predict(ops) for ops in archs]
        scored = score_networks(archs, predicted, latencies)
        section: dict[str, Any] = {"networks": len(archs), "seed": FIDELITY_SEED, "clock": self.table.clock}
        section |= {k: round(v, 4) if isinstance(v, float) else v for k, v in scored.items()}
        end = self.guard.last
        if end:
            refs = {r.name: predict(r.ops) for r in self.guard.references}
            drift = drift_between(refs, end)
            measured = [lat["median_ms"] for lat in latencies]
            section["drift"] = round(drift, 4)
            corrected = fidelity([p * (1 + drift) for p in predicted], measured)
            section["drift_corrected"] = {k: round(v, 4) for k, v in corrected.items()}
        return section

    # -- the document -----------------------------------------------------------------------------------
    def _finish(self, fidelity_section: dict[str, Any] | None) -> None:
        """Render and store the document with its sections; the job ends done, or failed with its errors."""
        self.phase("writing the document")
        stability = self.guard.section()
        stability["entries_reused"] = self.reused
        extra: dict[str, Any] = {"stability": stability}
        if fidelity_section is not None:
            extra["fidelity"] = fidelity_section
        with session_scope(self.factory) as session:
            job = session.get(Job, self.table.job_id)
            lut = session.get(Lut, self.table.lut_id)
            extra["thread_advice"] = self._advice(session, lut, stability)
            job.errors = self.error_list()
            document = crud.complete_document(session, lut, extra) if not self.errors else None
            summary = {k: v for k, v in (fidelity_section or {}).items() if k not in ("archs", "drift_corrected")}
            job.result = self._result("done", stability=_stability_summary(stability), fidelity=summary or None)
            if document is not None:
                job.done = job.total
            job.state = "done" if document is not None else "failed"

    def _advice(self, session: Session, lut: Lut, stability: dict[str, Any]) -> list[dict[str, Any]]:
        """Thread advice for this table's backend, batch, input and space, this build's references included."""
        current = {**lut.request, "threads": lut.threads, "clock": self.table.clock, "stability": stability}
        advice = advice_from_store(session, self.table.device_id, [current])
        same = {"backend": lut.backend, "batch": lut.batch, "input": list(lut.request["input"])}
        return [a for a in advice if all(a[k] == v for k, v in same.items())]


def _stability_summary(stability: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "drift", "start_to_end", "threshold", "retries", "steal_share", "load_average", "reason")
    return {k: stability[k] for k in keep if k in stability}
