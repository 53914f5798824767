"""Generation and scoring with a trained language model (pure PyTorch; used by the inference
server, :mod:`worker.serve`, and by :func:`worker.engine.sample.sample`).

Generation (:func:`generate`): ``num_samples`` continuations of one prompt, sampled together
as one batch. Each next token is drawn from :func:`next_token_probs`: the logits with the
tokens that may not be sampled masked out (``<unk>``; for byte-level BPE, every token whose
bytes would make the text invalid UTF-8), divided by ``temperature``, cut to the ``top_k`` most
likely tokens, then to the nucleus of probability ``top_p`` (the smallest set of most likely
tokens whose probabilities sum to at least ``top_p``: Holtzman et al. 2020, "The Curious Case
of Neural Text Degeneration", section 3.1), renormalised. ``temperature == 0`` is greedy.

Byte-level BPE tokens are byte strings, and a character of 2-4 UTF-8 bytes may be spread over
several tokens. Sampling follows the UTF-8 automaton of RFC 3629 (:class:`Utf8Table`): only
tokens that continue a valid byte sequence can be drawn, and a character still incomplete
after ``max_new_tokens`` is dropped from the text, so sampled text never holds U+FFFD from a
broken sequence and never ends in half a character.

Scoring (:func:`score`): the cross-entropy in nats of each token of a text given the tokens
before it, from a zero hidden state; every token but the first is predicted once, as
:func:`worker.engine.evaluate.evaluate` does on a split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from worker.engine.evaluate import LN2, perplexity
from worker.engine.model import LSTMLanguageModel
from worker.engine.tokenizers import Tokenizer

# Tokens scored per forward pass (the hidden state is carried between windows); the deadline
# is checked between windows.
SCORE_WINDOW = 512


class DeadlineExceeded(Exception):
    """A generation or scoring stopped because its deadline passed (checked before every
    generated token and every scored window)."""


def deadline_after(seconds: float | None) -> Callable[[], bool] | None:
    """A ``should_stop`` that turns True once ``seconds`` (monotonic clock) have passed; None
    for no deadline."""
    if seconds is None:
        return None
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


# -- byte-level BPE and UTF-8 -----------------------------------------------------------------

@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (openai/gpt-2, ``src/encoder.py``), the
    byte <-> character map of Hugging Face ``tokenizers``' ByteLevel pre-tokenizer: the 188
    printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100.. in order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


# The UTF-8 automaton (RFC 3629 section 4, "Syntax of UTF-8 Byte Sequences"): state 0 is
# "between characters"; the others say which bytes may come next. -1 is an error.
UTF8_STATES = 8
_ACCEPT = 0


def _utf8_transitions() -> torch.Tensor:
    """(UTF8_STATES, 256) int64: the next state after a byte, or -1."""
    t = torch.full((UTF8_STATES, 256), -1, dtype=torch.long)
    t[0, 0x00:0x80] = 0
    t[0, 0xC2:0xE0] = 1          # 2-byte lead: one continuation byte to go
    t[0, 0xE0] = 4               # E0 A0..BF: no overlong 3-byte forms
    t[0, 0xE1:0xED] = 2
    t[0, 0xED] = 5               # ED 80..9F: no surrogates
    t[0, 0xEE:0xF0] = 2
    t[0, 0xF0] = 6               # F0 90..BF: no overlong 4-byte forms
    t[0, 0xF1:0xF4] = 3
    t[0, 0xF4] = 7               # F4 80..8F: nothing past U+10FFFF
    t[1, 0x80:0xC0] = 0
    t[2, 0x80:0xC0] = 1
    t[3, 0x80:0xC0] = 2
    t[4, 0xA0:0xC0] = 1
    t[5, 0x80:0xA0] = 1
    t[6, 0x90:0xC0] = 2
    t[7, 0x80:0x90] = 2
    return t


class Utf8Table:
    """For a byte-level BPE vocabulary: each token's bytes, and ``next_state`` (UTF8_STATES,
    vocab) int64, the automaton's state after the token's bytes from each state (-1 where
    they would make invalid UTF-8). Built once per tokenizer (vectorised over the vocabulary:
    one step per byte position)."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        self.token_bytes = token_bytes
        vocab = len(token_bytes)
        width = max((len(b) for b in token_bytes), default=0)
        table = _utf8_transitions()
        padded = torch.full((vocab, max(width, 1)), -1, dtype=torch.long)
        for i, b in enumerate(token_bytes):
            if b:
                padded[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
        nxt = torch.arange(UTF8_STATES).unsqueeze(1).expand(UTF8_STATES, vocab).clone()
        for pos in range(width):
            col = padded[:, pos]  # (vocab,)
            present = (col >= 0).expand(UTF8_STATES, vocab)
            ok = nxt >= 0
            stepped = table[nxt.clamp(min=0), col.clamp(min=0).expand(UTF8_STATES, vocab)]
            nxt = torch.where(present & ok, stepped, nxt)
        empty = torch.tensor([len(b) == 0 for b in token_bytes])
        nxt[:, empty] = -1  # a token with no bytes never advances the text: never sample it
        self.next_state = nxt

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> Utf8Table:
        """The table of a byte-level BPE tokenizer (``tok.kind == "bpe"``). Raises
        ``ValueError`` for a token that is not in the ByteLevel alphabet."""
        dec = byte_decoder()
        out: list[bytes] = []
        for i in range(tok.vocab_size):
            s = tok.id_to_token(i)
            try:
                out.append(bytes(dec[c] for c in s))
            except KeyError as exc:
                raise ValueError(f"token {i} ({s!r}) is not byte-level") from exc
        return cls(out)

    def complete_text(self, ids: list[int]) -> tuple[str, int]:
        """The text of ``ids`` up to the end of its last complete character, and how many of
        its bytes were dropped (0-3: the bytes of an unfinished last character)."""
        data = b"".join(self.token_bytes[i] for i in ids)
        cut = len(data)
        # Back over continuation bytes to the lead byte of the last character, if unfinished.
        back = 0
        while back < min(3, cut) and 0x80 <= data[cut - 1 - back] < 0xC0:
            back += 1
        if back < cut:
            lead = data[cut - 1 - back]
            need = 1 if lead >= 0xC0 else 0
            need = 2 if lead >= 0xE0 else need
            need = 3 if lead >= 0xF0 else need
            if need > back:
                cut -= back + 1
        return data[:cut].decode("utf-8", errors="replace"), len(data) - cut


# -- the next-token distribution --------------------------------------------------------------

def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int = 0, num_samples: int = 1) -> None:
    """Raise ``ValueError`` naming the parameter for a value outside its range."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError("temperature must be a finite number >= 0 (0: greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError("top_k must be >= 1 (or 0 / null for the whole vocabulary)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, allowed: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The sampling distribution (n, vocab) float32 of next-token ``logits`` (n, vocab).

    Order: tokens where ``allowed`` (n, vocab) bool is False get probability 0; then
    ``softmax(logits / temperature)``; the ``top_k`` most likely tokens (None or 0: all); the
    nucleus of ``top_p`` (None or 1: all): sorted by probability, a token is kept while the
    probability of the tokens before it is below ``top_p``, so the most likely token is always
    kept (Holtzman et al. 2020, section 3.1); renormalised. ``temperature == 0``: all mass on
    the most likely allowed token (ties: the lowest id). Every row must allow at least one
    token.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        out = torch.zeros_like(logits)
        out.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
        return out
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


# -- generation -------------------------------------------------------------------------------

@dataclass
class Sample:
    text: str  # the completion, without the prompt
    num_tokens: int  # tokens generated (a dropped unfinished character's tokens included)
    ids: list[int]


@dataclass
class Generation:
    samples: list[Sample]
    prompt_tokens: int  # tokens of the prompt as encoded (0 for an empty prompt)


def start_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """The ids the model reads before generating: the prompt's, except that the word
    tokenizer's ``<eos>`` after a prompt not ending in a line end is left off (to continue the
    line); with no prompt, a line end when the vocabulary has one (else id 0)."""
    ids = tok.encode(prompt) if prompt else []
    if tok.kind == "word" and ids and not prompt.endswith("\n"):
        ids = ids[:-1]
    if not ids:
        nl = tok.encode("\n")
        ids = nl[-1:] if nl else [0]
    return ids


def _completion_text(tok: Tokenizer, prompt: str, ids: list[int], utf8: Utf8Table | None
                     ) -> str:
    if utf8 is not None:
        return utf8.complete_text(ids)[0]
    text = tok.decode(ids)
    if tok.kind == "word" and prompt and text and not prompt[-1].isspace() \
            and not text.startswith("\n"):
        text = " " + text
    return text


@torch.no_grad()
def generate(model: LSTMLanguageModel, tok: Tokenizer, prompt: str = "", *,
             max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, num_samples: int = 1,
             should_stop: Callable[[], bool] | None = None,
             utf8: Utf8Table | None = None) -> Generation:
    """``num_samples`` continuations of ``prompt``, each ``max_new_tokens`` tokens, sampled as
    one batch from :func:`next_token_probs` with ``torch.multinomial`` on a generator seeded
    with ``seed`` (the same request and seed give the same samples on the same device).

    Prompt characters or words the vocabulary lacks encode to ``<unk>``; ``<unk>`` itself is
    never sampled. For byte-level BPE (``tok.kind == "bpe"``; ``utf8`` is built when not
    given) see the module docstring. ``should_stop`` is polled before every token; when True,
    :class:`DeadlineExceeded` is raised. Raises ``ValueError`` for an out-of-range parameter
    (:func:`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples)
    if tok.kind == "bpe" and utf8 is None:
        utf8 = Utf8Table.for_tokenizer(tok)
    if should_stop is not None and should_stop():
        raise DeadlineExceeded()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        ids = start_ids(tok, prompt)
        prompt_tokens = len(tok.encode(prompt)) if prompt else 0
        gen = torch.Generator(device=device).manual_seed(seed)
        logits, hidden = model(torch.tensor([ids], dtype=torch.long, device=device))
        last = logits[:, -1].expand(num_samples, -1)  # (n, vocab)
        hidden = (hidden[0].expand(-1, num_samples, -1).contiguous(),
                  hidden[1].expand(-1, num_samples, -1).contiguous())
        vocab = last.shape[-1]
        banned = torch.zeros(vocab, dtype=torch.bool, device=device)
        if tok.unk_id is not None and vocab > 1:
            banned[tok.unk_id] = True
        next_state = None if utf8 is None else utf8.next_state.to(device)
        state = torch.zeros(num_samples, dtype=torch.long, device=device)
        out = torch.empty((num_samples, max_new_tokens), dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                raise DeadlineExceeded()
            allowed = ~banned.expand(num_samples, vocab)
            if next_state is not None:
                allowed = allowed & (next_state[state] >= 0)  # (n, vocab)
            probs = next_token_probs(last, temperature, top_k, top_p, allowed)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (n,)
            out[:, step] = nxt
            if next_state is not None:
                state = next_state[state, nxt]
            if step + 1 < max_new_tokens:
                logits, hidden = model(nxt.unsqueeze(1), hidden)
                last = logits[:, -1]
    finally:
        model.train(was_training)
    rows = out.tolist()
    return Generation(
        samples=[Sample(_completion_text(tok, prompt, r, utf8), len(r), r) for r in rows],
        prompt_tokens=prompt_tokens,
    )


# -- scoring ----------------------------------------------------------------------------------

@dataclass
class TokenScore:
    id: int
    token: str  # :func:`token_text`
    loss: float  # nats


@dataclass
class ScoreResult:
    loss: float  # mean cross-entropy, nats per predicted token
    ppl: float  # exp(loss); inf when that overflows a float
    bpc: float | None  # bits per character (char tokenizer only): loss / ln 2
    num_tokens: int  # predicted tokens: all tokens of the text but the first
    per_token: list[TokenScore]


def token_text(tok: Tokenizer, i: int) -> str:
    """Token ``i`` as text: the character or word (``<unk>``, ``<eos>``); for byte-level BPE its
    decoded bytes (U+FFFD for a token that holds only part of a character)."""
    return tok.decode([i]) if tok.kind == "bpe" else tok.id_to_token(i)


@torch.no_grad()
def score(model: LSTMLanguageModel, tok: Tokenizer, text: str, *,
          should_stop: Callable[[], bool] | None = None,
          window: int = SCORE_WINDOW) -> ScoreResult:
    """Score ``text``: its tokens ``t_0 .. t_{N-1}`` (``tok.encode``; unseen characters or words
    are ``<unk>``), each ``t_i`` for ``i >= 1`` predicted from ``t_0 .. t_{i-1}`` starting from
    a zero hidden state; ``loss`` = sum of the per-token cross-entropies (nats) / (N - 1),
    summed in float64 as :func:`worker.engine.evaluate.evaluate` does (the same loss as
    ``evaluate(model, ids, batch_size=1, seq_len=...)``). Raises ``ValueError`` when the text
    encodes to fewer than 2 tokens and :class:`DeadlineExceeded` when ``should_stop`` turns
    True (polled before each ``window`` of tokens)."""
    ids = tok.encode(text)
    if len(ids) < 2:
        raise ValueError(f"the text encodes to {len(ids)} token(s); scoring needs at least 2 "
                         "(the first token is not predicted)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x_all = torch.tensor(ids, dtype=torch.long, device=device)
    losses: list[torch.Tensor] = []
    hidden = None
    try:
        for start in range(0, len(ids) - 1, window):
            if should_stop is not None and should_stop():
                raise DeadlineExceeded()
            x = x_all[start: start + window].unsqueeze(0)  # (1, w)
            y = x_all[start + 1: start + 1 + window]  # (w',)
            x = x[:, : y.numel()]
            logits, hidden = model(x, hidden)
            losses.append(F.cross_entropy(logits[0].float(), y, reduction="none"))
    finally:
        model.train(was_training)
    per = torch.cat(losses)  # (N - 1,)
    n = per.numel()
    loss = float(per.double().sum()) / n
    values = per.tolist()
    return ScoreResult(
        loss=loss,
        ppl=perplexity(loss),
        bpc=loss / LN2 if tok.kind == "char" else None,
        num_tokens=n,
        per_token=[TokenScore(i, token_text(tok, i), v)
                   for i, v in zip(ids[1:], values, strict=True)],
    )
