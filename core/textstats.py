"""Text statistics (characters, lines, words, bytes), counted incrementally while an upload
streams, and the token counts each tokenizer kind makes of them. Pure Python: the API counts
uploads with it and the submission check (:mod:`core.splits`) estimates split sizes from it.

Line ends: one rule everywhere. A line ends at every break ``str.splitlines`` knows
(:data:`LINE_BREAKS`: ``\\n``, ``\\r``, ``\\r\\n`` as one, ``\\v``, ``\\f``, ``\\x1c``-``\\x1e``,
U+0085, U+2028, U+2029), which is how the engine's tokenizers split lines
(``worker.engine.tokenizers``, ``worker.engine.textstream``). Uploads and ``lmforge train``'s
files are normalised on the way in (:func:`normalise_line_ends`): every one of those breaks
becomes ``\\n``, so a stored text dataset has ``\\n`` line ends only; :class:`TextCounter` counts
lines as ``splitlines`` does either way.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

from core.corpora import builtin_corpus
from core.errors import ValidationFailed

#: Every line break ``str.splitlines`` knows (``\r\n`` is one break).
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
_OTHER_BREAKS = "".join(sorted(LINE_BREAKS - {"\n"}))
_TO_LF = str.maketrans({c: "\n" for c in _OTHER_BREAKS})
_HAS_OTHER_BREAK = re.compile("[" + re.escape(_OTHER_BREAKS) + "]")


def normalise_line_ends(text: str) -> str:
    """``text`` with every line break of :data:`LINE_BREAKS` as ``\\n`` (``\\r\\n`` as one)."""
    return LineEndNormaliser().feed(text)


class LineEndNormaliser:
    """:func:`normalise_line_ends` over a text fed a piece at a time: a ``\\r\\n`` split across
    two pieces is still one line end."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, piece: str) -> str:
        if self._after_cr and piece.startswith("\n"):
            piece = piece[1:]  # the "\n" of a "\r\n" whose "\r" ended the last piece
        if not piece:
            self._after_cr = False
            return piece
        self._after_cr = piece[-1] == "\r"
        if _HAS_OTHER_BREAK.search(piece) is None:
            return piece
        return piece.replace("\r\n", "\n").translate(_TO_LF)


@dataclass(frozen=True)
class TextStats:
    num_chars: int  # Unicode code points
    num_lines: int  # lines as str.splitlines counts them (LINE_BREAKS; "\r\n" is one break)
    num_words: int  # whitespace-separated tokens (str.split())
    num_bytes: int  # UTF-8 bytes (a dataset row's ``bytes``)

    def tokens(self, tokenizer_kind: str) -> int | None:
        """Tokens the engine's tokenizer makes of this text: one per character for ``char``;
        words plus one ``<eos>`` per line for ``word``; unknown before training for ``bpe``
        (see :meth:`bpe_token_bound`)."""
        if tokenizer_kind == "char":
            return self.num_chars
        if tokenizer_kind == "word":
            return self.num_words + self.num_lines
        return None

    def bpe_token_bound(self, chars: int) -> int:
        """An upper bound on the byte-level BPE tokens of any ``chars`` characters of this text.

        The engine's BPE (``worker.engine.tokenizers.BPETokenizer``) starts from one token per
        UTF-8 byte (no prefix space, no special tokens) and merges only shrink that, so tokens
        <= bytes. ``chars`` characters hold at most 4 bytes each, and at most the text's bytes
        less one for each of the other ``num_chars - chars`` characters."""
        return max(0, min(4 * chars, self.num_bytes - (self.num_chars - chars)))


class TextCounter:
    """Decodes UTF-8 incrementally (a character may straddle two chunks) and counts characters,
    lines (as ``str.splitlines`` does) and words. Raises :class:`ValidationFailed` (field
    ``file``) on invalid UTF-8. :meth:`feed_text` counts text already decoded."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0  # bytes fed so far
        self._chars = self._breaks = self._words = 0
        self._text_bytes = 0  # UTF-8 bytes of the text given to feed_text
        self._in_word = False
        self._last = ""

    def feed(self, data: bytes, final: bool = False) -> None:
        pending = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            at = self._offset - pending + exc.start
            raise ValidationFailed(
                f"the file is not UTF-8 text: invalid byte sequence at byte offset {at}",
                field="file",
                details=[{"byte_offset": at, "reason": exc.reason}],
            ) from exc
        self._offset += len(data)
        self._count(text)

    def feed_text(self, text: str) -> None:
        """Count ``text`` (already decoded); its UTF-8 bytes count toward ``num_bytes``."""
        self._text_bytes += len(text.encode("utf-8", "surrogatepass"))
        self._count(text)

    def _count(self, text: str) -> None:
        if not text:
            return
        self._chars += len(text)
        breaks = text.count("\n")
        if _HAS_OTHER_BREAK.search(text) is not None:
            breaks += sum(text.count(c) for c in _OTHER_BREAKS) - text.count("\r\n")
        if self._last == "\r" and text[0] == "\n":
            breaks -= 1  # a "\r\n" split across two pieces is one break
        self._breaks += breaks
        words = len(text.split())
        if words and self._in_word and not text[0].isspace():
            words -= 1  # the first word continues the previous chunk's last one
        self._words += words
        self._in_word = not text[-1].isspace()
        self._last = text[-1]

    def finish(self) -> TextStats:
        self.feed(b"", final=True)
        lines = self._breaks + (1 if self._chars and self._last not in LINE_BREAKS else 0)
        return TextStats(self._chars, lines, self._words, self._offset + self._text_bytes)


def text_stats(text: str) -> TextStats:
    counter = TextCounter()
    counter.feed(text.encode("utf-8"))
    return counter.finish()


@lru_cache(maxsize=4)
def builtin_stats(name: str) -> TextStats:
    return text_stats(builtin_corpus(name))
