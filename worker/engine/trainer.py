"""The training loop. Reads top to bottom like nanoGPT's ``train.py`` and PyTorch's
``examples/word_language_model/main.py``: config, device, seed, data, model, optimizer,
schedule, loop (truncated BPTT, clip, step, evaluate, checkpoint, stop), test.

Exact resume: a ``last``/``periodic`` checkpoint carries weights, optimizer state, the CPU (and
CUDA) generator state, the carried hidden state, the step (the data position is a function of
it, see :mod:`worker.engine.data`) and the schedule / early-stopping / best-so-far state, so a
resumed run reports the same metrics as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from core.contract import (
    CorpusTexts,
    StopReason,
    TrainingError,
    TrainingHooks,
    TrainingResult,
    failure_site,
    mark_failure_site,
)
from core.sources import CorpusSources
from core.spec import JobSpec, OptimizerSpec
from worker.engine.checkpoint import LoadedCheckpoint, load_checkpoint
from worker.engine.data import Corpus, TrainBatches, batchify, corpus_from_prepared
from worker.engine.distributed import DistContext, shard_rows
from worker.engine.embeddings import load_pretrained
from worker.engine.evaluate import EvalInterrupted, EvalResult, evaluate, perplexity
from worker.engine.loop import LoopState, TrainLoop
from worker.engine.model import LSTMLanguageModel, ModelConfig, build_model
from worker.engine.schedule import EarlyStopping, LRSchedule
from worker.engine.tokencache import PreparedCorpus, prepare_corpus
from worker.engine.tokenizers import Tokenizer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``. Raises ``TrainingError``
    (``device_unavailable`` for CUDA without CUDA, ``invalid_spec`` for an unknown name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError("invalid_spec", f"unknown device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device_unavailable",
                            f"device {name!r} was asked for but CUDA is not available here; "
                            f"use 'auto' or 'cpu'")
    return dev


#: What an out-of-memory failure says to do about it.
OOM_ADVICE = ("Lower training.batch_size or training.seq_len, or train a smaller model "
              "(model.hidden_dim, model.num_layers, model.embed_dim; for word/bpe tokenizers "
              "a smaller vocabulary: tokenizer.max_vocab / tokenizer.vocab_size).")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host allocation failure: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``
    (Python, numpy), or a ``RuntimeError`` from an allocator ("can't allocate memory" from
    the CPU allocator, "out of memory" from CUDA paths that raise a plain ``RuntimeError``,
    cuBLAS's ``CUBLAS_STATUS_ALLOC_FAILED``)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return ("can't allocate memory" in text or "out of memory" in text.lower()
                or "CUBLAS_STATUS_ALLOC_FAILED" in text)
    return False


@contextmanager
def failures_explained() -> Iterator[None]:
    """Turn an out-of-memory exception raised inside into ``TrainingError("out_of_memory")``
    with its phase and step and an actionable message; label any other exception with the
    phase ``prepare`` when the loop has not labelled it (:func:`core.contract.failure_site`).
    The memory is released by the caller once it has let go of the exception
    (:func:`release_memory`): the exception's frames hold the model until then."""
    try:
        yield
    except TrainingError as exc:
        mark_failure_site(exc, "prepare", None)
        raise
    except BaseException as exc:
        if not is_out_of_memory(exc):
            mark_failure_site(exc, "prepare", None)
            raise
        phase, step = failure_site(exc)
        phase = phase or "prepare"
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "host"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        at = f" at step {step}" if step is not None else ""
        raise TrainingError(
            "out_of_memory",
            f"the {where} ran out of memory ({phase}{at}): {first}. {OOM_ADVICE}",
            step, phase=phase,  # type: ignore[arg-type]
        ) from exc


def release_memory() -> None:
    """Collect garbage (the frames of a failed run hold its model and optimizer in reference
    cycles) and hand the CUDA caching allocator's free blocks back to the device, so the
    process can take the next job after a failure. Call it after the failure's exception
    is gone."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def make_optimizer(spec: OptimizerSpec, params: list[torch.nn.Parameter],
                   device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum, Nesterov). Fused kernels on CUDA (they also let the loop
    skip a non-finite step without a host sync, via ``found_inf``); on the CPU the fused
    kernel is used too (measured faster than the per-parameter loop, docs/benchmarks.md)."""
    fused = device.type in ("cuda", "cpu")
    if spec.name in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                   weight_decay=spec.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                           weight_decay=spec.weight_decay, fused=fused)


