"""Database operations shared by the routes and the worker (one place that writes rows)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from lut_service.models import ACTIVE_STATES, Device, Job, Lut, Measurement
from lut_service.timing import Timing

MEASUREMENT_FIELDS = ("median_ms", "p10_ms", "p90_ms", "iqr_ms", "samples", "raw_median_ms", "overhead_ms", "method")
METHODS = ("in-context", "alone")  # how an entry was measured (``Measurement.method``)


@dataclass(frozen=True)
class Provenance:
    """How an entry was measured: its clock, and ``in-context`` or ``alone`` (``METHODS``)."""

    clock: str = "wall"
    method: str | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown measurement method {self.method!r}; expected one of {', '.join(METHODS)}")


NO_BUILD = {
    "status": "not measured",
    "reason": "every entry was already stored by earlier builds of other tables; no build ran for this one",
}


# Test only: the agent kills itself (SIGKILL) when it is about to store this key, as a measurement that
# takes the process down would (a real out-of-memory kill). tests/lut_service/test_fleet.py uses it.
KILL_AT_KEY = "EFFPOSE_TEST_KILL_AT_KEY"


def _test_kill_hook(key: str) -> None:
    if os.environ.get(KILL_AT_KEY) == key:
        os.kill(os.getpid(), signal.SIGKILL)


def ensure_device(session: Session, device_id: str, fingerprint: dict[str, Any]) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, fingerprint=fingerprint)
        session.add(device)
        session.flush()
    return device


def upsert_measurement(
    session: Session,
    *,
    device_id: str,
    backend: str,
    key: str,
    batch: int,
    dtype: str,
    threads: int,
    timing: Timing,
    overhead_ms: float = 0.0,
    provenance: Provenance | None = None,
) -> None:
    """Insert or replace the row for (device, backend, key, batch, dtype, threads): never a duplicate.

    ``timing`` is the raw measurement; the stored median/p10/p90 have ``overhead_ms`` subtracted (>= 0).
    ``provenance`` is its clock and method (default: wall clock, method not stated).
    """
    _test_kill_hook(key)
    clock, method = (provenance or Provenance()).clock, (provenance or Provenance()).method
    values = {
        "device_id": device_id,
        "backend": backend,
        "key": key,
        "batch": batch,
        "dtype": dtype,
        "threads": threads,
        "clock": clock,
        "median_ms": max(timing.median_ms - overhead_ms, 0.0),
        "p10_ms": max(timing.p10_ms - overhead_ms, 0.0),
        "p90_ms": max(timing.p90_ms - overhead_ms, 0.0),
        "iqr_ms": timing.iqr_ms,
        "samples": timing.samples,
        "raw_median_ms": timing.median_ms,
        "overhead_ms": overhead_ms,
        "method": method,
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite_insert if dialect == "sqlite" else pg_insert
        stmt = insert(Measurement).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["device_id", "backend", "key", "batch", "dtype", "threads", "clock"],
            set_={name: stmt.excluded[name] for name in MEASUREMENT_FIELDS},
        )
        session.execute(stmt)
        return
    row = session.scalar(
        select(Measurement).filter_by(
            device_id=device_id, backend=backend, key=key, batch=batch, dtype=dtype, threads=threads, clock=clock
        )
    )
    if row is None:
        session.add(Measurement(**values))
    else:
        for name in MEASUREMENT_FIELDS:
            setattr(row, name, values[name])
    session.flush()


def stored_measurements(session: Session, lut: Lut) -> dict[str, Measurement]:
    """Rows already measured for ``lut``'s keys, by key."""
    keys = set(lut.keys)
    rows = session.scalars(
        select(Measurement).filter_by(
            device_id=lut.device_id,
            backend=lut.backend,
            batch=lut.batch,
            dtype=lut.dtype,
            threads=lut.threads,
            clock=lut.request["clock"],
        )
    )
    return {row.key: row for row in rows if row.key in keys}


