"""ORM tables: devices, measurements (one row per device/backend/key/batch/dtype/threads), LUTs and jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ACTIVE_STATES = ("queued", "running")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Device(Base):
    """A machine + software combination; ``id`` is a hash of the fingerprint, so any change gives a new id."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fingerprint: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Measurement(Base):
    """One timed LUT entry. Medians of ops are stored with the per-call overhead already subtracted."""

    __tablename__ = "measurements"
    # ``clock`` (thread-cpu, wall, cuda-events) is part of the identity: values timed by different clocks
    # never mix in one table.
    __table_args__ = (
        UniqueConstraint("device_id", "backend", "key", "batch", "dtype", "threads", "clock", name="uq_entry"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    backend: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(400))
    batch: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    threads: Mapped[int] = mapped_column(Integer)
    clock: Mapped[str] = mapped_column(String(16), default="wall")
    median_ms: Mapped[float] = mapped_column(Float)
    p10_ms: Mapped[float] = mapped_column(Float)
    p90_ms: Mapped[float] = mapped_column(Float)
    iqr_ms: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    raw_median_ms: Mapped[float] = mapped_column(Float)  # before the overhead was subtracted
    overhead_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # revision 0003: how it was measured, "in-context" or "alone" (None: stored before the revision said)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Lut(Base):
    """A requested table: the normalized request and its keys; ``document``/``etag`` once complete."""

    __tablename__ = "luts"
    # the fleet's table list (GET /v1/luts?device=&backend=) filters on these
    __table_args__ = (Index("ix_luts_device_backend", "device_id", "backend"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    backend: Mapped[str] = mapped_column(String(32))
    batch: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    threads: Mapped[int] = mapped_column(Integer)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    keys: Mapped[list[str]] = mapped_column(JSON)
    document: Mapped[str | None] = mapped_column(Text, nullable=True)
    etag: Mapped[str | None] = mapped_column(String(80), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """Work for the single profiling worker of one device: build a LUT (at most one active job per LUT),
    or time whole networks (``kind="networks"``, for validating a LUT against end-to-end latency).

    Several agents may share one store: a job belongs to ``device_id`` and only that device's agent
    claims it (``lut_service.claims``). ``claimed_by`` names the agent process running it and
    ``heartbeat_at`` says when it last showed life; ``attempts`` counts the starts of this job since it
    last stored an entry, so a job that keeps killing its agent ends ``failed`` instead of looping."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index(
            "uq_active_job_per_lut",
            "lut_id",
            unique=True,
            sqlite_where=text("state IN ('queued', 'running')"),
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
        Index("ix_jobs_device_state", "device_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="lut")  # "lut" or "networks"
    lut_id: Mapped[str | None] = mapped_column(ForeignKey("luts.id"), index=True, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    budget: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # a networks job's request
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # a networks job's latencies
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # revision 0002 (fleet): who runs it, and how often it was started without progress
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_by: Mapped[str | None] = mapped_column(String(120), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    stored_at_claim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
