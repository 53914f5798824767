"""``lmforge.client`` against a real service (API, worker and inference server as processes,
SQLite): datasets, jobs, paging, metrics (whole, downsampled, CSV), the event stream resuming
through real dropped connections, checkpoint downloads verified by sha256 (a byte flipped in
flight leaves no file), inference, and the one error type."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmforge.client import TERMINAL_STATUSES, Client, Event, LMForgeError
from tests.conftest import REPO_ROOT, Service
from tests.e2e.conftest import SMALL_MODEL, SMALL_TRAINING
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Plenty of text for a char model with 16 x 32 batches, in a few lines of varied words.
WORDS = ("to be or not to be that is the question whether tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune").split()
TEXT = "\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12))
                 for i in range(3000)) + "\n"


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Service], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Service]:
    url = f"sqlite:///{tmp_path_factory.mktemp('client-db') / 'lmforge.db'}"
    service = start_service(url, name="client", inference=True)
    yield service
    service.stop()


@pytest.fixture
def lm(svc: Service) -> Iterator[Client]:
    with Client(svc.base_url, svc.key, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def corpus(svc: Service, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    with Client(svc.base_url, svc.key) as client:
        return str(client.datasets.upload(path, name="corpus")["id"])


def _spec(dataset_id: str, **training: Any) -> dict[str, Any]:
    return {"name": "client", "dataset_id": dataset_id, "tokenizer": {"kind": "char"},
            "model": SMALL_MODEL,
            "training": {**SMALL_TRAINING, "max_steps": 60, "eval_interval": 20,
                         "log_interval": 5, **training}}


@pytest.fixture(scope="module")
def finished(svc: Service, corpus: str) -> dict[str, Any]:
    """A small job, run to the end (followed with the client's event stream)."""
    with Client(svc.base_url, svc.key) as client:
        job = client.jobs.create(_spec(corpus))
        ended = client.jobs.wait(job["id"])
    assert ended["status"] == "succeeded", ended
    return ended


def test_datasets_upload_list_get_delete(lm: Client, tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    a.write_text("first file\n" * 50)
    import gzip

    b.write_bytes(gzip.compress(b"second file\n" * 50))
    ds = lm.datasets.upload([a, b], name="two files", idempotency_key="upload-1")
    assert ds["num_files"] == 2 and ds["compression"] == "mixed" and ds["num_lines"] == 100
    again = lm.datasets.upload([a, b], name="two files", idempotency_key="upload-1")
    assert again["id"] == ds["id"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(30)))
    jl = lm.datasets.upload(rows, format="jsonl", text_field="body")
    assert jl["format"] == "jsonl" and jl["num_lines"] == 30
    with pytest.raises(TypeError, match="unknown upload option"):
        lm.datasets.upload(rows, fromat="jsonl")
    assert lm.datasets.get(ds["id"]) == ds
    assert {ds["id"], jl["id"]} <= {d["id"] for d in lm.datasets.list()}
    lm.datasets.delete(jl["id"])
    with pytest.raises(LMForgeError) as err:
        lm.datasets.get(jl["id"])
    assert (err.value.code, err.value.status) == ("not_found", 404)


def test_errors_carry_the_apis_code_message_and_field(lm: Client, svc: Service,
                                                      corpus: str) -> None:
    with pytest.raises(LMForgeError) as err:
        lm.jobs.create(_spec(corpus, batch_size=0))
    assert err.value.status == 422 and err.value.field == "training.batch_size"
    assert err.value.code and err.value.message
    assert "training.batch_size" in str(err.value) and "[HTTP 422]" in str(err.value)
    with pytest.raises(LMForgeError) as err:
        lm.jobs.get("job_" + "0" * 32)
    assert (err.value.code, err.value.status) == ("not_found", 404)
    with Client(svc.base_url, "lmf_not_a_key") as bad, pytest.raises(LMForgeError) as err:
        bad.jobs.list()
    assert (err.value.code, err.value.status) == ("unauthorized", 401)
    with Client("http://127.0.0.1:9", svc.key) as nowhere, pytest.raises(LMForgeError) as err:
        nowhere.jobs.list()
    assert err.value.code == "connection_failed" and err.value.status is None


def test_create_idempotent_dry_run_list_pages_and_cancel(svc: Service, corpus: str) -> None:
    with Client(svc.base_url, svc.key, page_size=2) as lm:
        est = lm.jobs.create(_spec(corpus), dry_run=True)
        assert est["dry_run"] is True and est["parameters"] > 0
        long = _spec(corpus, max_steps=1_000_000, eval_interval=1_000_000)
        first = lm.jobs.create(long, idempotency_key="client-long")
        assert lm.jobs.create(long, idempotency_key="client-long")["id"] == first["id"]
        more = [lm.jobs.create(_spec(corpus, max_steps=1_000_000))["id"] for _ in range(3)]
        every = lm.jobs.list()  # pages of 2
        ids = [j["id"] for j in every]
        assert ids[:4] == [*reversed(more), first["id"]] and len(set(ids)) == len(ids)
        assert [j["id"] for j in lm.jobs.list(limit=3)] == ids[:3]
        queued = {j["id"] for j in lm.jobs.list(status="queued")}
        assert set(more) <= queued
        positions = [lm.jobs.get(i)["progress"]["queue_position"] for i in more]
        assert positions == sorted(positions) and None not in positions
        for job_id in [*more, first["id"]]:
            lm.jobs.cancel(job_id)
        ended = [lm.jobs.wait(i)["status"] for i in [*more, first["id"]]]
        assert ended == ["cancelled"] * 4
        with pytest.raises(LMForgeError) as err:
            lm.jobs.cancel(first["id"])
        assert (err.value.code, err.value.status) == ("job_finished", 409)
        assert first["id"] in {j["id"] for j in lm.jobs.list(status="cancelled")}


def test_metrics_whole_downsampled_and_csv(lm: Client, finished: dict[str, Any],
                                           tmp_path: Path) -> None:
    job_id = finished["id"]
    rows = lm.jobs.metrics(job_id)
    assert [r["step"] for r in rows] == list(range(1, 61))
    few = lm.jobs.metrics(job_id, resolution=10)
    assert 0 < len(few) <= 10 and [r["step"] for r in few] == sorted(r["step"] for r in few)
    losses = [r["train_loss"] for r in rows]
    kept = [r["train_loss"] for r in few]
    assert min(kept) == min(losses) and max(kept) == max(losses)
    val = lm.jobs.metrics(job_id, resolution=10, metric="val_loss")
    assert [r["step"] for r in val] == [20, 40, 60]
    path = lm.jobs.metrics_csv(job_id, tmp_path / "m.csv")
    table = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(table) == len(rows)
    for got, want in zip(table, rows, strict=True):
        assert int(got["step"]) == want["step"]
        assert float(got["train_loss"]) == want["train_loss"]
        assert got["val_loss"] == ("" if want["val_loss"] is None else repr(want["val_loss"]))


def test_events_resume_after_dropped_connections(svc: Service, corpus: str) -> None:
    """The stream goes through a TCP proxy that drops every connection three times while
    the job runs; the iterator reconnects with Last-Event-ID and yields every metric row
    exactly once, in order, then the final status."""
    proxy = TcpProxy(int(svc.base_url.rsplit(":", 1)[1]))
    try:
        with Client(proxy.url, svc.key) as lm:
            job = lm.jobs.create(_spec(corpus, max_steps=300, log_interval=2, eval_interval=100))
            events: list[Event] = []
            cut_after, pending = {10, 40, 90}, 0
            with lm.jobs.events(job["id"]) as stream:
                for event in stream:
                    events.append(event)
                    if event.event == "metrics":
                        pending += len([e for e in events if e.event == "metrics"]) in cut_after
                    # Cut once the stream has a connection (events parsed from a chunk read
                    # before a cut still come out of the buffer first).
                    if pending and proxy.open_connections():
                        proxy.cut()
                        pending -= 1
                reconnects = stream.reconnects
            final = lm.jobs.get(job["id"])
            db_rows = lm.jobs.metrics(job["id"])
            checkpoints = lm.jobs.checkpoints(job["id"])
    finally:
        proxy.close()
    assert final["status"] == "succeeded"
    assert reconnects >= 3
    metrics = [e.data for e in events if e.event == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 301))  # none lost, none twice
    assert metrics == db_rows  # each as GET /metrics gives it
    assert [e.id for e in events if e.event == "metrics"] == [str(s) for s in range(1, 301)]
    # Each reconnection asked for what came after the last event id received.
    sent_ids = [line.split(":", 1)[1].strip() for h in proxy.request_heads if "/events" in h
                for line in h.split("\r\n") if line.lower().startswith("last-event-id:")]
    received = {e.id for e in events if e.id is not None}
    assert len(sent_ids) == reconnects and set(sent_ids) <= received
    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses[-1] == "succeeded" and events[-1].terminal
    assert len(statuses) == len(set(statuses))  # the repeated current status is not yielded
    ckpt_ids = [e.data["id"] for e in events if e.event == "checkpoint"]
    assert len(ckpt_ids) == len(set(ckpt_ids))
    # Every checkpoint the job kept was announced (older ones were pruned since).
    assert {c["id"] for c in checkpoints} <= set(ckpt_ids)


