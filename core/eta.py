"""A running job's estimated time to completion from its recent metric rows (issue 13): the
one definition, used by the API's ``progress.eta_s`` (:mod:`app.metricseries`) and by
``lmforge follow``'s progress bar (:mod:`lmforge.cli`), which computes it from the rows the
event stream brings."""

from __future__ import annotations

from typing import Any


def _rate_window(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest row and the oldest row of the same run among ``rows`` (newest first): a
    resumed run restarts ``elapsed_s`` from 0, so the window stops where it goes up again."""
    if not rows or not isinstance(rows[0].get("elapsed_s"), int | float):
        return None
    newest, oldest = rows[0], None
    for row in rows[1:]:
        e = row.get("elapsed_s")
        if not isinstance(e, int | float) or e >= (oldest or newest)["elapsed_s"]:
            break
        oldest = row
    return None if oldest is None else (newest, oldest)


def eta_seconds(spec: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """Seconds until the job's budget is spent, from its recent rate: ``rows`` are its newest
    metric rows, newest first, each ``{"step", **values}``. Over the window from the oldest
    to the newest row of the current run (:func:`_rate_window`), steps/s, tokens/s and
    epochs/s are (Δ step, Δ tokens_seen, Δ epoch) / Δ elapsed_s, wall-clock seconds that
    include evaluations and checkpoints; the remaining budget is each stopping rule of
    ``training`` that applies (``max_steps``, ``max_tokens``, ``max_epochs``;
    ``max_runtime_s``/``max_duration_s`` minus this run's ``elapsed_s``, an upper bound after
    a resume) divided by its rate, and the ETA is the smallest of them, counted from the
    newest row's flush. Early stopping cannot be foreseen: the ETA is then an upper bound.
    None when fewer than two rows of the run exist or no rate can be measured."""
    window = _rate_window(rows)
    if window is None:
        return None
    new, old = window
    dt = float(new["elapsed_s"]) - float(old["elapsed_s"])
    training = spec.get("training") or {}
    candidates: list[float] = []

    def remaining(key: str, budget: Any) -> None:
        a, b = new.get(key), old.get(key)
        if budget is None or not isinstance(a, int | float) or not isinstance(b, int | float):
            return
        rate = (a - b) / dt
        if rate > 0:
            candidates.append(max(0.0, (float(budget) - a) / rate))

    remaining("step", training.get("max_steps"))
    remaining("tokens_seen", training.get("max_tokens"))
    remaining("epoch", training.get("max_epochs"))
    for key in ("max_runtime_s", "max_duration_s"):
        if training.get(key) is not None:
            candidates.append(max(0.0, float(training[key]) - float(new["elapsed_s"])))
    return round(min(candidates), 1) if candidates else None
