"""Operations through the real service (issue 13): an API and a worker as processes with JSON
logs, a webhook to a real receiver, TensorBoard files and /metrics; and two API processes
sharing PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmforge.processes import free_port, kill_process_group, spawn, terminate
from tests.e2e.conftest import SMALL_MODEL, SMALL_TRAINING, Api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

SECRET = "e2e-webhook-secret"
WAIT_S = 150.0


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log records of a process's log (Celery's start-up banner is printed, not
    logged, and is skipped: it does not start with '{')."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # every record line must parse
    return out


def _wait(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_a_job_through_the_service_with_json_logs_webhook_tensorboard_and_metrics(
    start_service: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, got = receiver
    for name, value in {"LMFORGE_LOG_FORMAT": "json", "LMFORGE_WEBHOOK_SECRET": SECRET,
                        "LMFORGE_WEBHOOK_ALLOW_PRIVATE": "1", "LMFORGE_WEBHOOK_POLL_S": "0.2",
                        "LMFORGE_METRICS_TOKEN": "scrape"}.items():
        monkeypatch.setenv(name, value)
    svc = start_service(f"sqlite:///{tmp_path / 'ops.db'}", name="ops")
    try:
        c = svc.client
        ds = c.post("/v1/datasets", files={"file": ("t.txt", ("to be or not to be\n" * 400)
                                                    .encode(), "text/plain")}).json()["id"]
        spec = {"name": "ops", "dataset_id": ds, "tokenizer": {"kind": "char"},
                "model": SMALL_MODEL,
                "training": {**SMALL_TRAINING, "batch_size": 4, "seq_len": 16, "max_steps": 20,
                             "eval_interval": 10, "log_interval": 5},
                "notify": {"url": url}, "integrations": [{"kind": "tensorboard"}]}
        r = c.post("/v1/jobs", json=spec, headers={"X-Request-ID": "ops-e2e-submit"})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = Api(svc, {"dataset_id": ds}).wait_finished(job_id)
        assert job["status"] == "succeeded", job

        # The webhook: signed, with the job as GET gives it.
        _wait(lambda: got, "the webhook")
        headers, body = got[0]
        assert headers["x-lmforge-signature"] == "sha256=" + hmac.new(
            SECRET.encode(), body, hashlib.sha256).hexdigest()
        payload = json.loads(body)
        assert payload["event"] == "job.succeeded"
        assert payload["job"] == c.get(f"/v1/jobs/{job_id}").json()
        row = _wait(lambda: [d for d in c.get(f"/v1/jobs/{job_id}/webhooks").json()["data"]
                             if d["state"] == "delivered"], "the delivery row")[0]
        assert row["attempts"] == 1

        # TensorBoard files of all 20 steps.
        tb = c.get(f"/v1/jobs/{job_id}/tensorboard.tar.gz")
        assert tb.status_code == 200 and tb.content[:2] == b"\x1f\x8b"

        # /metrics: this job among the succeeded, requests timed by route.
        text = c.get("/metrics", headers={"Authorization": "Bearer scrape"}).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        succeeded = [s.value for s in fams["lmforge_jobs"].samples
                     if s.labels["status"] == "succeeded"]
        assert succeeded == [1.0]
        assert any(s.labels.get("route") == "/v1/jobs/{job_id}"
                   for s in fams["lmforge_http_request_duration_seconds"].samples)
        assert [s.value for s in fams["lmforge_broker_up"].samples] == [1.0]

        # JSON logs: the API's line of the submission carries its request id; the worker's
        # lines of the run carry the job id; the delivery's line too.
        api = _json_lines(svc.logs["api"])
        assert any(rec["request_id"] == "ops-e2e-submit" and job_id in rec["message"]
                   for rec in api), api[-20:]
        assert any(rec["job_id"] == job_id and "delivered" in rec["message"] for rec in api)
        worker = _json_lines(svc.logs["worker"])
        mine = [rec for rec in worker if rec["job_id"] == job_id]
        assert any(rec["logger"] == "worker.runner" and "succeeded" in rec["message"]
                   for rec in mine), worker[-20:]
        assert all({"ts", "level", "logger", "message", "request_id", "job_id"} <= set(rec)
                   for rec in api + worker)
    finally:
        svc.stop()


def _healthz_count(base: str) -> float:
    """The API at ``base``'s count of answered ``GET /healthz`` (200) requests."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer scrape"},
                     timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "lmforge_http_request_duration_seconds":
            return sum(s.value for s in fam.samples
                       if s.name.endswith("_count") and s.labels["route"] == "/healthz"
                       and s.labels["status"] == "200")
    return 0.0


def test_two_api_processes_report_their_request_histograms_summed(
    tmp_path: Path, redis_url: str,
) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path / "home"),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}", "REDIS_URL": redis_url,
           "PROMETHEUS_MULTIPROC_DIR": str(prom), "LMFORGE_METRICS_TOKEN": "scrape",
           "PYTHONUNBUFFERED": "1"}
    procs, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            with open(tmp_path / f"api{i}.log", "ab") as log:
                procs.append(spawn([sys.executable, "-m", "lmforge.cli", "api", "--port",
                                    str(port), "--log-level", "warning"], env=env, log=log))
            urls.append(f"http://127.0.0.1:{port}")
        for u, p in zip(urls, procs, strict=True):
            def up(u: str = u, p: Any = p) -> bool:
                assert p.poll() is None, (tmp_path / "api0.log").read_text()
                try:
                    return httpx.get(f"{u}/healthz", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False
            _wait(up, f"{u} healthy")

        before = _healthz_count(urls[0])
        for _ in range(3):
            assert httpx.get(f"{urls[0]}/healthz").status_code == 200
        for _ in range(5):
            assert httpx.get(f"{urls[1]}/healthz").status_code == 200
        # Either process answers with the sum over both.
        assert _healthz_count(urls[0]) - before == 8
        assert _healthz_count(urls[1]) == _healthz_count(urls[0])
    finally:
        for p in procs:
            terminate(p, timeout=20)
            kill_process_group(p)
