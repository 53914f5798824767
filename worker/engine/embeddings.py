"""Pretrained word embeddings in GloVe text format (``word v1 v2 ... vd`` per line)."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from core.contract import TrainingError
from worker.engine.model import ModelConfig
from worker.engine.tokenizers import Tokenizer

log = logging.getLogger(__name__)


class HasEmbedding(Protocol):
    """A model with an input embedding ``encoder`` of width ``config.embed_dim`` (the language
    model, :class:`worker.engine.model.LSTMLanguageModel`, and the classifier,
    :class:`worker.engine.classifier.LSTMClassifier`)."""

    encoder: torch.nn.Embedding
    config: ModelConfig


def load_pretrained(model: HasEmbedding, tok: Tokenizer, glove_text: str,
                    freeze: bool) -> float:
    """Copy the vectors of vocabulary tokens found in ``glove_text`` into the embedding rows;
    other rows keep their random init. Returns coverage = covered tokens / vocab size.

    Raises ``TrainingError("invalid_spec")`` when the vectors' width differs from
    ``embed_dim`` or the text has no vectors. ``freeze`` stops gradient updates of the
    embedding (and of the decoder too when weights are tied: it is the same matrix).
    """
    dim = model.config.embed_dim
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    weight = model.encoder.weight
    covered: set[int] = set()
    seen_any = False
    with torch.no_grad():
        for lineno, line in enumerate(glove_text.splitlines(), 1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            if not seen_any:
                seen_any = True
                if len(parts) - 1 != dim:
                    raise TrainingError(
                        "invalid_spec",
                        f"pretrained embeddings have {len(parts) - 1} dimensions but "
                        f"model.embed_dim is {dim}; set embed_dim to {len(parts) - 1}")
            if len(parts) - 1 != dim:
                raise TrainingError("invalid_spec",
                                    f"embeddings line {lineno} has {len(parts) - 1} values, "
                                    f"expected {dim}")
            idx = vocab.get(parts[0])
            if idx is None or idx in covered:
                continue
            weight[idx] = torch.tensor([float(v) for v in parts[1:]], dtype=weight.dtype)
            covered.add(idx)
    if not seen_any:
        raise TrainingError("invalid_spec", "the pretrained embeddings file holds no vectors")
    if freeze:
        weight.requires_grad_(False)
    coverage = len(covered) / tok.vocab_size
    log.info("pretrained embeddings cover %d of %d tokens (%.1f%%)", len(covered),
             tok.vocab_size, 100 * coverage)
    return coverage
