#!/usr/bin/env python3
"""Text classification benchmark (issue 9): the engine's LSTM classifier against a TF-IDF +
logistic-regression baseline measured in the same run, on the same splits.

Tasks (``--tasks``, both by default):

- ``synthetic``: "does the word ``alpha`` occur before the word ``omega``?" Each text is
  filler words (``w0`` .. ``w49``, uniformly at random) with ``alpha`` and ``omega`` inserted
  at random positions, never at either end and never adjacent (at least two fillers between
  them); the clean label is ``alpha_first``/``omega_first``, then a fraction ``--flip`` of the
  labels (all splits) is flipped at random. The clean label is a function of the text and the
  flips are independent of it, so the Bayes-optimal accuracy is exactly ``1 - flip``
  (``optimum.expected``); on the drawn test set the optimal rule scores the share of unflipped
  test labels (``optimum.test``). A bag of word uni- and bigrams cannot see the order of two
  words that are never adjacent (each n-gram's count has the same distribution under both
  labels), so the baseline should stay near 50%; an LSTM can carry "seen alpha" forward.
- ``sst2``: the Stanford Sentiment Treebank, binary, sentence level (6,920 / 872 / 1,821
  sentences: ``sentence<TAB>label`` files ``train.tsv``/``dev.tsv``/``test.tsv`` in
  ``--sst2 DIR``, by default ``../shared/data/sst2``; skipped with a message when absent).
  Variants, each over ``--seeds`` seeds: ``scratch`` (the classifier from random weights),
  ``lm_init`` (first a word-level language model with the classifier's encoder dimensions is
  trained on the SST-2 training sentences only, the in-domain text, validated on the dev
  sentences' text, and the classifier starts from its ``best`` checkpoint through
  ``init_from``), and ``glove`` (only with ``--glove FILE``, a GloVe text file whose
  dimension becomes ``embed_dim``; nothing is downloaded).

Baseline: ``TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\\S+", lowercase=True,
sublinear_tf=True, min_df=1)`` fitted on the training texts (whitespace tokens, the same
tokens the LSTM's word tokenizer sees) + ``LogisticRegression(C, max_iter=2000)`` (lbfgs),
``C`` chosen from ``--baseline-c`` by validation macro-F1 (ties: the smaller C).

The LSTM runs in this process through ``worker.engine.classifier.train_classifier`` (and
``worker.engine.trainer.train`` for the language model), on the CPU with ``--threads``
threads; its test metrics are those of the best checkpoint chosen on validation macro-F1.
Results (per seed, mean and sample standard deviation) go to ``--json``.

    .venv/bin/python bench/classify.py --threads 2 --json bench/results/classify.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Example = tuple[str, str]  # (text, label)

KEY_A, KEY_B = "alpha", "omega"
FILLERS = [f"w{i}" for i in range(50)]


# -- data ---------------------------------------------------------------------------------------


def order_rule(text: str) -> str:
    """The synthetic task's clean label of ``text``: ``alpha_first`` when ``alpha`` occurs
    before ``omega``, else ``omega_first``."""
    words = text.split()
    return "alpha_first" if words.index(KEY_A) < words.index(KEY_B) else "omega_first"


def synthetic_split(n: int, flip: float, seed: int) -> tuple[list[Example], list[bool]]:
    """``n`` synthetic examples (module docstring) and, per example, whether its label was
    flipped. 8-20 fillers per text; ``alpha`` first with probability 1/2."""
    r = random.Random(seed)
    out: list[Example] = []
    flipped: list[bool] = []
    for _ in range(n):
        m = r.randint(8, 20)
        words = [r.choice(FILLERS) for _ in range(m)]
        while True:  # cut points: fillers[:a] K1 fillers[a:b] K2 fillers[b:], a >= 1,
            a, b = sorted(r.sample(range(1, m), 2))  # b - a >= 2, b <= m - 1
            if b - a >= 2:
                break
        first, second = (KEY_A, KEY_B) if r.random() < 0.5 else (KEY_B, KEY_A)
        text = " ".join([*words[:a], first, *words[a:b], second, *words[b:]])
        label = order_rule(text)
        f = r.random() < flip
        if f:
            label = "omega_first" if label == "alpha_first" else "alpha_first"
        out.append((text, label))
        flipped.append(f)
    return out, flipped


def synthetic_data(n_train: int, n_val: int, n_test: int, flip: float, seed: int = 0
                   ) -> dict[str, Any]:
    """The three splits (independent draws, seeds ``seed``, ``seed + 1``, ``seed + 2``) and
    the optimum: ``expected`` = 1 - flip, ``validation``/``test`` = the accuracy of the clean
    rule on those splits' (noisy) labels."""
    splits, opt = {}, {}
    for i, (name, n) in enumerate((("train", n_train), ("validation", n_val), ("test", n_test))):
        ex, _ = synthetic_split(n, flip, seed + i)
        splits[name] = ex
        if name != "train":
            opt[name] = sum(order_rule(t) == y for t, y in ex) / len(ex)
    return {"splits": splits, "optimum": {"expected": 1.0 - flip, **opt}}


