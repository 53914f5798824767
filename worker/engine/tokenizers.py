"""Tokenizers: ``char``, ``word`` and ``bpe``, each with a JSON round-trip.

No torch import here: the API process may build or load a tokenizer (for example to check a
corpus's size at submission) without loading PyTorch.

- ``char``: one token per Unicode character seen in training, plus ``<unk>`` (id 0) for the
  rest, so a prompt with unseen characters still encodes.
- ``word``: whitespace split with ``<eos>`` at each line end, as PyTorch's
  ``examples/word_language_model/data.py``. ``<unk>`` already present in the text (PTB,
  WikiText-2) is the same token as the tokenizer's ``<unk>``.
- ``bpe``: Hugging Face ``tokenizers`` byte-level BPE, trained on the training split only. Byte
  level means every string encodes (no ``<unk>``) and decodes back exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from core.spec import TokenizerSpec

UNK = "<unk>"
EOS = "<eos>"


class Tokenizer(Protocol):
    kind: str
    unk_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def id_to_token(self, i: int) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """One id per character; id 0 is ``<unk>`` and decodes to U+FFFD."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.itos: list[str] = [UNK, *chars]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos) if i > 0}
        self.unk_id: int | None = 0

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("\ufffd" if i == 0 else self.itos[i] for i in ids)

    def id_to_token(self, i: int) -> str:
        return self.itos[i]

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.itos[1:]}, ensure_ascii=False)


class WordTokenizer:
    """Whitespace words plus ``<eos>`` per line. Ids: ``<unk>`` 0, ``<eos>`` 1, then words by
    decreasing training frequency (ties alphabetically), cut by ``min_freq`` and ``max_vocab``
    (which counts the two specials)."""

    kind = "word"

    def __init__(self, words: list[str]) -> None:
        self.itos: list[str] = [UNK, EOS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.unk_id: int | None = 0
        self.eos_id = 1

    @classmethod
    def train(cls, text: str, max_vocab: int | None, min_freq: int) -> WordTokenizer:
        return cls.from_counts(Counter(w for line in text.splitlines() for w in line.split()),
                               max_vocab, min_freq)

    @classmethod
    def from_counts(cls, counts: Counter[str], max_vocab: int | None,
                    min_freq: int) -> WordTokenizer:
        """The vocabulary :meth:`train` keeps from the training text's word counts (which
        this pops ``<unk>`` and ``<eos>`` from)."""
        counts.pop(UNK, None)  # PTB/WikiText already write <unk>: it is our id 0
        counts.pop(EOS, None)
        words = sorted((w for w, n in counts.items() if n >= min_freq),
                       key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            words = words[: max(0, max_vocab - 2)]
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        out: list[int] = []
        for line in text.splitlines():
            out.extend(get(w, 0) for w in line.split())
            out.append(1)
        return out

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces, ``<eos>`` as a newline."""
        lines: list[str] = []
        cur: list[str] = []
        for i in ids:
            if i == 1:
                lines.append(" ".join(cur) + "\n")
                cur = []
            else:
                cur.append(self.itos[i])
        return "".join(lines) + " ".join(cur)

    def id_to_token(self, i: int) -> str:
        return self.itos[i]

    def to_json(self) -> str:
        return json.dumps({"kind": "word", "words": self.itos[2:]}, ensure_ascii=False)


class BPETokenizer:
    """Byte-level BPE from Hugging Face ``tokenizers``; serialised with its own JSON."""

    kind = "bpe"

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.unk_id: int | None = None  # byte level: every string encodes

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        lines = text.splitlines(keepends=True)
        return cls.train_from_batches((lines[i : i + 1000] for i in range(0, len(lines), 1000)),
                                      vocab_size)

    @classmethod
    def train_from_batches(cls, batches: Iterable[list[str]], vocab_size: int) -> BPETokenizer:
        """Train on the training split's lines (``splitlines(keepends=True)``, each a
        sequence), given in batches. The trainer counts pre-tokens, so the result depends on
        the lines only, not on how they are batched."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(batches, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        # Line by line, as in training (merges never span a line end), batched so the Rust side
        # runs in parallel; byte level makes decode(encode(text)) == text either way.
        lines = text.splitlines(keepends=True)
        out: list[int] = []
        for enc in self.hf.encode_batch(lines, add_special_tokens=False):
            out.extend(enc.ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=False))

    def id_to_token(self, i: int) -> str:
        return str(self.hf.id_to_token(i))

    def to_json(self) -> str:
        return json.dumps({"kind": "bpe", "hf": json.loads(self.hf.to_str())})


def build_tokenizer(spec: TokenizerSpec, train_text: str) -> Tokenizer:
    """Train the tokenizer ``spec`` asks for on ``train_text`` (the training split only)."""
    if spec.kind == "char":
        return CharTokenizer.train(train_text)
    if spec.kind == "word":
        return WordTokenizer.train(train_text, spec.max_vocab, spec.min_freq)
    if spec.kind == "bpe":
        return BPETokenizer.train(train_text, spec.vocab_size)
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}")


def tokenizer_from_json(s: str) -> Tokenizer:
    """Inverse of ``Tokenizer.to_json``. Raises ``ValueError`` on an unknown document."""
    doc = json.loads(s)
    kind = doc.get("kind")
    if kind == "char":
        return CharTokenizer(list(doc["chars"]))
    if kind == "word":
        return WordTokenizer(list(doc["words"]))
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(doc["hf"])))
    raise ValueError(f"unknown tokenizer kind {kind!r}")
