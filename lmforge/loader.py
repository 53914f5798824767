"""Load a trained LMForge model outside the service: ``lmforge.load(path)``.

Needs only ``torch``, ``safetensors`` and ``tokenizers`` (not the service's packages: this
module imports nothing else of LMForge, so it can be copied on its own next to a model)::

    import lmforge

    lm = lmforge.load("model.safetensors")           # GET .../export?format=safetensors
    print(lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=40, seed=1))
    print(lm.score("To be, or not to be")["ppl"])     # perplexity of a text
    ids = lm.tokenizer.encode("To be")                # list[int]; decode(ids) -> str
    logits, state = lm.model(torch.tensor([ids]))     # (1, 5, vocab), ((L, 1, H), (L, 1, H))

``path`` is an exported model (format ``lmforge.model.v1``, :mod:`worker.engine.export`) or a
training checkpoint as downloaded (``lmforge.checkpoint.v1``): both hold the weights, the
model's configuration and the tokenizer in one safetensors file.

The model is the service's Embedding -> LSTM -> Linear network (parameter names and shapes
of ``worker.engine.model.LSTMLanguageModel``; dropout does not apply at inference). The
tokenizers are rebuilt from their JSON: ``char`` (id 0 ``<unk>``, decoded as U+FFFD, then one
id per character), ``word`` (``<unk>`` 0, ``<eos>`` 1 at each line end, whitespace-split
words) and ``bpe`` (Hugging Face ``tokenizers``, byte level, ``Tokenizer.from_str``).
``generate`` and ``score`` compute what the service's ``worker.engine.generate`` does (the
same start context, masks, ``torch.multinomial`` draws from a generator seeded with ``seed``;
scoring from a zero state), so the same seed gives the same text as ``lmforge sample`` and
``POST /v1/jobs/{id}/generate`` on the same device; ``tests/engine/test_export.py`` checks
both against the engine. The code is repeated here, not imported, so that this module needs
nothing of the service.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

MODEL_FORMAT = "lmforge.model.v1"
CHECKPOINT_FORMAT = "lmforge.checkpoint.v1"
UNK, EOS = "<unk>", "<eos>"

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden_dim)


class LSTMLanguageModel(nn.Module):
    """``ids`` (batch, seq_len) int64 -> logits (batch, seq_len, vocab_size) and the new state
    ((num_layers, batch, hidden_dim) twice); ``state=None`` starts from zeros."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int,
                 tie_weights: bool = False, **_: Any) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def forward(self, ids: torch.Tensor, state: State | None = None
                ) -> tuple[torch.Tensor, State]:
        out, state = self.lstm(self.encoder(ids), state)
        return self.decoder(out), state


class Tokenizer(Protocol):
    kind: str
    unk_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.itos = [UNK, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos) if i > 0}
        self.unk_id: int | None = 0

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("\ufffd" if i == 0 else self.itos[i] for i in ids)


class WordTokenizer:
    kind = "word"

    def __init__(self, words: list[str]) -> None:
        self.itos = [UNK, EOS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk_id: int | None = 0

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for line in text.splitlines():
            out.extend(self.stoi.get(w, 0) for w in line.split())
            out.append(1)
        return out

    def decode(self, ids: list[int]) -> str:
        lines: list[str] = []
        cur: list[str] = []
        for i in ids:
            if i == 1:
                lines.append(" ".join(cur) + "\n")
                cur = []
            else:
                cur.append(self.itos[i])
        return "".join(lines) + " ".join(cur)


class BPETokenizer:
    kind = "bpe"

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.unk_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        out: list[int] = []  # line by line, as trained (merges never span a line end)
        for enc in self.hf.encode_batch(text.splitlines(keepends=True),
                                        add_special_tokens=False):
            out.extend(enc.ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=False))


def tokenizer_from_json(text: str) -> Tokenizer:
    """A tokenizer from the ``tokenizer`` metadata. Raises ``ValueError`` for an unknown one."""
    doc = json.loads(text)
    kind = doc.get("kind")
    if kind == "char":
        return CharTokenizer(list(doc["chars"]))
    if kind == "word":
        return WordTokenizer(list(doc["words"]))
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(doc["hf"])))
    raise ValueError(f"unknown tokenizer kind {kind!r}")


# -- byte-level BPE and UTF-8 (as worker.engine.generate) ------------------------------------

