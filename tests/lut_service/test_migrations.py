"""Schema migrations (Alembic, ``lut_service/migrations``) on a SQLite file and on a real PostgreSQL server.

Revision 0001 is the schema of the agent before migrations existed (git f8a371d). The tables below are
a frozen copy of that version's ``lut_service/models.py``: a database built from them is what today's
users have on disk, and it must upgrade to the head without losing a row.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from effpose.cli import main
from lut_service.db import DatabaseError, current, init_db, known_revisions, make_engine, upgrade
from lut_service.local import LocalAgent, free_port
from lut_service.models import Base
from pose.space import TableSpec

TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}

# -- the schema at f8a371d, frozen -----------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base0001(DeclarativeBase):
    pass


class Device0001(Base0001):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fingerprint: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Measurement0001(Base0001):
    __tablename__ = "measurements"
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
    raw_median_ms: Mapped[float] = mapped_column(Float)
    overhead_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lut0001(Base0001):
    __tablename__ = "luts"
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


class Job0001(Base0001):
    __tablename__ = "jobs"
    __table_args__ = (
        Index(
            "uq_active_job_per_lut",
            "lut_id",
            unique=True,
            sqlite_where=text("state IN ('queued', 'running')"),
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="lut")
    lut_id: Mapped[str | None] = mapped_column(ForeignKey("luts.id"), index=True, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    budget: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# -- helpers ---------------------------------------------------------------------------------------

TABLES = ("devices", "measurements", "luts", "jobs")


def schema_diff(engine, metadata) -> list:
    """What Alembic's autogenerate would change to make the database match ``metadata`` ([] = identical)."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def dump(engine, metadata) -> dict[str, list[tuple]]:
    """Every row of the four tables, in the columns ``metadata`` (a schema version) knows, by primary key."""
    rows = {}
    with engine.connect() as conn:
        for name in TABLES:
            table = metadata.tables[name]
            rows[name] = [tuple(row) for row in conn.execute(table.select().order_by(*table.primary_key.columns))]
    return rows


def fill_0001(engine) -> None:
    """Rows as today's agent writes them: two devices, measurements, a complete and an incomplete table, a
    done, a failed and a running LUT job and a finished networks job."""
    with Session(engine) as session:
        session.add_all(
            [
                Device0001(id="old-device", fingerprint={"cpu": "old"}, created_at=datetime(2024, 1, 1, tzinfo=UTC)),
                Device0001(id="device-a", fingerprint={"cpu": "a", "torch": "2.13.0"}),
            ]
        )
        session.flush()
        for i in range(5):
            session.add(
                Measurement0001(
                    device_id="device-a", backend="torch-cpu", key=f"k{i}", batch=1, dtype="float32", threads=1,
                    clock="thread-cpu", median_ms=1.0 + i, p10_ms=0.9 + i, p90_ms=1.1 + i, iqr_ms=0.1, samples=9,
                    raw_median_ms=1.5 + i, overhead_ms=0.5,
                )
            )  # fmt: skip
        request = {**TableSpec(TINY, (64, 64)).as_fields(), "backend": "torch-cpu", "clock": "thread-cpu"}
        session.add_all(
            [
                Lut0001(id="lut-complete", device_id="device-a", backend="torch-cpu", batch=1, dtype="float32",
                        threads=1, request=request, keys=["k0", "k1"], document='{"id":"lut-complete"}',
                        etag='"abc"'),
                Lut0001(id="lut-partial", device_id="device-a", backend="torch-cpu", batch=1, dtype="float32",
                        threads=1, request=request, keys=["k2", "k3", "k4", "k5"]),
            ]
        )  # fmt: skip
        session.flush()
        session.add_all(
            [
                Job0001(id="job-done", lut_id="lut-complete", state="done", done=2, total=2, errors=[], budget={}),
                Job0001(id="job-failed", lut_id="lut-partial", state="failed", done=3, total=4,
                        errors=[{"key": "k5", "error": "RuntimeError: out of memory"}], budget={"max_seconds": 0.1}),
                Job0001(id="job-running", lut_id="lut-partial", state="running", done=3, total=4, errors=[],
                        budget={}),
                Job0001(id="job-networks", kind="networks", lut_id=None, state="done", done=2, total=2, errors=[],
                        budget={}, payload={"archs": [["k3e3"]]}, result={"clock": "wall", "latencies": []}),
            ]
        )  # fmt: skip
        session.commit()


# -- tests -----------------------------------------------------------------------------------------


def test_revision_0001_is_the_schema_before_migrations(store_url):
    engine = make_engine(store_url)
    upgrade(engine, "0001")
    assert schema_diff(engine, Base0001.metadata) == []
    engine.dispose()


def test_head_is_the_models(store_url):
    """Every model change comes with its migration: the head revision builds exactly ``lut_service.models``."""
    engine = make_engine(store_url)
    revisions = upgrade(engine)
    assert revisions.before is None and revisions.after == revisions.head == known_revisions()[-1]
    assert known_revisions()[:2] == ["0001", "0002"]
    assert schema_diff(engine, Base.metadata) == []
    engine.dispose()


