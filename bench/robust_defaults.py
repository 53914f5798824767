#!/usr/bin/env python3
"""Robust defaults (docs/benchmarks.md, "Robust defaults"): the engine against the bare loop on
corpora whose best possible loss is known, five seeds each, in one run.

Corpora (the same families as tests/engine/test_robust_defaults.py):

- ``phase``: character i is letter ``(stride * i + b_i) mod alphabet`` with ``b_i`` a fair coin
  (``random.Random(coin_seed).randrange(2)`` drawn in order): the best loss is ln 2 nats/char.
  The issue's failing case is alphabet 16, stride 9, coin seed 2, 60,000 characters.
- ``markov2``: an order-2 Markov source whose entropy rate (the best loss) is solved exactly.

Runs per seed: the engine with its defaults; the engine with the previous defaults
(``init_range`` 0.1, ``state_reset_prob`` 0: the failure); and ``bench/ref_lstm_loop.py``
(PyTorch's default initialisation, carried state, evaluation from a zero state per stream).
Everything else as in the issue: char tokens, embedding 16, LSTM 1x32, Adam lr 0.01, batch
16 x 16, clip 1.0, 150 steps, last 10% of the text validates.

    .venv/bin/python bench/robust_defaults.py --json bench/results/robust_defaults.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.contract import CorpusTexts, NullHooks  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from worker.engine.trainer import train  # noqa: E402


def phase_corpus(n: int, alphabet: int, stride: int, coin_seed: int) -> str:
    coin = random.Random(coin_seed)
    return "".join(chr(ord("a") + (stride * i + coin.randrange(2)) % alphabet) for i in range(n))


def engine(text: str, seed: int, steps: int, **overrides: object) -> dict:
    model = {k: v for k, v in overrides.items() if k == "init_range"}
    training = {k: v for k, v in overrides.items() if k == "state_reset_prob"}
    spec = JobSpec.model_validate({
        "dataset": {"path": "corpus.txt"}, "tokenizer": {"kind": "char"},
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, **model},
        "optimizer": {"lr": 0.01},
        "training": {"batch_size": 16, "seq_len": 16, "max_steps": steps, "eval_interval": 50,
                     "seed": seed, "num_threads": 1, **training},
    })
    res = train(spec, CorpusTexts(train=text), NullHooks())
    return {"final_val_loss": res.final_val_loss, "best_val_loss": res.best_val_loss,
            "fresh_state_train_loss": res.fresh_state_train_loss,
            "warnings": [w["code"] for w in res.warnings]}


def bare_loop(path: Path, seed: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ref_lstm_loop.py"), str(path),
         "--embed-dim", "16", "--hidden-dim", "32", "--num-layers", "1", "--batch-size", "16",
         "--seq-len", "16", "--steps", str(steps), "--warmup", "0", "--lr", "0.01",
         "--seed", str(seed), "--threads", "1"],
        capture_output=True, text=True, check=True)
    return {"final_val_loss": json.loads(out.stdout.strip().splitlines()[-1])["val_loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    corpora = {"phase a16 s9 c2 (the issue's)": (16, 9, 2), "phase a10 s3 c7": (10, 3, 7),
               "phase a26 s11 c5": (26, 11, 5)}
    results: dict = {"best_possible": math.log(2), "steps": a.steps, "corpora": {}}
    with tempfile.TemporaryDirectory(prefix="lmforge-robust-") as tmp:
        for name, (alphabet, stride, coin) in corpora.items():
            text = phase_corpus(60_000, alphabet, stride, coin)
            path = Path(tmp) / "corpus.txt"
            path.write_text(text, encoding="utf-8")
            rows = []
            for seed in range(a.seeds):
                row = {"seed": seed,
                       "engine": engine(text, seed, a.steps),
                       "engine_previous_defaults": engine(text, seed, a.steps, init_range=0.1,
                                                          state_reset_prob=0.0),
                       "bare_loop": bare_loop(path, seed, a.steps)}
                rows.append(row)
                print(name, seed, {k: round(v["final_val_loss"], 3) for k, v in row.items()
                                   if isinstance(v, dict)}, flush=True)
            results["corpora"][name] = rows
    print(json.dumps(results, indent=2))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
