"""The tokenizers of :mod:`worker.engine.tokenizers`, trained and applied a piece of text at a
time, with the token sequence of the whole-string methods.

What each whole-string method does, and why the streamed version equals it:

- ``char`` (``sorted(set(text))``, then one id per character): per character, so any cut
  between characters is neutral. Vectorised with numpy over each piece's code points
  (``str.encode("utf-32-le")``): a seen-mask for training, a lookup table for encoding.
- ``word`` training (``Counter`` of ``line.split()`` over ``text.splitlines()``): every line
  break ``str.splitlines`` knows is whitespace for ``str.split``, so the counts are those of
  ``text.split()``; a piece is counted up to its last whitespace and the unfinished word
  carried (:class:`WordCounter`).
- ``word`` encoding (each line's words, then ``<eos>``) and ``bpe`` (each line of
  ``text.splitlines(keepends=True)`` a separate sequence): :class:`LineSplitter` yields exactly
  those lines, carrying an unfinished line, and a line ending in ``\\r`` (its ``\\n`` may
  start the next piece), to the next piece.
- An unfinished line longer than :data:`LONG_LINE` characters is cut where the result is
  provably the same, so one huge line does not have to be held whole: ``word`` at a space
  (words never span one, and ``<eos>`` comes only at the line's real end); ``bpe`` at a space
  between two printable non-space ASCII characters, where the byte-level pre-tokenizer's
  regex (GPT-2's: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
  \\s+(?!\\S)|\\s+``) always starts a pre-token (no alternative matches across a space that
  follows a non-space, and none looks behind), and BPE merges never cross pre-tokens; the
  trainer counts pre-tokens, so training is unchanged too. A line with no such space is held
  whole (as the whole-string method holds it).

Tested against the whole-string methods in ``tests/engine/test_tokencache.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import numpy as np

from core.contract import TrainingError
from core.sources import CHUNK_CHARS, TextReader
from worker.engine.tokenizers import EOS, UNK, CharTokenizer, WordTokenizer

#: Characters of an unfinished line past which the line is cut at a safe point.
LONG_LINE = 1 << 20
#: What ``str.splitlines`` ends a line at (``\r\n`` ends with ``\n``).
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
#: Unicode code points: the size of the char tokenizer's lookup table.
CODE_POINTS = 0x110000


def read_chars(reader: TextReader, n: int, chunk: int | None = None) -> Iterator[str]:
    """The next ``n`` characters of ``reader``, in pieces of at most ``chunk``. Raises
    ``TrainingError("dataset_error")`` when the reader ends first (the source changed since
    it was counted)."""
    chunk = chunk or CHUNK_CHARS
    left = n
    while left > 0:
        piece = reader.read(min(chunk, left))
        if not piece:
            raise TrainingError("dataset_error",
                                f"the text ended {left} characters early (did it change?)")
        left -= len(piece)
        yield piece


def code_points(piece: str) -> np.ndarray:
    """(len(piece),) uint32: the piece's code points (lone surrogates included)."""
    return np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def word_cut(line: str) -> int:
    """Where an unfinished line may be cut for the word tokenizer: at its last space (not the
    first or last character); 0 when there is none."""
    return max(0, line.rfind(" ", 1, len(line) - 1))


def bpe_cut(line: str, tries: int = 1000) -> int:
    """Where an unfinished line may be cut for byte-level BPE: the last space with a printable
    non-space ASCII character on each side (a pre-token boundary, see the module's doc); 0
    when none is found among the last ``tries`` spaces."""
    k = len(line) - 1
    for _ in range(tries):
        k = line.rfind(" ", 1, k)
        if k <= 0:
            return 0
        if "!" <= line[k - 1] <= "~" and "!" <= line[k + 1] <= "~":
            return k
    return 0


class LineSplitter:
    """``text.splitlines(keepends=True)`` over a text fed a piece at a time.

    :meth:`feed` returns the lines completed so far and, when the unfinished line grew past
    ``long_line`` (default :data:`LONG_LINE`) characters and ``cut`` finds a place, a head of
    it (a partial line that belongs before what follows); :meth:`finish` returns the rest."""

    def __init__(self, cut: Callable[[str], int] | None = None,
                 long_line: int | None = None) -> None:
        self._carry = ""
        self._cut, self._long = cut, LONG_LINE if long_line is None else long_line

    def feed(self, piece: str) -> tuple[list[str], str]:
        buf = self._carry + piece if self._carry else piece
        lines = buf.splitlines(keepends=True)
        self._carry = ""
        if lines and (lines[-1][-1] == "\r" or lines[-1][-1] not in LINE_BREAKS):
            self._carry = lines.pop()
        head = ""
        if self._cut is not None and len(self._carry) > self._long:
            k = self._cut(self._carry)
            if k > 0:
                head, self._carry = self._carry[:k], self._carry[k:]
        return lines, head

    def finish(self) -> list[str]:
        lines, self._carry = self._carry.splitlines(keepends=True), ""
        return lines