def test_upgrade_keeps_everything_stored_by_todays_schema(store_url):
    """A store written by today's main (create_all, no alembic_version) is stamped 0001, upgraded to the
    head, and keeps every row and value; jobs get their device from their table (networks jobs: the newest
    device), and a real agent then serves the stored document unchanged."""
    engine = make_engine(store_url)
    Base0001.metadata.create_all(engine)
    fill_0001(engine)
    before = dump(engine, Base0001.metadata)
    assert current(engine).after == "pre-migrations"
    revisions = upgrade(engine)
    assert revisions.before == "0001" and revisions.after == revisions.head
    assert dump(engine, Base0001.metadata) == before
    assert schema_diff(engine, Base.metadata) == []
    with engine.connect() as conn:
        jobs = dict(conn.execute(text("SELECT id, device_id FROM jobs")).all())
        attempts = set(conn.execute(text("SELECT attempts FROM jobs")).scalars())
    assert jobs == dict.fromkeys(["job-done", "job-failed", "job-running", "job-networks"], "device-a")
    assert attempts == {0}
    assert upgrade(engine).before == revisions.head  # idempotent
    engine.dispose()
    with LocalAgent(store_url, log_level="warning") as agent:
        response = httpx.get(f"{agent.url}/v1/luts/lut-complete", timeout=10)
        assert response.status_code == 200 and response.content == b'{"id":"lut-complete"}'
        assert response.headers["etag"] == '"abc"'
        listed = httpx.get(f"{agent.url}/v1/luts", params={"device": "device-a"}, timeout=10).json()
        assert {lut["id"]: lut["complete"] for lut in listed["luts"]} == {"lut-complete": True, "lut-partial": False}
        assert listed["luts"][0]["device"] == {"id": "device-a", "cpu": "a", "torch": "2.13.0"}
        job = httpx.get(f"{agent.url}/v1/jobs/job-running", timeout=10).json()
        assert job["state"] == "running" and job["device_id"] == "device-a" and job["attempts"] == 0
    # the agent (another device) never ran device-a's unfinished job
    with make_engine(store_url).connect() as conn:
        assert conn.execute(text("SELECT claimed_by, done FROM jobs WHERE id = 'job-running'")).one() == (None, 3)


def test_unknown_future_revision_is_refused_with_both_versions(store_url):
    engine = make_engine(store_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    with pytest.raises(DatabaseError) as refused:
        init_db(engine)
    message = str(refused.value)
    assert "'0999'" in message and f"head {known_revisions()[-1]}" in message and "0001" in message
    assert "newer effpose" in message
    engine.dispose()


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``effpose lut ARGS`` in this process: exit code, stdout, stderr."""
    code = main(["lut", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_db_commands_and_serve_refusals(tmp_path, capsys):
    """``lut db current|upgrade`` by hand; ``lut serve`` refuses a store of a future revision, one of an older
    schema, and an unreachable server, naming the URL without its password (exit 2, no traceback)."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    head = known_revisions()[-1]
    assert "empty" in run_cli(capsys, "db", "current", "--db", url)[1]
    code, out, _ = run_cli(capsys, "db", "upgrade", "--db", url)
    assert code == 0 and f"revision {head}" in out and f"empty -> {head}" in out
    assert run_cli(capsys, "db", "current", "--db", url)[1].strip().endswith(f"revision {head}")

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    code, _, err = run_cli(capsys, "serve", "--db", url, "--port", str(free_port()))
    assert code == 2 and "'ffff'" in err and f"head {head}" in err

    older = make_engine(f"sqlite:///{tmp_path / 'older.db'}")
    with older.begin() as conn:
        conn.execute(text("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, state VARCHAR(16))"))
    older.dispose()
    code, _, err = run_cli(capsys, "db", "upgrade", "--db", f"sqlite:///{tmp_path / 'older.db'}")
    assert code == 2 and "older than revision 0001" in err and "table devices" in err and "jobs.budget" in err

    port = free_port()  # nothing listens there
    secret_url = f"postgresql+psycopg://fleet:pw-not-shown@127.0.0.1:{port}/effpose"
    for args in (("serve", "--port", str(free_port())), ("db", "current")):
        code, out, err = run_cli(capsys, *args, "--db", secret_url)
        assert code == 2 and f"postgresql+psycopg://fleet:***@127.0.0.1:{port}/effpose" in err
        assert "pw-not-shown" not in err + out and "Traceback" not in err


def test_agent_start_on_an_unreachable_store_names_it_without_password(tmp_path):
    """The real ``effpose lut serve`` process exits 2 with one line naming the URL, password masked."""
    port = free_port()
    secret_url = f"postgresql+psycopg://fleet:pw-not-shown@127.0.0.1:{port}/effpose"
    done = subprocess.run(
        [sys.executable, "-m", "effpose", "lut", "serve", "--db", secret_url, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"fleet:***@127.0.0.1:{port}/effpose" in done.stderr and "pw-not-shown" not in done.stderr
