#!/usr/bin/env python3
"""Training throughput of the engine against the bare reference loop, in one run.

The reference is ``bench/ref_lstm_loop.py`` (its docstring gives the recipe).

Both run as child processes on the same corpus (tinyshakespeare, else python-docs), model
(char LSTM 2x256, embedding 128), batch (32 x 64), Adam lr 1e-3, clip 1.0, warm-up and timed
steps and thread count; the order alternates over ``--repeats``. Tokens/s counts the timed steps
only (as the reference does: from the end of the warm-up to the end of the last step, no
evaluation). Peak memory is each child's max RSS (``os.wait4``).

    nice .venv/bin/python bench/engine_vs_ref.py --steps 200 --warmup 10 --threads 2 \
        --repeats 3 --json bench/results/engine_vs_ref.json

On a GPU: ``--device cuda [--precision bf16] [--batch-size 128 --hidden-dim 1024 ...]``; both
children then also report their peak CUDA memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "bench" / "ref_lstm_loop.py"


def corpus_path(tmp: Path) -> Path:
    """The repository's tinyshakespeare; else (not a full checkout) python-docs in ``tmp``."""
    sys.path.insert(0, str(ROOT))
    from core.corpora import builtin_corpus, find_corpus

    if (p := find_corpus("tinyshakespeare/input.txt")) is not None:
        return p
    out = tmp / "python-docs.txt"
    out.write_text(builtin_corpus("python-docs"), encoding="utf-8")
    return out


def run_child(cmd: list[str]) -> tuple[dict, float]:
    """Run ``cmd``; return its last stdout JSON line and its peak RSS in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return json.loads(line), usage.ru_maxrss / 1024  # KiB on Linux


def engine_child(a: argparse.Namespace) -> None:
    """Run the engine with the reference's settings; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    from core.contract import CorpusTexts
    from core.spec import JobSpec
    from worker.engine.trainer import train

    class Hooks:
        def __init__(self) -> None:
            self.rows: list = []

        def on_metrics(self, rows):
            self.rows.extend(rows)

        def on_checkpoint(self, checkpoint):
            pass

        def should_stop(self) -> bool:
            return False

    total = a.steps + a.warmup
    spec = JobSpec.model_validate({
        "dataset": {"path": str(a.corpus)},
        "model": {"embed_dim": a.embed_dim, "hidden_dim": a.hidden_dim,
                  "num_layers": a.num_layers},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "training": {"batch_size": a.batch_size, "seq_len": a.seq_len, "max_steps": total,
                     "eval_interval": total + 1, "grad_clip": 1.0, "seed": 0,
                     "device": a.device, "precision": a.precision,
                     "num_threads": a.threads or None, "log_interval": a.log_interval},
    })
    hooks = Hooks()
    text = Path(a.corpus).read_text(encoding="utf-8")
    res = train(spec, CorpusTexts(train=text), hooks)
    rows = hooks.rows
    dt = rows[-1].elapsed_s - rows[a.warmup - 1].elapsed_s
    import torch

    extra = {}
    if torch.device(a.device).type == "cuda":
        extra["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({**extra, "tokens_per_s": a.steps * a.batch_size * a.seq_len / dt,
                      "engine_reported_tokens_per_s": res.train_tokens_per_s,
                      "train_loss": rows[-1].train_loss, "val_loss": res.final_val_loss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine_child:
        engine_child(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_path(Path(tmp))
        common = ["--steps", str(a.steps), "--warmup", str(a.warmup),
                  "--threads", str(a.threads), "--device", a.device,
                  "--precision", a.precision, "--embed-dim", str(a.embed_dim),
                  "--hidden-dim", str(a.hidden_dim), "--num-layers", str(a.num_layers),
                  "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)]
        ref_cmd = [sys.executable, str(REF), str(corpus), *common]
        eng_cmd = [sys.executable, __file__, "--engine-child", "--corpus", str(corpus),
                   "--log-interval", str(a.log_interval), *common]
        runs: dict[str, list[dict]] = {"ref": [], "engine": []}
        for r in range(a.repeats):
            order = [("ref", ref_cmd), ("engine", eng_cmd)]
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                out, rss = run_child(cmd)
                out["peak_rss_mib"] = rss
                runs[name].append(out)
                gpu = (f"  peak CUDA {out['cuda_peak_mib']:8.1f} MiB"
                       if "cuda_peak_mib" in out else "")
                print(f"repeat {r} {name:6s} {out['tokens_per_s']:9.0f} tok/s  "
                      f"peak RSS {rss:7.1f} MiB{gpu}", flush=True)
    ref_tps = [x["tokens_per_s"] for x in runs["ref"]]
    eng_tps = [x["tokens_per_s"] for x in runs["engine"]]
    import torch

    if torch.cuda.is_available():
        summary_gpu = {"gpu": torch.cuda.get_device_name(0)}
    else:
        summary_gpu = {}
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count(), **summary_gpu},
        "settings": {"corpus": corpus.name, "steps": a.steps, "warmup": a.warmup,
                     "threads": a.threads, "repeats": a.repeats, "device": a.device,
                     "precision": a.precision,
                     "model": f"char {a.num_layers}x{a.hidden_dim} emb {a.embed_dim}",
                     "batch": f"{a.batch_size} x {a.seq_len}",
                     "optimizer": "adam 1e-3, clip 1.0"},
        "ref_tokens_per_s_median": statistics.median(ref_tps),
        "engine_tokens_per_s_median": statistics.median(eng_tps),
        "ratio_engine_over_ref": statistics.median(eng_tps) / statistics.median(ref_tps),
        "ratio_per_repeat": [e / r for e, r in zip(eng_tps, ref_tps, strict=True)],
        "ref_peak_rss_mib": max(x["peak_rss_mib"] for x in runs["ref"]),
        "engine_peak_rss_mib": max(x["peak_rss_mib"] for x in runs["engine"]),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
