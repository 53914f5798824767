"""Text classification through the real service: upload a labelled JSON Lines dataset, train a
language model on its texts, train a classifier whose encoder starts from that model
(``init_from``), read its metrics and result, and label texts with ``POST
/v1/jobs/{id}/classify`` (the API calls the inference server, which loads the checkpoint)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MARKERS = {"blue": "sky", "green": "leaf", "red": "apple"}
MODEL = {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1}
TRAINING = {"batch_size": 16, "device": "cpu", "num_threads": 1, "seed": 0}


def synthetic(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Filler words with one marker word; the label is the marker's colour (best accuracy 1)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        label = r.choice(sorted(MARKERS))
        words = [f"w{r.randrange(50)}" for _ in range(r.randint(3, 12))]
        words.insert(r.randrange(len(words) + 1), MARKERS[label])
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('classify-db') / 'lmforge.db'}"
    service = start_service(url, name="classify", inference=True)
    yield service
    service.stop()


def _upload(svc: Any, body: bytes, filename: str, **params: str) -> dict[str, Any]:
    r = svc.client.post("/v1/datasets", params=params,
                        files={"file": (filename, body, "text/plain")},
                        data={"name": filename})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_a_classifier_from_a_language_model_over_http(svc: Any) -> None:
    examples = synthetic(600)
    jsonl = "".join(json.dumps(e) + "\n" for e in examples).encode()
    labelled = _upload(svc, jsonl, "colours.jsonl", format="jsonl", label_field="label")
    assert labelled["kind"] == "labelled" and labelled["num_examples"] == 600
    text = _upload(svc, "".join(e["text"] + "\n" for e in examples).encode(), "colours.txt")

    # a text dataset is not a classification dataset
    r = svc.client.post("/v1/jobs", json={"dataset_id": text["id"], "task": "classify"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "dataset_id"

    lm_api = Api(svc, {"dataset_id": text["id"]})
    lm = lm_api.submit(name="colours-lm", tokenizer={"kind": "word"}, model=MODEL,
                       training={**TRAINING, "seq_len": 16, "max_steps": 30,
                                 "eval_interval": 15})
    assert lm_api.wait_finished(lm["id"])["status"] == "succeeded"

    clf_api = Api(svc, {"dataset_id": labelled["id"]})
    spec = {"name": "colours", "dataset_id": labelled["id"], "task": "classify",
            "init_from": {"job_id": lm["id"]}, "test_fraction": 0.2,
            "classify": {"pooling": "mean", "freeze_encoder_steps": 10},
            "optimizer": {"lr": 0.01},
            "training": {**TRAINING, "max_steps": 60, "eval_interval": 20}}
    r = svc.client.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = r.json()
    lm_best = [c for c in lm_api.checkpoints(lm["id"]) if c["kind"] == "best"][-1]
    assert job["spec"]["init_from"] == {"job_id": lm["id"], "checkpoint": lm_best["id"]}
    assert job["spec"]["tokenizer"]["kind"] == "word"
    finished = clf_api.wait_finished(job["id"])
    assert finished["status"] == "succeeded", finished

    result = svc.client.get(f"/v1/jobs/{job['id']}/result").json()
    assert result["task"] == "classify" and result["labels"] == ["blue", "green", "red"]
    assert result["steps"] == 60 and result["init_from"] == job["spec"]["init_from"]
    assert result["test_accuracy"] >= 0.9 and result["test_macro_f1"] >= 0.9
    cm = result["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == result["num_examples"]["validation"]
    assert set(result["test_per_class"]) == set(MARKERS)

    rows = clf_api.metrics(job["id"])
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert [r["encoder_frozen"] for r in rows[:11]] == [True] * 10 + [False]
    evaluated = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in evaluated] == [20, 40, 60]
    assert all(0 <= r["val_macro_f1"] <= 1 and set(r["val_per_class"]) == set(MARKERS)
               for r in evaluated)
    latest = svc.client.get(f"/v1/jobs/{job['id']}").json()["latest_metrics"]
    assert latest["val_step"] == 60 and "val_macro_f1" in latest

    texts = ["w1 w2 sky w3", "apple w7", "w9 leaf"]
    out = svc.client.post(f"/v1/jobs/{job['id']}/classify", json={"texts": texts})
    assert out.status_code == 200, out.text
    preds = out.json()["predictions"]
    assert [p["label"] for p in preds] == ["blue", "red", "green"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    # generate does not apply to a classifier, classify not to a language model
    gen = svc.client.post(f"/v1/jobs/{job['id']}/generate", json={"prompt": "sky"})
    assert gen.status_code == 409, gen.text
    wrong = svc.client.post(f"/v1/jobs/{lm['id']}/classify", json={"texts": texts})
    assert wrong.status_code == 409, wrong.text
