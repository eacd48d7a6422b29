"""The single profiling worker: one thread per agent, fed from the jobs table.

Only one measurement runs at a time (two would disturb each other's timings). A LUT job is a
``lut_service.build.LutBuild`` (entries, the stability guard around them, held-out fidelity); its entries
are committed part by part, so an agent stopped or killed mid-job resumes from the first missing key.
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

from lut_service import claims
from lut_service.build import LutBuild, MeasurementTimeout, deadline_check, measure_entry
from lut_service.db import session_scope
from lut_service.models import Job
from lut_service.settings import Budget
from lut_service.timing import interleaved_samples, make_runner, timing_stats, tune_allocator
from pose.space import TableSpec

__all__ = ["MeasurementTimeout", "Worker", "deadline_check", "measure_entry"]

log = logging.getLogger("lut_service.worker")


class Worker:
    """The profiling thread of one device's agent: it runs only that device's jobs, claimed one at a time
    (``lut_service.claims``), so several agents can share one store."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        budget: Budget,
        poll_interval_s: float = 1.0,
        *,
        device_id: str,
        stale_s: float = 60.0,
    ) -> None:
        self.factory = factory
        self.budget = budget
        self.poll_interval_s = poll_interval_s
        self.device_id = device_id
        self.stale_s = stale_s  # a claim whose heartbeat is older than this may be taken over
        self.agent_id = claims.agent_id()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None
        self.claimed: str | None = None  # the job this process holds
        self.heartbeat = claims.Heartbeat(factory, self.agent_id, max(stale_s / 4, 0.05), lambda: self.claimed)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        tune_allocator()  # deterministic malloc for torch-cpu timings (timing.ALLOCATOR_SETTINGS)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lut-profiler", daemon=True)
        self._thread.start()
        self.heartbeat.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; the held job is given back unfinished and resumed at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.heartbeat.stop()
        if self.claimed is not None:  # a measurement still running past the timeout loses its claim here
            claims.release(self.factory, self.claimed, self.agent_id)

    def halted(self) -> bool:
        """Whether the current job must stop: the agent is stopping, or another process took the job over."""
        return self._stop.is_set() or self.heartbeat.lost.is_set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = claims.claim_next(self.factory, self.device_id, self.agent_id, self.stale_s)
                if job_id is None:
                    self._wake.wait(self.poll_interval_s)
                    self._wake.clear()
                    continue
                self.heartbeat.lost.clear()
                self.claimed = job_id
                try:
                    self.run_job(job_id)
                except Exception as exc:  # a job that cannot even start fails once, not forever
                    log.exception("job %s failed", job_id)
                    self._fail(job_id, exc)
                finally:
                    if self._stop.is_set():
                        claims.release(self.factory, job_id, self.agent_id)
                    self.claimed = None
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
        """Build a table (``lut_service.build.LutBuild``: entries, stability guard, held-out fidelity)."""
        self.current_job = job_id
        try:
            LutBuild(self.factory, job_id, self.budget, self.halted).run()
        finally:
            self.current_job = None

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
