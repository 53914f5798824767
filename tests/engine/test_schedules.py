"""Learning-rate schedules, checked against their definitions (core.spec.ScheduleSpec,
worker.engine.schedule.LRSchedule) through the real trainer's per-step ``lr`` metric, and the
plateau counter directly with chosen validation losses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from core.contract import CorpusTexts
from core.spec import ScheduleSpec
from worker.engine.checkpoint import load_checkpoint
from worker.engine.schedule import LRSchedule
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec

LR = 0.01


def _lrs(text: str, **training: object) -> list[float]:
    hooks = RecordingHooks()
    train(make_spec(**training), CorpusTexts(train=text), hooks)
    return [r.lr for r in hooks.rows]


def _plateau(patience: int, factor: float = 0.25, min_lr: float = 0.0) -> LRSchedule:
    spec = ScheduleSpec(kind="plateau", patience=patience, factor=factor, min_lr=min_lr)
    return LRSchedule(spec, base_lr=1.0, total_steps=100)


def _after_each_eval(schedule: LRSchedule, val_losses: list[float]) -> list[float]:
    out = []
    for v in val_losses:
        schedule.on_eval(v)
        out.append(schedule.lr_at(101))
    return out


def test_constant_warms_up_linearly_then_holds_the_rate(small_text: str) -> None:
    lrs = _lrs(small_text, max_steps=7, schedule={"kind": "constant", "warmup_steps": 4})
    assert lrs == [LR * 1 / 4, LR * 2 / 4, LR * 3 / 4, LR, LR, LR, LR]


def test_constant_without_warmup_is_the_rate_from_step_one(small_text: str) -> None:
    assert _lrs(small_text, max_steps=3) == [LR, LR, LR]


def test_cosine_follows_the_closed_form_and_reaches_min_lr_at_the_end_of_the_budget(
    small_text: str,
) -> None:
    min_lr, warmup, budget = 0.001, 5, 20
    lrs = _lrs(small_text, max_steps=budget,
               schedule={"kind": "cosine", "warmup_steps": warmup, "min_lr": min_lr})
    assert lrs[:warmup] == [LR * s / warmup for s in range(1, warmup + 1)]

    def closed_form(step: int) -> float:  # nanoGPT's get_lr, its 0-based it = step - 1
        ratio = (step - 1 - warmup) / (budget - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - min_lr)

    for step in (7, 11, 16, 20):  # ratio 1/15, 1/3, 2/3, 14/15
        assert lrs[step - 1] == pytest.approx(closed_form(step), rel=1e-12, abs=0)
    assert lrs[11 - 1] == pytest.approx(min_lr + 0.75 * (LR - min_lr), rel=1e-12, abs=0)
    # Step k uses the start of its interval: the first step after warm-up is at LR, the last
    # step of the budget above min_lr, and min_lr is where the budget ends (step 21 on).
    assert lrs[warmup] == pytest.approx(LR, rel=1e-12, abs=0)
    assert lrs[-1] > min_lr
    schedule = LRSchedule(ScheduleSpec(kind="cosine", warmup_steps=warmup, min_lr=min_lr),
                          base_lr=LR, total_steps=budget)
    assert schedule.lr_at(budget + 1) == min_lr
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))


def test_cosine_horizon_is_the_step_equivalent_of_max_epochs(small_text: str) -> None:
    # 6000 chars: 5400 train, 675 per stream of 8, 42 batches of 16 per epoch; half an epoch
    # ends at step 21, where the cosine must end (max_steps=1000 is not the horizon): step 21
    # is at ratio 20/21, one step from min_lr.
    lrs = _lrs(small_text[:6000], max_steps=1000, max_epochs=0.5,
               schedule={"kind": "cosine", "min_lr": 0.002})
    assert len(lrs) == 21
    assert lrs[0] == pytest.approx(LR, rel=1e-12, abs=0)
    last = 0.002 + 0.5 * (1 + math.cos(math.pi * 20 / 21)) * (LR - 0.002)
    assert lrs[-1] == pytest.approx(last, rel=1e-12, abs=0)
    assert lrs[-1] > 0.002


def test_cosine_after_the_budget_stays_at_min_lr() -> None:
    s = LRSchedule(ScheduleSpec(kind="cosine", min_lr=0.1), base_lr=1.0, total_steps=10)
    assert s.lr_at(10) > 0.1  # the budget's last step still updates
    assert [s.lr_at(step) for step in (11, 12, 50)] == [0.1, 0.1, 0.1]


def test_step_multiplies_by_gamma_every_step_size_steps(small_text: str) -> None:
    lrs = _lrs(small_text, max_steps=10,
               schedule={"kind": "step", "step_size": 3, "gamma": 0.5})
    # torch StepLR: steps 1-3 at lr, 4-6 at lr/2, 7-9 at lr/4, 10 at lr/8.
    assert lrs == [LR] * 3 + [LR * 0.5] * 3 + [LR * 0.25] * 3 + [LR * 0.125]


def test_plateau_with_patience_zero_divides_by_four_at_each_evaluation_without_improvement(
) -> None:
    # word_language_model: `if val_loss < best_val_loss: ... else: lr /= 4.0`
    lrs = _after_each_eval(_plateau(patience=0), [5.0, 4.0, 4.5, 3.0, 3.0, 3.5, 2.0])
    assert lrs == [1.0, 1.0, 0.25, 0.25, 0.0625, 0.015625, 0.015625]


def test_plateau_divides_only_after_more_than_patience_evaluations_without_improvement(
) -> None:
    s = _plateau(patience=2)
    assert _after_each_eval(s, [5.0, 6.0, 6.0]) == [1.0, 1.0, 1.0]  # 2 bad: not yet
    assert _after_each_eval(s, [6.0]) == [0.25]  # the 3rd bad evaluation in a row
    assert _after_each_eval(s, [6.0, 6.0]) == [0.25, 0.25]  # the count starts again
    assert _after_each_eval(s, [4.0, 6.0, 6.0, 6.0]) == [0.25, 0.25, 0.25, 0.0625]


def test_plateau_improvement_resets_the_count_of_bad_evaluations() -> None:
    s = _plateau(patience=1)
    assert _after_each_eval(s, [5.0, 6.0, 4.0, 6.0, 3.0, 6.0]) == [1.0] * 6


def test_plateau_rate_is_floored_at_min_lr() -> None:
    s = _plateau(patience=0, factor=0.5, min_lr=0.3)
    assert _after_each_eval(s, [1.0, 2.0, 2.0, 2.0]) == [1.0, 0.5, 0.3, 0.3]


def test_plateau_in_the_trainer_divides_from_the_step_after_a_stalled_evaluation(
    small_text: str,
) -> None:
    # An SGD rate of 1e-30 leaves every fp32 weight where it was, so each validation loss
    # equals the first: every evaluation after the first is one without improvement.
    hooks = RecordingHooks()
    spec = make_spec(max_steps=8, eval_interval=2, log_interval=4,
                     optimizer={"name": "sgd", "lr": 1e-30},
                     schedule={"kind": "plateau", "patience": 0, "factor": 0.25})
    train(spec, CorpusTexts(train=small_text), hooks)
    vals = [r.val_loss for r in hooks.rows if r.val_loss is not None]
    assert len(vals) == 4 and len(set(vals)) == 1
    lr = 1e-30
    assert [r.lr for r in hooks.rows] == [lr] * 4 + [lr * 0.25] * 2 + [lr * 0.0625] * 2


KINDS: list[dict[str, Any]] = [
    {"kind": "constant"}, {"kind": "constant", "warmup_steps": 3},
    {"kind": "cosine"}, {"kind": "cosine", "warmup_steps": 1},
    {"kind": "cosine", "warmup_steps": 3}, {"kind": "cosine", "warmup_steps": 10},
    {"kind": "step", "step_size": 1, "gamma": 0.5}, {"kind": "step", "warmup_steps": 2},
    {"kind": "plateau"}, {"kind": "plateau", "warmup_steps": 2},
]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_every_step_of_every_short_budget_has_a_positive_rate(kind: dict[str, Any]) -> None:
    # min_lr 0 (the default): no step of the budget, the first and the last included, may be
    # a step with lr 0, which would leave the weights as they were.
    for budget in range(1, 16):
        s = LRSchedule(ScheduleSpec.model_validate(kind), base_lr=LR, total_steps=budget)
        if kind["kind"] == "plateau":
            for v in (1.0, 2.0, 2.0):  # two evaluations without improvement: lr / 16
                s.on_eval(v)
        lrs = [s.lr_at(step) for step in range(1, budget + 1)]
        assert all(lr > 0 for lr in lrs), (budget, lrs)
        assert lrs[-1] > 0


@pytest.mark.parametrize("kind", [k for k in KINDS if k.get("warmup_steps", 0) < 5],
                         ids=lambda k: "-".join(str(v) for v in k.values()))
def test_the_trainer_last_step_has_a_positive_rate_for_every_kind(
        small_text: str, kind: dict[str, Any]) -> None:
    lrs = _lrs(small_text, max_steps=5, eval_interval=2, schedule=kind)
    assert len(lrs) == 5 and all(lr > 0 for lr in lrs) and lrs[-1] > 0


def test_cosine_with_warmup_changes_the_weights_at_the_last_step(small_text: str) -> None:
    # 30 steps, warm-up 10, min_lr 0: the model after step 29 (a periodic checkpoint) and
    # after step 30 (``last``) must differ; with the cosine at min_lr on step 30 they did not.
    hooks = RecordingHooks()
    spec = make_spec(max_steps=30, eval_interval=30, log_interval=10, checkpoint_interval=29,
                     schedule={"kind": "cosine", "warmup_steps": 10})
    train(spec, CorpusTexts(train=small_text), hooks)
    assert hooks.rows[-1].step == 30 and hooks.rows[-1].lr > 0
    at_29, at_30 = hooks.last("periodic"), hooks.last("last")
    assert (at_29.step, at_30.step) == (29, 30)
    before = load_checkpoint(at_29.data).model_state
    after = load_checkpoint(at_30.data).model_state
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "step 30 left every weight unchanged"
