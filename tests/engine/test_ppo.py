"""PPO fine-tuning (worker.engine.ppo): exactness, the closed-form KL-regularised optimum, a
keyword reward on a tinyshakespeare language model, and exact resume after a cancel.

The closed-form tests start from an exactly uniform language model: a char LM over 27
symbols ("a"-"z" and space; the tokenizer adds ``<unk>``, which is never sampled and is masked
in every distribution) whose decoder weights and bias are zero, so every next-token
distribution of the reference is exactly 1/27 whatever the LSTM's state, as the formula
assumes. (A model trained on independent uniform characters is only approximately uniform.)
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from core.contract import CorpusTexts, TrainingError
from core.corpora import find_corpus
from core.ppo import PPOStepMetrics
from core.spec import JobSpec, PPOSpec
from tests.engine.conftest import RecordingHooks, strip_timing
from worker.engine.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from worker.engine.classifier import LSTMClassifier, save_classifier_checkpoint
from worker.engine.generate import generate, start_ids
from worker.engine.model import LSTMLanguageModel
from worker.engine.ppo import (
    PromptSampler,
    build_prompts,
    gae,
    kl_update,
    load_policy,
    response_forward,
    sample_responses,
    train_ppo,
)
from worker.engine.rewards import build_reward
from worker.engine.tokenizers import CharTokenizer
from worker.engine.trainer import train

log = logging.getLogger(__name__)  # the measured numbers (pytest -o log_cli=true shows them)

ALPHABET = list("abcdefghijklmnopqrstuvwxyz ")  # V = 27
NO_CHECKPOINTS = {"checkpoint_interval": None, "checkpoint_every_s": None}


class PPOHooks(RecordingHooks):
    """RecordingHooks that also keeps the per-minibatch statistics and the samples."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__(None if stop_after is None
                         else (lambda rows: len(rows) >= stop_after))
        self.minibatches: list[dict[str, Any]] = []
        self.samples: list[tuple[int, list[dict[str, Any]]]] = []

    def on_minibatch(self, stats: dict[str, Any]) -> None:
        self.minibatches.append(stats)

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.samples.append((step, samples))

    @property
    def ppo_rows(self) -> list[PPOStepMetrics]:
        return [r for r in self.rows if isinstance(r, PPOStepMetrics)]


def lm_checkpoint(*, uniform: bool, num_layers: int = 1, seed: int = 0) -> bytes:
    """A char LM over ALPHABET (embed 8, hidden 16) as checkpoint bytes; ``uniform``: decoder
    weights and bias zero (every next-token distribution exactly uniform)."""
    tok = CharTokenizer(ALPHABET)
    torch.manual_seed(seed)
    model = LSTMLanguageModel(tok.vocab_size, 8, 16, num_layers)
    if uniform:
        with torch.no_grad():
            model.decoder.weight.zero_()
            model.decoder.bias.zero_()
    spec = JobSpec.model_validate({"dataset": {"builtin": "python-docs"}})
    return save_checkpoint("best", spec, model, tok, {"step": 0})


def ppo_spec(ppo: dict[str, Any], training: dict[str, Any] | None = None,
             **top: Any) -> JobSpec:
    return JobSpec.model_validate({
        "task": "ppo", "init_from": {"job_id": "lm"},
        "ppo": {"reward": {"kind": "char_fraction", "target": "e"}, **ppo},
        "training": {"max_steps": 3, "eval_interval": 1000, "log_interval": 1,
                     "num_threads": 1, "device": "cpu", **NO_CHECKPOINTS,
                     **(training or {})},
        **top,
    })


def run(spec: JobSpec, init: bytes, prompts: PromptSampler | None = None,
        hooks: PPOHooks | None = None, resume_from: bytes | None = None,
        text: str | None = None) -> PPOHooks:
    assert spec.ppo is not None
    hooks = hooks or PPOHooks()
    policy = load_policy(init)
    reward = build_reward(spec.ppo.reward, policy.tokenizer)
    sampler = prompts or build_prompts(spec.ppo.prompts, policy.tokenizer, text)
    train_ppo(spec, policy, reward, sampler, hooks, resume_from=resume_from)
    return hooks


def tensors(data: bytes, prefixes: Sequence[str] = ("model.", "value_head.")
            ) -> dict[str, torch.Tensor]:
    return {k: v for k, v in st_load(data).items() if k.startswith(tuple(prefixes))}


# -- exactness --------------------------------------------------------------------------------

VARIED_PROMPTS = ["to be or not", "a", "the cat sat on the mat", "zz"]


