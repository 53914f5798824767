"""The embedded Redis and PostgreSQL servers: they start, answer, stop, and die with their
parent; PostgreSQL runs as root from any checkout location; and the tests' removals are
guarded."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lmforge.processes import EmbeddedServerError, RedisServer, free_port
from tests.support import cleanup
from tests.support.cleanup import REPO_ROOT, UnsafeRemovalError, remove_tree
from tests.support.postgres import (
    PostgresServer,
    PostgresUnreachableError,
    postgres_install_dir,
    temporary_root,
)

pytestmark = pytest.mark.timeout(120)


def _skip_if_unreachable(server: PostgresServer) -> None:
    """Skip, with the reason, where this machine cannot host the embedded PostgreSQL (e.g. a
    private temp dir as root); removes a temporary server's root first."""
    try:
        server.check_reachable()
    except PostgresUnreachableError as exc:
        server.remove()
        pytest.skip(f"the embedded PostgreSQL cannot run here: {exc}")


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
    _skip_if_unreachable(server)
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
    with pytest.raises(PostgresUnreachableError, match="cannot enter"):
        PostgresServer(private / "data").start()


def test_servers_die_with_a_killed_parent(tmp_path: Path, procs: Any) -> None:
    """SIGKILL the process that started the servers: PR_SET_PDEATHSIG takes them down.

    This test makes the PostgreSQL root itself and removes only that handle: nothing the
    child prints is ever used as a path."""
    probe = PostgresServer.temporary()  # binaries present and reachable, a user to run as
    _skip_if_unreachable(probe)
    probe.remove()
    pg_root = temporary_root()
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from pathlib import Path
        from lmforge.processes import RedisServer
        from tests.support.postgres import PostgresServer
        redis = RedisServer(dir=Path(sys.argv[2])).start()
        pg = PostgresServer(Path(sys.argv[3]) / "data").start()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(REPO_ROOT), str(tmp_path / "redis"), str(pg_root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert parent.stdout is not None
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
        remove_tree(pg_root, root=pg_root)
    assert not pg_root.exists()


# -- PostgreSQL as root, from a checkout that other users cannot enter ---------------------------


def _copy_install_under_private_dir(private: Path) -> Path:
    """Copy the wheel's PostgreSQL (bin, lib, share and the bundled libraries, in the wheel's
    layout) under ``private``; returns the copy's ``pginstall`` directory."""
    source = postgres_install_dir()
    install = private / "site-packages" / "pgserver" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(source / part, install / part, symlinks=True)
    wheel_libs = source.parent.parent / "pgserver.libs"
    if wheel_libs.is_dir():
        shutil.copytree(wheel_libs, private / "site-packages" / "pgserver.libs", symlinks=True)
    return install


def test_postgres_runs_from_binaries_its_user_cannot_reach(tmp_path: Path, procs: Any) -> None:
    """A checkout inside a mode-700 directory: as root, the server's user (``nobody``) cannot
    execute the binaries where they are, so they are copied where it can, and it works."""
    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as another user; this user reaches its binaries")
    try:
        postgres_install_dir()
    except EmbeddedServerError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    install = _copy_install_under_private_dir(private)
    cache = Path(tempfile.mkdtemp(prefix="lmforge-pgcache-"))  # this test's own copy target
    cache.chmod(0o711)
    server = PostgresServer.temporary(install=install, cache_dir=cache)
    try:
        try:  # only where the data directory is out of reach; a failed relocation must fail
            server.check_data_dir_reachable()
        except PostgresUnreachableError as exc:
            pytest.skip(f"the embedded PostgreSQL cannot run here: {exc}")
        with server:
            assert server.bin_dir.is_relative_to(cache), server.bin_dir
            assert not server.bin_dir.is_relative_to(private)
            assert server.psql("SELECT 6 * 7").strip() == "42"
            server.create_database("lmforge_relocated")
            assert server.psql("SELECT current_user", "lmforge_relocated").strip() == "postgres"
            pid = server.proc.pid  # type: ignore[union-attr]
            owner = Path(f"/proc/{pid}").stat().st_uid
            assert owner == pwd.getpwnam(PostgresServer.run_as).pw_uid
        assert procs.wait_gone({pid}) == set()
        # A second server reuses the copy rather than making another.
        copies = sorted(p.name for p in cache.iterdir())
        again = PostgresServer.temporary(install=install, cache_dir=cache)
        try:
            with again:
                assert again.bin_dir == server.bin_dir
        finally:
            again.remove()
        assert sorted(p.name for p in cache.iterdir()) == copies
        assert len(copies) == 1
    finally:
        server.remove()
        remove_tree(cache, root=cache)


# -- guarded removal -----------------------------------------------------------------------------


@pytest.fixture
def no_rmtree(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the guard's rmtree with a recorder, so that a broken guard deletes nothing."""
    calls: list[str] = []
    monkeypatch.setattr(cleanup, "rmtree", lambda path, *a, **k: calls.append(str(path)))
    return calls


@pytest.mark.parametrize("path", ["", " ", ".", "data", "./x", Path(""), Path("x/y")])
def test_remove_tree_refuses_empty_and_relative_paths(
    path: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rmtree: list[str]
) -> None:
    cwd = tmp_path / "cwd"
    (cwd / "x" / "y").mkdir(parents=True)
    (cwd / "data").mkdir()
    monkeypatch.chdir(cwd)  # were the guard broken, only this would be at stake
    with pytest.raises(UnsafeRemovalError, match="empty|relative"):
        remove_tree(path, root=tmp_path)
    with pytest.raises(UnsafeRemovalError):
        remove_tree(tmp_path / "cwd", root=path)
    assert no_rmtree == []
    assert (cwd / "x" / "y").is_dir() and (cwd / "data").is_dir()


def test_remove_tree_refuses_the_repository_cwd_and_other_protected_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_rmtree: list[str]
) -> None:
    refused = [
        (REPO_ROOT, REPO_ROOT),
        (REPO_ROOT, REPO_ROOT.parent),
        (REPO_ROOT.parent, REPO_ROOT.parent),
        (Path("/"), Path("/")),
        (Path.home(), Path.home()),
        (Path(tempfile.gettempdir()), Path(tempfile.gettempdir())),
        (REPO_ROOT / "tests", REPO_ROOT),  # the root itself must not contain the repository
    ]
    for path, root in refused:
        with pytest.raises(UnsafeRemovalError, match="protected"):
            remove_tree(path, root=root)
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for path in (cwd, cwd.parent):
        with pytest.raises(UnsafeRemovalError, match="protected"):
            remove_tree(path, root=tmp_path)
    assert no_rmtree == []
    assert (REPO_ROOT / "pyproject.toml").is_file() and cwd.is_dir()


def test_remove_tree_refuses_paths_outside_their_root(
    tmp_path: Path, no_rmtree: list[str]
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "mine" / "link").symlink_to(tmp_path / "other")
    for path in (tmp_path / "other", tmp_path / "mine" / ".." / "other", tmp_path / "mine/link"):
        with pytest.raises(UnsafeRemovalError, match="not under"):
            remove_tree(path, root=tmp_path / "mine")
    assert no_rmtree == []


def test_remove_tree_removes_what_its_creator_made(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    remove_tree(root / "a", root=root)
    assert root.is_dir() and not (root / "a").exists()
    remove_tree(root / "a", root=root)  # already gone: fine by default
    with pytest.raises(FileNotFoundError):
        remove_tree(root / "a", root=root, missing_ok=False)
    remove_tree(root, root=root)
    assert not root.exists()
