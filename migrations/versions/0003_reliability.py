"""Leases, attempts and idempotency: ``jobs.enqueued_at`` and ``jobs.interruptions``,
``job_attempts``, ``idempotency_keys``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

``jobs.enqueued_at`` records when a job's message was last handed to the broker, so the queued
sweep can find queued jobs whose message was lost (a broker restart without persistence) and
enqueue them again. Existing queued jobs get ``created_at`` (they were enqueued at submission).
``jobs.interruptions`` counts the attempts that ended with a graceful worker shutdown (they
do not count toward ``LMFORGE_MAX_ATTEMPTS``; attempt numbers are never reused).
``job_attempts`` keeps one row per attempt (``GET /v1/jobs/{id}``'s ``attempt_history``);
existing jobs get no history rows (their attempts predate it). ``idempotency_keys`` remembers
``Idempotency-Key`` headers of creating requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # A plain ADD/DROP COLUMN, never a batch copy of ``jobs``: on SQLite the copy drops the old
    # table, and with foreign keys on that cascades to every metric, checkpoint and attempt row.
    op.add_column("jobs", sa.Column("enqueued_at", TS, nullable=True))
    op.add_column("jobs", sa.Column("interruptions", sa.Integer(), nullable=False,
                                    server_default="0"))
    op.execute("UPDATE jobs SET enqueued_at = created_at WHERE status = 'queued'")
    op.create_index("ix_jobs_status_enqueued_at", "jobs", ["status", "enqueued_at"])

    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("resumed_from_step", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_attempts_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "attempt", name=op.f("pk_job_attempts")),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("job_attempts")
    op.drop_index("ix_jobs_status_enqueued_at", table_name="jobs")
    op.drop_column("jobs", "interruptions")
    op.drop_column("jobs", "enqueued_at")  # SQLite >= 3.35 drops a column in place