def test_lr_zero_ratio_one_clip_zero_and_nothing_moves() -> None:
    init = lm_checkpoint(uniform=False, num_layers=2)
    tok = load_checkpoint(init).tokenizer
    spec = ppo_spec({"lr": 0.0, "rollout_batch_size": 16, "num_minibatches": 4,
                     "ppo_epochs": 3, "response_length": 8, "temperature": 0.7},
                    {"max_steps": 2})
    hooks = run(spec, init, PromptSampler([tok.encode(p) for p in VARIED_PROMPTS]))
    assert len(hooks.minibatches) == 2 * 3 * 4
    for mb in hooks.minibatches:
        assert mb["clip_fraction"] == 0.0
        # Later epochs group the rows into other minibatches: the float32 forward may round
        # differently by one unit in the last place (2.4e-7), never more.
        assert abs(mb["ratio_min"] - 1.0) <= 1e-6 and abs(mb["ratio_max"] - 1.0) <= 1e-6, mb
        if mb["epoch"] == 0:
            assert mb["ratio_min"] == mb["ratio_max"] == 1.0, mb
    last = hooks.last("last").data
    before = {f"model.{k}": v for k, v in load_checkpoint(init).model_state.items()}
    after = tensors(last)
    assert set(after) == set(before) | {"value_head.weight", "value_head.bias"}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not after["value_head.weight"].any() and not after["value_head.bias"].any()
    for row in hooks.ppo_rows:
        assert row.clip_fraction == 0.0 and row.lr == 0.0


def test_first_minibatch_of_first_epoch_has_ratio_exactly_one_at_any_lr() -> None:
    init = lm_checkpoint(uniform=False, num_layers=2)
    tok = load_checkpoint(init).tokenizer
    spec = ppo_spec({"lr": 0.05, "rollout_batch_size": 16, "num_minibatches": 4,
                     "ppo_epochs": 2, "response_length": 8, "temperature": 0.7,
                     "kl_coef": 0.1}, {"max_steps": 3})
    hooks = run(spec, init, PromptSampler([tok.encode(p) for p in VARIED_PROMPTS]))
    firsts = [mb for mb in hooks.minibatches if mb["epoch"] == 0 and mb["minibatch"] == 0]
    assert len(firsts) == 3
    for mb in firsts:
        assert mb["ratio_min"] == mb["ratio_max"] == 1.0, mb
    # The updates are real: every later minibatch sees a moved policy.
    others = [mb for mb in hooks.minibatches if (mb["epoch"], mb["minibatch"]) != (0, 0)]
    assert all(mb["ratio_min"] < 1.0 < mb["ratio_max"] for mb in others)


def test_policy_starts_as_the_reference() -> None:
    """Zero KL (both estimators) on the first rollouts: the value head starts at zero and the
    policy is the init checkpoint's LM, sampled and scored with dropout off."""
    hooks = run(ppo_spec({"rollout_batch_size": 8, "response_length": 6, "lr": 0.01},
                         {"max_steps": 1}), lm_checkpoint(uniform=False))
    row = hooks.ppo_rows[0]
    assert row.kl == 0.0 and row.kl_exact == 0.0


def test_gae_and_kl_controller_match_their_formulas() -> None:
    r = torch.tensor([[0.5, -1.0, 2.0]])
    v = torch.tensor([[0.1, 0.2, 0.3]])
    adv, ret = gae(r, v, gamma=0.9, lam=0.8)
    d2 = 2.0 - 0.3
    d1 = -1.0 + 0.9 * 0.3 - 0.2
    d0 = 0.5 + 0.9 * 0.2 - 0.1
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + v)
    assert kl_update(0.2, 12.0, 6.0, 64, 10_000) == pytest.approx(0.2 * (1 + 0.2 * 64 / 1e4))
    assert kl_update(0.2, 5.7, 6.0, 64, 10_000) == pytest.approx(
        0.2 * (1 + (5.7 / 6 - 1) * 64 / 1e4))
    assert kl_update(0.2, 99.0, None, 64, 10_000) == 0.2


# -- the closed-form optimum ------------------------------------------------------------------

V, T = 27, 16


def optimum(beta: float) -> tuple[float, float]:
    """The KL-regularised optimum of the char_fraction reward against a uniform reference
    over V tokens with responses of T tokens: ``p* = e^(1/(T beta)) / (e^(1/(T beta)) + V -
    1)`` at every position, expected reward p*, KL per response ``T (p* ln(V p*) + (1 - p*)
    ln(V (1 - p*) / (V - 1)))`` nats."""
    e = math.exp(1.0 / (T * beta))
    p = e / (e + V - 1)
    return p, T * (p * math.log(V * p) + (1 - p) * math.log(V * (1 - p) / (V - 1)))


