"""Where a job's integration files live in storage (shared by the worker that writes them and
the API that serves them; docs/operations.md, "Integrations")."""

from __future__ import annotations


def tensorboard_key(job_id: str) -> str:
    """The storage key of the job's TensorBoard event files, one ``.tar.gz`` whose members
    are under ``<job_id>/``."""
    return f"tensorboard/{job_id}.tar.gz"
