"""The single profiling worker: one thread per agent, fed from the jobs table.

Only one measurement runs at a time (two would disturb each other's timings). Each entry is committed
as soon as it is measured, so an agent stopped or killed mid-job resumes from the first missing key.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from lut_service import crud
from lut_service.context import CONTEXT_BACKENDS, context_lut
from lut_service.db import session_scope
from lut_service.models import Job, Lut
from lut_service.plan import PlannedEntry, plan_entries
from lut_service.settings import Budget
from lut_service.timing import (
    Timing,
    interleaved_samples,
    make_runner,
    measure,
    overhead_probe,
    timing_stats,
    tune_allocator,
)
from pose.space import TableSpec

log = logging.getLogger("lut_service.worker")


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


class Worker:
    def __init__(self, factory: sessionmaker[Session], budget: Budget, poll_interval_s: float = 1.0) -> None:
        self.factory = factory
        self.budget = budget
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        tune_allocator()  # deterministic malloc for torch-cpu timings (timing.ALLOCATOR_SETTINGS)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lut-profiler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with session_scope(self.factory) as session:
                    job = crud.next_job(session)
                    job_id = job.id if job is not None else None
                if job_id is None:
                    self._wake.wait(self.poll_interval_s)
                    self._wake.clear()
                    continue
                try:
                    self.run_job(job_id)
                except Exception as exc:  # a job that cannot even start fails once, not forever
                    log.exception("job %s failed", job_id)
                    self._fail(job_id, exc)
            except Exception:  # keep the worker alive whatever happens (e.g. the database is locked)
                log.exception("profiling worker error")
                self._stop.wait(self.poll_interval_s)

    def _fail(self, job_id: str, exc: Exception) -> None:
        with session_scope(self.factory) as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.errors = [*job.errors, {"key": "job", "error": f"{type(exc).__name__}: {exc}"}]
                job.state = "failed"

    # -- one job --------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> None:
        with session_scope(self.factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            kind = job.kind
        if kind == "networks":
            self.run_networks_job(job_id)
        else:
            self.run_lut_job(job_id)

    def run_lut_job(self, job_id: str) -> None:
        with session_scope(self.factory) as session:
            job = session.get(Job, job_id)
            assert job is not None
            lut = session.get(Lut, job.lut_id)
            assert lut is not None
            request = dict(lut.request)
            device_id, backend, batch, dtype, threads = lut.device_id, lut.backend, lut.batch, lut.dtype, lut.threads
            clock = request["clock"]
            stored = crud.stored_measurements(session, lut)
            have = {key: row.raw_median_ms for key, row in stored.items()}
            job.state, job.errors, job.done, job.total = "running", [], len(stored), len(lut.keys)
            budget = self.budget.merged(job.budget)
        self.current_job = job_id
        spec = TableSpec.from_fields(request)
        entries = plan_entries(spec)
        errors: list[dict[str, str]] = []
        overhead_ms = 0.0
        context: dict[str, Timing] | None = None  # CPU backends: every key timed inside whole networks
        workdir = Path(tempfile.mkdtemp(prefix="effpose-lut-"))
        try:
            # The overhead entry first: every other entry is stored with it subtracted.
            entries.sort(key=lambda e: e.kind != "overhead")
            for entry in entries:
                if self._stop.is_set():
                    return  # the job stays 'running' and is resumed first at the next start
                if entry.key in have:
                    if entry.kind == "overhead":
                        overhead_ms = have[entry.key]
                    continue
                if context is None and entry.kind != "overhead" and backend in CONTEXT_BACKENDS:
                    context = self._measure_in_context(spec, backend, overhead_ms, budget, workdir, clock)
                    if context is None:
                        return  # stopping: resumed at the next start
                try:
                    if context and entry.key in context:
                        timing = context[entry.key]  # already net of the overhead: nothing to subtract
                    else:
                        timing = measure_entry(entry, backend, threads, budget, workdir, self._stop.is_set, clock)
                except Exception as exc:  # a backend error or out of memory: record it, go on
                    log.warning("measuring %s failed: %s", entry.key, traceback.format_exc(limit=3))
                    errors.append({"key": entry.key, "error": f"{type(exc).__name__}: {exc}"})
                    with session_scope(self.factory) as session:
                        session.get(Job, job_id).errors = list(errors)
                    continue
                if self._stop.is_set():
                    return  # possibly cut short: do not store it
                subtract = 0.0 if entry.kind == "overhead" or (context and entry.key in context) else overhead_ms
                with session_scope(self.factory) as session:  # the entry and the progress in one commit
                    crud.upsert_measurement(
                        session,
                        device_id=device_id,
                        backend=backend,
                        key=entry.key,
                        batch=batch,
                        dtype=dtype,
                        threads=threads,
                        timing=timing,
                        overhead_ms=subtract,
                        clock=clock,
                    )
                    job = session.get(Job, job_id)
                    job.done += 1
                if entry.kind == "overhead":
                    overhead_ms = timing.median_ms
            with session_scope(self.factory) as session:
                job = session.get(Job, job_id)
                lut = session.get(Lut, job.lut_id)
                job.errors = errors
                document = crud.complete_document(session, lut)
                job.state = "done" if document is not None and not errors else "failed"
        finally:
            self.current_job = None
            shutil.rmtree(workdir, ignore_errors=True)

    def _measure_in_context(
        self, spec: TableSpec, backend: str, overhead_ms: float, budget: Budget, workdir: Path, clock: str
    ) -> dict[str, Timing] | None:
        """All stem, head and layer entries of ``spec`` timed in context (``lut_service.context``);
        ``{}`` (each entry then timed on its own) if that fails, None when stopping."""
        check = deadline_check(budget.timeout_s * 8, "in-context measurement")
        try:
            return context_lut(
                backend, spec, overhead_ms, budget, workdir, clock, lambda: self._stop.is_set() or check() is not None
            )
        except Exception:
            log.warning("in-context measurement failed, timing entries alone: %s", traceback.format_exc(limit=3))
            return {}

    def run_networks_job(self, job_id: str) -> None:
        """Time whole networks round-robin, so drifting machine load hits every network alike."""
        with session_scope(self.factory) as session:
            job = session.get(Job, job_id)
            payload = dict(job.payload or {})
            job.state, job.errors, job.done, job.result = "running", [], 0, None
            budget = self.budget.merged(job.budget)
        self.current_job = job_id
        workdir = Path(tempfile.mkdtemp(prefix="effpose-net-"))
        runners: list = []
        check = deadline_check(budget.timeout_s * len(payload["archs"]), "networks job")
        try:
            try:
                runners = self._prepare_networks(job_id, payload, workdir, check)
                if runners is None:
                    return  # stopping: the job is resumed (from scratch) at the next start
                runs = [_checked(r.run, check) for r in runners]
                samples = interleaved_samples(runs, budget, self._stop.is_set)
            except Exception as exc:
                log.warning("networks job %s failed: %s", job_id, traceback.format_exc(limit=3))
                with session_scope(self.factory) as session:
                    job = session.get(Job, job_id)
                    job.errors = [{"key": "networks", "error": f"{type(exc).__name__}: {exc}"}]
                    job.state = "failed"
                return
            if samples is None:
                return
            latencies = [vars(timing_stats(values)) for values in samples]
            with session_scope(self.factory) as session:
                job = session.get(Job, job_id)
                job.result = {"clock": payload["clock"], "latencies": latencies}
                job.done = job.total
                job.state = "done"
        finally:
            for runner in runners or []:
                runner.close()
            self.current_job = None
            shutil.rmtree(workdir, ignore_errors=True)

    def _prepare_networks(
        self, job_id: str, payload: dict, workdir: Path, check: Callable[[], None] | None = None
    ) -> list | None:
        from pose.models import PoseNet

        spec = TableSpec.from_fields(payload)
        shape = (spec.batch, 3, *spec.input_hw)
        runners = []
        try:
            for i, ops in enumerate(payload["archs"]):
                if self._stop.is_set():
                    for runner in runners:
                        runner.close()
                    return None
                model = PoseNet(spec.arch(ops), spec.joints)
                runners.append(make_runner(payload["backend"], model, shape, spec.threads, workdir, payload["clock"]))
                if check is not None:
                    check()
                with session_scope(self.factory) as session:
                    session.get(Job, job_id).done = i + 1
        except BaseException:
            for runner in runners:  # release the sessions built so far (out of memory, timeout)
                runner.close()
            raise
        return runners


def _checked(run: Callable[[int], float], check: Callable[[], None]) -> Callable[[int], float]:
    def checked(calls: int) -> float:
        check()
        return run(calls)

    return checked