def lut_id_for(device_id: str, normalized: dict[str, Any]) -> str:
    """Deterministic id: identical requests on the same device get the same LUT."""
    blob = json.dumps({"device": device_id, **normalized}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def get_or_create_lut(
    session: Session, lut_id: str, device_id: str, normalized: dict[str, Any], keys: list[str]
) -> Lut:
    lut = session.get(Lut, lut_id)
    if lut is None:
        lut = Lut(
            id=lut_id,
            device_id=device_id,
            backend=normalized["backend"],
            batch=normalized["batch"],
            dtype=normalized["dtype"],
            threads=normalized["threads"],
            request=normalized,
            keys=keys,
        )
        session.add(lut)
        session.flush()
    return lut


def render_document(
    lut: Lut, device: Device, rows: dict[str, Measurement], extra: dict[str, Any] | None = None
) -> tuple[bytes, str]:
    """The LUT document as canonical JSON bytes and its strong ETag (a hash of exactly those bytes).

    ``extra`` holds the build's ``stability``, ``fidelity`` and ``thread_advice`` sections; a table
    assembled from entries earlier builds stored gets ``NO_BUILD`` as its stability."""
    request = lut.request
    entries = []
    for key in lut.keys:
        row = rows[key]
        entries.append(
            {
                "key": key,
                "median_ms": round(row.median_ms, 6),
                "p10_ms": round(row.p10_ms, 6),
                "p90_ms": round(row.p90_ms, 6),
                "iqr_ms": round(row.iqr_ms, 6),
                "samples": row.samples,
                "method": row.method or "unknown",
                "clock": row.clock,
            }
        )
    overhead = next(key for key in lut.keys if key.startswith("overhead-"))
    document = {
        "id": lut.id,
        "device": {"id": device.id, **device.fingerprint},
        "backend": lut.backend,
        "batch": lut.batch,
        "dtype": lut.dtype,
        "threads": lut.threads,
        "input": list(request["input"]),
        "space": request["space"],
        "joints": request["joints"],
        "head_widths": list(request["head_widths"]),
        "head_style": request["head_style"],
        "sic": request["sic"],
        "clock": request["clock"],
        "overhead_key": overhead,
        "entries": entries,
        "stability": NO_BUILD,
        **(extra or {}),
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def complete_document(session: Session, lut: Lut, extra: dict[str, Any] | None = None) -> tuple[bytes, str] | None:
    """The stored document, or render and store it now if every key is measured; None while incomplete.

    ``extra``: the build's sections (``render_document``), given by the worker when its job ends. Without
    it, a table whose job is still active stays incomplete: its stability and fidelity checks run after
    the last entry is stored, and the document is rendered once, with them."""
    if lut.document is not None and lut.etag is not None:
        return lut.document.encode(), lut.etag
    if extra is None and active_job(session, lut.id) is not None:
        return None
    rows = stored_measurements(session, lut)
    if len(rows) < len(lut.keys):
        return None
    device = session.get(Device, lut.device_id)
    assert device is not None
    body, etag = render_document(lut, device, rows, extra)
    lut.document, lut.etag = body.decode(), etag
    session.flush()
    return body, etag


def build_steps(lut: Lut) -> int:
    """Steps of a build job: its entries, then the checks (stability guard, held-out fidelity) and the document."""
    return len(lut.keys) + 1


def active_job(session: Session, lut_id: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.lut_id == lut_id, Job.state.in_(ACTIVE_STATES)).order_by(Job.created_at).limit(1)
    )


def create_job(session: Session, lut: Lut, done: int, budget: dict[str, Any]) -> Job:
    """A build of ``lut``: one step per entry, and a last one for its stability and fidelity checks."""
    job = Job(
        id=uuid.uuid4().hex, lut_id=lut.id, state="queued", done=done, total=build_steps(lut), errors=[], budget=budget
    )
    job.device_id = lut.device_id  # only that device's agent runs it
    session.add(job)
    session.flush()
    return job


def create_networks_job(session: Session, device_id: str, payload: dict[str, Any], budget: dict[str, Any]) -> Job:
    """Time whole networks on ``device_id`` (only that device's agent runs it)."""
    job = Job(
        id=uuid.uuid4().hex,
        kind="networks",
        device_id=device_id,
        lut_id=None,
        state="queued",
        done=0,
        total=len(payload["archs"]) + 1,
        errors=[],
        budget=budget,
        payload=payload,
    )
    session.add(job)
    session.flush()
    return job


def list_devices(session: Session) -> list[Device]:
    """Every device with rows in this store (one with a private SQLite file, many with a fleet store)."""
    return list(session.scalars(select(Device).order_by(Device.created_at, Device.id)))


def list_luts(
    session: Session,
    *,
    device_id: str | None = None,
    backend: str | None = None,
    batch: int | None = None,
    threads: int | None = None,
    limit: int = 1000,
) -> list[Lut]:
    """Stored tables, newest first, optionally filtered (the dashboard's table list)."""
    query = select(Lut)
    filters = ((Lut.device_id, device_id), (Lut.backend, backend), (Lut.batch, batch), (Lut.threads, threads))
    for column, value in filters:
        if value is not None:
            query = query.where(column == value)
    return list(session.scalars(query.order_by(Lut.created_at.desc(), Lut.id).limit(limit)))


def list_jobs(session: Session, *, lut_id: str | None = None, limit: int = 200) -> list[Job]:
    """Jobs, unfinished ones first (oldest first, the worker's order), then finished ones newest first."""
    query = select(Job) if lut_id is None else select(Job).where(Job.lut_id == lut_id)
    active = Job.state.in_(ACTIVE_STATES)
    jobs = list(session.scalars(query.order_by(active.desc(), Job.created_at.desc(), Job.id).limit(limit)))
    unfinished = [job for job in jobs if job.state in ACTIVE_STATES][::-1]
    return unfinished + jobs[len(unfinished) :]
