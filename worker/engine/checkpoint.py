"""One-file safetensors checkpoints (docs/architecture.md, "Checkpoint format").

Tensors: ``model.<param>`` (a tied decoder weight is stored once, as the encoder's); for
``last``/``periodic`` also ``optim.<i>.<name>`` (optimizer state), ``rng.cpu`` /
``rng.cuda.<i>`` (uint8 generator states) and ``state.h``/``state.c`` (the carried LSTM hidden
state, (num_layers, batch, hidden_dim), so a resume continues exactly). A data-parallel run's
(``resources.gpus`` N > 1) is the same file as one process with the whole batch writes (the
hidden state of all ``batch_size * N`` streams) plus the generator states of ranks 1..N-1 as
``rng.rank<r>.cpu`` / ``rng.rank<r>.cuda`` (ignored by a one-process resume). Header metadata, all
strings: ``format``, ``kind``, ``spec``, ``model_config``, ``tokenizer``, ``trainer_state``
(step, scheduler/early-stopping/best-so-far state, optimizer param groups and the non-tensor
parts of its state). Written with ``safetensors.torch.save`` and read with
``safetensors.torch.load``: nothing is ever pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.contract import TrainingError
from core.spec import JobSpec
from worker.engine.model import LSTMLanguageModel, ModelConfig, build_model
from worker.engine.tokenizers import Tokenizer, tokenizer_from_json

FORMAT = "lmforge.checkpoint.v1"
TIED_KEY = "decoder.weight"


@dataclass
class LoadedCheckpoint:
    kind: str
    spec: JobSpec
    model_config: ModelConfig
    tokenizer: Tokenizer
    trainer_state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # best weights, if kept


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """Detached, contiguous, on the CPU (no copy when it already is): what safetensors saves."""
    return t.detach().to("cpu").contiguous()


def _model_tensors(model: LSTMLanguageModel) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_weights:
        sd.pop(TIED_KEY)  # same storage as encoder.weight; safetensors refuses shared tensors
    return {f"model.{k}": _cpu(v) for k, v in sd.items()}


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = _cpu(value)
            else:
                other.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state_other": other}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                         ) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("state_other", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def encode_checkpoint(kind: str, spec: JobSpec, model_config: dict[str, Any],
                      tokenizer: Tokenizer, tensors: dict[str, torch.Tensor],
                      trainer_state: dict[str, Any],
                      optimizer: torch.optim.Optimizer | None = None,
                      rng_cpu: torch.Tensor | None = None, task: str | None = None) -> bytes:
    """The one writer of every task's checkpoint (language model, classifier, PPO): ``tensors``
    (the task's weights, already ``model.``/``best.``/... prefixed, on the CPU) plus, when
    ``optimizer`` is given (a resumable checkpoint), its flattened state and the CPU (or
    ``rng_cpu``) and CUDA generator states; the header metadata holds the format, ``kind``,
    ``task`` (omitted for language models, the first format), the spec, the model config, the
    tokenizer and ``trainer_state`` (strict JSON: raises ``ValueError`` on Infinity/NaN)."""
    state = dict(trainer_state)
    tensors = dict(tensors)
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        state["optimizer"] = opt_meta
        tensors["rng.cpu"] = (rng_cpu if rng_cpu is not None else torch.get_rng_state()).clone()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
    metadata = {"format": FORMAT, "kind": kind}
    if task is not None:
        metadata["task"] = task
    metadata.update({
        "spec": spec.model_dump_json(),
        "model_config": json.dumps(model_config),
        "tokenizer": tokenizer.to_json(),
        "trainer_state": json.dumps(state, allow_nan=False),  # strict JSON: no Infinity/NaN
    })
    return bytes(st_save(tensors, metadata=metadata))


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the CPU generator (and, on CUDA, every device's) from a resumable checkpoint's
    ``rng`` tensors, so a resumed run draws what the uninterrupted one would."""
    torch.set_rng_state(rng["cpu"])
    cuda_states = [v for k, v in sorted(rng.items()) if k.startswith("cuda.")]
    if device.type == "cuda" and cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)


