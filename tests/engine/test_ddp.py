"""Data-parallel training (``resources.gpus: 2``) with real processes: rank 0 in this process,
rank 1 a subprocess (``python -m worker.ddp_rank``), gloo on the CPU, tiny models.

Tolerance of the equivalence with one process and the doubled batch: 1e-5 relative on every
loss and gradient norm, 1e-4 absolute on the weights after 20 Adam steps (lr 0.01). Not exact
because the sums are taken in another order: the 1-process run reduces the loss and the
gradients over all 2B streams at once, the 2-process run over B streams per rank and then
across ranks (gloo's all-reduce), so float32 rounding differs in the last bits. Measured
(docs/deploy.md, "Data-parallel jobs"): losses and gradient norms within 2e-7 relative; weights
within 2.4e-5 with Adam, whose division by sqrt(v) magnifies the rounding of nearly-zero
gradients (embedding rows of rare characters), and within 2.4e-7 with SGD. A resumed
2-process run is compared exactly (the same processes doing the same sums in the same order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from core.contract import StepMetrics, TrainingError
from core.corpora import builtin_corpus
from core.sources import CorpusSources
from tests.engine.conftest import RecordingHooks, make_spec, strip_timing
from worker.ddp_rank import train_data_parallel
from worker.engine.checkpoint import load_checkpoint
from worker.engine.distributed import shard_rows
from worker.engine.trainer import train_sources

REL = 1e-5  # relative tolerance of 2 processes x batch B against 1 process x batch 2B
WEIGHTS_ATOL = 1e-4


def _sources() -> CorpusSources:
    return CorpusSources.from_texts(builtin_corpus("python-docs")[:40_000])


def _spec(batch_size: int, gpus: int, **training: Any) -> Any:
    top = {"test_fraction": 0.1, **({"resources": {"device": "cpu", "gpus": gpus}}
                                     if gpus > 1 else {})}
    base: dict[str, Any] = dict(max_steps=20, eval_interval=10, log_interval=5, device="cpu",
                                grad_clip=0.5, state_reset_prob=0.1,
                                model={"dropout": 0.0, "num_layers": 2})
    base.update(training)
    return make_spec(batch_size=batch_size, top=top, **base)


def _rank_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "worker.ddp_rank" in " ".join(p.cmdline())]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=REL)


def _assert_rows_close(ones: list[StepMetrics], twos: list[StepMetrics]) -> None:
    assert [r.step for r in ones] == [r.step for r in twos]
    for a, b in zip(ones, twos, strict=True):
        assert a.tokens_seen == b.tokens_seen and a.epoch == b.epoch and a.lr == b.lr
        for name in ("train_loss", "grad_norm", "val_loss", "val_ppl", "val_accuracy"):
            assert _close(getattr(a, name), getattr(b, name)), (a.step, name, a, b)


def test_shard_rows_splits_streams_into_disjoint_contiguous_blocks() -> None:
    data = torch.arange(8 * 3).view(8, 3)
    parts = [shard_rows(data, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), data)
    hidden = torch.arange(2 * 8 * 4).view(2, 8, 4)
    assert torch.equal(torch.cat([shard_rows(hidden, r, 4, dim=1) for r in range(4)], dim=1),
                       hidden)
    with pytest.raises(ValueError):
        shard_rows(data, 0, 3)


def test_two_processes_match_one_process_with_the_doubled_batch() -> None:
    one_hooks, two_hooks = RecordingHooks(), RecordingHooks()
    one = train_sources(_spec(8, 1), _sources(), one_hooks)
    two = train_data_parallel(_spec(4, 2), _sources(), two_hooks)

    _assert_rows_close(one_hooks.rows, two_hooks.rows)
    assert two_hooks.rows[0].tokens_seen == 8 * 16  # all ranks' tokens: 2 x 4 streams x 16
    assert [c.kind for c in two_hooks.checkpoints] == [c.kind for c in one_hooks.checkpoints]
    assert two.steps == one.steps == 20 and two.tokens_seen == one.tokens_seen
    for name in ("final_val_loss", "best_val_loss", "test_loss", "test_accuracy",
                 "fresh_state_train_loss", "recent_train_loss"):
        assert _close(getattr(one, name), getattr(two, name)), name

    # The checkpoint is the 1-process format: all 8 streams' hidden state, the same tensors
    # (plus rank 1's generator state), weights within the tolerance.
    a = load_checkpoint(one_hooks.last("last").data)
    b = load_checkpoint(two_hooks.last("last").data)
    assert b.hidden is not None and a.hidden is not None
    assert b.hidden[0].shape == a.hidden[0].shape == (2, 8, 32)
    assert torch.allclose(a.hidden[0], b.hidden[0], atol=WEIGHTS_ATOL)
    assert set(b.rng) == set(a.rng) | {"rank1.cpu"}
    assert a.model_state.keys() == b.model_state.keys()
    for k, v in a.model_state.items():
        assert torch.allclose(v, b.model_state[k], atol=WEIGHTS_ATOL, rtol=0), k
    assert a.optimizer_state is not None and b.optimizer_state is not None
    assert b.optimizer_state["state"][0].keys() == a.optimizer_state["state"][0].keys()
    assert _rank_processes() == []


def test_a_two_process_run_resumes_exactly() -> None:
    # Dropout on: each rank draws its own masks, and its generator state travels in the
    # checkpoint (rank 1's as rng.rank1.cpu), so the resumed run draws the same ones.
    spec = _spec(4, 2, max_steps=30, model={"dropout": 0.3, "num_layers": 2},
                 schedule={"kind": "plateau", "patience": 0}, early_stopping={"patience": 10})
    full = RecordingHooks()
    full_result = train_data_parallel(spec, _sources(), full)
    cancelled = RecordingHooks(stop_when=lambda rows: bool(rows) and rows[-1].step >= 13)
    first = train_data_parallel(spec, _sources(), cancelled)
    assert first.stop_reason == "cancelled"
    stop = cancelled.last("last").step
    assert 13 <= stop < 30
    resumed = RecordingHooks()
    result = train_data_parallel(spec, _sources(), resumed, resume_from=cancelled.last("last").data)

    assert [r.step for r in resumed.rows] == list(range(stop + 1, 31))
    assert strip_timing(cancelled.rows + resumed.rows) == strip_timing(full.rows)
    skip = {"duration_s", "train_tokens_per_s"}
    assert {k: v for k, v in result.as_dict().items() if k not in skip} == \
        {k: v for k, v in full_result.as_dict().items() if k not in skip}
    a = load_checkpoint(full.last("last").data).model_state
    b = load_checkpoint(resumed.last("last").data).model_state
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert _rank_processes() == []


class _KillRank1(RecordingHooks):
    """Kills rank 1 (SIGKILL) when step 5 is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[int] = []

    def on_metrics(self, rows: Any) -> None:
        super().on_metrics(rows)
        if rows[-1].step >= 5 and not self.killed:
            for p in _rank_processes():
                p.kill()
                self.killed.append(p.pid)


