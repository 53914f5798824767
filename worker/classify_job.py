"""The runner's side of a ``task: "classify"`` job: read its labelled datasets and the
``init_from`` checkpoint from storage, then train (:mod:`worker.engine.classifier`).

Called by :func:`worker.runner._train` in the pool child (torch is imported there only).
Every read checks the blob's sha256 against its row; database reads retry through an outage
(:class:`worker.runner.DbRetry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.classification import ClassificationResult, Example
from core.contract import TrainingError
from core.labelled import read_labelled
from core.spec import DatasetSource, JobSpec
from store.db import session_scope
from store.models import Dataset
from store.storage import BlobCorrupt, Storage, sha256_hex

if TYPE_CHECKING:
    from worker.runner import DbRetry, SessionFactory


def _blob(what: str, key: str | None, sha: str | None, storage: Storage) -> bytes:
    if key is None or not storage.exists(key):
        raise TrainingError("dataset_error", f"{what} is missing from storage")
    try:
        data = storage.read_bytes(key)
    except BlobCorrupt:  # an object store's own sha256 check failed
        data = None
    if data is None or (sha is not None and sha256_hex(data) != sha):
        raise TrainingError("dataset_error", f"{what} does not match its sha256: the stored "
                            "file changed or is damaged")
    return data


def read_examples(source: DatasetSource, factory: SessionFactory, storage: Storage,
                  retry: DbRetry) -> list[Example]:
    """The ``(text, label)`` examples of a labelled dataset. Raises
    ``TrainingError("dataset_error")`` for a missing, damaged, unlabelled or unparsable one."""
    if source.id is None:
        raise TrainingError("dataset_error", "a classification job run by the service reads "
                            "uploaded labelled datasets only")
    dataset_id = source.id

    def row() -> tuple[str | None, str | None, str]:
        with session_scope(factory) as s:
            d = s.get(Dataset, dataset_id)
            if d is None:
                return None, None, "text"
            return d.storage_key, d.sha256, str(getattr(d, "kind", None) or "text")

    key, sha, kind = retry.call(f"dataset {dataset_id}", row)
    if kind != "labelled" and key is not None:
        raise TrainingError("dataset_error", f"dataset {dataset_id} is a {kind} dataset, not "
                            "a labelled one")
    data = _blob(f"dataset {dataset_id}", key, sha, storage)
    try:
        return read_labelled(data)
    except ValueError as exc:
        raise TrainingError("dataset_error", f"dataset {dataset_id}: {exc}") from exc


def read_init_from(spec: JobSpec, factory: SessionFactory, storage: Storage,
                   retry: DbRetry) -> bytes | None:
    """The bytes of the language-model checkpoint ``spec.init_from`` names (the API stored
    its id there at submission); None without ``init_from``. Raises
    ``TrainingError("invalid_checkpoint")`` when it is gone or fails its sha256."""
    init = spec.init_from
    if init is None:
        return None
    from worker.ppo_job import read_checkpoint  # one reader of job checkpoints

    return read_checkpoint(init.job_id, init.checkpoint, "init_from", factory, storage, retry)


def train_classify_job(spec: JobSpec, hooks: Any, factory: SessionFactory, storage: Storage,
                       retry: DbRetry, resume_from: bytes | None) -> ClassificationResult:
    """Read the job's data and train its classifier through ``hooks``; see
    :func:`worker.engine.classifier.train_classifier` for what it raises."""
    from worker.engine.classifier import ClassifyData, train_classifier  # torch

    assert spec.dataset is not None
    embeddings = None
    if spec.model.pretrained_embeddings is not None:
        from worker.runner import load_embeddings

        embeddings = load_embeddings(spec, factory, storage, retry)
    data = ClassifyData(
        train=read_examples(spec.dataset, factory, storage, retry),
        validation=None if spec.validation is None
        else read_examples(spec.validation, factory, storage, retry),
        test=None if spec.test is None else read_examples(spec.test, factory, storage, retry),
        embeddings=embeddings,
    )
    init_from = None if resume_from is not None else read_init_from(spec, factory, storage,
                                                                    retry)
    return train_classifier(spec, data, hooks, resume_from=resume_from, init_from=init_from)