def test_events_of_a_finished_job_end_with_its_status(lm: Client,
                                                      finished: dict[str, Any]) -> None:
    events = list(lm.jobs.events(finished["id"], after_step=55))
    assert [e.data["step"] for e in events if e.event == "metrics"] == [56, 57, 58, 59, 60]
    assert events[-1].event == "status" and events[-1].data["status"] in TERMINAL_STATUSES
    with pytest.raises(LMForgeError) as err:
        list(lm.jobs.events("job_" + "0" * 32))
    assert err.value.status == 404


def test_download_verifies_sha256_and_leaves_no_partial_file(
        svc: Service, lm: Client, finished: dict[str, Any], tmp_path: Path) -> None:
    job_id = finished["id"]
    rows = {c["id"]: c for c in lm.jobs.checkpoints(job_id)}
    seen: list[tuple[int, int]] = []
    best = lm.checkpoints.download(job_id, "best", tmp_path,
                                   on_progress=lambda d, t: seen.append((d, t)))
    row = lm.checkpoints.find(job_id, "best")
    assert best == tmp_path / f"{job_id}-best-step{row['step']}.safetensors"
    assert hashlib.sha256(best.read_bytes()).hexdigest() == rows[row["id"]]["sha256"]
    assert seen[-1] == (row["bytes"], row["bytes"])
    last = lm.checkpoints.download(job_id, "last", tmp_path / "sub" / "last.safetensors")
    assert hashlib.sha256(last.read_bytes()).hexdigest() == lm.checkpoints.find(
        job_id, "last")["sha256"]
    by_id = lm.checkpoints.download(job_id, row["id"], tmp_path / "by-id.safetensors")
    assert by_id.read_bytes() == best.read_bytes()
    with pytest.raises(LMForgeError) as err:
        lm.checkpoints.download(job_id, "ckpt_" + "0" * 32, tmp_path)
    assert err.value.code == "not_found" and err.value.field == "checkpoint"
    # One byte flipped in flight: the sha256 check fails and nothing is left behind.
    out = tmp_path / "corrupt"
    out.mkdir()
    proxy = TcpProxy(int(svc.base_url.rsplit(":", 1)[1]))
    try:
        proxy.corrupt_body_byte(b"x-checkpoint-sha256", 1000)
        with Client(proxy.url, svc.key) as through, pytest.raises(LMForgeError) as err:
            through.checkpoints.download(job_id, "best", out / "model.safetensors")
    finally:
        proxy.close()
    assert err.value.code == "checksum_mismatch" and row["sha256"] in err.value.message
    assert list(out.iterdir()) == []  # no partial file, no temporary file


