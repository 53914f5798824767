"""Submitting a ``task: "ppo"`` job: the checks of :mod:`app.ppo` against the database
(``init_from``, the prompts dataset, the reward's job, fields that do not apply, the size) and
the spec it stores, each problem a 422 naming its field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from store.db import session_scope
from store.models import Checkpoint, CheckpointKind, Dataset, Job, JobStatus, new_id

from .conftest import bearer, small_spec, upload
from .test_classify_submit import add_labelled, add_lm_job


def ppo_spec(init: str, **extra: Any) -> dict[str, Any]:
    ppo = {"reward": {"kind": "char_fraction", "target": "e"}, "response_length": 8,
           "rollout_batch_size": 4}
    ppo.update(extra.pop("ppo", {}))
    return {"task": "ppo", "init_from": {"job_id": init}, "ppo": ppo,
            "training": {"max_steps": 3}, **extra}


def error(r: Any) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    return dict(r.json()["error"])


@pytest.fixture
def lm(session_factory: sessionmaker[Session], dataset_id: str) -> tuple[str, dict[str, str]]:
    return add_lm_job(session_factory, small_spec(dataset_id))


def add_classifier(factory: sessionmaker[Session], labels: list[str], owner: str = "tester",
                   status: JobStatus = JobStatus.SUCCEEDED) -> str:
    ds = add_labelled(factory, owner, {label: 1 for label in labels})
    job_id, _ = add_lm_job(factory, {"dataset_id": ds, "task": "classify"}, owner, status)
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.result = {"labels": labels}
    return job_id


def test_a_ppo_job_takes_the_models_checkpoint_tokenizer_and_dims_by_id(
        client: TestClient, lm: tuple[str, dict[str, str]]) -> None:
    lm_id, ckpts = lm
    r = client.post("/v1/jobs", json=ppo_spec(lm_id))
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["task"] == "ppo" and spec["dataset_id"] is None
    assert spec["init_from"] == {"job_id": lm_id, "checkpoint": ckpts["best"]}
    assert (spec["model"]["embed_dim"], spec["model"]["hidden_dim"],
            spec["model"]["num_layers"]) == (8, 8, 1)
    assert spec["ppo"]["prompts"] == {"dataset_id": None, "from_corpus": None, "empty": True}
    last = client.post("/v1/jobs", json=ppo_spec(lm_id) | {
        "init_from": {"job_id": lm_id, "checkpoint": "last"}, "model": {"hidden_dim": 8}})
    assert last.json()["spec"]["init_from"]["checkpoint"] == ckpts["last"]
    # A PPO job's checkpoints are language-model checkpoints: it may start another.
    with session_scope(client.app.state.session_factory) as s:  # type: ignore[attr-defined]
        job = s.get(Job, r.json()["id"])
        assert job is not None
        job.status = JobStatus.SUCCEEDED
    with session_scope(client.app.state.session_factory) as s:  # type: ignore[attr-defined]
        s.add(Checkpoint(id=new_id("ckpt"), job_id=r.json()["id"], kind=CheckpointKind.BEST,
                         step=3, bytes=1, sha256="0" * 64, storage_key="k", metrics={}))
    again = client.post("/v1/jobs", json=ppo_spec(r.json()["id"]))
    assert again.status_code == 201, again.text


def test_init_from_must_be_a_succeeded_language_model_of_ones_own(
        client: TestClient, session_factory: sessionmaker[Session], dataset_id: str,
        lm: tuple[str, dict[str, str]]) -> None:
    missing = error(client.post("/v1/jobs", json=ppo_spec("job_nope")))
    assert missing["field"] == "init_from.job_id"
    running, _ = add_lm_job(session_factory, small_spec(dataset_id),
                            status=JobStatus.RUNNING)
    e = error(client.post("/v1/jobs", json=ppo_spec(running)))
    assert (e["code"], e["field"]) == ("job_not_ready", "init_from.job_id")
    theirs, _ = add_lm_job(session_factory, small_spec(dataset_id), owner="mallory")
    assert error(client.post("/v1/jobs", json=ppo_spec(theirs)))["field"] == "init_from.job_id"
    classifier = add_classifier(session_factory, ["pos", "neg"])
    e = error(client.post("/v1/jobs", json=ppo_spec(classifier)))
    assert (e["code"], e["field"]) == ("wrong_task", "init_from.job_id")
    e = error(client.post("/v1/jobs", json=ppo_spec(lm[0]) | {
        "init_from": {"job_id": lm[0], "checkpoint": "ckpt_nope"}}))
    assert e["field"] == "init_from.checkpoint"


def test_the_spec_refuses_what_a_ppo_job_cannot_have(
        client: TestClient, dataset_id: str, lm: tuple[str, dict[str, str]]) -> None:
    no_init = {k: v for k, v in ppo_spec(lm[0]).items() if k != "init_from"}
    assert error(client.post("/v1/jobs", json=no_init))["field"] == "init_from"
    assert error(client.post("/v1/jobs", json=ppo_spec(lm[0], dataset_id=dataset_id)))[
        "field"] == "dataset_id"
    no_reward = ppo_spec(lm[0])
    del no_reward["ppo"]["reward"]
    assert error(client.post("/v1/jobs", json=no_reward))["field"].startswith("ppo")


@pytest.mark.parametrize(("extra", "field"), [
    ({"val_fraction": 0.2}, "val_fraction"),
    ({"test_fraction": 0.1}, "test_fraction"),
    ({"training": {"batch_size": 8}}, "training.batch_size"),
    ({"training": {"seq_len": 32}}, "training.seq_len"),
    ({"training": {"eval_tokens": 1000}}, "training.eval_tokens"),
    ({"training": {"state_reset_prob": 0.5}}, "training.state_reset_prob"),
    ({"schedule": {"kind": "plateau"}}, "schedule.kind"),
])
def test_fields_that_do_not_apply_are_refused_naming_them(
        client: TestClient, lm: tuple[str, dict[str, str]], extra: dict[str, Any],
        field: str) -> None:
    e = error(client.post("/v1/jobs", json=ppo_spec(lm[0], **extra)))
    assert (e["code"], e["field"]) == ("not_applicable", field), e
    assert "does not apply to task 'ppo'" in e["message"]


def test_their_defaults_and_the_stored_spec_are_accepted_again(
        client: TestClient, lm: tuple[str, dict[str, str]]) -> None:
    first = client.post("/v1/jobs", json=ppo_spec(lm[0], val_fraction=0.1,
                                                  training={"batch_size": 32}))
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=first.json()["spec"])  # every field given
    assert again.status_code == 201, again.text
    assert again.json()["spec"] == first.json()["spec"]


@pytest.mark.parametrize(("extra", "field"), [
    ({"model": {"hidden_dim": 16}}, "model.hidden_dim"),
    ({"model": {"num_layers": 2}}, "model.num_layers"),
    ({"model": {"dropout": 0.3}}, "model.dropout"),
    ({"tokenizer": {"kind": "word"}}, "tokenizer"),
])
def test_a_model_or_tokenizer_other_than_the_checkpoints_is_refused(
        client: TestClient, lm: tuple[str, dict[str, str]], extra: dict[str, Any],
        field: str) -> None:
    e = error(client.post("/v1/jobs", json=ppo_spec(lm[0], **extra)))
    assert (e["code"], e["field"]) == ("init_from_mismatch", field)


def test_the_prompts_dataset_must_be_ones_own_text_with_a_prompt(
        client: TestClient, session_factory: sessionmaker[Session],
        make_key: Callable[..., str], lm: tuple[str, dict[str, str]]) -> None:
    def prompts(ds: str) -> dict[str, Any]:
        return ppo_spec(lm[0], ppo={"prompts": {"dataset_id": ds}})

    field = "ppo.prompts.dataset_id"
    good = upload(client, "To be\nor not\n").json()["id"]
    r = client.post("/v1/jobs", json=prompts(good))
    assert r.status_code == 201, r.text
    assert error(client.post("/v1/jobs", json=prompts("ds_nope")))["field"] == field
    labelled = add_labelled(session_factory)
    e = error(client.post("/v1/jobs", json=prompts(labelled)))
    assert (e["code"], e["field"]) == ("dataset_not_text", field)
    blank = upload(client, "\n  \n\n").json()["id"]
    e = error(client.post("/v1/jobs", json=prompts(blank)))
    assert (e["code"], e["field"]) == ("no_prompts", field)
    theirs = client.post("/v1/datasets", headers=bearer(make_key("mallory")),
                         files={"file": ("p.txt", b"To be\n", "text/plain")}).json()["id"]
    assert error(client.post("/v1/jobs", json=prompts(theirs)))["field"] == field
    # In use by a queued job: the dataset cannot be deleted under it.
    assert client.delete(f"/v1/datasets/{good}").status_code == 409


def test_from_corpus_needs_the_language_models_text(
        client: TestClient, session_factory: sessionmaker[Session],
        lm: tuple[str, dict[str, str]]) -> None:
    spec = ppo_spec(lm[0], ppo={"prompts": {"from_corpus": {"prompt_tokens": 4}}})
    assert client.post("/v1/jobs", json=spec).status_code == 201
    with session_scope(session_factory) as s:
        job = s.get(Job, lm[0])
        assert job is not None
        s.delete(s.get(Dataset, job.spec["dataset_id"]))
    e = error(client.post("/v1/jobs", json=spec))
    assert (e["code"], e["field"]) == ("dataset_gone", "ppo.prompts.from_corpus")


def test_the_lm_loglik_reward_needs_a_succeeded_language_model_of_ones_own(
        client: TestClient, session_factory: sessionmaker[Session], dataset_id: str,
        lm: tuple[str, dict[str, str]]) -> None:
    judge, judge_ckpts = add_lm_job(session_factory, small_spec(dataset_id))

    def reward(job_id: str, **more: Any) -> dict[str, Any]:
        return ppo_spec(lm[0], ppo={"reward": {"kind": "lm_loglik", "job_id": job_id, **more}})

    r = client.post("/v1/jobs", json=reward(judge, checkpoint="last"))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["ppo"]["reward"] == {"kind": "lm_loglik", "job_id": judge,
                                                 "checkpoint": judge_ckpts["last"]}
    assert error(client.post("/v1/jobs", json=reward("job_nope")))["field"] == \
        "ppo.reward.job_id"
    failed, _ = add_lm_job(session_factory, small_spec(dataset_id), status=JobStatus.FAILED)
    e = error(client.post("/v1/jobs", json=reward(failed)))
    assert (e["code"], e["field"]) == ("job_not_ready", "ppo.reward.job_id")
    classifier = add_classifier(session_factory, ["pos", "neg"])
    e = error(client.post("/v1/jobs", json=reward(classifier)))
    assert (e["code"], e["field"]) == ("wrong_task", "ppo.reward.job_id")
    e = error(client.post("/v1/jobs", json=reward(judge, checkpoint="ckpt_nope")))
    assert e["field"] == "ppo.reward.checkpoint"


def test_the_classifier_reward_needs_a_classifier_with_that_label(
        client: TestClient, session_factory: sessionmaker[Session],
        lm: tuple[str, dict[str, str]]) -> None:
    classifier = add_classifier(session_factory, ["pos", "neg"])

    def reward(job_id: str, label: str) -> dict[str, Any]:
        return ppo_spec(lm[0], ppo={"reward": {"kind": "classifier", "job_id": job_id,
                                               "label": label}})

    r = client.post("/v1/jobs", json=reward(classifier, "pos"))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["ppo"]["reward"]["checkpoint"].startswith("ckpt_")
    e = error(client.post("/v1/jobs", json=reward(classifier, "neutral")))
    assert (e["code"], e["field"]) == ("unknown_label", "ppo.reward.label")
    assert "pos" in e["message"]
    e = error(client.post("/v1/jobs", json=reward(lm[0], "pos")))
    assert (e["code"], e["field"]) == ("wrong_task", "ppo.reward.job_id")
    theirs = add_classifier(session_factory, ["pos"], owner="mallory")
    assert error(client.post("/v1/jobs", json=reward(theirs, "pos")))["field"] == \
        "ppo.reward.job_id"


def test_a_rollout_batch_too_large_for_the_service_is_refused_naming_it(
        client: TestClient, session_factory: sessionmaker[Session], dataset_id: str) -> None:
    big = small_spec(dataset_id) | {"model": {"embed_dim": 256, "hidden_dim": 256}}
    lm_id, _ = add_lm_job(session_factory, big)
    assert client.post("/v1/jobs", json=ppo_spec(lm_id)).status_code == 201
    spec = ppo_spec(lm_id, ppo={"rollout_batch_size": 4096, "response_length": 4096})
    e = error(client.post("/v1/jobs", json=spec))
    assert (e["code"], e["field"]) == ("job_too_large", "ppo.rollout_batch_size")


def test_the_dry_run_of_a_ppo_job_checks_the_same_and_creates_nothing(
        client: TestClient, lm: tuple[str, dict[str, str]]) -> None:
    before = len(client.get("/v1/jobs").json()["data"])
    r = client.post("/v1/jobs", params={"dry_run": "true"}, json=ppo_spec(lm[0]))
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["init_from"]["checkpoint"] == lm[1]["best"]
    r = client.post("/v1/jobs", params={"dry_run": "true"},
                    json=ppo_spec(lm[0], val_fraction=0.3))
    assert error(r)["field"] == "val_fraction"
    assert len(client.get("/v1/jobs").json()["data"]) == before


def test_a_char_fraction_target_must_be_one_token_of_the_policys_tokenizer(
        client: TestClient, lm: tuple[str, dict[str, str]]) -> None:
    def target(t: str) -> dict[str, Any]:
        return ppo_spec(lm[0], ppo={"reward": {"kind": "char_fraction", "target": t}})

    assert client.post("/v1/jobs", json=target("e")).status_code == 201
    e = error(client.post("/v1/jobs", json=target("ee")))
    assert (e["code"], e["field"]) == ("invalid_target", "ppo.reward.target")
    assert "one character" in e["message"]