def read_tsv(path: Path) -> list[Example]:
    """``sentence<TAB>label`` lines (the label after the last tab); blank lines skipped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            text, label = line.rsplit("\t", 1)
            out.append((text, label.strip()))
    return out


def sst2_dir(arg: Path | None) -> Path | None:
    """``arg`` or ``../shared/data/sst2`` (core.corpora); None when it lacks the files."""
    if arg is None:
        from core.corpora import find_corpus

        p = find_corpus("sst2/train.tsv")
        arg = p.parent if p is not None else None
    if arg is None or not all((arg / f).is_file() for f in ("train.tsv", "dev.tsv", "test.tsv")):
        return None
    return arg


# -- the baseline -------------------------------------------------------------------------------


def baseline(splits: dict[str, list[Example]], grid: Sequence[float]) -> dict[str, Any]:
    """TF-IDF (word uni+bigrams) + logistic regression, C chosen on validation macro-F1."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\S+", lowercase=True,
                          sublinear_tf=True, min_df=1)
    x_train = vec.fit_transform([t for t, _ in splits["train"]])
    y_train = [y for _, y in splits["train"]]
    x_val, y_val = vec.transform([t for t, _ in splits["validation"]]), [
        y for _, y in splits["validation"]]
    x_test, y_test = vec.transform([t for t, _ in splits["test"]]), [
        y for _, y in splits["test"]]
    per_c = []
    best: tuple[float, float, Any] | None = None
    for c in sorted(grid):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        pv = clf.predict(x_val)
        f1 = float(f1_score(y_val, pv, average="macro"))
        per_c.append({"C": c, "val_accuracy": float(accuracy_score(y_val, pv)),
                      "val_macro_f1": f1})
        if best is None or f1 > best[0]:
            best = (f1, c, clf)
    assert best is not None
    _, c, clf = best
    pt = clf.predict(x_test)
    return {
        "model": "TfidfVectorizer(ngram_range=(1, 2), token_pattern=r'(?u)\\S+', "
                 "sublinear_tf=True, min_df=1) + LogisticRegression(lbfgs, max_iter=2000)",
        "features": int(x_train.shape[1]),
        "C": c,
        "grid": per_c,
        "val_accuracy": next(r["val_accuracy"] for r in per_c if r["C"] == c),
        "val_macro_f1": next(r["val_macro_f1"] for r in per_c if r["C"] == c),
        "test_accuracy": float(accuracy_score(y_test, pt)),
        "test_macro_f1": float(f1_score(y_test, pt, average="macro")),
        "time_s": time.perf_counter() - t0,
    }


# -- the engine ---------------------------------------------------------------------------------


