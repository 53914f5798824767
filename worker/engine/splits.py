"""Train/validation/test splits and the minimum split sizes (no torch import: the API cuts
its submission-time estimate with the same :func:`split_bounds` and :func:`tokens_needed`)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.hooks import CorpusTexts, TrainingError
from worker.spec import JobSpec


@dataclass
class SplitTexts:
    train: str
    validation: str
    test: str | None


def split_bounds(spec: JobSpec, n: int, *, separate_validation: bool = False,
                 separate_test: bool = False) -> tuple[int, int]:
    """Where a text of ``n`` units (characters, or token counts estimated from them) is cut:
    ``(train_end, test_start)``. Train is ``[0, train_end)``, the held-out validation
    ``[train_end, test_start)`` (empty when a separate validation text is given) and test
    ``[test_start, n)`` (empty unless ``test_fraction`` > 0 and no separate test text)."""
    vf = 0.0 if separate_validation else spec.val_fraction
    tf = 0.0 if separate_test else spec.test_fraction
    train_end = int(n * (1.0 - vf - tf))
    test_start = n - int(n * tf) if tf > 0 else n
    return train_end, test_start


def split_texts(spec: JobSpec, texts: CorpusTexts) -> SplitTexts:
    """Cut ``texts.train`` by character offsets (:func:`split_bounds`): train is the head, then
    ``val_fraction`` (unless ``texts.validation`` is given), then the last ``test_fraction``
    (unless ``texts.test`` is given). With ``val_fraction=0.1`` this is the reference loop's
    "first 90% train (``int(n * 0.9)``), last 10% validation"."""
    train_end, test_start = split_bounds(spec, len(texts.train),
                                         separate_validation=texts.validation is not None,
                                         separate_test=texts.test is not None)
    val = texts.validation if texts.validation is not None else texts.train[train_end:test_start]
    test = texts.test if texts.test is not None else (
        texts.train[test_start:] if spec.test_fraction > 0 else None)
    return SplitTexts(texts.train[:train_end], val, test)


def tokens_needed(spec: JobSpec) -> dict[str, int]:
    """The fewest tokens each split may hold: one batch of ``batch_size x (seq_len + 1)`` for
    training, 2 (one prediction) for validation and test."""
    t = spec.training
    return {"train": t.batch_size * (t.seq_len + 1), "validation": 2, "test": 2}


def check_token_counts(spec: JobSpec, n_train: int, n_val: int, n_test: int | None) -> None:
    """Raise ``TrainingError("corpus_too_small")`` unless each split holds
    :func:`tokens_needed`."""
    b, t = spec.training.batch_size, spec.training.seq_len
    need = tokens_needed(spec)
    if n_train < need["train"]:
        raise TrainingError(
            "corpus_too_small",
            f"the training split has {n_train} tokens but one batch needs batch_size x "
            f"(seq_len + 1) = {b} x {t + 1} = {need['train']}; use more text, a smaller "
            f"batch_size or seq_len, or a smaller val_fraction/test_fraction",
        )
    for name, n in (("validation", n_val), ("test", n_test)):
        if n is not None and n < need[name]:
            raise TrainingError(
                "corpus_too_small",
                f"the {name} split has {n} tokens but evaluation needs at least {need[name]}; "
                f"raise {'val_fraction' if name == 'validation' else 'test_fraction'} or give "
                f"a larger '{name}' dataset",
            )
