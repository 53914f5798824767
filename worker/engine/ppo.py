"""Proximal policy optimisation of a trained language model (``task: "ppo"``; docs/ppo.md).

After Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (the
``openai/lm-human-preferences`` code, ``train_policy.py``) and Hugging Face TRL's PPO trainer;
PPO itself is Schulman et al. 2017, GAE Schulman et al. 2016.

Models. The policy is the ``init_from`` language model (Embedding -> LSTM -> Linear) plus a
value head, a ``Linear(hidden_dim, 1)`` on the LSTM's top-layer output at each position,
initialised to zero (so it starts predicting 0 and the policy starts exactly as the language
model). The reference is a frozen copy of the starting model, rebuilt from the ``init_from``
checkpoint on every run and resume. Dropout is never applied (both models always run in eval
mode), so a log-probability recomputed with the same weights is the one recorded.

One iteration (``training.max_steps`` counts them):

1. Rollouts: ``B = rollout_batch_size`` prompts (:class:`PromptSampler`) and, from each, a
   response of ``T = response_length`` tokens sampled in one batch from ``softmax(z / tau)``
   (``tau = temperature``; ``<unk>`` is never sampled: its logit is masked in every
   distribution, the policy's and the reference's).
2. Old log-probabilities ``log pi_old(x_t)`` and values ``V_t`` are recomputed by the same
   forward pass the optimisation uses, on the same minibatches as the first epoch's, with the
   same grad mode, so that the first minibatch's ratio is exactly 1; the reference's
   ``log ref(x_t)`` at the same temperature (Ziegler et al. and TRL v2 temper both).
3. Rewards (Ziegler et al.): ``r_t = -beta * (log pi_old(x_t) - log ref(x_t))`` at every
   position, plus the task score at ``t = T - 1``; optionally "whitened" as
   ``(r - mean) / std + mean`` over the batch (``whiten_rewards``, Ziegler et al.'s
   ``whiten(shift_mean=False)``).
4. GAE: ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V_T = 0``), ``A_t = delta_t + gamma lam
   A_{t+1}``, returns ``R_t = A_t + V_t``; advantages whitened over the batch (mean 0, std 1).
5. ``ppo_epochs`` passes over the batch in ``num_minibatches`` random minibatches: ratio
   ``rho = exp(log pi - log pi_old)``, policy loss ``mean(max(-A rho, -A clip(rho, 1 - eps,
   1 + eps)))``, value loss ``0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) -
   R)^2))``, loss ``= policy + vf_coef * value``; one optimizer step per minibatch with
   ``training.grad_clip``.
6. Adaptive KL (when ``target_kl`` is set; Ziegler et al.'s ``AdaptiveKLController``):
   ``beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * B / kl_horizon`` with ``kl`` this
   iteration's mean per-response KL estimate.

``algorithm: "reinforce"`` replaces 4-5 by REINFORCE with a baseline: Monte-Carlo returns
``G_t = sum_{k>=t} gamma^(k-t) r_k`` (same rewards and KL penalty), advantages ``G_t - V_t``
whitened, one gradient step per batch on ``-mean(A log pi) + vf_coef * 0.5 mean((V -
G)^2)``.

Randomness: every draw of iteration ``k`` (prompts, tokens, minibatch order, the evaluation's
prompts and tokens) comes from generators seeded by ``(training.seed, k, purpose)``, so an
iteration is a function of the weights it starts from: a resumed run repeats an
uninterrupted one exactly (on the CPU).

Checkpoints are ``lmforge.checkpoint.v1`` files whose ``model.*`` tensors are the policy's
language model, so generation, export, scoring and a further ``init_from`` read them as any
language model's; ``value_head.*``, the optimizer state, ``rng.cpu`` and a ``trainer_state``
with a ``ppo`` entry (the KL coefficient, counters, best so far) make ``last``/``periodic``
ones resumable.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch.nn.utils.rnn import pack_padded_sequence

from core.contract import CheckpointBlob, CheckpointKind, StopReason, TrainingError
from core.ppo import PPOResult, PPOStepMetrics
from core.spec import LM_CHECKPOINT_TASKS, JobSpec, PromptsSpec
from worker.engine.checkpoint import (
    LoadedCheckpoint,
    _cpu,
    _model_tensors,
    build_model_from_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    restore_rng,
)
from worker.engine.generate import start_ids
from worker.engine.loop import Clock, RunControl
from worker.engine.model import Hidden, LSTMLanguageModel
from worker.engine.rewards import Length, Reward, RewardBatch, line_end_ids
from worker.engine.schedule import LRSchedule
from worker.engine.tokenizers import Tokenizer
from worker.engine.trainer import failures_explained, make_optimizer, resolve_device

log = logging.getLogger(__name__)

#: Prompts longer than this keep their last MAX_PROMPT_TOKENS tokens.
MAX_PROMPT_TOKENS = 1024
#: Samples handed to ``hooks.on_samples`` per evaluation.
SAMPLES_PER_EVAL = 16

# Purposes of the per-iteration generators (see the module docstring).
_PROMPTS, _TOKENS, _ORDER, _EVAL_PROMPTS, _EVAL_TOKENS = range(5)


def _seed(seed: int, step: int, purpose: int, extra: int = 0) -> int:
    """A 63-bit seed for (seed, iteration, purpose, extra), all draws independent."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + purpose * 0x94D049BB133111EB
         + extra * 0x2545F4914F6CDD1D) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


