#!/usr/bin/env python3
"""The bare reference: a character-level LSTM language model trained by a loop written by hand,
the way a user would write it without any service around it.

It is the engine's side-by-side peer in ``bench/engine_vs_ref.py`` (docs/benchmarks.md, "Speed"):
whatever the engine costs over this loop is the price of the service machinery.

The recipe, which the engine child of ``bench/engine_vs_ref.py`` mirrors:

- vocabulary: the sorted distinct characters of the whole corpus; the first 90% of the encoded
  text trains, the last 10% validates; each part is cut into ``--batch-size`` contiguous
  columns, shape ``(batch, n)``;
- model: Embedding -> LSTM (``--num-layers``, batch first) -> Linear, PyTorch's default
  initialisation, seeded with ``--seed``;
- training: truncated BPTT over windows of ``--seq-len`` characters taken left to right, the
  hidden state carried from one window to the next but detached, and reset (with the position)
  when the next window would run past the end; cross-entropy, Adam (``--lr``), gradient norm
  clipped at 1.0, and one ``loss.item()`` per step, as a service that reports every step must;
- timing: ``--warmup`` untimed steps, then ``--steps`` timed ones; tokens/s is
  ``steps * batch * seq_len`` over the wall time of the timed steps only (no evaluation);
- evaluation: one pass over the validation columns in windows of ``--seq-len`` with the hidden
  state carried along, the mean cross-entropy per character.

Prints one JSON line: ``tokens_per_s``, ``train_loss`` (the last step's), ``val_loss`` (nats per
character), ``val_ppl``, ``threads`` and, on CUDA, ``cuda_peak_mib``
(``torch.cuda.max_memory_allocated``).

``--device cuda`` runs it on a GPU (the per-step ``loss.item()`` synchronises, so the wall time
is the GPU's); ``--precision bf16`` runs the forward pass and loss under
``torch.autocast(dtype=torch.bfloat16)`` with fp32 weights, as the engine's ``precision: bf16``.

    .venv/bin/python bench/ref_lstm_loop.py [CORPUS] --steps 200 --warmup 10 --threads 2

CORPUS defaults to the repository's ``data/tinyshakespeare/input.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CLIP_NORM = 1.0
TRAIN_FRACTION = 0.9


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> Linear over characters (modules built in this order, so that a seed
    gives the same initial weights as any loop that builds them in the same order)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(self.embed(x), state)  # (batch, seq_len, hidden)
        return self.head(out), state  # (batch, seq_len, vocab)


def encode(text: str) -> tuple[torch.Tensor, int]:
    """The text as character ids (vocabulary: its sorted distinct characters), and the
    vocabulary size."""
    alphabet = sorted(set(text))
    index = {ch: i for i, ch in enumerate(alphabet)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), len(alphabet)


def columns(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``ids`` cut into ``batch`` contiguous rows, the remainder dropped: (batch, n)."""
    width = ids.numel() // batch
    return ids[: batch * width].view(batch, width)


def autocast(a: argparse.Namespace) -> torch.autocast:
    """bf16 autocast on ``a.device`` when ``a.precision == "bf16"``, else a disabled one."""
    dev = torch.device(a.device).type
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=a.precision == "bf16")


def train(
    model: CharLSTM, data: torch.Tensor, a: argparse.Namespace, vocab: int
) -> tuple[float, float]:
    """Run ``a.warmup + a.steps`` steps on ``data`` (batch, n); return the seconds the timed
    steps took and the last step's loss."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    state = None
    pos = 0
    started = time.perf_counter()
    last = math.nan
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            started = time.perf_counter()
        if pos + a.seq_len + 1 > data.size(1):  # the next target window would run off the end
            pos, state = 0, None
        inputs = data[:, pos : pos + a.seq_len]  # (batch, seq_len)
        targets = data[:, pos + 1 : pos + a.seq_len + 1]  # (batch, seq_len)
        pos += a.seq_len
        if state is not None:  # keep the state, cut the graph: truncated BPTT
            state = (state[0].detach(), state[1].detach())
        optimizer.zero_grad()
        with autocast(a):
            logits, state = model(inputs, state)
            loss = loss_fn(logits.reshape(-1, vocab).float(), targets.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        last = loss.item()  # the per-step host read a job service makes to report the loss
    return time.perf_counter() - started, last


@torch.no_grad()
def evaluate(model: CharLSTM, data: torch.Tensor, a: argparse.Namespace, vocab: int) -> float:
    """Mean cross-entropy (nats per character) over ``data`` (batch, n), read in windows of
    ``seq_len`` with the hidden state carried from one window to the next."""
    model.eval()
    seq_len = a.seq_len
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, count, state = 0.0, 0, None
    for pos in range(0, data.size(1) - 1 - seq_len, seq_len):
        inputs = data[:, pos : pos + seq_len]
        targets = data[:, pos + 1 : pos + seq_len + 1]
        with autocast(a):
            logits, state = model(inputs, state)
        total += loss_fn(logits.reshape(-1, vocab).float(), targets.reshape(-1)).item()
        count += targets.numel()
    return total / max(count, 1)


def default_corpus() -> Path | None:
    sys.path.insert(0, str(ROOT))
    from core.corpora import find_corpus  # only when no corpus is given

    return find_corpus("tinyshakespeare/input.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", nargs="?", type=Path, default=None,
                   help="a UTF-8 text file (default: data/tinyshakespeare/input.txt)")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="timed steps (at least 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    corpus = a.corpus or default_corpus()
    if corpus is None:
        p.error("no CORPUS given and data/tinyshakespeare/input.txt is missing")

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ids, vocab = encode(corpus.read_text(encoding="utf-8"))
    cut = int(len(ids) * TRAIN_FRACTION)
    device = torch.device(a.device)
    train_data = columns(ids[:cut], a.batch_size).to(device)  # (batch, n_train)
    val_data = columns(ids[cut:], a.batch_size).to(device)  # (batch, n_val)
    model = CharLSTM(vocab, a.embed_dim, a.hidden_dim, a.num_layers).to(device)

    seconds, train_loss = train(model, train_data, a, vocab)
    val_loss = evaluate(model, val_data, a, vocab)
    extra = {}
    if device.type == "cuda":
        extra["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({**extra,
        "tokens_per_s": a.steps * a.batch_size * a.seq_len / seconds,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
