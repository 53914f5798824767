"""Fixtures for the engine tests: small real corpora and a recording TrainingHooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from core.contract import CheckpointBlob, StepMetrics
from core.corpora import builtin_corpus, find_corpus
from core.spec import JobSpec


class RecordingHooks:
    """Keeps every reported row and checkpoint; ``stop_when(rows)`` decides cancellation."""

    def __init__(self, stop_when: Callable[[list[StepMetrics]], bool] | None = None) -> None:
        self.rows: list[StepMetrics] = []
        self.checkpoints: list[CheckpointBlob] = []
        self.stop_when = stop_when

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        self.rows.extend(rows)

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        self.checkpoints.append(checkpoint)

    def should_stop(self) -> bool:
        return bool(self.stop_when and self.stop_when(self.rows))

    def last(self, kind: str) -> CheckpointBlob:
        return [c for c in self.checkpoints if c.kind == kind][-1]


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


def strip_timing(rows: Sequence[StepMetrics]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = r.as_dict()
        d.pop("tokens_per_s")
        d.pop("elapsed_s")
        out.append(d)
    return out
