"""Blob storage for datasets and checkpoints behind one small interface.

``LocalStorage`` keeps blobs under a directory (``Settings.storage_dir`` by default); an object
store can implement :class:`Storage` later so that several machines share blobs. Keys are
relative POSIX paths such as ``datasets/ds_<hex>.txt``.

Keys are never built from user input: the service makes them from the ids it generates
(``datasets/<dataset id>.txt``, ``checkpoints/<job id>/<checkpoint id>.safetensors``), and a
file name sent with an upload is only recorded, never used as a path. As a second line,
:meth:`LocalStorage.path` accepts only keys of the shape :data:`KEY_PATTERN` (no absolute path,
no ``..`` or hidden segment, no backslash, NUL or other control character) that resolve inside
the root; anything else is a ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from core.errors import PayloadTooLarge

CHUNK_BYTES = 1 << 20
# A storage key: "/"-separated segments of letters, digits, "_", "-" and ".", none starting with
# "." (so no "." or ".." segment and no hidden file).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


class BlobWriter:
    """Receives a blob chunk by chunk into a temporary file beside its destination, hashing as
    it goes; :meth:`LocalStorage.writer` renames it into place only when the block succeeds."""

    def __init__(self, fh: BinaryIO, max_bytes: int | None) -> None:
        self._fh = fh
        self._max = max_bytes
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self._max is not None and self.bytes > self._max:
            raise PayloadTooLarge(
                f"upload exceeds the limit of {self._max} bytes",
                details=[{"limit_bytes": self._max}],
            )
        self._sha.update(chunk)
        self._fh.write(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class Storage(Protocol):
    def writer(
        self, key: str, max_bytes: int | None = None
    ) -> AbstractContextManager[BlobWriter]:
        """Context manager: write chunks, then the blob appears atomically at ``key``."""
        ...

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]:
        """Store ``chunks`` at ``key`` atomically; returns ``(bytes, sha256 hex)``.
        Raises :class:`PayloadTooLarge` past ``max_bytes`` (nothing is stored then)."""
        ...

    def put_bytes(self, key: str, data: bytes) -> tuple[int, str]: ...

    def open(self, key: str) -> BinaryIO: ...

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]: ...

    def read_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...


class LocalStorage:
    """Blobs as files under ``root``. Writes are atomic: temporary file, fsync, rename, fsync of
    the directory, so a crash leaves either the old blob or the new one, never half of one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file of ``key`` under the root. Raises ``ValueError`` for a key that is not of
        the shape :data:`KEY_PATTERN` or that resolves outside the root (a symlink)."""
        if not isinstance(key, str) or len(key) > 1024 or not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"invalid storage key {key!r}")
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}: outside the storage root")
        return path

    @contextmanager
    def writer(self, key: str, max_bytes: int | None = None) -> Iterator[BlobWriter]:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                w = BlobWriter(fh, max_bytes)
                yield w
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]:
        with self.writer(key, max_bytes) as w:
            for chunk in chunks:
                w.write(chunk)
        return w.bytes, w.sha256

    def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        return self.put_stream(key, [data])

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str, chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
