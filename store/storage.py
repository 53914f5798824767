"""Blob storage for datasets and checkpoints behind one small interface.

``LocalStorage`` keeps blobs under a directory (``Settings.storage_dir`` by default);
``store.s3storage.S3Storage`` keeps them in an S3-compatible object store so that several
machines share them. :func:`make_storage` picks one from ``LMFORGE_STORAGE_URL`` (unset: local;
``s3://BUCKET/PREFIX``: S3). Keys are relative POSIX paths such as ``datasets/ds_<hex>.txt``.

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
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlsplit

from core.errors import PayloadTooLarge, ServiceUnavailable

if TYPE_CHECKING:
    from store.settings import Settings

CHUNK_BYTES = 1 << 20
# A storage key: "/"-separated segments of letters, digits, "_", "-" and ".", none starting with
# "." (so no "." or ".." segment and no hidden file).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
MAX_KEY_CHARS = 1024
# An S3 bucket name (the rules of AWS S3's general purpose buckets).
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class BlobCorrupt(OSError):
    """A stored blob's bytes do not match the sha256 recorded with it (an object store's
    ``x-amz-meta-sha256``): the blob is damaged and must not be used. An ``OSError``, so a
    reader that treats unreadable blobs as errors (``TextSource``) reports it as one; the
    callers that have a code for damaged blobs (``checkpoint_corrupt``, ...) catch it."""


class StorageUnavailable(ServiceUnavailable):
    """The blob store cannot be used right now (an object store that does not answer, refuses
    the credentials or fails the request): 503 ``storage_unavailable`` in the API."""

    code = "storage_unavailable"


def check_key(key: str) -> str:
    """``key`` when it is a storage key of the shape :data:`KEY_PATTERN` (at most
    :data:`MAX_KEY_CHARS` characters); else ``ValueError``."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"invalid storage key {key!r}")
    return key


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

    def read_back(self) -> BinaryIO:
        """The blob as written so far, readable and seekable from its start (the writer's own
        temporary file: no second copy, and no round trip to an object store). Call it after
        the last :meth:`write`."""
        self._fh.flush()
        self._fh.seek(0)
        return self._fh


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


class WriterPuts:
    """``put_stream`` and ``put_bytes`` of a storage, through its ``writer``."""

    def writer(self, key: str, max_bytes: int | None = None
               ) -> AbstractContextManager[BlobWriter]:
        raise NotImplementedError

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]:
        with self.writer(key, max_bytes) as w:
            for chunk in chunks:
                w.write(chunk)
        return w.bytes, w.sha256

    def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        return self.put_stream(key, [data])


class LocalStorage(WriterPuts):
    """Blobs as files under ``root``. Writes are atomic: temporary file, fsync, rename, fsync of
    the directory, so a crash leaves either the old blob or the new one, never half of one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file of ``key`` under the root. Raises ``ValueError`` for a key that is not of
        the shape :data:`KEY_PATTERN` or that resolves outside the root (a symlink)."""
        path = self.root / check_key(key)
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"invalid storage key {key!r}: outside the storage root")
        return path

    @contextmanager
    def writer(self, key: str, max_bytes: int | None = None) -> Iterator[BlobWriter]:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w+b") as fh:  # readable: read_back
                w = BlobWriter(fh, max_bytes)
                yield w
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

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


def parse_storage_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of an ``LMFORGE_STORAGE_URL`` of the form ``s3://BUCKET`` or
    ``s3://BUCKET/PREFIX`` (prefix: "/"-separated segments of the shape of a storage key, no
    trailing "/"; "" when absent). Raises ``ValueError`` naming the variable and the problem."""
    where = f"LMFORGE_STORAGE_URL={url!r}"
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"{where}: the scheme must be s3 (s3://BUCKET/PREFIX)")
    if parts.query or parts.fragment or parts.username or parts.password or parts.port:
        raise ValueError(f"{where}: only s3://BUCKET/PREFIX is allowed (no credentials, port, "
                         "query or fragment; the endpoint is AWS_ENDPOINT_URL)")
    if not BUCKET_PATTERN.fullmatch(parts.hostname or "") or parts.hostname != parts.netloc:
        raise ValueError(f"{where}: {parts.netloc!r} is not a valid bucket name (3-63 "
                         "characters: lower-case letters, digits, '.' and '-')")
    prefix = parts.path.strip("/")
    if prefix and (len(prefix) > 256 or not KEY_PATTERN.fullmatch(prefix)):
        raise ValueError(f"{where}: the prefix {prefix!r} must be '/'-separated segments of "
                         "letters, digits, '_', '-' and '.', none starting with '.'")
    return parts.netloc, prefix


def make_storage(settings: Settings) -> Storage:
    """The service's blob storage: :class:`LocalStorage` under ``settings.storage_dir`` when
    ``LMFORGE_STORAGE_URL`` is unset, ``store.s3storage.S3Storage`` when it is
    ``s3://BUCKET/PREFIX`` (endpoint, credentials and region from the standard ``AWS_*``
    variables, read by boto3). Raises ``ValueError`` for a malformed URL and ``RuntimeError``
    when S3 is asked for but boto3 (the ``s3`` extra) is not installed."""
    if not settings.storage_url:
        return LocalStorage(settings.storage_dir)
    bucket, prefix = parse_storage_url(settings.storage_url)
    try:
        from store.s3storage import S3Storage
    except ImportError as exc:
        raise RuntimeError(
            f"LMFORGE_STORAGE_URL is {settings.storage_url!r} but boto3 is not installed: "
            "pip install 'lmforge[s3]'") from exc
    return S3Storage(bucket, prefix,
                     multipart_threshold=settings.s3_multipart_threshold_bytes,
                     multipart_chunksize=settings.s3_multipart_chunk_bytes,
                     addressing_style=settings.s3_addressing_style)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
