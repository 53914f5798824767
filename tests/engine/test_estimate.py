"""core.estimate against the real model and tokenizers: the parameter count is exactly
``sum(p.numel())`` of ``worker.engine.model``, the vocabulary bound is never below the vocabulary
a real tokenizer trains, and the memory estimate adds up its documented terms."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from core.estimate import (
    activation_bytes,
    device_class,
    lstm_params,
    param_count,
    train_memory_bytes,
    vocab_bound,
)
from core.spec import JobSpec
from core.textstats import text_stats
from worker.engine.data import stream_bounds
from worker.engine.evaluate import evaluate
from worker.engine.model import LSTMLanguageModel
from worker.engine.tokenizers import build_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen jugs.\n"
        "Grüße aus Köln — naïve café, 東京 and 🦊 too.\n") * 40


def _spec(tokenizer: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
          training: dict[str, Any] | None = None,
          optimizer: dict[str, Any] | None = None) -> JobSpec:
    return JobSpec.model_validate({
        "dataset_id": "ds", "tokenizer": tokenizer or {}, "model": model or {},
        "training": training or {}, "optimizer": optimizer or {},
    })


MODELS = [
    {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
    {"embed_dim": 24, "hidden_dim": 24, "num_layers": 2, "tie_weights": True},
    {"embed_dim": 8, "hidden_dim": 40, "num_layers": 3, "dropout": 0.2},
    {"embed_dim": 32, "hidden_dim": 32, "num_layers": 3, "tie_weights": True},
]
TOKENIZERS = [{"kind": "char"}, {"kind": "word"}, {"kind": "word", "max_vocab": 10},
              {"kind": "bpe", "vocab_size": 300}]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_param_count_equals_the_real_models_numel(model: dict[str, Any],
                                                   tokenizer: dict[str, Any]) -> None:
    spec = _spec(tokenizer, model)
    vocab = build_tokenizer(spec.tokenizer, TEXT).vocab_size
    m = spec.model
    real = LSTMLanguageModel(vocab, m.embed_dim, m.hidden_dim, m.num_layers, m.dropout,
                             m.tie_weights)
    assert param_count(spec, vocab) == sum(p.numel() for p in real.parameters())
    assert lstm_params(m.embed_dim, m.hidden_dim, m.num_layers) == sum(
        p.numel() for p in real.lstm.parameters())


@pytest.mark.parametrize("tokenizer", TOKENIZERS + [{"kind": "bpe", "vocab_size": 64},
                                                    {"kind": "word", "min_freq": 3}])
@pytest.mark.parametrize("text", [TEXT, "abc" * 50, "é€😀" * 30 + "x", TEXT[:200]])
def test_vocab_bound_is_at_least_the_trained_vocabulary(tokenizer: dict[str, Any],
                                                        text: str) -> None:
    spec = _spec(tokenizer)
    real = build_tokenizer(spec.tokenizer, text).vocab_size
    assert vocab_bound(spec, text_stats(text)).size >= real


def test_char_bound_is_tight_for_ascii_and_counts_multibyte_costs() -> None:
    # 10,000 ASCII characters can hold at most 128 distinct ones, plus <unk>.
    assert vocab_bound(_spec({"kind": "char"}), text_stats("ab" * 5000)).size == 129
    # "é" costs one extra byte, "€" two, "😀" three: 6 extra bytes, so at most
    # 128 + 6 two-byte characters could be distinct, and no more than the 4 characters.
    assert vocab_bound(_spec({"kind": "char"}), text_stats("é€😀a")).size == 1 + 4
    # 3000 extra bytes: 128 one-byte, all 1920 two-byte, and (3000 - 1920) / 2 three-byte ones.
    stats = text_stats("é" * 3000)
    assert vocab_bound(_spec({"kind": "char"}), stats).size == 1 + 128 + 1920 + 540


def test_word_bound_uses_max_vocab_when_smaller() -> None:
    stats = text_stats("w " * 1000)
    assert vocab_bound(_spec({"kind": "word"}), stats).size == 1002
    assert vocab_bound(_spec({"kind": "word", "min_freq": 10}), stats).size == 102
    assert vocab_bound(_spec({"kind": "word", "max_vocab": 50}), stats).size == 50


def test_a_large_model_within_every_field_bound_has_billions_of_parameters() -> None:
    spec = _spec({"kind": "bpe", "vocab_size": 100_000},
                 {"embed_dim": 8192, "hidden_dim": 8192, "num_layers": 16})
    # 16 layers of 4 (8192 * 8192 * 2 + 2 * 8192) plus 100k x 8192 twice plus the bias.
    expected = 16 * 4 * (2 * 8192 * 8192 + 2 * 8192) + 2 * 100_000 * 8192 + 100_000
    assert param_count(spec, 100_000) == expected > 5_000_000_000


def test_memory_adds_weights_grads_optimizer_state_and_activations() -> None:
    model = {"embed_dim": 16, "hidden_dim": 32, "num_layers": 2}
    training = {"batch_size": 4, "seq_len": 8}
    v = 100
    adam = _spec(model=model, training=training)
    p = param_count(adam, v)
    act = activation_bytes(adam, v)
    assert train_memory_bytes(adam, v) == 4 * p * 4 + act
    sgd = _spec(model=model, training=training, optimizer={"name": "sgd"})
    assert train_memory_bytes(sgd, v) == 4 * p * 2 + act
    momentum = _spec(model=model, training=training, optimizer={"name": "sgd", "momentum": 0.9})
    assert train_memory_bytes(momentum, v) == 4 * p * 3 + act
    n = 4 * 8
    # embedding 4NE, two layers of 6NH fp32, logits 4NV + 8NV
    assert act == 4 * n * 16 + 2 * 6 * n * 32 * 4 + 12 * n * v
    bf16 = _spec(model=model, training={**training, "precision": "bf16"})
    assert activation_bytes(bf16, v) == 4 * n * 16 + 2 * 6 * n * 32 * 2 + (2 + 8 + 4) * n * v
    # The logits dominate with a large vocabulary and grow linearly with batch x seq_len.
    big = _spec(model=model, training={"batch_size": 8, "seq_len": 8})
    assert activation_bytes(big, 50_000) == pytest.approx(2 * activation_bytes(adam, 50_000))


def test_device_class() -> None:
    assert device_class("cpu") == "cpu"
    assert device_class("cuda") == device_class("cuda:1") == "cuda"
    assert device_class("auto") is None


# -- training.eval_tokens: one evaluation reads a bounded, deterministic subset ---------------


@torch.no_grad()
def _stream_nll(model: LSTMLanguageModel, ids: torch.Tensor) -> float:
    """Summed next-token loss of one stream read from a zero state (no truncation)."""
    logits, _ = model(ids[:-1].unsqueeze(0))
    logp = F.log_softmax(logits[0].double(), -1)
    return float(-logp.gather(1, ids[1:].unsqueeze(1)).sum())


def test_eval_tokens_reads_the_head_of_each_evenly_spaced_stream() -> None:
    torch.manual_seed(3)
    model = LSTMLanguageModel(13, 8, 12, 2).eval()
    ids = torch.randint(0, 13, (1001,))  # 1000 targets in 4 streams of 250
    cpu = torch.device("cpu")
    res = evaluate(model, ids, batch_size=4, seq_len=7, device=cpu, max_tokens=100)
    assert res.tokens == 100  # 25 targets of each of the 4 streams
    total = sum(_stream_nll(model, ids[a : a + 26]) for a in stream_bounds(1000, 4)[:-1])
    assert res.loss == pytest.approx(total / 100, rel=1e-6)
    again = evaluate(model, ids, batch_size=4, seq_len=7, device=cpu, max_tokens=100)
    assert again.loss == res.loss  # the same subset every time
    full = evaluate(model, ids, batch_size=4, seq_len=7, device=cpu)
    assert full.tokens == 1000
    # A cap at or above the split's targets changes nothing.
    assert evaluate(model, ids, batch_size=4, seq_len=7, device=cpu,
                    max_tokens=1000).loss == full.loss


def test_eval_tokens_defaults_to_a_million_and_none_reads_everything() -> None:
    assert _spec().training.eval_tokens == 1_000_000
    assert _spec(training={"eval_tokens": None}).training.eval_tokens is None
