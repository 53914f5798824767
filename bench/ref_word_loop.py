#!/usr/bin/env python3
"""Bare word-level LSTM LM loop, written by hand after PyTorch's
``examples/word_language_model`` (``main.py``, ``model.py``): the engine's peer for
``bench/quality.py wikitext``.

Words plus ``<eos>`` per line; the vocabulary is every word of the *training* file (plus
``<unk>`` and ``<eos>``), and words of the validation/test text outside it are ``<unk>``, the
same vocabulary the engine's word tokenizer builds. Training batchified into ``--batch-size``
streams, truncated BPTT over ``--seq-len`` tokens with the hidden state detached between
windows; validation and test batchified into 10 streams (the example's ``eval_batch_size``).
Validation is the first ``--val-lines`` lines of the test file and test the rest (or, with
``--val-lines 0``, the last 10% of the training file's characters validates).

``--recipe example`` is the example's defaults: SGD at lr 20, divided by 4 whenever an epoch's
validation loss does not improve, gradient clipping 0.25, dropout 0.2, U(-0.1, 0.1)
embedding and decoder, zero decoder bias, evaluation once per epoch, ``--epochs`` 3 (the
example's default is 40; 3 is the budget of the benchmark), optional ``--tied``.
``--recipe adam`` keeps the same loop with Adam at ``--lr`` and evaluation every
``--eval-every`` steps. The best weights by validation loss are tested. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn as nn


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int,
                 dropout: float, tied: bool) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout)
        self.linear = nn.Linear(hidden_dim, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.linear.weight, -0.1, 0.1)
        nn.init.zeros_(self.linear.bias)
        if tied:
            self.linear.weight = self.embedding.weight

    def forward(self, x, hidden):
        out, hidden = self.lstm(self.drop(self.embedding(x)), hidden)
        return self.linear(self.drop(out)), hidden


def words(text: str) -> list[str]:
    return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


def batchify(ids: torch.Tensor, bsz: int) -> torch.Tensor:
    n = ids.numel() // bsz
    return ids[: n * bsz].view(bsz, n)  # (B, N)


def evaluate(model: LanguageModel, data: torch.Tensor, seq_len: int, vocab: int) -> float:
    """Mean cross-entropy (nats/token) over ``data`` (streams, N), hidden state carried."""
    model.eval()
    crit = nn.CrossEntropyLoss(reduction="sum")
    tot, n, h = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, data.size(1) - 1, seq_len):
            x, y = data[:, i : i + seq_len], data[:, i + 1 : i + 1 + seq_len]
            x = x[:, : y.size(1)]
            logits, h = model(x, h)
            tot += crit(logits.reshape(-1, vocab), y.reshape(-1)).item()
            n += y.numel()
    model.train()
    return tot / n


def load_splits(a: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    train_text = open(a.train_file, encoding="utf-8").read()
    test_lines = open(a.test_file, encoding="utf-8").read().splitlines(keepends=True)
    if a.val_lines > 0:
        return (words(train_text), words("".join(test_lines[: a.val_lines])),
                words("".join(test_lines[a.val_lines :])))
    split = int(len(train_text) * 0.9)  # first 90% of the characters train, the rest validates
    return words(train_text[:split]), words(train_text[split:]), words("".join(test_lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("train_file")
    p.add_argument("test_file")
    p.add_argument("--recipe", choices=["example", "adam"], default="example")
    p.add_argument("--val-lines", type=int, default=2000)
    p.add_argument("--embed-dim", type=int, default=200)
    p.add_argument("--hidden-dim", type=int, default=200)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=35)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=200, help="adam recipe only")
    p.add_argument("--lr", type=float, default=None, help="default: 20 (example), 2e-3 (adam)")
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    lr = a.lr if a.lr is not None else (20.0 if a.recipe == "example" else 2e-3)
    train_w, val_w, test_w = load_splits(a)
    vocab = ["<unk>", "<eos>"] + sorted({w for w in train_w if w not in ("<unk>", "<eos>")})
    stoi = {w: i for i, w in enumerate(vocab)}

    def enc(ws: list[str]) -> torch.Tensor:
        return torch.tensor([stoi.get(w, 0) for w in ws], dtype=torch.long)

    train = batchify(enc(train_w), a.batch_size)
    val, test = batchify(enc(val_w), 10), batchify(enc(test_w), 10)
    V = len(vocab)
    model = LanguageModel(V, a.embed_dim, a.hidden_dim, a.num_layers, a.dropout, a.tied)
    crit = nn.CrossEntropyLoss()
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if a.recipe == "example"
           else torch.optim.Adam(model.parameters(), lr=lr))
    per_epoch = (train.size(1) - 1) // a.seq_len
    steps = max(1, round(a.epochs * per_epoch))
    hidden, pos, best, best_state = None, 0, math.inf, None
    t0 = time.perf_counter()
    train_time = 0.0
    curve = []
    for step in range(1, steps + 1):
        t1 = time.perf_counter()
        if pos + a.seq_len + 1 > train.size(1):
            pos, hidden = 0, None
        x, y = train[:, pos : pos + a.seq_len], train[:, pos + 1 : pos + 1 + a.seq_len]
        pos += a.seq_len
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)
        opt.zero_grad()
        logits, hidden = model(x, hidden)
        loss = crit(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        _ = loss.item()
        train_time += time.perf_counter() - t1
        epoch_end = step % per_epoch == 0
        due = epoch_end if a.recipe == "example" else step % a.eval_every == 0
        if due or step == steps:
            v = evaluate(model, val, a.seq_len, V)
            curve.append({"step": step, "val_loss": v, "lr": opt.param_groups[0]["lr"]})
            if v < best:
                best, best_state = v, copy.deepcopy(model.state_dict())
            elif a.recipe == "example":  # the example's annealing: lr /= 4
                for g in opt.param_groups:
                    g["lr"] /= 4.0
    model.load_state_dict(best_state)
    t = evaluate(model, test, a.seq_len, V)
    print(json.dumps({"recipe": a.recipe, "tied": a.tied, "lr": lr, "vocab_size": V,
                      "best_val_loss": best, "best_val_ppl": math.exp(best),
                      "test_loss": t, "test_ppl": math.exp(t), "steps": steps,
                      "test_tokens": len(test_w), "val_tokens": len(val_w), "curve": curve,
                      "tokens_per_s": steps * a.batch_size * a.seq_len / train_time,
                      "wall_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
