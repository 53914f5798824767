"""The optimisation loop proper: one truncated-BPTT step per iteration, periodic validation,
checkpoints, metric flushes and the stopping rules. Built by :func:`worker.engine.trainer.train`.

Per-step losses and gradient norms stay on the device and are read once per flush
(``training.log_interval``), so CUDA never waits on the host each step. A non-finite loss or
gradient norm is caught before it touches the weights: on the CPU by a per-step check (a host
read is free there), on CUDA by the fused optimizer's ``found_inf`` flag, which skips the
update on the device (sticky until the flush that reports the failure).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from core.contract import (
    CheckpointBlob,
    StepMetrics,
    StopReason,
    TrainingError,
    TrainingHooks,
)
from core.spec import JobSpec
from worker.engine.checkpoint import save_checkpoint
from worker.engine.data import Corpus, TrainBatches
from worker.engine.evaluate import EvalResult, evaluate
from worker.engine.model import Hidden, LSTMLanguageModel
from worker.engine.schedule import EarlyStopping, LRSchedule
from worker.engine.tokenizers import Tokenizer


@dataclass
class RunState:
    """The loop's scalar state, saved in a checkpoint's ``trainer_state`` JSON."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    final_val_loss: float | None = None
    runtime_before: float = 0.0  # seconds run before this resume (for max_runtime_s)
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def load(self, ts: dict[str, Any]) -> None:
        self.step = int(ts["step"])
        self.best_val_loss = float(ts["best_val_loss"])
        self.best_step = ts["best_step"]
        self.final_val_loss = ts["final_val_loss"]
        self.runtime_before = float(ts["runtime_s"])


def _detach(hidden: Hidden | None) -> Hidden | None:
    return None if hidden is None else (hidden[0].detach(), hidden[1].detach())


