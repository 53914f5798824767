"""``lmforge train SPEC.json --output DIR`` and ``lmforge sample CKPT``: the engine without
services. Checkpoints are written atomically (temporary file, fsync, rename) with a sha256 in
``manifest.json`` and a ``.sha256`` sidecar; progress goes to stderr and the run ends with one
JSON line on stdout.

The output directory belongs to one run: a non-empty one is refused unless the run is asked to
``overwrite`` it (only the files an earlier run's ``manifest.json`` names are removed) or to
``resume`` the run in it. Every ``*.safetensors`` and ``*.sha256`` a run leaves there is listed
in ``manifest.json`` (a checkpoint is listed before it is written and unlisted only after it
is deleted, so not even an interrupted run leaves one unlisted).
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
from core.sources import CorpusSources, TextSource
from core.spec import DatasetSource, JobSpec
from core.textstats import normalise_line_ends

log = logging.getLogger(__name__)


def _read_source(src: DatasetSource, base_dir: Path) -> str:
    if src.builtin is not None:
        return builtin_corpus(src.builtin)
    if src.path is not None:
        return _read_path(src.path, base_dir)
    raise _needs_service(src)


def _needs_service(src: DatasetSource) -> TrainingError:
    return TrainingError("dataset_error",
                         f"dataset id {src.id!r} needs the service; lmforge train reads "
                         f"{{'path': ...}} or {{'builtin': 'python-docs'}}")


def _find_path(path: str, base_dir: Path) -> Path:
    candidates = [Path(path)] if Path(path).is_absolute() else [base_dir / path, Path.cwd() / path]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))
    for p in candidates:
        if p.is_file():
            return p
    raise TrainingError("dataset_error",
                        f"no file {path!r} (looked in {', '.join(str(c) for c in candidates)})")


def _read_path(path: str, base_dir: Path) -> str:
    p = _find_path(path, base_dir)
    try:
        # As an upload is stored (core.textstats): no BOM, every line end "\n".
        return normalise_line_ends(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError("dataset_error", f"cannot read {p}: {exc}") from exc


def _source(src: DatasetSource, base_dir: Path) -> TextSource:
    if src.builtin is not None:
        return TextSource.from_text(builtin_corpus(src.builtin), f"built-in corpus {src.builtin}")
    if src.path is not None:
        return TextSource.from_path(_find_path(src.path, base_dir))  # as an upload is stored
    raise _needs_service(src)


def _embeddings(spec: JobSpec, base_dir: Path) -> str | None:
    emb = spec.model.pretrained_embeddings
    if emb is None:
        return None
    if emb.path is None:
        raise TrainingError("dataset_error", "pretrained_embeddings.dataset_id needs the "
                            "service; lmforge train reads pretrained_embeddings.path")
    return _read_path(emb.path, base_dir)


def resolve_texts(spec: JobSpec, base_dir: Path) -> CorpusTexts:
    """Read every text the spec names: ``path`` (relative to ``base_dir``, then the current
    directory) or ``builtin``. Raises ``TrainingError("dataset_error")``."""
    assert spec.dataset is not None
    return CorpusTexts(
        train=_read_source(spec.dataset, base_dir),
        validation=None if spec.validation is None else _read_source(spec.validation, base_dir),
        test=None if spec.test is None else _read_source(spec.test, base_dir),
        embeddings=_embeddings(spec, base_dir),
    )


def resolve_sources(spec: JobSpec, base_dir: Path) -> CorpusSources:
    """The texts the spec names as streams (files are found now, read later by the engine),
    each read as :func:`resolve_texts` reads it. Raises ``TrainingError("dataset_error")``."""
    assert spec.dataset is not None
    return CorpusSources(
        train=_source(spec.dataset, base_dir),
        validation=None if spec.validation is None else _source(spec.validation, base_dir),
        test=None if spec.test is None else _source(spec.test, base_dir),
    )


#: Overrides where ``lmforge train`` keeps token files (the service reads it too:
#: ``store.settings.Settings.cache_dir``).
CACHE_DIR_ENV = "LMFORGE_TOKEN_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$LMFORGE_TOKEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmforge/tokens``, else
    ``~/.cache/lmforge/tokens``: token files shared by every ``lmforge train`` run of this
    user (never the output directory, which holds one run's files only)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmforge" / "tokens"


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


MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
LAST = "last.safetensors"


class OutputDirError(Exception):
    """The output directory cannot be used as asked (``lmforge train`` exit code 2)."""


def _check_name(name: object) -> str:
    """A manifest key as a file name in the output directory: a plain ``*.safetensors`` name,
    no path separator, no ``..``, not hidden. Raises :class:`OutputDirError` otherwise."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or name.startswith(".")
            or "/" in name or "\\" in name or ".." in name or Path(name).name != name):
        raise OutputDirError(f"{MANIFEST} lists {name!r}, which is not a checkpoint file name "
                             f"in this directory; refusing to touch it")
    return name


