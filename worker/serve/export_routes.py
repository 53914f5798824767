"""The inference server's export and calibration routes (``POST /export``, ``POST /calibrate``).

- ``/export`` ``{checkpoint, format, deadline_s}``: the checkpoint (from the server's model
  cache, :class:`worker.serve.models.ModelCache`) as a weights-only safetensors file or an
  ONNX model (:mod:`worker.engine.export`); the body is the file, ``X-Export-SHA256`` its
  sha256 (hex). 409 ``wrong_task`` for a classification job's checkpoint.
- ``/calibrate`` ``{spec, vocab_size, steps, deadline_s}``: the seconds one training step of
  the spec's shape takes on this server's device (:func:`worker.engine.calibrate.calibrate`),
  remembered per shape (:func:`shape_key`) for the life of the process (at most
  :data:`CACHE_SIZE` shapes). 409 ``device_mismatch`` when the spec asks for a device class
  (cpu, cuda) other than the server's; 422 ``calibration_too_large`` when the step's
  estimated memory (:func:`core.estimate.train_memory_bytes`) exceeds half the host's
  available memory (CPU) or 90% of the GPU's free memory, or the step runs out of memory.

Both run under the compute lock, one request at a time, like generation
(:func:`worker.serve.routes.run_call`); 504 ``deadline_exceeded`` when the deadline passes
first.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from core.errors import Conflict, ValidationFailed, WrongTask
from core.estimate import device_class, train_memory_bytes
from core.inference import ServerCall
from core.spec import LM_CHECKPOINT_TASKS, JobSpec
from worker.engine import export as ex
from worker.engine.calibrate import calibrate
from worker.engine.generate import DeadlineExceeded
from worker.engine.trainer import is_out_of_memory
from worker.serve.models import LoadedModel
from worker.serve.routes import ServeState, run_call

router = APIRouter()

#: Shapes whose calibration the server remembers.
CACHE_SIZE = 128
#: Share of the host's available memory (CPU) / the GPU's free memory a calibration may use.
CPU_MEMORY_SHARE = 0.5
CUDA_MEMORY_SHARE = 0.9


class ExportCall(ServerCall):
    format: Literal["safetensors", "onnx"]


@router.post("/export", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
def export_route(call: ExportCall, request: Request) -> Response:
    """The exported file (module docstring)."""

    def work(loaded: LoadedModel, _: Callable[[], bool]) -> bytes:
        if loaded.task not in LM_CHECKPOINT_TASKS:
            raise WrongTask(f"export covers language-model jobs; this checkpoint is of a "
                            f"{loaded.task!r} job")
        with torch.no_grad():
            if call.format == "safetensors":
                return ex.to_safetensors(loaded.ckpt)
            return ex.to_onnx(loaded.ckpt)

    data = run_call(request, call, work)
    return Response(content=data, media_type=ex.MEDIA_TYPES[call.format],
                    headers={"X-Export-SHA256": hashlib.sha256(data).hexdigest(),
                             "X-Export-Format": call.format})


class CalibrateCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: JobSpec
    vocab_size: int = Field(ge=1, le=100_000_000, description="tokens of the vocabulary")
    steps: int = Field(default=3, ge=1, le=50, description="timed steps after one warm-up")
    deadline_s: float = Field(gt=0, allow_inf_nan=False, description="seconds")


class CalibrateResult(BaseModel):
    seconds_per_step: float = Field(description="mean of the timed steps, seconds")
    steps: int = Field(description="timed steps")
    device: str
    tokens_per_s: float = Field(description="batch_size x seq_len / seconds_per_step")
    cached: bool = Field(description="an earlier calibration of the same shape")


class DeviceMismatch(Conflict):
    code = "device_mismatch"


_cache: OrderedDict[tuple[Any, ...], CalibrateResult] = OrderedDict()
_cache_lock = threading.Lock()


def shape_key(spec: JobSpec, vocab_size: int, device: torch.device) -> tuple[Any, ...]:
    """What a step's time depends on: the model's shape, the batch, the precision, the
    optimizer's kind, gradient clipping, the thread count and the device."""
    m, t, o = spec.model, spec.training, spec.optimizer
    return (vocab_size, m.embed_dim, m.hidden_dim, m.num_layers, m.dropout > 0, m.tie_weights,
            t.batch_size, t.seq_len, t.precision, t.grad_clip is not None, t.num_threads,
            o.name, o.momentum > 0, o.nesterov, str(device))


def _available_bytes(device: torch.device) -> int | None:
    """Memory a calibration may take on ``device`` (None: unknown, not checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_SHARE)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                   * CPU_MEMORY_SHARE)
    except (ValueError, OSError, AttributeError):
        return None


def _too_large(message: str) -> ValidationFailed:
    return ValidationFailed(message, code="calibration_too_large", field="training.batch_size")


@router.post("/calibrate", response_model=CalibrateResult)
def calibrate_route(call: CalibrateCall, request: Request) -> CalibrateResult:
    """Seconds per training step of ``spec``'s shape on this server's device (module
    docstring)."""
    end = time.monotonic() + call.deadline_s
    state: ServeState = request.app.state.inference
    device = state.cache.device
    wanted = device_class(call.spec.training.device)
    if wanted is not None and wanted != device.type:
        raise DeviceMismatch(f"the job asks for {call.spec.training.device!r} and this "
                             f"inference server runs on {device.type}; its time per step "
                             f"would not be the job's")
    key = shape_key(call.spec, call.vocab_size, device)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit.model_copy(update={"cached": True})
    need = train_memory_bytes(call.spec, call.vocab_size)
    have = _available_bytes(device)
    if have is not None and need > have:
        raise _too_large(f"a training step of this shape needs about {need:,} bytes; this "
                         f"inference server can spare {have:,} on {device} for a calibration")
    if not state.compute.acquire(timeout=max(0.0, end - time.monotonic())):
        raise DeadlineExceeded(f"the calibration did not start within its deadline of "
                               f"{call.deadline_s:g} s (the server is busy)")
    try:
        cal = calibrate(call.spec, call.vocab_size, device, call.steps,
                        should_stop=lambda: time.monotonic() >= end)
    except DeadlineExceeded as exc:
        raise DeadlineExceeded(f"the calibration did not finish within its deadline of "
                               f"{call.deadline_s:g} s") from exc
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise _too_large(f"a training step of this shape ran out of memory on {device}: "
                         f"{str(exc).strip().splitlines()[0][:200]}") from None
    finally:
        state.compute.release()
    out = CalibrateResult(seconds_per_step=cal.seconds_per_step, steps=cal.steps,
                          device=cal.device, tokens_per_s=cal.tokens_per_s, cached=False)
    with _cache_lock:
        _cache[key] = out
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return out
