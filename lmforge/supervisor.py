"""``lmforge up``: the whole service on one machine, as one supervised group of processes.

The supervisor starts, in order: an embedded Redis server (only when ``REDIS_URL`` is unset),
the database schema upgrade (in-process, before anything can use the database), one Celery
worker (on every queue this machine can serve: :func:`up_worker_queues`), the inference
server (``lmforge serve`` on 127.0.0.1: on the port of
``LMFORGE_INFERENCE_URL`` when that is set, else on a free port it hands to the API in
``LMFORGE_INFERENCE_URL``) and the API. Every child gets ``PR_SET_PDEATHSIG`` (a killed
supervisor takes them down) and its own process group (a terminal's Ctrl-C reaches only the
supervisor, which then stops the children in order: API, inference server, worker, Redis). If
any child exits on its own, the supervisor stops the rest and exits non-zero.

After the schema upgrade it creates the first admin API key when the database has no admin key
at all (revoked ones count: revoking it never makes a restart mint a new one) and prints it,
once. With ``LMFORGE_AUTH=disabled`` it refuses a non-loopback ``--host``.

The supervisor never imports torch, FastAPI or Celery; the children do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lmforge.processes import RedisServer, free_port, kill_process_group, spawn

logger = logging.getLogger(__name__)

# Worker shutdown: with REMAP_SIGTERM=SIGQUIT a SIGTERM gives the running task
# `worker_soft_shutdown_timeout` seconds to save a checkpoint, then requeues it; this is the
# supervisor's upper bound on that before it kills the worker's process group.
WORKER_STOP_TIMEOUT_S = 60.0
API_STOP_TIMEOUT_S = 15.0
INFERENCE_STOP_TIMEOUT_S = 15.0
STARTUP_TIMEOUT_S = 120.0


def up_worker_queues() -> list[str]:
    """The queues of ``lmforge up``'s one worker: every job this machine can run
    (docs/deploy.md, "Queues and devices"). A GPU machine serves ``cuda``, ``lmforge`` and
    ``cpu`` (a CPU job may use it too, after the GPU jobs of its priority); a CPU-only one
    ``cpu`` and ``lmforge`` (a ``cuda`` job waits, ``waiting_for: "cuda"``)."""
    from store.workers import detect_device_class

    if detect_device_class() == "cuda":
        return ["cuda", "lmforge", "cpu"]
    return ["cpu", "lmforge"]


class StartupError(RuntimeError):
    """The stack could not be started; the message says why."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    stop_timeout_s: float


