"""Streaming multipart upload of a dataset's files.

Starlette's form parser spools a whole file to a temporary file before the handler runs, with
no size limit. Here the request body is parsed as it arrives: each ``file`` part (at most
:data:`MAX_FILES`) goes into an anonymous temporary file (``tempfile.TemporaryFile``: removed
when closed, and by the OS if the process dies), all of them together capped at the upload
limit (413 past it). ``app.datasets.store_upload`` then decompresses, checks and converts them
into the stored dataset (``core.ingest``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.errors import PayloadTooLarge, ValidationFailed
from core.ingest import RawFile
from core.spec import CONTROL_CHARS

MAX_NAME_BYTES = 800
MAX_NAME_CHARS = 200  # the dataset name's maxLength in the OpenAPI document
# Multipart framing (boundaries, part headers, the name field) on top of the file itself.
FRAMING_SLACK_BYTES = 64 * 1024
#: The most ``file`` parts one upload may have.
MAX_FILES = 100


@dataclass
class Received:
    """The ``file`` parts of an upload (in order, as temporary files to :meth:`close`), the
    ``name`` field and the raw bytes received."""

    files: list[RawFile]
    filenames: list[str | None]
    name: str | None
    raw_bytes: int

    @property
    def filename(self) -> str | None:
        return self.filenames[0] if self.filenames else None

    def close(self) -> None:
        for f in self.files:
            f.fh.close()


@dataclass
class _Parts:
    max_bytes: int
    files: list[BinaryIO] = field(default_factory=list)
    filenames: list[str | None] = field(default_factory=list)
    received: int = 0  # bytes of all file parts
    header_field: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""
    target: str | None = None  # "file", "name" or None (ignored part)
    name: bytearray = field(default_factory=bytearray)
    ended: bool = False  # the closing boundary was read

    def on_end(self) -> None:
        self.ended = True

    def on_part_begin(self) -> None:
        self.disposition, self.target = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_field.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.disposition)
        part = params.get(b"name", b"").decode("utf-8", "replace")
        if part == "file":
            if len(self.files) >= MAX_FILES:
                raise ValidationFailed(f"send at most {MAX_FILES} 'file' parts", field="file")
            self.target = "file"
            fn = params.get(b"filename")
            self.filenames.append(fn.decode("utf-8", "replace") if fn else None)
            self.files.append(tempfile.TemporaryFile())
        elif part == "name":
            self.target = "name"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.target == "file":
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise PayloadTooLarge(
                    f"upload exceeds the limit of {self.max_bytes} bytes",
                    details=[{"limit_bytes": self.max_bytes}],
                )
            self.files[-1].write(chunk)
        elif self.target == "name":
            self.name += chunk
            if len(self.name) > MAX_NAME_BYTES:
                raise ValidationFailed("name is too long", field="name")


def _check_names(parts: _Parts) -> None:
    """422 for a file name or a dataset name with control characters (never stored: NUL is
    refused by PostgreSQL, and they forge log lines), and for a name past MAX_NAME_CHARS."""
    for filename in parts.filenames:
        if filename is not None and CONTROL_CHARS.search(filename):
            raise ValidationFailed("the file name must not contain control characters",
                                   field="file")
    name = bytes(parts.name).decode("utf-8", "replace")
    if CONTROL_CHARS.search(name):
        raise ValidationFailed("name must not contain control characters", field="name")
    if len(name.strip()) > MAX_NAME_CHARS:
        raise ValidationFailed(f"name is longer than {MAX_NAME_CHARS} characters", field="name")


async def receive_files(request: Request, max_bytes: int) -> Received:
    """Receive the ``file`` parts of a ``multipart/form-data`` request into temporary files
    (the caller closes them: :meth:`Received.close`).

    Raises :class:`PayloadTooLarge` when the file parts together pass ``max_bytes`` and
    :class:`ValidationFailed` for a body that is not multipart, is cut short, or has no
    ``file`` part; nothing is kept then."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ValidationFailed(
            "send the text as multipart/form-data with the file in field 'file'", field="file"
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + FRAMING_SLACK_BYTES:
        raise PayloadTooLarge(
            f"upload exceeds the limit of {max_bytes} bytes",
            details=[{"limit_bytes": max_bytes, "content_length": int(length)}],
        )
    parts = _Parts(max_bytes)
    try:
        callbacks = {
            name: getattr(parts, name)
            for name in ("on_part_begin", "on_header_field", "on_header_value",
                         "on_header_end", "on_headers_finished", "on_part_data", "on_end")
        }
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        try:
            async for chunk in request.stream():
                # Disk writes are blocking: keep them off the event loop.
                await run_in_threadpool(parser.write, chunk)
            parser.finalize()
        except FormParserError as exc:
            raise ValidationFailed(f"the body is not valid multipart/form-data ({exc})",
                                   code="malformed_body") from None
        if not parts.ended:  # a truncated upload: never store part of a file as a dataset
            raise ValidationFailed("the body is not valid multipart/form-data (it ends before "
                                   "its closing boundary: was the upload cut short?)",
                                   code="malformed_body")
        _check_names(parts)
        if not parts.files:
            raise ValidationFailed("the form has no 'file' field", field="file")
        files = []
        for i, (fh, filename) in enumerate(zip(parts.files, parts.filenames, strict=True)):
            fh.seek(0)
            files.append(RawFile(filename or f"file {i + 1}", fh))
    except BaseException:
        for fh in parts.files:
            fh.close()
        raise
    name = bytes(parts.name).decode("utf-8", "replace").strip() or None
    return Received(files, parts.filenames, name, parts.received)
