"""Job samples: ``job_samples``, the sample responses a job stores at its evaluations.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

One row per (job, step): ``values`` is a JSON list of samples, each an object with at least
``prompt``, ``response`` and ``reward`` (a PPO job's rollouts at an evaluation interval:
``worker.ppo_job``); rows are upserted by their key, so a resumed run that replays an
evaluation replaces its row instead of adding a second one. Deleting the job deletes its
samples (``ON DELETE CASCADE``). A plain CREATE TABLE (no batch copy of an existing table).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_samples",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_samples_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_job_samples")),
    )


def downgrade() -> None:
    op.drop_table("job_samples")
