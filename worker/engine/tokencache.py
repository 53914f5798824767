"""Token files: each (texts, tokenizer, split) tokenised once, streamed, into one flat binary file
of token ids per split, memory-mapped by every later job on the same data.

The idea is nanoGPT's ``data/openwebtext/prepare.py``: tokenise once, write the ids as
``uint16`` to ``train.bin``/``val.bin``, and let training read windows of an ``np.memmap``, so
a corpus costs its token file in page cache rather than Python strings and lists of ints.

Preparation (:func:`prepare_corpus`) reads each source in pieces of
:data:`core.sources.CHUNK_CHARS` characters, never the whole text as one string:

1. counts the main source's characters (and checks its sha256) to place the cuts of
   :func:`core.splits.split_bounds` (character offsets, as ``split_texts`` cuts);
2. trains the tokenizer on the training split (:mod:`worker.engine.textstream`; skipped when a
   checkpoint's tokenizer is given);
3. encodes each split into ``<split>.bin``: ids as little-endian ``uint16`` when the vocabulary
   has at most 65536 entries (ids < 2**16), else ``uint32``.

The token sequences equal ``tokenizer.encode(split_text)`` of the whole split, for every kind
(the argument is in :mod:`worker.engine.textstream`; ``tests/engine/test_tokencache.py``).

Cache layout, under ``cache_dir`` (the service: ``$LMFORGE_HOME/cache/tokens``; ``lmforge
train``: ``~/.cache/lmforge/tokens``)::

    <key>/meta.json        format, key, tokenizer JSON, dtype, per split: file, tokens, sha256;
                           the training split's count of each id (the output bias's prior)
    <key>/train.bin        (N,) uint16|uint32
    <key>/validation.bin
    <key>/test.bin         when the job has a test split
    <key>.lock             flock(2) held while the entry is checked or built

``key`` = sha256 of :data:`FORMAT`, each source's :attr:`core.sources.TextSource.identity`
(content sha256 + line-end mode), the tokenizer spec fields that shape it (``bpe``: also the
``tokenizers`` version) or the sha256 of a given tokenizer's JSON, and the split fractions that
decide the cut. An entry is built in a temporary directory beside it and renamed into place,
so a reader never sees a partial one; preparers of the same key wait on the lock and the later
ones reuse the first one's entry. On every reuse each ``.bin`` is checked against the sha256 and
length in ``meta.json``; a mismatch (or an unreadable ``meta.json``) discards the entry and
builds it again: a corrupt file is never trained on. Nothing is evicted: delete the directory
(or an entry) to reclaim the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.contract import TrainingError
from core.sources import CHUNK_CHARS, CorpusSources, TextReader, TextSource
from core.spec import JobSpec, TokenizerSpec
from core.splits import split_bounds
from worker.engine.textstream import (
    BPEEncoder,
    CharEncoder,
    CharVocab,
    WordCounter,
    WordEncoder,
    bpe_units,
    read_chars,
)
from worker.engine.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    tokenizer_from_json,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone protects entries
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: The format of an entry; part of the key, so a new format never reads an old entry.
FORMAT = "lmforge.tokens.v1"
META = "meta.json"
_HASH_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """``uint16`` (little-endian) when every id of a ``vocab_size`` vocabulary fits (at most
    65536 entries), else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class PreparedCorpus:
    """A job's splits as token ids: ``splits`` maps ``train``, ``validation`` and (when the
    job has one) ``test`` to (N,) ``uint16``/``uint32`` arrays, ``np.memmap`` views of the
    cache entry's files (read-only in effect: copy-on-write mappings) or in-memory arrays
    when prepared without a cache. ``path``: the entry (None in memory); ``reused``: the
    entry existed and passed its check."""

    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None
    reused: bool = False

    def token_counts(self) -> dict[str, int | None]:
        return {name: (None if name not in self.splits else int(self.splits[name].size))
                for name in ("train", "validation", "test")}

    @property
    def nbytes(self) -> int:
        """Bytes of token ids over all splits (the size of the ``.bin`` files)."""
        return sum(int(a.nbytes) for a in self.splits.values())

    def train_counts(self) -> np.ndarray:
        """(vocab_size,) int64: how often each id occurs in the training split, counted while
        it was encoded (``meta["train_counts"]``), so that nothing reads the whole split
        again; counted from the split ``_COUNT_CHUNK`` tokens at a time for an entry
        without them."""
        counts = self.meta.get("train_counts")
        if counts is not None:
            return np.asarray(counts, dtype=np.int64)
        return _bincount(self.splits["train"], self.tokenizer.vocab_size)


