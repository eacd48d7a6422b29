"""SQLAlchemy engine, schema migrations and sessions.

Any SQLAlchemy URL works: a SQLite file (the embedded default; WAL, so readers never block the writer,
and a busy timeout) or PostgreSQL through psycopg 3 (``postgresql+psycopg://...``), the store a fleet
of agents shares. The schema is Alembic's (``lut_service/migrations``): ``upgrade`` brings any database
to the head revision, and ``init_db`` does so before handing out sessions.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 10_000
MIGRATIONS = "lut_service:migrations"
# Tables and columns of revision 0001: a database created before migrations existed (create_all, no
# alembic_version table) holds exactly these and is stamped 0001 before it is upgraded.
BASE_SCHEMA = {
    "devices": {"id", "fingerprint", "created_at"},
    "measurements": {"id", "device_id", "backend", "key", "batch", "dtype", "threads", "clock", "median_ms"},
    "luts": {"id", "device_id", "backend", "batch", "dtype", "threads", "request", "keys", "document", "etag"},
    "jobs": {"id", "kind", "lut_id", "state", "done", "total", "errors", "budget", "payload", "result"},
}
ADVISORY_LOCK = 0x6566_706F_7365  # "efpose": PostgreSQL advisory lock held while migrating


class DatabaseError(RuntimeError):
    """The database cannot be reached or its schema cannot be used; the message names the URL (no password)."""


def safe_url(url: str | URL) -> str:
    """The URL as text with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say so without echoing it (it may hold a password)
        return "<invalid database URL>"


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API connection
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Engine for any SQLAlchemy URL; for a SQLite file, create its directory and set the pragmas."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError for malformed URLs
        raise ValueError(f"invalid database URL {url!r}: {exc}") from exc
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def init_db(engine: Engine) -> sessionmaker[Session]:
    """Upgrade the schema to the head revision (``upgrade``) and return the session factory."""
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)


# -- migrations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revisions:
    """Where a database stands: its revision before and after an operation, and this code's head."""

    before: str | None
    after: str | None
    head: str


def _config(connection: Connection):  # noqa: ANN202 - alembic.config.Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def known_revisions() -> list[str]:
    """This code's revisions, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config(None))  # type: ignore[arg-type]
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


@contextmanager
def _connect(engine: Engine) -> Iterator[Connection]:
    """A connection, or ``DatabaseError`` naming the URL (password masked) when it cannot be opened."""
    try:
        connection = engine.connect()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        if engine.url.password:
            reason = reason.replace(str(engine.url.password), "***")
        raise DatabaseError(f"cannot open database {safe_url(engine.url)}: {reason}") from None
    try:
        yield connection
    finally:
        connection.close()


@contextmanager
def _migration_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    """One migrating process at a time: agents of a fleet may start together on one store."""
    if engine.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK})
            connection.commit()
        return
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    with open(f"{Path(database).expanduser()}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stored_revision(engine: Engine, connection: Connection, known: list[str]) -> str | None:
    """The database's revision; a store created before migrations is stamped 0001 first. A revision this
    code does not know (a newer effpose wrote it) or tables of an older schema -> ``DatabaseError``."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    current = MigrationContext.configure(connection).get_current_revision()
    connection.commit()
    if current is not None and current not in known:
        raise DatabaseError(
            f"database {safe_url(engine.url)} is at schema revision {current!r}, which this effpose does not "
            f"know (its revisions are {', '.join(known)}; head {known[-1]}): it was written by a newer effpose. "
            "Upgrade effpose, or point --db / EFFPOSE_DB_URL at another database"
        )
    if current is not None:
        return current
    tables = set(inspect(connection).get_table_names())
    ours = tables & set(BASE_SCHEMA)
    if not ours:
        return None
    missing = _missing_base_columns(connection, tables)
    if missing:
        raise DatabaseError(
            f"database {safe_url(engine.url)} holds agent tables of a schema older than revision {known[0]} "
            f"(missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); it cannot be upgraded: "
            "move it aside and let the agent create a new one"
        )
    connection.commit()
    command.stamp(_config(connection), known[0])
    connection.commit()
    return known[0]


def _missing_base_columns(connection: Connection, tables: set[str]) -> list[str]:
    """``table.column`` of revision 0001 that the database lacks."""
    missing = []
    for table, columns in BASE_SCHEMA.items():
        if table not in tables:
            missing.append(f"table {table}")
            continue
        present = {c["name"] for c in inspect(connection).get_columns(table)}
        missing += [f"{table}.{column}" for column in sorted(columns - present)]
    return missing


def upgrade(engine: Engine, revision: str = "head") -> Revisions:
    """Bring the database to ``revision`` (default the head), under a lock; returns before/after."""
    from alembic import command

    known = known_revisions()
    with _connect(engine) as connection, _migration_lock(engine, connection):
        before = _stored_revision(engine, connection, known)
        command.upgrade(_config(connection), revision)
        connection.commit()
        after = _revision_of(connection)
    return Revisions(before, after, known[-1])


def _revision_of(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    current = MigrationContext.configure(connection).get_current_revision()
    connection.commit()
    return current


def current(engine: Engine) -> Revisions:
    """The database's revision and this code's head, changing nothing (no stamp, no upgrade)."""
    known = known_revisions()
    with _connect(engine) as connection:
        revision = _revision_of(connection)
        if revision is None and set(inspect(connection).get_table_names()) & set(BASE_SCHEMA):
            revision = "pre-migrations"  # created before revision 0001 existed; `upgrade` stamps it 0001
        connection.commit()
    return Revisions(revision, revision, known[-1])


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
