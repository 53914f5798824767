#!/usr/bin/env python3
"""Quality benchmarks of the engine (docs/benchmarks.md).

``shakespeare``: tinyshakespeare char-level, first 90% train / last 10% validation, LSTM 2x256
(embedding 128), dropout 0.2; goal: best validation loss <= 1.50 nats/char.

``wikitext``: WikiText-2 word-level, trained on valid.txt, validated on the first 2,000 lines
of test.txt and tested on the rest with the best weights, at the budget of PyTorch's
word_language_model defaults (2x200, batch 20, bptt 35, 3 epochs): the engine with its
defaults (untied and tied), and that example's recipe (bench/ref_word_loop.py) untied and
tied on the same vocabulary, in the same run. WikiText-2 is not shipped in
``data/`` (its terms do not allow it): it is read from ``$LMFORGE_CORPORA_DIR/wikitext-2/``,
and the benchmark exits with a message when it is not there.

    nice .venv/bin/python bench/quality.py shakespeare --json bench/results/shakespeare.json
    nice .venv/bin/python bench/quality.py wikitext --json bench/results/wikitext.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.contract import CorpusTexts  # noqa: E402
from core.corpora import CORPORA_DIR_ENV, corpora_dir, find_corpus  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from worker.engine.trainer import train  # noqa: E402


def corpus_or_exit(relpath: str) -> Path:
    """``relpath`` from ``data/`` or ``$LMFORGE_CORPORA_DIR``; exit with a message if absent."""
    path = find_corpus(relpath)
    if path is None:
        sys.exit(f"{relpath} not found in {ROOT / 'data'} nor in {corpora_dir()}: set "
                 f"{CORPORA_DIR_ENV} to a directory holding it (see data/README.md)")
    return path


class PrintHooks:
    def on_metrics(self, rows):
        for r in rows:
            if r.val_loss is not None:
                print(f"step {r.step} epoch {r.epoch:.2f} train {r.train_loss:.4f} "
                      f"val {r.val_loss:.4f} ({r.tokens_per_s:,.0f} tok/s, "
                      f"{r.elapsed_s:.0f}s)", flush=True)

    def on_checkpoint(self, checkpoint):
        pass

    def should_stop(self) -> bool:
        return False


def shakespeare(a: argparse.Namespace) -> dict:
    text = corpus_or_exit("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    spec = JobSpec.model_validate({
        "dataset": {"path": "input.txt"},
        "model": {"embed_dim": 128, "hidden_dim": 256, "num_layers": 2, "dropout": 0.2},
        "optimizer": {"name": "adam", "lr": a.lr},
        "schedule": {"kind": "cosine", "warmup_steps": 100, "min_lr": a.lr / 10},
        "training": {"batch_size": 32, "seq_len": 64, "max_steps": a.steps,
                     "eval_interval": 250, "grad_clip": 1.0, "num_threads": a.threads,
                     "max_runtime_s": a.max_runtime_s, "log_interval": 50},
        "val_fraction": 0.1,
    })
    res = train(spec, CorpusTexts(train=text), PrintHooks())
    return {"spec": spec.model_dump(mode="json"), "result": res.as_dict(),
            "goal_val_loss": 1.50, "met": (res.best_val_loss or 9) <= 1.50}


def wikitext_spec(train_file: Path, val_file: Path, test_file: Path, **model: object) -> JobSpec:
    """The budget of PyTorch's examples/word_language_model defaults (LSTM 2x200, embedding
    200, dropout 0.2, batch 20, bptt 35) for 3 epochs; everything else the engine's defaults."""
    return JobSpec.model_validate({
        "dataset": {"path": str(train_file)}, "validation": {"path": str(val_file)},
        "test": {"path": str(test_file)},
        "tokenizer": {"kind": "word"},
        "model": {"embed_dim": 200, "hidden_dim": 200, "num_layers": 2, "dropout": 0.2,
                  **model},
        "training": {"batch_size": 20, "seq_len": 35, "max_epochs": 3, "max_steps": 100_000},
    })


def wikitext(a: argparse.Namespace) -> dict:
    """Train on valid.txt, validate on the first 2,000 lines of test.txt, test on the rest;
    the engine with its defaults, then the example's recipe (bench/ref_word_loop.py, SGD lr
    20, /4 annealing, clip 0.25) untied and tied, on the same vocabulary, in the same run."""
    train_file = corpus_or_exit("wikitext-2/valid.txt")
    test_file = corpus_or_exit("wikitext-2/test.txt")
    lines = test_file.read_text(encoding="utf-8").splitlines(keepends=True)
    texts = CorpusTexts(train=train_file.read_text(encoding="utf-8"),
                        validation="".join(lines[:2000]), test="".join(lines[2000:]))
    out: dict = {}
    for name, model in (("engine", {}), ("engine_tied", {"tie_weights": True})):
        if name not in a.runs:
            continue
        spec = wikitext_spec(train_file, test_file, test_file, **model)
        spec.training.num_threads = a.threads
        t0 = time.perf_counter()
        res = train(spec, texts, PrintHooks())
        out[name] = {"spec": spec.model_dump(mode="json"), **res.as_dict(),
                     "wall_s": time.perf_counter() - t0}
    for name, extra in (("example", []), ("example_tied", ["--tied"])):
        if name not in a.runs:
            continue
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "ref_word_loop.py"), str(train_file),
             str(test_file), "--recipe", "example", "--val-lines", "2000", "--epochs", "3",
             "--threads", str(a.threads), *extra], capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["test_ppl"] = {k: v.get("test_ppl") for k, v in out.items() if isinstance(v, dict)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["shakespeare", "wikitext"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-runtime-s", type=float, default=1500.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--runs", default="engine,engine_tied,example,example_tied",
                   type=lambda v: v.split(","), help="wikitext: which runs (comma-separated)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    if a.which == "shakespeare":
        a.steps = a.steps or 5000
        summary = shakespeare(a)
    else:
        summary = wikitext(a)
    print(json.dumps(summary, indent=2, default=str))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