# -- the plan: which characters of which source make each split ----------------------------------


@dataclass
class Segment:
    """Split ``split`` is characters ``[start, end)`` of ``source`` (``end`` None: to its
    end)."""

    split: str
    source: TextSource
    start: int
    end: int | None


def plan_segments(spec: JobSpec, sources: CorpusSources) -> list[Segment]:
    """The splits as :func:`core.splits.split_texts` cuts them, in reading order. Counts the
    main source's characters (one pass, cached by the source) to place the cuts."""
    main = sources.train
    n = main.scan().num_chars
    train_end, test_start = split_bounds(spec, n,
                                         separate_validation=sources.validation is not None,
                                         separate_test=sources.test is not None)
    segs = [Segment("train", main, 0, train_end)]
    if sources.validation is None:
        segs.append(Segment("validation", main, train_end, test_start))
    if sources.test is None and spec.test_fraction > 0:
        segs.append(Segment("test", main, test_start, n))
    if sources.validation is not None:
        segs.append(Segment("validation", sources.validation, 0, None))
    if sources.test is not None:
        segs.append(Segment("test", sources.test, 0, None))
    return segs


def _pieces(reader: TextReader, seg: Segment, pos: int) -> Iterator[str]:
    """The characters of ``seg`` from a reader standing at character ``pos`` of its source."""
    if seg.start > pos:
        for _ in read_chars(reader, seg.start - pos, CHUNK_CHARS):
            pass
    if seg.end is not None:
        yield from read_chars(reader, seg.end - seg.start, CHUNK_CHARS)
        return
    while piece := reader.read(CHUNK_CHARS):
        yield piece


# -- the tokenizer, trained by streaming ---------------------------------------------------------


def train_tokenizer(spec: TokenizerSpec, seg: Segment) -> Tokenizer:
    """``build_tokenizer(spec, train_text)`` on the training split, read a piece at a time."""
    with seg.source.open() as reader:
        pieces = _pieces(reader, seg, 0)
        if spec.kind == "char":
            vocab = CharVocab()
            for piece in pieces:
                vocab.feed(piece)
            return vocab.tokenizer()
        if spec.kind == "word":
            counter = WordCounter()
            for piece in pieces:
                counter.feed(piece)
            return counter.tokenizer(spec.max_vocab, spec.min_freq)
        if spec.kind == "bpe":
            return BPETokenizer.train_from_batches(bpe_units(pieces), spec.vocab_size)
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}")


class Encoder(Protocol):
    def feed(self, piece: str) -> np.ndarray: ...

    def finish(self) -> np.ndarray: ...


def make_encoder(tok: Tokenizer, dtype: np.dtype[Any]) -> Encoder:
    """A fresh streaming encoder for one split (:mod:`worker.engine.textstream`)."""
    if isinstance(tok, CharTokenizer):
        return CharEncoder(tok, dtype)
    if isinstance(tok, WordTokenizer):
        return WordEncoder(tok, dtype)
    if isinstance(tok, BPETokenizer):
        return BPEEncoder(tok.hf, dtype)
    raise ValueError(f"no streaming encoder for a {tok.kind!r} tokenizer")


# -- where the ids go: memory or a file ---------------------------------------------------------


class _Sink(Protocol):
    def write(self, ids: np.ndarray) -> None: ...

    def close(self) -> dict[str, Any]: ...


