"""The inference server's cache of loaded checkpoints: least recently used first out, keyed by
the checkpoint's sha256, each read from storage (:mod:`store.storage`) and checked against
that sha256 before it is parsed."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import LMForgeError, ServiceUnavailable
from core.inference import CheckpointRef
from store.storage import BlobCorrupt, Storage
from worker.engine.checkpoint import (
    LoadedCheckpoint,
    build_model_from_checkpoint,
    load_checkpoint,
)
from worker.engine.generate import Utf8Table
from worker.engine.model import LSTMLanguageModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checkpoint ready for inference. ``ckpt`` keeps the spec, tokenizer and weights (no
    optimizer state); ``model`` (eval mode, on ``device``) and ``utf8`` are built on first use
    by :meth:`lm` (language-model jobs only: a classifier's checkpoint is handed whole to
    ``worker.engine.classifier``)."""

    ckpt: LoadedCheckpoint
    device: torch.device
    model: LSTMLanguageModel | None = None
    utf8: Utf8Table | None = None
    classifier: Any = None  # worker.engine.classifier's loaded model, for classify jobs

    @property
    def task(self) -> str:
        return self.ckpt.spec.task

    def lm(self) -> tuple[LSTMLanguageModel, Utf8Table | None]:
        if self.model is None:
            model = build_model_from_checkpoint(self.ckpt, self.device).eval()
            if self.ckpt.tokenizer.kind == "bpe":
                self.utf8 = Utf8Table.for_tokenizer(self.ckpt.tokenizer)
            self.model = model
        return self.model, self.utf8


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelCache:
    """At most ``size`` loaded checkpoints. :meth:`get` is safe to call from several threads
    (one lock; a miss loads under it, so one checkpoint is never loaded twice at once)."""

    def __init__(self, storage: Storage, size: int, device: torch.device) -> None:
        self.storage = storage
        self.size = size
        self.device = device
        self._items: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # checkpoints read from storage so far (hits do not count)

    def keys(self) -> list[str]:
        """The cached sha256s, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, ref: CheckpointRef) -> LoadedModel:
        """The loaded checkpoint ``ref``. Raises :class:`ServiceUnavailable` ``blob_missing``
        when storage lacks the blob, ``checkpoint_corrupt`` when its bytes do not match
        ``ref.sha256``, and ``LMForgeError`` ``invalid_checkpoint`` (422) for a file that
        is not an lmforge checkpoint."""
        with self._lock:
            hit = self._items.get(ref.sha256)
            if hit is not None:
                self._items.move_to_end(ref.sha256)
                return hit
            loaded = self._load(ref)
            self._items[ref.sha256] = loaded
            while len(self._items) > self.size:
                old, _ = self._items.popitem(last=False)
                log.info("inference cache: evicted checkpoint %s", old[:12])
            return loaded

    def _load(self, ref: CheckpointRef) -> LoadedModel:
        try:
            data = self.storage.read_bytes(ref.storage_key)
        except BlobCorrupt as exc:  # an object store's own sha256 check failed
            raise ServiceUnavailable(f"checkpoint {ref.id} is damaged in storage (its sha256 "
                                     "does not match); use another checkpoint of this job",
                                     code="checkpoint_corrupt") from exc
        except (FileNotFoundError, ValueError) as exc:
            raise ServiceUnavailable(f"the blob of checkpoint {ref.id} is missing from storage",
                                     code="blob_missing") from exc
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ServiceUnavailable(f"checkpoint {ref.id} is damaged in storage (its sha256 "
                                     "does not match); use another checkpoint of this job",
                                     code="checkpoint_corrupt")
        try:
            ckpt = load_checkpoint(data)
        except Exception as exc:
            raise LMForgeError(str(getattr(exc, "message", exc)), code="invalid_checkpoint"
                               ) from exc
        # Keep only what inference needs: no optimizer state, RNG or carried hidden state.
        ckpt = dataclasses.replace(ckpt, optimizer_state=None, rng={}, hidden=None,
                                   best_state={})
        self.loads += 1
        log.info("inference cache: loaded checkpoint %s (%s, %d bytes)", ref.id, ref.sha256[:12],
                 len(data))
        return LoadedModel(ckpt, self.device)
