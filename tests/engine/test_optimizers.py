"""Optimizers, weight decay, bf16 autocast on the CPU and the thread count, each through the
real trainer on a small real corpus with a tiny model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from core.contract import CorpusTexts
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.sample import sample
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec


def _run(text: str, **training: Any) -> RecordingHooks:
    hooks = RecordingHooks()
    train(make_spec(**training), CorpusTexts(train=text), hooks)
    return hooks


def _weights(hooks: RecordingHooks) -> dict[str, torch.Tensor]:
    return load_checkpoint(hooks.last("last").data).model_state


def _one_step(text: str, **optimizer: Any) -> dict[str, torch.Tensor]:
    """The weights after one optimizer step (gradient clipping off). The embedding and decoder
    start in U(-0.1, 0.1) (``init_range``), so that the float32 rounding of the weights stays
    well under the tolerances below (the default N(0, 1) embedding is ten times wider)."""
    return _weights(_run(text, max_steps=1, grad_clip=None, optimizer=optimizer,
                         model={"init_range": 0.1}))


@pytest.fixture(scope="module")
def initial_weights(small_text: str) -> dict[str, torch.Tensor]:
    # A rate of 1e-30 moves no fp32 weight off its initial value (the zero decoder bias moves
    # by ~1e-30): the weights the seed initialises.
    return _one_step(small_text, name="sgd", lr=1e-30)


@pytest.mark.parametrize("optimizer", [
    {"name": "adam", "lr": 0.01},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    {"name": "sgd", "lr": 1.0, "momentum": 0.9},
    {"name": "sgd", "lr": 1.0, "momentum": 0.9, "nesterov": True},
], ids=["adam", "adamw", "sgd-momentum", "sgd-nesterov"])
def test_optimizer_lowers_the_training_loss(small_text: str, optimizer: dict[str, Any]) -> None:
    rows = _run(small_text, max_steps=40, eval_interval=40, log_interval=20,
                optimizer=optimizer).rows
    first = sum(r.train_loss for r in rows[:5]) / 5
    last = sum(r.train_loss for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)


def test_adamw_decays_each_weight_by_lr_times_weight_decay_apart_from_the_gradient(
    small_text: str, initial_weights: dict[str, torch.Tensor],
) -> None:
    # AdamW (Loshchilov & Hutter 2019): p <- p (1 - lr wd) - lr adam_step(g), so with and
    # without decay the weights after one step differ by exactly -lr wd p0.
    lr, wd = 0.01, 1.0
    plain = _one_step(small_text, name="adamw", lr=lr)
    decayed = _one_step(small_text, name="adamw", lr=lr, weight_decay=wd)
    for k, p0 in initial_weights.items():
        torch.testing.assert_close(decayed[k] - plain[k], -lr * wd * p0, rtol=0, atol=1e-7)


def test_adam_weight_decay_is_coupled_to_the_gradient_unlike_adamw(
    small_text: str, initial_weights: dict[str, torch.Tensor],
) -> None:
    # Adam adds wd p to the gradient before its per-weight normalisation, so the decay's
    # effect is not -lr wd p0 and the two optimizers part from the second step on.
    lr, wd = 0.01, 1.0
    plain = _one_step(small_text, name="adam", lr=lr)
    decayed = _one_step(small_text, name="adam", lr=lr, weight_decay=wd)
    k = "encoder.weight"
    assert not torch.allclose(decayed[k] - plain[k], -lr * wd * initial_weights[k],
                              rtol=0, atol=1e-7)
    adam = _run(small_text, max_steps=3, optimizer={"name": "adam", "weight_decay": wd}).rows
    adamw = _run(small_text, max_steps=3, optimizer={"name": "adamw", "weight_decay": wd}).rows
    assert adam[0].train_loss == adamw[0].train_loss  # same weights before the first step
    assert adam[1].train_loss != adamw[1].train_loss


def test_adam_and_adamw_without_weight_decay_train_identically(small_text: str) -> None:
    adam = _run(small_text, max_steps=5, optimizer={"name": "adam"}).rows
    adamw = _run(small_text, max_steps=5, optimizer={"name": "adamw"}).rows
    assert [r.train_loss for r in adam] == [r.train_loss for r in adamw]


def test_sgd_weight_decay_adds_decay_times_weights_to_the_gradient(
    small_text: str, initial_weights: dict[str, torch.Tensor],
) -> None:
    # torch SGD: g <- g + wd p, p <- p - lr g; one step differs from no decay by -lr wd p0.
    lr, wd = 0.5, 0.1
    plain = _one_step(small_text, name="sgd", lr=lr)
    decayed = _one_step(small_text, name="sgd", lr=lr, weight_decay=wd)
    for k, p0 in initial_weights.items():
        torch.testing.assert_close(decayed[k] - plain[k], -lr * wd * p0, rtol=0, atol=1e-7)


def test_bf16_on_the_cpu_gives_finite_metrics_and_a_checkpoint_that_loads(
    small_text: str,
) -> None:
    hooks = _run(small_text, max_steps=6, eval_interval=3, precision="bf16")
    assert [r.step for r in hooks.rows] == list(range(1, 7))
    for r in hooks.rows:
        assert math.isfinite(r.train_loss) and math.isfinite(r.grad_norm)
    vals = [r.val_loss for r in hooks.rows if r.val_loss is not None]
    assert len(vals) == 2 and all(math.isfinite(v) for v in vals)
    data = hooks.last("last").data
    ckpt = load_checkpoint(data)
    assert ckpt.spec.training.precision == "bf16"
    model = build_model_from_checkpoint(ckpt)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast
    assert len(sample(data, prompt="The", max_new_tokens=5, temperature=1.0, top_k=5,
                      seed=0)) == 8


def test_bf16_autocast_changes_the_computation(small_text: str) -> None:
    fp32 = _run(small_text, max_steps=1).rows[0].train_loss
    bf16 = _run(small_text, max_steps=1, precision="bf16").rows[0].train_loss
    assert bf16 != fp32


def test_num_threads_sets_the_torch_thread_count(small_text: str) -> None:
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    try:
        _run(small_text, max_steps=2, num_threads=want)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
