"""The optimisation loop proper: one truncated-BPTT step per iteration, periodic validation,
checkpoints, metric flushes and the stopping rules. Built by :func:`worker.engine.trainer.train`.

Everything about a run's progress beyond the weights and the optimizer lives in one
:class:`LoopState`, which a ``last``/``periodic`` checkpoint saves and a resume restores as a
whole (:meth:`LoopState.checkpoint_parts`, :meth:`LoopState.restore`).

Per-step losses and gradient norms stay on the device and are read once per flush
(``training.log_interval``), so CUDA never waits on the host each step. ``hooks.should_stop``
is polled after every step and between evaluation batches (it reads a flag), so a cancel or a
shutdown is noticed within one step or one evaluation batch of the caller's flag changing.
A resumable (``periodic``) checkpoint is written every ``training.checkpoint_interval`` steps
and whenever ``training.checkpoint_every_s`` seconds have passed since the last one: the loop
pauses for its serialisation and the hooks' write, nothing else (no evaluation, no extra sync
beyond the one reading the pending steps' metrics). A non-finite loss or
gradient norm is caught before it touches the weights: on the CPU by a per-step check (a host
read is free there), on CUDA by the fused optimizer's ``found_inf`` flag, which skips the
update on the device (sticky until the flush that reports the failure).

Data-parallel runs (``resources.gpus > 1``, :mod:`worker.engine.distributed`): every rank runs
this loop on its rows of the batch with the model wrapped in ``DistributedDataParallel``; the
training loss is averaged over the ranks each step, and whatever rank 0 alone can know (a
budget in seconds, a cancel, the validation loss, whether a timed checkpoint is due) it
broadcasts, so every rank takes the same branch. Rank 0 reports and writes the checkpoints;
the other ranks run with hooks that do nothing. With one process none of this runs: no
collective, no extra sync.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from core.contract import (
    CheckpointBlob,
    CheckpointKind,
    Phase,
    StepMetrics,
    StopReason,
    TrainingError,
    mark_failure_site,
)
from core.contract import TrainingHooks as Hooks
from core.spec import JobSpec
from worker.engine.checkpoint import (
    LoadedCheckpoint,
    restore_rank_rng,
    restore_rng,
    save_checkpoint,
)
from worker.engine.data import Corpus, TrainBatches
from worker.engine.distributed import NONE, DistContext, shard_rows
from worker.engine.evaluate import EvalInterrupted, EvalResult, evaluate
from worker.engine.model import Hidden, LSTMLanguageModel
from worker.engine.schedule import EarlyStopping, LRSchedule
from worker.engine.tokenizers import Tokenizer

T = TypeVar("T")

RECENT_STEPS = 50  # how many of the last steps' training losses the fresh-state check averages

# How a data-parallel run's rank 0 tells the others a stop reason or a halt (an index, NaN for
# None) in :meth:`DistContext.agree`.
_STOPS: tuple[StopReason, ...] = ("max_steps", "max_epochs", "max_tokens", "max_runtime_s",
                                  "early_stopping", "cancelled")
_HALTS = ("cancelled", "timeout")


def _encode(value: str | None, names: tuple[str, ...]) -> float:
    return NONE if value is None else float(names.index(value))


def _decode(code: float, names: tuple[T, ...]) -> T | None:
    return None if math.isnan(code) else names[int(code)]


def _finite_or_none(x: float | None) -> float | None:
    """``x``, or None when it is None, infinite or NaN (strict JSON has no Infinity/NaN)."""
    return x if x is not None and math.isfinite(x) else None


def _detach(hidden: Hidden | None) -> Hidden | None:
    return None if hidden is None else (hidden[0].detach(), hidden[1].detach())


@dataclass
class LoopState:
    """A run's progress: the step, the best and latest validation losses, the schedule and
    early-stopping counters, the carried LSTM hidden state, the best weights (kept when a test
    split is evaluated at the end), the last training losses and the seconds already run.
    Saved and restored as a whole; the CPU/CUDA generator states travel with it in the
    checkpoint. Its JSON part is strict JSON: "no value yet" (an infinite best) is null."""

    schedule: LRSchedule
    stopper: EarlyStopping
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    final_val_loss: float | None = None
    runtime_before: float = 0.0  # seconds run before this (re)start, for max_runtime_s
    hidden: Hidden | None = field(default=None, repr=False)  # (num_layers, batch, hidden_dim) x2
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # The training losses of the last reported steps (nats/token), for the fresh-state check.
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS),
                                        repr=False)
    # The metric row (as reported, without validation values) of the current step when its
    # validation was interrupted by a stop: the resumed run validates that step first and
    # reports the row again with the values. None otherwise.
    unvalidated_row: dict[str, Any] | None = None

    def trainer_state(self, batches: TrainBatches, runtime_s: float) -> dict[str, Any]:
        """The JSON part of a checkpoint (``trainer_state`` in its header)."""
        return {
            "step": self.step,
            "epoch": batches.epoch_of(self.step),
            "tokens_seen": self.step * batches.tokens_per_batch,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_step": self.best_step,
            # A validation loss can overflow to inf (a diverged model): kept out of the strict
            # JSON as "no value", like an infinite best.
            "final_val_loss": _finite_or_none(self.final_val_loss),
            "runtime_s": runtime_s,
            "schedule": self.schedule.state(),
            "early_stopping": self.stopper.state(),
            "recent_losses": list(self.recent_losses),
            "unvalidated_row": self.unvalidated_row,
        }

    def restore(self, ckpt: LoadedCheckpoint, device: torch.device,
                dist: DistContext | None = None) -> None:
        """Take over the state saved in ``ckpt`` (a ``last``/``periodic`` checkpoint),
        including the generator states, so the run continues exactly. In a data-parallel run
        (``dist``) each rank takes its rows of the saved hidden state (all ranks' streams,
        (num_layers, batch * world_size, hidden_dim)) and its own generator states."""
        ts = ckpt.trainer_state
        self.step = int(ts["step"])
        best = ts["best_val_loss"]  # null (or Infinity, before strict JSON): none yet
        self.best_val_loss = math.inf if best is None else float(best)
        self.best_step = ts["best_step"]
        self.final_val_loss = ts["final_val_loss"]
        self.runtime_before = float(ts["runtime_s"])
        self.schedule.load(ts["schedule"])
        self.stopper.load(ts["early_stopping"])
        self.recent_losses.extend(ts.get("recent_losses", ()))  # absent before this field
        self.unvalidated_row = ts.get("unvalidated_row")
        self.best_weights = ({k: v.to(device) for k, v in ckpt.best_state.items()}
                             if ckpt.best_state else None)
        hidden = ckpt.hidden
        if hidden is not None and dist is not None:
            hidden = (shard_rows(hidden[0], dist.rank, dist.world_size, dim=1),
                      shard_rows(hidden[1], dist.rank, dist.world_size, dim=1))
        self.hidden = None if hidden is None else (hidden[0].to(device), hidden[1].to(device))
        if dist is not None and dist.rank > 0:
            restore_rank_rng(ckpt.rng, dist.rank, device)
        else:
            restore_rng(ckpt.rng, device)


class PendingStep(NamedTuple):
    """A step whose metrics wait on the device for the next flush."""

    step: int
    loss: torch.Tensor  # () nats/token
    grad_norm: torch.Tensor  # () L2 norm before clipping
    lr: float
    t_end: float  # time.perf_counter() when the step ended


@dataclass
class Clock:
    """Wall-clock accounting: training time excludes evaluation, checkpoints and reporting."""

    t0: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0
    flushed_train_time: float = 0.0  # training time at the previous flush
    final_train_time: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def train_time(self) -> float:
        return self.elapsed() - self.excluded

    def timed(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` and count its time as not training."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.excluded += time.perf_counter() - t0


class RunControl:
    """What every training loop shares (the language model's :class:`TrainLoop`, the
    classifier's and PPO's runs): a :class:`Clock`, halting from outside the stopping rules (a
    cancel or shutdown through ``hooks.should_stop()``, the ``training.max_duration_s``
    budget), labelling an exception with the phase and step it came from, and when a
    resumable (``periodic``) checkpoint is due. A loop has ``spec``, ``hooks``, ``clock``,
    ``state.runtime_before`` (seconds run before this restart) and ``state.step``, and starts
    with ``halt = None`` and ``last_full_checkpoint = 0.0``."""

    spec: JobSpec
    hooks: Any
    clock: Clock
    state: Any
    # Why the run is being halted from outside the stopping rules: "cancelled" or "timeout";
    # sticky once set.
    halt: str | None
    last_full_checkpoint: float  # clock.elapsed() at the last resumable checkpoint
    step_name = "step"  # what a step is called in messages (PPO: "iteration")

    def runtime_s(self) -> float:
        """Seconds this job has run, across restarts."""
        return float(self.state.runtime_before) + self.clock.elapsed()

    def poll(self) -> bool:
        """Whether the run must halt now: ``hooks.should_stop()`` (a cancel or a shutdown) or
        the ``training.max_duration_s`` budget spent. Cheap: called after every step and
        before every evaluation batch. Sets :attr:`halt` (sticky)."""
        if self.halt is None:
            limit = self.spec.training.max_duration_s
            if self.hooks.should_stop():
                self.halt = "cancelled"
            elif limit is not None and self.runtime_s() >= limit:
                self.halt = "timeout"
        return self.halt is not None

    def timeout_error(self) -> TrainingError:
        limit = self.spec.training.max_duration_s
        n = self.state.step
        return TrainingError(
            "timeout",
            f"the run took longer than training.max_duration_s = {limit} s and was stopped at "
            f"{self.step_name} {n}; its last checkpoint ({self.step_name} {n}) was kept. Raise "
            f"max_duration_s, or resubmit with a smaller budget (training.max_steps).",
            n, phase="train")

    @contextmanager
    def site(self, phase: Phase, step: int) -> Iterator[None]:
        """Label an exception raised inside with where it happened (first label wins)."""
        try:
            yield
        except BaseException as exc:
            mark_failure_site(exc, phase, step)
            raise

    def periodic_due(self, step: int, stopping: bool) -> bool:
        """A resumable checkpoint is due after ``step``: every ``checkpoint_interval`` steps,
        or once ``checkpoint_every_s`` seconds have passed since the last one (not when the run
        is stopping: its ``last`` checkpoint follows)."""
        t = self.spec.training
        if t.checkpoint_interval is not None and step % t.checkpoint_interval == 0:
            return True
        return (not stopping and t.checkpoint_every_s is not None
                and self.clock.elapsed() - self.last_full_checkpoint >= t.checkpoint_every_s)


@dataclass
class TrainLoop(RunControl):
    spec: JobSpec
    model: LSTMLanguageModel
    optimizer: torch.optim.Optimizer
    batches: TrainBatches
    corpus: Corpus
    tokenizer: Tokenizer
    hooks: Hooks
    device: torch.device
    state: LoopState
    clock: Clock = field(default_factory=Clock)
    pending: list[PendingStep] = field(default_factory=list)
    vals: dict[int, EvalResult] = field(default_factory=dict)  # step -> validation result
    dist: DistContext | None = None  # a data-parallel run's rank; None: one process

    def __post_init__(self) -> None:
        self.start_step = self.state.step
        self.is_main = self.dist is None or self.dist.is_main
        # What a training step calls: the model, or (data-parallel) the model wrapped in
        # DistributedDataParallel, which averages the gradients over the ranks in backward.
        # Evaluation and checkpoints use the model itself.
        self.net: torch.nn.Module = self.model
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._bad = torch.zeros((), device=self.device)  # CUDA: sticky non-finite flag
        self.halt = None
        self._eval_interrupted_at: int | None = None  # the step whose validation was cut
        self.last_full_checkpoint = 0.0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.spec.training.precision == "bf16" else None

    @property
    def sync_each_step(self) -> bool:
        """On the CPU a host read costs nothing: check each step before the update."""
        return self.device.type != "cuda"

    @property
    def eval_batch_size(self) -> int:
        """Streams an evaluation reads: the global batch (``batch_size`` x processes)."""
        world = 1 if self.dist is None else self.dist.world_size
        return self.spec.training.batch_size * world

    def train_tokens_per_s(self) -> float:
        tokens = (self.state.step - self.start_step) * self.batches.tokens_per_batch
        return tokens / max(self.clock.final_train_time or self.clock.train_time(), 1e-9)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> StopReason:
        """Train until a stopping rule holds; returns the stop reason. Saves ``last``.
        Raises ``TrainingError("timeout")`` (after saving ``last``) when
        ``training.max_duration_s`` passes."""
        self.net.train()
        # A run resumed from a checkpoint taken when a budget already held trains no more.
        stop = self._budget_stop(self.state.step) if self.state.step > 0 else None
        if self.dist is not None:
            with self.site("train", self.state.step):
                stop = self._agree_stop(stop)
        if self.state.unvalidated_row is not None:
            stop = self._finish_interrupted_validation(stop)
        while stop is None:
            step = self.state.step + 1
            with self.site("train", step):
                self._train_step(step)
            stop = self._after_step(step)
        self.clock.final_train_time = self.clock.train_time()
        self._checkpoint(CheckpointKind.LAST)
        if self.halt == "timeout":
            raise self.timeout_error()
        return stop

    def _finish_interrupted_validation(self, stop: StopReason | None) -> StopReason | None:
        """The resumed step's validation, interrupted in the previous run: run it (with its
        effects on the schedule, early stopping and the best checkpoint) and report the
        step's row again with its values, as the uninterrupted run did."""
        step, row = self.state.step, self.state.unvalidated_row
        assert row is not None
        try:
            early = self._validate(step)
        except EvalInterrupted:
            return "cancelled"
        self.state.unvalidated_row = None
        val = self.vals.pop(step, None)
        if val is not None:  # None on the ranks of a data-parallel run that do not report
            metrics = StepMetrics(**row)
            metrics.val_loss, metrics.val_ppl, metrics.val_bpc = val.loss, val.ppl, val.bpc
            metrics.val_accuracy, metrics.val_top5_accuracy = val.accuracy, val.top5_accuracy
            self.hooks.on_metrics([metrics])
        return stop or ("early_stopping" if early else None)

    def _train_step(self, step: int) -> None:
        """One truncated-BPTT step: forward from the carried (detached) hidden state, backward,
        clip, check for non-finite values, update."""
        t = self.spec.training
        lr = self.state.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, epoch_start = self.batches.get(step - 1)  # (batch, seq_len) each
        hidden = None if epoch_start else self._carried_state(step)
        rng_before = torch.get_rng_state() if self.sync_each_step else None
        self.optimizer.zero_grad(set_to_none=True)
        amp = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits, new_hidden = self.net(x, hidden)  # (batch, seq_len, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()  # data-parallel: the gradients are averaged over the ranks here
        if t.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._params
                                                  if p.grad is not None])
        # The reported loss: data-parallel, the mean over the ranks (the loss of the whole
        # batch), the same on every rank, so they all fail, or not, together.
        reported = loss.detach() if self.dist is None else self.dist.mean(loss)
        if self.sync_each_step:
            if not math.isfinite(float(reported + norm)):
                self._fail(step, hidden, rng_before, float(reported), float(norm))
        else:
            self._bad = self._bad.logical_or(~torch.isfinite(reported + norm)).float()
            self.optimizer.found_inf = self._bad  # type: ignore[attr-defined]
        self.optimizer.step()
        self.state.hidden = new_hidden
        self.state.step = step
        self.pending.append(PendingStep(step, reported, norm.detach(), lr,
                                        time.perf_counter()))

    def _carried_state(self, step: int) -> Hidden | None:
        """The hidden state carried into ``step``, detached (truncated BPTT), with each
        stream's state reset to zeros with probability ``training.state_reset_prob``. The
        resets are drawn from a generator seeded by (seed, step), so a resumed run draws the
        same ones and the global generator (dropout) is left alone."""
        hidden = _detach(self.state.hidden)
        t = self.spec.training
        if hidden is None or t.state_reset_prob == 0.0:
            return hidden
        g = torch.Generator().manual_seed((t.seed * 1_000_003 + step) % 2**63)
        if self.dist is None:
            keep = torch.rand(hidden[0].size(1), generator=g) >= t.state_reset_prob  # (batch,)
        else:  # drawn for all ranks' streams, as one process would; this rank's rows kept
            everyone = torch.rand(hidden[0].size(1) * self.dist.world_size, generator=g)
            keep = shard_rows(everyone, self.dist.rank, self.dist.world_size) \
                >= t.state_reset_prob
        mask = keep.to(device=hidden[0].device, dtype=hidden[0].dtype).view(1, -1, 1)
        return hidden[0] * mask, hidden[1] * mask

    def _after_step(self, step: int) -> StopReason | None:
        """Validation, periodic checkpoint and metrics flush due after ``step``; the stop
        reason when a stopping rule holds (a budget, early stopping) or the run must halt
        (:meth:`poll`: ``cancelled``, also for a timeout, which :meth:`run` raises). A halt
        during the validation leaves it to the resumed run (``unvalidated_row``)."""
        if self.dist is not None:
            with self.site("train", step):  # a failed collective: where rank 0 was
                return self._after_step_distributed(step)
        t = self.spec.training
        stop = self._budget_stop(step)
        stop, cut = self._validate_if_due(step, stop)
        if cut:
            return "cancelled"
        if self.periodic_due(step, stop is not None):
            self._checkpoint(CheckpointKind.PERIODIC)
        if step % t.log_interval == 0 or stop is not None:
            self._flush()
        if stop is None and self.poll():
            stop = "cancelled"
        return stop

    def _validate_if_due(self, step: int, stop: StopReason | None
                         ) -> tuple[StopReason | None, bool]:
        """Validate after ``step`` when it is due (every ``eval_interval`` steps, and at a
        stop). Returns the stop reason (``early_stopping`` added when it says so) and whether a
        halt cut the validation short (left to the resumed run, ``unvalidated_row``)."""
        if step % self.spec.training.eval_interval != 0 and stop is None:
            return stop, False
        try:
            if self._validate(step):
                stop = stop or "early_stopping"
        except EvalInterrupted:
            self._eval_interrupted_at = step
            return stop, True
        return stop, False

    def _after_step_distributed(self, step: int) -> StopReason | None:
        """:meth:`_after_step` of a data-parallel run: rank 0 decides the stop (a budget in
        seconds), evaluates, and says whether a timed checkpoint is due and whether the run
        must halt (:meth:`poll`); every rank then does the same."""
        assert self.dist is not None
        t = self.spec.training
        stop = self._agree_stop(self._budget_stop(step) if self.is_main else None)
        stop, cut = self._validate_if_due(step, stop)
        if cut:
            return "cancelled"
        periodic = False
        if self.is_main:
            periodic = self.periodic_due(step, stop is not None)
            if stop is None:
                self.poll()
        due, halt = self.dist.agree([float(periodic), _encode(self.halt, _HALTS)])
        self.halt = _decode(halt, _HALTS)
        if due:
            self._checkpoint(CheckpointKind.PERIODIC)
        if step % t.log_interval == 0 or stop is not None:
            self._flush()
        if stop is None and self.halt is not None:
            stop = "cancelled"
        return stop

    def _agree_stop(self, stop: StopReason | None) -> StopReason | None:
        """Rank 0's ``stop`` on every rank (data-parallel runs only)."""
        assert self.dist is not None
        return _decode(self.dist.agree([_encode(stop, _STOPS)])[0], _STOPS)

    def _budget_stop(self, step: int) -> StopReason | None:
        t = self.spec.training
        if step >= t.max_steps:
            return "max_steps"
        if t.max_epochs is not None and self.batches.epoch_of(step) >= t.max_epochs:
            return "max_epochs"
        if t.max_tokens is not None and step * self.batches.tokens_per_batch >= t.max_tokens:
            return "max_tokens"
        if (t.max_runtime_s is not None
                and self.runtime_s() >= t.max_runtime_s):
            return "max_runtime_s"
        return None

    # -- validation, checkpoints, metrics ----------------------------------------------------
    def _validate(self, step: int) -> bool:
        """Evaluate the validation split; save ``best`` on a new best. True: stop early.
        Raises :class:`EvalInterrupted` when a halt cut it short. Data-parallel: rank 0
        evaluates (the model itself, all ranks' streams) and broadcasts the loss (and whether
        it was cut short); every rank then updates its schedule and early stopping alike."""
        t, s = self.spec.training, self.state
        loss, cut = NONE, False
        if self.is_main:
            try:
                with self.site("evaluate", step):
                    res = self.clock.timed(evaluate, self.model, self.corpus.validation,
                                           self.eval_batch_size, t.seq_len, self.device,
                                           self.tokenizer.kind == "char", self.autocast_dtype,
                                           self.poll, t.eval_tokens)
                self.vals[step] = res
                loss = res.loss
            except EvalInterrupted:
                if self.dist is None:
                    raise
                cut = True
        if self.dist is not None:
            with self.site("evaluate", step):
                loss, cut_code, halt = self.dist.agree([loss, float(cut),
                                                        _encode(self.halt, _HALTS)])
            self.halt = _decode(halt, _HALTS)
            if cut_code:
                raise EvalInterrupted()
        s.final_val_loss = loss
        s.schedule.on_eval(loss)
        stop = s.stopper.on_eval(loss)
        if loss < s.best_val_loss:
            s.best_val_loss, s.best_step = loss, step
            if self.corpus.test is not None and self.is_main:
                s.best_weights = {k: v.detach().clone()
                                  for k, v in self.model.state_dict().items()}
            self._checkpoint(CheckpointKind.BEST)
        return stop

    def _checkpoint(self, kind: CheckpointKind, rng_cpu: torch.Tensor | None = None) -> None:
        """Flush metrics (a checkpoint never runs ahead of the reported rows), then save.
        ``best`` holds the weights only; the others the whole :class:`LoopState`."""
        self._flush()
        t0 = time.perf_counter()
        s = self.state
        full = kind != CheckpointKind.BEST
        with self.site("checkpoint", s.step):
            hidden = _detach(s.hidden) if full else None
            extra: dict[str, torch.Tensor] = {}
            if full and self.dist is not None:
                hidden, extra = self._gather_ranks(hidden, rng_cpu)
            if not self.is_main:
                return
            data = save_checkpoint(
                kind, self.spec, self.model, self.tokenizer,
                s.trainer_state(self.batches, self.runtime_s()),
                optimizer=self.optimizer if full else None,
                hidden=hidden,
                rng_cpu=rng_cpu,
                best_state=s.best_weights if full else None,
                extra=extra,
            )
            metrics: dict[str, Any] = {"step": s.step}
            if _finite_or_none(s.final_val_loss) is not None:
                metrics["val_loss"] = s.final_val_loss
            if not math.isinf(s.best_val_loss):
                metrics["best_val_loss"] = s.best_val_loss
            self.hooks.on_checkpoint(CheckpointBlob(kind, s.step, data, metrics))
        if full:
            self.last_full_checkpoint = self.clock.elapsed()
        self.clock.excluded += time.perf_counter() - t0

    def _gather_ranks(self, hidden: Hidden | None, rng_cpu: torch.Tensor | None
                      ) -> tuple[Hidden | None, dict[str, torch.Tensor]]:
        """A data-parallel checkpoint's parts from every rank, on rank 0: the hidden states
        of all streams (num_layers, batch * world_size, hidden_dim), as one process with the
        whole batch holds them, and the other ranks' generator states as ``rng.rank<r>.cpu``
        (and ``rng.rank<r>.cuda``) tensors. One gather; (None, {}) on the other ranks."""
        assert self.dist is not None
        mine: dict[str, torch.Tensor | None] = {
            "h": None if hidden is None else hidden[0].cpu(),
            "c": None if hidden is None else hidden[1].cpu(),
            "cpu": torch.get_rng_state() if rng_cpu is None else rng_cpu,
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
            else None,
        }
        everyone = self.dist.gather(mine)
        if everyone is None:
            return None, {}
        extra: dict[str, torch.Tensor] = {}
        for rank, part in enumerate(everyone[1:], start=1):
            for name in ("cpu", "cuda"):
                if part[name] is not None:
                    extra[f"rng.rank{rank}.{name}"] = part[name]
        if any(part["h"] is None for part in everyone):
            return None, extra
        return (torch.cat([p["h"] for p in everyone], dim=1),
                torch.cat([p["c"] for p in everyone], dim=1)), extra

    def _flush(self) -> None:
        """Report the pending steps (one host read for all of them)."""
        if not self.pending:
            return
        losses = torch.stack([p.loss for p in self.pending]).tolist()
        norms = torch.stack([p.grad_norm for p in self.pending]).float().tolist()
        t0 = time.perf_counter()
        train_now = self.clock.train_time()
        window = max(train_now - self.clock.flushed_train_time, 1e-9)
        tps = len(self.pending) * self.batches.tokens_per_batch / window
        rows: list[StepMetrics] = []
        bad: tuple[int, float, float] | None = None
        for p, loss, norm in zip(self.pending, losses, norms, strict=True):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                bad = (p.step, loss, norm)  # CUDA only: the CPU path fails before the update
                break
            rows.append(self._row(p, loss, norm, tps))
        self.pending.clear()
        if rows:
            self.hooks.on_metrics(rows)
        self.clock.flushed_train_time = train_now
        self.clock.excluded += time.perf_counter() - t0
        if bad is not None:
            # The fused optimizer skipped the bad step and every later update: the weights are
            # those after the step before it (the carried hidden state is not: it is dropped).
            self._fail(bad[0], None, None, bad[1], bad[2])

    def _row(self, p: PendingStep, loss: float, norm: float, tokens_per_s: float) -> StepMetrics:
        row = StepMetrics(step=p.step, epoch=self.batches.epoch_of(p.step), train_loss=loss,
                          lr=p.lr, grad_norm=norm, tokens_per_s=tokens_per_s,
                          elapsed_s=p.t_end - self.clock.t0,
                          tokens_seen=p.step * self.batches.tokens_per_batch)
        self.state.recent_losses.append(loss)
        val = self.vals.pop(p.step, None)
        if val is not None:
            row.val_loss, row.val_ppl, row.val_bpc = val.loss, val.ppl, val.bpc
            row.val_accuracy, row.val_top5_accuracy = val.accuracy, val.top5_accuracy
        elif p.step == self._eval_interrupted_at:
            self.state.unvalidated_row = row.as_dict()
        return row

    def _fail(self, step: int, hidden: Hidden | None, rng_before: torch.Tensor | None,
              loss: float, norm: float) -> None:
        """Save the last good state (after ``step - 1``) as ``last`` and raise."""
        self.pending = [p for p in self.pending if p.step < step]
        self.state.step = step - 1
        self.state.hidden = hidden
        self._checkpoint(CheckpointKind.LAST, rng_cpu=rng_before)
        raise TrainingError(
            "non_finite_loss",
            f"the training loss ({loss}) or gradient norm ({norm}) is not finite at step "
            f"{step}; the last good checkpoint (step {step - 1}) was kept. Lower "
            f"optimizer.lr, set training.grad_clip, or check the data.",
            step, phase="train",
        )