@dataclass
class Supervisor:
    host: str = "127.0.0.1"
    port: int = 8000
    concurrency: int = 1
    home: Path = field(default_factory=lambda: Path(os.environ.get("LMFORGE_HOME", "./var")))
    children: list[_Child] = field(default_factory=list)
    redis: RedisServer | None = None
    _signals: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("received %s; stopping (again to force)", signal.Signals(signum).name)
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, wait for a signal or a dead child, stop everything.

        Returns 0 after a requested stop, 1 when a child died or the start failed."""
        self._install_signal_handlers()
        try:
            self._start()
            return self._watch()
        except _Stopped:
            return 0
        except StartupError as exc:
            logger.error("%s", exc)
            return 1
        finally:
            self._stop_all()

    def _start(self) -> None:
        self._check_auth()
        self._check_port_free()
        self.home.mkdir(parents=True, exist_ok=True)
        os.environ["LMFORGE_HOME"] = str(self.home.resolve())
        if not os.environ.get("REDIS_URL"):
            try:
                self.redis = RedisServer(dir=self.home / "redis").start()
            except Exception as exc:
                raise StartupError(f"could not start the embedded Redis: {exc}") from exc
            os.environ["REDIS_URL"] = self.redis.url
            logger.info("embedded Redis at %s", self.redis.url)
        self._check_stop()
        self._upgrade_database()
        first_key = self._first_admin_key()
        self._check_stop()
        env = os.environ.copy()
        cli = [sys.executable, "-m", "lmforge.cli"]
        worker = spawn([*cli, "worker", "--concurrency", str(self.concurrency),
                        "--queues", ",".join(up_worker_queues())], env=env)
        self.children.append(_Child("worker", worker, WORKER_STOP_TIMEOUT_S))
        inference_url = self._inference_url(env)
        serve = spawn([*cli, "serve", "--host", "127.0.0.1", "--port",
                       str(urllib.parse.urlsplit(inference_url).port)], env=env)
        self.children.append(_Child("inference server", serve, INFERENCE_STOP_TIMEOUT_S))
        api = spawn([*cli, "api", "--host", self.host, "--port", str(self.port)], env=env)
        self.children.append(_Child("api", api, API_STOP_TIMEOUT_S))
        self._wait_healthy()
        self._wait_healthy(f"{inference_url}/healthz", "the inference server")
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        print(
            f"LMForge is up: http://{shown}:{self.port} (API docs at /docs; data in "
            f"{os.environ['LMFORGE_HOME']}{_blobs_elsewhere()}). Press Ctrl-C to stop.",
            flush=True,
        )
        if first_key is not None:
            print(f"Admin API key (shown only this once; send it as 'Authorization: Bearer "
                  f"<key>'): {first_key}", flush=True)

    def _check_auth(self) -> None:
        from app.auth import check_bind
        from store.settings import get_settings

        get_settings.cache_clear()
        try:
            check_bind(get_settings().auth, self.host)
        except SystemExit as exc:
            raise StartupError(str(exc)) from None

    def _first_admin_key(self) -> str | None:
        """A new admin key named ``admin`` when the database has no admin key at all (and
        keys are required), else None."""
        from store import apikeys
        from store.db import make_engine, make_session_factory, session_scope
        from store.settings import get_settings

        settings = get_settings()
        if settings.auth == "disabled":
            return None
        engine = make_engine(settings.sqlalchemy_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                if apikeys.has_admin_key(session):
                    return None
                return apikeys.create_key(session, "admin", is_admin=True).key
        except Exception as exc:
            raise StartupError(f"could not create the first admin key: {exc}") from exc
        finally:
            engine.dispose()

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                    "choose another with --port"
                ) from exc

    def _upgrade_database(self) -> None:
        from store.db import upgrade_database
        from store.settings import get_settings

        get_settings.cache_clear()  # the environment was just completed above
        try:
            upgrade_database(get_settings().sqlalchemy_url)
        except Exception as exc:
            raise StartupError(f"could not upgrade the database: {exc}") from exc

    @staticmethod
    def _inference_url(env: dict[str, str]) -> str:
        """``LMFORGE_INFERENCE_URL`` when set (it must name a port), else one on a free port
        of 127.0.0.1, set in ``env`` for the API."""
        url = env.get("LMFORGE_INFERENCE_URL")
        if url:
            if urllib.parse.urlsplit(url).port is None:
                raise StartupError(f"LMFORGE_INFERENCE_URL={url} names no port")
            return url.rstrip("/")
        env["LMFORGE_INFERENCE_URL"] = url = f"http://127.0.0.1:{free_port()}"
        return url

    def _wait_healthy(self, health_url: str | None = None, what: str = "the API") -> None:
        url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"
        health_url = health_url or f"{url}/healthz"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_stop()
            self._check_children()
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._stop.wait(0.2)
        raise StartupError(f"{what} did not answer {health_url} within "
                           f"{STARTUP_TIMEOUT_S:.0f} s")

    def _check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise StartupError(f"the {child.name} exited unexpectedly (exit code {code})")
        if self.redis is not None and not self.redis.running:
            raise StartupError("the embedded Redis exited unexpectedly")

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            try:
                self._check_children()
            except StartupError as exc:
                logger.error("%s; stopping everything", exc)
                return 1
        return 0

    # -- stop --------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        # API first (no new jobs), then the inference server, then the worker (it needs Redis
        # to requeue its task), then Redis. A second Ctrl-C/SIGTERM cuts every wait short.
        signals_before = self._signals
        for child in reversed(self.children):
            self._stop_child(child, signals_before)
        if self.redis is not None:
            self.redis.stop(timeout=10)

    def _stop_child(self, child: _Child, signals_before: int) -> None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + child.stop_timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if self._signals > signals_before:
                    logger.warning("forced stop")
                    break
                time.sleep(0.1)
            if proc.poll() is None:
                logger.warning("the %s did not stop in time; killing it", child.name)
        # Also sweeps what the child left in its process group (e.g. a pool process). The
        # group id outlives its leader while members remain; the sweep follows at once, so
        # the id cannot realistically have been reused.
        kill_process_group(proc)
        proc.wait()
        logger.info("%s stopped (exit code %s)", child.name, proc.returncode)


class _Stopped(Exception):
    """A stop was requested while starting."""


def run_up(host: str, port: int, concurrency: int = 1) -> int:
    return Supervisor(host=host, port=port, concurrency=concurrency).run()


def _blobs_elsewhere() -> str:
    """", datasets and checkpoints in s3://..." when blobs go to an object store
    (``LMFORGE_STORAGE_URL``), else ""."""
    url = os.environ.get("LMFORGE_STORAGE_URL")
    return f", datasets and checkpoints in {url}" if url else ""
