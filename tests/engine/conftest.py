"""Fixtures for the engine tests: small real corpora and a recording TrainingHooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from core.contract import CheckpointBlob
from core.corpora import builtin_corpus, find_corpus
from core.spec import JobSpec


class RecordingHooks:
    """Keeps every reported row (a task's metric rows: ``StepMetrics``, the classifier's or
    PPO's) and checkpoint; ``stop_when(rows)`` decides cancellation."""

    def __init__(self, stop_when: Callable[[list[Any]], bool] | None = None) -> None:
        self.rows: list[Any] = []
        self.checkpoints: list[CheckpointBlob] = []
        self.stop_when = stop_when

    def on_metrics(self, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        self.checkpoints.append(checkpoint)

    def should_stop(self) -> bool:
        return bool(self.stop_when and self.stop_when(self.rows))

    def last(self, kind: str) -> CheckpointBlob:
        return [c for c in self.checkpoints if c.kind == kind][-1]

    def at(self, kind: str, step: int) -> CheckpointBlob:
        return [c for c in self.checkpoints if c.kind == kind and c.step == step][-1]


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``lmforge train`` keeps its token files in a temporary directory, never ~/.cache."""
    monkeypatch.setenv("LMFORGE_TOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("token-cache")))


@pytest.fixture(scope="session")
def small_text() -> str:
    """About 40k characters of real English text (tinyshakespeare when present)."""
    p = find_corpus("tinyshakespeare/input.txt")
    text = p.read_text(encoding="utf-8") if p is not None else builtin_corpus("python-docs")
    return text[:40_000]


def make_spec(**training: Any) -> JobSpec:
    """A tiny char model spec; ``training`` overrides TrainingSpec fields, and the keys
    ``model``/``optimizer``/``schedule``/``top`` override those sections / top-level fields."""
    model = training.pop("model", {})
    optimizer = training.pop("optimizer", {})
    schedule = training.pop("schedule", {})
    top = training.pop("top", {})
    t = {"batch_size": 8, "seq_len": 16, "max_steps": 20, "eval_interval": 10,
         "log_interval": 5, "num_threads": 1, **training}
    return JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"},
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, **model},
        "optimizer": {"lr": 0.01, **optimizer},
        "schedule": schedule,
        "training": t,
        **top,
    })


def strip_timing(rows: Sequence[Any],
                 timing: tuple[str, ...] = ("tokens_per_s", "elapsed_s")) -> list[dict[str, Any]]:
    """``rows`` as dicts without their ``timing`` fields, the only ones that differ between
    two equal runs."""
    return [{k: v for k, v in r.as_dict().items() if k not in timing} for r in rows]


@pytest.fixture
def poison_loss_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``poison_loss_at(n)``: from then on, the ``n``-th mean cross-entropy the training loop
    (worker.engine.loop) computes in this process is infinite (a diverged step)."""
    from worker.engine import loop as loop_module

    def poison(n: int) -> None:
        real = loop_module.F.cross_entropy
        calls = {"n": 0}

        def poisoned(*args: Any, **kwargs: Any) -> Any:
            loss = real(*args, **kwargs)
            if kwargs.get("reduction", "mean") == "mean":
                calls["n"] += 1
                if calls["n"] == n:
                    return loss * float("inf")
            return loss

        monkeypatch.setattr(loop_module.F, "cross_entropy", poisoned)

    return poison
