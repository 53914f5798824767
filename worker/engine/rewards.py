"""Task rewards of PPO jobs (``ppo.reward``; docs/ppo.md, "Rewards").

A reward scores whole responses: it is called once per rollout batch with a
:class:`RewardBatch` (the prompts' and responses' token ids, their decoded texts) and returns a
``(batch,)`` float32 tensor on the CPU, one score per response. The PPO engine adds the score
at the response's last token, after the per-token KL penalty (Ziegler et al. 2019).

Adding a reward:

1. a spec class in ``core/spec.py`` with a ``kind: Literal["<name>"]`` field, added to the
   ``RewardSpec`` union (the API then validates it and its 422s name its fields);
2. a factory here, ``@register_reward("<name>") def _build(spec, tokenizer, load) ->
   Reward``, which checks what can only be checked against the policy's tokenizer or another
   job's checkpoint (raising ``TrainingError("invalid_spec", ...)``) and returns an object
   with ``__call__(batch) -> torch.Tensor`` (and optionally ``to(device)``, called once with
   the policy's device);
3. a test in ``tests/engine/test_rewards.py`` and a line in docs/ppo.md.

Rewards must be deterministic functions of the batch (the same rollouts give the same scores),
so that a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from core.contract import TrainingError
from core.spec import (
    LM_CHECKPOINT_TASKS,
    CharFractionReward,
    ClassifierReward,
    KeywordsReward,
    LengthReward,
    LMLoglikReward,
)
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.generate import start_ids, token_text
from worker.engine.tokenizers import Tokenizer

#: ``load(job_id, checkpoint) -> bytes``: another job's checkpoint ("best", "last" or an id),
#: resolved by the caller (the worker reads it from storage after checking ownership).
CheckpointLoader = Callable[[str, str], bytes]


@dataclass
class RewardBatch:
    """One rollout batch as a reward sees it. ``prompts``: B lists of token ids (what the
    policy read before responding; an empty prompt is the line-end token
    :func:`worker.engine.generate.start_ids` gives); ``responses``: B lists of
    ``response_length`` token ids. Texts are decoded on first use."""

    prompts: Sequence[Sequence[int]]
    responses: Sequence[Sequence[int]]
    tokenizer: Tokenizer
    empty_prompts: bool = False  # the prompts are the start token only: their text is ""

    def __len__(self) -> int:
        return len(self.responses)

    @cached_property
    def prompt_texts(self) -> list[str]:
        if self.empty_prompts:
            return [""] * len(self.prompts)
        return [self.tokenizer.decode(list(p)) for p in self.prompts]

    @cached_property
    def response_texts(self) -> list[str]:
        return [self.tokenizer.decode(list(r)) for r in self.responses]


class Reward(Protocol):
    """A task reward: ``reward(batch)`` -> (len(batch),) float32 scores on the CPU."""

    kind: str

    def __call__(self, batch: RewardBatch) -> torch.Tensor: ...


RewardFactory = Callable[[Any, Tokenizer, CheckpointLoader | None], Reward]
REWARDS: dict[str, RewardFactory] = {}


def register_reward(kind: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register the factory of the reward ``kind`` (see the module docstring)."""
    def deco(factory: RewardFactory) -> RewardFactory:
        REWARDS[kind] = factory
        return factory
    return deco


def build_reward(spec: Any, tokenizer: Tokenizer,
                 load_checkpoint_bytes: CheckpointLoader | None = None) -> Reward:
    """The reward ``spec`` (one of ``core.spec.RewardSpec``) describes, for responses in
    ``tokenizer``'s vocabulary (the policy's). ``load_checkpoint_bytes(job_id, checkpoint)``
    is needed by ``lm_loglik`` and ``classifier``. Raises ``TrainingError("invalid_spec")``
    when the reward cannot apply (an unknown kind, a target that is not one token, a label the
    classifier does not have, no loader), ``TrainingError("invalid_checkpoint")`` for an
    unreadable checkpoint."""
    factory = REWARDS.get(spec.kind)
    if factory is None:
        raise TrainingError("invalid_spec", f"ppo.reward.kind {spec.kind!r} has no "
                            f"implementation (known: {sorted(REWARDS)})")
    return factory(spec, tokenizer, load_checkpoint_bytes)


def line_end_ids(tok: Tokenizer) -> set[int]:
    """The ids whose text holds a line break: ``"\\n"`` (char), ``<eos>`` (word), any BPE
    token containing a newline byte."""
    if tok.kind == "word":
        return {1}
    return {i for i in range(tok.vocab_size) if "\n" in token_text(tok, i)}


# -- the built-in rewards ---------------------------------------------------------------------


class CharFraction:
    """The fraction of response tokens equal to ``target_id``."""

    kind = "char_fraction"

    def __init__(self, target_id: int) -> None:
        self.target_id = target_id

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        r = torch.tensor([list(x) for x in batch.responses], dtype=torch.long)
        return (r == self.target_id).float().mean(dim=1)


@register_reward("char_fraction")
def _char_fraction(spec: CharFractionReward, tok: Tokenizer,
                   load: CheckpointLoader | None) -> Reward:
    for i in range(tok.vocab_size):
        if i != tok.unk_id and token_text(tok, i) == spec.target:
            return CharFraction(i)
    raise TrainingError("invalid_spec", f"ppo.reward.target {spec.target!r} is not one token "
                        f"of the init_from checkpoint's {tok.kind} vocabulary")


