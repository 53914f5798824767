"""Serving a stored blob with the HTTP semantics download tools rely on (RFC 9110).

:func:`blob_response` answers ``GET`` and ``HEAD`` (the same headers, no body), with a strong
``ETag`` (the blob's sha256 in quotes) and ``Last-Modified``; a conditional request whose
``If-None-Match`` matches the ETag (or, without ``If-None-Match``, whose ``If-Modified-Since``
is not older than the blob) gets 304 and no body. Range requests (``Range: bytes=...``,
``If-Range``) get 206 with the part or parts asked for, from Starlette's ``FileResponse``; a
malformed range is a 400 and one past the end a 416 (with ``Content-Range: bytes */<size>``),
both in the API's error shape.

A blob whose bytes do not match its recorded sha256 is never served (503): it is hashed once
per version of the file (path, size, modification time and inode), and that verdict is kept
for later requests, so a download tool's HEAD, its GET and its parallel range requests cost
one read of the blob, not one each.

With S3 storage (``store.s3storage.S3Storage``) the same answers are streamed from the object
store (``GetObject``, with ``Range``; several ranges as ``multipart/byteranges``, one
``GetObject`` each): the object's recorded sha256 (``x-amz-meta-sha256``) must
be the row's, and its bytes are hashed once per version of the object (its S3 ETag, size and
modification time) before any is served, each later read pinned to that version with
``If-Match``. With ``LMFORGE_DOWNLOAD_PRESIGN_S`` set, a ``GET`` is answered with ``307`` to a
presigned ``GetObject`` URL valid that many seconds instead (after the same checks; ``HEAD``
and conditional requests are still answered by the API).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request, Response
from starlette.responses import (
    FileResponse,
    MalformedRangeHeader,
    RangeNotSatisfiable,
    RedirectResponse,
    StreamingResponse,
)

from app.http_errors import error_response
from core.errors import ServiceUnavailable
from store.storage import LocalStorage, Storage

if TYPE_CHECKING:
    from store.s3storage import ObjectInfo, S3Storage

# How many verified blob versions each API process remembers.
VERIFIED_CACHE_SIZE = 1024
_CHUNK = 1024 * 1024

_verified: OrderedDict[tuple[Any, ...], bool] = OrderedDict()
_verified_lock = threading.Lock()


_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def content_disposition(filename: str) -> str:
    """A safe ``Content-Disposition: attachment`` for ``filename`` (RFC 6266): ``filename=``
    holds an ASCII fallback of letters, digits, ``.``, ``_`` and ``-`` only (anything else
    becomes ``_``, a leading ``.`` too, so no quote, backslash, CR/LF, path separator or
    hidden name can get through), and ``filename*=UTF-8''`` the name percent-encoded
    (RFC 8187) with ``/`` and ``\\`` replaced, for clients that read it."""
    base = filename.replace("/", "_").replace("\\", "_")
    fallback = _UNSAFE_FILENAME_CHARS.sub("_", base).lstrip(".") or "download"
    encoded = quote(base.lstrip(".") or "download", safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def etag_of(sha256_hex: str) -> str:
    """The strong entity tag of a blob: its sha256 (hex) in double quotes."""
    return f'"{sha256_hex}"'


def _etag_list_matches(header: str, etag: str) -> bool:
    """``If-None-Match`` evaluation (RFC 9110 section 13.1.2): ``*`` or any listed tag equal
    to ``etag`` under the weak comparison (a ``W/`` prefix is ignored)."""
    if header.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in header.split(","))


def _not_modified_since(header: str, mtime: float) -> bool:
    """``If-Modified-Since`` evaluation: the blob (modified at ``mtime``, seconds since the
    epoch) is not newer than the header's date."""
    try:
        since = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False  # an invalid date: the condition is ignored (RFC 9110 13.1.3)
    if since.tzinfo is None:
        return False
    return int(mtime) <= since.timestamp()