def read_manifest(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The checkpoints ``output_dir/manifest.json`` lists, by file name (``{}`` without one).
    Raises :class:`OutputDirError` for an unreadable manifest or a name
    :func:`_check_name` refuses."""
    path = output_dir / MANIFEST
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["checkpoints"]
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("step"), int) for e in entries.values()):
            raise TypeError("'checkpoints' is not an object of entries with an integer 'step'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputDirError(f"{path} is not an lmforge manifest ({exc}); "
                             f"refusing to touch the directory") from exc
    return {_check_name(name): entry for name, entry in entries.items()}


def run_files(entries: dict[str, dict[str, Any]]) -> set[str]:
    """The files a run made, by its manifest: the listed checkpoints, their ``.sha256``
    sidecars, ``metrics.jsonl`` and ``manifest.json``."""
    return {*entries, *(f"{name}.sha256" for name in entries), METRICS, MANIFEST}


def prepare_output_dir(output_dir: Path, *, overwrite: bool = False,
                       resume: bool = False) -> dict[str, dict[str, Any]]:
    """Make ``output_dir`` ready for a run and return the manifest entries it starts from.

    Empty or missing: created, ``{}``. Otherwise ``overwrite`` removes the earlier run's files
    (:func:`run_files`, nothing else) and returns ``{}``, and ``resume`` returns the
    directory's manifest. Raises :class:`OutputDirError` (nothing removed) for a non-empty
    directory without either flag, both flags, files ``overwrite`` would not remove, or
    checkpoint files (``*.safetensors``, ``*.sha256``) the manifest does not list on resume.
    """
    if overwrite and resume:
        raise OutputDirError("--overwrite and --resume exclude each other")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"the output {output_dir} is not a directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in output_dir.iterdir())
    if not present:
        return {}
    if not (overwrite or resume):
        raise OutputDirError(
            f"the output directory {output_dir} is not empty ({_names(present)}); pass "
            f"--overwrite to replace the lmforge run in it, --resume to continue that run from "
            f"its {LAST}, or choose an empty directory")
    entries = read_manifest(output_dir)
    known = run_files(entries)
    if resume:
        strays = [n for n in present if n not in known and n.endswith((".safetensors", ".sha256"))]
        if strays:
            raise OutputDirError(f"{output_dir} holds checkpoint files that {MANIFEST} does not "
                                 f"list: {', '.join(strays)}; move them away to resume there")
        return entries
    unknown = [n for n in present if n not in known or _is_real_dir(output_dir / n)]
    if unknown:
        raise OutputDirError(
            f"--overwrite removes only the files of an earlier lmforge run (those {MANIFEST} "
            f"lists, their .sha256 sidecars, {METRICS} and {MANIFEST}), and {output_dir} also "
            f"holds {', '.join(unknown)}; move them away or choose another directory")
    for name in present:  # every one of them is in `known`
        (output_dir / name).unlink()
    return {}


def _names(names: Sequence[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


class LocalHooks:
    """Checkpoints into a directory; metrics to ``metrics.jsonl`` and stderr; Ctrl-C asks the
    run to stop. ``manifest``: the entries of the run being resumed (``{}`` for a new run)."""

    def __init__(self, output_dir: Path, keep: int, out: Any = None,
                 manifest: dict[str, dict[str, Any]] | None = None) -> None:
        self.dir = output_dir
        self.keep = keep
        self.out = out
        self.stop_requested = False
        self.manifest: dict[str, dict[str, Any]] = dict(manifest or {})
        self.periodic: list[str] = sorted(
            (n for n, e in self.manifest.items() if e.get("kind") == "periodic"),
            key=lambda n: int(self.manifest[n]["step"]))
        # The last step metrics.jsonl holds (0: none); None until read from the file.
        self._metrics_step: int | None = None

    def on_metrics(self, rows: Sequence[StepMetrics]) -> None:
        """Append ``rows`` to ``metrics.jsonl`` (one JSON object per step, as
        ``GET /v1/jobs/{id}/metrics`` returns them) and print them. The file holds each step
        once, in step order: a step reported again (a resumed run redoing the validation that
        a stop cut, see ``core.contract.TrainingHooks.on_metrics``) replaces its earlier line,
        as the service's metrics are upserted by (job, step)."""
        if not rows:
            return
        if rows[0].step <= self._last_metrics_step():
            self._keep_metrics_through(rows[0].step - 1)
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r.as_dict()) + "\n" for r in rows)
        self._metrics_step = rows[-1].step
        for r in rows:
            line = (f"step {r.step:>6}  epoch {r.epoch:6.3f}  loss {r.train_loss:.4f}  "
                    f"lr {r.lr:.2e}  |g| {r.grad_norm:.3f}  {r.tokens_per_s:,.0f} tok/s")
            if r.val_loss is not None:
                line += f"  val {r.val_loss:.4f} (ppl {r.val_ppl:.2f})"
            print(line, file=self.out or sys.stderr, flush=True)

    def on_checkpoint(self, checkpoint: CheckpointBlob) -> None:
        """Write the checkpoint and its sidecar, then prune periodic ones beyond ``keep``. The
        manifest lists a new name before its file exists and drops a pruned one only after its
        files are gone."""
        name = (f"periodic-{checkpoint.step:08d}.safetensors" if checkpoint.kind == "periodic"
                else f"{checkpoint.kind}.safetensors")
        entry = {"kind": checkpoint.kind, "step": checkpoint.step,
                 "bytes": len(checkpoint.data),
                 "sha256": hashlib.sha256(checkpoint.data).hexdigest(),
                 "metrics": checkpoint.metrics}
        if name not in self.manifest:
            self.manifest[name] = entry
            self.write_manifest()
        write_atomic(self.dir / name, checkpoint.data)
        write_atomic(self.dir / f"{name}.sha256", f"{entry['sha256']}  {name}\n".encode())
        self.manifest[name] = entry
        if checkpoint.kind == "periodic" and name not in self.periodic:
            self.periodic.append(name)
        while len(self.periodic) > self.keep:
            self._remove(self.periodic.pop(0))
        self.write_manifest()

    def should_stop(self) -> bool:
        return self.stop_requested

    def write_manifest(self) -> None:
        write_atomic(self.dir / MANIFEST,
                     json.dumps({"checkpoints": self.manifest}, indent=2).encode())

    def rewind(self, step: int) -> None:
        """Forget what lies after ``step`` (the step a resumed run continues from): the
        checkpoints the manifest gives a later step (files removed) and the ``metrics.jsonl``
        rows of later steps (or unreadable ones); the manifest is rewritten."""
        for name in [n for n, e in self.manifest.items() if e["step"] > step]:
            print(f"removing {name}: step {self.manifest[name].get('step')} is after the "
                  f"resumed step {step}", file=self.out or sys.stderr)
            self._remove(name)
            if name in self.periodic:
                self.periodic.remove(name)
        self._keep_metrics_through(step)
        self.write_manifest()

    def _last_metrics_step(self) -> int:
        """The last step ``metrics.jsonl`` holds (0 when it holds none or is missing)."""
        if self._metrics_step is None:
            metrics = self.dir / METRICS
            lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
            self._metrics_step = max((s for s in map(_row_step, lines) if s is not None),
                                     default=0)
        return self._metrics_step

    def _keep_metrics_through(self, step: int) -> None:
        """Rewrite ``metrics.jsonl`` (atomically) with only its readable rows of steps at or
        before ``step``."""
        metrics = self.dir / METRICS
        if metrics.exists():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if _row_at_or_before(line, step)]
            write_atomic(metrics, "".join(f"{line}\n" for line in kept).encode())
        self._metrics_step = None  # read again when needed

    def _remove(self, name: str) -> None:
        """Delete a listed checkpoint and its sidecar, then unlist it."""
        for p in (self.dir / name, self.dir / f"{name}.sha256"):
            p.unlink(missing_ok=True)
        self.manifest.pop(name, None)


