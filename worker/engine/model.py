"""The LSTM language model: Embedding -> dropout -> LSTM -> dropout -> Linear.

After PyTorch's ``examples/word_language_model/model.py`` (``RNNModel``), with optional weight
tying (Press & Wolf 2017, Inan et al. 2017), which needs ``embed_dim == hidden_dim``.

Initialisation (:meth:`LSTMLanguageModel.init_weights`). By default every layer keeps its own
scale, PyTorch's layer defaults (``nn.Embedding``: N(0, 1); ``nn.LSTM`` and ``nn.Linear``:
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = ``hidden_dim``). The word-level example's
U(-0.1, 0.1) for the embedding and decoder (``init_range=0.1``) is right for wide embeddings
and large vocabularies but not for every job: with a narrow embedding (16 wide) the input's
share of the gate pre-activations is tens of times weaker in variance than the recurrent
share (docs/benchmarks.md, "Robust defaults"), and a character model
learned on a carried hidden state never recovered from the zero state that evaluation and
sampling start from (validation 2.07 nats against 0.73 with the layer defaults on the same run;
docs/benchmarks.md, "Robust defaults"). A tied matrix serves as both embedding and decoder, so
it takes the decoder's scale, U(-1/sqrt(d), 1/sqrt(d)). With that default the decoder bias
then starts at the log unigram distribution of the training split
(:meth:`LSTMLanguageModel.init_output_bias`), so the first step already predicts as well as
token frequencies do instead of uniformly over the vocabulary: "initialise the final layer's
bias to the log class priors" (Karpathy, "A Recipe for Training Neural Networks", 2019). On
WikiText-2 at the word_language_model example's budget this is the difference between a
validation perplexity of 625 and 337 after the first 155 steps (docs/benchmarks.md).
"""

from __future__ import annotations

import math
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
    init_range: float | None = None  # None: each layer's PyTorch default scale

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LSTMLanguageModel(nn.Module):
    """Next-token model over a vocabulary of ``vocab_size`` ids.

    ``dropout`` applies to the embedding output, between LSTM layers and to the LSTM output.
    Raises ``ValueError`` when ``tie_weights`` and ``embed_dim != hidden_dim``.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int,
                 dropout: float = 0.0, tie_weights: bool = False,
                 init_range: float | None = None) -> None:
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
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise the embedding and decoder (the LSTM keeps PyTorch's default
        U(-1/sqrt(hidden_dim), 1/sqrt(hidden_dim))); see the module docstring."""
        r = self.config.init_range
        if r is not None:  # the word_language_model example's scheme
            nn.init.uniform_(self.encoder.weight, -r, r)
            nn.init.uniform_(self.decoder.weight, -r, r)
            nn.init.zeros_(self.decoder.bias)
        elif self.config.tie_weights:
            bound = 1.0 / math.sqrt(self.config.embed_dim)
            nn.init.uniform_(self.encoder.weight, -bound, bound)
            nn.init.uniform_(self.decoder.bias, -bound, bound)
        else:
            self.encoder.reset_parameters()  # N(0, 1)
            self.decoder.reset_parameters()  # U(+-1/sqrt(hidden_dim)), weight and bias

    @torch.no_grad()
    def init_output_bias(self, counts: torch.Tensor) -> None:
        """Set the decoder bias to the log of the add-one smoothed unigram distribution given
        by ``counts`` ((vocab,) token counts of the training split), centred to mean zero
        (the softmax ignores a constant)."""
        logp = (counts.double() + 1.0).log() - math.log(float(counts.sum()) + counts.numel())
        self.decoder.bias.copy_((logp - logp.mean()).to(self.decoder.bias.dtype))

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


def unigram_counts(ids: torch.Tensor, vocab_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Token counts (vocab_size,) int64 of ``ids`` (N,) (any integer dtype, e.g. a memory-mapped
    uint16 split), counted ``chunk`` tokens at a time so that no int64 copy of the whole split
    is made."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, ids.numel(), chunk):
        counts += torch.bincount(ids[start:start + chunk].long(), minlength=vocab_size)
    return counts
