"""The ``lmforge`` user commands (lmforge.remote) as a person or a script runs them, against a
real service: ``datasets upload``, ``submit SPEC.yaml|json --follow`` (exit status = the
job's outcome), ``jobs``, ``status``, ``follow``, ``cancel``, ``download`` (sha256 checked),
``--json`` output, and one-line errors with the API's code."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Service
from tests.e2e.conftest import SMALL_MODEL, SMALL_TRAINING

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
               for i in range(3000))


@pytest.fixture(scope="module")
def svc(start_service: Callable[..., Service], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Service]:
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-db') / 'lmforge.db'}"
    service = start_service(url, name="cli")
    yield service
    service.stop()


def _env(svc: Service, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_")}
    return {**env, "LMFORGE_URL": svc.base_url, "LMFORGE_API_KEY": svc.key,
            "PYTHONUNBUFFERED": "1", **extra}


def lmforge(svc: Service, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], env=_env(svc, **extra),
                          capture_output=True, text=True, timeout=300, check=False)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def dataset_id(svc: Service, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli-data") / "corpus.txt"
    path.write_text(TEXT)
    ds = _json(lmforge(svc, "datasets", "upload", str(path), "--name", "corpus", "--json"))
    assert ds["name"] == "corpus" and ds["num_lines"] == 3000
    return str(ds["id"])


def _spec(dataset_id: str, **training: Any) -> dict[str, Any]:
    return {"name": "cli", "dataset_id": dataset_id, "tokenizer": {"kind": "char"},
            "model": SMALL_MODEL,
            "training": {**SMALL_TRAINING, "max_steps": 40, "eval_interval": 20,
                         "log_interval": 5, **training}}


@pytest.fixture(scope="module")
def succeeded(svc: Service, dataset_id: str, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """``lmforge submit SPEC.yaml --follow``: exit 0, the summary on stdout, the bar on
    stderr."""
    spec = tmp_path_factory.mktemp("cli-spec") / "spec.yaml"
    spec.write_text(yaml.safe_dump(_spec(dataset_id)))
    proc = lmforge(svc, "submit", str(spec), "--follow")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("job job_") and " succeeded, 40 steps (max_steps)" in summary
    assert "best_val_ppl" in summary
    assert "submitted job_" in proc.stderr and "40/40" in proc.stderr  # the bar's last frame
    job_id = summary.split()[1]
    return {"id": job_id}


def test_upload_options_and_listing(svc: Service, dataset_id: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)))
    proc = lmforge(svc, "datasets", "upload", str(rows), "--format", "jsonl",
                   "--text-field", "body")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ds_") and "20 lines" in proc.stdout
    listed = _json(lmforge(svc, "datasets", "list", "--json"))
    assert dataset_id in {d["id"] for d in listed}


def test_submit_follow_json_is_one_event_per_line(svc: Service, dataset_id: str,
                                                  tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(dataset_id, max_steps=20, eval_interval=10)))
    proc = lmforge(svc, "submit", str(spec), "--follow", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["event"] == "job" and lines[0]["data"]["status"] == "queued"
    steps = [e["data"]["step"] for e in lines if e["event"] == "metrics"]
    assert steps == list(range(1, 21))
    assert lines[-1] == {"event": "status", "id": None, "data": lines[-1]["data"]}
    assert lines[-1]["data"]["status"] == "succeeded"


def test_failed_job_exits_3(svc: Service, dataset_id: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(_spec(dataset_id, max_steps=1_000_000,
                                         eval_interval=1_000_000, max_duration_s=1.0)))
    proc = lmforge(svc, "submit", str(spec), "--follow")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "failed: timeout:" in proc.stdout.strip().splitlines()[-1]


def test_follow_then_cancel_exits_4(svc: Service, dataset_id: str, tmp_path: Path) -> None:
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps(_spec(dataset_id, max_steps=1_000_000,
                                     eval_interval=1_000_000)))
    job = _json(lmforge(svc, "submit", str(spec), "--json"))
    follower = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "follow", job["id"],
                                 "--json"], env=_env(svc), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        deadline = time.monotonic() + 150
        for line in follower.stdout:  # until the first metrics event: the job runs
            if json.loads(line)["event"] == "metrics":
                break
            assert time.monotonic() < deadline
        cancelled = _json(lmforge(svc, "cancel", job["id"], "--json"))
        assert cancelled["id"] == job["id"] and cancelled["cancel_requested"] is True
        rest = follower.stdout.read()
        assert follower.wait(timeout=150) == 4
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert json.loads(rest.splitlines()[-1])["data"]["status"] == "cancelled"
    again = lmforge(svc, "cancel", job["id"])
    assert again.returncode == 1 and "job_finished" in again.stderr
    assert lmforge(svc, "follow", job["id"]).returncode == 4  # a finished job: at once


def test_jobs_status_and_download(svc: Service, succeeded: dict[str, Any],
                                  tmp_path: Path) -> None:
    job_id = succeeded["id"]
    listed = _json(lmforge(svc, "jobs", "--status", "succeeded", "--json"))
    assert job_id in {j["id"] for j in listed}
    assert all(j["status"] == "succeeded" for j in listed)
    table = lmforge(svc, "jobs")
    assert table.returncode == 0 and job_id in table.stdout and "STATUS" in table.stdout
    job = _json(lmforge(svc, "status", job_id, "--json"))
    assert job["status"] == "succeeded" and job["progress"]["step"] == 40
    human = lmforge(svc, "status", job_id)
    assert "status    succeeded" in human.stdout and "40/40 (100%)" in human.stdout
    got = _json(lmforge(svc, "download", job_id, "-o", str(tmp_path), "--json"))
    path = Path(got["path"])
    assert path.parent == tmp_path and got["verified"] is True
    assert hashlib.sha256(path.read_bytes()).hexdigest() == got["sha256"]
    assert got["checkpoint"]["kind"] == "best" and path.stat().st_size == got["bytes"]
    last = lmforge(svc, "download", job_id, "--checkpoint", "last", "-o",
                   str(tmp_path / "last.safetensors"))
    assert last.returncode == 0, last.stderr
    assert "sha256" in last.stdout and "verified" in last.stdout
    assert (tmp_path / "last.safetensors").stat().st_size > 0
    assert "download" in last.stderr  # the progress bar, on stderr


def _one_error_line(proc: subprocess.CompletedProcess[str], code: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmforge: error: {code}: "), proc.stderr
    return lines[0]


def test_errors_are_one_line_with_the_apis_code(svc: Service, dataset_id: str,
                                                tmp_path: Path) -> None:
    line = _one_error_line(lmforge(svc, "status", "job_" + "0" * 32), "not_found")
    assert line.endswith("[HTTP 404]")
    proc = lmforge(svc, "status", "job_" + "0" * 32, "--json")
    assert json.loads(proc.stdout)["error"]["code"] == "not_found"
    _one_error_line(lmforge(svc, "jobs", LMFORGE_API_KEY="lmf_wrong"), "unauthorized")
    _one_error_line(lmforge(svc, "jobs", "--url", "http://127.0.0.1:9"), "connection_failed")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    _one_error_line(lmforge(svc, "submit", str(bad)), "invalid_spec_file")
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(_spec(dataset_id, batch_size=0)))
    line = _one_error_line(lmforge(svc, "submit", str(spec)), "validation_error")
    assert "(field training.batch_size)" in line and "[HTTP 422]" in line
    missing = lmforge(svc, "download", dataset_id)
    assert missing.returncode == 1 and "lmforge: error:" in missing.stderr
    assert lmforge(svc, "jobs", "--status", "sleeping").returncode == 2  # argparse


def test_the_other_commands_are_still_there(svc: Service) -> None:
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("up", "api", "worker", "serve", "keys", "train", "sample", "submit",
                    "follow", "download"):
        assert f"    {command} " in out
    keys = subprocess.run([sys.executable, "-m", "lmforge.cli", "keys", "list"], env=svc.env,
                          capture_output=True, text=True, check=False)
    assert keys.returncode == 0 and "tester" in keys.stdout
