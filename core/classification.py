"""Text classification: the split, the metrics and what a ``task: "classify"`` job reports.

Pure Python (no torch, no numpy), so the API process can import the result's definition
(``app.schemas`` derives the result's response fields from :class:`ClassificationResult`).

Metric definitions (scikit-learn's, checked against ``sklearn.metrics`` in
``tests/engine/test_classifier.py``), over examples with true label ``y`` and predicted label
``p`` and for each class ``c``: ``precision_c = TP_c / (TP_c + FP_c)``, ``recall_c = TP_c /
(TP_c + FN_c)``, ``F1_c = 2 precision_c recall_c / (precision_c + recall_c)``, each 0 when its
denominator is 0 (scikit-learn's ``zero_division=0``); ``accuracy = mean(y == p)``;
``macro-F1 = mean over all classes of F1_c`` (every class counts the same, whatever its size:
``f1_score(average="macro")``). The confusion matrix ``C[i][j]`` counts examples of true class
``i`` predicted as class ``j`` (``sklearn.metrics.confusion_matrix``'s convention), classes in
the order of ``labels``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.contract import StopReason

Example = tuple[str, str]  # (text, label)

#: The split of one labelled dataset into train/validation/test does not depend on
#: ``training.seed``: runs with other seeds are compared on the same examples.
SPLIT_SEED = 0


def stratified_split(
    examples: Sequence[Example], val_fraction: float, test_fraction: float,
    seed: int = SPLIT_SEED,
) -> tuple[list[Example], list[Example], list[Example]]:
    """``(train, validation, test)``: for each label, its examples in a seeded random order,
    ``round(n * val_fraction)`` of them to validation and ``round(n * test_fraction)`` to test
    (at least one each when the fraction is > 0 and the label has at least 3 examples; never
    all of a label's examples: at least one stays in training), the rest to training. Each
    split keeps the dataset's order among its own examples. Deterministic for a given
    ``seed``, whatever the order of labels in the data."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    val_idx: set[int] = set()
    test_idx: set[int] = set()
    for label in sorted(by_label):
        idx = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(idx)
        n = len(idx)
        n_val = _share(n, val_fraction)
        n_test = _share(n, test_fraction)
        while n_val + n_test >= n and (n_val or n_test):  # keep one in training
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        val_idx.update(idx[:n_val])
        test_idx.update(idx[n_val:n_val + n_test])
    train = [e for i, e in enumerate(examples) if i not in val_idx and i not in test_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, val, test


def _share(n: int, fraction: float) -> int:
    if fraction <= 0.0:
        return 0
    k = round(n * fraction)
    return max(k, 1) if n >= 3 else k


def balanced_weights(labels: Sequence[str], train_labels: Sequence[str]) -> list[float]:
    """``n / (n_classes * n_c)`` per class (in ``labels`` order), ``n_c`` the training examples
    of class ``c``: scikit-learn's ``compute_class_weight("balanced")`` (King & Zeng 2001).
    A class absent from training gets weight 1."""
    counts = {label: 0 for label in labels}
    for y in train_labels:
        counts[y] += 1
    n, k = len(train_labels), len(labels)
    return [n / (k * counts[c]) if counts[c] else 1.0 for c in labels]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int],
                     num_classes: int) -> list[list[int]]:
    """``C[i][j]``: examples of true class ``i`` predicted as ``j`` (num_classes x num_classes)."""
    c = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        c[t][p] += 1
    return c


@dataclass
class ClassMetrics:
    """One class's precision, recall and F1 (each in [0, 1]) and its support (true examples)."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    """Accuracy, macro-F1, per-class metrics (keyed by label) and the confusion matrix of one
    evaluation; ``loss`` is the mean cross-entropy in nats per example (weighted by the
    job's class weights when it has them, as in training)."""

    loss: float
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]
    num_examples: int

    def per_class_json(self) -> dict[str, dict[str, Any]]:
        return {k: asdict(v) for k, v in self.per_class.items()}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           labels: Sequence[str], loss: float) -> ClassificationMetrics:
    """The metrics of predictions ``y_pred`` against ``y_true`` (class indices into
    ``labels``); definitions in the module docstring. Raises ``ValueError`` on no examples."""
    if not y_true:
        raise ValueError("no examples to evaluate")
    k = len(labels)
    cm = confusion_matrix(y_true, y_pred, k)
    per_class: dict[str, ClassMetrics] = {}
    for c, label in enumerate(labels):
        tp = cm[c][c]
        predicted = sum(cm[r][c] for r in range(k))
        support = sum(cm[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = ClassMetrics(precision, recall, f1, support)
    correct = sum(cm[c][c] for c in range(k))
    return ClassificationMetrics(
        loss=loss, accuracy=correct / len(y_true),
        macro_f1=sum(m.f1 for m in per_class.values()) / k,
        per_class=per_class, confusion=cm, num_examples=len(y_true))


@dataclass
class ClassifyStepMetrics:
    """One row per optimizer step of a classification job. ``train_loss``: the step's batch
    cross-entropy in nats per example (class-weighted when the job has class weights);
    ``val_*`` only on steps where validation ran: ``val_loss`` (as train_loss, over the whole
    validation split), ``val_accuracy``, ``val_macro_f1`` and ``val_per_class``
    (``{label: {precision, recall, f1, support}}``)."""

    step: int
    epoch: float  # fractional passes over the training examples
    train_loss: float
    lr: float
    grad_norm: float  # total L2 norm before clipping
    examples_per_s: float  # training throughput (excludes evaluation time)
    tokens_per_s: float  # real (unpadded) tokens per second of training
    elapsed_s: float
    examples_seen: int
    tokens_seen: int  # real (unpadded) training tokens consumed up to this step
    encoder_frozen: bool  # the embedding and LSTM did not move this step
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    val_per_class: dict[str, dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassificationResult:
    """The outcome of a classification job. ``best_*`` and ``confusion_matrix`` are the
    validation metrics of the best checkpoint (highest validation macro-F1, ties to the
    lower validation loss); ``test_*`` are that checkpoint's metrics on the test split (None
    without one). Losses are nats per example."""

    task: str
    steps: int
    epochs: float
    examples_seen: int
    tokens_seen: int
    duration_s: float
    train_examples_per_s: float
    stop_reason: StopReason
    labels: list[str]
    num_examples: dict[str, int]  # {"train", "validation", "test"}
    class_weights: list[float] | None  # in `labels` order; None: unweighted
    final_val_loss: float | None
    final_val_accuracy: float | None
    final_val_macro_f1: float | None
    best_step: int | None
    best_val_loss: float | None
    best_val_accuracy: float | None
    best_val_macro_f1: float | None
    best_val_per_class: dict[str, dict[str, Any]] | None
    confusion_matrix: list[list[int]] | None  # validation, best checkpoint; rows: true label
    vocab_size: int
    num_params: int
    init_from: dict[str, Any] | None = None  # {"job_id", "checkpoint"} the encoder came from
    test_loss: float | None = None
    test_accuracy: float | None = None
    test_macro_f1: float | None = None
    test_per_class: dict[str, dict[str, Any]] | None = None
    test_confusion_matrix: list[list[int]] | None = None
    embedding_coverage: float | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
