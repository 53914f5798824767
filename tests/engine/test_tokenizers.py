from __future__ import annotations

import pytest

from core.spec import TokenizerSpec
from worker.engine.tokenizers import build_tokenizer, tokenizer_from_json


def test_char_round_trips_and_maps_unseen_characters_to_unk() -> None:
    tok = build_tokenizer(TokenizerSpec(kind="char"), "hello world\n")
    assert tok.decode(tok.encode("world hello\n")) == "world hello\n"
    assert tok.encode("hé") == [tok.encode("h")[0], tok.unk_id]
    again = tokenizer_from_json(tok.to_json())
    assert again.encode("hello") == tok.encode("hello") and again.vocab_size == tok.vocab_size


def test_word_round_trips_with_eos_per_line() -> None:
    text = "the cat sat\nthe dog sat\n"
    tok = build_tokenizer(TokenizerSpec(kind="word"), text)
    ids = tok.encode(text)
    assert len(ids) == 8  # 6 words + 2 <eos>
    assert tok.decode(ids) == text
    assert tokenizer_from_json(tok.to_json()).encode(text) == ids


def test_word_reuses_unk_already_in_text_and_applies_min_freq_and_max_vocab() -> None:
    text = "a a a b b <unk> c\n"
    tok = build_tokenizer(TokenizerSpec(kind="word", min_freq=2), text)
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert vocab == ["<unk>", "<eos>", "a", "b"]  # one <unk>; c is below min_freq
    assert tok.encode("c <unk>") == [0, 0, 1]
    capped = build_tokenizer(TokenizerSpec(kind="word", max_vocab=3), text)
    assert capped.vocab_size == 3


def test_bpe_round_trips_any_text_and_respects_vocab_size(small_text: str) -> None:
    tok = build_tokenizer(TokenizerSpec(kind="bpe", vocab_size=300), small_text)
    assert tok.vocab_size <= 300
    probe = small_text[:500] + " ünïcödé ✓\n"
    ids = tok.encode(probe)
    assert len(ids) < len(probe.encode())  # merges were learned
    assert tok.decode(ids) == probe
    assert tokenizer_from_json(tok.to_json()).encode(probe) == ids


def test_unknown_tokenizer_json_is_rejected() -> None:
    with pytest.raises(ValueError):
        tokenizer_from_json('{"kind": "morse"}')
