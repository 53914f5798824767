from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from core.spec import JobSpec
from lmforge.cli import main
from lmforge.local import LocalHooks, resolve_texts, sample_command, train_command


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
    for overwrite in (False, True):  # a second run into the same folder starts its metrics afresh
        assert train_command(tmp_path / "spec.json", tmp_path / "out", overwrite=overwrite) == 0
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


# -- the output directory: refuse, --overwrite, --resume -----------------------------------


def _write_spec(tmp_path: Path, small_text: str, name: str = "spec.json",
                **training: object) -> Path:
    """A tiny char-model spec beside corpus.txt; ``training`` overrides TrainingSpec fields."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(small_text, encoding="utf-8")
    t = {"batch_size": 4, "seq_len": 8, "max_steps": 6, "eval_interval": 3, "log_interval": 1,
         "num_threads": 1, **training}
    spec = {"dataset": {"path": "corpus.txt"},
            "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1}, "training": t}
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every entry of ``d`` with its bytes (None for a directory)."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(d.iterdir())}


def _manifest(out: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = json.loads((out / "manifest.json").read_text())[
        "checkpoints"]
    return entries


def _assert_every_checkpoint_file_is_listed(out: Path) -> dict[str, dict[str, Any]]:
    """Every *.safetensors and *.sha256 in ``out`` is in the manifest (sidecar: its
    checkpoint), every listed checkpoint exists and matches its sha256."""
    manifest = _manifest(out)
    on_disk = {p.name for p in out.iterdir() if p.suffix in (".safetensors", ".sha256")}
    assert on_disk == {*manifest, *(f"{n}.sha256" for n in manifest)}
    for name, entry in manifest.items():
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert digest == entry["sha256"]
        assert (out / f"{name}.sha256").read_text() == f"{digest}  {name}\n"
    return manifest


def test_train_command_refuses_a_non_empty_output_directory_naming_the_flags(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(tmp_path, small_text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train_command(spec, out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "--resume" in err
    assert _snapshot(out) == {"notes.txt": b"mine"}
    assert main(["train", str(spec), "--output", str(out)]) == 2  # the CLI: the same


def test_the_cli_refuses_overwrite_and_resume_together(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(tmp_path, small_text)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(spec), "--output", str(tmp_path / "out"), "--overwrite", "--resume"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_removes_the_earlier_runs_periodic_checkpoints(
        tmp_path: Path, small_text: str) -> None:
    out = tmp_path / "out"
    first = _write_spec(tmp_path, small_text, "first.json", max_steps=8, checkpoint_interval=2,
                        keep_checkpoints=3)
    assert train_command(first, out) == 0
    periodic = sorted(n for n, e in _assert_every_checkpoint_file_is_listed(out).items()
                      if e["kind"] == "periodic")
    assert periodic == [f"periodic-{s:08d}.safetensors" for s in (4, 6, 8)]  # 2 was pruned
    second = _write_spec(tmp_path, small_text, "second.json", max_steps=3,
                         checkpoint_interval=3, keep_checkpoints=3)
    assert main(["train", str(second), "--output", str(out), "--overwrite"]) == 0
    manifest = _assert_every_checkpoint_file_is_listed(out)
    assert sorted(manifest) == ["best.safetensors", "last.safetensors",
                                "periodic-00000003.safetensors"]
    assert {p.name for p in out.iterdir()} == {*manifest, *(f"{n}.sha256" for n in manifest),
                                               "manifest.json", "metrics.jsonl"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_overwrite_refuses_unknown_files_naming_them_and_removes_nothing(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    spec = _write_spec(tmp_path, small_text, max_steps=2, eval_interval=2)
    assert train_command(spec, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "other.safetensors").write_bytes(b"not listed")
    (out / "sub").mkdir()
    before = _snapshot(out)
    capsys.readouterr()
    assert train_command(spec, out, overwrite=True) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "other.safetensors" in err and "sub" in err
    assert "last.safetensors" not in err.split("holds", 1)[1]  # the run's own files are fine
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["../victim.safetensors", "sub/victim.safetensors",
                                  "..", "victim.txt", "/tmp/victim.safetensors"])
def test_overwrite_refuses_a_manifest_name_outside_the_directory(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str], name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.safetensors").write_bytes(b"keep me")
    (out / "manifest.json").write_text(json.dumps({"checkpoints": {name: {"step": 1}}}))
    spec = _write_spec(tmp_path, small_text)
    assert train_command(spec, out, overwrite=True) == 2
    assert "refusing to touch it" in capsys.readouterr().err
    assert (tmp_path / "victim.safetensors").read_bytes() == b"keep me"
    assert (out / "manifest.json").exists()


def test_resume_continues_the_run_in_the_directory_with_a_consistent_manifest_and_metrics(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    first = _write_spec(tmp_path, small_text, "first.json", checkpoint_interval=2,
                        keep_checkpoints=2)
    assert train_command(first, out) == 0
    assert _manifest(out)["last.safetensors"]["step"] == 6
    longer = _write_spec(tmp_path, small_text, "longer.json", max_steps=10,
                         checkpoint_interval=2, keep_checkpoints=2)
    capsys.readouterr()
    assert main(["train", str(longer), "--output", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 10
    manifest = _assert_every_checkpoint_file_is_listed(out)
    assert manifest["last.safetensors"]["step"] == 10
    assert sorted(n for n, e in manifest.items() if e["kind"] == "periodic") == [
        "periodic-00000008.safetensors", "periodic-00000010.safetensors"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))


def test_resume_forgets_what_lies_after_the_resumed_checkpoint(
        tmp_path: Path, small_text: str) -> None:
    out = tmp_path / "out"
    spec = _write_spec(tmp_path, small_text, max_steps=8, checkpoint_interval=2,
                       keep_checkpoints=4)
    assert train_command(spec, out) == 0
    at_4 = out / "periodic-00000004.safetensors"
    assert train_command(spec, out, resume=at_4) == 0  # the same 8 steps, from step 4 on
    manifest = _assert_every_checkpoint_file_is_listed(out)
    assert sorted(e["step"] for e in manifest.values() if e["kind"] == "periodic") == [2, 4, 6, 8]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_resume_refuses_unlisted_checkpoints_and_a_missing_last(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(tmp_path, small_text, max_steps=2, eval_interval=2)
    empty = tmp_path / "empty"
    assert main(["train", str(spec), "--output", str(empty), "--resume"]) == 2
    assert "last.safetensors" in capsys.readouterr().err
    out = tmp_path / "out"
    assert train_command(spec, out) == 0
    (out / "periodic-00000099.safetensors").write_bytes(b"from elsewhere")
    before = _snapshot(out)
    capsys.readouterr()
    assert train_command(spec, out, resume=out / "last.safetensors") == 2
    assert "periodic-00000099.safetensors" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_refuses_a_last_checkpoint_that_fails_the_manifest_sha256(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(tmp_path, small_text, max_steps=2, eval_interval=2)
    out = tmp_path / "out"
    assert train_command(spec, out) == 0
    last = out / "last.safetensors"
    data = last.read_bytes()
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last tensor
    capsys.readouterr()
    assert train_command(spec, out, resume=last) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "invalid_checkpoint"


def test_train_command_tokenises_a_file_once_into_the_cache(
        tmp_path: Path, small_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "corpus.txt").write_text(small_text, encoding="utf-8")
    spec = {"dataset": {"path": "corpus.txt"},
            "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
            "training": {"batch_size": 4, "seq_len": 8, "max_steps": 2, "eval_interval": 2,
                         "num_threads": 1}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMFORGE_TOKEN_CACHE_DIR", str(cache))
    assert main(["train", str(tmp_path / "spec.json"), "--output", str(tmp_path / "a")]) == 0
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1
    mtime = (entries[0] / "train.bin").stat().st_mtime_ns
    assert train_command(tmp_path / "spec.json", tmp_path / "b", cache_dir=cache) == 0
    assert [p for p in cache.iterdir() if p.is_dir()] == entries
    assert (entries[0] / "train.bin").stat().st_mtime_ns == mtime
    assert not any(p.suffix == ".bin" for p in (tmp_path / "b").iterdir())
    assert main(["train", str(tmp_path / "spec.json"), "--output", str(tmp_path / "c"),
                 "--cache-dir", str(tmp_path / "other"), ]) == 0
    assert len(list((tmp_path / "other").iterdir())) == 2  # the entry and its lock file
    assert main(["train", str(tmp_path / "spec.json"), "--output", str(tmp_path / "d"),
                 "--no-cache"]) == 0
    assert [p for p in cache.iterdir() if p.is_dir()] == entries


def test_resume_after_a_stop_mid_validation_keeps_each_step_once(
        tmp_path: Path, small_text: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C (a real SIGINT to this process) during the validation at step 10 stops the
    run with that validation cut; the resumed run validates step 10 again and reports it a
    second time. metrics.jsonl then holds every step once, step 10 with its validation, and
    equals an uninterrupted run's file but for the timings."""
    (tmp_path / "corpus.txt").write_text(small_text, encoding="utf-8")
    spec = {"dataset": {"path": "corpus.txt"}, "val_fraction": 0.3,
            "model": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
            "training": {"batch_size": 4, "seq_len": 8, "max_steps": 20, "eval_interval": 10,
                         "log_interval": 5, "num_threads": 1}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    full, out = tmp_path / "full", tmp_path / "out"
    assert train_command(tmp_path / "spec.json", full) == 0

    # The engine polls should_stop after each of steps 1..9, then before each batch of the
    # validation at step 10 (tests/engine/test_interrupts.py): the 12th poll is inside it.
    real_should_stop = LocalHooks.should_stop
    polls = {"n": 0}

    def should_stop(self: LocalHooks) -> bool:
        polls["n"] += 1
        if polls["n"] == 12:
            signal.raise_signal(signal.SIGINT)  # handled by train_command: a Ctrl-C
        return real_should_stop(self)

    monkeypatch.setattr(LocalHooks, "should_stop", should_stop)
    capsys.readouterr()
    assert train_command(tmp_path / "spec.json", out) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["stop_reason"] == "cancelled"
    assert "stopping after this step or evaluation batch" in captured.err
    cut = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == list(range(1, 11))
    assert cut[-1]["val_loss"] is None  # the validation at step 10 was cut
    assert _manifest(out)["last.safetensors"]["step"] == 10

    monkeypatch.setattr(LocalHooks, "should_stop", real_should_stop)
    assert main(["train", str(tmp_path / "spec.json"), "--output", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 20
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[9]["val_loss"] is not None and rows[19]["val_loss"] is not None
    expected = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]

    def untimed(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in rs]

    assert untimed(rows) == untimed(expected)
    _assert_every_checkpoint_file_is_listed(out)


def test_sample_command_reads_an_exported_model_as_its_checkpoint(
        tmp_path: Path, small_text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.loader import load
    from worker.engine.export import export_checkpoint

    spec = _write_spec(tmp_path, small_text, max_steps=4)
    assert train_command(spec, tmp_path / "out") == 0
    ckpt = tmp_path / "out" / "best.safetensors"
    exported = tmp_path / "model.safetensors"  # GET .../export?format=safetensors
    exported.write_bytes(export_checkpoint(ckpt.read_bytes(), "safetensors"))
    capsys.readouterr()
    assert main(["sample", str(exported), "--prompt", "Fir", "--max-new-tokens", "12",
                 "--top-k", "5", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert text == "Fir" + load(exported).generate("Fir", 12, 1.0, 5, 3) + "\n"
    assert sample_command(ckpt, "Fir", 12, 1.0, 5, 3) == 0  # the checkpoint samples the same
    assert capsys.readouterr().out == text
    assert sample_command(exported, "a", 5, 1.0, -3) == 1  # the same options are checked
    assert "top_k" in capsys.readouterr().err