@dataclass
class _MemorySink:
    dtype: np.dtype[Any]
    parts: list[np.ndarray] = field(default_factory=list)
    array: np.ndarray | None = None

    def write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.parts.append(ids.astype(self.dtype, copy=False))

    def close(self) -> dict[str, Any]:
        self.array = (np.concatenate(self.parts) if self.parts
                      else np.zeros(0, dtype=self.dtype))
        self.parts = []
        return {"tokens": int(self.array.size)}


class _FileSink:
    def __init__(self, path: Path, dtype: np.dtype[Any]) -> None:
        self.path, self.dtype = path, dtype
        self._fh = open(path, "wb")  # closed in close()
        self._sha = hashlib.sha256()
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        data = np.ascontiguousarray(ids, dtype=self.dtype).data.cast("B")
        self._fh.write(data)
        self._sha.update(data)
        self._n += int(ids.size)

    def close(self) -> dict[str, Any]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return {"file": self.path.name, "tokens": self._n,
                "bytes": self._n * self.dtype.itemsize, "sha256": self._sha.hexdigest()}


_COUNT_CHUNK = 1 << 24


def _bincount(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, ids.size, _COUNT_CHUNK):
        counts += np.bincount(ids[start : start + _COUNT_CHUNK], minlength=vocab_size)
    return counts


class _Counting:
    """A sink that also counts each id it passes on (the training split's unigram counts,
    ``meta["train_counts"]``, which the model's output bias starts from)."""

    def __init__(self, sink: _Sink, vocab_size: int) -> None:
        self._sink = sink
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def write(self, ids: np.ndarray) -> None:
        if ids.size:
            self.counts += np.bincount(ids, minlength=self.counts.size)
        self._sink.write(ids)

    def close(self) -> dict[str, Any]:
        return {**self._sink.close(), "counts": self.counts.tolist()}


def _encode_splits(segs: list[Segment], tok: Tokenizer, dtype: np.dtype[Any],
                   sink_for: Any) -> dict[str, dict[str, Any]]:
    """Encode every segment into ``sink_for(split)``, one read per source; returns each
    split's sink summary. A source read to its cuts is then checked to end there (and so
    against its sha256)."""
    info: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(segs):
        source = segs[i].source
        with source.open() as reader:
            pos = 0
            while i < len(segs) and segs[i].source is source:
                seg, enc, sink = segs[i], make_encoder(tok, dtype), sink_for(segs[i].split)
                if seg.split == "train":
                    sink = _Counting(sink, tok.vocab_size)
                for piece in _pieces(reader, seg, pos):
                    sink.write(enc.feed(piece))
                sink.write(enc.finish())
                info[seg.split] = sink.close()
                pos = seg.end if seg.end is not None else pos
                i += 1
            if reader.read(1):
                raise TrainingError("dataset_error",
                                    f"{source.label} changed while it was being read")
    return info


# -- the cache ----------------------------------------------------------------------------------


def cache_key(spec: JobSpec, sources: CorpusSources,
              tokenizer: Tokenizer | None = None) -> tuple[str, dict[str, Any]]:
    """The entry's key (64 hex) and the document it hashes (see the module's doc). May scan
    a source whose sha256 is not known yet."""
    t = spec.tokenizer
    if tokenizer is not None:
        tok_doc: dict[str, Any] = {"kind": tokenizer.kind, "given": hashlib.sha256(
            tokenizer.to_json().encode()).hexdigest()}
    elif t.kind == "word":
        tok_doc = {"kind": "word", "max_vocab": t.max_vocab, "min_freq": t.min_freq}
    elif t.kind == "bpe":
        import tokenizers

        tok_doc = {"kind": "bpe", "vocab_size": t.vocab_size,
                   "tokenizers": tokenizers.__version__}
    else:
        tok_doc = {"kind": t.kind}
    doc = {
        "format": FORMAT,
        "sources": {"train": sources.train.identity,
                    "validation": None if sources.validation is None
                    else sources.validation.identity,
                    "test": None if sources.test is None else sources.test.identity},
        "tokenizer": tok_doc,
        "split": {"val_fraction": None if sources.validation is not None else spec.val_fraction,
                  "test_fraction": None if sources.test is not None else spec.test_fraction},
    }
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return key, doc


