from __future__ import annotations

import subprocess
import sys

from store.models import JobStatus as S
from store.status import ALLOWED_TRANSITIONS, TERMINAL_STATES


def test_transition_table_covers_every_state_and_terminal_states_are_final() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)
    assert TERMINAL_STATES == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    assert all(ALLOWED_TRANSITIONS[s] == frozenset() for s in TERMINAL_STATES)
    assert ALLOWED_TRANSITIONS[S.QUEUED] == {S.RUNNING, S.CANCELLED, S.FAILED}
    assert S.SUCCEEDED not in ALLOWED_TRANSITIONS[S.QUEUED]


def test_api_process_never_imports_torch() -> None:
    code = ("import sys, app.main, store.progress, worker.celery_app, worker.tasks; "
            "from fastapi.testclient import TestClient; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
