"""Submitting a ``task: "classify"`` job: what the spec refuses, what the submission checks
against the database (labelled datasets, ``init_from``), and the spec it stores."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.contract import CheckpointKind
from store.db import session_scope
from store.models import Checkpoint, Dataset, Job, JobStatus, new_id, utcnow

from .conftest import authorize, small_spec


def add_labelled(factory: sessionmaker[Session], owner: str = "tester",
                 labels: dict[str, int] | None = None) -> str:
    """A labelled dataset's row (the file is not read at submission)."""
    ds_id = new_id("ds")
    with session_scope(factory) as s:
        s.add(Dataset(id=ds_id, owner_id=owner, name="labelled", bytes=10, sha256="0" * 64,
                      num_chars=10, num_lines=2, num_words=2,
                      storage_key=f"datasets/{ds_id}.jsonl", kind="labelled",
                      num_examples=2, labels=labels or {"pos": 1, "neg": 1}))
    return ds_id


def add_lm_job(factory: sessionmaker[Session], spec: dict[str, Any], owner: str = "tester",
               status: JobStatus = JobStatus.SUCCEEDED) -> tuple[str, dict[str, str]]:
    """A finished language-model job's rows: the job and a best and a last checkpoint."""
    from core.spec import JobSpec

    job_id = new_id("job")
    ids = {}
    with session_scope(factory) as s:
        s.add(Job(id=job_id, owner_id=owner, status=status, created_at=utcnow(),
                  spec=JobSpec.model_validate(spec).model_dump(mode="json"),
                  progress={"step": 5, "total_steps": 5, "tokens_seen": 0}))
        s.flush()
        for kind, step in ((CheckpointKind.BEST, 4), (CheckpointKind.LAST, 5)):
            ids[kind.value] = new_id("ckpt")
            s.add(Checkpoint(id=ids[kind.value], job_id=job_id, kind=kind, step=step, bytes=1,
                             sha256="0" * 64, storage_key=f"checkpoints/{job_id}/{kind}",
                             metrics={}))
    return job_id, ids


def classify_spec(dataset_id: str, **extra: Any) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "task": "classify",
            "training": {"batch_size": 4, "max_steps": 5}, **extra}


def error(r: Any) -> dict[str, Any]:
    return dict(r.json()["error"])


