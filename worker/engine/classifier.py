"""Text classification (``task: "classify"``): an LSTM encoder, pooling and a linear head,
trained with cross-entropy on labelled examples.

Model (:class:`LSTMClassifier`): Embedding -> dropout -> LSTM (the language model's
``encoder``/``lstm`` layers, same parameter names, so an LM checkpoint's weights copy over
as they are) -> pooling over each example's real tokens -> dropout -> Linear head (one output
per class). Padded batches are packed (``torch.nn.utils.rnn.pack_padded_sequence``), so the
LSTM never reads a padding position and the pooled vector of an example is the same whatever
else is in its batch (``tests/engine/test_classifier.py``). Pooling: ``mean`` (default) or
``max`` over the top layer's outputs at the example's positions, or ``last``, the top layer's
hidden state after the example's last token (core.spec.ClassifySpec says why mean is the
default).

Data: each example's text is encoded with the job's tokenizer (trained on the training
examples' texts, one per line, or the ``init_from`` checkpoint's) and cut to its first
``classify.max_len`` tokens; an empty text is one ``<unk>`` (id 0) token. Training batches
are ``training.batch_size`` examples drawn without replacement from a permutation of the
training examples per epoch, seeded by (``training.seed``, epoch), so step ``s``'s batch is
a function of ``s`` and a resumed run sees the same batches.

Loop: Adam/AdamW/SGD with the LM's schedules and gradient clipping; for the first
``classify.freeze_encoder_steps`` steps the embedding and LSTM get no gradient (their
``requires_grad`` is off, so the optimizer leaves them exactly as they are) and only the
head learns. Validation every ``training.eval_interval`` steps and at the end; the ``best``
checkpoint is the one with the highest validation macro-F1 (ties: the lower validation
loss), because macro-F1 is what the job is judged on and the cross-entropy can keep falling
while the decisions do not improve (or the reverse). Early stopping counts evaluations
without a macro-F1 gain of at least ``min_delta``; the ``plateau`` schedule watches the
validation loss. ``last``/``periodic`` checkpoints hold the full state (optimizer, generator
states, loop state, best weights), so a resume reports the same metrics as an uninterrupted
run on the CPU.

Checkpoints are ordinary ``lmforge.checkpoint.v1`` files (:mod:`worker.engine.checkpoint`):
tensors ``model.encoder.weight``, ``model.lstm.*``, ``model.head.*``; the spec (with
``task: "classify"``), the encoder's ``model_config``, the tokenizer and a ``trainer_state``
whose ``classifier`` entry holds the labels (the head's output order) and the pooling.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from core.classification import (
    ClassificationMetrics,
    ClassificationResult,
    ClassifyStepMetrics,
    Example,
    balanced_weights,
    classification_metrics,
    stratified_split,
)
from core.contract import (
    CheckpointBlob,
    CheckpointKind,
    StopReason,
    TrainingError,
)
from core.spec import ClassifySpec, JobSpec
from worker.engine.checkpoint import (
    LoadedCheckpoint,
    _cpu,
    encode_checkpoint,
    load_checkpoint,
    restore_rng,
)
from worker.engine.embeddings import load_pretrained
from worker.engine.loop import Clock, RunControl
from worker.engine.model import ModelConfig
from worker.engine.schedule import EarlyStopping, LRSchedule
from worker.engine.tokenizers import Tokenizer, build_tokenizer
from worker.engine.trainer import failures_explained, make_optimizer, resolve_device

log = logging.getLogger(__name__)

Pooling = str  # "mean" | "max" | "last" (core.spec.ClassifySpec.pooling)


# -- the model --------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    """Embedding -> dropout -> LSTM -> pooling -> dropout -> Linear over ``num_classes``.

    ``encoder``/``lstm`` are named as in :class:`worker.engine.model.LSTMLanguageModel`;
    ``config`` describes them (``tie_weights`` is always False: there is no output embedding).
    Initialisation as the language model's: PyTorch's layer defaults (embedding N(0, 1),
    LSTM and head U(+-1/sqrt(hidden_dim))) or, with ``init_range``, U(-r, r) for the
    embedding and head weights and a zero head bias.
    """

    def __init__(self, config: ModelConfig, num_classes: int, pooling: Pooling) -> None:
        super().__init__()
        if pooling not in ("mean", "max", "last"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.config = config
        self.pooling = pooling
        self.num_classes = num_classes
        self.encoder = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_dim, config.num_layers,
                            batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.head = nn.Linear(config.hidden_dim, num_classes)
        r = config.init_range
        if r is not None:
            nn.init.uniform_(self.encoder.weight, -r, r)
            nn.init.uniform_(self.head.weight, -r, r)
            nn.init.zeros_(self.head.bias)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The embedding's and the LSTM's parameters (what ``freeze_encoder_steps`` holds)."""
        return [*self.encoder.parameters(), *self.lstm.parameters()]

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids: (batch, T) int64, padded with anything past each length; lengths: (batch,)
        int64 on the CPU, each in [1, T] -> (batch, hidden_dim), before the head's dropout.
        Padding positions never enter the LSTM (packed) nor the pooling."""
        emb = self.encoder(ids)  # (batch, T, embed_dim)
        p = self.config.dropout
        if p > 0:
            emb = F.dropout(emb, p, self.training)
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out_packed, (h, _) = self.lstm(packed)
        if self.pooling == "last":
            return h[-1]  # (batch, hidden_dim): the top layer after each example's last token
        out, _ = pad_packed_sequence(out_packed, batch_first=True,
                                     total_length=ids.size(1))  # zeros past each length
        if self.pooling == "mean":
            n = lengths.to(device=out.device, dtype=out.dtype).unsqueeze(1)
            return out.sum(dim=1) / n
        steps = torch.arange(ids.size(1), device=out.device)
        pad = (steps.unsqueeze(0) >= lengths.to(out.device).unsqueeze(1)).unsqueeze(-1)
        return out.masked_fill(pad, float("-inf")).amax(dim=1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (batch, T), lengths (batch,) (CPU) -> logits (batch, num_classes)."""
        pooled = self.pooled(ids, lengths)
        p = self.config.dropout
        if p > 0:
            pooled = F.dropout(pooled, p, self.training)
        return self.head(pooled)  # type: ignore[no-any-return]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- data -------------------------------------------------------------------------------------


