"""API keys and owners: ``api_keys``, ``datasets.owner_id``, ``jobs.owner_id``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

``api_keys`` holds the sha256 of each API key and its visible prefix, never the key
(``store.apikeys``). ``owner_id`` names the principal that created a dataset or job
(``app.auth``); rows that existed before this revision get NULL, which only an admin key sees
(give them an owner with ``UPDATE ... SET owner_id = '<name>'`` to hand them to a principal).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    # Plain ADD COLUMN, never a batch copy of ``jobs``: on SQLite the copy drops the old table,
    # and with foreign keys on that cascades to every metric, checkpoint and attempt row.
    op.add_column("datasets", sa.Column("owner_id", sa.String(length=40), nullable=True))
    op.add_column("jobs", sa.Column("owner_id", sa.String(length=40), nullable=True))
    op.create_index("ix_datasets_owner_id_created_at_id", "datasets",
                    ["owner_id", "created_at", "id"])
    op.create_index("ix_jobs_owner_id_created_at_id", "jobs", ["owner_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id_created_at_id", table_name="jobs")
    op.drop_index("ix_datasets_owner_id_created_at_id", table_name="datasets")
    op.drop_column("jobs", "owner_id")  # SQLite >= 3.35 drops a column in place
    op.drop_column("datasets", "owner_id")
    op.drop_table("api_keys")
