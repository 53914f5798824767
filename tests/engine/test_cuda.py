"""The engine on a CUDA device: the same model and numbers as on the CPU, bf16 autocast, and
checkpoints that move between devices.

These run only where CUDA is available (CI has no GPU; `scripts/gpu_check.sh` runs them on a
GPU machine, docs/benchmarks.md "GPU"). The rest of tests/engine also runs on CUDA there, since
their specs ask for ``device: "auto"``.
"""

from __future__ import annotations

import math

import pytest
import torch

from core.contract import CorpusTexts
from tests.engine.conftest import RecordingHooks, make_spec
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.sample import sample
from worker.engine.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(small_text: str, **training: object) -> tuple[RecordingHooks, object]:
    hooks = RecordingHooks()
    res = train(make_spec(**training), CorpusTexts(train=small_text), hooks)
    return hooks, res


def test_first_steps_match_the_cpu(small_text: str) -> None:
    """Same seed, same initial weights (built on the CPU), same batches: the first step's loss is
    the CPU's to float32 rounding, and five steps later the two runs are still close (cuDNN's
    LSTM kernels sum in another order, so not bit-equal)."""
    cpu, _ = _run(small_text, device="cpu", max_steps=5, eval_interval=5, log_interval=1)
    gpu, _ = _run(small_text, device="cuda", max_steps=5, eval_interval=5, log_interval=1)
    assert gpu.rows[0].train_loss == pytest.approx(cpu.rows[0].train_loss, abs=1e-5)
    assert gpu.rows[-1].train_loss == pytest.approx(cpu.rows[-1].train_loss, abs=1e-3)


def test_bf16_trains_close_to_fp32(small_text: str) -> None:
    """bf16 autocast (fp32 master weights) learns: finite losses that fall, and a final
    validation loss within 0.05 nats of the fp32 run's."""
    fp32, r32 = _run(small_text, device="cuda", max_steps=200, eval_interval=100)
    bf16, r16 = _run(small_text, device="cuda", max_steps=200, eval_interval=100,
                     precision="bf16")
    losses = [r.train_loss for r in bf16.rows]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.3
    assert r16.final_val_loss == pytest.approx(r32.final_val_loss, abs=0.05)  # type: ignore[attr-defined]


def test_checkpoint_from_cuda_loads_and_samples_on_the_cpu(
    small_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint written by a CUDA run holds CPU tensors: it loads on a machine without a
    GPU, gives the CUDA model's logits there, and sampling works. (cuDNN's LSTM uses TF32 by
    default, PyTorch's ``torch.backends.cudnn.allow_tf32``, which moved logits by up to 5e-4
    on an H200: turned off here to compare the weights, not the kernels' precision.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hooks, _ = _run(small_text, device="cuda", max_steps=20, eval_interval=10)
    blob = hooks.last("last").data
    ckpt = load_checkpoint(blob)
    cpu_model = build_model_from_checkpoint(ckpt, "cpu").eval()
    gpu_model = build_model_from_checkpoint(ckpt, "cuda").eval()
    x = torch.randint(0, cpu_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        a, _ = cpu_model(x)
        b, _ = gpu_model(x.cuda())
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    text = sample(blob, prompt="The ", max_new_tokens=20, seed=1, device="cpu")
    assert text.startswith("The ") and len(text) > 4


def test_resume_on_cuda_continues_the_run(small_text: str) -> None:
    """Stopped after step 10 and resumed from its ``last`` checkpoint on CUDA, a run reports the
    same steps as one that ran straight through (to cuDNN's summation order). Without dropout
    between LSTM layers: cuDNN draws that from a state no checkpoint can restore."""
    straight, _ = _run(small_text, device="cuda", max_steps=20, eval_interval=10,
                       log_interval=1)
    first = RecordingHooks(stop_when=lambda rows: len(rows) >= 10)
    spec = make_spec(device="cuda", max_steps=20, eval_interval=10, log_interval=1)
    train(spec, CorpusTexts(train=small_text), first)
    second = RecordingHooks()
    train(spec, CorpusTexts(train=small_text), second, resume_from=first.last("last").data)
    resumed = first.rows[:10] + second.rows
    assert [r.step for r in resumed] == [r.step for r in straight.rows]
    for a, b in zip(resumed, straight.rows, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-4)