@dataclass
class ClassifyData:
    """A classification job's examples, already read: ``train`` is the whole dataset when
    ``validation``/``test`` are None (the engine then splits it, stratified by label, by the
    spec's ``val_fraction``/``test_fraction``: :func:`core.classification.stratified_split`).
    ``embeddings``: GloVe-format text when the spec asks for pretrained embeddings."""

    train: list[Example]
    validation: list[Example] | None = None
    test: list[Example] | None = None
    embeddings: str | None = None


def encode_text(tok: Tokenizer, text: str, max_len: int) -> list[int]:
    """The first ``max_len`` token ids of ``text``; ``[0]`` (``<unk>``) for an empty one."""
    ids = tok.encode(text)[:max_len]
    return ids or [0]


def pad_batch(seqs: Sequence[Sequence[int]],
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, lengths)``: ids (batch, max length) int64 on ``device``, padded with 0;
    lengths (batch,) int64 on the CPU (what ``pack_padded_sequence`` wants)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True)
    return ids.to(device), lengths


@dataclass
class Split:
    """One split's encoded examples: ``ids[i]`` the tokens, ``y[i]`` the class index."""

    ids: list[list[int]]
    y: list[int]

    def __len__(self) -> int:
        return len(self.y)


def split_examples(spec: JobSpec, data: ClassifyData
                   ) -> tuple[list[Example], list[Example], list[Example] | None]:
    """``(train, validation, test)`` examples: the separate splits when given, else the
    stratified split of ``data.train`` (test None when there is no test split)."""
    train, val, test = data.train, data.validation, data.test
    if val is None or (test is None and spec.test_fraction > 0):
        rest, held_val, held_test = stratified_split(
            train, 0.0 if val is not None else spec.val_fraction,
            0.0 if test is not None else spec.test_fraction)
        train = rest
        val = val if val is not None else held_val
        test = test if test is not None else (held_test or None)
    return train, val, test


# -- the run's state --------------------------------------------------------------------------


@dataclass
class ClassifyState:
    """Everything about a run's progress besides the weights, the optimizer and the generator
    states; saved in full checkpoints as JSON (``trainer_state``) and restored as a whole."""

    schedule: LRSchedule
    stopper: EarlyStopping
    step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    runtime_before: float = 0.0
    best_step: int | None = None
    best_val_macro_f1: float | None = None
    best_val_loss: float | None = None
    best_val_accuracy: float | None = None
    best_val_per_class: dict[str, Any] | None = None
    best_confusion: list[list[int]] | None = None
    final_val: dict[str, float] | None = None  # {loss, accuracy, macro_f1}
    unvalidated_row: dict[str, Any] | None = None  # a step whose validation a stop cut short
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_json(self, runtime_s: float) -> dict[str, Any]:
        return {
            "step": self.step, "examples_seen": self.examples_seen,
            "tokens_seen": self.tokens_seen, "runtime_s": runtime_s,
            "best_step": self.best_step, "best_val_macro_f1": self.best_val_macro_f1,
            "best_val_loss": self.best_val_loss, "best_val_accuracy": self.best_val_accuracy,
            "best_val_per_class": self.best_val_per_class,
            "best_confusion": self.best_confusion, "final_val": self.final_val,
            "unvalidated_row": self.unvalidated_row,
            "schedule": self.schedule.state(), "early_stopping": self.stopper.state(),
        }

    def load(self, ts: dict[str, Any]) -> None:
        self.step, self.examples_seen = int(ts["step"]), int(ts["examples_seen"])
        self.tokens_seen, self.runtime_before = int(ts["tokens_seen"]), float(ts["runtime_s"])
        self.best_step, self.best_val_macro_f1 = ts["best_step"], ts["best_val_macro_f1"]
        self.best_val_loss, self.best_val_accuracy = ts["best_val_loss"], ts["best_val_accuracy"]
        self.best_val_per_class, self.best_confusion = (ts["best_val_per_class"],
                                                        ts["best_confusion"])
        self.final_val, self.unvalidated_row = ts["final_val"], ts["unvalidated_row"]
        self.schedule.load(ts["schedule"])
        self.stopper.load(ts["early_stopping"])


