"""A scale-out LMForge cluster as real processes, for the end-to-end tests of issue 11.

:class:`Cluster` plays several machines on one: one PostgreSQL database, one Redis server (of
its own) and one S3-compatible object store (a real ``moto_server`` process, from
``tests/support/s3.py``) are shared; every API process (``lmforge api``) and every worker
process (``lmforge worker --concurrency 1``) has an ``LMFORGE_HOME`` of its own, so nothing
but the database, the broker and the bucket is shared, as on separate machines. Each node is
a process group of its own (``lmforge.processes.spawn``), so a test can SIGKILL a whole worker
(main process and pool process) as a machine that dies would lose it.

Processes are stopped by :meth:`Cluster.close`, which touches only the processes it started
(their handles) and the Redis server it started.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from lmforge import proctree
from lmforge.processes import (
    EmbeddedServerError,
    RedisServer,
    free_port,
    kill_process_group,
    spawn,
    terminate,
)
from store import apikeys
from store.db import make_engine, make_session_factory, session_scope, upgrade_database
from store.settings import Settings

CLI = [sys.executable, "-m", "lmforge.cli"]
# A safety net for each wait, not an assertion about speed.
DEADLINE_S = 180.0


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = DEADLINE_S,
             details: Callable[[], str] = lambda: "") -> Any:
    """Poll ``predicate`` every 0.2 s until it returns a true value (returned); fail the test
    naming ``what`` (and ``details()``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout:.0f} s\n{details()}")
        time.sleep(0.2)


@dataclass(eq=False)
class Node:
    """One process of the cluster, as if on a machine of its own: ``role`` is ``"api"`` or
    ``"worker"``; ``home`` its LMFORGE_HOME; ``client`` (APIs only) talks to it with the
    cluster's API key."""

    name: str
    role: str
    home: Path
    proc: Popen[bytes]
    log: Path
    client: httpx.Client | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> set[int]:
        """The node's main process and all its descendants (a worker's pool processes)."""
        return proctree.descendants(self.proc.pid) | {self.proc.pid}

    @property
    def storage_dir(self) -> Path:
        """Where this node would keep blobs with local storage (``LMFORGE_HOME/storage``)."""
        return Settings(LMFORGE_HOME=self.home).storage_dir

    def stored_files(self) -> list[Path]:
        """Files under the node's local storage directory (none when blobs go to S3)."""
        root = self.storage_dir
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def kill_group(self) -> None:
        """SIGKILL the node's whole process group (a machine lost at once) and wait until
        every process of it is gone."""
        tree = self.pids()
        kill_process_group(self.proc)
        self.proc.wait(60)
        left = proctree.wait_gone(tree)
        assert left == set(), f"processes of {self.name} still alive after SIGKILL: {left}"


