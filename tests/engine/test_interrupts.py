"""The engine's side of issue 8: resumable checkpoints by steps and by time, a stop polled after
every step and between evaluation batches (with an exact resume when it cuts a validation),
the wall-clock limit, and failures explained with a code, a phase and a step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from core.contract import CorpusTexts, StepMetrics, TrainingError, failure_site
from core.spec import JobSpec, TrainingSpec
from worker.engine import evaluate as evaluate_module
from worker.engine.checkpoint import load_checkpoint
from worker.engine.model import LSTMLanguageModel
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec, strip_timing


class CountingHooks(RecordingHooks):
    """Stops once ``should_stop`` has been asked ``stop_at_call`` times."""

    def __init__(self, stop_at_call: int) -> None:
        super().__init__()
        self.calls = 0
        self.stop_at_call = stop_at_call

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls >= self.stop_at_call


def _by_step(rows: list[StepMetrics]) -> list[StepMetrics]:
    """Rows keyed by step, a later report of a step replacing the earlier (as the database
    stores them)."""
    return list({r.step: r for r in rows}.values())


# -- resumable by default -----------------------------------------------------------------------


def test_every_job_is_resumable_by_default() -> None:
    t = TrainingSpec()
    assert (t.checkpoint_interval, t.checkpoint_every_s, t.max_duration_s) == (1000, 300.0, None)
    fields = TrainingSpec.model_fields
    assert "periodic" in (fields["checkpoint_interval"].description or "")
    assert "seconds" in (fields["checkpoint_every_s"].description or "")
    assert "timeout" in (fields["max_duration_s"].description or "")
    dumped = JobSpec.model_validate({"dataset": {"builtin": "python-docs"}}).model_dump()
    assert dumped["training"]["checkpoint_interval"] == 1000


def test_default_step_bound_writes_a_periodic_checkpoint_at_step_1000(small_text: str) -> None:
    spec = make_spec(max_steps=1001, eval_interval=10_000, log_interval=500,
                     batch_size=2, seq_len=4)
    assert spec.training.checkpoint_interval == 1000  # the default, untouched
    hooks = RecordingHooks()
    train(spec, CorpusTexts(train=small_text), hooks)
    assert [(c.kind, c.step) for c in hooks.checkpoints if c.kind != "best"] == [
        ("periodic", 1000), ("last", 1001)]


def test_time_bound_writes_periodic_checkpoints_that_resume_exactly(small_text: str) -> None:
    # A time bound shorter than any step: a periodic checkpoint after every step but the last
    # (whose `last` checkpoint follows anyway), with no step bound at all.
    spec = make_spec(max_steps=8, log_interval=100, checkpoint_interval=None,
                     checkpoint_every_s=1e-9, keep_checkpoints=100)
    texts = CorpusTexts(train=small_text)
    full = RecordingHooks()
    train(spec, texts, full)
    periodic = [c for c in full.checkpoints if c.kind == "periodic"]
    assert [c.step for c in periodic] == list(range(1, 8))
    resumed = RecordingHooks()
    train(spec, texts, resumed, resume_from=periodic[2].data)  # step 3
    assert strip_timing(resumed.rows) == strip_timing(full.rows[3:])


def test_no_bound_at_all_writes_only_the_last_checkpoint(small_text: str) -> None:
    spec = make_spec(max_steps=6, checkpoint_interval=None, checkpoint_every_s=None)
    hooks = RecordingHooks()
    train(spec, CorpusTexts(train=small_text), hooks)
    assert [c.kind for c in hooks.checkpoints if c.kind != "best"] == ["last"]


# -- stops polled after every step and between evaluation batches -------------------------------


def test_should_stop_is_polled_after_every_step_not_at_flushes(small_text: str) -> None:
    hooks = CountingHooks(stop_at_call=7)
    res = train(make_spec(max_steps=1000, log_interval=10_000, eval_interval=100_000),
                CorpusTexts(train=small_text), hooks)
    assert res.stop_reason == "cancelled" and res.steps == 7
    assert [r.step for r in hooks.rows] == list(range(1, 8))
    assert hooks.last("last").step == 7


def test_a_stop_during_validation_cuts_it_and_the_resume_redoes_it_exactly(
    small_text: str,
) -> None:
    spec = make_spec(max_steps=30, eval_interval=10, log_interval=5,
                     model={"dropout": 0.2}, schedule={"kind": "plateau"},
                     early_stopping={"patience": 10}, top={"val_fraction": 0.3})
    texts = CorpusTexts(train=small_text)
    full = RecordingHooks()
    full_result = train(spec, texts, full)
    # Nine polls after steps 1..9, then one per validation batch at step 10: the twelfth call
    # is the third batch of that validation.
    cut = CountingHooks(stop_at_call=12)
    first = train(spec, texts, cut)
    assert first.stop_reason == "cancelled" and first.steps == 10 and cut.calls == 12
    assert [r.step for r in cut.rows] == list(range(1, 11))
    assert cut.rows[-1].val_loss is None  # its validation was cut
    assert not [c for c in cut.checkpoints if c.kind == "best"]
    last = cut.last("last")
    assert last.step == 10
    resumed = RecordingHooks()
    result = train(spec, texts, resumed, resume_from=last.data)
    assert resumed.rows[0].step == 10 and resumed.rows[0].val_loss is not None
    assert [r.step for r in resumed.rows] == list(range(10, 31))
    assert strip_timing(_by_step(cut.rows + resumed.rows)) == strip_timing(full.rows)
    assert [c.step for c in resumed.checkpoints if c.kind == "best"][0] == 10
    skip = {"duration_s", "train_tokens_per_s"}
    assert {k: v for k, v in result.as_dict().items() if k not in skip} == \
        {k: v for k, v in full_result.as_dict().items() if k not in skip}


def test_evaluate_stops_between_batches(small_text: str) -> None:
    model = LSTMLanguageModel(vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=1)
    ids = torch.randint(0, 50, (2000,))
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) == 3

    with pytest.raises(evaluate_module.EvalInterrupted):
        evaluate_module.evaluate(model, ids, 4, 8, torch.device("cpu"), should_stop=stop)
    assert len(polls) == 3 and model.training  # restored


# -- failures explained -------------------------------------------------------------------------


def test_max_duration_fails_with_timeout_and_keeps_the_last_checkpoint(small_text: str) -> None:
    hooks = RecordingHooks()
    with pytest.raises(TrainingError) as err:
        train(make_spec(max_steps=1000, max_duration_s=1e-9), CorpusTexts(train=small_text),
              hooks)
    e = err.value
    assert (e.code, e.phase, e.step, e.retryable) == ("timeout", "train", 1, False)
    assert "max_duration_s" in e.message
    assert hooks.last("last").step == 1
    assert e.as_dict() == {"code": "timeout", "message": e.message, "retryable": False,
                           "phase": "train", "step": 1}


def _raise_in_forward(monkeypatch: pytest.MonkeyPatch, exc: BaseException, at_call: int,
                      ) -> None:
    real = LSTMLanguageModel.forward
    calls = {"n": 0}

    def forward(self: LSTMLanguageModel, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LSTMLanguageModel, "forward", forward)


@pytest.mark.parametrize("exc, where", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 8589934592 bytes."), "host"),
    (MemoryError(), "host"),
])
def test_out_of_memory_in_a_step_is_out_of_memory_with_advice(
    small_text: str, monkeypatch: pytest.MonkeyPatch, exc: BaseException, where: str,
) -> None:
    _raise_in_forward(monkeypatch, exc, at_call=4)
    with pytest.raises(TrainingError) as err:
        train(make_spec(max_steps=20, eval_interval=100), CorpusTexts(train=small_text),
              RecordingHooks())
    e = err.value
    assert (e.code, e.phase, e.step, e.retryable) == ("out_of_memory", "train", 4, False)
    assert f"the {where} ran out of memory (train at step 4)" in e.message
    assert "training.batch_size" in e.message and "model.hidden_dim" in e.message


def test_out_of_memory_during_validation_names_the_evaluate_phase(
    small_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _raise_in_forward(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"), at_call=6)
    with pytest.raises(TrainingError) as err:
        train(make_spec(max_steps=20, eval_interval=5), CorpusTexts(train=small_text),
              RecordingHooks())
    assert (err.value.code, err.value.phase, err.value.step) == ("out_of_memory", "evaluate", 5)


def test_an_unexpected_exception_is_labelled_with_its_phase_and_step(
    small_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _raise_in_forward(monkeypatch, ZeroDivisionError("a bug"), at_call=3)
    with pytest.raises(ZeroDivisionError) as err:
        train(make_spec(max_steps=20), CorpusTexts(train=small_text), RecordingHooks())
    assert failure_site(err.value) == ("train", 3)


def test_errors_before_training_are_in_the_prepare_phase(small_text: str) -> None:
    spec = make_spec(batch_size=64, seq_len=4096)
    with pytest.raises(TrainingError) as err:
        train(spec, CorpusTexts(train=small_text[:2000]), RecordingHooks())
    e = err.value
    assert (e.code, e.phase, e.step, e.retryable) == ("corpus_too_small", "prepare", None, False)


def test_non_finite_loss_is_in_the_train_phase(
    small_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.engine import loop as loop_module

    real = loop_module.F.cross_entropy

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs) * math.inf

    monkeypatch.setattr(loop_module.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError) as err:
        train(make_spec(max_steps=5), CorpusTexts(train=small_text), RecordingHooks())
    assert (err.value.code, err.value.phase, err.value.step) == ("non_finite_loss", "train", 1)


def test_non_finite_loss_found_at_the_flush_keeps_the_last_good_weights(
    small_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA path, simulated on the CPU: the non-finite check waits on the device for the
    next flush (no host sync per step) and the fused optimizer skips every update from the bad
    step on. The job still fails with ``non_finite_loss`` at the first bad step, with a ``last``
    checkpoint of the weights before it, even though the validation that ran in between
    (with the same poisoned loss) gave an infinite loss, which strict JSON cannot hold
    (found on an H200: the checkpoint's JSON header raised ValueError instead)."""
    from worker.engine import loop as loop_module

    real = loop_module.F.cross_entropy

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs) * math.inf

    monkeypatch.setattr(loop_module.F, "cross_entropy", poisoned)
    spec = make_spec(max_steps=5, log_interval=5, device="cpu")
    synced = RecordingHooks()  # the CPU path: checked before the first update
    with pytest.raises(TrainingError):
        train(spec, CorpusTexts(train=small_text), synced)
    monkeypatch.setattr(loop_module.TrainLoop, "sync_each_step", property(lambda self: False))
    hooks = RecordingHooks()
    with pytest.raises(TrainingError) as err:
        train(spec, CorpusTexts(train=small_text), hooks)
    assert (err.value.code, err.value.phase, err.value.step) == ("non_finite_loss", "train", 1)
    last = hooks.last("last")
    assert last.step == 0 and "val_loss" not in last.metrics
    ckpt = load_checkpoint(last.data)
    assert ckpt.trainer_state["final_val_loss"] is None
    before = load_checkpoint(synced.last("last").data).model_state  # the initial weights
    assert ckpt.model_state.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(ckpt.model_state[k], v), k