class Hooks:
    """Keeps the metric rows and the newest checkpoint of each kind."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.checkpoints: dict[str, bytes] = {}

    def on_metrics(self, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)

    def on_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoints[str(checkpoint.kind)] = checkpoint.data

    def should_stop(self) -> bool:
        return False


def model_section(a: argparse.Namespace, embed_dim: int | None = None) -> dict[str, Any]:
    return {"embed_dim": embed_dim or a.embed_dim, "hidden_dim": a.hidden_dim,
            "num_layers": a.num_layers, "dropout": a.dropout, "init_range": a.init_range or None}


def classify_spec(a: argparse.Namespace, seed: int, *, steps: int, eval_interval: int,
                  model: dict[str, Any], init_from: str | None = None) -> Any:
    from core.spec import JobSpec

    doc: dict[str, Any] = {
        "dataset": {"path": "train"}, "validation": {"path": "validation"},
        "test": {"path": "test"},
        "task": "classify", "tokenizer": {"kind": "word", "min_freq": a.min_freq},
        "model": model,
        "optimizer": {"name": "adam", "lr": a.lr, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 0, "min_lr": a.lr / 10},
        "classify": {"pooling": a.pooling, "freeze_encoder_steps": 0},
        "training": {"batch_size": a.batch_size, "max_steps": steps,
                     "eval_interval": eval_interval, "log_interval": eval_interval,
                     "grad_clip": 1.0, "seed": seed, "device": "cpu",
                     "num_threads": a.threads, "checkpoint_interval": None,
                     "checkpoint_every_s": None},
    }
    if init_from is not None:
        doc["init_from"] = {"job_id": init_from, "checkpoint": "best"}
    return JobSpec.model_validate(doc)


def run_classifier(spec: Any, splits: dict[str, list[Example]], *, init_from: bytes | None = None,
                   embeddings: str | None = None,
                   rule: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Train one classifier; its best checkpoint's metrics and the run's time. With ``rule``
    (the synthetic task's clean labelling), also the share of test texts on which the best
    checkpoint's prediction (``classify_texts``) agrees with it (``rule_agreement``)."""
    from worker.engine.classifier import ClassifyData, train_classifier

    hooks = Hooks()
    t0 = time.perf_counter()
    res = train_classifier(spec, ClassifyData(splits["train"], splits["validation"],
                                              splits["test"], embeddings),
                           hooks, init_from=init_from)
    wall = time.perf_counter() - t0
    curve = [{"step": r.step, "epoch": round(r.epoch, 3), "val_accuracy": r.val_accuracy,
              "val_macro_f1": r.val_macro_f1, "val_loss": r.val_loss}
             for r in hooks.rows if r.val_loss is not None]
    return {
        "seed": spec.training.seed, "steps": res.steps, "epochs": res.epochs,
        "stop_reason": res.stop_reason, "best_step": res.best_step,
        "best_val_accuracy": res.best_val_accuracy, "best_val_macro_f1": res.best_val_macro_f1,
        "test_accuracy": res.test_accuracy, "test_macro_f1": res.test_macro_f1,
        "test_confusion_matrix": res.test_confusion_matrix, "labels": res.labels,
        "vocab_size": res.vocab_size, "num_params": res.num_params,
        "embedding_coverage": res.embedding_coverage,
        "train_examples_per_s": res.train_examples_per_s,
        "time_s": wall, "curve": curve,
        "rule_agreement": None if rule is None else agreement(
            hooks.checkpoints["best"], splits["test"], rule),
    }


def agreement(best: bytes, examples: list[Example], rule: Callable[[str], str]) -> float:
    """The share of ``examples`` whose predicted label (the checkpoint's) is ``rule(text)``."""
    from worker.engine.classifier import classify_texts, load_classifier

    clf = load_classifier(best)
    texts = [t for t, _ in examples]
    pred = [p["label"] for p in classify_texts(clf, texts)]
    return sum(p == rule(t) for p, t in zip(pred, texts, strict=True)) / len(texts)


