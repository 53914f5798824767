"""The worker's preload (worker/preload.py, ``LMFORGE_WORKER_PRELOAD``): a real ``lmforge
worker`` whose pool process has loaded torch before any job was submitted, while the worker's
main process, which forks the pool, never has; with the preload off, nothing loads torch
until a job runs. Read from ``/proc/PID/maps`` (the shared libraries each process mapped)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's C++ library mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libtorch_cpu" in maps


def _wait_for_log(service: Any, needle: str) -> None:
    # a safety net, not a measurement: the test's timeout is the real bound
    deadline = time.monotonic() + 240
    while needle not in service.logs["worker"].read_text(errors="replace"):
        assert service.alive(), service.log_tail()
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.2)


@pytest.mark.parametrize("preload", ["1", "0"])
def test_pool_processes_preload_torch_and_the_main_process_never_imports_it(
        preload: str, start_service: Callable[..., Any], sqlite_url: str,
        procs: Any) -> None:
    service = start_service(sqlite_url, name=f"preload{preload}",
                            extra_env={"LMFORGE_WORKER_PRELOAD": preload})
    try:
        main = service.procs["worker"].pid
        if preload == "1":
            _wait_for_log(service, "engine preloaded in")
        else:
            _wait_for_log(service, " ready.")  # Celery's: its pool processes are started
        pool = procs.descendants(main)
        assert pool, "the worker has no pool process"
        assert not _maps_torch(main)
        assert any(_maps_torch(pid) for pid in pool) == (preload == "1")
        assert ("engine preloaded" in service.logs["worker"].read_text()) == (preload == "1")
    finally:
        service.stop()
