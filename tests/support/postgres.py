"""A real PostgreSQL 16 server for the tests, from the ``pgserver`` wheel's binaries.

Only the tests use it (the service itself takes any ``DATABASE_URL``). We run the wheel's
``initdb`` and ``postgres`` ourselves, in the foreground, rather than through ``pgserver``'s
own manager, which rewrites directory permissions up to ``/`` and leaks the server when its
owner dies.

PostgreSQL refuses to run as root, so as root the server runs as ``nobody``. That user must
be able to reach the binaries and the data directory:

- the binaries: when the wheel sits somewhere ``nobody`` cannot enter (a checkout inside a
  mode-700 directory, as ``mktemp -d`` or root's home makes), :func:`reachable_install` copies
  them once into a directory under the system temp dir and they run from there;
- the data directory: :func:`temporary_root` makes one under the system temp dir that others
  may enter; a directory the caller passes must already be reachable (we check, and never
  loosen permissions up the tree).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lmforge.processes import EmbeddedServerError, _ChildServer, die_with_parent

from .cleanup import remove_tree

# A Unix socket path must fit in sockaddr_un.sun_path (108 bytes including the NUL).
_MAX_SOCKET_PATH = 107
# What a server needs from an install (``include`` is for building extensions only).
_INSTALL_PARTS = ("bin", "lib", "share")
# The wheel's binaries find their bundled libpq through RPATH ``$ORIGIN/../../../pgserver.libs``
# (auditwheel): a copy keeps that layout, ``<copy>/pgserver/pginstall`` next to
# ``<copy>/pgserver.libs``.
_WHEEL_LIBS = "pgserver.libs"
_PROBE_TIMEOUT_S = 30.0


class PostgresUnreachableError(EmbeddedServerError):
    """This machine cannot host the embedded PostgreSQL as set up: the server's user cannot
    reach its binaries or its data directory, or there is no such user. The message says
    why; tests skip with it rather than fail."""


def postgres_install_dir() -> Path:
    """The ``pginstall`` directory (``bin``, ``lib``, ``share``) of the ``pgserver`` wheel.

    Found without importing ``pgserver`` (its import has side effects we do not want).
    Raises :class:`EmbeddedServerError` when the wheel or its binaries are missing."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded PostgreSQL needs the 'embedded' extra: pip install 'lmforge[embedded]'"
        )
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / "postgres").exists():
        raise EmbeddedServerError(f"no PostgreSQL binaries in {install / 'bin'}")
    return install


def postgres_bin_dir() -> Path:
    """The ``bin`` directory of the ``pgserver`` wheel's PostgreSQL (see
    :func:`postgres_install_dir` for the errors)."""
    return postgres_install_dir() / "bin"


def temporary_root() -> Path:
    """A new, empty directory under the system temp dir for one server: short enough for the
    Unix socket path and enterable (not listable) by others, so the server's user reaches the
    data directory made inside it. The caller owns it and removes it with
    ``remove_tree(root, root=root)``."""
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    root.chmod(0o711)
    return root


# -- reaching the binaries as another user -------------------------------------------------------