@dataclass(eq=False)
class Cluster:
    """APIs and workers on one shared database, Redis and bucket; see the module docstring.

    ``database_url``: the shared database (upgraded here); ``storage_env``: the object store's
    variables (``tests.support.s3.s3_env``); ``settings``: more environment for every node
    (e.g. a short ``LMFORGE_HEARTBEAT_TIMEOUT_S``). ``root``: a directory the caller made,
    under which every node's home, log and the Redis data go."""

    root: Path
    database_url: str
    storage_env: dict[str, str]
    settings: dict[str, str] = field(default_factory=dict)
    apis: dict[str, Node] = field(default_factory=dict)
    workers: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.redis = RedisServer(free_port(), dir=self.root / "redis").start()
        except EmbeddedServerError as exc:
            pytest.skip(f"no Redis: {exc}")
        upgrade_database(self.database_url)
        self.engine = make_engine(self.database_url)
        self.factory = make_session_factory(self.engine)
        with session_scope(self.factory) as s:
            self.key = apikeys.create_key(s, "tester").key

    # -- nodes -------------------------------------------------------------------------------
    def _env(self, home: Path) -> dict[str, str]:
        # The test runner's own storage or service variables must not leak into a node.
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("LMFORGE_", "AWS_")) and k not in ("DATABASE_URL",
                                                                         "REDIS_URL")}
        return {**base, "LMFORGE_HOME": str(home), "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1", **self.storage_env,
                **self.settings}

    def _spawn(self, name: str, role: str, argv: list[str]) -> Node:
        home = self.root / name
        home.mkdir()  # a fresh home: never a node's twice
        log = home / f"{role}.log"
        with open(log, "ab") as out:
            proc = spawn(argv, env=self._env(home), log=out)
        return Node(name, role, home, proc, log)

    def start_api(self, name: str) -> Node:
        """Start an API process and wait until its /healthz answers 200."""
        port = free_port()
        node = self._spawn(name, "api", [*CLI, "api", "--port", str(port),
                                         "--log-level", "warning"])
        node.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0,
                                   headers={"Authorization": f"Bearer {self.key}"})
        self.apis[name] = node

        def healthy() -> bool:
            assert node.alive(), f"API {name} exited while starting\n{self.logs()}"
            try:
                return node.client is not None and node.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(f"API {name} healthy", healthy, details=self.logs)
        return node

    def start_worker(self, name: str, wait: bool = True) -> Node:
        """Start ``lmforge worker --concurrency 1`` with Celery node name ``name@<host>``
        (one pool process: one job at a time); with ``wait``, until it consumes
        (:meth:`wait_ready`)."""
        node = self._spawn(name, "worker", [*CLI, "worker", "--concurrency", "1",
                                            "--hostname", f"{name}@%h"])
        self.workers[name] = node
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: Node) -> None:
        """Until worker ``node`` consumes from the broker: Celery logs ``<name>@<host>
        ready.`` once its consumer has started (``celery.apps.worker``)."""
        line = re.compile(rf"\b{re.escape(node.name)}@\S+ ready\.")

        def ready() -> bool:
            assert node.alive(), f"worker {node.name} exited while starting\n{self.logs()}"
            return bool(line.search(node.log.read_text(errors="replace")))

        wait_for(f"worker {node.name} ready", ready, details=self.logs)

    def live_workers(self) -> list[Node]:
        return [w for w in self.workers.values() if w.alive()]

    def ensure_workers(self, n: int) -> list[Node]:
        """Start workers until ``n`` are alive (a test that killed one leaves one fewer);
        returns the live ones."""
        while len(self.live_workers()) < n:
            self.start_worker(f"worker{len(self.workers) + 1}", wait=False)
        live = self.live_workers()
        for node in live:
            self.wait_ready(node)
        return live

    def worker_running(self, worker_id: str) -> Node:
        """The worker node whose process ``worker_id`` (``"<hostname>:<pid>"``, a job
        attempt's ``worker``: its pool process) belongs to."""
        pid = int(worker_id.rsplit(":", 1)[1])
        found = [w for w in self.workers.values() if w.alive() and pid in w.pids()]
        assert len(found) == 1, f"worker process {worker_id} in {len(found)} worker nodes"
        return found[0]

    # -- inspection --------------------------------------------------------------------------
    def logs(self, lines: int = 60) -> str:
        out = []
        for node in [*self.apis.values(), *self.workers.values()]:
            text = node.log.read_text(errors="replace") if node.log.exists() else ""
            out.append(f"----- {node.name} ({node.role}, pid {node.pid}) -----")
            out.extend(text.splitlines()[-lines:])
        return "\n".join(out)

    def session(self) -> AbstractContextManager[Session]:
        """A session on the shared database (committed at the end of the ``with``)."""
        return session_scope(self.factory)

    def nodes(self) -> list[Node]:
        return [*self.apis.values(), *self.workers.values()]

    def close(self) -> None:
        """Stop every process this cluster started (APIs first), then its Redis server."""
        for node in [*self.apis.values(), *self.workers.values()]:
            if node.client is not None:
                node.client.close()
            terminate(node.proc, timeout=30)
            kill_process_group(node.proc)  # whatever of its group is left
        self.redis.stop()
        self.engine.dispose()