def budget_steps(spec: JobSpec, batches: TrainBatches) -> int:
    """The step at which the first of max_steps / max_epochs / max_tokens holds (the horizon
    of the cosine schedule)."""
    t = spec.training
    n = t.max_steps
    if t.max_epochs is not None:
        n = min(n, math.ceil(t.max_epochs * batches.batches_per_epoch))
    if t.max_tokens is not None:
        n = min(n, math.ceil(t.max_tokens / batches.tokens_per_batch))
    return max(1, n)


def train(spec: JobSpec, texts: CorpusTexts, hooks: TrainingHooks,
          resume_from: bytes | None = None, device: str | None = None) -> TrainingResult:
    """Train the model ``spec`` describes on ``texts``, reporting through ``hooks``.

    ``resume_from``: the bytes of a ``last`` or ``periodic`` checkpoint of the same spec and
    texts. ``device`` overrides ``spec.training.device``. The texts are tokenised in memory
    (no cache; :func:`train_sources` streams sources through the token cache). Raises
    :class:`TrainingError` (``corpus_too_small``, ``non_finite_loss``, ``out_of_memory``,
    ``timeout``, ``invalid_checkpoint``, ``device_unavailable``, ``invalid_spec``), each with
    its phase and step; any other exception is a bug, labelled with where it happened
    (:func:`core.contract.failure_site`).
    """
    sources = CorpusSources.from_texts(texts.train, texts.validation, texts.test)
    return train_sources(spec, sources, hooks, resume_from, device, embeddings=texts.embeddings)


def train_sources(spec: JobSpec, sources: CorpusSources, hooks: TrainingHooks,
                  resume_from: bytes | None = None, device: str | None = None,
                  cache_dir: Path | None = None,
                  embeddings: str | None = None) -> TrainingResult:
    """:func:`train` on texts read as streams: each split is tokenised once into token files
    under ``cache_dir`` (:func:`worker.engine.tokencache.prepare_corpus`; in memory when
    None), reused by later jobs on the same data, and trained on memory-mapped.
    ``embeddings``: GloVe-format text when the spec asks for pretrained embeddings. Raises
    what :func:`train` raises, and ``dataset_error`` for a source that cannot be read."""
    with failures_explained():
        _language_model_only(spec)
        dev = resolve_device(device or spec.training.device)
        if spec.training.num_threads is not None:
            torch.set_num_threads(spec.training.num_threads)
        ckpt = _resumable(resume_from)
        prepared = prepare_corpus(spec, sources, cache_dir,
                                  tokenizer=None if ckpt is None else ckpt.tokenizer)
        return _train(spec, prepared, hooks, ckpt, dev, embeddings)


def train_prepared(spec: JobSpec, prepared: PreparedCorpus, hooks: TrainingHooks,
                   resume_from: bytes | None = None, device: str | None = None,
                   embeddings: str | None = None,
                   dist: DistContext | None = None) -> TrainingResult:
    """:func:`train` on splits already prepared (:func:`worker.engine.tokencache.prepare_corpus`).
    A checkpoint to resume from must carry the prepared corpus's tokenizer
    (``invalid_checkpoint`` otherwise).

    ``dist``: this process's rank of a data-parallel run (:mod:`worker.engine.distributed`;
    started by :mod:`worker.ddp_rank`), which trains on ``dist.device``; rank 0's
    ``resume_from`` is broadcast to the others (theirs is ignored), and only rank 0 needs
    ``embeddings`` (the others receive its weights). Every rank returns a result; rank 0's
    is the run's (the others' have no test or fresh-state values)."""
    with failures_explained():
        _language_model_only(spec)
        dev = dist.device if dist is not None else resolve_device(device or spec.training.device)
        if spec.training.num_threads is not None:
            torch.set_num_threads(spec.training.num_threads)
        if dist is not None:
            resume_from = dist.broadcast(resume_from)
        ckpt = _resumable(resume_from)
        if ckpt is not None and ckpt.tokenizer.to_json() != prepared.tokenizer.to_json():
            raise TrainingError("invalid_checkpoint", "the checkpoint's tokenizer is not the "
                                "one the corpus was prepared with")
        return _train(spec, prepared, hooks, ckpt, dev, embeddings, dist)


