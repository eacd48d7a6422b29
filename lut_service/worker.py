"""The single profiling worker: one thread per agent, fed from the jobs table.

Only one measurement runs at a time (two would disturb each other's timings). Each entry is committed
as soon as it is measured, so an agent stopped or killed mid-job resumes from the first missing key.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from lut_service import crud
from lut_service.db import session_scope
from lut_service.models import Job, Lut
from lut_service.plan import PlannedEntry, plan_entries
from lut_service.profilers import Timing, make_runner, measure, overhead_probe
from lut_service.settings import Budget
from pose.space import get_space

log = logging.getLogger("lut_service.worker")


def measure_entry(
    entry: PlannedEntry,
    backend: str,
    threads: int,
    budget: Budget,
    workdir: Path,
    stop: Callable[[], bool] | None = None,
    clock: str = "auto",
) -> Timing:
    """Build the entry's module from ``pose`` and time it (the overhead entry with the backend's probe)."""
    if entry.kind == "overhead":
        batch, _, h, w = entry.input_shape
        module, shape = overhead_probe(backend, batch, (h, w))
    else:
        module, shape = entry.build(), entry.input_shape
    runner = make_runner(backend, module, shape, threads, workdir, clock)
    try:
        return measure(runner.run, budget, stop)
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
                self.run_job(job_id)
            except Exception:  # keep the worker alive whatever one job does; the job records its error
                log.exception("profiling worker error")
                self._stop.wait(self.poll_interval_s)

    # -- one job --------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> None:
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
        space = get_space(request["space"])
        entries = plan_entries(
            space,
            tuple(request["input"]),
            batch,
            request["joints"],
            tuple(request["head_widths"]),
            request["head_style"],
            request["sic"],
        )
        errors: list[dict[str, str]] = []
        overhead_ms = 0.0
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
                try:
                    timing = measure_entry(entry, backend, threads, budget, workdir, self._stop.is_set, clock)
                except Exception as exc:  # a backend error or out of memory: record it, go on
                    log.warning("measuring %s failed: %s", entry.key, traceback.format_exc(limit=3))
                    errors.append({"key": entry.key, "error": f"{type(exc).__name__}: {exc}"})
                    with session_scope(self.factory) as session:
                        session.get(Job, job_id).errors = list(errors)
                    continue
                if self._stop.is_set():
                    return  # possibly cut short: do not store it
                subtract = 0.0 if entry.kind == "overhead" else overhead_ms
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
