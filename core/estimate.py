"""The size of a job before it runs: parameters of its model and an estimate of its training
memory. Pure Python (no torch), so the API checks every submission with it
(``app.jobs``: 422 ``job_too_large``, docs/security.md "Quotas and resource limits").

Parameters (exact for a given vocabulary size ``V``; ``tests/engine/test_estimate.py`` checks
them against ``sum(p.numel())`` of :class:`worker.engine.model.LSTMLanguageModel`). The shapes
are PyTorch's (https://pytorch.org/docs/stable/generated/torch.nn.LSTM.html, "Variables"):

- ``nn.Embedding(V, E)``: ``V x E``.
- ``nn.LSTM(E, H, L)`` (``bias=True``, no projection): layer ``k`` has ``weight_ih_lk``
  ``(4H, in_k)``, ``weight_hh_lk`` ``(4H, H)``, ``bias_ih_lk`` and ``bias_hh_lk`` ``(4H)``, with
  ``in_0 = E`` and ``in_k = H`` above: ``4 (in_k H + H H + 2 H)`` per layer.
- ``nn.Linear(H, V)``: ``H x V`` weight and ``V`` bias; with tied weights the weight *is* the
  embedding matrix (counted once, as ``model.parameters()`` yields it once), only the bias is
  added.

The vocabulary is known only once the tokenizer is trained on the training split, so the API
uses :func:`vocab_bound`, an upper bound from the spec and the dataset's text statistics.

Training memory (bytes; an estimate of the peak of one optimizer step, not a measurement):

- weights ``4P`` (fp32 parameters; ``bf16`` runs under autocast with fp32 master weights),
  gradients ``4P``, optimizer state ``8P`` for Adam/AdamW (``exp_avg``, ``exp_avg_sq``),
  ``4P`` for SGD with momentum (the momentum buffer), 0 for plain SGD;
- activations kept for the backward pass of a ``B x T`` batch (``N = B T`` positions, ``a`` bytes
  per activation: 4 for fp32, 2 for bf16): the embedding output ``4NE``; per LSTM layer its
  gates and states ``6NH a`` (four gates, cell and hidden); a dropout site keeps its output
  and a one-byte mask; the logits ``NV a``, their fp32 log-softmax and its gradient ``8NV``
  (plus the fp32 copy ``4NV`` of bf16 logits), the term that dominates for large vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.spec import JobSpec
from core.textstats import TextStats

#: Unicode scalar values by UTF-8 length: 1 byte (U+0000-U+007F), 2 bytes (U+0080-U+07FF),
#: 3 bytes (U+0800-U+FFFF without the 2048 surrogates), 4 bytes (U+10000-U+10FFFF).
_UTF8_CODE_POINTS = ((1, 128), (2, 1920), (3, 61440), (4, 1_048_576))

#: Byte-level BPE starts from an alphabet of the 256 byte values (``ByteLevel.alphabet()``).
BPE_ALPHABET = 256

DeviceClass = Literal["cpu", "cuda"]


def lstm_params(embed_dim: int, hidden_dim: int, num_layers: int) -> int:
    """Parameters of ``nn.LSTM(embed_dim, hidden_dim, num_layers)`` (biases included)."""
    h = hidden_dim
    total = 0
    for layer in range(num_layers):
        inp = embed_dim if layer == 0 else h
        total += 4 * (inp * h + h * h + 2 * h)
    return total


def _is_classify(spec: JobSpec) -> bool:
    return spec.task == "classify"


def param_count(spec: JobSpec, vocab_size: int, num_labels: int | None = None) -> int:
    """Parameters of the spec's model over a vocabulary of ``vocab_size`` tokens (a tied
    decoder weight counted once), as ``sum(p.numel() for p in model.parameters())``.

    A ``task: "classify"`` job has no decoder: its head is ``nn.Linear(H, num_labels)``
    (``H x num_labels`` weight and ``num_labels`` bias,
    :class:`worker.engine.classifier.LSTMClassifier`); ``num_labels`` is then required
    (ValueError without it)."""
    m = spec.model
    v = vocab_size
    if _is_classify(spec):
        if num_labels is None:
            raise ValueError("a classify job's parameters need num_labels")
        head = m.hidden_dim * num_labels + num_labels
    else:
        head = v if m.tie_weights else m.hidden_dim * v + v
    return v * m.embed_dim + lstm_params(m.embed_dim, m.hidden_dim, m.num_layers) + head


def _optimizer_copies(spec: JobSpec) -> int:
    """fp32 copies of the parameters the optimizer keeps (torch.optim Adam/AdamW: ``exp_avg``
    and ``exp_avg_sq``; SGD: a momentum buffer when momentum > 0)."""
    o = spec.optimizer
    if o.name in ("adam", "adamw"):
        return 2
    return 1 if o.momentum > 0 else 0


def activation_bytes(spec: JobSpec, vocab_size: int, num_labels: int | None = None) -> int:
    """Activations kept for the backward pass of one ``batch_size x seq_len`` step (bytes).
    A classify job: ``batch_size x classify.max_len`` positions, and ``batch_size x
    num_labels`` logits in place of the ``N x V`` ones."""
    t, m = spec.training, spec.model
    classify = _is_classify(spec) and spec.classify is not None
    n = t.batch_size * (spec.classify.max_len if classify and spec.classify else t.seq_len)
    a = 2 if t.precision == "bf16" else 4
    e, h, v = m.embed_dim, m.hidden_dim, vocab_size
    total = 4 * n * e  # embedding output (fp32: nn.Embedding is not autocast)
    total += m.num_layers * 6 * n * h * a  # gates (4H) + cell and hidden state per layer
    if m.dropout > 0:  # embedding, between layers, LSTM output: output + 1-byte mask
        total += n * e * (a + 1) + m.num_layers * n * h * (a + 1)
    if classify:  # pooled: one row of num_labels logits per example
        n, v = t.batch_size, num_labels or 0
    total += n * v * a + 8 * n * v  # logits, fp32 log-softmax and its gradient
    if a == 2:
        total += 4 * n * v  # the fp32 copy of bf16 logits the loss takes
    return total


@dataclass(frozen=True)
class TrainMemory:
    """The parts of one training step's estimated peak memory (bytes; module docstring)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int  # of one batch_size x seq_len step

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations


def train_memory(spec: JobSpec, vocab_size: int, num_labels: int | None = None) -> TrainMemory:
    """Estimated peak memory of one training step, by part (module docstring;
    ``num_labels``: a classify job's, as :func:`param_count`)."""
    p = param_count(spec, vocab_size, num_labels)
    return TrainMemory(weights=4 * p, gradients=4 * p,
                       optimizer_state=4 * p * _optimizer_copies(spec),
                       activations=activation_bytes(spec, vocab_size, num_labels))


def train_memory_bytes(spec: JobSpec, vocab_size: int, num_labels: int | None = None) -> int:
    """Estimated peak memory of one training step (bytes): weights, gradients, optimizer state
    and activations (module docstring; :func:`train_memory` gives the parts)."""
    return train_memory(spec, vocab_size, num_labels).total


def _distinct_chars_bound(stats: TextStats) -> int:
    """The most distinct characters a text with these statistics can hold: no more than its
    characters, and each character beyond the 128 one-byte ones costs extra UTF-8 bytes
    (``num_bytes - num_chars`` of them in all), filled greedily from the shortest encodings."""
    extra = max(0, stats.num_bytes - stats.num_chars)
    distinct = 0
    for length, count in _UTF8_CODE_POINTS:
        cost = length - 1
        take = count if cost == 0 else min(count, extra // cost)
        distinct += take
        extra -= take * cost
    return min(stats.num_chars, distinct)


@dataclass(frozen=True)
class VocabBound:
    size: int
    why: str  # where the bound comes from, for the user's message


def vocab_bound(spec: JobSpec, train: TextStats,
                exact: dict[str, Any] | None = None) -> VocabBound:
    """An upper bound on the vocabulary the engine's tokenizer
    (``worker.engine.tokenizers.build_tokenizer``) makes of a training text with statistics
    ``train`` (the whole dataset's statistics bound its training split's).

    - ``char``: ``<unk>`` plus the distinct characters (:func:`_distinct_chars_bound`).
    - ``word``: ``<unk>``, ``<eos>`` plus the words seen at least ``min_freq`` times
      (at most ``num_words // min_freq``), cut at ``max_vocab``.
    - ``bpe``: ``vocab_size``, but never below the 256-byte initial alphabet.

    ``exact``: the dataset's statistics per tokenizer kind (``datasets.stats``,
    :mod:`core.datasetstats`, counted over the whole dataset, so the exact vocabulary of a
    tokenizer trained on all of it and a bound for a training split), used when present:
    ``char``: its ``vocab``; ``word``: its ``vocab`` (``min_freq`` 1), less the
    ``singletons`` with ``min_freq`` 2 (exact), the smaller of that and the bound above with
    ``min_freq`` > 2, then cut at ``max_vocab`` as the tokenizer cuts; not when the word
    counts were ``truncated``. ``bpe`` keeps ``vocab_size`` (the statistics hold an estimate).
    """
    tok = spec.tokenizer
    if exact:
        got = _exact_vocab(spec, train, exact)
        if got is not None:
            return got
    if tok.kind == "char":
        return VocabBound(1 + _distinct_chars_bound(train),
                          "<unk> plus at most one id per distinct character of the dataset")
    if tok.kind == "word":
        words = 2 + train.num_words // tok.min_freq
        if tok.max_vocab is not None and tok.max_vocab < words:
            return VocabBound(tok.max_vocab, "tokenizer.max_vocab")
        return VocabBound(words, "<unk>, <eos> and at most every word of the dataset seen "
                                 "min_freq times (set tokenizer.max_vocab to bound it)")
    return VocabBound(max(tok.vocab_size, BPE_ALPHABET), "tokenizer.vocab_size")


def _exact_vocab(spec: JobSpec, train: TextStats, exact: dict[str, Any]) -> VocabBound | None:
    tok = spec.tokenizer
    entry = exact.get(tok.kind)
    if not isinstance(entry, dict) or not isinstance(entry.get("vocab"), int):
        return None
    if tok.kind == "char":
        return VocabBound(int(entry["vocab"]), "<unk> plus the dataset's distinct characters "
                                               "(its statistics)")
    if tok.kind != "word" or entry.get("truncated"):
        return None
    size = int(entry["vocab"])
    if tok.min_freq == 2 and isinstance(entry.get("singletons"), int):
        size -= int(entry["singletons"])
    elif tok.min_freq > 2:
        size = min(size - int(entry.get("singletons") or 0),
                   2 + train.num_words // tok.min_freq)
    why = "<unk>, <eos> and the dataset's distinct words seen min_freq times (its statistics)"
    if tok.max_vocab is not None and tok.max_vocab < size:
        return VocabBound(max(2, tok.max_vocab), "tokenizer.max_vocab")
    return VocabBound(size, why)


def device_class(device: str) -> DeviceClass | None:
    """``cpu`` or ``cuda`` for a spec's ``training.device``; None for ``auto`` (either)."""
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        return "cuda"
    return None