def _train(spec: JobSpec, prepared: PreparedCorpus, hooks: TrainingHooks,
           ckpt: LoadedCheckpoint | None, dev: torch.device,
           embeddings: str | None, dist: DistContext | None = None) -> TrainingResult:
    t = spec.training
    random.seed(t.seed)
    torch.manual_seed(t.seed)  # also seeds every CUDA device
    world = 1 if dist is None else dist.world_size

    # -- data: views of the token files, widened to int64 a window at a time ----------------
    tok = prepared.tokenizer
    corpus = corpus_from_prepared(spec, prepared)
    batches = _train_batches(corpus, t.batch_size, t.seq_len, dev, dist)
    log.info("data: %d train / %d val / %s test tokens (%s), vocab %d, %d batches per epoch",
             corpus.train.numel(), corpus.validation.numel(),
             None if corpus.test is None else corpus.test.numel(), prepared.meta.get("dtype"),
             tok.vocab_size, batches.batches_per_epoch)

    # -- model -----------------------------------------------------------------------------
    model, coverage = _build_model(spec, tok, embeddings, ckpt,
                                   weights_from_rank0=dist is not None and not dist.is_main)
    if ckpt is None and spec.model.init_range is None:
        model.init_output_bias(torch.from_numpy(prepared.train_counts()))
    model.to(dev)
    if dist is not None and not dist.is_main:
        # Its own dropout draws (rank 0 draws what one process would); a resume restores them.
        torch.manual_seed(t.seed + 7919 * dist.rank)

    # -- optimizer, schedule and the loop's state --------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec.optimizer, params, dev)
    state = LoopState(LRSchedule(spec.schedule, spec.optimizer.lr, budget_steps(spec, batches)),
                      EarlyStopping(t.early_stopping))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)  # type: ignore[arg-type]
        state.restore(ckpt, dev, dist)
        log.info("resumed from step %d", state.step)

    # -- loop ------------------------------------------------------------------------------
    loop = TrainLoop(spec=spec, model=model, optimizer=optimizer, batches=batches,
                     corpus=corpus, tokenizer=tok, hooks=hooks, device=dev, state=state,
                     dist=dist)
    stop_reason = loop.run()
    if not loop.is_main:  # rank 0 alone evaluates the final weights
        return _result(loop, stop_reason, None, tok.vocab_size, coverage)

    # -- the fresh-state check (final weights), then test with the best weights ----------
    # Both stop between batches when the run must halt: the result then has neither, and a
    # resumed run (from the `last` checkpoint just saved) evaluates them again.
    fresh, test = None, None
    try:
        with loop.site("evaluate", state.step):
            fresh = _fresh_state_loss(loop)
            if corpus.test is not None:
                if state.best_weights is not None:
                    model.load_state_dict(state.best_weights, strict=False)
                test = evaluate(model, corpus.test, t.batch_size * world, t.seq_len, dev,
                                char_level=tok.kind == "char",
                                autocast_dtype=loop.autocast_dtype, should_stop=loop.poll)
    except EvalInterrupted:
        if loop.halt == "timeout":
            raise loop.timeout_error() from None
        fresh, test, stop_reason = None, None, "cancelled"
    result = _result(loop, stop_reason, test, tok.vocab_size, coverage)
    fresh_state_check(result, fresh, state.recent_losses)
    return result


def _language_model_only(spec: JobSpec) -> None:
    """``invalid_spec`` for a spec of another task (``classify``: worker.engine.classifier,
    run by the service)."""
    if spec.task != "lm":
        raise TrainingError("invalid_spec", f"this engine trains language models; a "
                            f"{spec.task!r} job runs on the service (POST /v1/jobs)")


def _resumable(data: bytes | None) -> LoadedCheckpoint | None:
    """The checkpoint to resume from, if any; it must hold the optimizer state."""
    ckpt = load_checkpoint(data) if data is not None else None
    if ckpt is not None and ckpt.optimizer_state is None:
        raise TrainingError("invalid_checkpoint",
                            f"a {ckpt.kind!r} checkpoint holds weights only; resume from a "
                            f"'last' or 'periodic' checkpoint")
    return ckpt


def _train_batches(corpus: Corpus, batch_size: int, seq_len: int,
                   dev: torch.device, dist: DistContext | None = None) -> TrainBatches:
    """The training split as (batch, n) streams: on the CPU a view of the token file; on an
    accelerator copied there once, in the token file's dtype (2 or 4 bytes per token).
    Data-parallel: the split is cut into ``batch_size * world_size`` streams, as one process
    with the whole batch cuts it, and this rank keeps its ``batch_size`` of them."""
    if dist is None:
        train_data = batchify(corpus.train, batch_size)  # (batch, n)
    else:
        everyone = batchify(corpus.train, batch_size * dist.world_size)
        train_data = shard_rows(everyone, dist.rank, dist.world_size)
    if dev.type != "cpu":
        train_data = train_data.to(dev)
    return TrainBatches(train_data, seq_len, 1 if dist is None else dist.world_size)


