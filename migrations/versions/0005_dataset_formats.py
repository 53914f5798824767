"""Dataset formats: ``datasets.kind``, ``format``, ``num_files``, ``compression``,
``num_examples``, ``labels`` and ``stats``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-13

``kind`` is ``text`` (the stored file is plain UTF-8 with ``\\n`` line ends only) or
``labelled`` (the stored file is JSON Lines, one ``{"text", "label"}`` per line:
``core.labelled``). ``format`` is the upload's source format (``text``, ``jsonl``, ``csv``,
``tsv``), ``num_files`` how many files it was made of and ``compression`` how they were
compressed (``none``, ``gzip``, ``zstd``, ``mixed``). ``num_examples`` and ``labels`` (label ->
count) describe a labelled dataset; ``stats`` holds statistics per tokenizer kind. Rows older
than this revision are text datasets uploaded as one uncompressed file, without ``stats``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("kind", "format", "num_files", "compression", "num_examples", "labels", "stats")


def upgrade() -> None:
    # Plain ADD COLUMN, never a batch copy (see 0003/0004: on SQLite the copy drops the old
    # table, which would cascade through foreign keys).
    op.add_column("datasets", sa.Column("kind", sa.String(length=16), nullable=False,
                                        server_default="text"))
    op.add_column("datasets", sa.Column("format", sa.String(length=16), nullable=False,
                                        server_default="text"))
    op.add_column("datasets", sa.Column("num_files", sa.Integer(), nullable=False,
                                        server_default="1"))
    op.add_column("datasets", sa.Column("compression", sa.String(length=16), nullable=False,
                                        server_default="none"))
    op.add_column("datasets", sa.Column("num_examples", sa.BigInteger(), nullable=True))
    op.add_column("datasets", sa.Column("labels", sa.JSON(), nullable=True))
    op.add_column("datasets", sa.Column("stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("datasets", name)  # SQLite >= 3.35 drops a column in place
