"""Token tensors, batchify into contiguous streams, truncated-BPTT batches.

As PyTorch's ``examples/word_language_model`` (and the reference loop): the training token
stream is cut into ``batch_size`` contiguous streams, ``(batch, n)``, and step ``b`` reads
columns ``[pos, pos + seq_len]`` with ``pos = (b mod batches_per_epoch) * seq_len``. The data
position is therefore a pure function of the global batch index, which is what a checkpoint
saves for exact resume; an epoch ends when the next window would run past the stream (the
hidden state is reset there).

The splits stay in the dtype of their token files (:mod:`worker.engine.tokencache`: ``uint16``
or ``uint32``, usually memory-mapped): as torch ``int16``/``int32`` tensors holding the same
bits (:func:`token_tensor`; torch's unsigned 16/32-bit types support few operators), and only
each window a step or an evaluation reads is widened to ``int64`` (:func:`as_long`), as
nanoGPT's ``train.py`` converts each batch of its ``np.memmap``. A corpus thus costs 2 (or 4)
bytes per token, never the 8 of an ``int64`` copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.contract import TrainingError
from core.spec import JobSpec
from core.splits import corpus_shortfall
from worker.engine.tokencache import PreparedCorpus

_SIGNED = {np.dtype("<u2"): np.dtype("<i2"), np.dtype("<u4"): np.dtype("<i4")}
_MASKS = {torch.int16: 0xFFFF, torch.int32: 0xFFFFFFFF}


def token_tensor(ids: np.ndarray) -> torch.Tensor:
    """A (N,) ``uint16``/``uint32`` array (an ``np.memmap`` too) as a torch tensor sharing its
    memory: ``int16``/``int32`` with the same bits (read them with :func:`as_long`). Other
    integer arrays are shared as they are. No copy."""
    signed = _SIGNED.get(ids.dtype)
    return torch.from_numpy(ids.view(signed) if signed is not None else ids)


def as_long(ids: torch.Tensor) -> torch.Tensor:
    """Token ids as ``int64`` (same shape and device): ``int16``/``int32`` tensors from
    :func:`token_tensor` are read as unsigned (masked), ``int64`` is returned as is."""
    mask = _MASKS.get(ids.dtype)
    out = ids.long()
    return out & mask if mask is not None else out


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (batch_size, N // batch_size), a view of ``ids`` (any dtype, no copy); the
    trailing N mod batch_size tokens are dropped (training only: evaluation uses
    :func:`eval_windows`)."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n)


@dataclass
class TrainBatches:
    """Truncated-BPTT windows over ``data`` (batch, n), already on the training device, in
    its token-file dtype (see :func:`token_tensor`) or ``int64``. ``world_size``: the number
    of data-parallel processes each training on a ``data`` of this shape (their rows of the
    same batchified split, :mod:`worker.engine.distributed`); the token counts are global."""

    data: torch.Tensor
    seq_len: int
    world_size: int = 1

    @property
    def batches_per_epoch(self) -> int:
        return (self.data.size(1) - 1) // self.seq_len

    @property
    def tokens_per_batch(self) -> int:
        """Training tokens per step, over all processes."""
        return self.data.size(0) * self.seq_len * self.world_size

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch ``index`` (0-based, global across epochs): inputs and targets, each
        (batch, seq_len) int64, and whether it starts an epoch (reset the hidden state)."""
        k = index % self.batches_per_epoch
        pos = k * self.seq_len
        x = as_long(self.data[:, pos : pos + self.seq_len])
        y = as_long(self.data[:, pos + 1 : pos + 1 + self.seq_len])
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


def eval_windows(ids: torch.Tensor, num_streams: int,
                 seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of :func:`eval_streams`, built one at a time from ``ids`` (N,) (any
    integer dtype, see :func:`as_long`; on any device) without an ``int64`` copy of the split:
    yields inputs and targets, each (streams, w) int64 on ``ids``' device, equal to
    ``x[:, pos : pos + seq_len]`` and ``y[:, pos : pos + seq_len]`` of ``eval_streams(ids,
    num_streams)`` for ``pos = 0, seq_len, 2 * seq_len, ...`` (``w = seq_len`` but for the
    last). Needs N >= 2."""
    n_targets = ids.numel() - 1
    s = max(1, min(num_streams, n_targets))
    length = -(-n_targets // s)
    bounds = torch.tensor(stream_bounds(n_targets, s), dtype=torch.long, device=ids.device)
    starts, lengths = bounds[:-1].view(-1, 1), (bounds[1:] - bounds[:-1]).view(-1, 1)
    for pos in range(0, length, seq_len):
        offsets = torch.arange(pos, min(pos + seq_len, length), device=ids.device).view(1, -1)
        valid = offsets < lengths  # (s, w)
        index = torch.where(valid, starts + offsets, 0)
        x = as_long(ids[index]).masked_fill_(~valid, 0)
        y = as_long(ids[index + 1]).masked_fill_(~valid, -100)
        yield x, y


@dataclass
class Corpus:
    """The splits as (N,) token tensors on the CPU: views of the prepared token files
    (``int16``/``int32`` bits of ``uint16``/``uint32`` ids, see :func:`token_tensor`) or
    ``int64``."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor | None


def corpus_from_prepared(spec: JobSpec, prepared: PreparedCorpus) -> Corpus:
    """The prepared splits as tensors sharing their memory (no copy). Raises
    ``TrainingError("corpus_too_small")`` with the numbers when a split is too small."""
    shortfall = corpus_shortfall(spec, prepared.token_counts())
    if shortfall is not None:
        raise TrainingError("corpus_too_small", shortfall.message)
    s = prepared.splits
    return Corpus(token_tensor(s["train"]), token_tensor(s["validation"]),
                  token_tensor(s["test"]) if "test" in s else None)