class Keywords:
    """The fraction of the response text's characters inside matches of the keywords."""

    kind = "keywords"

    def __init__(self, words: Sequence[str], whole_words: bool) -> None:
        alts = "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))
        pattern = rf"(?<!\w)(?:{alts})(?!\w)" if whole_words else f"(?:{alts})"
        self.regex = re.compile(pattern, re.IGNORECASE)

    def score(self, text: str) -> float:
        if not text:
            return 0.0
        covered = sum(m.end() - m.start() for m in self.regex.finditer(text))
        return covered / len(text)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return torch.tensor([self.score(t) for t in batch.response_texts], dtype=torch.float32)


@register_reward("keywords")
def _keywords(spec: KeywordsReward, tok: Tokenizer, load: CheckpointLoader | None) -> Reward:
    return Keywords(spec.words, spec.whole_words)


class Length:
    """``1 - |L - target| / max(target, T - target)``, ``L`` the tokens before the first
    line end (``T`` when none)."""

    kind = "length"

    def __init__(self, target: int, ends: set[int]) -> None:
        self.target, self.ends = target, ends

    def lengths(self, responses: Sequence[Sequence[int]]) -> list[int]:
        out = []
        for r in responses:
            n = len(r)
            for j, i in enumerate(r):
                if i in self.ends:
                    n = j
                    break
            out.append(n)
        return out

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        t = len(batch.responses[0]) if len(batch) else 0
        scale = max(self.target, t - self.target, 1)
        return torch.tensor([1.0 - abs(n - self.target) / scale
                             for n in self.lengths(batch.responses)], dtype=torch.float32)


@register_reward("length")
def _length(spec: LengthReward, tok: Tokenizer, load: CheckpointLoader | None) -> Reward:
    return Length(spec.target, line_end_ids(tok))


def _need_loader(load: CheckpointLoader | None, kind: str) -> CheckpointLoader:
    if load is None:
        raise TrainingError("invalid_spec", f"the {kind!r} reward reads another job's "
                            "checkpoint, but no checkpoint loader was given")
    return load


class LMLoglik:
    """The mean log-probability (nats per token) of each response's text after its prompt
    under another language model, with that model's tokenizer."""

    kind = "lm_loglik"

    def __init__(self, data: bytes) -> None:
        ckpt = load_checkpoint(data)
        if ckpt.spec.task not in LM_CHECKPOINT_TASKS:
            raise TrainingError("invalid_spec", f"ppo.reward.job_id names a "
                                f"{ckpt.spec.task!r} job; lm_loglik needs a language model")
        self.tok = ckpt.tokenizer
        self.model = build_model_from_checkpoint(ckpt).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> LMLoglik:
        self.model.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        seqs: list[list[int]] = []
        starts: list[int] = []
        for prompt, response in zip(batch.prompt_texts, batch.response_texts, strict=True):
            ctx = start_ids(self.tok, prompt)
            resp = self.tok.encode(response)
            if self.tok.kind == "word" and resp and not response.endswith("\n"):
                resp = resp[:-1]  # no <eos> the response did not write
            seqs.append(ctx + resp)
            starts.append(len(ctx))
        n = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), n), dtype=torch.long)
        mask = torch.zeros((len(seqs), n - 1), dtype=torch.bool)
        for k, (s, c) in enumerate(zip(seqs, starts, strict=True)):
            ids[k, : len(s)] = torch.tensor(s)
            mask[k, c - 1: len(s) - 1] = True  # positions predicting the response's tokens
        ids = ids.to(self.device)
        logits, _ = self.model(ids[:, :-1])  # right padding never reaches earlier positions
        logp = F.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
        m = mask.to(self.device)
        total = (logp * m).sum(dim=1)
        count = m.sum(dim=1)
        return torch.where(count > 0, total / count.clamp(min=1), 0.0).float().cpu()


@register_reward("lm_loglik")
def _lm_loglik(spec: LMLoglikReward, tok: Tokenizer, load: CheckpointLoader | None) -> Reward:
    return LMLoglik(_need_loader(load, "lm_loglik")(spec.job_id, spec.checkpoint))


class ClassifierProb:
    """The probability of one label under a classification job's checkpoint."""

    kind = "classifier"

    def __init__(self, data: bytes, label: str, include_prompt: bool) -> None:
        from worker.engine.classifier import load_classifier

        self.clf = load_classifier(data)
        if label not in self.clf.labels:
            raise TrainingError("invalid_spec", f"ppo.reward.label {label!r} is not one of "
                                f"the classifier's labels {self.clf.labels}")
        self.index = self.clf.labels.index(label)
        self.include_prompt = include_prompt

    def to(self, device: torch.device) -> ClassifierProb:
        self.clf.model.to(device)
        self.clf.device = device
        return self

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        texts = batch.response_texts
        if self.include_prompt:
            texts = [p + r for p, r in zip(batch.prompt_texts, texts, strict=True)]
        return self.clf.probabilities(texts)[:, self.index].float()


@register_reward("classifier")
def _classifier(spec: ClassifierReward, tok: Tokenizer,
                load: CheckpointLoader | None) -> Reward:
    data = _need_loader(load, "classifier")(spec.job_id, spec.checkpoint)
    return ClassifierProb(data, spec.label, spec.include_prompt)
