#!/usr/bin/env python3
"""Bare word-level LSTM LM loop, written by hand after bench/ref_lstm_loop.py and
PyTorch's examples/word_language_model: words + <eos> per line, vocabulary from the training
part, truncated BPTT with detached hidden state, Adam, gradient clipping, validation each
`--eval-every` steps keeping the best weights, test perplexity with those weights.

The engine's peer for bench/quality.py's WikiText-2 run, which passes it
$LMFORGE_CORPORA_DIR/wikitext-2/valid.txt and test.txt. Prints one JSON line.
"""
import argparse
import copy
import json
import math
import time

import torch
import torch.nn as nn


class LanguageModel(nn.Module):
    def __init__(self, vocab_size, embed_dim, hidden_dim, num_layers, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout)
        self.linear = nn.Linear(hidden_dim, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.linear.weight, -0.1, 0.1)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, hidden):
        out, hidden = self.lstm(self.drop(self.embedding(x)), hidden)
        return self.linear(self.drop(out)), hidden


def words(text):
    return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


def batchify(ids, bsz):
    n = ids.numel() // bsz
    return ids[: n * bsz].view(bsz, n)  # (B, N)


def evaluate(model, data, seq_len, vocab):
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("train_file")
    p.add_argument("test_file")
    p.add_argument("--embed-dim", type=int, default=200)
    p.add_argument("--hidden-dim", type=int, default=200)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=35)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    text = open(a.train_file, encoding="utf-8").read()
    split = int(len(text) * 0.9)  # first 90% of the characters train, the rest validates
    train_w, val_w = words(text[:split]), words(text[split:])
    vocab = ["<unk>", "<eos>"] + sorted({w for w in train_w if w not in ("<unk>", "<eos>")})
    stoi = {w: i for i, w in enumerate(vocab)}
    enc = lambda ws: torch.tensor([stoi.get(w, 0) for w in ws], dtype=torch.long)  # noqa: E731
    test_w = words(open(a.test_file, encoding="utf-8").read())
    train = batchify(enc(train_w), a.batch_size)
    val, test = batchify(enc(val_w), 10), batchify(enc(test_w), 10)
    V = len(vocab)
    model = LanguageModel(V, a.embed_dim, a.hidden_dim, a.num_layers, a.dropout)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    hidden, pos, best, best_state = None, 0, math.inf, None
    t0 = time.perf_counter()
    train_time = 0.0
    for step in range(1, a.steps + 1):
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
        if step % a.eval_every == 0 or step == a.steps:
            v = evaluate(model, val, a.seq_len, V)
            if v < best:
                best, best_state = v, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    t = evaluate(model, test, a.seq_len, V)
    print(json.dumps({"vocab_size": V, "best_val_loss": best, "best_val_ppl": math.exp(best),
                      "test_loss": t, "test_ppl": math.exp(t), "steps": a.steps,
                      "tokens_per_s": a.steps * a.batch_size * a.seq_len / train_time,
                      "wall_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
