"""The GPU check of export, the loader and calibration (issue 9), on a CUDA machine.

1. Train a small char model on CUDA; its checkpoint (CUDA-trained, saved from CUDA tensors)
   exports to ONNX and safetensors; onnxruntime's logits and state match PyTorch's (CPU) to
   1e-4, with a carried state.
2. ``lmforge.load(path, device="cuda")`` gives the engine's logits on CUDA to 1e-5 and the same
   samples as ``worker.engine.sample.sample(..., device="cuda")``.
3. ``worker.engine.calibrate.calibrate`` on CUDA against a real training run of the same shape
   (``TrainingResult.train_tokens_per_s``), fp32 and bf16: the ratio says how well the dry
   run's ``seconds_per_step`` predicts training speed.

Run from the repository root: ``python scripts/gpu_export_check.py [--quick] [--json PATH]``
(``--quick``: tiny shapes, for trying it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmforge
from core.contract import CorpusTexts
from core.spec import JobSpec
from tests.engine.conftest import RecordingHooks
from worker.engine.calibrate import calibrate
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.export import to_onnx, to_safetensors
from worker.engine.sample import sample
from worker.engine.trainer import train

TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"


def _spec(device: str, model: dict[str, Any], training: dict[str, Any],
          tokenizer: dict[str, Any] | None = None) -> JobSpec:
    return JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"}, "tokenizer": tokenizer or {"kind": "char"},
        "model": model,
        "training": {"device": device, "eval_interval": 10**6, "log_interval": 10,
                     "checkpoint_interval": None, "checkpoint_every_s": None, **training},
    })


def export_checks(device: str, text: str, tmp: Path) -> dict[str, Any]:
    spec = _spec(device, {"embed_dim": 64, "hidden_dim": 128, "num_layers": 2,
                          "tie_weights": False},
                 {"batch_size": 16, "seq_len": 32, "max_steps": 30, "eval_interval": 10})
    hooks = RecordingHooks()
    train(spec, CorpusTexts(train=text[:200_000]), hooks)
    data = hooks.last("best").data
    ckpt = load_checkpoint(data)
    cfg = ckpt.model_config
    out: dict[str, Any] = {}
    sess = ort.InferenceSession(to_onnx(ckpt), providers=["CPUExecutionProvider"])
    model = build_model_from_checkpoint(ckpt, "cpu").eval()
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(1, 1), (4, 33), (8, 200)]:
        ids = torch.randint(0, cfg.vocab_size, (batch, 2 * length), generator=gen)
        h = np.zeros((cfg.num_layers, batch, cfg.hidden_dim), dtype=np.float32)
        c, state = h.copy(), None
        for chunk in (ids[:, :length], ids[:, length:]):
            logits, h, c = sess.run(None, {"input_ids": chunk.numpy(), "h0": h, "c0": c})
            with torch.no_grad():
                want, state = model(chunk, state)
            worst = max(worst, float(np.abs(logits - want.numpy()).max()),
                        float(np.abs(h - state[0].numpy()).max()))
    out["onnx_max_abs_diff"] = worst
    path = tmp / "model.safetensors"
    path.write_bytes(to_safetensors(ckpt))
    lm = lmforge.load(path, device=device)
    engine = build_model_from_checkpoint(ckpt, device).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 100), generator=gen).to(device)
    with torch.no_grad():
        diff = (lm.model(ids)[0] - engine(ids)[0]).abs().max().item()
    out["loader_vs_engine_max_abs_diff"] = diff
    same = []
    for seed, temp, top_k, top_p in [(1, 0.8, 20, None), (2, 1.0, None, 0.9), (3, 0.0, None, None)]:
        a = lm.generate("ROMEO:", max_new_tokens=100, temperature=temp, top_k=top_k, seed=seed,
                        top_p=top_p)
        b = sample(data, "ROMEO:", 100, temp, top_k, seed, device=device, top_p=top_p)
        same.append("ROMEO:" + a == b)
    out["loader_samples_equal_engine"] = same
    return out


def calibration_checks(device: str, text: str, quick: bool) -> list[dict[str, Any]]:
    shapes = [
        ("char 2x256, 32x64", {"embed_dim": 128, "hidden_dim": 256, "num_layers": 2},
         {"batch_size": 32, "seq_len": 64}, None),
        ("bpe-2000 2x1024, 64x128", {"embed_dim": 512, "hidden_dim": 1024, "num_layers": 2},
         {"batch_size": 64, "seq_len": 128}, {"kind": "bpe", "vocab_size": 2000}),
    ]
    if quick:
        shapes = [("tiny", {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
                   {"batch_size": 4, "seq_len": 8}, None)]
    rows = []
    for name, model, training, tok in shapes:
        for precision in ("fp32", "bf16"):
            steps = 20 if quick else 200
            spec = _spec(device, model, {**training, "max_steps": steps, "precision": precision},
                         tok)
            hooks = RecordingHooks()
            start = time.perf_counter()
            result = train(spec, CorpusTexts(train=text), hooks)
            wall = time.perf_counter() - start
            vocab = load_checkpoint(hooks.last("last").data).model_config.vocab_size
            cal = calibrate(spec, vocab, torch.device(device), steps=3)
            row = {"shape": name, "precision": precision, "vocab": vocab,
                   "train_tokens_per_s": result.train_tokens_per_s,
                   "train_wall_s": wall, "steps": steps,
                   "calibrated_seconds_per_step": cal.seconds_per_step,
                   "calibrated_tokens_per_s": cal.tokens_per_s,
                   "ratio_calibrated_over_trained": cal.tokens_per_s / result.train_tokens_per_s}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = TEXT.read_text(encoding="utf-8")
    if args.quick:
        text = text[:100_000]
    report: dict[str, Any] = {"device": device, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        report["export"] = export_checks(device, text, Path(tmp))
    print(json.dumps(report["export"]), flush=True)
    report["calibration"] = calibration_checks(device, text, args.quick)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
