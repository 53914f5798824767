from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from worker.local import resolve_texts, sample_command, train_command
from worker.spec import JobSpec


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