def test_the_formula_gives_the_issues_numbers() -> None:
    for beta, reward, kl in ((0.05, 0.118, 0.96), (0.02, 0.467, 13.9)):
        p, k = optimum(beta)
        assert round(p, 3) == reward and round(k, 2 if kl < 1 else 1) == kl


def measure(init: bytes, last: bytes, n: int = 2048, seed: int = 123) -> tuple[float, float]:
    """The final policy's expected char_fraction reward (mean over positions of pi("e" | s),
    from its full distributions along n sampled responses) and its exact KL to the reference
    per response (nats), on empty prompts."""
    ref_ckpt, pol_ckpt = load_checkpoint(init), load_checkpoint(last)
    ref, pol = build_model_from_checkpoint(ref_ckpt), build_model_from_checkpoint(pol_ckpt)
    tok = ref_ckpt.tokenizer
    prompts = [start_ids(tok, "")] * n  # what empty prompts are (build_prompts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        resp = sample_responses(pol.eval(), prompts, T, 1.0, tok.unk_id, gen,
                                torch.device("cpu"))
        lp, _ = response_forward(pol, None, prompts, resp, 1.0, tok.unk_id)
        lq, _ = response_forward(ref.eval(), None, prompts, resp, 1.0, tok.unk_id)
    p = lp.exp()
    target = tok.encode("e")[0]
    reward = float(p[:, :, target].mean())
    kl = float(torch.where(p > 0, p * (lp - lq), 0.0).sum(dim=(1, 2)).mean())
    return reward, kl


def closed_form_spec(beta: float, steps: int, lr: float = 0.03, batch: int = 64,
                     algorithm: str = "ppo", min_lr: float = 0.1) -> JobSpec:
    # lam = 1: Monte-Carlo advantages, unbiased whatever the value head has learned. With
    # the default lam = 0.95 the value head must count the targets already written (the
    # score comes at the last token) and the fixed point came out biased low here (reward
    # 0.09 and KL 0.4 at beta = 0.05 after 150 iterations; docs/ppo.md).
    return ppo_spec({"kl_coef": beta, "lr": lr, "lam": 1.0, "response_length": T,
                     "rollout_batch_size": batch, "algorithm": algorithm},
                    {"max_steps": steps, "eval_interval": steps, "log_interval": 50},
                    schedule={"kind": "cosine", "min_lr": lr * min_lr})


@pytest.mark.parametrize("beta", [0.05, 0.02])
def test_reaches_the_closed_form_optimum(beta: float) -> None:
    init = lm_checkpoint(uniform=True)
    # The policy ends where its last noisy updates left it: a cosine decay to 3% of lr and
    # 128 responses per batch keep that within a few per cent of the optimum (measured over
    # seeds 0-2: reward within 0.009, KL within 2.6%).
    hooks = run(closed_form_spec(beta, 200, lr=0.05, batch=128, min_lr=0.03), init)
    reward, kl = measure(init, hooks.last("last").data)
    p_star, kl_star = optimum(beta)
    log.warning(f"beta={beta}: reward {reward:.4f} (optimum {p_star:.4f}), "
          f"KL {kl:.3f} nats (optimum {kl_star:.3f})")
    assert abs(reward - p_star) <= 0.02
    assert abs(kl - kl_star) <= 0.10 * kl_star


def test_a_very_large_kl_coefficient_keeps_the_reward_at_one_over_v() -> None:
    init = lm_checkpoint(uniform=True)
    hooks = run(closed_form_spec(100.0, 60), init)
    reward, kl = measure(init, hooks.last("last").data)
    log.warning(f"beta=100: reward {reward:.4f} (1/V = {1 / V:.4f}), KL {kl:.4f} nats")
    assert abs(reward - 1 / V) <= 0.005
    # Not ~0 (the optimum's 1e-7 nats): the advantages are whitened, so each update moves the
    # policy by an lr-sized step whatever beta is, and the penalty pulls it back. Still far
    # from any reward-seeking policy (beta = 0.05's optimum: 0.96 nats).
    assert kl < 0.2


def test_no_kl_penalty_drives_the_reward_towards_one() -> None:
    init = lm_checkpoint(uniform=True)
    hooks = run(closed_form_spec(0.0, 60), init)
    reward, _ = measure(init, hooks.last("last").data)
    rows = hooks.ppo_rows
    log.warning(f"beta=0: reward {rows[0].reward_mean:.3f} -> {reward:.4f}")
    assert rows[0].reward_mean < 0.1
    assert reward > 0.95


