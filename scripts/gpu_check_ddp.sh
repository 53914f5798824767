#!/usr/bin/env bash
# Data-parallel training on CUDA (NCCL), for a machine with at least 2 GPUs: the checks
# tests/engine/test_ddp.py makes with gloo on the CPU, on 2 GPUs (docs/deploy.md,
# "Data-parallel jobs"). Not part of the test suite (no GPU here); about a minute.
#
#   scripts/gpu_check_ddp.sh            # uses .venv/bin/python, GPUs 0 and 1
#   CUDA_VISIBLE_DEVICES=2,3 PYTHON=python scripts/gpu_check_ddp.sh
#
# 1. 2 processes x batch 8 (NCCL, cuda:0 and cuda:1) against 1 process x batch 16 (cuda:0):
#    per-step training losses and validation losses within 1e-3 relative (cuDNN's LSTM
#    kernels and NCCL's reduction order are not bit-reproducible; the CPU test's bound is
#    1e-5), the same number of steps, tokens and checkpoint kinds.
# 2. A 2-process run cancelled at step 12 and resumed from its `last` checkpoint: the resumed
#    steps' losses within 1e-3 relative of the uninterrupted run's (bit-equal on the CPU).
# 3. Rank 1 killed at step 5: rank 0 raises TrainingError("rank_failed") (the gloo control
#    group notices at the next step; LMFORGE_DDP_TIMEOUT_S=120 bounds an NCCL wait), and no
#    rank process is left.
# Exit status 0 when all hold; the numbers are printed either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export LMFORGE_DDP_TIMEOUT_S="${LMFORGE_DDP_TIMEOUT_S:-120}"
exec "$PYTHON" - <<'EOF'
import math
import sys

import psutil
import torch

from core.contract import TrainingError
from core.corpora import builtin_corpus
from core.sources import CorpusSources
from core.spec import JobSpec
from tests.engine.conftest import RecordingHooks
from worker.ddp_rank import train_data_parallel
from worker.engine.trainer import train_sources

if torch.cuda.device_count() < 2:
    sys.exit(f"needs 2 GPUs, sees {torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)")
REL = 1e-3
failures: list[str] = []


def spec(batch: int, gpus: int, **training: object) -> JobSpec:
    t = {"batch_size": batch, "seq_len": 32, "max_steps": 40, "eval_interval": 20,
         "log_interval": 5, "device": "cuda", "grad_clip": 0.5, **training}
    return JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"}, "test_fraction": 0.1,
        "model": {"embed_dim": 32, "hidden_dim": 64, "num_layers": 2, "dropout": 0.0},
        "optimizer": {"lr": 0.01}, "training": t,
        "resources": {"device": "cuda", "gpus": gpus}})


def sources() -> CorpusSources:
    return CorpusSources.from_texts(builtin_corpus("python-docs")[:100_000])


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}", flush=True)
    if not ok:
        failures.append(what)


def worst(a: list, b: list, name: str) -> float:
    return max((abs(getattr(x, name) - getattr(y, name)) / abs(getattr(x, name))
                for x, y in zip(a, b) if getattr(x, name) is not None), default=0.0)


def ranks_left() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "worker.ddp_rank" in " ".join(p.cmdline())]


# 1. equivalence ------------------------------------------------------------------------------
one, two = RecordingHooks(), RecordingHooks()
r1 = train_sources(spec(16, 1), sources(), one)
r2 = train_data_parallel(spec(8, 2), sources(), two)
check("same steps and tokens", [r.step for r in one.rows] == [r.step for r in two.rows]
      and [r.tokens_seen for r in one.rows] == [r.tokens_seen for r in two.rows])
check("same checkpoint kinds", [c.kind for c in one.checkpoints] == [c.kind for c in two.checkpoints])
d_train, d_val = worst(one.rows, two.rows, "train_loss"), worst(one.rows, two.rows, "val_loss")
check("train losses within 1e-3", d_train <= REL, f"(worst {d_train:.2e} relative)")
check("val losses within 1e-3", d_val <= REL, f"(worst {d_val:.2e} relative)")
print(f"tokens/s: 1 GPU batch 16 {r1.train_tokens_per_s:.0f}, 2 GPUs batch 8 each "
      f"{r2.train_tokens_per_s:.0f}")

# 2. resume -----------------------------------------------------------------------------------
cut = RecordingHooks(stop_when=lambda rows: bool(rows) and rows[-1].step >= 12)
train_data_parallel(spec(8, 2), sources(), cut)
resumed = RecordingHooks()
train_data_parallel(spec(8, 2), sources(), resumed, resume_from=cut.last("last").data)
start = cut.last("last").step
check("resumed steps", [r.step for r in resumed.rows] == list(range(start + 1, 41)))
d = worst(two.rows[start:], resumed.rows, "train_loss")
check("resumed losses within 1e-3", d <= REL, f"(worst {d:.2e} relative)")


# 3. a killed rank ----------------------------------------------------------------------------
class Kill(RecordingHooks):
    killed = False

    def on_metrics(self, rows):
        super().on_metrics(rows)
        if rows[-1].step >= 5 and not self.killed:
            for pid in ranks_left():
                psutil.Process(pid).kill()
            self.killed = True


try:
    train_data_parallel(spec(8, 2, max_steps=100_000, log_interval=1, eval_interval=100_000),
                        sources(), Kill())
    check("killed rank -> rank_failed", False, "(the run ended without an error)")
except TrainingError as exc:
    check("killed rank -> rank_failed", exc.code == "rank_failed", f"({exc.code}: {exc.message})")
check("no rank process left", ranks_left() == [])
sys.exit(1 if failures else 0)
EOF