def prepare_corpus(spec: JobSpec, sources: CorpusSources, cache_dir: Path | None = None,
                   tokenizer: Tokenizer | None = None) -> PreparedCorpus:
    """The job's splits as token ids, from the cache when an entry for these texts, tokenizer
    and cut exists and passes its check, else prepared (and, with ``cache_dir``, stored).

    ``tokenizer``: use this one (a resumed checkpoint's) instead of training one; the entry
    of a trained tokenizer is reused when its tokenizer is the same. Without ``cache_dir``
    the ids are prepared in memory (still streamed: no whole-text strings or int lists).
    A cache directory that cannot be used (not writable, disk full) is logged and the ids
    are prepared in memory. Raises ``TrainingError("dataset_error")`` for a source that
    cannot be read, is not UTF-8 or does not match its sha256.
    """
    if cache_dir is not None:
        try:
            return _prepare_cached(spec, sources, cache_dir, tokenizer)
        except OSError as exc:
            log.warning("token cache %s cannot be used (%s); preparing in memory", cache_dir,
                        exc)
    return _prepare_in_memory(spec, sources, tokenizer)


def _prepare_cached(spec: JobSpec, sources: CorpusSources, cache_dir: Path,
                    tokenizer: Tokenizer | None) -> PreparedCorpus:
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if tokenizer is not None:
        key, doc = cache_key(spec, sources)
        found = _cached(cache_dir, key)
        if found is not None and found.tokenizer.to_json() == tokenizer.to_json():
            return found
    key, doc = cache_key(spec, sources, tokenizer)
    with _locked(cache_dir / f"{key}.lock"):
        found = _load_verified(cache_dir / key, key)
        if found is not None:
            log.info("token cache: reusing %s (%s tokens, checked in %.1f s)", key[:12],
                     found.token_counts(), time.perf_counter() - t0)
            return found
        _remove_leftovers(cache_dir, key)
        return _build_entry(spec, sources, tokenizer, cache_dir, key, doc, t0)


def _cached(cache_dir: Path, key: str) -> PreparedCorpus | None:
    with _locked(cache_dir / f"{key}.lock"):
        return _load_verified(cache_dir / key, key)


def _prepare(spec: JobSpec, sources: CorpusSources, tokenizer: Tokenizer | None,
             sink_for: Callable[[str, np.dtype[Any]], _Sink]) -> tuple[Tokenizer, dict[str, Any]]:
    """The three passes (count, train the tokenizer, encode); returns the tokenizer and the
    meta document's common part (dtype, per-split sink summaries, seconds per pass)."""
    t0 = time.perf_counter()
    segs = plan_segments(spec, sources)
    t1 = time.perf_counter()
    tok = tokenizer or train_tokenizer(spec.tokenizer, segs[0])
    t2 = time.perf_counter()
    dtype = token_dtype(tok.vocab_size)
    info = _encode_splits(segs, tok, dtype, lambda split: sink_for(split, dtype))
    train_counts = info["train"].pop("counts")
    t3 = time.perf_counter()
    chars = {s.split: None if s.end is None else s.end - s.start for s in segs}
    meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "splits": info, "chars": chars, "train_counts": train_counts,
            "seconds": {"count": t1 - t0, "train_tokenizer": t2 - t1, "encode": t3 - t2}}
    return tok, meta


def _prepare_in_memory(spec: JobSpec, sources: CorpusSources,
                       tokenizer: Tokenizer | None) -> PreparedCorpus:
    sinks: dict[str, _MemorySink] = {}

    def sink_for(split: str, dtype: np.dtype[Any]) -> _MemorySink:
        sinks[split] = _MemorySink(dtype)
        return sinks[split]

    tok, meta = _prepare(spec, sources, tokenizer, sink_for)
    splits = {name: s.array for name, s in sinks.items() if s.array is not None}
    return PreparedCorpus(tok, splits, meta)


