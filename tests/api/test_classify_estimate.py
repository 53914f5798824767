"""The size of a ``task: "classify"`` job at dry run and submission (app.jobs.size_basis,
core.estimate): the head over the dataset's labels, not a language model's decoder, and the
dataset's exact per-tokenizer vocabulary (``datasets.stats``), checked against the model the
engine builds (worker.engine.classifier.LSTMClassifier)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from store.models import Job
from tests.api.test_classify_submit import LM, add_labelled, add_lm_job, classify_spec
from tests.api.test_dry_run import service
from worker.engine.classifier import LSTMClassifier
from worker.engine.model import ModelConfig
from worker.engine.tokenizers import CharTokenizer, WordTokenizer


def _labelled(client: TestClient) -> tuple[dict[str, object], list[str]]:
    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful", "film", "plot", "acting", "ok", "great"]
    texts = [" ".join(rng.choice(words) for _ in range(6)) + f" n{i % 7}" for i in range(60)]
    lines = [json.dumps({"text": t, "label": ["pos", "neg", "mixed"][i % 3]})
             for i, t in enumerate(texts)]
    r = client.post("/v1/datasets", params={"format": "jsonl", "label_field": "label"},
                    files=[("file", ("l.jsonl", "\n".join(lines).encode(), "text/plain"))])
    assert r.status_code == 201, r.text
    return r.json(), texts


def _spec(ds: str, tokenizer: dict[str, object], **model: int) -> dict[str, object]:
    return {"task": "classify", "dataset_id": ds, "tokenizer": tokenizer,
            "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, **model},
            "training": {"max_steps": 5, "batch_size": 4, "device": "cpu"}}


def test_the_dry_run_counts_the_classifier_the_engine_builds(tmp_path: Path) -> None:
    with service(tmp_path) as (c, _):
        ds, texts = _labelled(c)
        text = "\n".join(texts)
        for tok, vocab in ((CharTokenizer.train(text), "char"),
                           (WordTokenizer.train(text, None, 1), "word")):
            est = c.post("/v1/jobs?dry_run=true", json=_spec(str(ds["id"]), {"kind": vocab}))
            assert est.status_code == 200, est.text
            body = est.json()
            assert body["vocab_size"]["size"] == tok.vocab_size  # exact: every text trains
            model = LSTMClassifier(ModelConfig(tok.vocab_size, 16, 32, 1, 0.0, False), 3,
                                   "mean")
            assert body["parameters"] == sum(p.numel() for p in model.parameters())
        # min_freq 2 drops the words seen once (the "nK" ones are seen 8-9 times: none).
        est = c.post("/v1/jobs?dry_run=true",
                     json=_spec(str(ds["id"]), {"kind": "word", "min_freq": 2})).json()
        assert est["vocab_size"]["size"] == WordTokenizer.train(text, None, 2).vocab_size


def test_a_21m_parameter_classifier_is_not_refused_as_a_language_model(
        tmp_path: Path) -> None:
    with service(tmp_path) as (c, _):
        ds, texts = _labelled(c)
        body = _spec(str(ds["id"]), {"kind": "char"}, embed_dim=512, hidden_dim=2048)
        est = c.post("/v1/jobs?dry_run=true", json=body)
        assert est.status_code == 200, est.text
        v = est.json()["vocab_size"]["size"]
        assert v == CharTokenizer.train("\n".join(texts)).vocab_size
        lstm = 4 * (512 * 2048 + 2048 * 2048 + 2 * 2048)
        assert est.json()["parameters"] == v * 512 + lstm + 2048 * 3 + 3  # ~21M, no decoder
        assert c.post("/v1/jobs", json=body).status_code == 201


def test_init_from_counts_the_checkpoints_vocabulary(
        client: TestClient, session_factory: sessionmaker[Session]) -> None:
    ds = add_labelled(session_factory, labels={"a": 1, "b": 1, "c": 1, "d": 1})
    lm_id, _ = add_lm_job(session_factory, LM)
    with session_factory() as s:  # the language model's tokenizer had 437 tokens
        s.execute(update(Job).where(Job.id == lm_id).values(result={"vocab_size": 437}))
        s.commit()
    r = client.post("/v1/jobs?dry_run=true",
                    json=classify_spec(ds, init_from={"job_id": lm_id}))
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["vocab_size"]["size"] == 437 and "init_from" in est["vocab_size"]["why"]
    model = LSTMClassifier(ModelConfig(437, 24, 40, 2, 0.0, False), 4, "mean")  # LM's dims
    assert est["parameters"] == sum(p.numel() for p in model.parameters())