def restore_rank_rng(rng: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    """Rank ``rank`` (> 0) of a data-parallel run takes its own generator states from a
    checkpoint's ``rng`` tensors (``rank<r>.cpu``, ``rank<r>.cuda``); a checkpoint without
    them (written by one process) gives it rank 0's (:func:`restore_rng`)."""
    own = rng.get(f"rank{rank}.cpu")
    if own is None:
        restore_rng(rng, device)
        return
    torch.set_rng_state(own)
    cuda = rng.get(f"rank{rank}.cuda")
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(kind: str, spec: JobSpec, model: LSTMLanguageModel, tokenizer: Tokenizer,
                    trainer_state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
                    rng_cpu: torch.Tensor | None = None,
                    best_state: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """Serialise a checkpoint to bytes. Weights only when ``optimizer`` is None (``best``).
    ``rng_cpu`` overrides the current CPU generator state (to save a state from before a
    failed step). ``best_state``: the best weights so far, kept as ``best.<param>`` so a resumed
    run can still evaluate the test split with them. ``extra``: more tensors of a resumable
    checkpoint, by full name (a data-parallel run's ``rng.rank<r>.*``)."""
    tensors = _model_tensors(model)
    if optimizer is not None:
        tensors.update({k: _cpu(v) for k, v in (extra or {}).items()})
        for k, v in (best_state or {}).items():
            if not (model.config.tie_weights and k == TIED_KEY):
                tensors[f"best.{k}"] = _cpu(v)
        if hidden is not None:
            tensors["state.h"] = _cpu(hidden[0])
            tensors["state.c"] = _cpu(hidden[1])
    return encode_checkpoint(kind, spec, model.config.as_dict(), tokenizer, tensors,
                             trainer_state, optimizer, rng_cpu)


def read_metadata(data: bytes) -> dict[str, str]:
    """The header metadata of a safetensors file, without loading tensors."""
    if len(data) < 8:
        raise ValueError("file too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def load_checkpoint(data: bytes) -> LoadedCheckpoint:
    """Parse checkpoint bytes. Raises ``TrainingError("invalid_checkpoint")`` for anything that
    is not an lmforge v1 checkpoint."""
    try:
        meta = read_metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        tensors = st_load(data)
        state = json.loads(meta["trainer_state"])
        config = ModelConfig(**json.loads(meta["model_config"]))
        opt = state.pop("optimizer", None)
        return LoadedCheckpoint(
            kind=meta.get("kind", "last"),
            spec=JobSpec.model_validate_json(meta["spec"]),
            model_config=config,
            tokenizer=tokenizer_from_json(meta["tokenizer"]),
            trainer_state=state,
            model_state={k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            optimizer_state=None if opt is None else _unflatten_optimizer(tensors, opt),
            rng={k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
            hidden=(tensors["state.h"], tensors["state.c"]) if "state.h" in tensors else None,
            best_state={k[5:]: v for k, v in tensors.items() if k.startswith("best.")},
        )
    except TrainingError:
        raise
    except Exception as exc:  # any parse failure is the same user-facing error
        raise TrainingError(
            "invalid_checkpoint",
            f"not a readable lmforge checkpoint (a .safetensors file written by lmforge): {exc}",
        ) from exc


def build_model_from_checkpoint(ckpt: LoadedCheckpoint,
                                device: torch.device | str = "cpu") -> LSTMLanguageModel:
    """Rebuild the model and load its weights. Raises ``TrainingError("invalid_checkpoint")``
    when the weights do not match the config."""
    model = build_model(ckpt.model_config)
    try:
        missing, unexpected = model.load_state_dict(ckpt.model_state, strict=False)
    except RuntimeError as exc:
        raise TrainingError("invalid_checkpoint", f"weights do not fit the model: {exc}") from exc
    allowed = {TIED_KEY} if ckpt.model_config.tie_weights else set()
    if set(missing) - allowed or unexpected:
        raise TrainingError("invalid_checkpoint",
                            f"weights do not fit the model: missing {sorted(missing)}, "
                            f"unexpected {sorted(unexpected)}")
    return model.to(device)
