"""Fleet store: jobs belong to a device and are claimed by one agent process; attempts are counted.

- ``jobs.device_id`` (the device whose agent runs the job), filled in for existing jobs from their
  table's device, and for networks jobs (no table) from the newest device of the store: before this
  revision a store belonged to one agent.
- ``jobs.attempts`` (starts without progress), ``stored_at_claim`` (entries stored when it was last
  started: a later start that finds more made progress), ``claimed_by``, ``heartbeat_at``.
- indexes for each worker's query (device, state) and the fleet's table list (device, backend).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    # SQLite copies the table to add a foreign key; the partial unique index is dropped around the copy
    # and recreated as it was (its WHERE clause is not reflected reliably).
    op.drop_index("uq_active_job_per_lut", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("device_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("claimed_by", sa.String(120), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("stored_at_claim", sa.Integer(), nullable=False, server_default="0"))
        batch.create_foreign_key("fk_jobs_device_id", "devices", ["device_id"], ["id"])
    op.create_index(
        "uq_active_job_per_lut", "jobs", ["lut_id"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )
    op.create_index("ix_jobs_device_state", "jobs", ["device_id", "state"])
    op.create_index("ix_luts_device_backend", "luts", ["device_id", "backend"])
    op.execute(
        "UPDATE jobs SET device_id = (SELECT luts.device_id FROM luts WHERE luts.id = jobs.lut_id) "
        "WHERE lut_id IS NOT NULL"
    )
    op.execute(
        "UPDATE jobs SET device_id = (SELECT id FROM devices ORDER BY created_at DESC, id LIMIT 1) "
        "WHERE device_id IS NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_luts_device_backend", table_name="luts")
    op.drop_index("ix_jobs_device_state", table_name="jobs")
    op.drop_index("uq_active_job_per_lut", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_device_id", type_="foreignkey")
        for name in ("stored_at_claim", "heartbeat_at", "claimed_by", "attempts", "device_id"):
            batch.drop_column(name)
    op.create_index(
        "uq_active_job_per_lut", "jobs", ["lut_id"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )
