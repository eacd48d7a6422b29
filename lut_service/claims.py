"""Which agent process runs which job, when several agents share one store (docs/design.md §3, job states).

- A worker claims only its own device's jobs, in one short transaction: a compare-and-set on the job's
  state and holder, so of two processes trying at once exactly one wins. No lock is held after it, and
  none across a measurement.
- The claim names its holder (``agent_id``: host, pid and a nonce) and the holder's ``Heartbeat`` thread
  refreshes ``heartbeat_at`` while it runs the job. A ``running`` job is taken over when its holder is
  dead: on the same host, when that pid is gone (or is ours: a restarted container reuses pids);
  anywhere, when the heartbeat is older than ``stale_s`` (``EFFPOSE_JOB_STALE_S``).
- ``attempts`` counts the starts of a job since it last made progress (stored entries of its table;
  a networks job stores none). A job started ``MAX_ATTEMPTS`` times without progress that is found
  ``running`` again has killed its agent each time: it ends ``failed`` with the reason, its stored
  entries stay, and the agent goes on with the other jobs instead of crash-looping.
- A graceful stop gives the claim and the attempt back (``release``): the job is resumed first at the
  next start of any agent of the device.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lut_service import crud
from lut_service.db import session_scope
from lut_service.models import ACTIVE_STATES, Job, Lut, utcnow

MAX_ATTEMPTS = 3
log = logging.getLogger("lut_service.claims")


def agent_id() -> str:
    """This process's name in ``jobs.claimed_by``: ``host:pid:nonce``."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_alive(claimed_by: str | None, heartbeat_at: datetime | None, stale_s: float, me: str) -> bool:
    """Whether the process that claimed a job may still be running it."""
    if not claimed_by:
        return False
    if claimed_by == me:
        return True
    if heartbeat_at is None:
        return False
    if heartbeat_at.tzinfo is None:  # SQLite returns the stored UTC time without its offset
        heartbeat_at = heartbeat_at.replace(tzinfo=UTC)
    if utcnow() - heartbeat_at > timedelta(seconds=stale_s):
        return False
    host, _, rest = claimed_by.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname()[:80] and pid_text.isdigit():
        pid = int(pid_text)
        return pid != os.getpid() and _pid_alive(pid)
    return True


def _stored_entries(session: Session, job: Job) -> int:
    if job.kind != "lut" or job.lut_id is None:
        return 0
    lut = session.get(Lut, job.lut_id)
    return 0 if lut is None else len(crud.stored_measurements(session, lut))


def _holder_is(claimed_by: str | None):  # noqa: ANN202 - a SQL expression
    return Job.claimed_by.is_(None) if claimed_by is None else Job.claimed_by == claimed_by


def _give_up(session: Session, job: Job, stored: int, me: str) -> bool:
    """Mark a crash-looping job failed (compare-and-set); True if this call did it."""
    reason = (
        f"the agent stopped {job.attempts} times while running this job without storing a new entry (last run "
        f"by {job.claimed_by}), so it is not started again; the {stored} entries stored are kept, and a new "
        "request retries the rest"
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "running", _holder_is(job.claimed_by), Job.attempts == job.attempts)
        .values(state="failed", claimed_by=me, errors=[*job.errors, {"key": "job", "error": reason}])
    )
    return result.rowcount == 1


def _take(factory: sessionmaker[Session], job_id: str, me: str) -> bool:
    """Claim one job unless another process changed it since it was read; a crash-looping job fails."""
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in ACTIVE_STATES:
            return False
        stored = _stored_entries(session, job)
        progressed = job.state == "queued" or stored > job.stored_at_claim
        attempts = 1 if progressed else job.attempts + 1
        if attempts > MAX_ATTEMPTS:
            if _give_up(session, job, stored, me):
                log.error("job %s failed: started %d times without progress", job_id, job.attempts)
            return False
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == job.state, _holder_is(job.claimed_by), Job.attempts == job.attempts)
            .values(state="running", claimed_by=me, heartbeat_at=utcnow(), attempts=attempts, stored_at_claim=stored)
        )
        return result.rowcount == 1


def claim_next(factory: sessionmaker[Session], device_id: str, me: str, stale_s: float) -> str | None:
    """The id of the job this agent now holds: the device's oldest unfinished job whose holder is gone
    (a job left ``running`` first), else its oldest queued one; None when there is none."""
    with session_scope(factory) as session:
        rows = session.execute(
            select(Job.id, Job.state, Job.claimed_by, Job.heartbeat_at)
            .where(Job.device_id == device_id, Job.state.in_(ACTIVE_STATES))
            .order_by((Job.state == "running").desc(), Job.created_at, Job.id)
        ).all()
    for job_id, state, claimed_by, heartbeat_at in rows:
        if state == "running" and holder_alive(claimed_by, heartbeat_at, stale_s, me):
            continue
        if _take(factory, job_id, me):
            return job_id
    return None


def release(factory: sessionmaker[Session], job_id: str, me: str) -> None:
    """Give an unfinished job back at a graceful stop: no holder, and this start does not count."""
    with session_scope(factory) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.claimed_by == me, Job.state.in_(ACTIVE_STATES))
            .values(claimed_by=None, attempts=Job.attempts - 1)
        )


def beat(factory: sessionmaker[Session], job_id: str, me: str) -> bool:
    """Refresh the heartbeat of a held job; False when the job is no longer this process's to run."""
    with session_scope(factory) as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.claimed_by == me, Job.state.in_(ACTIVE_STATES))
            .values(heartbeat_at=utcnow())
        )
        if result.rowcount == 1:
            return True
        job = session.get(Job, job_id)
        return job is not None and job.state not in ACTIVE_STATES and job.claimed_by == me  # finished by us


class Heartbeat:
    """A thread that keeps the held job's claim alive and notices when another process took it over."""

    def __init__(
        self, factory: sessionmaker[Session], me: str, interval_s: float, held: Callable[[], str | None]
    ) -> None:
        self.factory, self.me, self.interval_s, self.held = factory, me, interval_s, held
        self.lost = threading.Event()  # set when the held job was taken over: the worker stops it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lut-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            job_id = self.held()
            if job_id is None:
                continue
            try:
                if not beat(self.factory, job_id, self.me):
                    log.warning("job %s was taken over by another agent process: stopping it here", job_id)
                    self.lost.set()
            except Exception:  # the store is briefly unreachable: try again at the next beat
                log.exception("heartbeat of job %s failed", job_id)
