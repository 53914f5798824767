"""Sampling text from a checkpoint (any kind: weights and tokenizer are always in it)."""

from __future__ import annotations

import torch

from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.tokenizers import Tokenizer


def _start_ids(tok: Tokenizer, prompt: str) -> list[int]:
    ids = tok.encode(prompt) if prompt else []
    if tok.kind == "word" and ids and not prompt.endswith("\n"):
        ids = ids[:-1]  # the word tokenizer ends every line with <eos>: continue the line
    if not ids:  # no prompt: start after a line end when the vocabulary has one
        nl = tok.encode("\n")
        ids = nl[-1:] if nl else [0]
    return ids


@torch.no_grad()
def sample(checkpoint_bytes: bytes, prompt: str = "", max_new_tokens: int = 200,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
           device: str = "cpu") -> str:
    """Return ``prompt`` followed by ``max_new_tokens`` sampled tokens, decoded.

    Each token is drawn from ``softmax(logits / temperature)`` restricted to the ``top_k``
    most likely ids (all when None or 0); ``temperature == 0`` is greedy decoding. ``seed``
    makes the draw reproducible. Raises ``TrainingError("invalid_checkpoint")`` for a file
    that is not a checkpoint and ``ValueError`` for a negative temperature, max_new_tokens or top_k.
    """
    if temperature < 0 or max_new_tokens < 0:
        raise ValueError("temperature and max_new_tokens must be >= 0")
    if top_k is not None and top_k < 0:
        raise ValueError("top_k must be >= 1 (or 0 / omitted for the whole vocabulary)")
    ckpt = load_checkpoint(checkpoint_bytes)
    tok = ckpt.tokenizer
    model = build_model_from_checkpoint(ckpt, device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = _start_ids(tok, prompt)
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, prompt_len)
    logits, hidden = model(x)
    out: list[int] = []
    for _ in range(max_new_tokens):
        last = logits[0, -1].float()  # (vocab,)
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            last = last / temperature
            if top_k:
                kth = last.topk(min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = int(torch.multinomial(last.softmax(-1), 1, generator=gen))
        out.append(nxt)
        logits, hidden = model(torch.tensor([[nxt]], device=device), hidden)
    text = tok.decode(out)
    if tok.kind == "word" and prompt and text and not prompt[-1].isspace() \
            and not text.startswith("\n"):
        text = " " + text
    return prompt + text