# -- prompts ----------------------------------------------------------------------------------


class PromptSampler:
    """Draws a rollout batch's prompts (lists of token ids, each at least one token).

    Either a fixed list of prompts (drawn uniformly with replacement) or a token corpus
    (random windows of ``window`` tokens, uniform over start positions)."""

    def __init__(self, prompts: Sequence[Sequence[int]] | None = None,
                 corpus: Sequence[int] | None = None, window: int = 0,
                 empty: bool = False) -> None:
        if (prompts is None) == (corpus is None):
            raise ValueError("give prompts or a corpus")
        self.prompts = [list(p)[-MAX_PROMPT_TOKENS:] for p in prompts] if prompts else []
        self.corpus = list(corpus) if corpus is not None else []
        self.window = window
        self.empty = empty
        if prompts is not None and (not self.prompts or any(not p for p in self.prompts)):
            raise TrainingError("dataset_error", "no prompts: every prompt needs at least "
                                "one token", phase="prepare")
        if corpus is not None and (window < 1 or len(self.corpus) <= window):
            raise TrainingError("dataset_error", f"the corpus has {len(self.corpus)} tokens, "
                                f"too few for prompts of {window} tokens", phase="prepare")

    def __len__(self) -> int:
        return len(self.prompts) if self.prompts else len(self.corpus) - self.window + 1

    def sample(self, n: int, rng: random.Random) -> list[list[int]]:
        if self.prompts:
            if len(self.prompts) == 1:
                return [self.prompts[0]] * n
            return [self.prompts[rng.randrange(len(self.prompts))] for _ in range(n)]
        starts = [rng.randrange(len(self.corpus) - self.window + 1) for _ in range(n)]
        return [self.corpus[s: s + self.window] for s in starts]


def build_prompts(spec: PromptsSpec, tokenizer: Tokenizer, text: str | None) -> PromptSampler:
    """The prompt sampler ``ppo.prompts`` describes. ``text``: the prompts dataset's text
    (``dataset_id``: one prompt per non-empty line), the ``init_from`` job's training text
    (``from_corpus``), ignored for ``empty``. Raises ``TrainingError("dataset_error")`` when
    no prompt can be drawn."""
    if spec.empty:
        return PromptSampler(prompts=[start_ids(tokenizer, "")], empty=True)
    if text is None:
        raise TrainingError("dataset_error", "the prompts' text is missing", phase="prepare")
    if spec.from_corpus is not None:
        return PromptSampler(corpus=tokenizer.encode(text),
                             window=spec.from_corpus.prompt_tokens)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TrainingError("dataset_error", "the prompts dataset has no non-empty line",
                            phase="prepare")
    return PromptSampler(prompts=[start_ids(tokenizer, line) for line in lines])


