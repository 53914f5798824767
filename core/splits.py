"""Train/validation/test splits and the minimum split sizes: the one owner of this arithmetic and
of the message a user sees when a corpus is too small.

Two callers, one rule: the API checks at submission with token counts *estimated* from the
datasets' text statistics (:func:`estimate_split_tokens`), the engine checks again with the
real counts after tokenising. Both ask :func:`corpus_shortfall` and show its message; the API
answers 422 with its field and details, the engine fails the job with ``corpus_too_small``.
Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core.contract import CorpusTexts
from core.spec import JobSpec
from core.textstats import TextStats

SPLITS = ("train", "validation", "test")

#: How a token count was obtained: counted by the tokenizer, estimated from text statistics
#: (``char``/``word`` before tokenising) or an upper bound (``bpe`` before its vocabulary is
#: trained: one token per UTF-8 byte at most).
Accuracy = Literal["exact", "about", "at most"]


@dataclass
class SplitTexts:
    train: str
    validation: str
    test: str | None


def split_bounds(spec: JobSpec, n: int, *, separate_validation: bool = False,
                 separate_test: bool = False) -> tuple[int, int]:
    """Where a text of ``n`` units (characters, or token counts estimated from them) is cut:
    ``(train_end, test_start)``. Train is ``[0, train_end)``, the held-out validation
    ``[train_end, test_start)`` (empty when a separate validation text is given) and test
    ``[test_start, n)`` (empty unless ``test_fraction`` > 0 and no separate test text)."""
    vf = 0.0 if separate_validation else spec.val_fraction
    tf = 0.0 if separate_test else spec.test_fraction
    train_end = int(n * (1.0 - vf - tf))
    test_start = n - int(n * tf) if tf > 0 else n
    return train_end, test_start


def split_texts(spec: JobSpec, texts: CorpusTexts) -> SplitTexts:
    """Cut ``texts.train`` by character offsets (:func:`split_bounds`): train is the head, then
    ``val_fraction`` (unless ``texts.validation`` is given), then the last ``test_fraction``
    (unless ``texts.test`` is given). With ``val_fraction=0.1`` this is nanoGPT's and the
    char-rnn examples' "first 90% train (``int(n * 0.9)``), last 10% validation"."""
    train_end, test_start = split_bounds(spec, len(texts.train),
                                         separate_validation=texts.validation is not None,
                                         separate_test=texts.test is not None)
    val = texts.validation if texts.validation is not None else texts.train[train_end:test_start]
    test = texts.test if texts.test is not None else (
        texts.train[test_start:] if spec.test_fraction > 0 else None)
    return SplitTexts(texts.train[:train_end], val, test)


def tokens_needed(spec: JobSpec) -> dict[str, int]:
    """The fewest tokens each split may hold: one batch of ``batch_size x (seq_len + 1)`` for
    training (``batch_size x resources.gpus`` streams for a data-parallel job: the global
    batch), 2 (one prediction) for validation and test."""
    t = spec.training
    return {"train": t.batch_size * spec.resources.gpus * (t.seq_len + 1), "validation": 2,
            "test": 2}


def estimate_split_tokens(spec: JobSpec, stats: Mapping[str, TextStats]) -> dict[str, int]:
    """Tokens per split before tokenising, cut with :func:`split_bounds` as the engine cuts.

    ``stats["train"]`` is the main dataset; ``stats["validation"]``/``stats["test"]`` are
    separate datasets when the spec names them. ``char``/``word``: about that many (the cut is
    applied to the token count). ``bpe``: an upper bound (the cut is applied to characters,
    then :meth:`TextStats.bpe_token_bound`). A held-out split with a zero fraction is absent.
    """
    kind = spec.tokenizer.kind
    bpe = kind == "bpe"
    train = stats["train"]
    n = train.num_chars if bpe else (train.tokens(kind) or 0)
    train_end, test_start = split_bounds(spec, n, separate_validation="validation" in stats,
                                         separate_test="test" in stats)
    held_out = {"validation": test_start - train_end, "test": n - test_start}
    fractions = {"validation": spec.val_fraction, "test": spec.test_fraction}
    splits = {"train": train.bpe_token_bound(train_end) if bpe else train_end}
    for name in ("validation", "test"):
        if name in stats:
            other = stats[name]
            splits[name] = (other.bpe_token_bound(other.num_chars) if bpe
                            else other.tokens(kind) or 0)
        elif fractions[name] > 0:
            splits[name] = train.bpe_token_bound(held_out[name]) if bpe else held_out[name]
    return splits


@dataclass(frozen=True)
class Shortfall:
    """A split too small to train or evaluate on: what to tell the user and which spec field
    to point at."""

    split: str  # "train", "validation" or "test"
    tokens: int
    needed: int
    field: str  # the spec field to change (dotted path)
    message: str

    def details(self, spec: JobSpec) -> dict[str, Any]:
        t = spec.training
        return {"split": self.split, "tokens": self.tokens, "needed": self.needed,
                "batch_size": t.batch_size, "seq_len": t.seq_len}


def corpus_shortfall(spec: JobSpec, tokens: Mapping[str, int | None], *,
                     accuracy: Accuracy = "exact",
                     separate: frozenset[str] = frozenset()) -> Shortfall | None:
    """The first split (train, validation, test) holding fewer than :func:`tokens_needed`,
    or None when all suffice. ``tokens`` maps split names to counts (None or absent: no such
    split). ``separate`` names the splits that come from their own dataset (then the field to
    change is that dataset, not a fraction). ``accuracy`` says how the counts were obtained;
    an upper bound that suffices proves nothing, and the engine checks the real counts."""
    need = tokens_needed(spec)
    kind = spec.tokenizer.kind
    qualifier = "" if accuracy == "exact" else f"{accuracy} "
    unit = "tokens" if accuracy == "exact" else f"{kind} tokens"
    why = (" (byte-level BPE makes at most one token per UTF-8 byte)"
           if accuracy == "at most" else "")
    b, t = spec.training.batch_size, spec.training.seq_len
    n = spec.resources.gpus
    batch = (f"batch_size x (seq_len + 1) = {b} x {t + 1}" if n == 1 else
             f"batch_size x resources.gpus x (seq_len + 1) = {b} x {n} x {t + 1}")
    for name in SPLITS:
        have = tokens.get(name)
        if have is None or have >= need[name]:
            continue
        if name == "train":
            message = (f"the training split has {qualifier}{have} {unit}{why} but one batch "
                       f"needs {batch} = {need[name]}; use "
                       f"more text, a smaller batch_size or seq_len, or a smaller "
                       f"val_fraction/test_fraction")
            field = "training.batch_size"
        else:
            fraction = "val_fraction" if name == "validation" else "test_fraction"
            field = name if name in separate else fraction
            message = (f"the {name} split has {qualifier}{have} {unit}{why} but evaluation "
                       f"needs at least {need[name]}; raise {fraction} or give a larger "
                       f"'{name}' dataset")
        return Shortfall(name, have, need[name], field, message)
    return None
