"""The inference server's own routes: ``POST /generate``, ``/score`` and ``/classify``.

Each request names its checkpoint (:class:`core.inference.CheckpointRef`) and its deadline
(``deadline_s``, seconds, counted from when the server starts handling it): the model comes
from the LRU cache (:class:`worker.serve.models.ModelCache`), then one request at a time runs
under ``torch.no_grad`` (the compute lock; a request still waiting for it at its deadline is a
504 too), the deadline polled before every generated token and every scored window. Past it:
504 ``deadline_exceeded``, never a hung request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request

from core.errors import ValidationFailed, WrongTask
from core.inference import (
    ClassifyCall,
    ClassifyResult,
    GenerateCall,
    GenerateResult,
    Prediction,
    SampleOut,
    ScoreCall,
    ScoreResult,
    ServerCall,
    TokenLoss,
)
from core.spec import LM_CHECKPOINT_TASKS
from worker.engine import generate as gen
from worker.serve.models import LoadedModel, ModelCache

router = APIRouter()

T = TypeVar("T")


@dataclass
class ServeState:
    """What the routes share: the model cache and the lock that runs one request at a time
    (torch already uses every core for one request)."""

    cache: ModelCache
    compute: threading.Lock


def _deadline_message(call: ServerCall) -> str:
    return (f"the inference did not finish within its deadline of {call.deadline_s:g} s; ask "
            "for fewer tokens or samples, a shorter text, or a longer deadline_s (at most "
            "LMFORGE_INFERENCE_DEADLINE_S)")


def run_call(request: Request, call: ServerCall,
             work: Callable[[LoadedModel, Callable[[], bool]], T]) -> T:
    """Load the checkpoint, wait for the compute lock, run ``work(model, should_stop)``;
    :class:`worker.engine.generate.DeadlineExceeded` anywhere past the deadline."""
    end = time.monotonic() + call.deadline_s

    def should_stop() -> bool:
        return time.monotonic() >= end

    state: ServeState = request.app.state.inference
    loaded = state.cache.get(call.checkpoint)
    if should_stop() or not state.compute.acquire(timeout=max(0.0, end - time.monotonic())):
        raise gen.DeadlineExceeded(_deadline_message(call))
    try:
        return work(loaded, should_stop)
    except gen.DeadlineExceeded as exc:
        raise gen.DeadlineExceeded(_deadline_message(call)) from exc
    finally:
        state.compute.release()


def _require_lm(loaded: LoadedModel, what: str) -> None:
    if loaded.task not in LM_CHECKPOINT_TASKS:
        raise WrongTask(f"{what} needs a language-model job; this checkpoint is of a "
                        f"{loaded.task!r} job (use /classify)")


@router.post("/generate", response_model=GenerateResult)
def generate_route(call: GenerateCall, request: Request) -> GenerateResult:
    """``num_samples`` completions of ``prompt`` (:func:`worker.engine.generate.generate`)."""

    def work(loaded: LoadedModel, should_stop: Callable[[], bool]) -> GenerateResult:
        _require_lm(loaded, "generate")
        model, utf8 = loaded.lm()
        tok = loaded.ckpt.tokenizer
        out = gen.generate(model, tok, call.prompt, max_new_tokens=call.max_new_tokens,
                           temperature=call.temperature, top_k=call.top_k, top_p=call.top_p,
                           seed=call.seed, num_samples=call.num_samples,
                           should_stop=should_stop, utf8=utf8)
        return GenerateResult(
            samples=[SampleOut(text=s.text, num_tokens=s.num_tokens) for s in out.samples],
            prompt_tokens=out.prompt_tokens, checkpoint_id=call.checkpoint.id,
            tokenizer=tok.kind)

    return run_call(request, call, work)


@router.post("/score", response_model=ScoreResult)
def score_route(call: ScoreCall, request: Request) -> ScoreResult:
    """The cross-entropy of ``text`` under the model (:func:`worker.engine.generate.score`)."""

    def work(loaded: LoadedModel, should_stop: Callable[[], bool]) -> ScoreResult:
        _require_lm(loaded, "score")
        model, _ = loaded.lm()
        tok = loaded.ckpt.tokenizer
        try:
            res = gen.score(model, tok, call.text, should_stop=should_stop)
        except ValueError as exc:
            raise ValidationFailed(f"text: {exc}", field="text") from exc
        return ScoreResult(
            loss=res.loss, ppl=res.ppl if res.ppl < float("inf") else None, bpc=res.bpc,
            num_tokens=res.num_tokens,
            per_token=[TokenLoss(token=t.token, id=t.id, loss=t.loss) for t in res.per_token],
            checkpoint_id=call.checkpoint.id, tokenizer=tok.kind)

    return run_call(request, call, work)


@router.post("/classify", response_model=ClassifyResult)
def classify_route(call: ClassifyCall, request: Request) -> ClassifyResult:
    """Labels and probabilities of ``texts`` from a classification job's checkpoint
    (``worker.engine.classifier.classify_texts``)."""
    from worker.engine import classifier  # torch and the classifier: loaded on first use

    def work(loaded: LoadedModel, should_stop: Callable[[], bool]) -> ClassifyResult:
        if loaded.task != "classify":
            raise WrongTask("classify needs a classification job (task \"classify\"); this "
                            f"checkpoint is of a {loaded.task!r} job (use /generate or /score)")
        if loaded.classifier is None:
            loaded.classifier = classifier.load_classifier(loaded.ckpt)  # cached with it
        preds = classifier.classify_texts(loaded.classifier, list(call.texts))
        return ClassifyResult(predictions=[Prediction.model_validate(p) for p in preds],
                              checkpoint_id=call.checkpoint.id)

    return run_call(request, call, work)