# -- the policy -------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The language model ``lm`` and a value head on its LSTM's top-layer output. Always in
    eval mode (no dropout)."""

    def __init__(self, lm: LSTMLanguageModel) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.eval()

    def train(self, mode: bool = True) -> PolicyWithValue:
        return super().train(False)  # dropout stays off: log-probs are recomputed exactly

    def num_params(self) -> int:
        return self.lm.num_params() + sum(p.numel() for p in self.value_head.parameters())


def _prompt_state(lm: LSTMLanguageModel, prompts: Sequence[Sequence[int]],
                  device: torch.device) -> tuple[torch.Tensor, Hidden]:
    """Read the prompts: the top-layer output after each prompt's last token (b, hidden_dim)
    and the LSTM state ((num_layers, b, hidden_dim) twice). Prompts of different lengths are
    packed, so padding is never read."""
    lengths = [len(p) for p in prompts]
    n = max(lengths)
    ids = torch.zeros((len(prompts), n), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    emb = lm.encoder(ids.to(device))
    if min(lengths) == n:
        out, hidden = lm.lstm(emb)
        return out[:, -1], hidden
    packed = pack_padded_sequence(emb, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    _, hidden = lm.lstm(packed)
    return hidden[0][-1], hidden


def _masked(logits: torch.Tensor, temperature: float, unk: int | None) -> torch.Tensor:
    z = logits.float() / temperature
    if unk is not None and z.shape[-1] > 1:
        z = z.clone()
        z[..., unk] = -math.inf
    return z


def response_forward(lm: LSTMLanguageModel, value_head: nn.Linear | None,
                     prompts: Sequence[Sequence[int]], responses: torch.Tensor,
                     temperature: float, unk: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of every next token at each response position, (b, T, vocab) float32
    (``log_softmax(z / temperature)`` with ``<unk>`` masked), and the values (b, T) when
    ``value_head`` is given. ``responses``: (b, T) int64 on the model's device."""
    device = responses.device
    last, hidden = _prompt_state(lm, prompts, device)
    states = last.unsqueeze(1)  # (b, 1, H)
    if responses.shape[1] > 1:
        out, _ = lm.lstm(lm.encoder(responses[:, :-1]), hidden)  # (b, T - 1, H)
        states = torch.cat([states, out], dim=1)  # (b, T, H)
    logp = F.log_softmax(_masked(lm.decoder(states), temperature, unk), dim=-1)
    values = None if value_head is None else value_head(states).squeeze(-1).float()
    return logp, values