def test_a_classify_job_on_a_labelled_dataset_is_accepted_with_its_defaults(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    ds = add_labelled(session_factory)
    r = client.post("/v1/jobs", json=classify_spec(ds))
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["task"] == "classify" and spec["init_from"] is None
    assert spec["classify"] == {"pooling": "mean", "freeze_encoder_steps": 0,
                                "class_weights": "none", "max_len": 256}


def test_a_language_model_job_keeps_task_lm_and_no_classify_section(
        client: TestClient, dataset_id: str) -> None:
    r = client.post("/v1/jobs", json=small_spec(dataset_id))
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert (spec["task"], spec["classify"], spec["init_from"]) == ("lm", None, None)


def test_a_text_dataset_is_refused_naming_dataset_id(client: TestClient,
                                                     dataset_id: str) -> None:
    r = client.post("/v1/jobs", json=classify_spec(dataset_id))
    assert r.status_code == 422
    assert (error(r)["code"], error(r)["field"]) == ("dataset_not_labelled", "dataset_id")
    r = client.post("/v1/jobs", json=classify_spec(dataset_id, validation={"id": dataset_id}))
    assert error(r)["field"] == "dataset_id"


@pytest.mark.parametrize(("extra", "field"), [
    ({"classify": {"pooling": "mean"}, "task": "lm"}, "classify"),
    ({"init_from": {"job_id": "job_x"}, "task": "lm"}, "init_from"),
    ({"model": {"tie_weights": True, "embed_dim": 8, "hidden_dim": 8}}, "model"),
    ({"training": {"max_tokens": 1000}}, "training"),
    ({"classify": {"pooling": "attention"}}, "classify.pooling"),
    ({"classify": {"class_weights": {}}}, "classify.class_weights"),
    ({"classify": {"class_weights": {"pos": -1}}}, "classify.class_weights"),
    ({"classify": {"max_len": 0}}, "classify.max_len"),
])
def test_fields_that_do_not_apply_are_refused_naming_them(
        client: TestClient, session_factory: sessionmaker[Session], extra: dict[str, Any],
        field: str) -> None:
    ds = add_labelled(session_factory)
    r = client.post("/v1/jobs", json={**classify_spec(ds), **extra})
    assert r.status_code == 422, r.text
    fields = [d["field"] or "" for d in error(r)["details"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), r.json()


def test_class_weights_must_name_the_datasets_labels(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    ds = add_labelled(session_factory, labels={"pos": 3, "neg": 1})
    ok = client.post("/v1/jobs", json=classify_spec(ds, classify={"class_weights": {"neg": 3}}))
    assert ok.status_code == 201, ok.text
    r = client.post("/v1/jobs", json=classify_spec(ds, classify={"class_weights": {"nuetral": 2}}))
    assert r.status_code == 422 and error(r)["field"] == "classify.class_weights"
    assert "nuetral" in error(r)["message"]


LM = {"dataset": {"builtin": "python-docs"}, "tokenizer": {"kind": "word", "max_vocab": 500},
      "model": {"embed_dim": 24, "hidden_dim": 40, "num_layers": 2}}


def test_init_from_takes_the_checkpoints_dims_and_tokenizer_and_names_it_by_id(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    ds = add_labelled(session_factory)
    lm_id, ckpts = add_lm_job(session_factory, LM)
    r = client.post("/v1/jobs", json=classify_spec(
        ds, init_from={"job_id": lm_id}, model={"dropout": 0.2}))
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["init_from"] == {"job_id": lm_id, "checkpoint": ckpts["best"]}
    assert (spec["model"]["embed_dim"], spec["model"]["hidden_dim"],
            spec["model"]["num_layers"], spec["model"]["dropout"]) == (24, 40, 2, 0.2)
    assert spec["tokenizer"] == {"kind": "word", "max_vocab": 500, "min_freq": 1,
                                 "vocab_size": 2000}
    last = client.post("/v1/jobs", json=classify_spec(
        ds, init_from={"job_id": lm_id, "checkpoint": "last"}, model={"hidden_dim": 40}))
    assert last.status_code == 201, last.text
    assert last.json()["spec"]["init_from"]["checkpoint"] == ckpts["last"]
    by_id = client.post("/v1/jobs", json=classify_spec(
        ds, init_from={"job_id": lm_id, "checkpoint": ckpts["last"]}))
    assert by_id.status_code == 201, by_id.text


@pytest.mark.parametrize(("extra", "field"), [
    ({"model": {"hidden_dim": 64}}, "model.hidden_dim"),
    ({"model": {"num_layers": 1}}, "model.num_layers"),
    ({"tokenizer": {"kind": "char"}}, "tokenizer"),
])
def test_init_from_refuses_other_dims_or_tokenizer_naming_them(
        client: TestClient, session_factory: sessionmaker[Session], extra: dict[str, Any],
        field: str) -> None:
    ds = add_labelled(session_factory)
    lm_id, _ = add_lm_job(session_factory, LM)
    r = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": lm_id}, **extra))
    assert r.status_code == 422, r.text
    assert (error(r)["code"], error(r)["field"]) == ("init_from_mismatch", field)


def test_init_from_needs_a_succeeded_language_model_of_ones_own(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    ds = add_labelled(session_factory)
    unknown = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": "job_nope"}))
    assert unknown.status_code == 422 and error(unknown)["field"] == "init_from.job_id"
    running, _ = add_lm_job(session_factory, LM, status=JobStatus.RUNNING)
    r = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": running}))
    assert (r.status_code, error(r)["code"], error(r)["field"]) == (
        422, "init_from_not_ready", "init_from.job_id")
    theirs, _ = add_lm_job(session_factory, LM, owner="someone-else")
    r = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": theirs}))
    assert r.status_code == 422 and error(r)["field"] == "init_from.job_id"
    assert "does not exist" in error(r)["message"]
    a_classifier, _ = add_lm_job(session_factory, classify_spec(ds))
    r = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": a_classifier}))
    assert r.status_code == 422 and error(r)["field"] == "init_from.job_id"
    lm_id, _ = add_lm_job(session_factory, LM)
    r = client.post("/v1/jobs", json=classify_spec(
        ds, init_from={"job_id": lm_id, "checkpoint": "ckpt_nope"}))
    assert r.status_code == 422 and error(r)["field"] == "init_from.checkpoint"


def test_an_admin_may_start_from_anyones_language_model(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    authorize(client, "root", admin=True)
    ds = add_labelled(session_factory, owner="root")
    lm_id, _ = add_lm_job(session_factory, LM, owner="tester")
    r = client.post("/v1/jobs", json=classify_spec(ds, init_from={"job_id": lm_id}))
    assert r.status_code == 201, r.text