# -- training ------------------------------------------------------------------------------------


class CharVocab:
    """The characters of a text fed a piece at a time; :meth:`tokenizer` is
    ``CharTokenizer.train`` of the whole text."""

    def __init__(self) -> None:
        self.seen = np.zeros(CODE_POINTS, dtype=bool)

    def feed(self, piece: str) -> None:
        self.seen[code_points(piece)] = True

    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer([chr(c) for c in np.flatnonzero(self.seen)])


class WordCounter:
    """The word counts of a text fed a piece at a time; :meth:`tokenizer` is
    ``WordTokenizer.train`` of the whole text."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._carry = ""

    def feed(self, piece: str) -> None:
        buf = self._carry + piece if self._carry else piece
        if not buf or buf[-1].isspace():
            self.counts.update(buf.split())
            self._carry = ""
            return
        parts = buf.rsplit(None, 1)  # [head, unfinished word] or [one word]
        if len(parts) == 2:
            self.counts.update(parts[0].split())
        self._carry = parts[-1] if len(parts) == 2 else buf

    def tokenizer(self, max_vocab: int | None, min_freq: int) -> WordTokenizer:
        self.counts.update(self._carry.split())
        self._carry = ""
        return WordTokenizer.from_counts(self.counts, max_vocab, min_freq)


def bpe_units(pieces: Iterator[str], long_line: int | None = None) -> Iterator[list[str]]:
    """The lines of a text (``splitlines(keepends=True)``, long ones cut by :func:`bpe_cut`),
    one batch per piece: the sequences BPE trains on."""
    splitter = LineSplitter(bpe_cut, long_line)
    for piece in pieces:
        lines, head = splitter.feed(piece)
        if head:
            lines.append(head)
        if lines:
            yield lines
    last = splitter.finish()
    if last:
        yield last


# -- encoding ------------------------------------------------------------------------------------


class CharEncoder:
    """``CharTokenizer.encode`` a piece at a time, as ``dtype`` ids (a lookup table over code
    points; unseen characters are ``<unk>``, 0)."""

    def __init__(self, tok: CharTokenizer, dtype: np.dtype[Any]) -> None:
        self.lut = np.zeros(CODE_POINTS, dtype=dtype)
        for i, c in enumerate(tok.itos[1:], start=1):
            self.lut[ord(c)] = i

    def feed(self, piece: str) -> np.ndarray:
        return self.lut[code_points(piece)]

    def finish(self) -> np.ndarray:
        return self.lut[:0]


class WordEncoder:
    """``WordTokenizer.encode`` a piece at a time: each line's words, then ``<eos>``."""

    def __init__(self, tok: WordTokenizer, dtype: np.dtype[Any],
                 long_line: int | None = None) -> None:
        assert tok.stoi[UNK] == 0 and tok.stoi[EOS] == 1
        self._get, self._dtype = tok.stoi.get, dtype
        self._lines = LineSplitter(word_cut, long_line)

    def _ids(self, lines: list[str], head: str) -> np.ndarray:
        get = self._get
        out: list[int] = []
        for line in lines:
            out.extend([get(w, 0) for w in line.split()])
            out.append(1)
        out.extend([get(w, 0) for w in head.split()])
        return np.array(out, dtype=self._dtype)

    def feed(self, piece: str) -> np.ndarray:
        return self._ids(*self._lines.feed(piece))

    def finish(self) -> np.ndarray:
        return self._ids(self._lines.finish(), "")


class BPEEncoder:
    """``BPETokenizer.encode`` a piece at a time: each line (long ones cut by :func:`bpe_cut`)
    encoded as its own sequence, batched (``encode_batch``, parallel on the Rust side)."""

    def __init__(self, hf: Any, dtype: np.dtype[Any], long_line: int | None = None) -> None:
        self._hf, self._dtype = hf, dtype
        self._lines = LineSplitter(bpe_cut, long_line)

    def _ids(self, units: list[str]) -> np.ndarray:
        if not units:
            return np.zeros(0, dtype=self._dtype)
        encs = self._hf.encode_batch(units, add_special_tokens=False)
        return np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=self._dtype)

    def feed(self, piece: str) -> np.ndarray:
        lines, head = self._lines.feed(piece)
        return self._ids([*lines, head] if head else lines)

    def finish(self) -> np.ndarray:
        return self._ids(self._lines.finish())
