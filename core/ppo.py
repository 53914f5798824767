"""What a PPO fine-tuning job (``task: "ppo"``, docs/ppo.md) reports: its per-iteration metric
row and its result. Pure Python (no torch), like :mod:`core.contract`, so the API can derive
its response fields from these dataclasses.

Units: rewards are the task reward's own (``core.spec`` documents each kind's range); KL
divergences and entropies are nats per response (summed over the ``response_length``
positions), as Ziegler et al. 2019 report them (``objective/kl``, ``objective/entropy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.contract import StopReason


@dataclass
class PPOStepMetrics:
    """One row per PPO iteration (one rollout batch and its optimisation epochs).

    - ``reward_mean``/``reward_std``: the task reward (without the KL penalty) of the
      iteration's ``rollout_batch_size`` responses, sampled from the policy before its update.
    - ``kl``: the penalty's estimator, ``sum_t (log pi(x_t) - log ref(x_t))`` over the sampled
      tokens, mean over responses (nats per response).
    - ``kl_exact``: ``sum_t KL(pi(.|s_t) || ref(.|s_t))`` from both full next-token
      distributions at every sampled position, mean over responses (nats per response): the
      expectation of ``kl`` given the visited states, without its sampling noise.
    - ``entropy``: ``sum_t H(pi(.|s_t))`` of the full distributions, mean over responses
      (nats per response).
    - ``clip_fraction``: the share of (token, minibatch) terms whose clipped surrogate was the
      larger one (Ziegler et al.'s ``clipfrac``), mean over the iteration's minibatches.
    - ``approx_kl``: ``0.5 * mean((log pi_new - log pi_old)^2)`` (Ziegler et al.'s
      ``approxkl``), mean over minibatches.
    - ``ratio_min``/``ratio_max``: extremes of ``pi_new / pi_old`` over every token of every
      minibatch (both 1 when nothing moved).
    - ``policy_loss``, ``value_loss``: the clipped surrogate and the clipped value loss (with
      its 0.5 factor), means over minibatches. ``explained_variance``: ``1 - Var(R - V) /
      Var(R)`` of the returns ``R`` against the rollout's values ``V`` (None when Var(R) = 0).
    - ``response_length``: mean tokens per response before its first line end (the full
      ``response_length`` when it has none).
    - ``kl_coef``: the coefficient used for this iteration's penalty (before the adaptive
      controller's update). ``objective``: ``reward_mean - kl_coef * kl``.
    - ``lr``; ``grad_norm``: mean total L2 norm before clipping over the minibatches.
    - ``rollouts_seen``: responses sampled so far; ``rollout_tokens_per_s``: sampled tokens per
      second of training time (rollouts, rewards and optimisation; evaluation and checkpoints
      excluded), over the rows of one report.
    - ``val_*`` (every ``training.eval_interval`` iterations and at the end): the same on a
      separate batch of ``rollout_batch_size`` responses from the updated policy;
      ``val_ref_ppl``: the perplexity of those responses' tokens under the reference at
      temperature 1 (exp of the mean negative log-likelihood per token), how readable the
      reference model finds them.
    """

    step: int
    reward_mean: float
    reward_std: float
    kl: float
    kl_exact: float
    entropy: float
    clip_fraction: float
    approx_kl: float
    ratio_min: float
    ratio_max: float
    policy_loss: float
    value_loss: float
    explained_variance: float | None
    response_length: float
    kl_coef: float
    objective: float
    lr: float
    grad_norm: float
    rollouts_seen: int
    rollout_tokens_per_s: float
    elapsed_s: float
    val_reward_mean: float | None = None
    val_reward_std: float | None = None
    val_kl: float | None = None
    val_kl_exact: float | None = None
    val_ref_ppl: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PPOResult:
    """The outcome of a PPO job. ``initial_*``: the first iteration's rollouts (the starting
    policy); ``final_*``: the last evaluation's (``val_*`` of the last row); ``best_*``: the
    evaluation with the highest ``val_reward_mean - kl_coef * val_kl``, whose weights are the
    ``best`` checkpoint."""

    task: str
    algorithm: str  # "ppo" | "reinforce"
    steps: int  # PPO iterations
    rollouts_seen: int
    rollout_tokens: int
    duration_s: float
    rollout_tokens_per_s: float
    stop_reason: StopReason
    initial_reward_mean: float | None
    final_reward_mean: float | None
    final_kl: float | None
    final_kl_exact: float | None
    final_ref_ppl: float | None
    kl_coef: float  # the coefficient at the end (after adaptive updates)
    best_step: int | None
    best_reward_mean: float | None
    best_kl: float | None
    vocab_size: int
    num_params: int  # policy and value head
    init_from: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
