"""The embedded Redis and PostgreSQL servers: they start, answer, stop, and die with their
parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lmforge.processes import EmbeddedServerError, PostgresServer, RedisServer, free_port

pytestmark = pytest.mark.timeout(120)


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_redis_server_answers_ping_and_stops(tmp_path: Path, procs: Any) -> None:
    with RedisServer(dir=tmp_path) as redis:
        assert redis.ping()
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        pid = redis.proc.pid  # type: ignore[union-attr]
    assert not redis.running
    assert not procs.alive(pid)
    assert not redis.ping()


def test_redis_server_on_a_taken_port_fails_with_its_log(tmp_path: Path) -> None:
    with RedisServer(dir=tmp_path / "a") as first:
        with pytest.raises(EmbeddedServerError, match="did not start"):
            RedisServer(first.port, dir=tmp_path / "b").start()


def test_postgres_server_runs_sql_and_stops(procs: Any) -> None:
    server = PostgresServer.temporary()
    try:
        with server:
            url = server.create_database("lmforge_t1")
            assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/lmforge_t1"
            assert server.psql("SELECT current_database()", "lmforge_t1").strip() == "lmforge_t1"
            backends = procs.descendants(server.proc.pid)  # type: ignore[union-attr]
            pid = server.proc.pid  # type: ignore[union-attr]
        assert not server.running
        assert procs.wait_gone({pid} | backends) == set()
    finally:
        server.remove()
    assert not server.dir.exists()


def test_postgres_refuses_a_data_dir_its_user_cannot_reach(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the data directory to another user")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(EmbeddedServerError, match="cannot enter"):
        PostgresServer(private / "data").start()


def test_servers_die_with_a_killed_parent(tmp_path: Path, procs: Any) -> None:
    """SIGKILL the process that started the servers: PR_SET_PDEATHSIG takes them down."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from lmforge.processes import PostgresServer, RedisServer
        redis = RedisServer(dir={str(tmp_path / "redis")!r}).start()
        pg = PostgresServer.temporary().start()
        print(pg._temp_root, flush=True)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pg_root = Path(parent.stdout.readline().strip())
        assert parent.stdout.readline().strip() == "ready"
        children = procs.descendants(parent.pid)
        assert len(children) >= 2  # redis-server, postmaster (+ its background processes)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert procs.wait_gone(children) == set()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        import shutil

        shutil.rmtree(pg_root, ignore_errors=True)
