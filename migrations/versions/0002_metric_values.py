"""Metrics as named values: one JSON column instead of one column per metric.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

A job kind now reports its own metrics (classification's accuracy and F1, PPO's reward and KL)
without a migration per metric: ``metrics`` keeps its key ``(job_id, step)`` and holds the
step's metrics in ``values`` (JSON object, name -> number or null). Existing rows are copied,
set-based, into the new table (nothing the service held is lost), and the downgrade copies them
back into the columns of revision 0001.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The per-step metrics of revision 0001, in its column order: (name, SQL type of the column).
OLD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", "float"), ("train_loss", "float"), ("lr", "float"), ("grad_norm", "float"),
    ("tokens_per_s", "float"), ("elapsed_s", "float"), ("tokens_seen", "bigint"),
    ("val_loss", "float"), ("val_ppl", "float"), ("val_bpc", "float"),
    ("val_accuracy", "float"), ("val_top5_accuracy", "float"),
)
NULLABLE = {"val_loss", "val_ppl", "val_bpc", "val_accuracy", "val_top5_accuracy"}


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    pairs = ", ".join(f"'{name}', {name}" for name, _ in OLD_COLUMNS)
    as_json = f"json_object({pairs})" if sqlite else f"json_build_object({pairs})"
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("values", sa.JSON(), nullable=True))
    op.execute(f'UPDATE metrics SET "values" = {as_json}')
    with op.batch_alter_table("metrics") as batch:  # SQLite: one copy of the table
        batch.alter_column("values", existing_type=sa.JSON(), nullable=False)
        for name, _ in OLD_COLUMNS:
            batch.drop_column(name)


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("metrics") as batch:
        for name, kind in OLD_COLUMNS:
            typ: sa.types.TypeEngine[Any] = sa.BigInteger() if kind == "bigint" else sa.Double()
            batch.add_column(sa.Column(name, typ, nullable=True))
    sets = []
    for name, kind in OLD_COLUMNS:
        if sqlite:
            sets.append(f"{name} = json_extract(\"values\", '$.{name}')")
        else:
            cast = "bigint" if kind == "bigint" else "double precision"
            sets.append(f"{name} = (\"values\"->>'{name}')::{cast}")
    op.execute(f"UPDATE metrics SET {', '.join(sets)}")
    with op.batch_alter_table("metrics") as batch:
        for name, kind in OLD_COLUMNS:
            if name not in NULLABLE:
                batch.alter_column(name, existing_type=sa.BigInteger() if kind == "bigint"
                                   else sa.Double(), nullable=False)
        batch.drop_column("values")