def _as_user(user: pwd.struct_passwd) -> dict[str, Any]:
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def install_problem(install: Path, user: pwd.struct_passwd) -> str | None:
    """Why ``user`` cannot run the PostgreSQL in ``install``, or None when it can.

    Tested for real, as that user: ``postgres -V`` must run (directories traversable, binary
    executable, libraries loadable) and ``share/postgres.bki`` must be readable (``initdb``
    needs it). Needs root (it switches user). Raises nothing."""
    postgres = install / "bin" / "postgres"
    bki = install / "share" / "postgresql" / "postgres.bki"
    try:
        result = subprocess.run(
            ["/bin/sh", "-c", 'test -r "$1" || { echo "cannot read $1"; exit 1; }; "$0" -V',
             str(postgres), str(bki)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=_PROBE_TIMEOUT_S,
            check=False,
            **_as_user(user),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run /bin/sh as {user.pw_name!r}: {exc}"
    if result.returncode != 0 or "PostgreSQL" not in result.stdout:
        output = (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
        return f"{user.pw_name!r} cannot run {postgres}: {output}"
    return None


def _install_digest(install: Path) -> str:
    h = hashlib.sha256(str(install.resolve()).encode())
    for name in ("postgres", "initdb", "psql"):
        st = (install / "bin" / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _make_public(tree: Path) -> None:
    """Directories 0755, files 0755 when executable else 0644 (the source may have been
    installed under umask 077); symlinks are left alone."""
    for dirpath, _dirnames, filenames in os.walk(tree):  # does not follow symlinks
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def _check_private_copy(copy: Path) -> None:
    st = copy.lstat()
    if not copy.is_dir() or copy.is_symlink():
        raise EmbeddedServerError(f"{copy} is not a directory; remove it and try again")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedServerError(
            f"{copy} is owned by uid {st.st_uid} with mode {oct(st.st_mode & 0o777)}: it was not "
            "made by this user, so its binaries are not trusted; remove it and try again"
        )


def relocated_install(install: Path, cache_dir: Path | None = None) -> Path:
    """A copy of ``install`` (its ``bin``, ``lib`` and ``share``, plus the wheel's
    ``pgserver.libs``) that other users can read and execute, made once and reused.

    The copy is ``<cache_dir>/lmforge-pgserver-<euid>-<digest>`` (``cache_dir`` defaults to
    the system temp dir; the digest covers the source path and its binaries' sizes and
    modification times). It is built in a private sibling and renamed into place atomically,
    so concurrent test processes never see half a copy. Returns the ``pginstall`` directory
    inside the copy. Raises :class:`EmbeddedServerError` when an existing copy was not made by
    this user (or is writable by others), and ``OSError`` when copying fails.
    """
    parent = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    copy = parent.absolute() / f"lmforge-pgserver-{os.geteuid()}-{_install_digest(install)}"
    if not copy.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=parent))
        try:
            target = staging / "pgserver" / "pginstall"
            for part in _INSTALL_PARTS:
                shutil.copytree(install / part, target / part, symlinks=True)
            wheel_libs = install.parent.parent / _WHEEL_LIBS
            if wheel_libs.is_dir():
                shutil.copytree(wheel_libs, staging / _WHEEL_LIBS, symlinks=True)
            _make_public(staging)
            try:
                os.rename(staging, copy)  # atomic; fails when another process got there first
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            if staging.exists():
                remove_tree(staging, root=staging)
    _check_private_copy(copy)
    return copy / "pgserver" / "pginstall"


def reachable_install(
    install: Path, user: pwd.struct_passwd | None, cache_dir: Path | None = None
) -> Path:
    """``install`` itself when ``user`` (None: the current user) can run its PostgreSQL,
    else a copy it can run (see :func:`relocated_install`).

    Raises :class:`PostgresUnreachableError`, with the reason, when no copy can be made or
    even the copy is out of the user's reach (e.g. the temp dir is private: set ``TMPDIR`` to
    a directory others can enter)."""
    if user is None:
        return install
    first = install_problem(install, user)
    if first is None:
        return install
    try:
        copy = relocated_install(install, cache_dir)
    except (OSError, EmbeddedServerError) as exc:
        raise PostgresUnreachableError(
            f"{first}; copying the binaries to where it can reach them failed: {exc}"
        ) from exc
    second = install_problem(copy, user)
    if second is not None:
        raise PostgresUnreachableError(f"{first}; and from the copy in {copy}: {second}")
    return copy


# -- the server ----------------------------------------------------------------------------------


class PostgresServer(_ChildServer):
    """A real PostgreSQL 16 server on 127.0.0.1 with trust authentication for ``postgres``.

    ``dir`` becomes the data directory (``initdb`` runs when it is empty); the caller owns it.
    ``install`` is a ``pginstall``-like directory (default: the ``pgserver`` wheel's);
    ``cache_dir`` is where a copy of it goes when the server's user cannot reach it (default:
    the system temp dir). As root the server runs as ``nobody``: ``dir`` is handed to that
    user and every parent directory of ``dir`` must already be traversable by others (those
    of :func:`temporary_root` are; pytest's ``tmp_path`` is not).

    Raises :class:`EmbeddedServerError` when the binaries are missing, and
    :class:`PostgresUnreachableError` when, as root, there is no ``nobody``; :meth:`start`
    raises :class:`PostgresUnreachableError` (see :meth:`check_reachable`) or
    :class:`EmbeddedServerError`, with the reason, when the server cannot run.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave
    start_timeout_s = 60.0
    run_as = "nobody"

    def __init__(
        self,
        dir: Path | str,
        port: int | None = None,
        *,
        install: Path | str | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        super().__init__(dir, port)
        self.install = Path(install).absolute() if install else postgres_install_dir()
        if not (self.install / "bin" / "postgres").exists():
            raise EmbeddedServerError(f"no PostgreSQL binaries in {self.install / 'bin'}")
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam(self.run_as)
            except KeyError as exc:
                raise PostgresUnreachableError(
                    f"running as root and there is no user {self.run_as!r} to run PostgreSQL as"
                ) from exc
        self._reachable: Path | None = None
        self._temp_root: Path | None = None

    @classmethod
    def temporary(
        cls,
        port: int | None = None,
        *,
        install: Path | str | None = None,
        cache_dir: Path | str | None = None,
    ) -> PostgresServer:
        """A server whose data directory lies in a new :func:`temporary_root`, which the
        server owns: :meth:`remove` stops the server and deletes that root."""
        root = temporary_root()
        try:
            server = cls(root / "data", port, install=install, cache_dir=cache_dir)
        except BaseException:
            remove_tree(root, root=root)
            raise
        server._temp_root = root
        return server

    @property
    def bin_dir(self) -> Path:
        """The ``bin`` directory the server runs from: the install's, or that of a copy the
        server's user can reach (decided at :meth:`start`)."""
        return (self._reachable or self.install) / "bin"

    @property
    def log_path(self) -> Path:
        # Outside the data directory, which belongs to the server's user.
        return self.dir.parent / f"{self.dir.name}.log"

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        """The SQLAlchemy URL (``postgresql+psycopg://``) of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        # Start in the data directory: the caller's working directory may be out of reach.
        return {**_as_user(self._user), "cwd": str(self.dir)}

    def check_reachable(self) -> None:
        """Make sure the server's user can reach the data directory and the binaries, copying
        the binaries where it can reach them if need be (see :func:`reachable_install`). Does
        nothing when the server runs as the current user. Raises
        :class:`PostgresUnreachableError` with the reason otherwise."""
        if self._user is None:
            return
        self.check_data_dir_reachable()
        if self._reachable is None:
            self._reachable = reachable_install(self.install, self._user, self._cache_dir)

    def _prepare(self) -> None:
        self.check_reachable()
        if self._user is not None:
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

    def check_data_dir_reachable(self) -> None:
        """Check that the server's user can enter every parent of the data directory (we never
        loosen permissions up the tree). Does nothing when the server runs as the current
        user. Raises :class:`PostgresUnreachableError` naming the first directory it cannot
        enter."""
        if self._user is None:
            return
        for parent in self.dir.parents:
            st = parent.stat()
            if st.st_mode & 0o001 == 0 and st.st_uid != self._user.pw_uid:
                hint = (
                    f"set TMPDIR to a directory that others can enter ({tempfile.gettempdir()} "
                    "is the system temp dir, where PostgresServer.temporary() puts its data)"
                    if self._temp_root is not None
                    else "put the data directory under a path that others can traverse, or use "
                    "PostgresServer.temporary()"
                )
                raise PostgresUnreachableError(
                    f"PostgreSQL runs as {self.run_as!r} and cannot enter {parent} (mode "
                    f"{oct(st.st_mode & 0o777)}); {hint}"
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
        """Run one SQL command with the bundled ``psql``; returns its unaligned output.
        Raises :class:`EmbeddedServerError` with psql's message when the command fails."""
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
        """Create an empty database and return its SQLAlchemy URL. Raises ``ValueError`` for a
        name that is not plain letters, digits and underscores."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def remove(self) -> None:
        """Stop the server; for a :meth:`temporary` server, also delete the root it made (data
        directory and log). A server on a caller's directory leaves that directory to the
        caller. The shared copy of the binaries (:func:`relocated_install`) is kept."""
        self.stop()
        root, self._temp_root = self._temp_root, None
        if root is not None:
            remove_tree(root, root=root)
