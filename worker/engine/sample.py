"""Sampling text from a checkpoint (any kind: weights and tokenizer are always in it); the
sampling itself is :func:`worker.engine.generate.generate`."""

from __future__ import annotations

from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.generate import check_sampling, generate


def sample(checkpoint_bytes: bytes, prompt: str = "", max_new_tokens: int = 200,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
           device: str = "cpu", top_p: float | None = None) -> str:
    """Return ``prompt`` followed by ``max_new_tokens`` sampled tokens, decoded.

    Each token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k``
    most likely ids (all when None or 0) and then to the nucleus ``top_p`` (all when None);
    ``temperature == 0`` is greedy decoding; ``<unk>`` is never drawn, and byte-level BPE text
    never ends in half a character (:mod:`worker.engine.generate`). ``seed`` makes the draw
    reproducible. Raises ``TrainingError("invalid_checkpoint")`` for a file that is not a
    checkpoint and ``ValueError`` for a negative temperature, max_new_tokens or top_k, or a
    top_p outside (0, 1].
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    ckpt = load_checkpoint(checkpoint_bytes)
    model = build_model_from_checkpoint(ckpt, device)
    out = generate(model, ckpt.tokenizer, prompt, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return prompt + out.samples[0].text