class EvalInterrupted(Exception):
    """A stop was asked for between evaluation batches."""


# -- checkpoints ------------------------------------------------------------------------------


def classifier_info(labels: Sequence[str], cspec: ClassifySpec) -> dict[str, Any]:
    return {"labels": list(labels), "pooling": cspec.pooling, "max_len": cspec.max_len}


def save_classifier_checkpoint(
    kind: str, spec: JobSpec, model: LSTMClassifier, tokenizer: Tokenizer,
    labels: Sequence[str], trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None, rng_cpu: torch.Tensor | None = None,
    best_state: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """A classifier checkpoint as safetensors bytes (the module docstring gives the layout);
    weights only when ``optimizer`` is None (``best``)."""
    assert spec.classify is not None
    tensors = {f"model.{k}": _cpu(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        tensors.update({f"best.{k}": _cpu(v) for k, v in (best_state or {}).items()})
    state = {**trainer_state, "classifier": classifier_info(labels, spec.classify)}
    return encode_checkpoint(kind, spec, model.config.as_dict(), tokenizer, tensors, state,
                             optimizer, rng_cpu, task="classify")


def _classifier_ckpt(data: bytes | LoadedCheckpoint) -> LoadedCheckpoint:
    ckpt = load_checkpoint(data) if isinstance(data, bytes | bytearray) else data
    if ckpt.spec.task != "classify" or "classifier" not in ckpt.trainer_state:
        raise TrainingError("invalid_checkpoint",
                            "not a classifier checkpoint (its job's task is "
                            f"{ckpt.spec.task!r}, not 'classify')")
    return ckpt


def _model_from(ckpt: LoadedCheckpoint, state: dict[str, torch.Tensor]) -> LSTMClassifier:
    info = ckpt.trainer_state["classifier"]
    model = LSTMClassifier(ckpt.model_config, len(info["labels"]), info["pooling"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError("invalid_checkpoint",
                            f"weights do not fit the classifier: {exc}") from exc
    return model


# -- inference --------------------------------------------------------------------------------


@dataclass
class TextClassifier:
    """A trained classifier ready to label texts (what :func:`load_classifier` returns)."""

    model: LSTMClassifier
    tokenizer: Tokenizer
    labels: list[str]
    max_len: int
    device: torch.device

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(len(texts), num_classes) float32 class probabilities (softmax of the logits), on
        the CPU, in ``labels`` order."""
        self.model.eval()
        seqs = [encode_text(self.tokenizer, t, self.max_len) for t in texts]
        out = torch.empty(len(seqs), len(self.labels))
        for start in range(0, len(seqs), batch_size):
            ids, lengths = pad_batch(seqs[start:start + batch_size], self.device)
            logits = self.model(ids, lengths).float()
            out[start:start + len(lengths)] = torch.softmax(logits, dim=-1).cpu()
        return out

    def classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """``[{"label", "probabilities": {label: p}}]``, one per text, in order; ``label`` is
        the most probable class (the first in ``labels`` order on a tie)."""
        probs = self.probabilities(texts).tolist()
        return [{"label": self.labels[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(self.labels, p, strict=True))} for p in probs]


def load_classifier(data: bytes | LoadedCheckpoint,
                    device: torch.device | str = "cpu") -> TextClassifier:
    """The classifier in a checkpoint (raw bytes or :func:`load_checkpoint`'s result), on
    ``device``, in eval mode. Raises ``TrainingError("invalid_checkpoint")`` for a checkpoint
    that is not a classifier's."""
    ckpt = _classifier_ckpt(data)
    info = ckpt.trainer_state["classifier"]
    model = _model_from(ckpt, ckpt.model_state).to(device).eval()
    return TextClassifier(model, ckpt.tokenizer, list(info["labels"]), int(info["max_len"]),
                          torch.device(device))


def classify_texts(ckpt: TextClassifier | LoadedCheckpoint | bytes,
                   texts: list[str]) -> list[dict[str, Any]]:
    """Label ``texts`` with a trained classifier: ``[{"label": str, "probabilities":
    {label: p}}]`` (probabilities sum to 1), one per text, in order. ``ckpt``: a
    :class:`TextClassifier` (cache it), a loaded checkpoint or its bytes. Raises
    ``TrainingError("invalid_checkpoint")`` for a checkpoint that is not a classifier's."""
    clf = ckpt if isinstance(ckpt, TextClassifier) else load_classifier(ckpt)
    return clf.classify(texts)


# -- training ---------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything a run builds before its first step (:func:`prepare`)."""

    tokenizer: Tokenizer
    labels: list[str]
    train: Split
    validation: Split
    test: Split | None
    weights: torch.Tensor | None  # (num_classes,) class weights, None: unweighted
    model: LSTMClassifier
    coverage: float | None
    init_from: LoadedCheckpoint | None


def _check_splits(train: list[Example], val: list[Example],
                  test: list[Example] | None) -> list[str]:
    labels = sorted({y for _, y in train})
    if not train:
        raise TrainingError("corpus_too_small", "the training split has no examples")
    if len(labels) < 2:
        raise TrainingError("dataset_error", f"the training split has one label only "
                            f"({labels[0]!r}); a classifier needs at least two")
    if not val:
        raise TrainingError("corpus_too_small",
                            "the validation split has no examples: raise val_fraction or give "
                            "a separate 'validation' dataset")
    known = set(labels)
    for name, split in (("validation", val), ("test", test or [])):
        unknown = sorted({y for _, y in split} - known)
        if unknown:
            raise TrainingError("dataset_error",
                                f"the {name} split has labels the training split lacks: "
                                f"{unknown[:5]}")
    return labels


def _class_weights(cspec: ClassifySpec, labels: list[str],
                   train: list[Example]) -> torch.Tensor | None:
    w = cspec.class_weights
    if w == "none":
        return None
    if w == "balanced":
        return torch.tensor(balanced_weights(labels, [y for _, y in train]))
    assert isinstance(w, dict)
    unknown = sorted(set(w) - set(labels))
    if unknown:
        raise TrainingError("invalid_spec", f"classify.class_weights names labels the training "
                            f"split lacks: {unknown[:5]} (its labels: {labels[:20]})")
    return torch.tensor([float(w.get(label, 1.0)) for label in labels])


def prepare(spec: JobSpec, data: ClassifyData, init_from: bytes | None = None,
            resume: LoadedCheckpoint | None = None) -> Prepared:
    """Split, tokenise and encode the examples, and build the model: from the seed, with
    pretrained embeddings (``data.embeddings``), with the encoder of the ``init_from``
    language-model checkpoint, or with ``resume``'s weights (whose tokenizer it then uses).
    Seeds the global generator with ``training.seed`` first. Raises :class:`TrainingError`
    (``dataset_error``, ``corpus_too_small``, ``invalid_spec``, ``invalid_checkpoint``)."""
    assert spec.classify is not None
    cspec, m = spec.classify, spec.model
    random.seed(spec.training.seed)
    torch.manual_seed(spec.training.seed)
    train, val, test = split_examples(spec, data)
    labels = _check_splits(train, val, test)
    tok, source = _tokenizer(spec, train, labels, init_from, resume)
    index = {label: i for i, label in enumerate(labels)}

    def encode(split: list[Example]) -> Split:
        return Split([encode_text(tok, t, cspec.max_len) for t, _ in split],
                     [index[y] for _, y in split])

    config = ModelConfig(tok.vocab_size, m.embed_dim, m.hidden_dim, m.num_layers, m.dropout,
                         False, m.init_range)
    model = LSTMClassifier(config, len(labels), cspec.pooling)
    weights = _class_weights(cspec, labels, train)
    if m.init_range is None and weights is None and resume is None:
        _init_head_bias(model, [index[y] for _, y in train])
    coverage = None
    if m.pretrained_embeddings is not None and resume is None:
        if data.embeddings is None:
            raise TrainingError("invalid_spec", "model.pretrained_embeddings is set but no "
                                "embeddings text was supplied")
        coverage = load_pretrained(model, tok, data.embeddings, False)
    if source is not None:
        copy_encoder(model, source)
    if m.pretrained_embeddings is not None and m.pretrained_embeddings.freeze:
        model.encoder.weight.requires_grad_(False)
    return Prepared(tok, labels, encode(train), encode(val),
                    None if test is None else encode(test), weights, model, coverage, source)


def _tokenizer(spec: JobSpec, train: list[Example], labels: list[str], init_from: bytes | None,
               resume: LoadedCheckpoint | None) -> tuple[Tokenizer, LoadedCheckpoint | None]:
    """The run's tokenizer: the resumed checkpoint's, the ``init_from`` language model's
    (returned with that checkpoint), or one trained on the training texts (one per line)."""
    if resume is not None:
        if resume.trainer_state["classifier"]["labels"] != labels:
            raise TrainingError("invalid_checkpoint", "the checkpoint's labels are not the "
                                "data's")
        return resume.tokenizer, None
    if init_from is not None:
        source = load_checkpoint(init_from)
        if source.spec.task != "lm":
            raise TrainingError("invalid_spec", "init_from must be a language model's "
                                "checkpoint")
        return source.tokenizer, source
    return build_tokenizer(spec.tokenizer, "\n".join(t for t, _ in train)), None


@torch.no_grad()
def _init_head_bias(model: LSTMClassifier, y: list[int]) -> None:
    """The head's bias at the log of the add-one smoothed class priors of the training
    examples, centred (as the language model's output bias: "initialise the final layer's bias
    to the log class priors", Karpathy, "A Recipe for Training Neural Networks", 2019)."""
    counts = torch.bincount(torch.tensor(y), minlength=model.num_classes).double()
    logp = (counts + 1.0).log() - math.log(float(counts.sum()) + model.num_classes)
    model.head.bias.copy_((logp - logp.mean()).to(model.head.bias.dtype))


def copy_encoder(model: LSTMClassifier, source: LoadedCheckpoint) -> None:
    """Copy the language model's embedding and LSTM weights (``encoder.weight``,
    ``lstm.*``) into ``model``. Raises ``TrainingError("invalid_spec")`` when the dimensions
    differ (the API takes them from the checkpoint, so only a hand-made spec can)."""
    a, b = model.config, source.model_config
    mine = (a.vocab_size, a.embed_dim, a.hidden_dim, a.num_layers)
    theirs = (b.vocab_size, b.embed_dim, b.hidden_dim, b.num_layers)
    if mine != theirs:
        raise TrainingError("invalid_spec",
                            f"init_from's encoder (vocab, embed_dim, hidden_dim, num_layers) = "
                            f"{theirs} differs from the spec's {mine}")
    own = model.state_dict()
    keys = [k for k in own if k.startswith(("encoder.", "lstm."))]
    with torch.no_grad():
        for k in keys:
            own[k].copy_(source.model_state[k])


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor,
                           weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy in nats per example, logits (batch, C), y (batch,): with class
    weights ``w``, ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` (``F.cross_entropy`` with
    ``weight=``, its weighted mean)."""
    return F.cross_entropy(logits.float(), y, weight=weights)


class _Run(RunControl):
    """One training run (or resume) of a classifier; see the module docstring."""

    def __init__(self, spec: JobSpec, p: Prepared, hooks: Any, dev: torch.device,
                 resume: LoadedCheckpoint | None) -> None:
        self.spec, self.p, self.hooks, self.dev = spec, p, hooks, dev
        t = spec.training
        self.model = p.model.to(dev)
        self.weights = None if p.weights is None else p.weights.to(dev)
        self.bs = t.batch_size
        self.batches_per_epoch = max(1, math.ceil(len(p.train) / self.bs))
        self.frozen_embedding = not p.model.encoder.weight.requires_grad
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(spec.optimizer, self.params, dev)
        total = t.max_steps
        if t.max_epochs is not None:
            total = min(total, math.ceil(t.max_epochs * self.batches_per_epoch))
        self.state = ClassifyState(LRSchedule(spec.schedule, spec.optimizer.lr, max(1, total)),
                                   EarlyStopping(t.early_stopping))
        if resume is not None:
            if resume.optimizer_state is None:
                raise TrainingError("invalid_checkpoint",
                                    f"a {resume.kind!r} checkpoint holds weights only; resume "
                                    "from a 'last' or 'periodic' checkpoint")
            self.model.load_state_dict({k: v.to(dev) for k, v in resume.model_state.items()})
            self.optimizer.load_state_dict(resume.optimizer_state)  # type: ignore[arg-type]
            self.state.load(resume.trainer_state)
            self.state.best_weights = ({k: v.to(dev) for k, v in resume.best_state.items()}
                                       if resume.best_state else None)
            restore_rng(resume.rng, dev)
        self.start_examples = self.state.examples_seen
        self.clock = Clock()  # training time excludes evaluation, checkpoints, reporting
        self.pending: list[ClassifyStepMetrics] = []
        self.window = (0.0, 0, 0)  # (train time, examples, tokens) at the last flush
        self.halt = None
        self._perm: tuple[int, list[int]] | None = None
        self.last_full_checkpoint = 0.0
        self.vals: dict[int, ClassificationMetrics] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def epoch_of(self, step: int) -> float:
        return step / self.batches_per_epoch

    def batch_indices(self, step: int) -> list[int]:
        return batch_indices(len(self.p.train), self.bs, self.spec.training.seed, step,
                             self._perm_cache)

    def _perm_cache(self, epoch: int, make: Callable[[], list[int]]) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, make())
        return self._perm[1]

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> StopReason:
        self.model.train()
        stop = self._budget_stop(self.state.step) if self.state.step > 0 else None
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

    def _set_frozen(self, frozen: bool) -> None:
        for q in self.model.encoder_parameters():
            q.requires_grad_(not frozen and not (self.frozen_embedding
                                                 and q is self.model.encoder.weight))

    def _train_step(self, step: int) -> None:
        t, c = self.spec.training, self.spec.classify
        assert c is not None
        frozen = step <= c.freeze_encoder_steps
        self._set_frozen(frozen)
        lr = self.state.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = self.batch_indices(step)
        seqs = [self.p.train.ids[i] for i in idx]
        ids, lengths = pad_batch(seqs, self.dev)
        y = torch.tensor([self.p.train.y[i] for i in idx], device=self.dev)
        rng_before = torch.get_rng_state()
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.bfloat16 if t.precision == "bf16" else None
        with torch.autocast(self.dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = self.model(ids, lengths)  # (batch, num_classes)
        loss = weighted_cross_entropy(logits, y, self.weights)
        loss.backward()
        grads = [q for q in self.params if q.grad is not None]
        if t.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([q.grad for q in grads if q.grad is not None])
        loss_v, norm_v = float(loss.detach()), float(norm)
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            self._fail(step, rng_before, loss_v, norm_v)
        self.optimizer.step()
        s = self.state
        s.step = step
        s.examples_seen += len(idx)
        s.tokens_seen += int(lengths.sum())
        self.pending.append(ClassifyStepMetrics(
            step=step, epoch=self.epoch_of(step), train_loss=loss_v, lr=lr, grad_norm=norm_v,
            examples_per_s=0.0, tokens_per_s=0.0, elapsed_s=self.clock.elapsed(),
            examples_seen=s.examples_seen, tokens_seen=s.tokens_seen, encoder_frozen=frozen))

    def _after_step(self, step: int) -> StopReason | None:
        t = self.spec.training
        stop = self._budget_stop(step)
        if step % t.eval_interval == 0 or stop is not None:
            try:
                if self._validate(step):
                    stop = stop or "early_stopping"
            except EvalInterrupted:
                row = self.pending[-1]
                self.state.unvalidated_row = row.as_dict()
                return "cancelled"
        if self.periodic_due(step, stop is not None):
            self._checkpoint(CheckpointKind.PERIODIC)
        if step % t.log_interval == 0 or stop is not None:
            self._flush()
        if stop is None and self.poll():
            stop = "cancelled"
        return stop

    def _finish_interrupted_validation(self, stop: StopReason | None) -> StopReason | None:
        row = self.state.unvalidated_row
        assert row is not None
        try:
            early = self._validate(self.state.step)
        except EvalInterrupted:
            return "cancelled"
        self.state.unvalidated_row = None
        self.pending.append(ClassifyStepMetrics(**row))
        self._attach_validation(self.pending[-1])
        self._flush(rates=False)
        return stop or ("early_stopping" if early else None)

    def _budget_stop(self, step: int) -> StopReason | None:
        t = self.spec.training
        if step >= t.max_steps:
            return "max_steps"
        if t.max_epochs is not None and self.epoch_of(step) >= t.max_epochs:
            return "max_epochs"
        if (t.max_runtime_s is not None
                and self.runtime_s() >= t.max_runtime_s):
            return "max_runtime_s"
        return None

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, split: Split) -> ClassificationMetrics:
        """The model's metrics on ``split`` (eval mode; batches of ``batch_size`` examples of
        similar length). Raises :class:`EvalInterrupted` when :meth:`poll` says stop."""
        return evaluate_split(self.model, split, self.p.labels, self.bs, self.dev,
                              self.weights, self.poll,
                              torch.bfloat16 if self.spec.training.precision == "bf16"
                              else None)

    def _validate(self, step: int) -> bool:
        """Evaluate the validation split; a new best (macro-F1, ties to the lower loss) saves
        ``best``. True: stop early."""
        s = self.state
        with self.site("evaluate", step):
            res: ClassificationMetrics = self.clock.timed(self.evaluate, self.p.validation)
        self.model.train()
        self.vals[step] = res
        s.final_val = {"loss": res.loss, "accuracy": res.accuracy, "macro_f1": res.macro_f1}
        s.schedule.on_eval(res.loss)
        stop = s.stopper.on_eval(-res.macro_f1)
        better = (s.best_val_macro_f1 is None or res.macro_f1 > s.best_val_macro_f1
                  or (res.macro_f1 == s.best_val_macro_f1
                      and res.loss < (s.best_val_loss or math.inf)))
        if better:
            s.best_step, s.best_val_macro_f1, s.best_val_loss = step, res.macro_f1, res.loss
            s.best_val_accuracy, s.best_confusion = res.accuracy, res.confusion
            s.best_val_per_class = res.per_class_json()
            if self.p.test is not None:
                s.best_weights = {k: v.detach().clone()
                                  for k, v in self.model.state_dict().items()}
            self._checkpoint(CheckpointKind.BEST)
        return stop

    def _attach_validation(self, row: ClassifyStepMetrics) -> None:
        val = self.vals.pop(row.step, None)
        if val is not None:
            row.val_loss, row.val_accuracy = val.loss, val.accuracy
            row.val_macro_f1, row.val_per_class = val.macro_f1, val.per_class_json()

    # -- checkpoints and metrics -----------------------------------------------------------------
    def _checkpoint(self, kind: CheckpointKind, rng_cpu: torch.Tensor | None = None) -> None:
        self._flush()
        t0 = time.perf_counter()
        s = self.state
        full = kind != CheckpointKind.BEST
        with self.site("checkpoint", s.step):
            data = save_classifier_checkpoint(
                kind, self.spec, self.model, self.p.tokenizer, self.p.labels,
                s.to_json(self.runtime_s()),
                optimizer=self.optimizer if full else None, rng_cpu=rng_cpu,
                best_state=s.best_weights if full else None)
            metrics: dict[str, Any] = {"step": s.step}
            if s.final_val is not None:
                metrics.update(val_loss=s.final_val["loss"],
                               val_macro_f1=s.final_val["macro_f1"])
            if s.best_val_macro_f1 is not None:
                metrics["best_val_macro_f1"] = s.best_val_macro_f1
            self.hooks.on_checkpoint(CheckpointBlob(kind, s.step, data, metrics))
        if full:
            self.last_full_checkpoint = self.clock.elapsed()
        self.clock.excluded += time.perf_counter() - t0

    def _flush(self, rates: bool = True) -> None:
        """Report the pending rows (with their validation values and throughput)."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        now = self.clock.train_time()
        t_prev, ex_prev, tok_prev = self.window
        span = max(now - t_prev, 1e-9)
        last = self.pending[-1]
        for row in self.pending:
            self._attach_validation(row)
            if rates:
                row.examples_per_s = (last.examples_seen - ex_prev) / span
                row.tokens_per_s = (last.tokens_seen - tok_prev) / span
        self.hooks.on_metrics(list(self.pending))
        self.window = (now, last.examples_seen, last.tokens_seen)
        self.pending = []
        self.clock.excluded += time.perf_counter() - t0

    def _fail(self, step: int, rng_before: torch.Tensor, loss: float, norm: float) -> None:
        """The step's loss or gradient is not finite: keep the state after ``step - 1`` as
        ``last`` (no update was made) and raise ``non_finite_loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        self._checkpoint(CheckpointKind.LAST, rng_cpu=rng_before)
        raise TrainingError(
            "non_finite_loss",
            f"the training loss ({loss}) or gradient norm ({norm}) is not finite at step "
            f"{step}; the last good checkpoint (step {step - 1}) was kept. Lower optimizer.lr, "
            f"set training.grad_clip, or check the data.", step, phase="train")


def batch_indices(n: int, batch_size: int, seed: int, step: int,
                  cache: Callable[[int, Callable[[], list[int]]], list[int]] | None = None
                  ) -> list[int]:
    """The training examples of 1-based ``step``: epoch ``e = (step - 1) // B`` (B =
    ceil(n / batch_size) batches per epoch, the last one possibly smaller) takes its batches in
    order from a permutation of ``range(n)`` drawn from a generator seeded with
    ``(seed, e)``."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, pos = divmod(step - 1, per_epoch)

    def make() -> list[int]:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        return [int(i) for i in torch.randperm(n, generator=g)]

    perm = cache(epoch, make) if cache is not None else make()
    return perm[pos * batch_size:(pos + 1) * batch_size]


@torch.no_grad()
def evaluate_split(model: LSTMClassifier, split: Split, labels: Sequence[str],
                   batch_size: int, device: torch.device,
                   weights: torch.Tensor | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> ClassificationMetrics:
    """Predictions of ``model`` (put in eval mode) on ``split`` and their metrics
    (:func:`core.classification.classification_metrics`); the loss is the split's mean
    cross-entropy in nats per example, weighted by ``weights`` as in training. Examples are
    batched in length order (less padding; the metrics do not depend on the order). Raises
    :class:`EvalInterrupted` when ``should_stop()`` is True before a batch."""
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
    pred = [0] * len(split)
    num, den = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            raise EvalInterrupted
        idx = order[start:start + batch_size]
        ids, lengths = pad_batch([split.ids[i] for i in idx], device)
        y = torch.tensor([split.y[i] for i in idx], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model(ids, lengths)
        nll = F.cross_entropy(logits.float(), y, reduction="none")
        w = torch.ones_like(nll) if weights is None else weights[y]
        num += float((w * nll).sum())
        den += float(w.sum())
        for i, p in zip(idx, logits.argmax(dim=-1).tolist(), strict=True):
            pred[i] = p
    return classification_metrics(split.y, pred, labels, num / den)


def train_classifier(spec: JobSpec, data: ClassifyData, hooks: Any,
                     resume_from: bytes | None = None, device: str | None = None,
                     init_from: bytes | None = None) -> ClassificationResult:
    """Train the classifier ``spec`` (``task: "classify"``) describes on ``data``, reporting
    :class:`core.classification.ClassifyStepMetrics` rows and checkpoints through ``hooks``
    (a :class:`core.contract.TrainingHooks`).

    ``resume_from``: a ``last``/``periodic`` checkpoint of the same spec and data.
    ``init_from``: the bytes of the language-model checkpoint ``spec.init_from`` names (its
    tokenizer and encoder weights are used; ignored on a resume). ``device`` overrides
    ``spec.training.device``. Raises :class:`TrainingError` (``dataset_error``,
    ``corpus_too_small``, ``invalid_spec``, ``invalid_checkpoint``, ``non_finite_loss``,
    ``out_of_memory``, ``timeout``, ``device_unavailable``) with its phase and step."""
    if spec.task != "classify" or spec.classify is None:
        raise TrainingError("invalid_spec", "train_classifier needs a spec with task "
                            "'classify'")
    with failures_explained():
        dev = resolve_device(device or spec.training.device)
        if spec.training.num_threads is not None:
            torch.set_num_threads(spec.training.num_threads)
        resume = _classifier_ckpt(resume_from) if resume_from is not None else None
        p = prepare(spec, data, None if resume is not None else init_from, resume)
        log.info("classify: %d train / %d validation / %s test examples, %d labels, vocab %d",
                 len(p.train), len(p.validation), None if p.test is None else len(p.test),
                 len(p.labels), p.tokenizer.vocab_size)
        run = _Run(spec, p, hooks, dev, resume)
        stop_reason = run.run()
        test = None
        try:
            if p.test is not None:
                with run.site("evaluate", run.state.step):
                    if run.state.best_weights is not None:
                        run.model.load_state_dict(run.state.best_weights)
                    test = run.clock.timed(run.evaluate, p.test)
        except EvalInterrupted:
            if run.halt == "timeout":
                raise run.timeout_error() from None
            test, stop_reason = None, "cancelled"
        return _result(run, stop_reason, test, spec)


def _result(run: _Run, stop_reason: StopReason, test: ClassificationMetrics | None,
            spec: JobSpec) -> ClassificationResult:
    s, p = run.state, run.p
    final = s.final_val or {}
    train_time = max(run.clock.final_train_time or run.clock.train_time(), 1e-9)
    return ClassificationResult(
        task="classify",
        steps=s.step,
        epochs=run.epoch_of(s.step),
        examples_seen=s.examples_seen,
        tokens_seen=s.tokens_seen,
        duration_s=run.clock.elapsed(),
        train_examples_per_s=(s.examples_seen - run.start_examples) / train_time,
        stop_reason=stop_reason,
        labels=p.labels,
        num_examples={"train": len(p.train), "validation": len(p.validation),
                      "test": 0 if p.test is None else len(p.test)},
        class_weights=None if p.weights is None else [float(w) for w in p.weights],
        final_val_loss=final.get("loss"),
        final_val_accuracy=final.get("accuracy"),
        final_val_macro_f1=final.get("macro_f1"),
        best_step=s.best_step,
        best_val_loss=s.best_val_loss,
        best_val_accuracy=s.best_val_accuracy,
        best_val_macro_f1=s.best_val_macro_f1,
        best_val_per_class=s.best_val_per_class,
        confusion_matrix=s.best_confusion,
        vocab_size=p.tokenizer.vocab_size,
        num_params=run.model.num_params(),
        init_from=None if spec.init_from is None else spec.init_from.model_dump(),
        test_loss=None if test is None else test.loss,
        test_accuracy=None if test is None else test.accuracy,
        test_macro_f1=None if test is None else test.macro_f1,
        test_per_class=None if test is None else test.per_class_json(),
        test_confusion_matrix=None if test is None else test.confusion,
        embedding_coverage=p.coverage,
    )