def _build_model(spec: JobSpec, tok: Tokenizer, embeddings: str | None,
                 ckpt: LoadedCheckpoint | None, weights_from_rank0: bool = False
                 ) -> tuple[LSTMLanguageModel, float | None]:
    """The model, initialised on the CPU from the seed (the same on every device), with
    pretrained embeddings or the checkpoint's weights. Returns it and the share of the
    vocabulary the pretrained embeddings covered (None without them).
    ``weights_from_rank0``: a data-parallel rank > 0, which receives rank 0's weights when
    DistributedDataParallel wraps the model: pretrained embeddings are not read, only
    frozen as rank 0's are."""
    m = spec.model
    config = ModelConfig(tok.vocab_size, m.embed_dim, m.hidden_dim, m.num_layers, m.dropout,
                         m.tie_weights, m.init_range)
    model = build_model(config)
    coverage = None
    if m.pretrained_embeddings is not None and weights_from_rank0:
        if m.pretrained_embeddings.freeze:
            model.encoder.weight.requires_grad_(False)
    elif m.pretrained_embeddings is not None:
        if embeddings is None:
            raise TrainingError("invalid_spec", "model.pretrained_embeddings is set but no "
                                "embeddings text was supplied")
        coverage = load_pretrained(model, tok, embeddings, m.pretrained_embeddings.freeze)
    if ckpt is not None:
        if ckpt.model_config != config:
            raise TrainingError("invalid_checkpoint",
                                f"checkpoint model {ckpt.model_config} does not match the "
                                f"spec's {config}")
        model.load_state_dict(ckpt.model_state, strict=False)
    return model, coverage


def _result(loop: TrainLoop, stop_reason: StopReason, test: EvalResult | None,
            vocab_size: int, coverage: float | None) -> TrainingResult:
    state, batches = loop.state, loop.batches
    best, final = state.best_val_loss, state.final_val_loss
    return TrainingResult(
        steps=state.step,
        epochs=batches.epoch_of(state.step),
        tokens_seen=state.step * batches.tokens_per_batch,
        duration_s=loop.clock.elapsed(),
        train_tokens_per_s=loop.train_tokens_per_s(),
        stop_reason=stop_reason,
        final_val_loss=final,
        final_val_ppl=None if final is None else perplexity(final),
        best_val_loss=None if math.isinf(best) else best,
        best_val_ppl=None if math.isinf(best) else perplexity(best),
        best_step=state.best_step,
        vocab_size=vocab_size,
        num_params=loop.model.num_params(),
        test_loss=None if test is None else test.loss,
        test_ppl=None if test is None else test.ppl,
        test_bpc=None if test is None else test.bpc,
        test_accuracy=None if test is None else test.accuracy,
        test_top5_accuracy=None if test is None else test.top5_accuracy,
        embedding_coverage=coverage,
    )


#: Tokens of the training split the fresh-state check evaluates (the first ones).
FRESH_STATE_TOKENS = 50_000


def _fresh_state_loss(loop: TrainLoop) -> float | None:
    """The model's loss (nats/token) on the first :data:`FRESH_STATE_TOKENS` tokens of the
    training split, cut into ``batch_size`` streams that each start from a zero hidden state,
    as validation and sampling start. None when nothing was trained."""
    if loop.state.step == 0:
        return None
    t = loop.spec.training
    ids = loop.corpus.train[:FRESH_STATE_TOKENS]
    res = loop.clock.timed(evaluate, loop.model, ids, loop.eval_batch_size, t.seq_len,
                           loop.device,
                           False, loop.autocast_dtype, loop.poll)
    return res.loss


def fresh_state_check(result: TrainingResult, fresh: float | None,
                      recent: Sequence[float]) -> None:
    """Report the fresh-state loss and warn (``fresh_state_gap``) when it is far above the
    training loss: the signature of a model that learned to rely on a hidden state carried
    from the start of training and predicts badly from the zero state that evaluation and
    sampling start from. "Far": more than max(0.1 nats, 20% of the training loss) above the
    mean training loss of the last steps (which, measured with dropout on, is if anything
    higher than an evaluation without it)."""
    if fresh is None or not recent:
        return
    train_loss = sum(recent) / len(recent)
    result.fresh_state_train_loss, result.recent_train_loss = fresh, train_loss
    if fresh - train_loss > max(0.1, 0.2 * train_loss):
        message = (f"from a fresh (zero) hidden state the model's loss on training text is "
                   f"{fresh:.3f} nats/token, against {train_loss:.3f} in training with the "
                   f"carried state: it predicts badly from the state that evaluation and "
                   f"sampling start from. Raise training.state_reset_prob (e.g. 0.05) or "
                   f"leave model.init_range unset (each layer's own scale).")
        log.warning("%s", message)
        result.warnings.append({"code": "fresh_state_gap", "message": message})
