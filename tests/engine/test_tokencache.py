"""The token cache (worker.engine.tokencache) and the streamed tokenizers
(worker.engine.textstream): the same token sequences as ``tok.encode(split_text)`` of the whole
split, on real text read in tiny pieces; reuse, corruption, dtypes, the cut, training."""

from __future__ import annotations

import io
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.contract import CorpusTexts, TrainingError
from core.corpora import builtin_corpus, find_corpus
from core.sources import CorpusSources, TextSource
from core.spec import JobSpec
from core.splits import split_bounds, split_texts
from core.textstats import normalise_line_ends
from worker.engine import textstream, tokencache
from worker.engine.data import as_long, eval_streams, eval_windows, token_tensor
from worker.engine.tokencache import (
    PreparedCorpus,
    cache_key,
    plan_segments,
    prepare_corpus,
    token_dtype,
)
from worker.engine.tokenizers import BPETokenizer, build_tokenizer
from worker.engine.trainer import train, train_sources

from .conftest import RecordingHooks, make_spec, strip_timing


@pytest.fixture(scope="module")
def real_text() -> str:
    """About 12k characters of real text with what streaming must not get wrong: CRLF and lone
    CR line ends, 2-, 3- and 4-byte UTF-8 characters, the other line breaks ``splitlines``
    knows, blank lines, ``<unk>``/``<eos>`` written in the text, no final newline."""
    p = find_corpus("tinyshakespeare/input.txt")
    base = p.read_text(encoding="utf-8") if p is not None else builtin_corpus("python-docs")
    head, mid, tail = base[:4000], base[4000:8000], base[8000:11000]
    return (head.replace("\n", "\r\n") + "café naïve — “quoted” 😀 emoji\r"
            + mid + "\u2028line\x85sep\x0cform\x1cfile\rcr <unk> <eos>\n\n"
            + tail.replace("e", "é") + " 😀\u2029 tail without newline")


class Trickle(io.BytesIO):
    """A byte stream that returns at most 3 bytes per read: multi-byte UTF-8 characters and
    CRLF pairs are split across the reads the decoder sees."""

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(3 if size is None or size < 0 else min(size, 3))


def byte_source(text: str, universal: bool = False, sha: str | None = None) -> TextSource:
    data = text.encode("utf-8")
    return TextSource("test bytes", opener=lambda: Trickle(data), sha256=sha,
                      universal_newlines=universal)


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read 7 characters at a time and cut unfinished lines past 40 characters."""
    monkeypatch.setattr(tokencache, "CHUNK_CHARS", 7)
    monkeypatch.setattr(textstream, "LONG_LINE", 40)


def spec_for(kind: str, **top: Any) -> JobSpec:
    return make_spec(top={"tokenizer": {"kind": kind, "vocab_size": 300, "min_freq": 1},
                          **top})


def encode_whole(spec: JobSpec, texts: CorpusTexts) -> tuple[str, dict[str, list[int]]]:
    """Today's path: cut the strings, train on the training split, encode each split whole."""
    parts = split_texts(spec, texts)
    tok = build_tokenizer(spec.tokenizer, parts.train)
    ids = {"train": tok.encode(parts.train), "validation": tok.encode(parts.validation)}
    if parts.test is not None:
        ids["test"] = tok.encode(parts.test)
    return tok.to_json(), ids


def as_lists(prepared: PreparedCorpus) -> dict[str, list[int]]:
    return {name: a.tolist() for name, a in prepared.splits.items()}


