"""Token-weighted evaluation over a whole split.

The loss is ``sum of per-token cross-entropies / number of predicted tokens`` (nats/token),
accumulated on the device and read once; never a mean of batch means. Every token of the split
except the first is predicted exactly once (see :func:`worker.engine.data.eval_streams`, whose
windows :func:`worker.engine.data.eval_windows` builds one at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.data import eval_windows
from worker.engine.model import Hidden, LSTMLanguageModel

LN2 = math.log(2.0)


def perplexity(loss: float) -> float:
    """exp(loss), or ``inf`` when that overflows a float (never raises)."""
    if math.isnan(loss):
        return math.nan
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class EvalInterrupted(Exception):
    """An evaluation stopped between two batches because its ``should_stop`` said so."""


@dataclass
class EvalResult:
    loss: float  # nats/token
    ppl: float
    bpc: float | None  # bits per character (char tokenizer: one token per character)
    accuracy: float  # top-1 next-token accuracy in [0, 1]
    top5_accuracy: float
    tokens: int  # predicted tokens


@torch.no_grad()
def evaluate(model: LSTMLanguageModel, ids: torch.Tensor, batch_size: int, seq_len: int,
             device: torch.device, char_level: bool = False,
             autocast_dtype: torch.dtype | None = None,
             should_stop: Callable[[], bool] | None = None,
             max_tokens: int | None = None) -> EvalResult:
    """Evaluate ``model`` on the token stream ``ids`` (N,), N >= 2: ``int64``, or a token
    file's ``int16``/``int32`` view (:func:`worker.engine.data.token_tensor`), on the CPU.

    The split is cut into ``batch_size`` streams (each from a zero hidden state) read in
    windows of ``seq_len`` with the hidden state carried (:func:`eval_windows`: each window is
    widened to ``int64`` when it is read, so a split is never copied whole as ``int64``; on
    CUDA the split is moved to the device once in its own dtype). ``bpc = loss / ln 2`` when
    ``char_level`` (one token per character), else None. Leaves the model in the mode it
    found it in.

    ``should_stop`` is polled before each batch; when it returns True the evaluation is
    abandoned with :class:`EvalInterrupted` (the model's mode restored first).

    ``max_tokens`` (``training.eval_tokens``) bounds the cost: when the split has more targets,
    only the first ``max_tokens // streams`` targets of each of its evenly spaced streams are
    predicted (a deterministic subset, the same at every evaluation, each stream still read
    from a zero state), and the result's ``tokens`` counts those. None: the whole split.
    """
    was_training = model.training
    model.eval()
    if device.type != "cpu":
        ids = ids.to(device)
    vocab = model.config.vocab_size
    k = min(5, vocab)
    total = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    hidden = None
    n = ids.numel() - 1  # every token but the first is predicted once
    per_stream: int | None = None
    if max_tokens is not None and n > max_tokens:
        per_stream = max(1, max_tokens // max(1, min(batch_size, n)))
    counted = torch.zeros((), dtype=torch.long, device=device)
    pos = 0
    try:
        for x, y_window in eval_windows(ids, batch_size, seq_len):
            if should_stop is not None and should_stop():
                raise EvalInterrupted()
            if per_stream is not None:
                if pos >= per_stream:
                    break
                width = min(x.shape[1], per_stream - pos)
                x, y_window = x[:, :width], y_window[:, :width]
                pos += width
                counted += (y_window != -100).sum()
            hidden = _eval_batch(model, x, y_window, hidden, vocab, k, total, top1, top5,
                                 autocast_dtype)
    finally:
        model.train(was_training)
    if per_stream is not None:
        n = int(counted)
    loss = float(total) / n
    return EvalResult(
        loss=loss,
        ppl=perplexity(loss),
        bpc=loss / LN2 if char_level else None,
        accuracy=int(top1) / n,
        top5_accuracy=int(top5) / n,
        tokens=n,
    )


def _eval_batch(model: LSTMLanguageModel, x: torch.Tensor, y_window: torch.Tensor,
                hidden: Hidden | None, vocab: int, k: int, total: torch.Tensor,
                top1: torch.Tensor, top5: torch.Tensor,
                autocast_dtype: torch.dtype | None) -> Hidden:
    """One window: adds its summed loss and top-1/top-k hits to the accumulators in place;
    returns the hidden state to carry."""
    y = y_window.reshape(-1)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        logits, new_hidden = model(x, hidden)
    logits = logits.reshape(-1, vocab).float()  # (batch * seq, vocab)
    total += F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").double()
    mask = y != -100
    best = logits.topk(k, dim=-1).indices  # (batch * seq, k)
    hit = best == y.unsqueeze(1)
    top1 += (hit[:, 0] & mask).sum()
    top5 += (hit.any(dim=1) & mask).sum()
    return new_hidden
