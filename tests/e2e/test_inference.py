"""Generation and scoring over HTTP through real processes: the API, a Celery worker that
trains small char and BPE jobs, and the inference server (``lmforge serve``) that the API
calls. Scores are checked against the engine's own evaluation of the downloaded checkpoint."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TRAINING = {"max_steps": 30, "eval_interval": 10}
TOKENIZERS = {"char": {"kind": "char"}, "bpe": {"kind": "bpe", "vocab_size": 300}}


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('inference-db') / 'lmforge.db'}"
    service = start_service(url, name="inference", inference=True)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def jobs(svc: Any) -> dict[str, dict[str, Any]]:
    """One finished job per tokenizer kind, trained on the built-in corpus."""
    api = Api(svc, {"dataset": {"builtin": "python-docs"}})
    ids = {kind: api.submit(name=f"inference-{kind}", tokenizer=tok, training=TRAINING)["id"]
           for kind, tok in TOKENIZERS.items()}
    out = {}
    for kind, job_id in ids.items():
        job = api.wait_finished(job_id)
        assert job["status"] == "succeeded", job
        out[kind] = {"job": job, "checkpoints": api.checkpoints(job_id)}
    return out


def _post(svc: Any, job_id: str, route: str, body: dict[str, Any],
          headers: dict[str, str] | None = None) -> httpx.Response:
    return svc.client.post(f"/v1/jobs/{job_id}/{route}", json=body, headers=headers)


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_generate_returns_the_completions_reproducibly(svc: Any, jobs: dict[str, Any],
                                                        kind: str) -> None:
    job_id = jobs[kind]["job"]["id"]
    body = {"prompt": "def 日本 ☃", "max_new_tokens": 25, "temperature": 1.2, "top_k": 50,
            "top_p": 0.95, "seed": 3, "num_samples": 3}
    out = _ok(_post(svc, job_id, "generate", body))
    best = [c for c in jobs[kind]["checkpoints"] if c["kind"] == "best"][-1]
    assert (out["job_id"], out["checkpoint_id"], out["checkpoint_kind"]) == (job_id, best["id"],
                                                                             "best")
    assert out["checkpoint_step"] == best["step"] and out["tokenizer"] == kind
    assert out["prompt_tokens"] > 0
    assert len(out["samples"]) == 3
    for s in out["samples"]:
        assert s["num_tokens"] == 25
        assert "\ufffd" not in s["text"]
        if kind == "char":
            assert len(s["text"]) == 25  # one character per token, the prompt not included
    assert _ok(_post(svc, job_id, "generate", body))["samples"] == out["samples"]
    other = _ok(_post(svc, job_id, "generate", {**body, "seed": 4}))
    assert other["samples"] != out["samples"]


def test_every_checkpoint_can_be_named(svc: Any, jobs: dict[str, Any]) -> None:
    job_id = jobs["char"]["job"]["id"]
    last = _ok(_post(svc, job_id, "generate", {"checkpoint": "last", "max_new_tokens": 3}))
    assert last["checkpoint_kind"] == "last"
    some = jobs["char"]["checkpoints"][0]
    named = _ok(_post(svc, job_id, "generate", {"checkpoint": some["id"], "max_new_tokens": 3}))
    assert (named["checkpoint_id"], named["checkpoint_kind"]) == (some["id"], some["kind"])


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_score_matches_the_engines_loss_on_the_downloaded_checkpoint(
        svc: Any, jobs: dict[str, Any], kind: str) -> None:
    import torch

    from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from worker.engine.evaluate import evaluate

    job_id = jobs[kind]["job"]["id"]
    text = "The quick brown fox jumps over the lazy dog; 日本語 ☃.\nA second line.\n"
    out = _ok(_post(svc, job_id, "score", {"text": text}))
    best = [c for c in jobs[kind]["checkpoints"] if c["kind"] == "best"][-1]
    data = svc.client.get(f"/v1/jobs/{job_id}/checkpoints/{best['id']}/download").content
    ckpt = load_checkpoint(data)
    ids = torch.tensor(ckpt.tokenizer.encode(text), dtype=torch.long)
    ref = evaluate(build_model_from_checkpoint(ckpt), ids, batch_size=1, seq_len=ids.numel(),
                   device=torch.device("cpu"), char_level=kind == "char")
    assert out["num_tokens"] == ref.tokens == ids.numel() - 1
    assert out["loss"] == pytest.approx(ref.loss, abs=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))
    assert len(out["per_token"]) == out["num_tokens"]
    assert [t["id"] for t in out["per_token"]] == ids[1:].tolist()
    if kind == "char":
        assert out["bpc"] == pytest.approx(out["loss"] / math.log(2))
        assert [t["token"] for t in out["per_token"][:3]] == ["h", "e", " "]
    else:
        assert out["bpc"] is None


def test_a_tiny_deadline_is_504(svc: Any, jobs: dict[str, Any]) -> None:
    job_id = jobs["char"]["job"]["id"]
    for route, body in (("generate", {"max_new_tokens": 10}), ("score", {"text": "abcdef"})):
        r = _post(svc, job_id, route, {**body, "deadline_s": 1e-9})
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["code"] == "deadline_exceeded" and "deadline" in err["message"]


def test_errors_of_the_inference_server_come_back_as_they_are(svc: Any,
                                                              jobs: dict[str, Any]) -> None:
    r = _post(svc, jobs["char"]["job"]["id"], "score", {"text": "T"})  # one token
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "text" and "at least 2" in r.json()["error"]["message"]
    r = _post(svc, jobs["char"]["job"]["id"], "generate", {"prompt": "x" * 10_001})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt", r.text


def test_another_principal_cannot_use_the_job(svc: Any, jobs: dict[str, Any]) -> None:
    created = subprocess.run([sys.executable, "-m", "lmforge.cli", "keys", "create", "--name",
                              "intruder"], env=svc.env, capture_output=True, text=True,
                             check=True)
    other = {"Authorization": f"Bearer {created.stdout.strip()}"}
    job_id = jobs["char"]["job"]["id"]
    r = _post(svc, job_id, "generate", {}, headers=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    r = _post(svc, job_id, "score", {"text": "abc"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401, r.text