def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (openai/gpt-2, ``src/encoder.py``), the
    byte <-> character map of the ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
          *range(ord("\u00ae"), ord("\u00ff") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _utf8_transitions() -> torch.Tensor:
    """(8, 256) int64: the UTF-8 automaton of RFC 3629 section 4 (state 0: between
    characters; -1: invalid)."""
    t = torch.full((8, 256), -1, dtype=torch.long)
    t[0, 0x00:0x80] = 0
    t[0, 0xC2:0xE0] = 1
    t[0, 0xE0] = 4
    t[0, 0xE1:0xED] = 2
    t[0, 0xED] = 5
    t[0, 0xEE:0xF0] = 2
    t[0, 0xF0] = 6
    t[0, 0xF1:0xF4] = 3
    t[0, 0xF4] = 7
    t[1, 0x80:0xC0] = 0
    t[2, 0x80:0xC0] = 1
    t[3, 0x80:0xC0] = 2
    t[4, 0xA0:0xC0] = 1
    t[5, 0x80:0xA0] = 1
    t[6, 0x90:0xC0] = 2
    t[7, 0x80:0x90] = 2
    return t


class _Utf8:
    """A byte-level vocabulary's token bytes and ``next_state`` (8, vocab): the automaton's
    state after each token from each state, -1 where the token would make invalid UTF-8."""

    def __init__(self, hf: Any) -> None:
        dec = _byte_decoder()
        vocab = int(hf.get_vocab_size())
        self.token_bytes = [bytes(dec[c] for c in str(hf.id_to_token(i))) for i in range(vocab)]
        width = max((len(b) for b in self.token_bytes), default=0)
        padded = torch.full((vocab, max(width, 1)), -1, dtype=torch.long)  # bytes, -1 after
        for i, b in enumerate(self.token_bytes):
            if b:
                padded[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
        table = _utf8_transitions()
        nxt = torch.arange(8).unsqueeze(1).expand(8, vocab).clone()
        for pos in range(width):  # one byte position of every token at a time
            col = padded[:, pos].expand(8, vocab)
            stepped = table[nxt.clamp(min=0), col.clamp(min=0)]
            nxt = torch.where((col >= 0) & (nxt >= 0), stepped, nxt)
        nxt[:, torch.tensor([not b for b in self.token_bytes], dtype=torch.bool)] = -1
        self.next_state = nxt

    def complete_text(self, ids: list[int]) -> str:
        """The text of ``ids`` without an unfinished last character."""
        data = b"".join(self.token_bytes[i] for i in ids)
        cut, back = len(data), 0
        while back < min(3, cut) and 0x80 <= data[cut - 1 - back] < 0xC0:
            back += 1
        if back < cut:
            lead = data[cut - 1 - back]
            need = 3 if lead >= 0xF0 else 2 if lead >= 0xE0 else 1 if lead >= 0xC0 else 0
            if need > back:
                cut -= back + 1
        return data[:cut].decode("utf-8", errors="replace")


def _next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None,
                      top_p: float | None, allowed: torch.Tensor) -> torch.Tensor:
    """(1, vocab) logits -> the sampling distribution: disallowed tokens masked, divided by
    ``temperature`` (0: greedy), the ``top_k`` most likely, the nucleus ``top_p`` (Holtzman
    et al. 2020, section 3.1), renormalised."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        out = torch.zeros_like(logits)
        out.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
        return out
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted),
                                  0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _check_sampling(temperature: float, max_new_tokens: int, top_k: int | None,
                    top_p: float | None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)) or max_new_tokens < 0:
        raise ValueError("temperature and max_new_tokens must be >= 0")
    if top_k is not None and top_k < 0:
        raise ValueError("top_k must be >= 1 (or 0 / None for the whole vocabulary)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")


@dataclass
class LoadedModel:
    """What :func:`load` returns: ``model`` (in eval mode), ``tokenizer``, ``config`` (the
    model configuration) and the file's ``metadata``."""

    model: LSTMLanguageModel
    tokenizer: Tokenizer
    config: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _utf8: _Utf8 | None = field(default=None, repr=False)

    def _start_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        ids = tok.encode(prompt) if prompt else []
        if tok.kind == "word" and ids and not prompt.endswith("\n"):
            ids = ids[:-1]  # the word tokenizer ends every line with <eos>: continue the line
        if not ids:  # no prompt: start after a line end when the vocabulary has one
            nl = tok.encode("\n")
            ids = nl[-1:] if nl else [0]
        return ids

    @torch.no_grad()
    def generate(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, top_p: float | None = None) -> str:
        """The ``max_new_tokens`` tokens sampled after ``prompt``, decoded (the prompt not
        included). Each is drawn with ``torch.multinomial`` (a generator seeded with ``seed``)
        from ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens (None or
        0: all), then the nucleus ``top_p`` (None: all); ``temperature == 0`` is greedy.
        ``<unk>`` is never drawn; byte-level BPE draws only tokens that keep the text valid
        UTF-8 and drops an unfinished last character. Raises ``ValueError`` for a negative
        temperature, max_new_tokens or top_k, or a top_p outside (0, 1]."""
        _check_sampling(temperature, max_new_tokens, top_k, top_p)
        tok, dev = self.tokenizer, self.device
        if isinstance(tok, BPETokenizer) and self._utf8 is None:
            self._utf8 = _Utf8(tok.hf)
        utf8 = self._utf8 if isinstance(tok, BPETokenizer) else None
        gen = torch.Generator(device=dev).manual_seed(seed)
        logits, state = self.model(torch.tensor([self._start_ids(prompt)], device=dev))
        last = logits[:, -1]  # (1, vocab)
        allowed = torch.ones(last.shape, dtype=torch.bool, device=dev)
        if tok.unk_id is not None and last.shape[-1] > 1:
            allowed[:, tok.unk_id] = False
        next_state = None if utf8 is None else utf8.next_state.to(dev)
        u = torch.zeros(1, dtype=torch.long, device=dev)  # the UTF-8 automaton's state
        out: list[int] = []
        for step in range(max_new_tokens):
            ok = allowed if next_state is None else allowed & (next_state[u] >= 0)
            probs = _next_token_probs(last, temperature, top_k, top_p, ok)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (1,)
            out.append(int(nxt))
            if next_state is not None:
                u = next_state[u, nxt]
            if step + 1 < max_new_tokens:
                logits, state = self.model(nxt.unsqueeze(1), state)
                last = logits[:, -1]
        return utf8.complete_text(out) if utf8 is not None else self._text(prompt, out)

    def _text(self, prompt: str, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        if self.tokenizer.kind == "word" and prompt and text and not prompt[-1].isspace() \
                and not text.startswith("\n"):
            text = " " + text  # a word continuing the prompt's line
        return text

    @torch.no_grad()
    def score(self, text: str) -> dict[str, Any]:
        """How well the model predicts ``text``: its tokens ``t_0 .. t_{N-1}``, each ``t_i``
        for ``i >= 1`` predicted from those before it, from a zero state (as the service's
        ``POST /v1/jobs/{id}/score``). ``loss``: mean cross-entropy, nats per predicted token;
        ``ppl``: ``exp(loss)`` (inf past a float); ``bpc``: ``loss / ln 2`` for a char model,
        else None; ``num_tokens``: N - 1; ``per_token``: each predicted token's cross-entropy
        (nats). Raises ``ValueError`` when the text encodes to fewer than 2 tokens."""
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise ValueError(f"the text encodes to {len(ids)} token(s); scoring needs at least "
                             "2 (the first token is not predicted)")
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(x[:, :-1])  # (1, N - 1, vocab)
        per = torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:], reduction="none")
        loss = float(per.double().sum()) / per.numel()
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = math.inf
        return {"loss": loss, "ppl": ppl,
                "bpc": loss / math.log(2.0) if self.tokenizer.kind == "char" else None,
                "num_tokens": per.numel(), "per_token": per.tolist()}


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model or a training checkpoint (module docstring) onto ``device``.
    Raises ``ValueError`` for a safetensors file that is neither (and the errors of
    ``safetensors`` for one that is not safetensors at all)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    fmt = meta.get("format")
    if fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{os.fspath(path)!r} is not an LMForge model: its format is {fmt!r}, "
                         f"expected {MODEL_FORMAT!r} (or a checkpoint, {CHECKPOINT_FORMAT!r})")
    config = json.loads(meta["model_config"])
    tensors = load_file(os.fspath(path), device="cpu")
    if fmt == CHECKPOINT_FORMAT:
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model = LSTMLanguageModel(**config)
    tied = {"decoder.weight"} if config.get("tie_weights") else set()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - tied or unexpected:
        raise ValueError(f"the weights do not fit the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    dev = torch.device(device)
    return LoadedModel(model.to(dev).eval(), tokenizer_from_json(meta["tokenizer"]), config,
                       meta, dev)