def _build_entry(spec: JobSpec, sources: CorpusSources, tokenizer: Tokenizer | None,
                 cache_dir: Path, key: str, doc: dict[str, Any], t0: float) -> PreparedCorpus:
    """Prepare into ``.tmp-<key>-<uuid>`` and rename it to ``<key>`` (the caller holds the
    key's lock; ``t0``: when the preparation began, before the sources were identified)."""
    identify_s = time.perf_counter() - t0
    tmp = cache_dir / f".tmp-{key}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        tok, meta = _prepare(spec, sources, tokenizer,
                             lambda split, dtype: _FileSink(tmp / f"{split}.bin", dtype))
        meta["seconds"]["identify"] = identify_s  # hashing (and counting) a source
        meta.update(key=key, key_doc=doc, tokenizer=tok.to_json(),
                    prepare_s=time.perf_counter() - t0)
        _write_json(tmp / META, meta)
        _fsync_dir(tmp)
        os.rename(tmp, cache_dir / key)
        _fsync_dir(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("token cache: prepared %s in %.1f s %s (%s tokens, %s)", key[:12],
             meta["prepare_s"], meta["seconds"],
             {k: v["tokens"] for k, v in meta["splits"].items()}, meta["dtype"])
    return PreparedCorpus(tok, _memmaps(cache_dir / key, meta), meta, cache_dir / key)


def _load_verified(entry: Path, key: str) -> PreparedCorpus | None:
    """The entry at ``entry`` if it is complete and every file matches ``meta.json``; None
    when there is none. A damaged entry is logged and moved aside (then deleted)."""
    if not entry.exists():
        return None
    problem = _check_entry(entry, key)
    if problem is None:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        return PreparedCorpus(tokenizer_from_json(meta["tokenizer"]), _memmaps(entry, meta),
                              meta, entry, reused=True)
    log.warning("token cache: discarding %s: %s; preparing it again", entry, problem)
    bad = entry.with_name(f".bad-{key}-{uuid.uuid4().hex}")
    os.rename(entry, bad)
    shutil.rmtree(bad, ignore_errors=True)
    return None


def _check_entry(entry: Path, key: str) -> str | None:
    """What is wrong with the entry, or None."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return "it was written for another format or key"
        tokenizer_from_json(meta["tokenizer"])
        counts = meta.get("train_counts")
        if counts is not None and (len(counts) != meta["vocab_size"]
                                   or sum(counts) != meta["splits"]["train"]["tokens"]):
            return f"{META}'s train_counts do not add up to the training split"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name, s in meta["splits"].items():
            path = entry / s["file"]
            if path.stat().st_size != s["tokens"] * itemsize:
                return f"{path.name} holds {path.stat().st_size} bytes, not {s['bytes']}"
            if _file_sha256(path) != s["sha256"]:
                return f"{path.name} does not match the sha256 in {META} (split {name})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _memmaps(entry: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each split's file as an ``np.memmap`` (copy-on-write: writes never reach the file);
    an empty split as an empty array (a zero-length file cannot be mapped)."""
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    out: dict[str, np.ndarray] = {}
    for name, s in meta["splits"].items():
        out[name] = (np.memmap(entry / s["file"], dtype=dtype, mode="c", shape=(s["tokens"],))
                     if s["tokens"] else np.zeros(0, dtype=dtype))
    return out


def _remove_leftovers(cache_dir: Path, key: str) -> None:
    """Temporary and discarded directories of ``key`` left by preparers that died (the
    caller holds the key's lock, so no live preparer owns one)."""
    for p in [*cache_dir.glob(f".tmp-{key}-*"), *cache_dir.glob(f".bad-{key}-*")]:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