def pretrain_lm(a: argparse.Namespace, seed: int, train_texts: list[str],
                val_texts: list[str]) -> tuple[bytes, dict[str, Any]]:
    """A word-level LM on ``train_texts`` (one per line), validated on ``val_texts``; its
    ``best`` checkpoint and a summary."""
    from core.contract import CorpusTexts
    from core.spec import JobSpec
    from worker.engine.trainer import train

    spec = JobSpec.model_validate({
        "dataset": {"path": "sst2-train-sentences"},
        "tokenizer": {"kind": "word", "min_freq": a.min_freq},
        "model": {**model_section(a), "dropout": a.lm_dropout},
        "optimizer": {"name": "adam", "lr": a.lm_lr},
        "schedule": {"kind": "cosine", "warmup_steps": 0, "min_lr": a.lm_lr / 10},
        "training": {"batch_size": a.batch_size, "seq_len": a.lm_seq_len,
                     "max_steps": a.lm_steps, "eval_interval": max(1, a.lm_steps // 4),
                     "log_interval": 50, "grad_clip": 1.0, "seed": seed, "device": "cpu",
                     "num_threads": a.threads, "eval_tokens": None,
                     "checkpoint_interval": None, "checkpoint_every_s": None},
    })
    hooks = Hooks()
    t0 = time.perf_counter()
    res = train(spec, CorpusTexts(train="\n".join(train_texts) + "\n",
                                  validation="\n".join(val_texts) + "\n"), hooks)
    wall = time.perf_counter() - t0
    return hooks.checkpoints["best"], {
        "seed": seed, "steps": res.steps, "epochs": res.epochs, "vocab_size": res.vocab_size,
        "best_val_loss": res.best_val_loss, "best_val_ppl": res.best_val_ppl,
        "best_step": res.best_step, "train_tokens_per_s": res.train_tokens_per_s,
        "time_s": wall,
    }


def summary(runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one run) and values of each key over runs."""
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(r[k]) for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"mean": statistics.fmean(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
    return out


METRICS = ("test_accuracy", "test_macro_f1", "best_val_accuracy", "best_val_macro_f1", "time_s")


# -- the tasks ----------------------------------------------------------------------------------


def run_synthetic(a: argparse.Namespace) -> dict[str, Any]:
    d = synthetic_data(a.syn_train, a.syn_val, a.syn_test, a.flip, seed=a.data_seed)
    splits = d["splits"]
    log(f"synthetic: {a.syn_train}/{a.syn_val}/{a.syn_test} examples, flip {a.flip}, optimum "
        f"{d['optimum']['expected']:.3f} (test set: {d['optimum']['test']:.4f})")
    base = baseline(splits, a.baseline_c)
    log(f"  baseline: test accuracy {base['test_accuracy']:.4f} (C={base['C']})")
    model = {"embed_dim": a.syn_embed_dim, "hidden_dim": a.syn_hidden_dim, "num_layers": 1,
             "dropout": 0.0}
    runs = []
    for seed in range(a.syn_seeds):
        spec = classify_spec(a, seed, steps=a.syn_steps,
                             eval_interval=max(1, a.syn_steps // 5), model=model)
        r = run_classifier(spec, splits, rule=order_rule)
        runs.append(r)
        log(f"  lstm seed {seed}: test accuracy {r['test_accuracy']:.4f} (agrees with the "
            f"optimal rule on {r['rule_agreement']:.4f}), {r['time_s']:.1f} s")
    return {
        "task": f"label = does '{KEY_A}' occur before '{KEY_B}' (never adjacent, never at an "
                f"end; fillers w0..w49, 8-20 per text), then {a.flip:.0%} of labels flipped",
        "flip_rate": a.flip,
        "num_examples": {k: len(v) for k, v in splits.items()},
        "optimum": d["optimum"],
        "baseline": base,
        "lstm": {"model": model, "steps": a.syn_steps, "runs": runs,
                 **summary(runs, (*METRICS, "rule_agreement"))},
    }


def run_sst2(a: argparse.Namespace) -> dict[str, Any]:
    where = sst2_dir(a.sst2)
    if where is None:
        msg = (f"SST-2 not found ({a.sst2 or '../shared/data/sst2'} lacks "
               "train.tsv/dev.tsv/test.tsv): skipped; give --sst2 DIR")
        log(msg)
        return {"skipped": msg}
    splits = {"train": read_tsv(where / "train.tsv"),
              "validation": read_tsv(where / "dev.tsv"),
              "test": read_tsv(where / "test.tsv")}
    n = {k: len(v) for k, v in splits.items()}
    log(f"sst2: {n} from {where}")
    base = baseline(splits, a.baseline_c)
    log(f"  baseline: test accuracy {base['test_accuracy']:.4f}, macro-F1 "
        f"{base['test_macro_f1']:.4f} (C={base['C']}, {base['time_s']:.1f} s)")
    per_epoch = -(-n["train"] // a.batch_size)
    steps = max(1, round(a.epochs * per_epoch))
    eval_interval = max(1, round(a.eval_every * per_epoch))
    out: dict[str, Any] = {"data": str(where), "num_examples": n, "baseline": base,
                           "steps": steps, "eval_interval": eval_interval}
    variants: dict[str, Any] = {}
    scratch, lm_init, lms = [], [], []
    for seed in range(a.seeds):
        spec = classify_spec(a, seed, steps=steps, eval_interval=eval_interval,
                             model=model_section(a))
        r = run_classifier(spec, splits)
        scratch.append(r)
        log(f"  scratch seed {seed}: test accuracy {r['test_accuracy']:.4f}, macro-F1 "
            f"{r['test_macro_f1']:.4f}, {r['time_s']:.1f} s")
        if a.lm_steps > 0:
            ckpt, lm = pretrain_lm(a, seed, [t for t, _ in splits["train"]],
                                   [t for t, _ in splits["validation"]])
            lms.append(lm)
            log(f"  lm seed {seed}: best validation ppl {lm['best_val_ppl']:.1f} "
                f"({lm['steps']} steps, {lm['time_s']:.1f} s)")
            spec = classify_spec(a, seed, steps=steps, eval_interval=eval_interval,
                                 model=model_section(a), init_from=f"bench-lm-{seed}")
            r = run_classifier(spec, splits, init_from=ckpt)
            r["lm_time_s"] = lm["time_s"]
            r["total_time_s"] = lm["time_s"] + r["time_s"]
            lm_init.append(r)
            log(f"  lm_init seed {seed}: test accuracy {r['test_accuracy']:.4f}, macro-F1 "
                f"{r['test_macro_f1']:.4f}, {r['time_s']:.1f} s (+ LM {lm['time_s']:.1f} s)")
    variants["scratch"] = {"runs": scratch, **summary(scratch, METRICS)}
    if lm_init:
        variants["lm_init"] = {
            "pretraining_text": "the SST-2 training sentences (one per line; validated on "
                                "the dev sentences' text)",
            "lm": {"steps": a.lm_steps, "seq_len": a.lm_seq_len, "lr": a.lm_lr,
                   "dropout": a.lm_dropout, "runs": lms,
                   **summary(lms, ("best_val_ppl", "time_s"))},
            "runs": lm_init, **summary(lm_init, (*METRICS, "total_time_s"))}
        pairs = list(zip(scratch, lm_init, strict=True))
        variants["lm_minus_scratch"] = summary(
            [{k: b[k] - s[k] for k in ("test_accuracy", "test_macro_f1")} for s, b in pairs],
            ("test_accuracy", "test_macro_f1"))
    else:
        variants["lm_init"] = {"skipped": "--lm-steps 0"}
    if a.glove is not None:
        text = a.glove.read_text(encoding="utf-8")
        dim = len(text.split("\n", 1)[0].split()) - 1
        glove = []
        for seed in range(a.seeds):
            model = {**model_section(a, dim),
                     "pretrained_embeddings": {"path": str(a.glove), "freeze": False}}
            spec = classify_spec(a, seed, steps=steps, eval_interval=eval_interval,
                                 model=model)
            r = run_classifier(spec, splits, embeddings=text)
            glove.append(r)
            log(f"  glove seed {seed}: test accuracy {r['test_accuracy']:.4f}, "
                f"coverage {r['embedding_coverage']:.3f}")
        variants["glove"] = {"file": str(a.glove), "dim": dim, "runs": glove,
                             **summary(glove, METRICS)}
    else:
        variants["glove"] = {"skipped": "not measured: no --glove FILE given (nothing is "
                                        "downloaded)"}
    out["variants"] = variants
    return out


# -- main ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="synthetic,sst2", help="comma-separated: synthetic,sst2")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline-c", type=float, nargs="+",
                   default=[0.25, 1.0, 4.0, 16.0, 64.0, 256.0],
                   help="the logistic regression's C grid")
    # SST-2
    p.add_argument("--sst2", type=Path, default=None, help="folder with train/dev/test.tsv")
    p.add_argument("--glove", type=Path, default=None, help="GloVe text file (optional)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=3.0, help="classifier epochs")
    p.add_argument("--eval-every", type=float, default=0.25, help="epochs between evaluations")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--init-range", type=float, default=0.1,
                   help="U(-r, r) embedding/head init (model.init_range; 0: layer defaults)")
    p.add_argument("--pooling", choices=["mean", "max", "last"], default="mean")
    p.add_argument("--min-freq", type=int, default=2, help="word tokenizer min_freq")
    p.add_argument("--lm-steps", type=int, default=1000, help="LM pre-training steps (0: none)")
    p.add_argument("--lm-seq-len", type=int, default=35)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--lm-dropout", type=float, default=0.3)
    # synthetic
    p.add_argument("--flip", type=float, default=0.1, help="share of labels flipped")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--syn-train", type=int, default=4000)
    p.add_argument("--syn-val", type=int, default=500)
    p.add_argument("--syn-test", type=int, default=2000)
    p.add_argument("--syn-steps", type=int, default=400)
    p.add_argument("--syn-seeds", type=int, default=3)
    p.add_argument("--syn-embed-dim", type=int, default=32)
    p.add_argument("--syn-hidden-dim", type=int, default=64)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return (and with ``--json`` write) the results."""
    a = parser().parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"synthetic", "sst2"}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}: choose synthetic, sst2")
    import sklearn
    import torch

    threads_before = torch.get_num_threads()
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "command": "bench/classify.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "sklearn": sklearn.__version__,
                    "threads": a.threads, "load_average_before": list(os.getloadavg())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    try:
        if "synthetic" in tasks:
            out["synthetic"] = run_synthetic(a)
        if "sst2" in tasks:
            out["sst2"] = run_sst2(a)
    finally:
        torch.set_num_threads(threads_before)
    out["machine"]["load_average_after"] = list(os.getloadavg())
    out["elapsed_s"] = time.perf_counter() - t0
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
