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
- ``bpe`` lines are then joined into longer sequences (:func:`bpe_sequences`) where that leaves
  the pre-tokens unchanged, so ``encode_batch`` handles a few long sequences rather than many
  short ones. Joining a line ``A`` (it ends in a line break) to the next line ``C`` can only
  change the whitespace run across the join, ``R = W_A + W_C`` (``W_A``: the whitespace that
  ends ``A``; ``W_C``: the whitespace that starts ``C``, followed by a non-space). Alone,
  ``A`` ends with the pre-token ``W_A`` (``\\s+(?!\\S)`` at the end of the string), and
  ``C`` starts with ``W_C[:-1]``, then ``W_C[-1]`` alone or as the optional space of the next
  pre-token. Joined, ``\\s+(?!\\S)`` takes ``R[:-1]`` and ``R[-1]`` goes as ``W_C[-1]`` went
  (``W_C`` empty: alone, by ``\\s+``). These agree exactly when ``W_C`` is one character
  (``R[:-1] == W_A``), or when ``W_C`` is empty and ``W_A`` is the line break alone
  (``R[:-1]`` empty). So a line end is joined when the next line starts with a space or tab
  and then a non-space; or when it is a ``\\n`` with a non-space next and either a non-space
  before it or a ``\\n`` before it (a blank line, which begins its sequence, since a line end
  followed by a line break is always cut). A line made of whitespace only is never joined to
  the line before it, so no run spans more than one join. Everything else matches as before:
  the matches before ``W_A`` end at a non-space, and the regex has no look-behind. "Non-space"
  means not ``str.isspace``, which holds for every character of the pre-tokenizer's
  ``\\s`` (and a few more: ``\\x1c``-``\\x1f``; tested over all code points). Every other
  line end is a cut, and so is a joinable ``\\n`` past :data:`BPE_SEQUENCE` characters.
- ``bpe`` encoding overlaps the Rust side (``encode_batch_fast``, which releases the GIL and
  runs in parallel) with the Python side: :class:`BPEEncoder` encodes each piece's sequences
  in a background thread while the caller reads, cuts and writes, and returns each piece's
  ids one call later (in order; :meth:`BPEEncoder.finish` returns the rest).

Tested against the whole-string methods in ``tests/engine/test_tokencache.py``.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import numpy as np

from core.contract import TrainingError
from core.sources import CHUNK_CHARS, TextReader
from core.textstats import LINE_BREAKS  # what str.splitlines ends a line at
from worker.engine.tokenizers import EOS, UNK, CharTokenizer, WordTokenizer

