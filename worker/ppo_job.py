"""The runner's side of a ``task: "ppo"`` job: read the ``init_from`` checkpoint (the policy's
start and the frozen reference), the reward's checkpoint (``lm_loglik``, ``classifier``) and
the prompts' text from storage, then train (:func:`worker.engine.ppo.train_ppo`).

Called by :func:`worker.runner._run_engine` in the pool child (torch is imported there only).
Every blob read is checked against the sha256 its row records; database reads retry through
an outage (:class:`worker.runner.DbRetry`). The hooks are the runner's
(:class:`worker.runner.DatabaseHooks`: metrics, checkpoints, ``should_stop`` for cancellation
and the worker's shutdown, and ``on_samples`` for the sample responses stored at each
evaluation interval), so a PPO job is cancelled, interrupted and resumed exactly as a
language-model job: a resumed run starts from its ``last``/``periodic`` checkpoint (policy,
value head, optimizer, RNG and KL controller), the reference still from ``init_from``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from core.contract import CheckpointKind, TrainingError
from core.spec import JobSpec
from store.db import session_scope
from store.models import Checkpoint, Dataset, Job
from store.storage import BlobCorrupt, Storage, sha256_hex

if TYPE_CHECKING:
    from worker.runner import DbRetry, SessionFactory

# How far an init_from chain (PPO job -> PPO job -> ... -> language model) is followed.
MAX_CHAIN = 32


def read_checkpoint(job_id: str, name: str, what: str, factory: SessionFactory,
                    storage: Storage, retry: DbRetry) -> bytes:
    """The bytes of job ``job_id``'s checkpoint ``name`` (an id, as the API stores it at
    submission; ``best``/``last``: that job's newest of the kind). Raises
    ``TrainingError("invalid_checkpoint")`` naming ``what`` when it is gone or fails its
    sha256."""

    def row() -> tuple[str, str] | None:
        with session_scope(factory) as s:
            if name in ("best", "last"):
                kind = CheckpointKind.BEST if name == "best" else CheckpointKind.LAST
                c = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                      Checkpoint.kind == kind)
                             .order_by(Checkpoint.step.desc()).limit(1))
            else:
                c = s.get(Checkpoint, name)
            if c is None or c.job_id != job_id:
                return None
            return c.storage_key, c.sha256

    found = retry.call(f"{what} checkpoint {name}", row)
    try:
        data = storage.read_bytes(found[0]) if found and storage.exists(found[0]) else None
    except (FileNotFoundError, BlobCorrupt):  # gone meanwhile, or damaged (object store)
        data = None
    if found is None or data is None or sha256_hex(data) != found[1]:
        raise TrainingError("invalid_checkpoint", f"{what}: checkpoint {name!r} of job "
                            f"{job_id} is missing from storage or fails its sha256")
    return data


def _text_dataset(dataset_id: str, what: str, factory: SessionFactory, storage: Storage,
                  retry: DbRetry) -> str:
    """A text dataset's text (sha256-checked). ``TrainingError("dataset_error")`` when it is
    missing, damaged or labelled."""
    from worker.runner import _read_dataset

    def kind() -> str | None:
        with session_scope(factory) as s:
            d = s.get(Dataset, dataset_id)
            return None if d is None else str(getattr(d, "kind", None) or "text")

    found = retry.call(f"dataset {dataset_id}", kind)
    if found is None:
        raise TrainingError("dataset_error", f"{what}: dataset {dataset_id} no longer exists")
    if found != "text":
        raise TrainingError("dataset_error", f"{what}: dataset {dataset_id} is a {found} "
                            "dataset, not a text one")
    return _read_dataset(dataset_id, factory, storage, retry)


def corpus_text(spec: JobSpec, factory: SessionFactory, storage: Storage,
                retry: DbRetry) -> str:
    """The training text of the language-model job at the start of ``spec``'s ``init_from``
    chain (``ppo.prompts.from_corpus``): its dataset's text or its built-in corpus. Raises
    ``TrainingError("dataset_error")`` when the chain is broken or the text is gone."""
    assert spec.init_from is not None
    job_id = spec.init_from.job_id
    for _ in range(MAX_CHAIN):

        def stored(jid: str = job_id) -> dict[str, Any] | None:
            with session_scope(factory) as s:
                job = s.get(Job, jid)
                return None if job is None else dict(job.spec)

        raw = retry.call(f"job {job_id}", stored)
        if raw is None:
            raise TrainingError("dataset_error", f"ppo.prompts.from_corpus: job {job_id} of "
                                "the init_from chain no longer exists")
        source = JobSpec.model_validate(raw)
        if source.task == "lm":
            assert source.dataset is not None
            if source.dataset.builtin is not None:
                from core.corpora import builtin_corpus

                return builtin_corpus(source.dataset.builtin)
            if source.dataset.id is None:
                raise TrainingError("dataset_error", f"ppo.prompts.from_corpus: job {job_id} "
                                    "trained on a local path, which the service cannot read")
            return _text_dataset(source.dataset.id, "ppo.prompts.from_corpus", factory,
                                 storage, retry)
        if source.init_from is None:
            break
        job_id = source.init_from.job_id
    raise TrainingError("dataset_error", "ppo.prompts.from_corpus: the init_from chain does "
                        "not reach a language-model job")


def prompts_text(spec: JobSpec, factory: SessionFactory, storage: Storage,
                 retry: DbRetry) -> str | None:
    """The text :func:`worker.engine.ppo.build_prompts` takes: the prompts dataset's
    (``dataset_id``), the language model's training text (``from_corpus``) or None
    (``empty``)."""
    assert spec.ppo is not None
    prompts = spec.ppo.prompts
    if prompts.dataset_id is not None:
        return _text_dataset(prompts.dataset_id, "ppo.prompts.dataset_id", factory, storage,
                             retry)
    if prompts.from_corpus is not None:
        return corpus_text(spec, factory, storage, retry)
    return None


def train_ppo_job(spec: JobSpec, hooks: Any, factory: SessionFactory, storage: Storage,
                  retry: DbRetry, resume_from: bytes | None) -> Any:
    """Read the job's checkpoints and prompts and fine-tune its policy through ``hooks``;
    returns :class:`core.ppo.PPOResult`. Raises ``TrainingError`` (``invalid_checkpoint``,
    ``dataset_error``, ``invalid_spec``, and what :func:`worker.engine.ppo.train_ppo`
    raises)."""
    from worker.engine.ppo import build_prompts, load_policy, train_ppo  # torch
    from worker.engine.rewards import build_reward

    assert spec.init_from is not None and spec.ppo is not None
    init = spec.init_from
    policy = load_policy(read_checkpoint(init.job_id, init.checkpoint, "init_from", factory,
                                         storage, retry))

    def reward_checkpoint(job_id: str, checkpoint: str) -> bytes:
        return read_checkpoint(job_id, checkpoint, "ppo.reward", factory, storage, retry)

    reward = build_reward(spec.ppo.reward, policy.tokenizer, reward_checkpoint)
    prompts = build_prompts(spec.ppo.prompts, policy.tokenizer,
                            prompts_text(spec, factory, storage, retry))
    return train_ppo(spec, policy, reward, prompts, hooks, resume_from=resume_from)