@torch.no_grad()
def sample_responses(lm: LSTMLanguageModel, prompts: Sequence[Sequence[int]], length: int,
                     temperature: float, unk: int | None, gen: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """(b, length) int64 token ids sampled one position at a time from ``softmax(z / tau)``
    (``<unk>`` masked) with ``torch.multinomial`` on ``gen``."""
    last, hidden = _prompt_state(lm, prompts, device)
    out = torch.empty((len(prompts), length), dtype=torch.long, device=device)
    logits = lm.decoder(last)  # (b, vocab)
    for t in range(length):
        probs = torch.softmax(_masked(logits, temperature, unk), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out[:, t] = nxt
        if t + 1 < length:
            o, hidden = lm.lstm(lm.encoder(nxt.unsqueeze(1)), hidden)
            logits = lm.decoder(o[:, -1])
    return out


def whiten(x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over all elements; ``shift_mean=False`` adds the mean
    back (Ziegler et al.'s ``utils.whiten``, TRL's ``masked_whiten``)."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), as Ziegler et al.'s
    ``PPOTrainer.loss``: rewards, values (b, T) -> advantages, returns (b, T), with
    ``V_T = 0`` (the response ends the episode)."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{k >= t} gamma^(k - t) r_k`` for rewards (b, T) -> (b, T)."""
    out = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        acc = rewards[:, t] + gamma * acc
        out[:, t] = acc
    return out


def kl_update(kl_coef: float, kl: float, target: float | None, n: int, horizon: int) -> float:
    """Ziegler et al.'s ``AdaptiveKLController.update``: ``beta * (1 + clip(kl / target - 1,
    -0.2, 0.2) * n / horizon)``; ``beta`` unchanged without a target."""
    if target is None:
        return kl_coef
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + err * n / horizon)


# -- checkpoints ------------------------------------------------------------------------------


def save_ppo_checkpoint(kind: str, spec: JobSpec, policy: PolicyWithValue, tokenizer: Tokenizer,
                        trainer_state: dict[str, Any],
                        optimizer: torch.optim.Optimizer | None = None) -> bytes:
    """A PPO checkpoint as safetensors bytes (the module docstring gives the layout); weights
    only (policy and value head) when ``optimizer`` is None (``best``)."""
    tensors = _model_tensors(policy.lm)
    tensors.update({f"value_head.{k}": _cpu(v) for k, v in policy.value_head.state_dict().items()})
    return encode_checkpoint(kind, spec, policy.lm.config.as_dict(), tokenizer, tensors,
                             trainer_state, optimizer, task="ppo")


def load_policy(data: bytes | LoadedCheckpoint) -> LoadedCheckpoint:
    """The ``init_from`` checkpoint (bytes or loaded) as a policy's start: a language-model
    (or PPO) job's. Raises ``TrainingError("invalid_checkpoint")`` for an unreadable file,
    ``TrainingError("invalid_spec")`` for another task's checkpoint."""
    ckpt = load_checkpoint(data) if isinstance(data, bytes | bytearray) else data
    if ckpt.spec.task not in LM_CHECKPOINT_TASKS:
        raise TrainingError("invalid_spec", f"init_from names a {ckpt.spec.task!r} job; a PPO "
                            "policy starts from a language model's checkpoint")
    return ckpt


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    kl_coef: float = 0.0
    rollouts_seen: int = 0
    runtime_before: float = 0.0
    initial_reward_mean: float | None = None
    best_step: int | None = None
    best_objective: float | None = None
    best_reward_mean: float | None = None
    best_kl: float | None = None
    final_val: dict[str, float] | None = None

    def to_json(self, runtime_s: float) -> dict[str, Any]:
        return {"step": self.step, "kl_coef": self.kl_coef, "rollouts_seen": self.rollouts_seen,
                "runtime_s": runtime_s, "initial_reward_mean": self.initial_reward_mean,
                "best_step": self.best_step, "best_objective": self.best_objective,
                "best_reward_mean": self.best_reward_mean, "best_kl": self.best_kl,
                "final_val": self.final_val}

    def load(self, ts: dict[str, Any]) -> None:
        self.step, self.kl_coef = int(ts["step"]), float(ts["kl_coef"])
        self.rollouts_seen, self.runtime_before = int(ts["rollouts_seen"]), float(ts["runtime_s"])
        self.initial_reward_mean = ts["initial_reward_mean"]
        self.best_step, self.best_objective = ts["best_step"], ts["best_objective"]
        self.best_reward_mean, self.best_kl = ts["best_reward_mean"], ts["best_kl"]
        self.final_val = ts["final_val"]


@dataclass
class Rollout:
    """One rollout batch with everything the optimisation needs ((B, T) tensors)."""

    prompts: list[list[int]]
    responses: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    ref_logp: torch.Tensor
    scores: torch.Tensor  # (B,) task reward
    kl: torch.Tensor  # (B,) sum_t log pi - log ref at the sampled tokens
    kl_exact: torch.Tensor  # (B,)
    entropy: torch.Tensor  # (B,)
    minibatches: list[torch.Tensor]  # the first epoch's row indices


class _Run(RunControl):
    step_name = "iteration"  # in messages: one PPO iteration is a training.max_steps step

    def __init__(self, spec: JobSpec, init: LoadedCheckpoint, reward: Reward,
                 prompts: PromptSampler, hooks: Any, dev: torch.device,
                 resume: tuple[LoadedCheckpoint, dict[str, torch.Tensor]] | None) -> None:
        assert spec.ppo is not None
        self.spec, self.p, self.reward, self.sampler = spec, spec.ppo, reward, prompts
        self.hooks, self.dev, self.tok = hooks, dev, init.tokenizer
        self.unk = self.tok.unk_id if self.tok.vocab_size > 1 else None
        self.reference = build_model_from_checkpoint(init, dev).eval()
        for q in self.reference.parameters():
            q.requires_grad_(False)
        lm = build_model_from_checkpoint(init, dev)
        self.policy = PolicyWithValue(lm).to(dev)
        self.params = list(self.policy.parameters())
        lr = self.p.lr if self.p.lr is not None else spec.optimizer.lr
        self.optimizer = make_optimizer(spec.optimizer.model_copy(update={"lr": lr}),
                                        self.params, dev)
        self.schedule = LRSchedule(spec.schedule, lr, spec.training.max_steps)
        self.state = _State(kl_coef=self.p.kl_coef)
        if resume is not None:
            self._restore(*resume)
        self.start_seen = self.state.rollouts_seen
        self.length_of = Length(0, line_end_ids(self.tok))
        self.clock = Clock()
        self.pending: list[PPOStepMetrics] = []
        self.window = (0.0, self.state.rollouts_seen)
        self.halt = None
        self.last_full_checkpoint = 0.0
        self.on_minibatch: Callable[[dict[str, Any]], None] | None = getattr(
            hooks, "on_minibatch", None)
        self.on_samples: Callable[[int, list[dict[str, Any]]], None] | None = getattr(
            hooks, "on_samples", None)

    def _restore(self, resume: LoadedCheckpoint, head: dict[str, torch.Tensor]) -> None:
        if resume.optimizer_state is None or "ppo" not in resume.trainer_state:
            raise TrainingError("invalid_checkpoint",
                                f"a {resume.kind!r} checkpoint of a {resume.spec.task!r} job "
                                "cannot resume a PPO run (resume from a PPO job's 'last' or "
                                "'periodic' checkpoint)")
        missing, unexpected = self.policy.lm.load_state_dict(
            {k: v.to(self.dev) for k, v in resume.model_state.items()}, strict=False)
        tied = {"decoder.weight"} if self.policy.lm.config.tie_weights else set()
        if set(missing) - tied or unexpected:
            raise TrainingError("invalid_checkpoint", "the checkpoint's weights do not fit the "
                                f"init_from model: missing {sorted(missing)}, unexpected "
                                f"{sorted(unexpected)}")
        self.policy.value_head.load_state_dict({k: v.to(self.dev) for k, v in head.items()})
        self.optimizer.load_state_dict(resume.optimizer_state)  # type: ignore[arg-type]
        ts = resume.trainer_state["ppo"]
        self.state.load(ts)
        self.schedule.load(ts["schedule"])
        restore_rng(resume.rng, self.dev)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> StopReason:
        stop = self._budget_stop(self.state.step) if self.state.step > 0 else None
        while stop is None:
            step = self.state.step + 1
            with self.site("train", step):
                self._iteration(step)
            stop = self._after_step(step)
        self._checkpoint(CheckpointKind.LAST)
        if self.halt == "timeout":
            raise self.timeout_error()
        return stop

    def _budget_stop(self, step: int) -> StopReason | None:
        t = self.spec.training
        if step >= t.max_steps:
            return "max_steps"
        if (t.max_runtime_s is not None
                and self.runtime_s() >= t.max_runtime_s):
            return "max_runtime_s"
        return None

    def _after_step(self, step: int) -> StopReason | None:
        t = self.spec.training
        stop = self._budget_stop(step)
        if step % t.eval_interval == 0 or stop is not None:
            t0 = time.perf_counter()
            with self.site("evaluate", step):
                self._evaluate(step)
            self.clock.excluded += time.perf_counter() - t0
        if self.periodic_due(step, stop is not None):
            self._checkpoint(CheckpointKind.PERIODIC)
        if step % t.log_interval == 0 or stop is not None:
            self._flush()
        if stop is None and self.poll():
            stop = "cancelled"
        return stop

    # -- one iteration -------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollout:
        """Sample and score iteration ``step``'s rollout batch (no update)."""
        p, dev = self.p, self.dev
        B, T = p.rollout_batch_size, p.response_length
        prompts = self.sampler.sample(B, random.Random(_seed(self.spec.training.seed, step,
                                                             _PROMPTS)))
        gen = torch.Generator(device=dev).manual_seed(
            _seed(self.spec.training.seed, step, _TOKENS))
        responses = sample_responses(self.policy.lm, prompts, T, p.temperature, self.unk, gen,
                                     dev)
        order = self._order(step, 0)
        mbs = list(order.split(B // p.num_minibatches))
        old_logp = torch.empty((B, T), device=dev)
        old_values = torch.empty((B, T), device=dev)
        ref_logp = torch.empty((B, T), device=dev)
        kl_exact = torch.empty(B, device=dev)
        entropy = torch.empty(B, device=dev)
        for idx in mbs:
            # The same call, inputs and grad mode as the first epoch's optimisation step on
            # this minibatch: the ratio is exactly 1 there.
            logp_all, values = self._forward(prompts, responses, idx)
            assert values is not None
            logp_all, values = logp_all.detach(), values.detach()
            old_logp[idx] = logp_all.gather(2, responses[idx, :, None]).squeeze(2)
            old_values[idx] = values
            with torch.no_grad():
                ref_all, _ = response_forward(self.reference, None, [prompts[i] for i in
                                                                      idx.tolist()],
                                              responses[idx], p.temperature, self.unk)
                probs = logp_all.exp()
                kl_exact[idx] = _xlogy_sum(probs, logp_all - ref_all).sum(dim=1)
                entropy[idx] = -_xlogy_sum(probs, logp_all).sum(dim=1)
                ref_logp[idx] = ref_all.gather(2, responses[idx, :, None]).squeeze(2)
        batch = RewardBatch(prompts, responses.tolist(), self.tok,
                            empty_prompts=self.sampler.empty)
        scores = torch.as_tensor(self.reward(batch), dtype=torch.float32).to(dev)
        if scores.shape != (B,):
            raise TrainingError("internal", f"the reward returned shape {tuple(scores.shape)}, "
                                f"expected ({B},)")
        return Rollout(prompts, responses, old_logp, old_values, ref_logp, scores,
                       (old_logp - ref_logp).sum(dim=1), kl_exact, entropy, mbs)

    def _order(self, step: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.spec.training.seed, step, _ORDER, epoch))
        return torch.randperm(self.p.rollout_batch_size, generator=g).to(self.dev)

    def _forward(self, prompts: list[list[int]], responses: torch.Tensor, idx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            return response_forward(self.policy.lm, self.policy.value_head,
                                    [prompts[i] for i in idx.tolist()], responses[idx],
                                    self.p.temperature, self.unk)

    def _iteration(self, step: int) -> None:
        p, s = self.p, self.state
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ro = self.rollout(step)
        beta = s.kl_coef
        rewards = -beta * (ro.old_logp - ro.ref_logp)
        rewards[:, -1] += ro.scores
        if p.whiten_rewards:
            rewards = whiten(rewards, shift_mean=False)
        if p.algorithm == "ppo":
            adv, returns = gae(rewards, ro.old_values, p.gamma, p.lam)
        else:
            returns = discounted_returns(rewards, p.gamma)
            adv = returns - ro.old_values
        ev_den = float(returns.var(unbiased=False))
        explained = (None if ev_den == 0.0 else
                     1.0 - float((returns - ro.old_values).var(unbiased=False)) / ev_den)
        adv = whiten(adv)
        stats = self._optimise(step, ro, adv, returns)
        kl_mean = float(ro.kl.mean())
        reward_mean = float(ro.scores.mean())
        if s.initial_reward_mean is None:
            s.initial_reward_mean = reward_mean
        s.kl_coef = kl_update(beta, kl_mean, p.target_kl, p.rollout_batch_size, p.kl_horizon)
        s.step = step
        s.rollouts_seen += p.rollout_batch_size
        lengths = self.length_of.lengths(ro.responses.tolist())
        self.pending.append(PPOStepMetrics(
            step=step, reward_mean=reward_mean,
            reward_std=float(ro.scores.std(unbiased=False)), kl=kl_mean,
            kl_exact=float(ro.kl_exact.mean()), entropy=float(ro.entropy.mean()),
            response_length=sum(lengths) / len(lengths), kl_coef=beta,
            objective=reward_mean - beta * kl_mean, lr=lr, explained_variance=explained,
            rollouts_seen=s.rollouts_seen, rollout_tokens_per_s=0.0, elapsed_s=self.clock.elapsed(),
            **stats))

    def _optimise(self, step: int, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor
                  ) -> dict[str, float]:
        p, clip_grad = self.p, self.spec.training.grad_clip
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0,
                "grad_norm": 0.0}
        rmin, rmax, n = math.inf, -math.inf, 0
        epochs = p.ppo_epochs if p.algorithm == "ppo" else 1
        for epoch in range(epochs):
            if p.algorithm == "ppo":
                mbs = ro.minibatches if epoch == 0 else list(
                    self._order(step, epoch).split(p.rollout_batch_size // p.num_minibatches))
            else:
                mbs = [torch.cat(ro.minibatches)]
            for k, idx in enumerate(mbs):
                logp_all, vpred = self._forward(ro.prompts, ro.responses, idx)
                assert vpred is not None
                logp = logp_all.gather(2, ro.responses[idx, :, None]).squeeze(2)
                old, a, ret, v_old = ro.old_logp[idx], adv[idx], returns[idx], ro.old_values[idx]
                log_ratio = logp - old
                ratio = log_ratio.exp()
                if p.algorithm == "ppo":
                    pg1 = -a * ratio
                    pg2 = -a * ratio.clamp(1.0 - p.clip_range, 1.0 + p.clip_range)
                    pg_loss = torch.maximum(pg1, pg2).mean()
                    clipfrac = float((pg2 > pg1).float().mean())
                else:
                    pg_loss = -(a * logp).mean()
                    clipfrac = 0.0
                vf1 = (vpred - ret) ** 2
                if p.value_clip is not None and p.algorithm == "ppo":
                    vclipped = v_old + (vpred - v_old).clamp(-p.value_clip, p.value_clip)
                    vf_loss = 0.5 * torch.maximum(vf1, (vclipped - ret) ** 2).mean()
                else:
                    vf_loss = 0.5 * vf1.mean()
                loss = pg_loss + p.vf_coef * vf_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = [q for q in self.params if q.grad is not None]
                if clip_grad is not None:
                    norm = torch.nn.utils.clip_grad_norm_(grads, clip_grad)
                else:
                    norm = torch.nn.utils.get_total_norm([q.grad for q in grads
                                                          if q.grad is not None])
                loss_v, norm_v = float(loss.detach()), float(norm)
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    raise TrainingError(
                        "non_finite_loss",
                        f"the PPO loss ({loss_v}) or gradient norm ({norm_v}) is not finite at "
                        f"iteration {step}; the last periodic checkpoint was kept. Lower ppo.lr, "
                        f"set training.grad_clip, or check the reward.", step, phase="train")
                self.optimizer.step()
                r = ratio.detach()
                mb = {"policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()),
                      "clip_fraction": clipfrac,
                      "approx_kl": float(0.5 * (log_ratio.detach() ** 2).mean()),
                      "grad_norm": norm_v}
                for key, v in mb.items():
                    sums[key] += v
                lo, hi = float(r.min()), float(r.max())
                rmin, rmax, n = min(rmin, lo), max(rmax, hi), n + 1
                if self.on_minibatch is not None:
                    self.on_minibatch({"step": step, "epoch": epoch, "minibatch": k,
                                       "ratio_min": lo, "ratio_max": hi, **mb})
        out = {key: v / n for key, v in sums.items()}
        out.update(ratio_min=rmin, ratio_max=rmax)
        return out

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        """A separate rollout batch from the updated policy: ``val_*`` metrics, samples through
        ``hooks.on_samples``, and the ``best`` checkpoint when its objective is the best yet."""
        p, dev, seed = self.p, self.dev, self.spec.training.seed
        B, T = p.rollout_batch_size, p.response_length
        prompts = self.sampler.sample(B, random.Random(_seed(seed, step, _EVAL_PROMPTS)))
        gen = torch.Generator(device=dev).manual_seed(_seed(seed, step, _EVAL_TOKENS))
        responses = sample_responses(self.policy.lm, prompts, T, p.temperature, self.unk, gen,
                                     dev)
        logp_all, _ = response_forward(self.policy.lm, None, prompts, responses, p.temperature,
                                       self.unk)
        ref_all, _ = response_forward(self.reference, None, prompts, responses, p.temperature,
                                      self.unk)
        tok_lp = logp_all.gather(2, responses[:, :, None]).squeeze(2)
        ref_lp = ref_all.gather(2, responses[:, :, None]).squeeze(2)
        kl = (tok_lp - ref_lp).sum(dim=1)
        kl_exact = _xlogy_sum(logp_all.exp(), logp_all - ref_all).sum(dim=1)
        ref1, _ = response_forward(self.reference, None, prompts, responses, 1.0, None)
        nll = -ref1.gather(2, responses[:, :, None]).squeeze(2)
        batch = RewardBatch(prompts, responses.tolist(), self.tok,
                            empty_prompts=self.sampler.empty)
        scores = torch.as_tensor(self.reward(batch), dtype=torch.float32)
        val = {"reward_mean": float(scores.mean()),
               "reward_std": float(scores.std(unbiased=False)),
               "kl": float(kl.mean()), "kl_exact": float(kl_exact.mean()),
               "ref_ppl": math.exp(min(float(nll.mean()), 700.0))}
        row = self.pending[-1]
        row.val_reward_mean, row.val_reward_std = val["reward_mean"], val["reward_std"]
        row.val_kl, row.val_kl_exact, row.val_ref_ppl = val["kl"], val["kl_exact"], val["ref_ppl"]
        s = self.state
        s.final_val = val
        if self.on_samples is not None:
            n = min(SAMPLES_PER_EVAL, B)
            self.on_samples(step, [
                {"prompt": batch.prompt_texts[i], "response": batch.response_texts[i],
                 "reward": float(scores[i]), "kl": float(kl[i])} for i in range(n)])
        objective = val["reward_mean"] - s.kl_coef * val["kl"]
        if s.best_objective is None or objective > s.best_objective:
            s.best_step, s.best_objective = step, objective
            s.best_reward_mean, s.best_kl = val["reward_mean"], val["kl"]
            self._checkpoint(CheckpointKind.BEST)

    # -- checkpoints and metrics ---------------------------------------------------------------
    def _checkpoint(self, kind: CheckpointKind) -> None:
        self._flush()
        t0 = time.perf_counter()
        s = self.state
        full = kind != CheckpointKind.BEST
        with self.site("checkpoint", s.step):
            ts = {"step": s.step,
                  "ppo": {**s.to_json(self.runtime_s()),
                          "schedule": self.schedule.state()}}
            data = save_ppo_checkpoint(kind, self.spec, self.policy, self.tok, ts,
                                       self.optimizer if full else None)
            metrics: dict[str, Any] = {"step": s.step, "kl_coef": s.kl_coef}
            if s.final_val is not None:
                metrics.update(val_reward_mean=s.final_val["reward_mean"],
                               val_kl=s.final_val["kl"])
            self.hooks.on_checkpoint(CheckpointBlob(kind, s.step, data, metrics))
        if full:
            self.last_full_checkpoint = self.clock.elapsed()
        self.clock.excluded += time.perf_counter() - t0

    def _flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        now = self.clock.train_time()
        t_prev, seen_prev = self.window
        span = max(now - t_prev, 1e-9)
        last = self.pending[-1]
        rate = (last.rollouts_seen - seen_prev) * self.p.response_length / span
        for row in self.pending:
            row.rollout_tokens_per_s = rate
        self.hooks.on_metrics(list(self.pending))
        self.window = (now, last.rollouts_seen)
        self.pending = []
        self.clock.excluded += time.perf_counter() - t0


def _xlogy_sum(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``sum_v p_v * log_ratio_v`` over the last axis, with 0 * (-inf or nan) = 0 (a masked
    token has p = 0)."""
    return torch.where(p > 0, p * log_ratio, torch.zeros_like(p)).sum(dim=-1)


def train_ppo(spec: JobSpec, policy: LoadedCheckpoint | bytes, reward: Reward,
              prompts: PromptSampler | Sequence[Sequence[int]], hooks: Any,
              resume_from: bytes | None = None, device: str | None = None) -> PPOResult:
    """Fine-tune ``policy`` (the ``init_from`` checkpoint: bytes or :func:`load_policy`'s
    result) with PPO as ``spec`` (``task: "ppo"``) describes, reporting
    :class:`core.ppo.PPOStepMetrics` rows, checkpoints and (when ``hooks`` has it)
    ``on_samples(step, samples)`` through ``hooks`` (a :class:`core.contract.TrainingHooks`).

    ``reward``: :func:`worker.engine.rewards.build_reward`'s result. ``prompts``: a
    :class:`PromptSampler` (:func:`build_prompts`) or a list of prompts as token ids.
    ``resume_from``: a ``last``/``periodic`` checkpoint of this job (the reference is still
    ``policy``). ``device`` overrides ``spec.training.device``. Raises :class:`TrainingError`
    (``invalid_spec``, ``invalid_checkpoint``, ``dataset_error``, ``non_finite_loss``,
    ``out_of_memory``, ``timeout``, ``device_unavailable``) with its phase and step."""
    if spec.task != "ppo" or spec.ppo is None:
        raise TrainingError("invalid_spec", "train_ppo needs a spec with task 'ppo'")
    with failures_explained():
        dev = resolve_device(device or spec.training.device)
        if spec.training.num_threads is not None:
            torch.set_num_threads(spec.training.num_threads)
        init = load_policy(policy)
        sampler = prompts if isinstance(prompts, PromptSampler) else PromptSampler(prompts)
        resume = None
        if resume_from is not None:
            resume = (load_checkpoint(resume_from), _value_head_tensors(resume_from))
        mover = getattr(reward, "to", None)
        if callable(mover):
            mover(dev)
        run = _Run(spec, init, reward, sampler, hooks, dev, resume)
        log.info("ppo: %s, %d prompts, B=%d, T=%d, vocab %d, %d parameters", spec.ppo.algorithm,
                 len(sampler), spec.ppo.rollout_batch_size, spec.ppo.response_length,
                 init.tokenizer.vocab_size, run.policy.num_params())
        stop_reason = run.run()
        return _result(run, stop_reason, spec)


def _value_head_tensors(data: bytes) -> dict[str, torch.Tensor]:
    tensors = st_load(data)
    head = {k[len("value_head."):]: v for k, v in tensors.items() if k.startswith("value_head.")}
    if not head:
        raise TrainingError("invalid_checkpoint", "the checkpoint has no value head: it is not "
                            "a PPO job's")
    return head


def load_ppo_policy(data: bytes, device: torch.device | str = "cpu") -> PolicyWithValue:
    """The policy and value head of a PPO checkpoint (any kind), in eval mode."""
    ckpt = load_checkpoint(data)
    policy = PolicyWithValue(build_model_from_checkpoint(ckpt, device)).to(device)
    policy.value_head.load_state_dict(_value_head_tensors(data))
    return policy


def _result(run: _Run, stop_reason: StopReason, spec: JobSpec) -> PPOResult:
    s, p = run.state, run.p
    final = s.final_val or {}
    train_time = max(run.clock.train_time(), 1e-9)
    seen_now = s.rollouts_seen - run.start_seen
    return PPOResult(
        task="ppo", algorithm=p.algorithm, steps=s.step, rollouts_seen=s.rollouts_seen,
        rollout_tokens=s.rollouts_seen * p.response_length, duration_s=run.clock.elapsed(),
        rollout_tokens_per_s=seen_now * p.response_length / train_time,
        stop_reason=stop_reason, initial_reward_mean=s.initial_reward_mean,
        final_reward_mean=final.get("reward_mean"), final_kl=final.get("kl"),
        final_kl_exact=final.get("kl_exact"), final_ref_ppl=final.get("ref_ppl"),
        kl_coef=s.kl_coef, best_step=s.best_step, best_reward_mean=s.best_reward_mean,
        best_kl=s.best_kl, vocab_size=run.tok.vocab_size, num_params=run.policy.num_params(),
        init_from=None if spec.init_from is None else spec.init_from.model_dump())