def test_reinforce_with_a_baseline_reaches_the_same_optimum() -> None:
    init = lm_checkpoint(uniform=True)
    hooks = run(closed_form_spec(0.05, 200, lr=0.03, algorithm="reinforce"), init)
    assert len(hooks.minibatches) == 200  # one gradient step per rollout batch
    reward, kl = measure(init, hooks.last("last").data)
    p_star, kl_star = optimum(0.05)
    log.warning(f"reinforce beta=0.05: reward {reward:.4f} ({p_star:.4f}), "
                f"KL {kl:.3f} ({kl_star:.3f})")
    assert abs(reward - p_star) <= 0.02
    assert abs(kl - kl_star) <= 0.10 * kl_star


# -- keywords on tinyshakespeare ---------------------------------------------------------------

KEYWORDS = ["the", "and", "my", "you", "love"]


@pytest.mark.slow
def test_keyword_reward_rises_with_the_kl_held_near_its_target() -> None:
    """About 80 s on 2 cores. Smaller runs (a 64-wide LM, 80 iterations: 38 s) raise the
    reward too, but end before the KL reaches the controller's target, so they cannot show
    the controller holding it."""
    path = find_corpus("tinyshakespeare/input.txt")
    if path is None:
        pytest.skip("data/tinyshakespeare is not here")
    text = path.read_text(encoding="utf-8")[:200_000]
    lm_spec = JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"},
        "model": {"embed_dim": 32, "hidden_dim": 128, "num_layers": 1},
        "optimizer": {"lr": 0.005},
        "training": {"batch_size": 32, "seq_len": 64, "max_steps": 500, "eval_interval": 250,
                     "eval_tokens": 20_000, "log_interval": 50, "num_threads": 1,
                     "device": "cpu", **NO_CHECKPOINTS}})
    lm_hooks = RecordingHooks()
    lm_result = train(lm_spec, CorpusTexts(train=text), lm_hooks)
    init = lm_hooks.last("best").data
    target = 6.0
    spec = ppo_spec({"reward": {"kind": "keywords", "words": KEYWORDS},
                     "prompts": {"from_corpus": {"prompt_tokens": 16}},
                     "response_length": 32, "rollout_batch_size": 32, "num_minibatches": 2,
                     "kl_coef": 0.1, "target_kl": target, "kl_horizon": 320, "lr": 1e-3},
                    {"max_steps": 100, "eval_interval": 10, "log_interval": 10})
    hooks = run(spec, init, text=text)
    rows = hooks.ppo_rows
    evals = [r for r in rows if r.val_reward_mean is not None]

    # The reference's perplexity on its own samples, to compare the final samples' with.
    ckpt = load_checkpoint(init)
    ref = build_model_from_checkpoint(ckpt).eval()
    sampler = build_prompts(spec.ppo.prompts, ckpt.tokenizer, text)  # type: ignore[union-attr]
    prompts = sampler.sample(256, random.Random(7))
    with torch.no_grad():
        resp = sample_responses(ref, prompts, 32, 1.0, ckpt.tokenizer.unk_id,
                                torch.Generator().manual_seed(7), torch.device("cpu"))
        lq, _ = response_forward(ref, None, prompts, resp, 1.0, None)
    ref_own_ppl = math.exp(float(-lq.gather(2, resp[:, :, None]).mean()))

    start = rows[0].reward_mean
    end = sum(r.val_reward_mean or 0.0 for r in evals[-3:]) / 3
    late_kl = [r.kl_exact for r in rows[-30:]]
    log.warning(f"LM val loss {lm_result.final_val_loss:.3f} nats; keyword reward {start:.3f} -> "
          f"{end:.3f}; kl_exact last 30 mean {sum(late_kl) / 30:.2f} max {max(late_kl):.2f} "
          f"(target {target}); kl_coef {rows[-1].kl_coef:.4f}; samples' perplexity under the "
          f"reference {evals[-1].val_ref_ppl:.2f} (its own samples {ref_own_ppl:.2f})")
    for s in hooks.samples[-1][1][:4]:
        log.warning("%r -> %r reward %.3f", s["prompt"], s["response"], s["reward"])
    assert end >= 1.8 * start
    # The controller holds the KL in its band: it got there, and stays.
    assert 0.7 * target <= sum(late_kl) / len(late_kl) <= 1.2 * target
    assert max(r.kl_exact for r in rows) <= 1.5 * target
    assert evals[-1].val_ref_ppl is not None and evals[-1].val_ref_ppl <= 1.2 * ref_own_ppl


# -- resume -----------------------------------------------------------------------------------


PPO_TIMING = ("rollout_tokens_per_s", "elapsed_s")


