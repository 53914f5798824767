"""Learning-rate schedules and the validation-driven counters (plateau, early stopping).

All state is plain Python numbers so it goes into a checkpoint's JSON exactly (``json`` writes
floats with ``repr``, which round-trips bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.spec import EarlyStoppingSpec, ScheduleSpec


def _finite_or_none(x: float) -> float | None:
    """Checkpoint state is strict JSON: an infinite "best so far" (none yet) is saved as null."""
    return None if math.isinf(x) else x


def _inf_if_none(x: float | int | None) -> float:
    return math.inf if x is None else float(x)


@dataclass
class LRSchedule:
    """``lr_at(step)`` for the 1-based optimizer step; ``total_steps`` is the budget N in steps
    (the horizon, :func:`worker.engine.trainer.budget_steps`).

    - warm-up (every kind): ``lr * step / warmup_steps`` for ``step <= warmup_steps``, so the
      first step already moves (``lr / warmup_steps > 0``) and step ``warmup_steps`` is at ``lr``;
    - ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = min(1, (step - warmup - 1) / (N - warmup))``: step k uses the value at the start of
      its interval ``[k - 1, k]``, so the first step after warm-up is at ``lr``, the last step of
      the budget at ``p = (N - warmup - 1) / (N - warmup) < 1`` (above ``min_lr`` whenever
      ``lr > min_lr``: every step of the budget updates) and ``min_lr`` is reached at the end of
      the budget, used from step N + 1 on. This is SGDR (Loshchilov & Hutter 2017) without
      restarts: torch ``CosineAnnealingLR`` with ``T_max = N - warmup`` (its ``T_cur`` is the
      number of scheduler steps taken before the optimizer step), and nanoGPT's ``get_lr(it)``
      cosine branch with the 0-based ``it = step - 1`` and ``lr_decay_iters = N``;
    - ``step``: ``lr * gamma ** ((step - 1) // step_size)`` (torch ``StepLR``);
    - ``plateau``: ``lr * scale``, where :meth:`on_eval` multiplies ``scale`` by ``factor``
      after more than ``patience`` evaluations without a new best (torch
      ``ReduceLROnPlateau``; patience 0 and factor 0.25 is word_language_model's ``lr /= 4``),
      floored at ``min_lr``.
    """

    spec: ScheduleSpec
    base_lr: float
    total_steps: int
    scale: float = 1.0
    plateau_best: float = math.inf
    plateau_bad: int = 0

    def lr_at(self, step: int) -> float:
        s = self.spec
        if s.warmup_steps and step <= s.warmup_steps:
            return self.base_lr * step / s.warmup_steps
        if s.kind == "cosine":
            span = max(1, self.total_steps - s.warmup_steps)
            p = min(1.0, (step - s.warmup_steps - 1) / span)
            return s.min_lr + (self.base_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        if s.kind == "step":
            return self.base_lr * s.gamma ** ((step - 1) // s.step_size)
        if s.kind == "plateau":
            return max(s.min_lr, self.base_lr * self.scale)
        return self.base_lr

    def on_eval(self, val_loss: float) -> None:
        if self.spec.kind != "plateau":
            return
        if val_loss < self.plateau_best:
            self.plateau_best, self.plateau_bad = val_loss, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.spec.patience:
            self.scale *= self.spec.factor
            self.plateau_bad = 0

    def state(self) -> dict[str, float | int | None]:
        return {"scale": self.scale, "plateau_best": _finite_or_none(self.plateau_best),
                "plateau_bad": self.plateau_bad}

    def load(self, state: dict[str, float | int | None]) -> None:
        self.scale = float(state["scale"] or 1.0)
        self.plateau_best = _inf_if_none(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"] or 0)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without beating the best validation loss
    by at least ``min_delta`` nats."""

    spec: EarlyStoppingSpec | None
    best: float = math.inf
    bad: int = 0

    def on_eval(self, val_loss: float) -> bool:
        """Record an evaluation; True when the run should stop."""
        if self.spec is None:
            return False
        if val_loss < self.best - self.spec.min_delta:
            self.best, self.bad = val_loss, 0
        else:
            self.bad += 1
        return self.bad >= self.spec.patience

    def state(self) -> dict[str, float | int | None]:
        return {"best": _finite_or_none(self.best), "bad": self.bad}

    def load(self, state: dict[str, float | int | None]) -> None:
        self.best, self.bad = _inf_if_none(state["best"]), int(state["bad"] or 0)

