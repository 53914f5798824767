"""Streaming multipart upload of one text file into storage.

Starlette's form parser spools a whole file to a temporary file before the handler runs, with
no size limit. Here the request body is parsed as it arrives: the ``file`` part goes straight
into a storage writer (atomic, hashed, capped) while its UTF-8 text is decoded and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.errors import PayloadTooLarge, ValidationFailed
from core.spec import CONTROL_CHARS
from core.textstats import TextCounter, TextStats
from store.storage import BlobWriter, Storage

MAX_NAME_BYTES = 800
MAX_NAME_CHARS = 200  # the dataset name's maxLength in the OpenAPI document
# Multipart framing (boundaries, part headers, the name field) on top of the file itself.
FRAMING_SLACK_BYTES = 64 * 1024


@dataclass
class Upload:
    filename: str | None
    name: str | None
    bytes: int
    sha256: str
    stats: TextStats


@dataclass
class _Parts:
    writer: BlobWriter
    counter: TextCounter = field(default_factory=TextCounter)
    header_field: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""
    target: str | None = None  # "file", "name" or None (ignored part)
    filename: str | None = None
    name: bytearray = field(default_factory=bytearray)
    seen_file: bool = False
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
            if self.seen_file:
                raise ValidationFailed("send exactly one 'file' part", field="file")
            self.seen_file, self.target = True, "file"
            fn = params.get(b"filename")
            self.filename = fn.decode("utf-8", "replace") if fn else None
        elif part == "name":
            self.target = "name"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.target == "file":
            self.writer.write(chunk)
            self.counter.feed(chunk)
        elif self.target == "name":
            self.name += chunk
            if len(self.name) > MAX_NAME_BYTES:
                raise ValidationFailed("name is too long", field="name")


def _check_names(parts: _Parts) -> None:
    """422 for a file name or a dataset name with control characters (never stored: NUL is
    refused by PostgreSQL, and they forge log lines), and for a name past MAX_NAME_CHARS."""
    if parts.filename is not None and CONTROL_CHARS.search(parts.filename):
        raise ValidationFailed("the file name must not contain control characters",
                               field="file")
    name = bytes(parts.name).decode("utf-8", "replace")
    if CONTROL_CHARS.search(name):
        raise ValidationFailed("name must not contain control characters", field="name")
    if len(name.strip()) > MAX_NAME_CHARS:
        raise ValidationFailed(f"name is longer than {MAX_NAME_CHARS} characters", field="name")


async def receive_text_file(
    request: Request, storage: Storage, key: str, max_bytes: int
) -> Upload:
    """Stream the ``file`` part of a ``multipart/form-data`` request to ``key``.

    Raises :class:`PayloadTooLarge` past ``max_bytes`` and :class:`ValidationFailed` for a
    missing, empty or non-UTF-8 file; nothing is stored then."""
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
    with storage.writer(key, max_bytes) as writer:
        parts = _Parts(writer)
        callbacks = {
            name: getattr(parts, name)
            for name in ("on_part_begin", "on_header_field", "on_header_value",
                         "on_header_end", "on_headers_finished", "on_part_data", "on_end")
        }
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        try:
            async for chunk in request.stream():
                # Disk writes, hashing and UTF-8 decoding are blocking: keep them off the loop.
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
        if not parts.seen_file:
            raise ValidationFailed("the form has no 'file' field", field="file")
        stats = parts.counter.finish()
        if stats.num_chars == 0:
            raise ValidationFailed("the file is empty", field="file")
    name = bytes(parts.name).decode("utf-8", "replace").strip() or None
    return Upload(parts.filename, name, writer.bytes, writer.sha256, stats)
