"""The LSTM language model: Embedding -> dropout -> LSTM -> dropout -> Linear.

After PyTorch's ``examples/word_language_model/model.py`` (``RNNModel``): uniform
``(-init_range, init_range)`` initialisation of the encoder and decoder weights, zero decoder
bias, LSTM weights left at PyTorch's default, optional weight tying (Press & Wolf 2017,
Inan et al. 2017) which needs ``embed_dim == hidden_dim``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Hidden = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden_dim)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    num_layers: int
    dropout: float
    tie_weights: bool
    init_range: float = 0.1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LSTMLanguageModel(nn.Module):
    """Next-token model over a vocabulary of ``vocab_size`` ids.

    ``dropout`` applies to the embedding output, between LSTM layers and to the LSTM output.
    Raises ``ValueError`` when ``tie_weights`` and ``embed_dim != hidden_dim``.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int,
                 dropout: float = 0.0, tie_weights: bool = False,
                 init_range: float = 0.1) -> None:
        super().__init__()
        if tie_weights and embed_dim != hidden_dim:
            raise ValueError(f"tie_weights needs embed_dim == hidden_dim "
                             f"(got {embed_dim} and {hidden_dim})")
        self.config = ModelConfig(vocab_size, embed_dim, hidden_dim, num_layers, dropout,
                                  tie_weights, init_range)
        self.dropout = dropout
        self.encoder = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor, hidden: Hidden | None = None
                ) -> tuple[torch.Tensor, Hidden]:
        """x: (batch, seq) int64 token ids -> logits (batch, seq, vocab), new hidden state
        ((num_layers, batch, hidden_dim) twice). ``hidden=None`` starts from zeros."""
        emb = self.encoder(x)  # (batch, seq, embed_dim)
        if self.dropout > 0:
            emb = F.dropout(emb, self.dropout, self.training)
        out, hidden = self.lstm(emb, hidden)  # (batch, seq, hidden_dim)
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.decoder(out), hidden

    def num_params(self) -> int:
        """Distinct trainable-or-not parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig) -> LSTMLanguageModel:
    return LSTMLanguageModel(config.vocab_size, config.embed_dim, config.hidden_dim,
                             config.num_layers, config.dropout, config.tie_weights,
                             config.init_range)
