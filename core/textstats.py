"""Text statistics (characters, lines, words, bytes), counted incrementally while an upload
streams, and the token counts each tokenizer kind makes of them. Pure Python: the API counts
uploads with it and the submission check (:mod:`core.splits`) estimates split sizes from it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache

from core.corpora import builtin_corpus
from core.errors import ValidationFailed


@dataclass(frozen=True)
class TextStats:
    num_chars: int  # Unicode code points
    num_lines: int  # "\n"-terminated lines, plus a last unterminated one
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
    lines and words. Raises :class:`ValidationFailed` (field ``file``) on invalid UTF-8."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._offset = 0  # bytes fed so far
        self._chars = self._newlines = self._words = 0
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
        if not text:
            return
        self._chars += len(text)
        self._newlines += text.count("\n")
        words = len(text.split())
        if words and self._in_word and not text[0].isspace():
            words -= 1  # the first word continues the previous chunk's last one
        self._words += words
        self._in_word = not text[-1].isspace()
        self._last = text[-1]

    def finish(self) -> TextStats:
        self.feed(b"", final=True)
        lines = self._newlines + (1 if self._chars and self._last != "\n" else 0)
        return TextStats(self._chars, lines, self._words, self._offset)


def text_stats(text: str) -> TextStats:
    counter = TextCounter()
    counter.feed(text.encode("utf-8"))
    return counter.finish()


@lru_cache(maxsize=4)
def builtin_stats(name: str) -> TextStats:
    return text_stats(builtin_corpus(name))
