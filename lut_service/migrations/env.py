"""Alembic environment of the agent's store (``lut_service.db.upgrade`` runs it; so does ``effpose lut db``).

The caller passes an open connection in ``config.attributes["connection"]``; there is no alembic.ini.
"""

from __future__ import annotations

from alembic import context

from lut_service.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER constraints, so a migration that needs to copies the table
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
