"""The text classifier on a CUDA GPU (docs/classification.md): it learns the synthetic task in
fp32 and bf16, packed padding stays invisible under cuDNN, a checkpoint written on the GPU
gives the same probabilities on the CPU, and one throughput figure per precision.

Run from the repository root on a CUDA machine with torch, pydantic, safetensors and numpy:
``PYTHONPATH=. python scripts/gpu_check_classify.py``. Prints one JSON line per check and
exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import torch

from core.spec import JobSpec
from worker.engine.classifier import (
    ClassifyData,
    LSTMClassifier,
    load_classifier,
    pad_batch,
    train_classifier,
)
from worker.engine.model import ModelConfig

MARKERS = {"blue": "sky", "green": "leaf", "red": "apple"}


def synthetic(n: int, seed: int = 0) -> list[tuple[str, str]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        label = r.choice(sorted(MARKERS))
        words = [f"w{r.randrange(50)}" for _ in range(r.randint(3, 40))]
        words.insert(r.randrange(len(words) + 1), MARKERS[label])
        out.append((" ".join(words), label))
    return out


class Hooks:
    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.checkpoints: list[Any] = []

    def on_metrics(self, rows: Any) -> None:
        self.rows.extend(rows)

    def on_checkpoint(self, c: Any) -> None:
        self.checkpoints.append(c)

    def should_stop(self) -> bool:
        return False


def spec(precision: str, **over: Any) -> JobSpec:
    model = {"embed_dim": 64, "hidden_dim": 128, "num_layers": 2, "dropout": 0.1,
             **over.pop("model", {})}
    return JobSpec.model_validate({
        "dataset_id": "x", "task": "classify", "tokenizer": {"kind": "word"},
        "model": model, "optimizer": {"lr": 0.003}, "test_fraction": 0.2,
        "training": {"batch_size": 32, "max_steps": 150, "eval_interval": 50,
                     "device": "cuda", "precision": precision, **over}})


def main() -> int:
    ok = True
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))
    data = ClassifyData(synthetic(3000))
    for precision in ("fp32", "bf16"):
        hooks = Hooks()
        t0 = time.perf_counter()
        res = train_classifier(spec(precision), data, hooks)
        seconds = time.perf_counter() - t0
        good = (res.test_accuracy or 0) >= 0.95
        ok &= good
        print(json.dumps({"check": f"learns_{precision}", "ok": good,
                          "test_accuracy": res.test_accuracy,
                          "test_macro_f1": res.test_macro_f1, "seconds": round(seconds, 2),
                          "train_examples_per_s": round(res.train_examples_per_s)}))
        if precision == "fp32":
            blob = [c for c in hooks.checkpoints if c.kind == "best"][-1].data
            texts = [t for t, _ in synthetic(64, seed=9)]
            gpu = load_classifier(blob, "cuda").probabilities(texts)
            cpu = load_classifier(blob, "cpu").probabilities(texts)
            diff = float((gpu - cpu).abs().max())
            good = diff < 1e-4
            ok &= good
            print(json.dumps({"check": "cuda_checkpoint_on_cpu", "ok": good,
                              "max_abs_prob_diff": diff}))
    torch.manual_seed(0)
    for pooling in ("mean", "max", "last"):
        model = LSTMClassifier(ModelConfig(100, 32, 64, 2, 0.0, False), 3, pooling).cuda().eval()
        short = [5, 6, 7]
        with torch.no_grad():
            alone = model(*pad_batch([short], "cuda"))
            ids, lengths = pad_batch([short, list(range(1, 90)), [9, 9]], "cuda")
            batched = model(ids, lengths)
        diff = float((alone[0] - batched[0]).abs().max())
        good = diff < 1e-5
        ok &= good
        print(json.dumps({"check": f"padding_invisible_{pooling}", "ok": good,
                          "max_abs_logit_diff": diff}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