def _row_step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line, or None when it is not a readable row."""
    try:
        row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return row_step if isinstance(row_step, int) else None


def _row_at_or_before(line: str, step: int) -> bool:
    """Whether one ``metrics.jsonl`` line is a readable row of a step at or before ``step``."""
    row_step = _row_step(line)
    return row_step is not None and row_step <= step


def _load_spec(spec_path: Path) -> JobSpec | None:
    """The spec at ``spec_path``, or None after printing why not (exit code 2)."""
    try:
        raw = Path(spec_path).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot read the spec file {spec_path}: {exc.strerror}", file=sys.stderr)
        return None
    try:
        return JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        print(json.dumps({"error": {"code": "invalid_spec", "message": "; ".join(problems)}}))
        for line in problems:
            print(f"invalid spec {spec_path}: {line}", file=sys.stderr)
        return None


def _resume_point(resume: Path, output_dir: Path,
                  entries: dict[str, dict[str, Any]]) -> tuple[bytes, int]:
    """The bytes and step of the checkpoint to resume from. Raises :class:`OutputDirError`
    when it cannot be read, ``TrainingError("invalid_checkpoint")`` when it does not match the
    sha256 the output directory's manifest gives it or has no step."""
    from worker.engine.checkpoint import read_metadata

    try:
        data = resume.read_bytes()
    except OSError as exc:
        raise OutputDirError(f"cannot read the checkpoint to resume from, {resume}: "
                             f"{exc.strerror}") from exc
    listed = entries.get(resume.name) if resume.parent.resolve() == output_dir.resolve() else None
    if listed is not None and hashlib.sha256(data).hexdigest() != listed.get("sha256"):
        raise TrainingError("invalid_checkpoint",
                            f"{resume} does not match the sha256 {MANIFEST} gives it")
    try:
        step = int(json.loads(read_metadata(data)["trainer_state"])["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError("invalid_checkpoint",
                            f"{resume} is not a resumable lmforge checkpoint: {exc}") from exc
    return data, step


def train_command(spec_path: Path, output_dir: Path, resume: Path | None = None,
                  overwrite: bool = False, cache_dir: Path | None = None,
                  use_cache: bool = True) -> int:
    """Run the spec at ``spec_path`` into ``output_dir``. Exit code 0 on success, 1 when the
    job fails (the error as JSON on stdout), 2 for an unreadable or invalid spec or an output
    directory that cannot be used as asked (:func:`prepare_output_dir`; message on stderr).

    ``resume``: a ``last``/``periodic`` checkpoint to continue from (``lmforge train --resume``
    passes ``output_dir/last.safetensors``); the directory's manifest and ``metrics.jsonl``
    are kept up to its step (a step the resumed run reports again replaces its line).
    ``overwrite``: replace the earlier run in a non-empty directory.
    The texts are tokenised once into token files under ``cache_dir`` (default:
    :func:`default_cache_dir`) and reused by later runs on the same data; ``use_cache=False``
    tokenises them in memory instead.
    """
    from worker.engine.trainer import train_sources  # torch is imported here, not at start-up

    spec = _load_spec(spec_path)
    if spec is None:
        return 2
    try:
        entries = prepare_output_dir(output_dir, overwrite=overwrite, resume=resume is not None)
        start = None if resume is None else _resume_point(Path(resume), output_dir, entries)
    except OutputDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(json.dumps({"error": exc.as_dict()}))
        return 1
    hooks = LocalHooks(output_dir, spec.training.keep_checkpoints, manifest=entries)
    if start is not None:
        hooks.rewind(start[1])
    previous = signal.getsignal(signal.SIGINT)

    def _on_sigint(signum: int, frame: Any) -> None:
        hooks.stop_requested = True
        print("stopping after this step or evaluation batch, with a last.safetensors "
              "(Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, _on_sigint)
    t0 = time.perf_counter()
    try:
        base_dir = Path(spec_path).resolve().parent
        if spec.resources.gpus > 1:  # data-parallel: this process is rank 0
            from worker.ddp_rank import train_data_parallel as train_sources
        result = train_sources(spec, resolve_sources(spec, base_dir), hooks,
                               resume_from=None if start is None else start[0],
                               cache_dir=(cache_dir or default_cache_dir()) if use_cache else None,
                               embeddings=_embeddings(spec, base_dir))
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


def _is_exported_model(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose header says ``lmforge.model.v1`` (an
    export); False for anything else (a checkpoint, or not safetensors: the checkpoint
    reader then says what is wrong)."""
    from safetensors import SafetensorError, safe_open

    from lmforge.loader import MODEL_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == MODEL_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def sample_command(checkpoint_path: Path, prompt: str = "", max_new_tokens: int = 200,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> int:
    """Print a sample from the checkpoint file (sha256 checked against its ``.sha256``
    sidecar when there is one), or from an exported model (``lmforge.model.v1``,
    ``GET .../export?format=safetensors``: sampled by :func:`lmforge.loader.load`'s
    ``generate`` with the same options). Exit code 0, or 1 with the error on stderr."""
    from worker.engine.sample import sample

    try:
        data = Path(checkpoint_path).read_bytes()
        sidecar = Path(f"{checkpoint_path}.sha256")
        if sidecar.is_file():
            expected = sidecar.read_text().split()[0]
            if hashlib.sha256(data).hexdigest() != expected:
                raise TrainingError("invalid_checkpoint",
                                    f"{checkpoint_path} does not match its sha256 sidecar")
        if _is_exported_model(checkpoint_path):
            from lmforge.loader import load

            # The prompt and its continuation, as worker.engine.sample prints a checkpoint's.
            print(prompt + load(checkpoint_path).generate(prompt, max_new_tokens, temperature,
                                                          top_k, seed))
        else:
            print(sample(data, prompt, max_new_tokens, temperature, top_k, seed))
    except (OSError, ValueError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