def _not_modified(request: Request, etag: str, mtime: float) -> bool:
    """Whether the conditional request gets 304: its ``If-None-Match`` matches ``etag``, or
    it has none and its ``If-Modified-Since`` is not older than ``mtime``."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        return _etag_list_matches(if_none_match, etag)
    since = request.headers.get("if-modified-since")
    return since is not None and _not_modified_since(since, mtime)


def _matches_sha256(path: Path, st: os.stat_result, sha256_hex: str) -> bool:
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256_hex)

    def digest() -> str:
        d = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                d.update(chunk)
        return d.hexdigest()

    return _verified_once(key, sha256_hex, digest)


def _verified_once(key: tuple[Any, ...], sha256_hex: str, digest: Any) -> bool:
    """Whether ``digest()`` (the blob's sha256, computed only when this version ``key`` was
    not checked before) equals ``sha256_hex``; the verdict is remembered (LRU)."""
    with _verified_lock:
        if key in _verified:
            _verified.move_to_end(key)
            return _verified[key]
    ok = digest() == sha256_hex
    with _verified_lock:
        _verified[key] = ok
        while len(_verified) > VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
    return ok


def _if_range_holds(request: Request, etag: str, last_modified: str) -> bool:
    """Whether a ``Range`` may be served: no ``If-Range``, or one naming the current strong
    ETag or Last-Modified (RFC 9110, section 13.1.5; a weak ETag never matches)."""
    if_range = request.headers.get("if-range")
    return if_range is None or (not if_range.startswith("W/")
                                and if_range in (etag, last_modified))


def _range_error(request: Request, etag: str, last_modified: str, size: int) -> Response | None:
    """The API's answer to a ``Range`` header that ``FileResponse`` would refuse (400 for a
    malformed one, 416 for one past the end), or None when it may serve it."""
    http_range = request.headers.get("range")
    if http_range is None or not _if_range_holds(request, etag, last_modified):
        return None  # the representation changed: FileResponse ignores the Range
    try:
        FileResponse._parse_range_header(http_range, size)
    except MalformedRangeHeader as exc:
        return error_response(400, "invalid_range", f"Range: {exc.content}", field="Range")
    except RangeNotSatisfiable:
        return error_response(
            416, "range_not_satisfiable",
            f"Range: no requested range starts inside the {size} bytes", field="Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return None


def blob_response(
    request: Request,
    storage: Storage,
    key: str,
    *,
    sha256_hex: str,
    filename: str,
    what: str,
    corrupt_code: str,
    corrupt_advice: str,
    headers: dict[str, str] | None = None,
    media_type: str = "application/octet-stream",
) -> Response:
    """The blob ``key`` for ``GET``/``HEAD`` ``request``, as the module docstring describes
    (``storage`` must keep its blobs in files: :class:`LocalStorage`).

    ``what`` names the blob in messages ("checkpoint ckpt_..."). Raises
    :class:`ServiceUnavailable`: ``blob_missing`` when storage lacks the blob, and
    ``corrupt_code`` (with ``corrupt_advice`` appended to the message) when its bytes do not
    match ``sha256_hex``."""
    corrupt = ServiceUnavailable(
        f"{what} is damaged in storage (its sha256 does not match); {corrupt_advice}",
        code=corrupt_code)
    s3 = _as_s3(storage)
    if s3 is not None:
        return _s3_blob_response(request, s3, key, sha256_hex=sha256_hex, filename=filename,
                                 what=what, corrupt=corrupt, headers=headers,
                                 media_type=media_type)
    if not storage.exists(key):
        raise ServiceUnavailable(f"the blob of {what} is missing from storage",
                                 code="blob_missing")
    if not isinstance(storage, LocalStorage):
        raise TypeError(f"downloads are served from files; {type(storage).__name__} has none")
    etag = etag_of(sha256_hex)
    out_headers = {**(headers or {}), "ETag": etag}
    path = storage.path(key)
    st = path.stat()
    last_modified = formatdate(st.st_mtime, usegmt=True)
    if _not_modified(request, etag, st.st_mtime):
        return Response(status_code=304, headers={"ETag": etag, "Last-Modified": last_modified})
    if not _matches_sha256(path, st, sha256_hex):
        raise corrupt
    refused = _range_error(request, etag, last_modified, st.st_size)
    if refused is not None:
        return refused
    out_headers["Content-Disposition"] = content_disposition(filename)
    return FileResponse(path, headers=out_headers, media_type=media_type, stat_result=st)



def _as_s3(storage: Storage) -> S3Storage | None:
    """``storage`` when it is an :class:`~store.s3storage.S3Storage` (boto3 is imported only
    when the storage is not local)."""
    if isinstance(storage, LocalStorage):
        return None
    try:
        from store.s3storage import S3Storage
    except ImportError:  # no boto3: it cannot be one
        return None
    return storage if isinstance(storage, S3Storage) else None


def _s3_blob_response(
    request: Request,
    storage: S3Storage,
    key: str,
    *,
    sha256_hex: str,
    filename: str,
    what: str,
    corrupt: ServiceUnavailable,
    headers: dict[str, str] | None,
    media_type: str,
) -> Response:
    """:func:`blob_response` for an object store (the module docstring says how). A store
    that fails is :class:`store.storage.StorageUnavailable` (503 ``storage_unavailable``)."""
    missing = ServiceUnavailable(f"the blob of {what} is missing from storage",
                                 code="blob_missing")
    try:
        info = storage.head(key)
        if info is None:
            raise missing
        etag = etag_of(sha256_hex)
        mtime = info.last_modified.timestamp()
        last_modified = formatdate(mtime, usegmt=True)
        if _not_modified(request, etag, mtime):
            return Response(status_code=304,
                            headers={"ETag": etag, "Last-Modified": last_modified})
        if info.sha256 is not None and info.sha256 != sha256_hex:
            raise corrupt
        version = ("s3", storage.bucket, storage.object_key(key), info.etag, info.size, mtime)
        if not _verified_once((*version, sha256_hex), sha256_hex,
                              lambda: storage.sha256_of(key, if_match=info.etag)):
            raise corrupt
        disposition = content_disposition(filename)
        presign_s = getattr(getattr(request.app.state, "settings", None),
                            "download_presign_s", None)
        if presign_s and request.method == "GET":
            return RedirectResponse(
                storage.presigned_url(key, presign_s, disposition), status_code=307,
                headers={**(headers or {}), "ETag": etag, "Cache-Control": "no-store"})
        out = {**(headers or {}), "ETag": etag, "Last-Modified": last_modified,
               "Accept-Ranges": "bytes", "Content-Disposition": disposition}
        return _s3_body(request, storage, key, info, out, media_type)
    except FileNotFoundError as exc:  # removed meanwhile
        raise missing from exc


def _s3_body(request: Request, storage: S3Storage, key: str, info: ObjectInfo,
             out: dict[str, str], media_type: str) -> Response:
    """The 200 (whole object) or 206 (one range, or several as ``multipart/byteranges``)
    answer, streamed from the store (``HEAD``: the headers alone), or the 400/416 of a range
    it cannot serve. Every read is pinned to the checked version (``If-Match``)."""
    etag, last_modified = out["ETag"], out["Last-Modified"]
    refused = _range_error(request, etag, last_modified, info.size)
    if refused is not None:
        return refused
    ranges = _ranges(request, etag, last_modified, info.size)
    if ranges is not None and len(ranges) > 1:
        return _s3_multipart(request, storage, key, info, ranges, out, media_type)
    byte_range = ranges[0] if ranges else None
    status = 200 if byte_range is None else 206
    first, last = byte_range or (0, info.size - 1)
    out["Content-Length"] = str(last - first + 1)
    if byte_range is not None:
        out["Content-Range"] = f"bytes {first}-{last}/{info.size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=out, media_type=media_type)
    body = storage.stream(key, if_match=info.etag, byte_range=byte_range)
    return StreamingResponse(body, status_code=status, headers=out, media_type=media_type)


def _s3_multipart(request: Request, storage: S3Storage, key: str, info: ObjectInfo,
                  ranges: list[tuple[int, int]], out: dict[str, str],
                  media_type: str) -> Response:
    """206 ``multipart/byteranges`` (RFC 9110 14.6) of ``ranges`` (inclusive), one
    ``GetObject`` per range, in the part layout Starlette's ``FileResponse`` sends."""
    boundary = secrets.token_hex(13)
    heads = [(f"--{boundary}\r\nContent-Type: {media_type}\r\n"
              f"Content-Range: bytes {a}-{b}/{info.size}\r\n\r\n").encode("latin-1")
             for a, b in ranges]
    tail = f"--{boundary}--".encode("latin-1")
    out["Content-Length"] = str(sum(len(h) + (b - a + 1) + 2
                                    for h, (a, b) in zip(heads, ranges, strict=True))
                                + len(tail))
    content_type = f"multipart/byteranges; boundary={boundary}"
    if request.method == "HEAD":
        return Response(status_code=206, headers=out, media_type=content_type)
    first = storage.stream(key, if_match=info.etag, byte_range=ranges[0])  # fails here, early

    def body() -> Iterator[bytes]:
        for n, (head, byte_range) in enumerate(zip(heads, ranges, strict=True)):
            yield head
            yield from (first if n == 0 else
                        storage.stream(key, if_match=info.etag, byte_range=byte_range))
            yield b"\r\n"
        yield tail

    return StreamingResponse(body(), status_code=206, headers=out, media_type=content_type)


def _ranges(request: Request, etag: str, last_modified: str,
            size: int) -> list[tuple[int, int]] | None:
    """The ranges ``(first, last)`` (inclusive; overlapping ones merged) the request asks
    for and may get, or None (no Range, or an If-Range that no longer matches: the whole
    blob). Call after :func:`_range_error` accepted the header."""
    http_range = request.headers.get("range")
    if http_range is None or not _if_range_holds(request, etag, last_modified):
        return None
    return [(start, end - 1) for start, end in FileResponse._parse_range_header(http_range, size)]