def test_resume_after_a_cancel_repeats_the_uninterrupted_run() -> None:
    init = lm_checkpoint(uniform=False, num_layers=2)
    tok = load_checkpoint(init).tokenizer
    spec = ppo_spec({"lr": 0.01, "rollout_batch_size": 8, "num_minibatches": 2,
                     "ppo_epochs": 2, "response_length": 6, "temperature": 0.8,
                     "kl_coef": 0.2, "target_kl": 0.5, "kl_horizon": 16,
                     "whiten_rewards": True},
                    {"max_steps": 8, "eval_interval": 3})
    prompts = PromptSampler([tok.encode(p) for p in VARIED_PROMPTS])
    full = run(spec, init, prompts)
    first = run(spec, init, prompts, PPOHooks(stop_after=4))
    cancelled = first.last("last")
    assert cancelled.step == 4
    resumed = run(spec, init, prompts, resume_from=cancelled.data)
    assert (strip_timing(first.rows + resumed.rows, PPO_TIMING)
            == strip_timing(full.rows, PPO_TIMING))
    assert first.samples + resumed.samples == full.samples
    a = tensors(full.last("last").data, ("model.", "value_head.", "optim."))
    b = tensors(resumed.last("last").data, ("model.", "value_head.", "optim."))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len({r.kl_coef for r in full.ppo_rows}) > 1  # the controller's state was restored


# -- prompts and checkpoints ------------------------------------------------------------------


def test_build_prompts_from_lines_a_corpus_or_nothing() -> None:
    tok = CharTokenizer(ALPHABET + ["\n"])
    spec = PPOSpec.model_validate({"reward": {"kind": "length", "target": 3},
                                   "prompts": {"dataset_id": "d"}})
    lines = build_prompts(spec.prompts, tok, "ab\n\n  \ncde\n")
    assert lines.prompts == [tok.encode("ab"), tok.encode("cde")]  # blank lines dropped
    rng = random.Random(0)
    assert {tuple(p) for p in lines.sample(50, rng)} == {tuple(p) for p in lines.prompts}
    corpus = build_prompts(PPOSpec.model_validate({
        "reward": {"kind": "length", "target": 3},
        "prompts": {"from_corpus": {"prompt_tokens": 4}}}).prompts, tok, "abcdefgh")
    windows = corpus.sample(200, rng)
    assert all(len(w) == 4 and tok.decode(w) in "abcdefgh" for w in windows)
    assert len({tuple(w) for w in windows}) == 5  # every start position is drawn
    empty = build_prompts(PPOSpec.model_validate({
        "reward": {"kind": "length", "target": 3}}).prompts, tok, None)
    assert empty.sample(3, rng) == [tok.encode("\n")] * 3 and empty.empty
    for prompts, text in (({"dataset_id": "d"}, " \n\n"),
                          ({"from_corpus": {"prompt_tokens": 8}}, "abcdefgh")):
        with pytest.raises(TrainingError) as err:
            build_prompts(PPOSpec.model_validate({"reward": {"kind": "length", "target": 3},
                                                  "prompts": prompts}).prompts, tok, text)
        assert err.value.code == "dataset_error"


def test_checkpoints_are_language_model_checkpoints() -> None:
    """generate() reads a PPO job's checkpoints as any LM's; best and last hold the value
    head; a classifier's checkpoint is refused as init_from."""
    init = lm_checkpoint(uniform=False)
    hooks = run(ppo_spec({"rollout_batch_size": 8, "response_length": 6, "lr": 0.01},
                         {"max_steps": 2, "eval_interval": 1}), init)
    assert {c.kind for c in hooks.checkpoints} == {"best", "last"}
    for c in hooks.checkpoints:
        ckpt = load_checkpoint(c.data)
        assert ckpt.spec.task == "ppo"
        model = build_model_from_checkpoint(ckpt)
        text = generate(model, ckpt.tokenizer, "the ", max_new_tokens=5).samples[0].text
        assert len(text) == 5
        assert "value_head.weight" in tensors(c.data)
    assert hooks.samples and all(len(s) == 8 for _, s in hooks.samples)
    assert set(hooks.samples[0][1][0]) == {"prompt", "response", "reward", "kl"}
    spec = JobSpec.model_validate({"task": "classify", "dataset_id": "d"})
    clf = LSTMClassifier(load_checkpoint(init).model_config, 2, "mean")
    data = save_classifier_checkpoint("best", spec, clf, load_checkpoint(init).tokenizer,
                                      ["a", "b"], {"step": 0})
    with pytest.raises(TrainingError) as err:
        load_policy(data)
    assert err.value.code == "invalid_spec"
