"""Learning-rate schedules, checked against their definitions (core.spec.ScheduleSpec,
worker.engine.schedule.LRSchedule) through the real trainer's per-step ``lr`` metric, and the
plateau counter directly with chosen validation losses."""

from __future__ import annotations

import math

import pytest

from core.contract import CorpusTexts
from core.spec import ScheduleSpec
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


def test_cosine_follows_the_closed_form_and_reaches_min_lr_at_the_budget(
    small_text: str,
) -> None:
    min_lr, warmup, budget = 0.001, 5, 20
    lrs = _lrs(small_text, max_steps=budget,
               schedule={"kind": "cosine", "warmup_steps": warmup, "min_lr": min_lr})
    assert lrs[:warmup] == [LR * s / warmup for s in range(1, warmup + 1)]

    def closed_form(step: int) -> float:  # nanoGPT's get_lr
        ratio = (step - warmup) / (budget - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - min_lr)

    for step in (6, 10, 15, 19):  # ratio 1/15, 1/3, 2/3, 14/15
        assert lrs[step - 1] == pytest.approx(closed_form(step), rel=1e-12, abs=0)
    assert lrs[10 - 1] == pytest.approx(min_lr + 0.75 * (LR - min_lr), rel=1e-12, abs=0)
    assert lrs[-1] == min_lr
    assert all(a > b for a, b in zip(lrs[warmup - 1:], lrs[warmup:], strict=False))


def test_cosine_horizon_is_the_step_equivalent_of_max_epochs(small_text: str) -> None:
    # 6000 chars: 5400 train, 675 per stream of 8, 42 batches of 16 per epoch; half an epoch
    # ends at step 21, where the cosine must reach min_lr (max_steps=1000 is not the horizon).
    lrs = _lrs(small_text[:6000], max_steps=1000, max_epochs=0.5,
               schedule={"kind": "cosine", "min_lr": 0.002})
    assert len(lrs) == 21
    assert lrs[-1] == 0.002
    assert lrs[0] == pytest.approx(0.002 + 0.5 * (1 + math.cos(math.pi / 21)) * (LR - 0.002),
                                   rel=1e-12, abs=0)


def test_cosine_after_the_budget_stays_at_min_lr() -> None:
    s = LRSchedule(ScheduleSpec(kind="cosine", min_lr=0.1), base_lr=1.0, total_steps=10)
    assert [s.lr_at(step) for step in (10, 11, 50)] == [0.1, 0.1, 0.1]


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
