"""Token tensors, batchify into contiguous streams, truncated-BPTT batches.

As PyTorch's ``examples/word_language_model`` (and the reference loop): the training token
stream is cut into ``batch_size`` contiguous streams, ``(batch, n)``, and step ``b`` reads
columns ``[pos, pos + seq_len]`` with ``pos = (b mod batches_per_epoch) * seq_len``. The data
position is therefore a pure function of the global batch index, which is what a checkpoint
saves for exact resume; an epoch ends when the next window would run past the stream (the
hidden state is reset there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.contract import TrainingError
from core.spec import JobSpec
from core.splits import SplitTexts, corpus_shortfall
from worker.engine.tokenizers import Tokenizer


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (batch_size, N // batch_size); the trailing N mod batch_size tokens are dropped
    (training only: evaluation uses :func:`eval_streams`)."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).contiguous()


@dataclass
class TrainBatches:
    """Truncated-BPTT windows over ``data`` (batch, n), already on the training device."""

    data: torch.Tensor
    seq_len: int

    @property
    def batches_per_epoch(self) -> int:
        return (self.data.size(1) - 1) // self.seq_len

    @property
    def tokens_per_batch(self) -> int:
        return self.data.size(0) * self.seq_len

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch ``index`` (0-based, global across epochs): inputs and targets, each
        (batch, seq_len) int64, and whether it starts an epoch (reset the hidden state)."""
        k = index % self.batches_per_epoch
        pos = k * self.seq_len
        x = self.data[:, pos : pos + self.seq_len]
        y = self.data[:, pos + 1 : pos + 1 + self.seq_len]
        return x, y, k == 0

    def epoch_of(self, batches_done: int) -> float:
        """Fractional passes over the training split after ``batches_done`` batches."""
        return batches_done / self.batches_per_epoch


def stream_bounds(n_targets: int, streams: int) -> list[int]:
    """Where :func:`eval_streams` cuts ``n_targets`` targets into ``streams`` contiguous
    streams: ``streams + 1`` integers, stream ``i`` covering targets ``[b[i], b[i + 1])``.

    ``b[i] = round(i * n_targets / streams)`` in exact integer arithmetic, ties to even (the
    rule of Python's ``round`` and ``torch.round``): the values ``torch.linspace(0, n_targets,
    streams + 1).round()`` stands for, without its float32 error, which past 2**24 made a stream
    one longer than ``ceil(n_targets / streams)`` (and the last bound miss ``n_targets``).
    Hence ``b[0] == 0``, ``b[streams] == n_targets``, non-decreasing, and every stream holds
    ``floor(n / streams)`` or ``ceil(n / streams)`` targets. Pure Python ints: exact for any
    size. Raises ``ValueError`` for ``n_targets < 0`` or ``streams < 1``.
    """
    if n_targets < 0 or streams < 1:
        raise ValueError(f"stream_bounds needs n_targets >= 0 and streams >= 1, "
                         f"got {n_targets} and {streams}")
    bounds = []
    for i in range(streams + 1):
        q, r = divmod(i * n_targets, streams)
        if 2 * r > streams or (2 * r == streams and q % 2 == 1):  # round half to even
            q += 1
        bounds.append(q)
    return bounds


def eval_streams(ids: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a split of N tokens into at most ``num_streams`` contiguous streams such that every
    token except the first is a target exactly once (N - 1 targets, none dropped).

    Returns inputs and targets, each (streams, L) int64, L = ceil((N - 1) / streams); the
    shorter streams are padded with input 0 and target -100 (``ignore_index``). Each stream
    starts from a zero hidden state, as batchified streams do in the reference loop. The
    streams are cut at :func:`stream_bounds` (exact integers, any N).
    """
    n_targets = ids.numel() - 1
    s = max(1, min(num_streams, n_targets))
    length = -(-n_targets // s)
    x = torch.zeros(s, length, dtype=torch.long)
    y = torch.full((s, length), -100, dtype=torch.long)
    bounds = stream_bounds(n_targets, s)
    for i in range(s):
        a, b = bounds[i], bounds[i + 1]
        x[i, : b - a] = ids[a:b]
        y[i, : b - a] = ids[a + 1 : b + 1]
    return x, y


@dataclass
class Corpus:
    """The encoded splits: ``train`` (N,) and the evaluation splits (N,), int64 on the CPU."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor | None


def encode_splits(spec: JobSpec, parts: SplitTexts, tok: Tokenizer) -> Corpus:
    """Encode each split; raises ``TrainingError("corpus_too_small")`` with the numbers."""

    def enc(text: str) -> torch.Tensor:
        return torch.tensor(tok.encode(text), dtype=torch.long)

    train, val = enc(parts.train), enc(parts.validation)
    test = None if parts.test is None else enc(parts.test)
    shortfall = corpus_shortfall(spec, {"train": train.numel(), "validation": val.numel(),
                                        "test": None if test is None else test.numel()})
    if shortfall is not None:
        raise TrainingError("corpus_too_small", shortfall.message)
    return Corpus(train, val, test)
