"""The agent's schema as it was before migrations (git f8a371d): devices, measurements, luts, jobs.

A database created by that version (``create_all``, no ``alembic_version`` table) is stamped with this
revision by ``lut_service.db.upgrade`` and then upgraded from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("fingerprint", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "measurements",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("clock", sa.String(16), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("p10_ms", sa.Float(), nullable=False),
        sa.Column("p90_ms", sa.Float(), nullable=False),
        sa.Column("iqr_ms", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("raw_median_ms", sa.Float(), nullable=False),
        sa.Column("overhead_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("device_id", "backend", "key", "batch", "dtype", "threads", "clock", name="uq_entry"),
    )
    op.create_index("ix_measurements_device_id", "measurements", ["device_id"])
    op.create_table(
        "luts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("keys", sa.JSON(), nullable=False),
        sa.Column("document", sa.Text(), nullable=True),
        sa.Column("etag", sa.String(80), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("lut_id", sa.String(32), sa.ForeignKey("luts.id"), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("budget", sa.JSON(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_jobs_lut_id", "jobs", ["lut_id"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index(
        "uq_active_job_per_lut", "jobs", ["lut_id"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("luts")
    op.drop_index("ix_measurements_device_id", table_name="measurements")
    op.drop_table("measurements")
    op.drop_table("devices")
