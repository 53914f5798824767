"""Test-only helpers: the embedded PostgreSQL server, process-tree inspection, safe removal."""
