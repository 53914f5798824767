"""Operations (issue 13): ``/metrics`` (Prometheus), webhooks (a real HTTP receiver on
127.0.0.1, real signatures, real retries), the outbound-URL rules, and the JSON log format.

The API runs in process (``TestClient``) on a real SQLite file; the webhook receiver is a real
``http.server`` on a free loopback port, so these tests allow private webhook targets
(``LMFORGE_WEBHOOK_ALLOW_PRIVATE``) except where they check that rule."""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from app.webhooks import WebhookDispatcher, backoff_s, job_payload, post, sign, verify
from core.contract import StepMetrics
from core.outbound import OutboundRefused, address_problem, resolve_public, url_problem
from lmforge.processes import RedisServer, free_port
from store.db import session_scope
from store.logs import JOB_ID, JsonFormatter, install_job_ids, job_log_context
from store.models import JobStatus
from store.progress import claim_job, finish_job, record_metrics
from store.queue import DEFAULT_ROUTE, CeleryEnqueuer, make_celery
from store.settings import Settings
from tests.api.conftest import RecordingEnqueuer, authorize, bearer, small_spec, upload

SECRET = "test-webhook-secret"
WAIT_S = 60.0


# -- a real webhook receiver ------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording each POST; answers ``statuses`` in turn (then
    the last one forever)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, n: int, timeout_s: float = WAIT_S) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= n, f"{len(self.received)} requests, expected {n}"
        return self.received


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rec.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
            status = rec.statuses[min(len(rec.received) - 1, len(rec.statuses) - 1)]
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=rec.server.serve_forever, daemon=True)
    thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}",
                    **extra)


