"""The CLI as a Unix filter: a reader that goes away (``lmforge jobs | head``) stops it
quietly, with the shell's status for SIGPIPE and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_stdout_ends_the_cli_quietly_with_status_141(tmp_path: Path) -> None:
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path), "LMFORGE_LOG_FORMAT": "text"}
    cli = [sys.executable, "-m", "lmforge.cli"]
    subprocess.run([*cli, "keys", "create", "--name", "a"], env=env, cwd=REPO_ROOT,
                   capture_output=True, check=True)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the CLI writes its first line
    try:
        done = subprocess.run([*cli, "keys", "list"], env=env, cwd=REPO_ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, check=False, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
