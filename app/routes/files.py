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
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

from fastapi import Request, Response
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable

from app.http_errors import error_response
from core.errors import ServiceUnavailable
from store.storage import LocalStorage, Storage

# How many verified blob versions each API process remembers.
VERIFIED_CACHE_SIZE = 1024
_CHUNK = 1024 * 1024

_verified: OrderedDict[tuple[str, int, int, int, int, str], bool] = OrderedDict()
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


def _not_modified_since(header: str, st: os.stat_result) -> bool:
    try:
        since = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return False  # an invalid date: the condition is ignored (RFC 9110 13.1.3)
    if since.tzinfo is None:
        return False
    return int(st.st_mtime) <= since.timestamp()


def _matches_sha256(path: Path, st: os.stat_result, sha256_hex: str) -> bool:
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256_hex)
    with _verified_lock:
        if key in _verified:
            _verified.move_to_end(key)
            return _verified[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    ok = digest.hexdigest() == sha256_hex
    with _verified_lock:
        _verified[key] = ok
        while len(_verified) > VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
    return ok


def _range_error(request: Request, etag: str, last_modified: str, size: int) -> Response | None:
    """The API's answer to a ``Range`` header that ``FileResponse`` would refuse (400 for a
    malformed one, 416 for one past the end), or None when it may serve it."""
    http_range = request.headers.get("range")
    if http_range is None:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and (if_range.startswith("W/")
                                 or if_range not in (etag, last_modified)):
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
    if_none_match = request.headers.get("if-none-match")
    if_modified_since = request.headers.get("if-modified-since")
    if (if_none_match is not None and _etag_list_matches(if_none_match, etag)) or (
        if_none_match is None and if_modified_since is not None
        and _not_modified_since(if_modified_since, st)
    ):
        return Response(status_code=304, headers={"ETag": etag, "Last-Modified": last_modified})
    if not _matches_sha256(path, st, sha256_hex):
        raise ServiceUnavailable(
            f"{what} is damaged in storage (its sha256 does not match); {corrupt_advice}",
            code=corrupt_code)
    refused = _range_error(request, etag, last_modified, st.st_size)
    if refused is not None:
        return refused
    out_headers["Content-Disposition"] = content_disposition(filename)
    return FileResponse(path, headers=out_headers, media_type=media_type, stat_result=st)

