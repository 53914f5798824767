"""Where a job's texts come from, read as streams: a :class:`TextSource` is a UTF-8 byte stream
(a dataset blob, a local file) or a string already in memory (a built-in corpus, a test's
text), read a chunk of characters at a time so that no caller has to hold a whole corpus as one
Python string. Pure Python: no torch, no service code.

A source is identified by the sha256 of its UTF-8 bytes and by how line ends are read
(:attr:`TextSource.identity`): the token cache (``worker.engine.tokencache``) keys its entries
on it. A byte source with a known sha256 (a dataset row's) is checked against it whenever a
read reaches the end, so a blob that changed in storage fails with ``dataset_error`` instead of
being trained on.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from core.contract import TrainingError
from core.textstats import normalise_line_ends

#: Characters per piece read from a source (about 1 MiB of ASCII text; up to 4 MiB of UTF-8).
CHUNK_CHARS = 1 << 20
_BUFFER_BYTES = 1 << 20


class TextReader(Protocol):
    def read(self, size: int, /) -> str:
        """Up to ``size`` characters; ``""`` at the end."""
        ...


class _StrReader:
    """:class:`TextReader` over a string already in memory (slices, no copy of the whole)."""

    def __init__(self, text: str) -> None:
        self._text, self._pos = text, 0

    def read(self, size: int, /) -> str:
        piece = self._text[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


class _HashingRaw(io.RawIOBase):
    """Reads through ``fh`` and hashes every byte that passes (sha256)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._fh.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _CheckedReader:
    """Decodes the bytes of a source; at the end compares their sha256 with the expected one.
    Raises ``TrainingError("dataset_error")`` on invalid UTF-8 or a different sha256."""

    def __init__(self, source: TextSource, raw: _HashingRaw, text: io.TextIOWrapper) -> None:
        self._source, self._raw, self._text = source, raw, text
        self.chars = 0
        self.sha256: str | None = None  # set at the end

    def read(self, size: int, /) -> str:
        try:
            piece = self._text.read(size)
        except UnicodeDecodeError as exc:
            raise TrainingError("dataset_error",
                                f"{self._source.label} is not UTF-8: {exc}") from exc
        except OSError as exc:
            raise TrainingError("dataset_error",
                                f"cannot read {self._source.label}: {exc}") from exc
        if self._source.universal_newlines:
            piece = normalise_line_ends(piece)  # "\r\n" and "\r" are "\n" already
        self.chars += len(piece)
        if not piece and size > 0 and self.sha256 is None:
            self.sha256 = self._raw.sha.hexdigest()
            expected = self._source.sha256
            if expected is not None and expected != self.sha256:
                raise TrainingError("dataset_error",
                                    f"{self._source.label} does not match its sha256 "
                                    f"({self.sha256} read, {expected} recorded)")
        return piece


@dataclass
class SourceScan:
    """What one pass over a source found: the sha256 of its UTF-8 bytes and its characters
    (after line-end translation when the source reads universal newlines)."""

    sha256: str
    num_chars: int


class TextSource:
    """A text to stream: ``opener`` returns a fresh binary stream of its UTF-8 bytes (read as
    strict UTF-8), or ``text`` holds it in memory. ``sha256`` (of the bytes), when known, is
    checked at the end of every full read. ``universal_newlines``: the text is read as an upload
    stores it: a leading byte-order mark dropped and every line break ``str.splitlines`` knows
    (``\\r\\n``, ``\\r``, U+2028, ...: ``core.textstats.normalise_line_ends``) read as ``\\n``;
    otherwise the characters are exactly the decoded bytes (as ``bytes.decode``). ``label``
    names the source in error messages."""

    def __init__(self, label: str, *, opener: Callable[[], BinaryIO] | None = None,
                 text: str | None = None, sha256: str | None = None,
                 universal_newlines: bool = False) -> None:
        if (opener is None) == (text is None):
            raise ValueError("a TextSource needs exactly one of opener or text")
        self.label, self.sha256 = label, sha256
        self.universal_newlines = universal_newlines and text is None
        self._opener, self._text = opener, text
        self._scan: SourceScan | None = None

    @classmethod
    def from_text(cls, text: str, label: str = "text") -> TextSource:
        return cls(label, text=text)

    @classmethod
    def from_path(cls, path: Path, universal_newlines: bool = True) -> TextSource:
        """A local file; by default read as an upload of it is stored (a leading BOM dropped,
        line ends normalised to ``\\n``)."""
        return cls(f"file {path}", opener=lambda: open(path, "rb"),
                   universal_newlines=universal_newlines)

    @contextmanager
    def open(self) -> Iterator[TextReader]:
        """A reader over the whole text. Raises ``TrainingError("dataset_error")`` when the
        source cannot be opened or read, is not UTF-8, or (read to the end) does not match
        its ``sha256``."""
        if self._text is not None:
            yield _StrReader(self._text)
            return
        assert self._opener is not None
        try:
            fh = self._opener()
        except OSError as exc:
            raise TrainingError("dataset_error", f"cannot read {self.label}: {exc}") from exc
        raw = _HashingRaw(fh)
        text = io.TextIOWrapper(io.BufferedReader(raw, _BUFFER_BYTES),
                                encoding="utf-8-sig" if self.universal_newlines else "utf-8",
                                errors="strict",
                                newline=None if self.universal_newlines else "")
        try:
            yield _CheckedReader(self, raw, text)
        finally:
            text.close()

    def scan(self) -> SourceScan:
        """One pass over the text (remembered): its sha256 and number of characters."""
        if self._scan is None:
            if self._text is not None:
                self._scan = SourceScan(_str_sha256(self._text), len(self._text))
            else:
                with self.open() as reader:
                    n = 0
                    while piece := reader.read(CHUNK_CHARS):
                        n += len(piece)
                    assert isinstance(reader, _CheckedReader) and reader.sha256 is not None
                    self._scan = SourceScan(reader.sha256, n)
                self.sha256 = self._scan.sha256
        return self._scan

    @property
    def identity(self) -> str:
        """``<sha256 of the bytes>:<exact|normalised>``: what the text is, for cache keys.
        Scans the source when its sha256 is not known yet. (``normalised`` replaced
        ``universal``, which neither translated U+2028 and the other breaks nor dropped a BOM,
        so no older cache entry of a file is reused.)"""
        sha = self.sha256 or self.scan().sha256
        return f"{sha}:{'normalised' if self.universal_newlines else 'exact'}"


def _str_sha256(text: str) -> str:
    h = hashlib.sha256()
    for i in range(0, len(text), CHUNK_CHARS):
        h.update(text[i : i + CHUNK_CHARS].encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass
class CorpusSources:
    """The job's texts as streams: ``train`` is the main dataset, cut by
    ``core.splits.split_bounds`` unless ``validation``/``test`` are given (as
    :class:`core.contract.CorpusTexts`, whose strings :meth:`from_texts` wraps)."""

    train: TextSource
    validation: TextSource | None = None
    test: TextSource | None = None

    @classmethod
    def from_texts(cls, train: str, validation: str | None = None,
                   test: str | None = None) -> CorpusSources:
        return cls(TextSource.from_text(train, "the training text"),
                   None if validation is None
                   else TextSource.from_text(validation, "the validation text"),
                   None if test is None else TextSource.from_text(test, "the test text"))
