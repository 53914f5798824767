"""``lmforge train SPEC.json --output DIR`` and ``lmforge sample CKPT``: the engine without
services. Checkpoints are written atomically (temporary file, fsync, rename) with a sha256 in
``manifest.json`` and a ``.sha256`` sidecar; progress goes to stderr and the run ends with one
JSON line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.contract import CheckpointBlob, CorpusTexts, StepMetrics, TrainingError
from core.corpora import builtin_corpus
from core.spec import DatasetSource, JobSpec

log = logging.getLogger(__name__)


def _read_source(src: DatasetSource, base_dir: Path) -> str:
    if src.builtin is not None:
        return builtin_corpus(src.builtin)
    if src.path is not None:
        return _read_path(src.path, base_dir)
    raise TrainingError("dataset_error",
                        f"dataset id {src.id!r} needs the service; lmforge train reads "
                        f"{{'path': ...}} or {{'builtin': 'python-docs'}}")


def _read_path(path: str, base_dir: Path) -> str:
    candidates = [Path(path)] if Path(path).is_absolute() else [base_dir / path, Path.cwd() / path]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))
    for p in candidates:
        if p.is_file():
            try:
                return p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TrainingError("dataset_error", f"cannot read {p}: {exc}") from exc
    raise TrainingError("dataset_error",
                        f"no file {path!r} (looked in {', '.join(str(c) for c in candidates)})")


def resolve_texts(spec: JobSpec, base_dir: Path) -> CorpusTexts:
    """Read every text the spec names: ``path`` (relative to ``base_dir``, then the current
    directory) or ``builtin``. Raises ``TrainingError("dataset_error")``."""
    assert spec.dataset is not None
    emb = spec.model.pretrained_embeddings
    embeddings = None
    if emb is not None:
        if emb.path is None:
            raise TrainingError("dataset_error", "pretrained_embeddings.dataset_id needs the "
                                "service; lmforge train reads pretrained_embeddings.path")
        embeddings = _read_path(emb.path, base_dir)
    return CorpusTexts(
        train=_read_source(spec.dataset, base_dir),
        validation=None if spec.validation is None else _read_source(spec.validation, base_dir),
        test=None if spec.test is None else _read_source(spec.test, base_dir),
        embeddings=embeddings,
    )


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename; returns its sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


class LocalHooks:
    """Checkpoints into a directory; metrics to ``metrics.jsonl`` and stderr; Ctrl-C asks the
    run to stop."""

    def __init__(self, output_dir: Path, keep: int, out: Any = None) -> None:
        self.dir = output_dir
        self.keep = keep
        self.out = out
        self.stop_requested = False
        self.manifest: dict[str, dict[str, Any]] = {}
        self.periodic: list[str] = []

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        # metrics.jsonl: one JSON object per step, as GET /v1/jobs/{id}/metrics returns them.
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r.as_dict()) + "\n" for r in rows)
        for r in rows:
            line = (f"step {r.step:>6}  epoch {r.epoch:6.3f}  loss {r.train_loss:.4f}  "
                    f"lr {r.lr:.2e}  |g| {r.grad_norm:.3f}  {r.tokens_per_s:,.0f} tok/s")
            if r.val_loss is not None:
                line += f"  val {r.val_loss:.4f} (ppl {r.val_ppl:.2f})"
            print(line, file=self.out or sys.stderr, flush=True)

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        name = (f"periodic-{checkpoint.step:08d}.safetensors" if checkpoint.kind == "periodic"
                else f"{checkpoint.kind}.safetensors")
        digest = write_atomic(self.dir / name, checkpoint.data)
        write_atomic(self.dir / f"{name}.sha256", f"{digest}  {name}\n".encode())
        self.manifest[name] = {"kind": checkpoint.kind, "step": checkpoint.step,
                               "bytes": len(checkpoint.data), "sha256": digest,
                               "metrics": checkpoint.metrics}
        if checkpoint.kind == "periodic":
            self.periodic.append(name)
            while len(self.periodic) > self.keep:
                old = self.periodic.pop(0)
                self.manifest.pop(old, None)
                for p in (self.dir / old, self.dir / f"{old}.sha256"):
                    p.unlink(missing_ok=True)
        write_atomic(self.dir / "manifest.json",
                     json.dumps({"checkpoints": self.manifest}, indent=2).encode())

    def should_stop(self) -> bool:
        return self.stop_requested


def train_command(spec_path: Path, output_dir: Path, resume: Path | None = None) -> int:
    """Run the spec at ``spec_path`` into ``output_dir``. Exit code 0 on success, 1 when the
    job fails (the error as JSON on stdout), 2 for an unreadable or invalid spec."""
    from worker.engine.trainer import train  # torch is imported here, not at CLI start-up

    try:
        raw = Path(spec_path).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot read the spec file {spec_path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        spec = JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        print(json.dumps({"error": {"code": "invalid_spec", "message": "; ".join(problems)}}))
        for line in problems:
            print(f"invalid spec {spec_path}: {line}", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run, fresh metrics
    hooks = LocalHooks(output_dir, spec.training.keep_checkpoints)
    previous = signal.getsignal(signal.SIGINT)

    def _on_sigint(signum: int, frame: Any) -> None:
        hooks.stop_requested = True
        print("stopping after the next metrics flush (Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, _on_sigint)
    t0 = time.perf_counter()
    try:
        texts = resolve_texts(spec, Path(spec_path).resolve().parent)
        resume_bytes = None if resume is None else Path(resume).read_bytes()
        result = train(spec, texts, hooks, resume_from=resume_bytes)
    except TrainingError as exc:
        print(json.dumps({"error": exc.as_dict()}))
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = {
        "steps": result.steps,
        "tokens_per_s": result.train_tokens_per_s,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "stop_reason": result.stop_reason,
        **{k: v for k, v in result.as_dict().items()
           if k not in ("steps", "train_tokens_per_s", "best_val_loss", "final_val_loss",
                        "stop_reason")},
        "wall_s": time.perf_counter() - t0,
        "output_dir": str(output_dir),
    }
    print(json.dumps(summary), flush=True)
    return 0


def sample_command(checkpoint_path: Path, prompt: str = "", max_new_tokens: int = 200,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> int:
    """Print a sample from the checkpoint file (sha256 checked against its ``.sha256``
    sidecar when there is one). Exit code 0, or 1 with the error on stderr."""
    from worker.engine.sample import sample

    try:
        data = Path(checkpoint_path).read_bytes()
        sidecar = Path(f"{checkpoint_path}.sha256")
        if sidecar.is_file():
            expected = sidecar.read_text().split()[0]
            if hashlib.sha256(data).hexdigest() != expected:
                raise TrainingError("invalid_checkpoint",
                                    f"{checkpoint_path} does not match its sha256 sidecar")
        print(sample(data, prompt, max_new_tokens, temperature, top_k, seed))
    except (OSError, ValueError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