@dataclass
class TrainLoop:
    spec: JobSpec
    model: LSTMLanguageModel
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    stopper: EarlyStopping
    batches: TrainBatches
    corpus: Corpus
    tokenizer: Tokenizer
    hooks: TrainingHooks
    device: torch.device
    state: RunState
    hidden: Hidden | None = None

    def __post_init__(self) -> None:
        t = self.spec.training
        self.autocast_dtype = torch.bfloat16 if t.precision == "bf16" else None
        self.sync_each_step = self.device.type != "cuda"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float, float]] = []
        self.vals: dict[int, EvalResult] = {}
        self.bad = torch.zeros((), device=self.device)  # CUDA: sticky non-finite flag
        self.start_step = self.state.step
        self.t0 = time.perf_counter()
        self.excluded = 0.0  # evaluation, checkpoint and reporting time: not training
        self.flushed_train_time = 0.0
        self.final_train_time: float | None = None

    # -- timing ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def train_time(self) -> float:
        return self.elapsed() - self.excluded

    def train_tokens_per_s(self) -> float:
        tokens = (self.state.step - self.start_step) * self.batches.tokens_per_batch
        return tokens / max(self.final_train_time or self.train_time(), 1e-9)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> StopReason:
        """Train until a stopping rule holds; returns the stop reason. Saves ``last``."""
        t = self.spec.training
        vocab = self.model.config.vocab_size
        use_autocast = self.autocast_dtype is not None
        amp_dtype = self.autocast_dtype or torch.bfloat16
        self.model.train()
        stop: StopReason | None = None
        while stop is None:
            step = self.state.step + 1
            lr = self.schedule.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y, epoch_start = self.batches.get(step - 1)  # (batch, seq_len) each
            hidden = None if epoch_start else _detach(self.hidden)
            rng_before = torch.get_rng_state() if self.sync_each_step else None
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_autocast):
                logits, new_hidden = self.model(x, hidden)  # (batch, seq_len, vocab)
            loss = F.cross_entropy(logits.view(-1, vocab).float(), y.reshape(-1))
            loss.backward()
            if t.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.params
                                                      if p.grad is not None])
            if self.sync_each_step:
                if not math.isfinite(float(loss.detach() + norm)):
                    self._fail(step, hidden, rng_before, float(loss.detach()), float(norm))
            else:
                self.bad = self.bad.logical_or(~torch.isfinite(loss.detach() + norm)).float()
                self.optimizer.found_inf = self.bad  # type: ignore[attr-defined]
            self.optimizer.step()
            self.hidden = new_hidden
            self.state.step = step
            self.pending.append((step, loss.detach(), norm.detach(), lr, time.perf_counter()))

            stop = self._budget_stop(step)
            if step % t.eval_interval == 0 or stop is not None:
                if self._validate(step) and stop is None:
                    stop = "early_stopping"
            if t.checkpoint_interval is not None and step % t.checkpoint_interval == 0:
                self._checkpoint("periodic")
            if step % t.log_interval == 0 or stop is not None:
                self._flush()
                if stop is None and self._timed(self.hooks.should_stop):
                    stop = "cancelled"
        self.final_train_time = self.train_time()
        self._checkpoint("last")
        return stop

    def _budget_stop(self, step: int) -> StopReason | None:
        t = self.spec.training
        if step >= t.max_steps:
            return "max_steps"
        if t.max_epochs is not None and self.batches.epoch_of(step) >= t.max_epochs:
            return "max_epochs"
        if t.max_tokens is not None and step * self.batches.tokens_per_batch >= t.max_tokens:
            return "max_tokens"
        if (t.max_runtime_s is not None
                and self.state.runtime_before + self.elapsed() >= t.max_runtime_s):
            return "max_runtime_s"
        return None

    def _timed(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` and count its time as not training."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.excluded += time.perf_counter() - t0

    # -- validation, checkpoints, metrics ----------------------------------------------------
    def _validate(self, step: int) -> bool:
        """Evaluate the validation split; save ``best`` on a new best. True: stop early."""
        t = self.spec.training
        res = self._timed(evaluate, self.model, self.corpus.validation, t.batch_size,
                          t.seq_len, self.device, self.tokenizer.kind == "char",
                          self.autocast_dtype)
        self.vals[step] = res
        self.state.final_val_loss = res.loss
        self.schedule.on_eval(res.loss)
        stop = self.stopper.on_eval(res.loss)
        if res.loss < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = res.loss, step
            if self.corpus.test is not None:
                self.state.best_weights = {k: v.detach().clone()
                                           for k, v in self.model.state_dict().items()}
            self._checkpoint("best")
        return stop

    def trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "epoch": self.batches.epoch_of(s.step),
            "tokens_seen": s.step * self.batches.tokens_per_batch,
            "best_val_loss": s.best_val_loss,
            "best_step": s.best_step,
            "final_val_loss": s.final_val_loss,
            "runtime_s": s.runtime_before + self.elapsed(),
            "schedule": self.schedule.state(),
            "early_stopping": self.stopper.state(),
        }

    def _checkpoint(self, kind: str, rng_cpu: torch.Tensor | None = None) -> None:
        """Flush metrics (a checkpoint never runs ahead of the reported rows), then save."""
        self._flush()
        t0 = time.perf_counter()
        full = kind != "best"
        data = save_checkpoint(
            kind, self.spec, self.model, self.tokenizer, self.trainer_state(),
            optimizer=self.optimizer if full else None,
            hidden=_detach(self.hidden) if full else None,
            rng_cpu=rng_cpu,
            best_state=self.state.best_weights if full else None,
        )
        metrics: dict[str, Any] = {"step": self.state.step}
        if self.state.final_val_loss is not None:
            metrics["val_loss"] = self.state.final_val_loss
        if not math.isinf(self.state.best_val_loss):
            metrics["best_val_loss"] = self.state.best_val_loss
        self.hooks.on_checkpoint(CheckpointBlob(kind, self.state.step, data, metrics))  # type: ignore[arg-type]
        self.excluded += time.perf_counter() - t0

    def _flush(self) -> None:
        """Report the pending steps (one host read for all of them)."""
        if not self.pending:
            return
        losses = torch.stack([p[1] for p in self.pending]).tolist()
        norms = torch.stack([p[2] for p in self.pending]).float().tolist()
        t0 = time.perf_counter()
        train_now = self.train_time()
        window = max(train_now - self.flushed_train_time, 1e-9)
        tps = len(self.pending) * self.batches.tokens_per_batch / window
        rows: list[StepMetrics] = []
        bad: tuple[int, float, float] | None = None
        for (step, _, _, lr, t_end), loss, norm in zip(self.pending, losses, norms, strict=True):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                bad = (step, loss, norm)  # CUDA only: the CPU path fails before the update
                break
            row = StepMetrics(step=step, epoch=self.batches.epoch_of(step), train_loss=loss,
                              lr=lr, grad_norm=norm, tokens_per_s=tps, elapsed_s=t_end - self.t0,
                              tokens_seen=step * self.batches.tokens_per_batch)
            val = self.vals.pop(step, None)
            if val is not None:
                row.val_loss, row.val_ppl, row.val_bpc = val.loss, val.ppl, val.bpc
                row.val_accuracy, row.val_top5_accuracy = val.accuracy, val.top5_accuracy
            rows.append(row)
        self.pending.clear()
        if rows:
            self.hooks.on_metrics(rows)
        self.flushed_train_time = train_now
        self.excluded += time.perf_counter() - t0
        if bad is not None:
            # The fused optimizer skipped the bad step and every later update: the weights are
            # those after the step before it (the carried hidden state is not: it is dropped).
            self._fail(bad[0], None, None, bad[1], bad[2])

    def _fail(self, step: int, hidden: Hidden | None, rng_before: torch.Tensor | None,
              loss: float, norm: float) -> None:
        """Save the last good state (after ``step - 1``) as ``last`` and raise."""
        self.pending = [p for p in self.pending if p[0] < step]
        self.state.step = step - 1
        self.hidden = hidden
        self._checkpoint("last", rng_cpu=rng_before)
        raise TrainingError(
            "non_finite_loss",
            f"the training loss ({loss}) or gradient norm ({norm}) is not finite at step "
            f"{step}; the last good checkpoint (step {step - 1}) was kept. Lower "
            f"optimizer.lr, set training.grad_clip, or check the data.",
            step,
        )
