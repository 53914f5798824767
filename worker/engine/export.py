"""Exporting a checkpoint for use outside the service: a clean safetensors file or ONNX.

Any checkpoint kind (``best``, ``last``, ``periodic``) exports the weights it holds under
``model.*`` (:mod:`worker.engine.checkpoint`); optimizer state, generator states, the carried
hidden state and a resumable checkpoint's ``best.*`` copy are left out.

**safetensors** (:func:`to_safetensors`, format :data:`MODEL_FORMAT`): the tensors of
``LSTMLanguageModel.state_dict()`` under their own names (``encoder.weight``,
``lstm.weight_ih_l0``, ..., ``decoder.bias``; a tied ``decoder.weight`` is the embedding matrix
and is stored once, as ``encoder.weight``), float32. Header metadata, all strings:
``format`` (``lmforge.model.v1``), ``model_config`` (JSON of
:class:`~worker.engine.model.ModelConfig`), ``tokenizer`` (JSON of ``Tokenizer.to_json``),
``checkpoint_kind`` and ``step`` (where the weights come from). :func:`lmforge.load` reads it
with torch, safetensors and tokenizers only.

**ONNX** (:func:`to_onnx`): inputs ``input_ids`` (batch, seq_len) int64, ``h0`` and ``c0``
(num_layers, batch, hidden_dim) float32 (zeros to start a text); outputs ``logits``
(batch, seq_len, vocab_size) float32 and ``h``, ``c`` (num_layers, batch, hidden_dim), the state
to pass as ``h0``/``c0`` with the next chunk. ``batch`` and ``seq_len`` are dynamic axes. The
model's ``metadata_props`` hold ``format``, ``model_config`` and ``tokenizer`` as above.

Which exporter: torch 2.13's ``torch.onnx.export`` defaults to ``dynamo=True``, the
``torch.export``-based exporter, which needs the ``onnxscript`` package. With it installed it
still cannot give this model a dynamic ``seq_len``: ``torch.export`` specialises the sequence
length of ``nn.LSTM`` to the example input's (a ``Dim`` on it is a "constraint violated"
error; the ONNX exporter's fallback then declares the example's length as the output's static
``seq_len``, and onnxruntime warns on every other length), and it took 9 s against 0.2 s for
a 2-layer model on this machine. The TorchScript exporter (``dynamo=False``) maps ``nn.LSTM``
to one ONNX ``LSTM`` operator per layer with dynamic batch and sequence axes and needs no
extra package, so it is used here (it is deprecated in torch 2.9+ and warns so; torch is
pinned at 2.13.0). The ``onnx`` package adds the metadata and checks the model.
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import save as st_save

from worker.engine.checkpoint import (
    TIED_KEY,
    LoadedCheckpoint,
    build_model_from_checkpoint,
    load_checkpoint,
)
from worker.engine.model import Hidden, LSTMLanguageModel

#: The ``format`` of an exported model (safetensors header metadata, ONNX metadata_props).
MODEL_FORMAT = "lmforge.model.v1"
#: ONNX operator set of :func:`to_onnx` (``LSTM`` is unchanged since opset 14; onnxruntime
#: has run opset 17 since 1.14).
ONNX_OPSET = 17

ExportFormat = Literal["safetensors", "onnx"]
FORMATS: tuple[ExportFormat, ...] = ("safetensors", "onnx")
MEDIA_TYPES: dict[str, str] = {"safetensors": "application/octet-stream",
                               "onnx": "application/octet-stream"}
SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "onnx": ".onnx"}

_onnx_lock = threading.Lock()  # the TorchScript exporter keeps global state


class NotExportable(ValueError):
    """A checkpoint this module cannot export (code ``not_exportable``)."""

    code = "not_exportable"


def _check_language_model(ckpt: LoadedCheckpoint) -> None:
    """Raises :class:`NotExportable` for a checkpoint of a job whose model is not the
    language model (``task: classify``)."""
    task = ckpt.spec.task
    if task not in ("lm", "ppo"):  # a PPO job's checkpoint holds its policy, an LM
        raise NotExportable(f"export covers language-model checkpoints; this one is of a "
                            f"{task!r} job")


def model_tensors(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The model's weights by ``state_dict`` name, float32, contiguous, on the CPU; a tied
    decoder weight left out (it is ``encoder.weight``)."""
    _check_language_model(ckpt)
    model = build_model_from_checkpoint(ckpt)  # checks the weights fit the config
    sd = model.state_dict()
    if ckpt.model_config.tie_weights:
        sd.pop(TIED_KEY)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


