from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F

from core.contract import CorpusTexts, TrainingError
from core.spec import JobSpec, ModelSpec
from core.splits import split_texts
from worker.engine.data import eval_streams
from worker.engine.evaluate import evaluate, perplexity
from worker.engine.model import LSTMLanguageModel
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec


def test_fraction_split_matches_the_reference_loop_first_90_percent() -> None:
    text = "x" * 1_115_394
    parts = split_texts(make_spec(), CorpusTexts(train=text))
    assert len(parts.train) == int(len(text) * 0.9)
    assert len(parts.train) + len(parts.validation) == len(text) and parts.test is None


def test_test_fraction_is_the_tail_and_separate_texts_override_fractions() -> None:
    spec = make_spec(top={"test_fraction": 0.2})
    parts = split_texts(spec, CorpusTexts(train="abcdefghij"))
    assert (parts.train, parts.validation, parts.test) == ("abcdefg", "h", "ij")
    parts = split_texts(spec, CorpusTexts(train="abcdefghij", validation="v", test="t"))
    assert (parts.train, parts.validation, parts.test) == ("abcdefghij", "v", "t")


def test_too_small_corpus_raises_corpus_too_small_with_the_numbers() -> None:
    spec = make_spec(batch_size=8, seq_len=16)
    with pytest.raises(TrainingError) as err:
        train(spec, CorpusTexts(train="abc" * 40), RecordingHooks())
    assert err.value.code == "corpus_too_small"
    assert "108 tokens" in err.value.message and "8 x 17 = 136" in err.value.message


def test_tie_weights_with_different_dims_is_a_validation_error() -> None:
    with pytest.raises(pydantic.ValidationError, match="tie_weights"):
        ModelSpec(embed_dim=16, hidden_dim=32, tie_weights=True)


def test_tied_model_shares_the_embedding_matrix() -> None:
    m = LSTMLanguageModel(50, 16, 16, 2, tie_weights=True)
    assert m.decoder.weight is m.encoder.weight
    logits, (h, c) = m(torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 5, 50) and h.shape == (2, 3, 16) and c.shape == (2, 3, 16)


def test_eval_streams_predict_every_token_but_the_first_exactly_once() -> None:
    ids = torch.arange(101)
    x, y = eval_streams(ids, 7)
    targets = y[y != -100]
    assert sorted(targets.tolist()) == list(range(1, 101))
    assert torch.equal(y[y != -100] - 1, x[y != -100])


@torch.no_grad()
def _brute_force(model: LSTMLanguageModel, ids: torch.Tensor) -> tuple[float, float]:
    logits, _ = model(ids[:-1].unsqueeze(0))  # (1, N-1, vocab), one stream, no truncation
    logp = F.log_softmax(logits[0].double(), -1)
    nll = -logp.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    acc = (logits[0].argmax(-1) == ids[1:]).double().mean()
    return float(nll.sum() / (ids.numel() - 1)), float(acc)


def test_token_weighted_eval_equals_brute_force_per_token_loss() -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel(11, 8, 12, 2).eval()
    ids = torch.randint(0, 11, (203,))  # 202 targets: not a multiple of seq_len
    res = evaluate(model, ids, batch_size=1, seq_len=16, device=torch.device("cpu"))
    loss, acc = _brute_force(model, ids)
    assert res.tokens == 202
    assert res.loss == pytest.approx(loss, rel=1e-6)
    assert res.accuracy == pytest.approx(acc)


def test_eval_with_several_streams_weights_each_stream_by_its_tokens() -> None:
    torch.manual_seed(1)
    model = LSTMLanguageModel(9, 8, 12, 1).eval()
    ids = torch.randint(0, 9, (50,))  # 49 targets over 4 streams of unequal length
    res = evaluate(model, ids, batch_size=4, seq_len=5, device=torch.device("cpu"))
    bounds = torch.linspace(0, 49, 5).round().long().tolist()
    total = 0.0
    for a, b in zip(bounds, bounds[1:], strict=False):
        part_loss, _ = _brute_force(model, ids[a : b + 1])
        total += part_loss * (b - a)
    assert res.tokens == 49 and res.loss == pytest.approx(total / 49, rel=1e-6)


def test_perplexity_overflow_returns_inf_instead_of_raising() -> None:
    assert perplexity(1000.0) == math.inf
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_spec_example_from_the_issue_validates() -> None:
    JobSpec.model_validate({"dataset": {"builtin": "python-docs"}})
