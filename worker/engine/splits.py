"""Train/validation/test splits and the size check (no torch import: the API can call
:func:`check_corpus_size` at submission to answer 422 instead of failing in the worker)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engine.hooks import CorpusTexts, TrainingError
from worker.engine.tokenizers import Tokenizer, build_tokenizer
from worker.spec import JobSpec


@dataclass
class SplitTexts:
    train: str
    validation: str
    test: str | None


def split_texts(spec: JobSpec, texts: CorpusTexts) -> SplitTexts:
    """Cut ``texts.train`` by character offsets: train is the head, then ``val_fraction``
    (unless ``texts.validation`` is given), then the last ``test_fraction`` (unless
    ``texts.test`` is given). With ``val_fraction=0.1`` this is the reference loop's "first
    90% train (``int(n * 0.9)``), last 10% validation"."""
    n = len(texts.train)
    vf = 0.0 if texts.validation is not None else spec.val_fraction
    tf = 0.0 if texts.test is not None else spec.test_fraction
    train_end = int(n * (1.0 - vf - tf))
    test_start = n - int(n * tf) if tf > 0 else n
    val = texts.validation if texts.validation is not None else texts.train[train_end:test_start]
    test = texts.test if texts.test is not None else (texts.train[test_start:] if tf else None)
    return SplitTexts(texts.train[:train_end], val, test)


def check_token_counts(spec: JobSpec, n_train: int, n_val: int, n_test: int | None) -> None:
    """Raise ``TrainingError("corpus_too_small")`` unless train holds one batch of
    ``batch_size x (seq_len + 1)`` tokens and each evaluation split at least 2 tokens."""
    b, t = spec.training.batch_size, spec.training.seq_len
    need = b * (t + 1)
    if n_train < need:
        raise TrainingError(
            "corpus_too_small",
            f"the training split has {n_train} tokens but one batch needs batch_size x "
            f"(seq_len + 1) = {b} x {t + 1} = {need}; use more text, a smaller batch_size or "
            f"seq_len, or a smaller val_fraction/test_fraction",
        )
    for name, n in (("validation", n_val), ("test", n_test)):
        if n is not None and n < 2:
            raise TrainingError(
                "corpus_too_small",
                f"the {name} split has {n} tokens but evaluation needs at least 2; raise "
                f"{'val_fraction' if name == 'validation' else 'test_fraction'} or give a "
                f"larger '{name}' dataset",
            )


def check_corpus_size(spec: JobSpec, texts: CorpusTexts) -> Tokenizer:
    """Split, build the tokenizer, count tokens and check sizes (see
    :func:`check_token_counts`). Returns the tokenizer. Costs one tokenization pass."""
    parts = split_texts(spec, texts)
    tok = build_tokenizer(spec.tokenizer, parts.train)
    check_token_counts(
        spec,
        len(tok.encode(parts.train)),
        len(tok.encode(parts.validation)),
        None if parts.test is None else len(tok.encode(parts.test)),
    )
    return tok