def test_a_killed_rank_fails_the_run_with_rank_failed() -> None:
    hooks = _KillRank1()
    spec = _spec(4, 2, max_steps=10_000, log_interval=1, eval_interval=10_000)
    with pytest.raises(TrainingError) as err:
        train_data_parallel(spec, _sources(), hooks)
    assert len(hooks.killed) == 1
    e = err.value
    assert e.code == "rank_failed" and e.retryable and e.phase == "train"
    assert "rank 1 of 2" in e.message and "SIGKILL" in e.message
    # Noticed at the next collective, not after thousands of steps or the 30-minute timeout.
    assert e.step is not None and e.step <= 7
    assert hooks.rows[-1].step < 10
    assert _rank_processes() == []


def test_a_corpus_too_small_for_the_global_batch_fails_before_any_rank_starts() -> None:
    # 2 x 160 streams need 320 x 17 = 5440 training tokens; one process with 160 would fit.
    spec = _spec(160, 2)
    text = builtin_corpus("python-docs")[:5_000]
    with pytest.raises(TrainingError) as err:
        train_data_parallel(spec, CorpusSources.from_texts(text), RecordingHooks())
    assert err.value.code == "corpus_too_small"
    assert "batch_size x resources.gpus x (seq_len + 1) = 160 x 2 x 17 = 5440" in \
        err.value.message
    assert _rank_processes() == []


def test_the_corpus_size_rule_counts_the_global_batch() -> None:
    # The one rule the API (422 at submission) and the engine share (core.splits).
    from core.splits import corpus_shortfall

    tokens = {"train": 4_000, "validation": 500, "test": 500}
    assert corpus_shortfall(_spec(160, 1), tokens) is None
    short = corpus_shortfall(_spec(160, 2), tokens)
    assert short is not None and "= 5440" in short.message


def test_one_process_with_the_doubled_batch_resumes_a_two_process_checkpoint() -> None:
    # The checkpoint format is the 1-process one: all 8 streams' hidden state, rank 0's
    # generator state as rng.cpu (rank 1's extra tensor is ignored).
    two = RecordingHooks()
    train_data_parallel(_spec(4, 2, max_steps=10), _sources(), two)
    resumed, full = RecordingHooks(), RecordingHooks()
    train_sources(_spec(8, 1), _sources(), resumed, resume_from=two.last("last").data)
    train_sources(_spec(8, 1), _sources(), full)
    assert [r.step for r in resumed.rows] == list(range(11, 21))
    _assert_rows_close(full.rows[10:], resumed.rows)


def test_lmforge_train_runs_a_two_process_spec(tmp_path: Path) -> None:
    # `lmforge train` (lmforge.local.train_command) with resources.gpus 2: rank 0 in this
    # process writes the run's files, reporting both ranks' tokens.
    from lmforge.local import train_command

    (tmp_path / "corpus.txt").write_text(builtin_corpus("python-docs")[:20_000], "utf-8")
    spec = {"dataset": {"path": "corpus.txt"}, "resources": {"device": "cpu", "gpus": 2},
            "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
            "training": {"batch_size": 4, "seq_len": 16, "max_steps": 6, "eval_interval": 3,
                         "log_interval": 2, "num_threads": 1, "device": "cpu"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert train_command(tmp_path / "spec.json", tmp_path / "out") == 0
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["tokens_seen"] == 6 * 2 * 4 * 16
    assert _rank_processes() == []


def test_a_non_finite_loss_on_rank_0_stops_every_rank_with_the_last_good_state(
        poison_loss_at: Callable[[int], None]) -> None:
    # Only rank 0's own loss is poisoned (at step 7); the reported loss is the mean over the
    # ranks, so rank 1 sees it too: both fail at the same step, and together write the
    # `last` checkpoint of the step before (a gather), rather than rank 1 hanging.
    poison_loss_at(7)
    hooks = RecordingHooks()
    with pytest.raises(TrainingError) as err:
        train_data_parallel(_spec(4, 2, log_interval=1), _sources(), hooks)
    assert err.value.code == "non_finite_loss" and err.value.step == 7
    assert [r.step for r in hooks.rows] == list(range(1, 7))
    last = load_checkpoint(hooks.last("last").data)
    assert hooks.last("last").step == 6 and "rank1.cpu" in last.rng
    assert last.hidden is not None and last.hidden[0].shape == (2, 8, 32)
    assert _rank_processes() == []
