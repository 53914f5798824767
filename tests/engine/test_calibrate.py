"""worker.engine.calibrate: timing real training steps of a spec's shape."""

from __future__ import annotations

import pytest
import torch

from worker.engine.calibrate import calibrate
from worker.engine.generate import DeadlineExceeded

from .conftest import make_spec


def test_calibration_times_the_steps_and_leaves_the_process_as_it_was() -> None:
    spec = make_spec(batch_size=4, seq_len=8, num_threads=1, precision="bf16",
                     model={"num_layers": 2, "dropout": 0.1},
                     optimizer={"name": "sgd", "momentum": 0.9})
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    cal = calibrate(spec, vocab_size=57, device=torch.device("cpu"), steps=2)
    assert cal.steps == 2 and cal.device == "cpu"
    assert cal.seconds_per_step > 0
    assert cal.tokens_per_s == pytest.approx(4 * 8 / cal.seconds_per_step)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator untouched
    assert torch.get_num_threads() == threads  # num_threads applied only while timing


def test_a_deadline_ends_the_timing_after_one_step_or_raises_before_any() -> None:
    spec = make_spec(batch_size=2, seq_len=4)
    polls: list[int] = []

    def after_polls(n: int) -> bool:
        polls.append(1)
        return len(polls) > n

    # Polled before the warm-up, then before each timed step: True at the third poll.
    cal = calibrate(spec, 20, torch.device("cpu"), steps=10, should_stop=lambda: after_polls(2))
    assert cal.steps == 1
    polls.clear()
    with pytest.raises(DeadlineExceeded):
        calibrate(spec, 20, torch.device("cpu"), steps=10, should_stop=lambda: after_polls(1))
    with pytest.raises(ValueError, match="steps and vocab_size"):
        calibrate(spec, 0, torch.device("cpu"))