def model_metadata(ckpt: LoadedCheckpoint) -> dict[str, str]:
    """The metadata of an exported model (module docstring)."""
    return {
        "format": MODEL_FORMAT,
        "model_config": json.dumps(ckpt.model_config.as_dict()),
        "tokenizer": ckpt.tokenizer.to_json(),
        "checkpoint_kind": ckpt.kind,
        "step": str(int(ckpt.trainer_state.get("step", 0))),
    }


def to_safetensors(ckpt: LoadedCheckpoint) -> bytes:
    """The weights-only safetensors file of ``ckpt`` (module docstring). Raises
    ``TrainingError("invalid_checkpoint")`` when its weights do not fit its config and
    :class:`NotExportable`."""
    return bytes(st_save(model_tensors(ckpt), metadata=model_metadata(ckpt)))


class OnnxLanguageModel(nn.Module):
    """The exported graph: ``(input_ids, h0, c0) -> (logits, h, c)`` with the state explicit
    (ONNX has no optional tuple input)."""

    def __init__(self, model: LSTMLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state: Hidden = (h0, c0)
        logits, (h, c) = self.model(input_ids, state)
        return logits, h, c


ONNX_INPUTS = ("input_ids", "h0", "c0")
ONNX_OUTPUTS = ("logits", "h", "c")
_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "seq_len"}, "logits": {0: "batch", 1: "seq_len"},
    "h0": {1: "batch"}, "c0": {1: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
}


def to_onnx(ckpt: LoadedCheckpoint) -> bytes:
    """The ONNX model of ``ckpt`` (module docstring: inputs, outputs, dynamic axes, metadata,
    why the TorchScript exporter). Raises ``TrainingError("invalid_checkpoint")`` and
    :class:`NotExportable`."""
    import onnx

    _check_language_model(ckpt)
    model = build_model_from_checkpoint(ckpt).eval()
    cfg = ckpt.model_config
    example = (torch.zeros(2, 3, dtype=torch.long),
               torch.zeros(cfg.num_layers, 2, cfg.hidden_dim),
               torch.zeros(cfg.num_layers, 2, cfg.hidden_dim))
    buf = io.BytesIO()
    with _onnx_lock, warnings.catch_warnings(), torch.no_grad():
        # "legacy TorchScript-based ONNX export" (chosen: see the module docstring), and "a
        # batch size other than 1 ... define the initial states as inputs" (they are inputs).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=".*batch_size other than 1")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        # nn.LSTM's Python-side shape checks, constant for a given model: not graph inputs.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter writes to a file object too (its annotation says a path).
        torch.onnx.export(OnnxLanguageModel(model), example, buf,  # type: ignore[arg-type]
                          dynamo=False,
                          input_names=list(ONNX_INPUTS), output_names=list(ONNX_OUTPUTS),
                          dynamic_axes=_DYNAMIC_AXES, opset_version=ONNX_OPSET)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in model_metadata(ckpt).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = ("LMForge LSTM language model: (input_ids[batch, seq_len] int64, "
                        "h0/c0[num_layers, batch, hidden_dim]) -> (logits[batch, seq_len, "
                        "vocab_size], h, c); metadata_props: format, model_config, tokenizer")
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def export_checkpoint(data: bytes, fmt: str) -> bytes:
    """Checkpoint bytes -> the exported file in ``fmt`` (``safetensors`` or ``onnx``). Raises
    ``ValueError`` for another format, ``TrainingError("invalid_checkpoint")`` for bytes that
    are not a checkpoint and :class:`NotExportable` (a ``ValueError``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt = load_checkpoint(data)
    return to_safetensors(ckpt) if fmt == "safetensors" else to_onnx(ckpt)