def test_generate_and_score(lm: Client, finished: dict[str, Any]) -> None:
    out = lm.jobs.generate(finished["id"], "to be", max_new_tokens=20, num_samples=2, seed=3)
    assert len(out["samples"]) == 2 and out["checkpoint_kind"] == "best"
    assert out == lm.jobs.generate(finished["id"], "to be", max_new_tokens=20, num_samples=2,
                                   seed=3)
    score = lm.jobs.score(finished["id"], "to be or not to be")
    assert score["loss"] > 0 and score["num_tokens"] >= 2
    with pytest.raises(LMForgeError) as err:
        lm.jobs.classify(finished["id"], ["a text"])
    assert (err.value.code, err.value.status) == ("wrong_task", 409)


def test_importing_the_client_loads_neither_torch_nor_the_service() -> None:
    code = ("import json, sys; import lmforge.client, lmforge.remote; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert loaded & {"torch", "app", "store", "worker", "sqlalchemy", "celery"} == set()


def test_close_from_another_thread_stops_a_blocked_stream(svc: Service, corpus: str) -> None:
    with Client(svc.base_url, svc.key) as lm:
        job = lm.jobs.create(_spec(corpus, max_steps=1_000_000, eval_interval=1_000_000))
        stream = lm.jobs.events(job["id"])
        first = next(stream)
        assert first.event == "status"
        closer = threading.Timer(1.0, stream.close)
        closer.start()
        got = list(stream)  # returns once closed, without raising
        closer.join()
        assert all(e.event != "status" or not e.terminal for e in got)
        lm.jobs.cancel(job["id"])
        assert lm.jobs.wait(job["id"])["status"] == "cancelled"
