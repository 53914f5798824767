"""Time one training step of a job's shape, before the job runs (the dry run's
``seconds_per_step``: ``POST /v1/jobs?dry_run=true``, via the inference server's
``POST /calibrate``).

A calibration builds the spec's model over a ``vocab_size``-token vocabulary on ``device``,
its optimizer (:func:`worker.engine.trainer.make_optimizer`, the same fused kernels) and one
batch of uniformly random token ids (``batch_size x seq_len``), then runs the training loop's
step (:meth:`worker.engine.loop.TrainLoop._train_step`'s arithmetic: forward under the spec's
autocast precision, fp32 cross-entropy, backward, gradient clipping, optimizer step): one
untimed warm-up step (first-call allocations and kernel selection), then ``steps`` timed
ones, synchronising CUDA before reading the clock. The answer is their mean, in seconds.

It measures this process on this machine, with its thread count (``training.num_threads``
when the spec sets it): a worker on other hardware, or one sharing its cores with other jobs,
runs at another speed, and evaluation, checkpoints and data loading are not counted. The
global random generators are left as they were (``torch.random.fork_rng``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.spec import JobSpec
from worker.engine.generate import DeadlineExceeded
from worker.engine.model import ModelConfig, build_model
from worker.engine.trainer import make_optimizer


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float  # mean of the timed steps, seconds
    steps: int  # timed steps (the warm-up step not counted)
    device: str
    tokens_per_s: float  # batch_size x seq_len / seconds_per_step


def _time_steps(spec: JobSpec, config: ModelConfig, device: torch.device, steps: int,
                should_stop: Callable[[], bool] | None) -> tuple[float, int]:
    """(mean seconds per timed step, timed steps); see :func:`calibrate`."""
    t, v = spec.training, config.vocab_size
    amp = torch.bfloat16 if t.precision == "bf16" else None
    model = build_model(config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec.optimizer, params, device)
    x = torch.randint(0, v, (t.batch_size, t.seq_len), device=device)
    y = torch.randint(0, v, (t.batch_size, t.seq_len), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits, _ = model(x)  # (batch, seq_len, vocab)
        loss = F.cross_entropy(logits.view(-1, v).float(), y.reshape(-1))
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if should_stop is not None and should_stop():
        raise DeadlineExceeded()
    step()  # warm-up
    timed = 0
    start = time.perf_counter()
    while timed < steps:
        if should_stop is not None and should_stop():
            if timed == 0:
                raise DeadlineExceeded()
            break
        step()
        timed += 1
    return (time.perf_counter() - start) / timed, timed


def calibrate(spec: JobSpec, vocab_size: int, device: torch.device, steps: int = 3,
              should_stop: Callable[[], bool] | None = None) -> Calibration:
    """Time ``steps`` training steps of ``spec``'s shape over ``vocab_size`` tokens on
    ``device`` (module docstring). ``should_stop`` is polled before every step: past the
    warm-up and at least one timed step it ends the timing early (fewer ``steps``); before
    that it raises :class:`worker.engine.generate.DeadlineExceeded`. Raises ``ValueError`` for
    ``steps < 1`` or ``vocab_size < 1``, and what torch raises when the step does not fit
    (e.g. ``torch.OutOfMemoryError``). The memory is given back before it returns."""
    if steps < 1 or vocab_size < 1:
        raise ValueError("steps and vocab_size must be >= 1")
    m, t = spec.model, spec.training
    config = ModelConfig(vocab_size, m.embed_dim, m.hidden_dim, m.num_layers, m.dropout,
                         m.tie_weights, m.init_range)
    threads = torch.get_num_threads()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            seconds, timed = _time_steps(spec, config, device, steps, should_stop)
    finally:
        torch.set_num_threads(threads)
        gc.collect()  # a failed step's frames hold the model until collected
        if device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return Calibration(seconds_per_step=seconds, steps=timed, device=str(device),
                       tokens_per_s=t.batch_size * t.seq_len / max(seconds, 1e-12))