#: Characters of an unfinished line past which the line is cut at a safe point.
LONG_LINE = 1 << 20
#: Unicode code points: the size of the char tokenizer's lookup table.
CODE_POINTS = 0x110000
#: Characters of a BPE sequence past which joined lines are cut again (at a joinable ``\n``),
#: so that a piece still gives ``encode_batch`` many sequences to run in parallel.
BPE_SEQUENCE = 1 << 13
#: The line ends :func:`bpe_sequences` cuts at: every one but a ``\n`` or ``\r\n`` followed
#: by a space or tab and a non-space, and a ``\n`` with a non-space next and a non-space or
#: ``\n`` before it (see the module's doc). One character class first, so that ``re`` skips
#: to the next line break quickly.
_BPE_CUTS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]"
                       r"(?:(?<=\r)(?:\n(?![ \t]\S)|(?!\n))"  # \r\n or \r
                       r"|(?<=\n)(?![ \t]\S)(?:(?!\S)|(?<!\S\n)(?<!\n\n))"  # \n
                       r"|(?<![\r\n]))")  # every other line break


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
    it (a partial line that belongs before what follows); :meth:`finish` returns the rest.
    :meth:`feed_block` and :meth:`finish_block` return the same lines joined as one string."""

    def __init__(self, cut: Callable[[str], int] | None = None,
                 long_line: int | None = None) -> None:
        self._carry = ""
        self._cut, self._long = cut, LONG_LINE if long_line is None else long_line

    def feed_block(self, piece: str) -> tuple[str, str]:
        buf = self._carry + piece if self._carry else piece
        # up to the last line end, not counting a final "\r" (a "\n" may follow it)
        stop = len(buf) - 1 if buf.endswith("\r") else len(buf)
        end = 1 + max(buf.rfind(c, 0, stop) for c in LINE_BREAKS)
        block, self._carry = buf[:end], buf[end:]
        head = ""
        if self._cut is not None and len(self._carry) > self._long:
            k = self._cut(self._carry)
            if k > 0:
                head, self._carry = self._carry[:k], self._carry[k:]
        return block, head

    def feed(self, piece: str) -> tuple[list[str], str]:
        block, head = self.feed_block(piece)
        return block.splitlines(keepends=True), head

    def finish_block(self) -> str:
        rest, self._carry = self._carry, ""
        return rest

    def finish(self) -> list[str]:
        return self.finish_block().splitlines(keepends=True)


def bpe_sequences(block: str, limit: int | None = None) -> list[str]:
    """``block`` (whole lines, or the end of a text) as BPE sequences whose pre-tokens are
    those of its lines encoded one by one: lines joined where the module's doc shows it is
    exact, and cut at a joinable ``\\n`` once past ``limit`` (default
    :data:`BPE_SEQUENCE`) characters."""
    if not block:
        return []
    limit = BPE_SEQUENCE if limit is None else limit
    ends = [m.end() for m in _BPE_CUTS.finditer(block)]
    if not ends or ends[-1] != len(block):
        ends.append(len(block))
    out = [block[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    if max(map(len, out)) <= limit:
        return out
    capped: list[str] = []
    for seq in out:
        start = 0
        while len(seq) - start > limit:
            k = seq.find("\n", start + limit, len(seq) - 1)  # joinable: not the last char
            if k < 0:
                break
            capped.append(seq[start : k + 1])
            start = k + 1
        capped.append(seq[start:] if start else seq)
    return capped


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
    """The text's BPE sequences (:func:`bpe_sequences` of its lines, long ones cut by
    :func:`bpe_cut`), one batch per piece: what BPE trains on (the trainer counts pre-tokens,
    which are those of the lines)."""
    splitter = LineSplitter(bpe_cut, long_line)
    for piece in pieces:
        block, head = splitter.feed_block(piece)
        units = bpe_sequences(block)
        if head:
            units.append(head)
        if units:
            yield units
    last = bpe_sequences(splitter.finish_block())
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


class _Batch(threading.Thread):
    """``encode(units, add_special_tokens=False)`` in a thread of its own; :meth:`result`
    waits for it (and raises what it raised)."""

    def __init__(self, encode: Callable[..., list[Any]], units: list[str]) -> None:
        super().__init__(name="lmforge-bpe-encode", daemon=True)
        self._encode, self._units = encode, units
        self._out: list[Any] = []
        self._exc: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._out = self._encode(self._units, add_special_tokens=False)
        except BaseException as exc:  # handed to the caller by result()
            self._exc = exc
        finally:
            self._units = []

    def result(self) -> list[Any]:
        self.join()
        if self._exc is not None:
            raise self._exc
        out, self._out = self._out, []
        return out


class BPEEncoder:
    """``BPETokenizer.encode`` a piece at a time: the text's lines (long ones cut by
    :func:`bpe_cut`), joined by :func:`bpe_sequences`, encoded by ``encode_batch_fast``
    (``encode_batch`` before ``tokenizers`` 0.20; parallel on the Rust side) in a background
    thread while the caller goes on. :meth:`feed` starts a piece and returns the ids of the
    piece fed before it (empty the first time); :meth:`finish` returns the rest, so the
    concatenation of everything returned is the text's ids. One batch is encoded at a time."""

    def __init__(self, hf: Any, dtype: np.dtype[Any], long_line: int | None = None) -> None:
        self._encode = getattr(hf, "encode_batch_fast", None) or hf.encode_batch
        self._dtype = dtype
        self._lines = LineSplitter(bpe_cut, long_line)
        self._running: _Batch | None = None

    def _ids(self, encs: list[Any]) -> np.ndarray:
        return np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=self._dtype)

    def _next(self, units: list[str]) -> np.ndarray:
        """Wait for the batch running, start ``units``, return the finished batch's ids."""
        done = self._running.result() if self._running is not None else []
        self._running = _Batch(self._encode, units) if units else None
        return self._ids(done)

    def feed(self, piece: str) -> np.ndarray:
        block, head = self._lines.feed_block(piece)
        units = bpe_sequences(block)
        if head:
            units.append(head)
        return self._next(units)

    def finish(self) -> np.ndarray:
        ids = self._next(bpe_sequences(self._lines.finish_block()))
        return np.concatenate([ids, self._next([])])
