"""``lmforge up``: the embedded stack starts, trains a job, and stops without leaving a
process behind, whether it is asked to stop, killed, or loses a child."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmforge.processes import free_port
from tests.e2e.conftest import printed_admin_keys, wait_for_admin_key

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


class Up:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        env.update(LMFORGE_HOME=str(home), PYTHONUNBUFFERED="1")
        self.log_path = home / "up.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmforge.cli", "up", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=self.base_url, timeout=30.0)

    def wait_healthy(self) -> None:
        """Wait until the API is healthy, then send the admin key it printed."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"lmforge up exited:\n{self.log()}"
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"lmforge up did not become healthy:\n{self.log()}")
        key = wait_for_admin_key(self.log, lambda: self.proc.poll() is None)
        self.client.headers["Authorization"] = f"Bearer {key}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def up(tmp_path: Path, procs: Any) -> Iterator[Up]:
    stack = Up(tmp_path / "home")
    try:
        stack.wait_healthy()
        yield stack
    finally:
        tree = procs.descendants(stack.proc.pid)
        stack.close()
        procs.wait_gone(tree, timeout=30)


def _children(procs: Any, pid: int) -> set[int]:
    tree = procs.descendants(pid)
    # API, worker (+ its pool process) and Redis
    assert len(tree) >= 3, tree
    return tree


def test_up_trains_a_job_then_sigterm_stops_everything(up: Up, procs: Any) -> None:
    # The first admin key, printed once; the API refuses requests without it.
    assert len(printed_admin_keys(up.log())) == 1, up.log()
    anonymous = httpx.get(f"{up.base_url}/v1/jobs", timeout=30.0)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    spec = {
        "dataset": {"builtin": "python-docs"},
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
        "training": {
            "batch_size": 8,
            "seq_len": 16,
            "max_steps": 10,
            "eval_interval": 10,
            "device": "cpu",
        },
    }
    response = up.client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (status := up.client.get(f"/v1/jobs/{job_id}").json()["status"]) not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, up.log()
        time.sleep(0.2)
    assert status == "succeeded"
    # The inference server `lmforge up` started answers for the API.
    sampled = up.client.post(f"/v1/jobs/{job_id}/generate", json={"max_new_tokens": 5})
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["samples"][0]["num_tokens"] == 5

    tree = _children(procs, up.proc.pid)
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(90) == 0, up.log()
    assert procs.wait_gone(tree) == set(), up.log()


def test_up_killed_with_sigkill_takes_its_children_along(up: Up, procs: Any) -> None:
    tree = _children(procs, up.proc.pid)
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait()
    assert procs.wait_gone(tree) == set()


def test_up_stops_everything_and_fails_when_a_child_dies(up: Up, procs: Any) -> None:
    tree = _children(procs, up.proc.pid)
    direct = [
        pid
        for pid in tree
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:4] == [b"api"]
    ]
    assert len(direct) == 1, "the API child of lmforge up"
    os.kill(direct[0], signal.SIGKILL)
    assert up.proc.wait(90) == 1, up.log()
    assert procs.wait_gone(tree) == set(), up.log()
    assert "the api exited unexpectedly" in up.log()


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path, procs: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        env["LMFORGE_HOME"] = str(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "up", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "redis").exists()


def test_up_refuses_to_run_without_authentication_on_a_non_loopback_address(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(LMFORGE_HOME=str(tmp_path), LMFORGE_AUTH="disabled")
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "up", "--host", "0.0.0.0", "--port",
         str(free_port())],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "LMFORGE_AUTH=disabled is only allowed on a loopback address" in result.stderr
    assert not (tmp_path / "redis").exists()
