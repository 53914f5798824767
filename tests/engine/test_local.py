from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from core.spec import JobSpec
from lmforge.local import resolve_texts, sample_command, train_command


def test_train_command_writes_verified_checkpoints_and_one_json_line(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "corpus.txt").write_text(small_text, encoding="utf-8")
    spec = {"dataset": {"path": "corpus.txt"},
            "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1},
            "training": {"batch_size": 8, "seq_len": 16, "max_steps": 6, "eval_interval": 3,
                         "log_interval": 2, "num_threads": 1}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert train_command(tmp_path / "spec.json", out) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["stop_reason"] == "max_steps"
    assert {"tokens_per_s", "best_val_loss", "final_val_loss"} <= summary.keys()
    assert captured.err.count("step ") >= 6
    manifest = json.loads((out / "manifest.json").read_text())["checkpoints"]
    for name, entry in manifest.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert sample_command(out / "best.safetensors", "Fir", 10, 1.0, 5, 0) == 0
    assert capsys.readouterr().out.startswith("Fir")


def test_sample_command_refuses_a_checkpoint_that_fails_its_sha256(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    (tmp_path / "x.safetensors.sha256").write_text("0" * 64 + "  x.safetensors\n")
    assert sample_command(tmp_path / "x.safetensors", "a", 5) == 1


def test_resolve_texts_reads_the_builtin_corpus(tmp_path: Path) -> None:
    spec = JobSpec.model_validate({"dataset": {"builtin": "python-docs"}})
    assert len(resolve_texts(spec, tmp_path).train) > 100_000


def test_train_command_writes_one_metrics_line_per_step(tmp_path: Path, small_text: str) -> None:
    (tmp_path / "corpus.txt").write_text(small_text, encoding="utf-8")
    spec = {"dataset": {"path": "corpus.txt"},
            "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
            "training": {"batch_size": 4, "seq_len": 8, "max_steps": 5, "eval_interval": 5,
                         "log_interval": 2, "num_threads": 1}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    for _ in range(2):  # a second run into the same folder starts its metrics afresh
        assert train_command(tmp_path / "spec.json", tmp_path / "out") == 0
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["val_loss"] is not None and rows[0]["val_loss"] is None


def test_train_command_reports_an_invalid_spec_by_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"dataset": {"builtin": "python-docs"},
                                                    "trainig": {}}))
    assert train_command(tmp_path / "spec.json", tmp_path / "out") == 2
    error = json.loads(capsys.readouterr().out.strip())["error"]
    assert error["code"] == "invalid_spec"
    assert error["message"] == "trainig: Extra inputs are not permitted"


def test_train_command_with_a_missing_spec_file_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_command(tmp_path / "nope.json", tmp_path / "out") == 2
    assert "cannot read the spec file" in capsys.readouterr().err


def test_sample_command_rejects_a_negative_top_k(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    assert sample_command(tmp_path / "x.safetensors", "a", 5, 1.0, -3) == 1
    assert "top_k must be >= 1" in capsys.readouterr().err
