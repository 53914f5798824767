"""A dataset's statistics per tokenizer kind (``datasets.stats``, ``GET /v1/datasets/{id}``),
counted while an upload is stored. Torch-free; the BPE estimate uses the ``tokenizers`` library.

What each kind reports, for the engine's tokenizers (``worker.engine.tokenizers``) with their
default settings (``core.spec.TokenizerSpec``) trained on the *whole* dataset (a job trains its
tokenizer on the training split only, so a job's vocabulary is at most these):

- ``char``: ``tokens`` (one per character), ``vocab`` (``<unk>`` plus every distinct
  character), ``distinct_chars``, ``coverage`` 1.0 (every character of the dataset is in that
  vocabulary).
- ``word``: ``tokens`` (whitespace words plus one ``<eos>`` per line), ``vocab`` (``<unk>``,
  ``<eos>`` and every distinct word: ``min_freq`` 1, no ``max_vocab``), ``distinct_words``,
  ``singletons`` (words seen once: ``min_freq: 2`` drops them), ``coverage`` (the fraction of
  the word tokens, ``<eos>`` included, that are not ``<unk>`` at the default settings: below
  1.0 only when the text itself writes ``<unk>``, as PTB does) and ``coverage_at_max_vocab``
  (``{"1000": f, ...}``: the same fraction with ``max_vocab`` set to that size, for each size
  of :data:`MAX_VOCAB_SIZES` below the default vocabulary). When a text has more than
  :data:`MAX_DISTINCT_WORDS` distinct words, counting new words stops there (bounded memory):
  ``truncated`` is true and ``vocab``/``distinct_words`` are lower bounds.
- ``bpe``: an *estimate* (``estimate: true``): a byte-level BPE tokenizer with the default
  ``vocab_size`` (2,000) trained on a sample of the dataset (:func:`sample_lines`: up to
  :data:`SAMPLE_WINDOWS` evenly spaced windows of :data:`WINDOW_BYTES`, whole lines) and
  encoding that sample; ``tokens`` is its tokens per UTF-8 byte times the dataset's bytes,
  ``vocab`` its vocabulary size, ``coverage`` 1.0 (byte level: nothing is ``<unk>``),
  ``sample_bytes`` the sample's size. On tinyshakespeare (1.1 MB) the estimate is 1.3% below
  the tokens of a tokenizer trained on the whole text (a small sample fits its own merges
  better).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any, BinaryIO

from core.textstats import TextStats

#: Distinct words counted at most (about 45 MB of Counter for short words; WikiText-103 has
#: 267k); past it only the words already seen are counted and the word statistics say
#: ``truncated`` (a GloVe file of numbers gets there).
MAX_DISTINCT_WORDS = 500_000
#: The ``max_vocab`` sizes ``coverage_at_max_vocab`` reports.
MAX_VOCAB_SIZES = (1_000, 10_000, 50_000)
#: The BPE estimate's sample: this many windows of this many bytes, evenly spaced (256 KiB).
SAMPLE_WINDOWS = 32
WINDOW_BYTES = 8 * 1024
#: ``core.spec.TokenizerSpec``'s default ``vocab_size``.
DEFAULT_BPE_VOCAB = 2000

class TokenCounter:
    """The distinct characters and the word frequencies of a text fed a piece at a time (a word
    split across two pieces is counted once, as ``str.split`` of the whole text counts it)."""

    def __init__(self, max_distinct_words: int = MAX_DISTINCT_WORDS) -> None:
        self.chars: set[str] = set()
        self.words: Counter[str] = Counter()
        self.truncated = False
        self._max = max_distinct_words
        self._carry: list[str] = []  # the unfinished last word, in pieces

    def feed(self, piece: str) -> None:
        if not piece:
            return
        self.chars.update(piece)
        # Where the piece's last (maybe unfinished) word starts: rsplit scans from the end.
        cut = len(piece) if piece[-1].isspace() else len(piece) - len(piece.rsplit(None, 1)[-1])
        if cut == 0:  # no whitespace: the word goes on
            self._carry.append(piece)
            return
        head = piece[:cut]
        if self._carry:
            head = "".join(self._carry) + head
        self._count(head.split())
        self._carry = [piece[cut:]] if cut < len(piece) else []

    def finish(self) -> None:
        if self._carry:
            self._count("".join(self._carry).split())
            self._carry = []

    def _count(self, words: list[str]) -> None:
        if not self.truncated:
            self.words.update(words)
            if len(self.words) <= self._max:
                return
            self.truncated = True  # keep what was counted; count only known words from now
            return
        counts = self.words
        for w in words:
            if w in counts:
                counts[w] += 1


def word_stats(text: TextStats, counter: TokenCounter) -> dict[str, Any]:
    """The ``word`` entry (see the module's doc)."""
    counter.finish()
    counts = counter.words
    unk = counts.get("<unk>", 0)  # the tokenizer's own <unk> (PTB, WikiText write it)
    tokens = text.num_words + text.num_lines
    ranked = sorted((n for w, n in counts.items() if w not in ("<unk>", "<eos>")),
                    reverse=True)
    vocab = 2 + len(ranked)
    eos = counts.get("<eos>", 0)  # a written "<eos>" is the tokenizer's <eos>
    covered = tokens - unk
    at_max: dict[str, float] = {}
    kept = eos + text.num_lines  # <eos> tokens are never <unk>
    cumulative = 0
    for size in MAX_VOCAB_SIZES:
        if size >= vocab:
            break
        cumulative = sum(ranked[: size - 2])
        at_max[str(size)] = _fraction(kept + cumulative, tokens)
    return {
        "tokens": tokens,
        "vocab": vocab,
        "distinct_words": len(ranked),
        "singletons": sum(1 for n in ranked if n == 1),
        "coverage": _fraction(covered, tokens),
        "coverage_at_max_vocab": at_max,
        "truncated": counter.truncated,
    }


def char_stats(text: TextStats, counter: TokenCounter) -> dict[str, Any]:
    """The ``char`` entry (see the module's doc)."""
    return {"tokens": text.num_chars, "vocab": 1 + len(counter.chars),
            "distinct_chars": len(counter.chars), "coverage": 1.0}


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 1.0


def sample_lines(fh: BinaryIO, size: int, labelled: bool) -> list[str]:
    """Whole lines from ``fh`` (a stored dataset of ``size`` bytes, seekable): all of it when
    it is at most ``SAMPLE_WINDOWS * WINDOW_BYTES`` bytes, else ``SAMPLE_WINDOWS`` windows of
    ``WINDOW_BYTES`` at evenly spaced offsets, each cut to the lines that start and end in it.
    For a labelled dataset (JSON Lines) the lines are the examples' texts."""
    budget = SAMPLE_WINDOWS * WINDOW_BYTES
    if size <= budget:
        chunks = [fh.read(size)]
    else:
        chunks = []
        step = size // SAMPLE_WINDOWS
        for i in range(SAMPLE_WINDOWS):
            fh.seek(i * step)
            data = fh.read(WINDOW_BYTES)
            start = 0 if i == 0 else data.find(b"\n") + 1
            end = data.rfind(b"\n") + 1
            if 0 < start < end:
                chunks.append(data[start:end])
            elif i == 0 and end > 0:
                chunks.append(data[:end])
    lines = [line for chunk in chunks
             for line in chunk.decode("utf-8", "replace").splitlines(keepends=True)]
    if not labelled:
        return lines
    texts = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
    return texts


def bpe_estimate(lines: Iterable[str], text_bytes: int,
                 vocab_size: int = DEFAULT_BPE_VOCAB) -> dict[str, Any]:
    """The ``bpe`` entry: a byte-level BPE tokenizer configured as the engine's
    (``worker.engine.tokenizers.BPETokenizer.train_from_batches``: ``ByteLevel`` pre-tokenizer
    without a prefix space, the 256-byte initial alphabet, no special tokens) trained on
    ``lines`` and encoding them line by line; ``tokens`` = its tokens per UTF-8 byte of the
    sample times ``text_bytes``. Raises nothing for an empty sample (``tokens`` 0)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    sample = [line for line in lines if line]
    sample_bytes = sum(len(line.encode("utf-8", "surrogatepass")) for line in sample)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([sample], trainer=trainer)
    sample_tokens = sum(len(e.ids) for e in hf.encode_batch(sample, add_special_tokens=False))
    per_byte = sample_tokens / sample_bytes if sample_bytes else 0.0
    return {"tokens": round(per_byte * text_bytes), "vocab": int(hf.get_vocab_size()),
            "coverage": 1.0, "estimate": True, "sample_bytes": sample_bytes,
            "tokens_per_byte": round(per_byte, 6), "vocab_size": vocab_size}