# -- the same tokens as encoding each whole split -------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
@pytest.mark.parametrize("cached", [False, True])
def test_streamed_tokens_equal_encoding_each_whole_split(
    kind: str, cached: bool, real_text: str, tiny_pieces: None, tmp_path: Path,
) -> None:
    spec = spec_for(kind, test_fraction=0.1)
    tok_json, expected = encode_whole(spec, CorpusTexts(train=real_text))
    prepared = prepare_corpus(spec, CorpusSources(byte_source(real_text)),
                              tmp_path if cached else None)
    assert prepared.tokenizer.to_json() == tok_json
    assert as_lists(prepared) == expected
    assert all(len(v) > 100 for v in expected.values())


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_separate_validation_and_test_sources_are_encoded_whole(
    kind: str, real_text: str, tiny_pieces: None,
) -> None:
    spec = spec_for(kind)
    val, test = real_text[2000:5000], real_text[9000:]
    tok_json, expected = encode_whole(spec, CorpusTexts(train=real_text, validation=val,
                                                        test=test))
    sources = CorpusSources(byte_source(real_text), byte_source(val), byte_source(test))
    prepared = prepare_corpus(spec, sources)
    assert prepared.tokenizer.to_json() == tok_json
    assert as_lists(prepared) == expected


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_a_file_read_with_universal_newlines_is_read_as_an_upload_is_stored(
    kind: str, real_text: str, tiny_pieces: None, tmp_path: Path,
) -> None:
    """``lmforge train --data`` reads a file as an upload of it is stored: no leading BOM,
    every line break ``str.splitlines`` knows as ``\\n`` (``core.textstats``)."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\ufeff" + real_text).encode("utf-8"))
    spec = spec_for(kind)
    as_stored = normalise_line_ends(real_text)
    assert as_stored.splitlines() == real_text.splitlines() and "\r" not in as_stored
    tok_json, expected = encode_whole(spec, CorpusTexts(train=as_stored))
    prepared = prepare_corpus(spec, CorpusSources(TextSource.from_path(path)))
    assert prepared.tokenizer.to_json() == tok_json
    assert as_lists(prepared) == expected


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_a_long_line_cut_at_safe_spaces_gives_the_same_tokens(
    kind: str, real_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokencache, "CHUNK_CHARS", 13)
    monkeypatch.setattr(textstream, "LONG_LINE", 100)
    # ~2000 words, no line break, separated by runs of spaces and tabs (a cut inside a run
    # would change the byte-level pre-tokens), some next to non-ASCII letters.
    gaps = [" ", " ", "  ", "   ", " \t ", "\t", "      "]
    words = real_text.split()
    one_line = "".join(w + gaps[i % len(gaps)] for i, w in enumerate(words))
    text = f"first line\n{one_line}  trailing,spaces \t\n{one_line[:3000]}"
    spec = spec_for(kind)
    tok_json, expected = encode_whole(spec, CorpusTexts(train=text))
    prepared = prepare_corpus(spec, CorpusSources(byte_source(text)))
    assert prepared.tokenizer.to_json() == tok_json
    assert as_lists(prepared) == expected


def test_line_splitter_is_splitlines_keepends_over_any_pieces(real_text: str) -> None:
    for size in (1, 2, 5, 64):
        splitter = textstream.LineSplitter()
        lines: list[str] = []
        for i in range(0, len(real_text), size):
            done, head = splitter.feed(real_text[i : i + size])
            assert head == ""
            lines.extend(done)
        lines.extend(splitter.finish())
        assert lines == real_text.splitlines(keepends=True)


# -- bpe: lines joined into longer sequences ----------------------------------------------------


@pytest.mark.parametrize(("chunk", "limit"), [(4096, 40), (1 << 20, None)])
def test_bpe_lines_joined_into_sequences_give_the_tokens_of_each_whole_split(
    chunk: int, limit: int | None, real_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokencache, "CHUNK_CHARS", chunk)
    if limit is not None:  # sequences of joined lines cut again past 40 characters
        monkeypatch.setattr(textstream, "BPE_SEQUENCE", limit)
    spec = spec_for("bpe", test_fraction=0.1)
    tok_json, expected = encode_whole(spec, CorpusTexts(train=real_text))
    prepared = prepare_corpus(spec, CorpusSources(byte_source(real_text)))
    assert prepared.tokenizer.to_json() == tok_json
    assert as_lists(prepared) == expected


def test_joined_bpe_sequences_have_the_pre_tokens_and_ids_of_their_lines() -> None:
    # Random texts of what decides a join: spaces, tabs, other whitespace (\xa0 and \u3000
    # are \s to the pre-tokenizer, \x1f is not), every kind of line break, letters, digits,
    # punctuation, contractions; a tokenizer trained on them has merges across whitespace
    # runs (" \n", "\r\n", ...), so a wrong join would show in the ids too.
    rng = random.Random(0)
    parts = ["a", "Zq", "7", ".", "'s", "é", "😀", " ", " ", "\t", "\xa0", "\u3000", "\x1f",
             "\n", "\n", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
             "\u2029"]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    tok = BPETokenizer.train("".join(texts), 400)
    pre = tok.hf.pre_tokenizer
    joined = 0
    for text in texts:
        lines = text.splitlines(keepends=True)
        seqs = textstream.bpe_sequences(text)
        assert "".join(seqs) == text
        assert ([p for s in seqs for p, _ in pre.pre_tokenize_str(s)]
                == [p for line in lines for p, _ in pre.pre_tokenize_str(line)]), repr(text)
        assert textstream.BPEEncoder(tok.hf, np.dtype("<u2")).finish().size == 0
        enc = textstream.BPEEncoder(tok.hf, np.dtype("<u2"))
        assert np.concatenate([enc.feed(text), enc.finish()]).tolist() == tok.encode(text)
        joined += len(lines) - len(seqs)
    assert joined > 1000


def test_joined_bpe_sequences_are_cut_again_past_the_limit() -> None:
    text = "".join(f"line {i}, word\n" for i in range(200))  # every line end joinable
    assert textstream.bpe_sequences(text) == [text]
    seqs = textstream.bpe_sequences(text, limit=50)
    assert "".join(seqs) == text and len(seqs) > 30
    assert all(50 < len(s) <= 50 + len("line 199, word\n") for s in seqs[:-1])
    assert all(s.endswith("\n") for s in seqs)


def test_every_whitespace_of_the_bpe_pre_tokenizer_is_isspace() -> None:
    # What makes "not str.isspace" mean "not \s" to the pre-tokenizer (textstream's doc): for
    # a character c that \s matches, cc + "b" is three pre-tokens (\s+(?!\S) backs off by one),
    # for any other at most two. (The space itself is the optional space of " b".)
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ws = {c for c in range(0x110000) if not 0xD800 <= c < 0xE000
          and len(pre.pre_tokenize_str(chr(c) * 2 + "b")) == 3}
    assert {0x09, 0x0A, 0x0D, 0x85, 0xA0, 0x2028, 0x3000} <= ws
    assert all(chr(c).isspace() for c in ws)


def test_the_bpe_encoder_returns_each_piece_one_call_later_and_raises_its_errors(
    small_text: str,
) -> None:
    tok = BPETokenizer.train(small_text, 300)
    enc = textstream.BPEEncoder(tok.hf, np.dtype("<u2"))
    assert enc.feed("First line,\nsecond ").size == 0  # started in the background
    assert enc.feed("line.\nthird").tolist() == tok.encode("First line,\n")
    assert enc.finish().tolist() == tok.encode("second line.\nthird")
    # The Rust side refuses a lone surrogate (TypeError); the error reaches the caller.
    enc = textstream.BPEEncoder(tok.hf, np.dtype("<u2"))
    enc.feed("bad \ud800 text\n")
    with pytest.raises(TypeError):
        enc.finish()


def test_every_line_break_of_splitlines_is_whitespace_to_split() -> None:
    # What lets the word counts be those of text.split() (textstream's module doc).
    breaks = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) == 2]
    assert set(breaks) == textstream.LINE_BREAKS
    assert all(c.isspace() for c in breaks)


def test_the_split_offsets_are_split_bounds(real_text: str) -> None:
    n = len(real_text)
    for vf, tf in [(0.1, 0.0), (0.1, 0.1), (0.05, 0.2), (0.3, 0.0)]:
        spec = make_spec(top={"val_fraction": vf, "test_fraction": tf})
        segs = plan_segments(spec, CorpusSources(byte_source(real_text)))
        train_end, test_start = split_bounds(spec, n)
        expected = [("train", 0, train_end), ("validation", train_end, test_start)]
        if tf > 0:
            expected.append(("test", test_start, n))
        assert [(s.split, s.start, s.end) for s in segs] == expected
    spec = make_spec(top={"test_fraction": 0.1})
    sep = CorpusSources(byte_source(real_text), byte_source("v"), byte_source("t"))
    segs = plan_segments(spec, sep)
    assert [(s.split, s.start, s.end) for s in segs] == [
        ("train", 0, split_bounds(spec, n, separate_validation=True, separate_test=True)[0]),
        ("validation", 0, None), ("test", 0, None)]


# -- dtypes --------------------------------------------------------------------------------------


def test_uint16_up_to_65536_entries_then_uint32() -> None:
    assert token_dtype(256) == np.dtype("<u2") and token_dtype(1 << 16) == np.dtype("<u2")
    assert token_dtype((1 << 16) + 1) == np.dtype("<u4")


def test_a_vocabulary_past_uint16_is_written_as_uint32(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    text = "\n".join(" ".join(words[i : i + 10]) for i in range(0, len(words), 10)) * 2
    spec = make_spec(top={"tokenizer": {"kind": "word"}})
    tok_json, expected = encode_whole(spec, CorpusTexts(train=text))
    prepared = prepare_corpus(spec, CorpusSources(byte_source(text)), tmp_path)
    assert prepared.meta["dtype"] == "uint32" and prepared.tokenizer.vocab_size > 1 << 16
    assert prepared.tokenizer.to_json() == tok_json and as_lists(prepared) == expected
    ids = token_tensor(prepared.splits["train"])
    assert ids.dtype == torch.int32 and as_long(ids).tolist() == expected["train"]


def test_token_views_read_high_uint16_ids_as_unsigned() -> None:
    ids = np.array([0, 1, 32767, 32768, 40000, 65535], dtype="<u2")
    t = token_tensor(ids)
    assert t.dtype == torch.int16 and as_long(t).tolist() == ids.tolist()
    assert as_long(t[2:5]).dtype == torch.int64


# -- the cache -----------------------------------------------------------------------------------


def _bins(entry: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(entry.glob("*.bin"))}


def test_a_second_preparation_reuses_the_entry_without_tokenising(
    real_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_for("bpe", test_fraction=0.1)
    first = prepare_corpus(spec, CorpusSources(byte_source(real_text)), tmp_path)
    assert first.path is not None and not first.reused
    before = _bins(first.path)

    def no(*args: Any) -> Any:
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tokencache, "train_tokenizer", no)
    monkeypatch.setattr(tokencache, "make_encoder", no)
    # The same bytes from another kind of source (a string): the same entry.
    again = prepare_corpus(spec, CorpusSources(TextSource.from_text(real_text)), tmp_path)
    assert again.reused and again.path == first.path and _bins(first.path) == before
    assert as_lists(again) == as_lists(first)
    assert again.tokenizer.to_json() == first.tokenizer.to_json()
    assert isinstance(again.splits["train"], np.memmap)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [first.path.name]


def test_what_shapes_the_tokens_is_in_the_key(real_text: str) -> None:
    src = CorpusSources(byte_source(real_text))
    keys = {cache_key(spec, src)[0] for spec in [
        spec_for("char"), spec_for("word"), spec_for("bpe"),
        make_spec(top={"tokenizer": {"kind": "bpe", "vocab_size": 301}}),
        make_spec(top={"tokenizer": {"kind": "word", "min_freq": 2}}),
        spec_for("char", val_fraction=0.2), spec_for("char", test_fraction=0.1)]}
    assert len(keys) == 7
    # Training settings do not change the tokens: the same entry.
    assert cache_key(make_spec(batch_size=2), src)[0] == cache_key(make_spec(), src)[0]
    other = CorpusSources(byte_source(real_text + "x"))
    crlf = CorpusSources(byte_source(real_text, universal=True))
    assert len({cache_key(make_spec(), s)[0] for s in (src, other, crlf)}) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_a_damaged_entry_is_rebuilt_never_used(
    damage: str, real_text: str, tmp_path: Path,
) -> None:
    spec = spec_for("char", test_fraction=0.1)
    sources = CorpusSources(byte_source(real_text))
    first = prepare_corpus(spec, sources, tmp_path)
    expected = as_lists(first)
    assert first.path is not None
    entry = first.path
    del first
    if damage == "meta":
        (entry / "meta.json").write_text("{not json", encoding="utf-8")
    else:
        path = entry / "validation.bin"
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        else:
            data = data[:-2]
        path.write_bytes(bytes(data))
    again = prepare_corpus(spec, sources, tmp_path)
    assert not again.reused and again.path == entry
    assert as_lists(again) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".bad-"))]


def test_resume_with_the_checkpoints_tokenizer_reuses_the_trained_entry(
    real_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_for("word")
    first = prepare_corpus(spec, CorpusSources(byte_source(real_text)), tmp_path)
    monkeypatch.setattr(tokencache, "make_encoder", lambda *a: pytest.fail("tokenised again"))
    again = prepare_corpus(spec, CorpusSources(byte_source(real_text)), tmp_path,
                           tokenizer=build_tokenizer(spec.tokenizer, split_texts(
                               spec, CorpusTexts(train=real_text)).train))
    assert again.reused and again.path == first.path


def test_concurrent_preparers_build_once_and_both_get_the_entry(
    real_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_for("char")
    builds = []
    build = tokencache._build_entry

    def counted(*args: Any) -> PreparedCorpus:
        builds.append(1)
        return build(*args)

    monkeypatch.setattr(tokencache, "_build_entry", counted)
    results: list[PreparedCorpus] = []
    threads = [threading.Thread(target=lambda: results.append(
        prepare_corpus(spec, CorpusSources(byte_source(real_text)), tmp_path)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 3
    assert len({str(r.path) for r in results}) == 1
    assert all(as_lists(r) == as_lists(results[0]) for r in results)


def test_an_entry_is_complete_files_with_their_sha256_in_meta(
    real_text: str, tmp_path: Path,
) -> None:
    prepared = prepare_corpus(spec_for("char"), CorpusSources(byte_source(real_text)), tmp_path)
    assert prepared.path is not None
    meta = json.loads((prepared.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["format"] == tokencache.FORMAT and meta["dtype"] == "uint16"
    for name, s in meta["splits"].items():
        path = prepared.path / s["file"]
        assert path.stat().st_size == s["tokens"] * 2 == s["bytes"]
        assert tokencache._file_sha256(path) == s["sha256"]
        assert np.fromfile(path, dtype="<u2").tolist() == prepared.splits[name].tolist()


# -- the sources ---------------------------------------------------------------------------------


def test_a_source_that_does_not_match_its_sha256_is_a_dataset_error(tmp_path: Path) -> None:
    src = byte_source("some text\n" * 100, sha="0" * 64)
    with pytest.raises(TrainingError) as err:
        prepare_corpus(make_spec(), CorpusSources(src), tmp_path)
    assert err.value.code == "dataset_error" and "sha256" in err.value.message
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_source_that_is_not_utf8_is_a_dataset_error() -> None:
    src = TextSource("dataset ds_x", opener=lambda: io.BytesIO(b"abc\xff\xfe def\n" * 10))
    with pytest.raises(TrainingError) as err:
        prepare_corpus(make_spec(), CorpusSources(src))
    assert err.value.code == "dataset_error" and "ds_x is not UTF-8" in err.value.message


def test_a_missing_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError) as err:
        prepare_corpus(make_spec(), CorpusSources(TextSource.from_path(tmp_path / "nope")))
    assert err.value.code == "dataset_error"


# -- training from the token files ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "streams", "seq_len"),
                         [(2, 4, 3), (101, 7, 5), (1000, 16, 16), (997, 3, 64)])
def test_eval_windows_are_the_windows_of_eval_streams(n: int, streams: int, seq_len: int) -> None:
    ids = np.random.default_rng(n).integers(0, 65536, n, dtype=np.uint16)
    x_all, y_all = eval_streams(torch.from_numpy(ids.astype(np.int64)), streams)
    windows = list(eval_windows(token_tensor(ids), streams, seq_len))
    assert len(windows) == -(-x_all.size(1) // seq_len)
    for k, (x, y) in enumerate(windows):
        assert torch.equal(x, x_all[:, k * seq_len : (k + 1) * seq_len])
        assert torch.equal(y, y_all[:, k * seq_len : (k + 1) * seq_len])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_training_from_the_cache_gives_the_metrics_of_training_from_strings(
    kind: str, small_text: str, tmp_path: Path,
) -> None:
    spec = make_spec(max_steps=8, top={"tokenizer": {"kind": kind, "vocab_size": 300},
                                       "test_fraction": 0.1})
    from_strings = RecordingHooks()
    expected = train(spec, CorpusTexts(train=small_text), from_strings)
    path = tmp_path / "corpus.txt"
    path.write_bytes(small_text.encode("utf-8"))
    for _ in range(2):  # the second run reuses the entry the first one wrote
        hooks = RecordingHooks()
        res = train_sources(spec, CorpusSources(TextSource.from_path(path)), hooks,
                            cache_dir=tmp_path / "cache")
        assert strip_timing(hooks.rows) == strip_timing(from_strings.rows)
        skip = {"duration_s", "train_tokens_per_s"}
        assert ({k: v for k, v in res.as_dict().items() if k not in skip}
                == {k: v for k, v in expected.as_dict().items() if k not in skip})
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_resume_from_the_cache_continues_exactly(small_text: str, tmp_path: Path) -> None:
    spec = make_spec(max_steps=20, log_interval=5, model={"dropout": 0.2})
    sources = CorpusSources(TextSource.from_text(small_text))
    full = RecordingHooks()
    train_sources(spec, sources, full, cache_dir=tmp_path)
    cancelled = RecordingHooks(stop_when=lambda rows: bool(rows) and rows[-1].step >= 10)
    train_sources(spec, sources, cancelled, cache_dir=tmp_path)
    resumed = RecordingHooks()
    train_sources(spec, sources, resumed, resume_from=cancelled.last("last").data,
                  cache_dir=tmp_path)
    assert strip_timing(cancelled.rows + resumed.rows) == strip_timing(full.rows)


def test_the_training_split_is_a_view_of_the_token_file(small_text: str, tmp_path: Path) -> None:
    from worker.engine.data import batchify, corpus_from_prepared

    spec = make_spec()
    prepared = prepare_corpus(spec, CorpusSources(TextSource.from_text(small_text)), tmp_path)
    corpus = corpus_from_prepared(spec, prepared)
    data = batchify(corpus.train, 8)
    base = prepared.splits["train"]
    assert data.dtype == torch.int16 and data.data_ptr() == base.ctypes.data
    assert isinstance(base, np.memmap) and prepared.path is not None
    assert os.path.samefile(str(base.filename), prepared.path / "train.bin")


@pytest.mark.parametrize("cached", [False, True])
def test_the_training_splits_id_counts_come_with_the_prepared_corpus(
    cached: bool, real_text: str, tmp_path: Path,
) -> None:
    prepared = prepare_corpus(spec_for("bpe"), CorpusSources(byte_source(real_text)),
                              tmp_path if cached else None)
    train = prepared.splits["train"]
    expected = np.bincount(train, minlength=prepared.tokenizer.vocab_size)
    assert prepared.train_counts().tolist() == expected.tolist()
    prepared.meta.pop("train_counts")  # an entry without them: counted from the split
    assert prepared.train_counts().tolist() == expected.tolist()


def test_a_cache_directory_that_cannot_be_used_falls_back_to_memory(
    real_text: str, tmp_path: Path,
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    spec = spec_for("char")
    prepared = prepare_corpus(spec, CorpusSources(byte_source(real_text)), not_a_dir)
    assert prepared.path is None and not prepared.reused
    assert as_lists(prepared) == encode_whole(spec, CorpusTexts(train=real_text))[1]
