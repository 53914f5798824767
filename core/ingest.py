"""Dataset uploads into the stored formats (torch-free; ``app.datasets`` drives it).

An upload is one or more files, each plain or compressed (gzip or Zstandard: told by their
first bytes, never by their names), in one source format:

- ``text``: UTF-8 text. Stored as it is but for line ends: every line break
  ``str.splitlines`` knows (``\\r\\n``, ``\\r``, ``\\v``, ``\\f``, ``\\x1c``-``\\x1e``, U+0085,
  U+2028, U+2029) becomes ``\\n`` (``core.textstats.normalise_line_ends``), so the upload's
  statistics, the submission check and the tokenizers count the same lines.
- ``jsonl``: one JSON object per line (blank lines skipped); the ``text_field`` value of each
  becomes one line of the text dataset.
- ``csv`` (RFC 4180: ``,``, fields quoted with ``"``) and ``tsv`` (tab-separated, no quoting:
  a field holds no tab and no line end): the first row names the columns unless ``columns``
  does (a file without a header row, such as SST-2's ``sentence<TAB>label``); the
  ``text_field`` column of each row becomes one line.

With ``label_field`` the dataset is *labelled* (``kind = "labelled"``): each record or row gives
one example ``(text_field value, label_field value)``, stored in the normalised format of
:mod:`core.labelled`. A label is a non-empty string of at most 200 characters without control
characters (surrounding whitespace is dropped; a JSON integer label is stored as its decimal
text, so SST-2's ``0``/``1`` work from JSON too), a text a non-empty string (its line ends
normalised as above). At most :data:`MAX_LABELS` distinct labels.

Every file: a leading UTF-8 byte-order mark is dropped; its bytes must be UTF-8. Several text
files are joined in the order given, each one starting on a new line (a ``\\n`` is added to a
file that does not end in one when another follows). The decompressed bytes of all files
together are capped (``max_bytes``: 413 past it, so a decompression bomb stops there).

Errors are :class:`~core.errors.ValidationFailed` (422) whose message names the file, the line
and the field, with ``details`` ``[{"file", "line", "field"?}]``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, Protocol

import zstandard

from core.errors import PayloadTooLarge, ValidationFailed
from core.labelled import write_labelled
from core.spec import CONTROL_CHARS
from core.textstats import LineEndNormaliser, normalise_line_ends

Format = Literal["text", "jsonl", "csv", "tsv"]
FORMATS: tuple[str, ...] = ("text", "jsonl", "csv", "tsv")
#: Bytes read from a (decompressed) file at a time.
READ_BYTES = 1 << 20
#: Output written to storage in pieces of about this many characters.
WRITE_CHARS = 1 << 20
#: Compressed bytes given to the Zstandard decompressor at a time (bounds its output per call).
ZSTD_FEED_BYTES = 1024
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"),
                (b"7z\xbc\xaf\x27\x1c", "7z"))

csv.field_size_limit(2**31 - 1)  # a CSV field is as long as the upload allows


@dataclass(frozen=True)
class IngestOptions:
    """How to read an upload (the ``POST /v1/datasets`` query parameters)."""

    format: str = "text"
    text_field: str = "text"
    label_field: str | None = None
    columns: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "labelled" if self.label_field is not None else "text"


@dataclass
class RawFile:
    """One uploaded file: its name (for messages) and its bytes as received."""

    name: str
    fh: BinaryIO


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


@dataclass
class IngestResult:
    kind: str
    format: str
    num_files: int
    compression: str  # "none", "gzip", "zstd" or "mixed"
    num_examples: int | None = None
    labels: dict[str, int] | None = None
    decompressed_bytes: int = 0
    compressions: list[str] = field(default_factory=list)


def check_options(options: IngestOptions) -> None:
    """422 naming the query parameter for options that do not fit together."""
    if options.format not in FORMATS:
        raise ValidationFailed(f"format must be one of {', '.join(FORMATS)}, not "
                               f"{options.format!r}", field="format")
    if options.format == "text":
        if options.label_field is not None:
            raise ValidationFailed("label_field needs a format with fields: jsonl, csv or tsv "
                                   "(a labelled dataset)", field="label_field")
        if options.columns is not None:
            raise ValidationFailed("columns applies to format csv or tsv", field="columns")
    if options.format == "jsonl" and options.columns is not None:
        raise ValidationFailed("columns applies to format csv or tsv (JSON Lines name their "
                               "fields)", field="columns")
    _check_names(options)


def _check_names(options: IngestOptions) -> None:
    names = [("text_field", options.text_field)]
    if options.label_field is not None:
        names.append(("label_field", options.label_field))
    for param, value in names:
        if not value or CONTROL_CHARS.search(value) or len(value) > 200:
            raise ValidationFailed(f"{param} must be a field name of 1-200 characters without "
                                   "control characters", field=param)
    if options.label_field is not None and options.label_field == options.text_field:
        raise ValidationFailed("label_field and text_field name the same field",
                               field="label_field")
    if options.columns is not None:
        cols = options.columns
        if not cols or any(not c or CONTROL_CHARS.search(c) for c in cols) \
                or len(set(cols)) != len(cols) or len(cols) > 1000:
            raise ValidationFailed("columns must be distinct comma-separated names, e.g. "
                                   "columns=text,label", field="columns")
        for param, value in names:
            if value not in cols:
                raise ValidationFailed(f"{param} {value!r} is not one of columns "
                                       f"({', '.join(cols)})", field=param)


def _fail(file: str, line: int | None, message: str, fld: str | None = None,
          param: str = "file") -> ValidationFailed:
    """422 with the file and line in the message and details; the error's ``field`` is
    ``param``: ``file``, or for a record's named field (``fld``) the parameter that names it
    (``text_field``/``label_field``), for JSON Lines as for CSV/TSV."""
    where = f"{file}, line {line}" if line is not None else file
    detail: dict[str, Any] = {"file": file}
    if line is not None:
        detail["line"] = line
    if fld is not None:
        detail["field"] = fld
    return ValidationFailed(f"{where}: {message}", field=param, details=[detail])


class _Budget:
    """The decompressed bytes of all files together, capped at ``limit`` (413 past it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int, file: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise PayloadTooLarge(
                f"{file}: the upload exceeds the limit of {self.limit} bytes once decompressed",
                details=[{"limit_bytes": self.limit, "file": file}])


def _open(raw: RawFile) -> tuple[Any, str]:
    head = raw.fh.read(8)
    raw.fh.seek(0)
    if head.startswith(_GZIP):
        return gzip.GzipFile(fileobj=raw.fh, mode="rb"), "gzip"
    if head.startswith(_ZSTD):
        return _ZstdStream(raw.fh), "zstd"
    for magic, name in _UNSUPPORTED:
        if head.startswith(magic):
            raise _fail(raw.name, None, f"is {name} data; upload plain UTF-8 text, or compress "
                                        "it with gzip (.gz) or Zstandard (.zst)")
    return raw.fh, "none"


class _ZstdStream:
    """Zstandard frames (one after another) decompressed with ``read(n)`` like a file.

    ``zstandard``'s ``stream_reader`` ends quietly at a truncated frame, so this feeds a
    ``decompressobj`` instead, :data:`ZSTD_FEED_BYTES` of compressed input at a time (at most
    about 32 MiB of output each, whatever the ratio: a bomb is cut by the caller's budget
    after the first pieces), and raises ``zstandard.ZstdError`` when the input ends inside a
    frame."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._dec = zstandard.ZstdDecompressor()
        self._obj = self._dec.decompressobj()
        self._fed = False  # input given to the current frame's decompressor
        self._out = bytearray()
        self._input = b""
        self._done = False

    def read(self, n: int) -> bytes:
        while len(self._out) < n and not self._done:
            self._step()
        piece = bytes(self._out[:n])
        del self._out[:n]
        return piece

    def _step(self) -> None:
        if not self._input:
            self._input = self._fh.read(READ_BYTES)
            if not self._input:
                if self._fed and not self._obj.eof:
                    raise zstandard.ZstdError("the data ends inside a frame (truncated?)")
                self._done = True
                return
        chunk, self._input = self._input[:ZSTD_FEED_BYTES], self._input[ZSTD_FEED_BYTES:]
        while chunk:
            self._fed = True
            self._out += self._obj.decompress(chunk)
            if not self._obj.eof:
                return
            chunk = self._obj.unused_data  # the next frame starts here
            self._obj, self._fed = self._dec.decompressobj(), False


def _pieces(raw: RawFile, budget: _Budget, compressions: list[str]) -> Iterator[str]:
    """The file's text, decompressed and decoded (strict UTF-8), a piece at a time, without a
    leading byte-order mark."""
    stream, compression = _open(raw)
    compressions.append(compression)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = newlines = 0  # bytes read, "\n" decoded so far (for messages)
    first = True
    while True:
        try:
            data = stream.read(READ_BYTES)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise _fail(raw.name, None, f"is not valid {compression} data ({exc})") from None
        budget.take(len(data), raw.name)
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            at = offset - pending + exc.start
            line = newlines + data[: max(0, exc.start - pending)].count(b"\n") + 1
            raise ValidationFailed(
                f"{raw.name}, line {line}: not UTF-8 text: invalid byte sequence at byte "
                f"offset {at}" + (" (after decompression)" if compression != "none" else ""),
                field="file",
                details=[{"file": raw.name, "line": line, "byte_offset": at,
                          "reason": exc.reason}]) from None
        offset += len(data)
        if first and text:
            first = False
            if text[0] == "\ufeff":
                text = text[1:]
        if text:
            newlines += text.count("\n")
            yield text
        if not data:
            return


def _records(pieces: Iterator[str]) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each ``\\n``-ended line (without it; a ``\\r`` before it
    and lone ``\\r`` line ends are read as ``\\n`` too), a piece at a time."""
    crlf = _CarriageReturns()
    carry: list[str] = []
    number = 0
    for piece in pieces:
        piece = crlf.feed(piece)
        if "\n" not in piece:
            carry.append(piece)
            continue
        parts = piece.split("\n")
        if carry:
            parts[0] = "".join(carry) + parts[0]
        carry = [parts.pop()]
        for line in parts:
            number += 1
            yield number, line
    last = "".join(carry)
    if last:
        yield number + 1, last


class _CarriageReturns:
    """``\\r\\n`` and lone ``\\r`` as ``\\n`` over pieces (record separators of CSV/TSV/JSONL;
    U+2028 and the other breaks stay: inside a field they are text, normalised later)."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, piece: str) -> str:
        if self._after_cr and piece.startswith("\n"):
            piece = piece[1:]
        self._after_cr = bool(piece) and piece[-1] == "\r"
        if "\r" not in piece:
            return piece
        return piece.replace("\r\n", "\n").replace("\r", "\n")


class _Writer:
    """Buffers output text and writes it UTF-8-encoded; passes each text to ``observe``."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._buf: list[str] = []
        self._chars = 0
        self.last = ""  # the last character written

    def write(self, text: str) -> None:
        if not text:
            return
        self._buf.append(text)
        self._chars += len(text)
        self.last = text[-1]
        if self._chars >= WRITE_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._sink.write("".join(self._buf).encode("utf-8"))
            self._buf, self._chars = [], 0


class _Examples:
    """Labelled examples written in the normalised format; texts go to ``observe``."""

    def __init__(self, sink: Sink, observe: Callable[[str], None]) -> None:
        self._sink, self._observe = sink, observe
        self._batch: list[tuple[str, str]] = []
        self.labels: Counter[str] = Counter()
        self.count = 0

    def add(self, text: Any, label: Any, file: str, line: int, options: IngestOptions) -> None:
        assert options.label_field is not None
        text = _text_value(text, file, line, options.text_field)
        if not text.strip():
            raise _fail(file, line, f"field {options.text_field!r} is empty",
                        options.text_field, param="text_field")
        label = _label_value(label, file, line, options.label_field)
        if label not in self.labels and len(self.labels) >= MAX_LABELS:
            raise _fail(file, line, f"more than {MAX_LABELS} distinct labels in field "
                                    f"{options.label_field!r}: is it the label column?",
                        options.label_field, param="label_field")
        self.labels[label] += 1
        self.count += 1
        self._observe(text + "\n")
        self._batch.append((text, label))
        if len(self._batch) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self._sink.write(write_labelled(self._batch))
            self._batch = []


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _text_value(value: Any, file: str, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise _fail(file, line, f"field {name!r} is {_type_name(value)}, not a string", name,
                    param="text_field")
    return normalise_line_ends(value)


def _label_value(value: Any, file: str, line: int, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _fail(file, line, f"field {name!r} is {_type_name(value)}, not a string "
                                "(or an integer)", name, param="label_field")
    value = value.strip()
    if not value:
        raise _fail(file, line, f"field {name!r} (the label) is empty", name,
                    param="label_field")
    if len(value) > MAX_LABEL_CHARS or CONTROL_CHARS.search(value):
        raise _fail(file, line, f"field {name!r} (the label) must be at most "
                                f"{MAX_LABEL_CHARS} characters without control characters",
                    name, param="label_field")
    return value


def _missing(file: str, line: int, name: str, what: str, param: str) -> ValidationFailed:
    return _fail(file, line, f"{what} has no field {name!r}", name, param=param)


def _jsonl(raw: RawFile, pieces: Iterator[str], options: IngestOptions,
           emit: Callable[[Any, Any, int], None]) -> None:
    labelled = options.label_field is not None
    for number, line in _records(pieces):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(raw.name, number, f"not valid JSON ({exc.msg}, column {exc.colno})") \
                from None
        if not isinstance(record, dict):
            raise _fail(raw.name, number, f"expected a JSON object, got {_type_name(record)}")
        if options.text_field not in record:
            raise _missing(raw.name, number, options.text_field, "the object", "text_field")
        label = None
        if labelled:
            assert options.label_field is not None
            if options.label_field not in record:
                raise _missing(raw.name, number, options.label_field, "the object",
                               "label_field")
            label = record[options.label_field]
        emit(record[options.text_field], label, number)


def _table(raw: RawFile, pieces: Iterator[str], options: IngestOptions,
           emit: Callable[[Any, Any, int], None]) -> None:
    """CSV (``csv`` module, RFC 4180 quoting) or TSV (split at tabs, no quoting)."""
    records = _records(pieces)
    rows: Iterator[tuple[int, list[str]]]
    if options.format == "tsv":
        rows = ((n, line.split("\t")) for n, line in records if line.strip())
    else:
        rows = _csv_rows(raw, records)
    header = list(options.columns) if options.columns is not None else None
    at: tuple[int, int | None] | None = None
    if header is not None:
        at = _columns(raw, header, None, options)
    for number, row in rows:
        if header is None:
            header = [c.strip() for c in row]
            at = _columns(raw, header, number, options)
            continue
        assert at is not None
        if len(row) != len(header):
            raise _fail(raw.name, number, f"has {len(row)} fields, expected {len(header)} "
                                          f"({', '.join(header[:20])})")
        emit(row[at[0]], None if at[1] is None else row[at[1]], number)


def _columns(raw: RawFile, header: list[str], line: int | None,
             options: IngestOptions) -> tuple[int, int | None]:
    """Where the text and label columns are (422 naming the parameter when one is absent)."""
    params = [("text_field", options.text_field)]
    if options.label_field is not None:
        params.append(("label_field", options.label_field))
    for param, name in params:
        if name not in header:
            shown = ", ".join(repr(c) for c in header[:20])
            raise _fail(raw.name, line, f"the header has no column {name!r} (its columns: "
                                        f"{shown}); name the column with {param}, or give the "
                                        "columns of a file without a header row with "
                                        "columns=", name, param=param)
    return (header.index(options.text_field),
            None if options.label_field is None else header.index(options.label_field))


def _csv_rows(raw: RawFile, records: Iterator[tuple[int, str]]
              ) -> Iterator[tuple[int, list[str]]]:
    """Rows with the number of their last line (a quoted field may span lines)."""
    last = [0]

    def lines() -> Iterator[str]:
        for n, line in records:
            last[0] = n
            yield line + "\n"

    reader = csv.reader(lines(), strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _fail(raw.name, last[0] or 1, f"not valid CSV ({exc})") from None
        if row:  # [] is a blank line
            yield last[0], row


def ingest(files: list[RawFile], options: IngestOptions, sink: Sink, max_bytes: int,
           observe: Callable[[str], None]) -> IngestResult:
    """Convert ``files`` (in order) into the stored format, written to ``sink``; each piece of
    the dataset's text (a text dataset's stored text; a labelled one's example texts, each
    with a ``\\n``) is also given to ``observe`` (for the statistics). Raises
    :class:`ValidationFailed` (422) for bad input, :class:`PayloadTooLarge` (413) past
    ``max_bytes`` decompressed, and a 422 for an empty dataset."""
    check_options(options)
    budget = _Budget(max_bytes)
    compressions: list[str] = []
    writer = _Writer(sink)
    examples = _Examples(sink, observe) if options.label_field is not None else None

    for raw in files:
        pieces = _pieces(raw, budget, compressions)
        if options.format == "text":
            _text_file(pieces, writer, observe)
            continue

        def emit(text: Any, label: Any, number: int, raw: RawFile = raw) -> None:
            if examples is not None:
                examples.add(text, label, raw.name, number, options)
                return
            value = _text_value(text, raw.name, number, options.text_field) + "\n"
            writer.write(value)
            observe(value)

        if options.format == "jsonl":
            _jsonl(raw, pieces, options, emit)
        else:
            _table(raw, pieces, options, emit)
    writer.flush()
    if examples is not None:
        examples.flush()
        if not examples.count:
            raise ValidationFailed("no examples: the upload holds no records", field="file")
    elif not writer.last:
        raise ValidationFailed(
            ("the file is empty" if len(files) == 1 else "the files are empty")
            if options.format == "text" else "no records: the upload holds no lines of data",
            field="file")
    distinct = set(compressions)
    compression = distinct.pop() if len(distinct) == 1 else "mixed"
    return IngestResult(
        kind=options.kind, format=options.format, num_files=len(files),
        compression=compression,
        num_examples=examples.count if examples is not None else None,
        labels=dict(sorted(examples.labels.items())) if examples is not None else None,
        decompressed_bytes=budget.used, compressions=compressions)


def _text_file(pieces: Iterator[str], writer: _Writer, observe: Callable[[str], None]) -> None:
    """A text file, line ends normalised; starts on a new line after an earlier file."""
    norm = LineEndNormaliser()
    started = False
    for piece in pieces:
        out = norm.feed(piece)
        if not out:
            continue
        if not started:
            started = True
            if writer.last and writer.last != "\n":
                writer.write("\n")
                observe("\n")
        writer.write(out)
        observe(out)
