"""Provenance per entry: ``measurements.method``, how the entry was measured.

- ``in-context``: inside a whole uniform network (``lut_service.context``; CPU backends);
- ``alone``: the op built and timed on its own (CUDA backends, the per-call overhead entry, and the
  fallback when the in-context pass fails, which the job result counts).

Rows stored before this revision say neither, and keep NULL ("unknown" in documents): a NULL is never
guessed into a method.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("measurements") as batch:
        batch.add_column(sa.Column("method", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("measurements") as batch:
        batch.drop_column("method")
