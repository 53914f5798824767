"""The PPO task rewards (worker.engine.rewards) against their definitions in core/spec.py."""

from __future__ import annotations

import pytest
import torch

from core.contract import TrainingError
from core.spec import JobSpec, PPOSpec
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from worker.engine.classifier import LSTMClassifier, load_classifier, save_classifier_checkpoint
from worker.engine.generate import score
from worker.engine.model import LSTMLanguageModel, ModelConfig
from worker.engine.rewards import RewardBatch, build_reward
from worker.engine.tokenizers import CharTokenizer, WordTokenizer

TOK = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz \n"))


def reward_spec(**reward: object) -> object:
    return PPOSpec.model_validate({"reward": reward, "response_length": 24}).reward


def batch(responses: list[str], prompts: list[str] | None = None) -> RewardBatch:
    prompts = prompts or ["\n"] * len(responses)
    return RewardBatch([TOK.encode(p) for p in prompts], [TOK.encode(r) for r in responses], TOK)


def test_char_fraction_is_the_share_of_target_tokens() -> None:
    r = build_reward(reward_spec(kind="char_fraction", target="e"), TOK)
    got = r(batch(["eeee", "abce", "abcd"]))
    assert got.tolist() == [1.0, 0.25, 0.0]


def test_char_fraction_target_must_be_one_token() -> None:
    for target in ("ee", "Q"):
        with pytest.raises(TrainingError) as err:
            build_reward(reward_spec(kind="char_fraction", target=target), TOK)
        assert err.value.code == "invalid_spec"


def test_char_fraction_with_a_word_tokenizer_counts_words() -> None:
    tok = WordTokenizer.train("the cat sat\nthe dog\n", None, 1)
    r = build_reward(reward_spec(kind="char_fraction", target="the"), tok)
    b = RewardBatch([[1]], [tok.encode("the cat the dog")[:4]], tok)
    assert r(b).tolist() == [0.5]


def test_keywords_cover_the_matched_characters() -> None:
    whole = build_reward(reward_spec(kind="keywords", words=["the", "And"]), TOK)
    text = "the cat and there"  # 17 characters; "there" is not the whole word "the"
    assert whole(batch([text])).tolist() == pytest.approx([6 / 17])
    part = build_reward(reward_spec(kind="keywords", words=["the", "and"], whole_words=False),
                        TOK)
    assert part(batch([text])).tolist() == pytest.approx([9 / 17])
    assert part(batch(["xyz"])).tolist() == [0.0]


def test_length_rewards_the_first_line_length() -> None:
    r = build_reward(reward_spec(kind="length", target=4), TOK)
    # T = 10, scale max(4, 6) = 6; lengths 4, 0, 10 (no line end)
    got = r(batch(["abcd\nefghi", "\nabcdefghi", "abcdefghij"])).tolist()
    assert got == pytest.approx([1.0, 1 - 4 / 6, 0.0])


def _lm_bytes() -> bytes:
    torch.manual_seed(0)
    model = LSTMLanguageModel(TOK.vocab_size, 8, 16, 1)
    spec = JobSpec.model_validate({"dataset": {"builtin": "python-docs"}})
    return save_checkpoint("best", spec, model, TOK, {"step": 0})


def test_lm_loglik_is_the_mean_log_probability_of_the_response_after_its_prompt() -> None:
    data = _lm_bytes()
    loads: list[tuple[str, str]] = []

    def load(job_id: str, checkpoint: str) -> bytes:
        loads.append((job_id, checkpoint))
        return data

    r = build_reward(reward_spec(kind="lm_loglik", job_id="j1"), TOK, load)
    assert loads == [("j1", "best")]
    prompts, responses = ["to be", "\n"], ["or not to", "hello worl"]
    got = r(RewardBatch([TOK.encode(p) for p in prompts], [TOK.encode(x) for x in responses],
                        TOK)).tolist()
    model = build_model_from_checkpoint(load_checkpoint(data))
    # score() predicts every token after the first: with the prompt's tokens first, the
    # response's share of its summed loss is what the reward averages.
    for p, x, g in zip(prompts, responses, got, strict=True):
        whole = score(model, TOK, p + x)
        n_resp = len(TOK.encode(x))
        resp_losses = [t.loss for t in whole.per_token][-n_resp:]
        assert g == pytest.approx(-sum(resp_losses) / n_resp, abs=1e-5)


def test_lm_loglik_needs_a_loader() -> None:
    with pytest.raises(TrainingError) as err:
        build_reward(reward_spec(kind="lm_loglik", job_id="j1"), TOK)
    assert err.value.code == "invalid_spec"


def test_classifier_reward_is_the_labels_probability() -> None:
    torch.manual_seed(0)
    config = ModelConfig(TOK.vocab_size, 8, 16, 1, 0.0, False)
    model = LSTMClassifier(config, 2, "mean")
    spec = JobSpec.model_validate({"task": "classify", "dataset_id": "d"})
    data = save_classifier_checkpoint("best", spec, model, TOK, ["neg", "pos"], {"step": 0})
    r = build_reward(reward_spec(kind="classifier", job_id="c", label="pos"), TOK,
                     lambda job, ckpt: data)
    texts = ["good day", "bad day"]
    expected = load_classifier(data).probabilities(texts)[:, 1]
    assert torch.equal(r(batch(texts)), expected)
    with_prompt = build_reward(reward_spec(kind="classifier", job_id="c", label="pos",
                                           include_prompt=True), TOK, lambda job, ckpt: data)
    expected = load_classifier(data).probabilities(["a good day", "a bad day"])[:, 1]
    assert torch.equal(with_prompt(batch(texts, ["a ", "a "])), expected)
    with pytest.raises(TrainingError) as err:
        build_reward(reward_spec(kind="classifier", job_id="c", label="meh"), TOK,
                     lambda job, ckpt: data)
    assert err.value.code == "invalid_spec"