@pytest.fixture
def hook_client(tmp_path: Path) -> Iterator[TestClient]:
    """An API with webhooks on (fast retries) and private targets allowed."""
    s = _settings(tmp_path, LMFORGE_WEBHOOK_SECRET=SECRET, LMFORGE_WEBHOOK_ALLOW_PRIVATE=True,
                  LMFORGE_WEBHOOK_POLL_S=0.05, LMFORGE_WEBHOOK_RETRY_FIRST_S=0.05,
                  LMFORGE_WEBHOOK_MAX_ATTEMPTS=3, LMFORGE_WEBHOOK_TIMEOUT_S=5)
    app = create_app(s)
    from app.deps import get_enqueuer

    app.dependency_overrides[get_enqueuer] = lambda: RecordingEnqueuer()
    with TestClient(app, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


def _factory(c: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = c.app.state.session_factory  # type: ignore[attr-defined]
    return factory


def _submit(c: TestClient, url: str) -> str:
    ds = upload(c).json()["id"]
    r = c.post("/v1/jobs", json={**small_spec(ds), "notify": {"url": url}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _deliveries(c: TestClient, job_id: str) -> list[dict[str, Any]]:
    r = c.get(f"/v1/jobs/{job_id}/webhooks")
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def _wait_state(c: TestClient, job_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        rows = _deliveries(c, job_id)
        if rows and rows[0]["state"] == state:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"delivery never reached {state}: {_deliveries(c, job_id)}")


# -- webhooks ---------------------------------------------------------------------------------


def test_a_finished_job_is_posted_signed_with_the_job_as_get_gives_it(
    hook_client: TestClient, receiver: Receiver,
) -> None:
    c = hook_client
    job_id = _submit(c, receiver.url)
    assert [d["state"] for d in _deliveries(c, job_id)] == ["waiting"]
    with session_scope(_factory(c)) as s:
        job = claim_job(s, job_id, "w1")
        assert job is not None
        finish_job(s, job_id, job.attempts, JobStatus.SUCCEEDED, result={"steps": 5})
    (got,) = receiver.wait_for(1)
    row = _wait_state(c, job_id, "delivered")
    assert (row["attempts"], row["last_status_code"], row["event"]) == (1, 200,
                                                                        "job.succeeded")

    # The signature is HMAC-SHA256 of the raw body with the deployment's secret.
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-lmforge-signature"] == expected
    body = json.loads(got.body)
    assert body["event"] == got.headers["x-lmforge-event"] == "job.succeeded"
    assert body["id"] == got.headers["x-lmforge-delivery"] == row["id"]
    assert str(body["timestamp"]) == got.headers["x-lmforge-timestamp"]
    assert verify(SECRET, got.body, got.headers["x-lmforge-signature"], body["timestamp"])
    # A replay a day later is refused by the timestamp, a changed body by the signature.
    assert not verify(SECRET, got.body, expected, body["timestamp"],
                      now=body["timestamp"] + 86400)
    assert not verify(SECRET, got.body.replace(b"succeeded", b"failed"), expected)
    # The job, exactly as GET /v1/jobs/{id} answers it.
    assert body["job"] == c.get(f"/v1/jobs/{job_id}").json()
    assert body["job"]["status"] == "succeeded"


def test_a_cancelled_job_is_posted_too(hook_client: TestClient, receiver: Receiver) -> None:
    job_id = _submit(hook_client, receiver.url)
    assert hook_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    (got,) = receiver.wait_for(1)
    assert json.loads(got.body)["event"] == "job.cancelled"
    assert _wait_state(hook_client, job_id, "delivered")["event"] == "job.cancelled"


def test_failed_tries_are_retried_until_one_succeeds(
    hook_client: TestClient, receiver: Receiver,
) -> None:
    receiver.statuses = [503, 500, 204]
    job_id = _submit(hook_client, receiver.url)
    hook_client.post(f"/v1/jobs/{job_id}/cancel")
    got = receiver.wait_for(3)
    row = _wait_state(hook_client, job_id, "delivered")
    assert (row["attempts"], row["last_status_code"], row["last_error"]) == (3, 204, None)
    bodies = [json.loads(r.body) for r in got]
    # One delivery (one id, for the receiver's deduplication), tried three times.
    assert {b["id"] for b in bodies} == {row["id"]}
    assert [b["attempt"] for b in bodies] == [1, 2, 3]
    assert all(verify(SECRET, r.body, r.headers["x-lmforge-signature"]) for r in got)


def test_delivery_gives_up_after_the_last_try(hook_client: TestClient,
                                              receiver: Receiver) -> None:
    receiver.statuses = [500]
    job_id = _submit(hook_client, receiver.url)
    hook_client.post(f"/v1/jobs/{job_id}/cancel")
    row = _wait_state(hook_client, job_id, "failed")
    assert (row["attempts"], row["last_status_code"], row["last_error"]) == (3, 500, "HTTP 500")
    assert len(receiver.received) == 3  # LMFORGE_WEBHOOK_MAX_ATTEMPTS


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    s = Settings(LMFORGE_WEBHOOK_RETRY_FIRST_S=10, LMFORGE_WEBHOOK_RETRY_MAX_S=60)
    assert [backoff_s(n, s) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]


def test_two_api_processes_never_send_one_try_twice(
    hook_client: TestClient, receiver: Receiver, tmp_path: Path,
) -> None:
    """Two more dispatchers (as in two other API processes) poll the same database at once
    with the app's own: each job's webhook arrives exactly once."""
    c = hook_client
    jobs = [_submit(c, receiver.url) for _ in range(6)]
    s: Settings = c.app.state.settings  # type: ignore[attr-defined]
    others = [WebhookDispatcher(_factory(c), s, job_payload) for _ in range(2)]
    for d in others:
        d.start()
    try:
        for job_id in jobs:
            c.post(f"/v1/jobs/{job_id}/cancel")
        receiver.wait_for(len(jobs))
        for job_id in jobs:
            _wait_state(c, job_id, "delivered")
    finally:
        for d in others:
            d.stop()
    ids = [json.loads(r.body)["job"]["id"] for r in receiver.received]
    assert sorted(ids) == sorted(jobs)


# -- the outbound-URL rules -------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.1.2.3:9000/", "http://localhost:8000/x",
    "http://api.localhost/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/", "http://192.168.1.10/",
    "http://172.16.0.1/", "http://100.64.0.1/", "http://224.0.0.1/", "http://0.0.0.0/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://printer.local/", "http://db.internal/",
    "http://intranet/",
])
def test_a_private_or_local_webhook_url_is_refused_at_submission(
    tmp_path: Path, url: str,
) -> None:
    app = create_app(_settings(tmp_path, LMFORGE_WEBHOOK_SECRET=SECRET))
    with TestClient(app) as c:
        authorize(c)
        ds = upload(c).json()["id"]
        r = c.post("/v1/jobs", json={**small_spec(ds), "notify": {"url": url}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "notify.url"
        assert r.json()["error"]["message"].startswith("notify.url ")


def test_webhook_url_form_and_a_missing_secret_are_422s_naming_the_field(
    tmp_path: Path,
) -> None:
    with TestClient(create_app(_settings(tmp_path))) as c:
        authorize(c)
        ds = upload(c).json()["id"]
        public = {"url": "https://hooks.example.com/lmforge"}
        r = c.post("/v1/jobs", json={**small_spec(ds), "notify": public})
        assert r.status_code == 422 and r.json()["error"]["field"] == "notify.url"
        assert "LMFORGE_WEBHOOK_SECRET" in r.json()["error"]["message"]
        for bad in ("ftp://hooks.example.com/", "https://user:pw@hooks.example.com/",
                    "hooks.example.com/x", "https:///nohost"):
            r = c.post("/v1/jobs", json={**small_spec(ds), "notify": {"url": bad}})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["field"] == "notify.url", bad
    app = create_app(_settings(tmp_path / "2", LMFORGE_WEBHOOK_SECRET=SECRET))
    with TestClient(app) as c:
        authorize(c)
        ds = upload(c).json()["id"]
        r = c.post("/v1/jobs", json={**small_spec(ds), "notify": public})
        assert r.status_code == 201, r.text  # a public name: checked again at delivery
        assert r.json()["spec"]["notify"] == public


def test_a_private_mlflow_server_must_be_listed_by_the_deployment(tmp_path: Path) -> None:
    spec_of = lambda ds, uri: {**small_spec(ds), "integrations": [  # noqa: E731
        {"kind": "tensorboard"}, {"kind": "mlflow", "tracking_uri": uri}]}
    app = create_app(_settings(tmp_path, LMFORGE_MLFLOW_TRACKING_URIS="http://127.0.0.1:5000"))
    with TestClient(app) as c:
        authorize(c)
        ds = upload(c).json()["id"]
        assert c.post("/v1/jobs", json=spec_of(ds, "http://127.0.0.1:5000")).status_code == 201
        for uri in ("http://127.0.0.1:5001", "http://127.0.0.1:50001", "http://10.1.2.3:5000"):
            r = c.post("/v1/jobs", json=spec_of(ds, uri))
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "integrations.1.tracking_uri"
        r = c.post("/v1/jobs", json={**small_spec(ds), "integrations": [
            {"kind": "tensorboard"}, {"kind": "tensorboard"}]})
        assert r.status_code == 422 and "integrations" in r.json()["error"]["message"]


def test_address_rules() -> None:
    refused = ["127.0.0.1", "::1", "10.1.1.1", "172.31.255.255", "192.168.0.1",
               "169.254.1.1", "fe80::1", "224.0.0.251", "ff02::1", "0.0.0.0", "::",
               "100.64.0.1", "::ffff:10.0.0.1", "240.0.0.1", "fd12:3456::1"]
    for a in refused:
        assert address_problem(ipaddress.ip_address(a)) is not None, a
    for a in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"):
        assert address_problem(ipaddress.ip_address(a)) is None, a
    assert url_problem("http://127.0.0.1/", allow_private=True) is None
    assert url_problem("gopher://127.0.0.1/", allow_private=True) is not None


def _resolver(address: str) -> Callable[..., Any]:
    """A DNS answer for any name: ``address`` (what a rebinding attacker's server gives the
    second time it is asked)."""
    def resolve(host: str, port: int, **_: Any) -> list[Any]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
    return resolve


def test_a_public_name_that_resolves_to_a_private_address_is_refused_at_delivery() -> None:
    s = Settings(LMFORGE_WEBHOOK_SECRET=SECRET)
    url = "https://hooks.example.com/x"  # passes the submission's check by name
    assert url_problem(url, allow_private=False) is None
    for address in ("127.0.0.1", "169.254.169.254", "::1", "10.0.0.7"):
        result = post(url, b"{}", {}, s, resolver=_resolver(address))
        assert (result.ok, result.final) == (False, True), address
        assert result.error is not None and "resolves to" in result.error
        with pytest.raises(OutboundRefused):
            resolve_public(url, allow_private=False, resolver=_resolver(address))
    target = resolve_public(url, allow_private=False, resolver=_resolver("93.184.216.34"))
    assert (target.address, target.port, target.host) == ("93.184.216.34", 443,
                                                          "hooks.example.com")


def test_a_refused_url_fails_the_delivery_without_retries(
    hook_client: TestClient, receiver: Receiver,
) -> None:
    """A name that does not resolve (or resolves to a private address with private targets
    not allowed) is not retried: the row fails at once."""
    job_id = _submit(hook_client, "http://no-such-host.invalid/hook")
    hook_client.post(f"/v1/jobs/{job_id}/cancel")
    row = _wait_state(hook_client, job_id, "failed")
    assert row["attempts"] == 1 and row["last_error"].startswith("refused:")


def test_sign_is_hmac_sha256_of_the_body() -> None:
    assert sign("k", b"body") == "sha256=" + hmac.new(b"k", b"body", "sha256").hexdigest()


# -- /metrics ---------------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], name: str, sample: str | None = None,
            **labels: str) -> float | None:
    family = families.get(name)
    if family is None:
        return None
    for s in family.samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v
                                                        for k, v in labels.items()):
            return float(s.value)
    return None


def _latency_count(families: dict[str, Any], route: str, status: str) -> float:
    value = _sample(families, "lmforge_http_request_duration_seconds",
                    "lmforge_http_request_duration_seconds_count", method="GET", route=route,
                    status=status)
    return value or 0.0


def test_metrics_needs_the_metrics_token_or_an_admin_key(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, LMFORGE_METRICS_TOKEN="scrape-token"))
    with TestClient(app) as c:
        user = authorize(c)
        admin = authorize(c, "root", admin=True)
        assert c.get("/metrics", headers={"Authorization": ""}).status_code == 401
        assert c.get("/metrics", headers=bearer("wrong")).status_code == 401
        assert c.get("/metrics", headers=bearer(user)).status_code == 403
        for key in ("scrape-token", admin):
            r = c.get("/metrics", headers=bearer(key))
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/plain")
        assert "/metrics" not in c.get("/openapi.json").json()["paths"]


def test_metrics_report_jobs_by_status_throughput_and_latency(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, LMFORGE_METRICS_TOKEN="t",
                               REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    from app.deps import get_enqueuer

    app.dependency_overrides[get_enqueuer] = lambda: RecordingEnqueuer()
    with TestClient(app) as c:
        authorize(c)
        ds = upload(c).json()["id"]
        ids = [c.post("/v1/jobs", json=small_spec(ds)).json()["id"] for _ in range(3)]
        c.post(f"/v1/jobs/{ids[0]}/cancel")
        with session_scope(_factory(c)) as s:  # job 2 runs on worker w1: 150 steps
            job = claim_job(s, ids[1], "gpu-1:4242")
            assert job is not None
            record_metrics(s, ids[1], job.attempts, [
                StepMetrics(step=n, epoch=0.0, train_loss=2.0, lr=1e-3, grad_norm=1.0,
                            tokens_per_s=1000.0 + n, elapsed_s=0.5 * n, tokens_seen=64 * n)
                for n in range(1, 151)])
        before = _families(c.get("/metrics", headers=bearer("t")).text)
        for _ in range(3):
            assert c.get(f"/v1/jobs/{ids[2]}").status_code == 200
        assert c.get("/v1/no-such-route").status_code == 404
        fams = _families(c.get("/metrics", headers=bearer("t")).text)

    assert _sample(fams, "lmforge_database_up") == 1.0
    assert {k: _sample(fams, "lmforge_jobs", status=k) for k in
            ("queued", "running", "succeeded", "failed", "cancelled")} == {
        "queued": 1.0, "running": 1.0, "succeeded": 0.0, "failed": 0.0, "cancelled": 1.0}
    who = {"worker": "gpu-1:4242", "job_id": ids[1]}
    assert _sample(fams, "lmforge_worker_tokens_per_second", **who) == 1150.0  # the last row
    # (150 - 50) steps in (75 - 25) s of the run's clock.
    assert _sample(fams, "lmforge_worker_steps_per_second", **who) == pytest.approx(2.0)
    assert _sample(fams, "lmforge_worker_job_step", **who) == 150.0
    assert _sample(fams, "lmforge_broker_up") == 0.0  # nothing listens on REDIS_URL's port
    assert _sample(fams, "lmforge_queue_messages") is None
    # Latency by route template (never the raw path), method and status.
    route = "/v1/jobs/{job_id}"
    assert _latency_count(fams, route, "200") - _latency_count(before, route, "200") == 3
    assert _latency_count(fams, "unmatched", "404") >= 1
    assert not any(ids[2] in s.labels.get("route", "")
                   for s in fams["lmforge_http_request_duration_seconds"].samples)


def test_metrics_report_the_queue_depth_of_a_real_redis(tmp_path: Path) -> None:
    try:
        redis = RedisServer(dir=tmp_path / "redis").start()
    except Exception as exc:
        pytest.skip(f"no Redis: {exc}")
    try:
        s = _settings(tmp_path, LMFORGE_METRICS_TOKEN="t", REDIS_URL=redis.url)
        enqueuer = CeleryEnqueuer(make_celery(s))
        for i in range(4):  # messages nobody consumes
            enqueuer.enqueue(f"job_{i:032x}", DEFAULT_ROUTE)
        with TestClient(create_app(s, enqueuer=enqueuer)) as c:
            fams = _families(c.get("/metrics", headers=bearer("t")).text)
        assert _sample(fams, "lmforge_broker_up") == 1.0
        assert _sample(fams, "lmforge_queue_messages", queue="lmforge") == 4.0
        assert _sample(fams, "lmforge_queue_unacked_messages") == 0.0
    finally:
        redis.stop()


# -- JSON logs --------------------------------------------------------------------------------


def test_json_log_lines_parse_and_carry_the_job_id() -> None:
    install_job_ids()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lmforge.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with job_log_context("job_" + "a" * 32):
            logger.info("step %d of %s", 3, "job", extra={"loss": 1.5})
            seen = []
            t = threading.Thread(target=lambda: seen.append(JOB_ID.get()))
            t.start()
            t.join()
        logger.warning("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first, second, third = lines[:3]
    assert first["message"] == "step 3 of job" and first["job_id"] == "job_" + "a" * 32
    assert first["loss"] == 1.5 and first["level"] == "INFO" and first["ts"].endswith("Z")
    assert first["request_id"] is None
    assert seen == [None]  # a plain thread does not inherit the context (runner copies it)
    assert second["job_id"] is None and second["level"] == "WARNING"
    assert third["exc_info"].rstrip().endswith("ValueError: boom")
    assert all(set(line) >= {"ts", "level", "logger", "message", "request_id", "job_id"}
               for line in lines)
