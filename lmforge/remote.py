"""The ``lmforge`` commands that talk to a running service through :mod:`lmforge.client`:

    lmforge datasets upload FILE... [--name N] [--format F ...]   one dataset of the files
    lmforge datasets list
    lmforge submit SPEC.json|SPEC.yaml [--follow] [--dry-run] [--idempotency-key K]
    lmforge jobs [--status S] [--limit N]
    lmforge status JOB
    lmforge follow JOB [--history]       a live progress bar until the job ends
    lmforge cancel JOB
    lmforge download JOB [--checkpoint best|last|ID] [-o PATH]

Each takes ``--url`` (default ``$LMFORGE_URL``, else http://127.0.0.1:8000), ``--api-key``
(default ``$LMFORGE_API_KEY``) and ``--json`` (machine-readable output on stdout: one JSON
document, or for ``follow`` one JSON object per event and line). An error is one line on
stderr, ``lmforge: error: <code>: <message> (field F) [HTTP N]``, and exit status 1.

Exit statuses (:data:`EXIT_CODES`): 0 done (for ``follow`` and ``submit --follow``: the job
succeeded), 1 an error (the API's, a connection failure, a bad spec file, a checksum
mismatch), 2 a usage error (argparse), 3 the job failed, 4 the job was cancelled, 130 the
command was interrupted (Ctrl-C; the job itself goes on).

Nothing here imports torch or the service's code; ``rich`` draws the progress bars on
stderr, so stdout holds only the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.eta import eta_seconds
from lmforge.client import Client, Event, LMForgeError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
#: The exit status of ``lmforge follow`` (and ``submit --follow``) per final job status.
EXIT_CODES = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
#: Metric rows ``follow`` asks for before the job's current step (enough for the ETA's rate
#: window, core.eta), so that joining a long run does not replay its whole history.
FOLLOW_BACKLOG_STEPS = 100

Handler = Callable[[argparse.Namespace, Client], int]


# -- plumbing --------------------------------------------------------------------------------


def _out(args: argparse.Namespace, human: str, data: Any) -> None:
    """``data`` as JSON with ``--json``, else the ``human`` text, on stdout."""
    print(json.dumps(data, indent=2) if args.json else human, flush=True)


def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """The command's ``func``: a client for ``--url``/``--api-key``, and every
    :class:`LMForgeError` as one line on stderr (and its JSON on stdout with ``--json``)."""

    def run(args: argparse.Namespace) -> int:
        # httpx logs each request at INFO: not a user's business (errors are reported below).
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            with Client(args.url, args.api_key) as client:
                return handler(args, client)
        except LMForgeError as exc:
            if args.json:
                print(json.dumps({"error": exc.as_dict()}), flush=True)
            print(f"lmforge: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("lmforge: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED

    return run


def _duration(seconds: float | None) -> str:
    """``1h02m``, ``3m20s``, ``45s``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _age(created_at: str) -> str:
    try:
        then = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    return _duration((datetime.now(UTC) - then).total_seconds())


def _num(value: Any, fmt: str = ".4g") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def load_spec(path: str) -> dict[str, Any]:
    """A job spec from a JSON or YAML file (by its suffix; otherwise JSON, then YAML).
    Raises :class:`LMForgeError` ``invalid_spec_file`` when it cannot be read or parsed, or
    is not a mapping."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LMForgeError("invalid_spec_file", f"cannot read {path}: {exc}") from exc
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            spec = yaml.safe_load(text)
        elif suffix == ".json":
            spec = json.loads(text)
        else:
            try:
                spec = json.loads(text)
            except ValueError:
                spec = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if suffix in (".yaml", ".yml") else "JSON"
        detail = str(exc).replace("\n", " ")
        raise LMForgeError("invalid_spec_file", f"{path} is not valid {kind}: {detail}") from exc
    if not isinstance(spec, dict):
        raise LMForgeError("invalid_spec_file", f"{path} holds a {type(spec).__name__}, not a "
                           "job spec (a mapping such as {\"dataset_id\": ...})")
    return spec


# -- datasets --------------------------------------------------------------------------------


def _datasets_upload(args: argparse.Namespace, client: Client) -> int:
    options = {k: getattr(args, k) for k in ("format", "text_field", "label_field", "columns")
               if getattr(args, k) is not None}
    ds = client.datasets.upload(args.files, name=args.name,
                                idempotency_key=args.idempotency_key, **options)
    kind = (f"{ds.get('num_examples')} labelled examples" if ds.get("kind") == "labelled"
            else f"{ds['num_lines']} lines, {ds['num_words']} words")
    _out(args, f"{ds['id']}  {ds['name']}: {ds['bytes']} bytes, {kind}, sha256 {ds['sha256']}",
         ds)
    return EXIT_OK


def _datasets_list(args: argparse.Namespace, client: Client) -> int:
    rows = client.datasets.list(limit=args.limit)
    lines = [f"{'ID':<37} {'KIND':<9} {'BYTES':>12} {'AGE':>7}  NAME"]
    lines += [f"{d['id']:<37} {d.get('kind', 'text'):<9} {d['bytes']:>12} "
              f"{_age(d['created_at']):>7}  {d['name']}" for d in rows]
    _out(args, "\n".join(lines), rows)
    return EXIT_OK


# -- jobs ------------------------------------------------------------------------------------


def _progress_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step, total = p.get("step", 0), p.get("total_steps", 0)
    pct = f" ({100 * step / total:.0f}%)" if total else ""
    return f"{step}/{total}{pct}"


def _when(job: dict[str, Any]) -> str:
    """``queue #N`` while queued (``waits: cuda`` when no live worker serves its queue),
    ``eta 3m20s`` while running."""
    p = job.get("progress") or {}
    if job.get("waiting_for"):
        return f"waits: {job['waiting_for']}"
    if p.get("queue_position") is not None:
        return f"queue #{p['queue_position']}"
    if p.get("eta_s") is not None:
        return f"eta {_duration(p['eta_s'])}"
    return "-"


def _jobs(args: argparse.Namespace, client: Client) -> int:
    rows = client.jobs.list(status=args.status, limit=args.limit)
    when = [_when(j) for j in rows]
    w = max([12, *map(len, when)])  # "waits: queue NAME" may be longer than the column
    lines = [f"{'ID':<37} {'STATUS':<10} {'PROGRESS':<18} {'VAL PPL':>8} {'WHEN':<{w}} "
             f"{'AGE':>7}  NAME"]
    for j, j_when in zip(rows, when, strict=True):
        val = (j.get("latest_metrics") or {}).get("val_ppl")
        lines.append(f"{j['id']:<37} {j['status']:<10} {_progress_text(j):<18} "
                     f"{_num(val, '.3f'):>8} {j_when:<{w}} {_age(j['created_at']):>7}  "
                     f"{j.get('name') or ''}")
    _out(args, "\n".join(lines), rows)
    return EXIT_OK


def _status_lines(job: dict[str, Any]) -> list[str]:
    m = job.get("latest_metrics") or {}
    lines = [f"job       {job['id']}" + (f"  ({job['name']})" if job.get("name") else ""),
             f"status    {job['status']}" + ("  (cancel requested)"
                                              if job.get("cancel_requested")
                                              and job["status"] == "running" else ""),
             f"progress  {_progress_text(job)}  {_when(job)}"]
    spec = job.get("spec") or {}
    res = spec.get("resources") or {}
    if res or "priority" in spec:
        where = f"device {res.get('device', 'auto')}, {res.get('gpus', 1)} process(es)"
        if res.get("queue"):
            where += f", queue {res['queue']}"
        lines.append(f"schedule  {where}, priority {spec.get('priority', 5)}")
    if job.get("waiting_for"):  # queued on a queue no live worker serves
        lines.append(f"waiting   for {job['waiting_for']} (no live worker serves its queue; "
                     f"docs/deploy.md, \"Queues and devices\")")
    if m:
        lines.append(f"metrics   step {m.get('step')}: train_loss {_num(m.get('train_loss'))}"
                     f", val_ppl {_num(m.get('val_ppl'))}, tokens/s "
                     f"{_num(m.get('tokens_per_s'), '.0f')}")
    lines.append(f"attempts  {job.get('attempts', 0)}  created {job['created_at']}")
    err = job.get("error")
    if err:
        lines.append(f"error     {err.get('code')}: {err.get('message')}")
    return lines


def _status(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.get(args.job)
    _out(args, "\n".join(_status_lines(job)), job)
    return EXIT_OK


def _cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.cancel(args.job)
    human = (f"job {job['id']} cancelled" if job["status"] == "cancelled"
             else f"cancel accepted: job {job['id']} stops at its next step and keeps a last "
                  "checkpoint")
    _out(args, human, job)
    return EXIT_OK


def _submit(args: argparse.Namespace, client: Client) -> int:
    spec = load_spec(args.spec)
    if args.dry_run:
        est = client.jobs.create(spec, dry_run=True)
        _out(args, json.dumps(est, indent=2), est)
        return EXIT_OK
    job = client.jobs.create(spec, idempotency_key=args.idempotency_key)
    if args.follow:
        if args.json:
            print(json.dumps({"event": "job", "data": job}), flush=True)
        else:
            print(f"submitted {job['id']} ({job['status']}, {_when(job)})", file=sys.stderr,
                  flush=True)
        return follow(client, job["id"], as_json=args.json, history=True)
    _out(args, f"{job['id']}  {job['status']}  {_when(job)}", job)
    return EXIT_OK


# -- follow ----------------------------------------------------------------------------------


class _Bar:
    """The live progress bar of ``follow`` (``rich``, on stderr): status, step/total, the
    newest training loss, the newest validation perplexity, tokens/s and the ETA
    (:func:`core.eta.eta_seconds` over the newest metric rows received)."""

    def __init__(self, job: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.spec = job.get("spec") or {}
        self.rows: deque[dict[str, Any]] = deque(maxlen=100)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val ppl {task.fields[ppl]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, refresh_per_second=4)
        p = job.get("progress") or {}
        m = job.get("latest_metrics") or {}
        self.task = self.progress.add_task(
            self._label(job["status"], p), total=p.get("total_steps") or None,
            completed=p.get("step", 0), loss=_num(m.get("train_loss")),
            ppl=_num(m.get("val_ppl"), ".3f"), tps=_num(m.get("tokens_per_s"), ".0f"),
            eta=_duration(p.get("eta_s")))

    @staticmethod
    def _label(status: str, progress: dict[str, Any]) -> str:
        if status == "queued" and progress.get("queue_position") is not None:
            return f"queued #{progress['queue_position']}"
        return status

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_event(self, event: Event) -> None:
        d = event.data
        if event.event == "metrics":
            self.rows.appendleft(d)
            fields: dict[str, Any] = {"loss": _num(d.get("train_loss")),
                                      "tps": _num(d.get("tokens_per_s"), ".0f"),
                                      "eta": _duration(eta_seconds(self.spec, list(self.rows)))}
            if d.get("val_ppl") is not None:
                fields["ppl"] = _num(d.get("val_ppl"), ".3f")
            self.progress.update(self.task, completed=d.get("step", 0), **fields)
        elif event.event == "status":
            label = d.get("status", "?")
            if d.get("cancel_requested") and label == "running":
                label = "cancelling"
            self.progress.update(self.task, description=label)
        elif event.event == "checkpoint":
            self.console.print(f"checkpoint {d.get('kind')} at step {d.get('step')} "
                               f"({d.get('bytes')} bytes)")
        elif event.event == "warning":
            self.console.print(f"[yellow]warning {d.get('code')}: {d.get('message')}")


def _summary(job: dict[str, Any], result: dict[str, Any] | None) -> str:
    r = result or {}
    if job["status"] == "failed":
        err = job.get("error") or {}
        return f"job {job['id']} failed: {err.get('code')}: {err.get('message')}"
    parts = [f"job {job['id']} {job['status']}"]
    if r.get("steps") is not None:
        parts.append(f"{r['steps']} steps ({r.get('stop_reason')})")
    for key in ("best_val_ppl", "test_ppl", "test_accuracy"):
        if r.get(key) is not None:
            parts.append(f"{key} {_num(r[key], '.4f')}")
    if r.get("best_checkpoint_id"):
        parts.append(f"best checkpoint {r['best_checkpoint_id']}")
    return ", ".join(parts)


def follow(client: Client, job_id: str, *, as_json: bool, history: bool) -> int:
    """Follow the job's events until it finishes: a live bar (or, ``as_json``, one JSON
    object per event and line on stdout); returns the job's :data:`EXIT_CODES` status."""
    job = client.jobs.get(job_id)
    step = (job.get("progress") or {}).get("step", 0)
    after = None if history else max(0, step - FOLLOW_BACKLOG_STEPS)
    stream = client.jobs.events(job_id, after_step=after)
    try:
        if as_json:
            for event in stream:
                print(json.dumps({"event": event.event, "id": event.id, "data": event.data}),
                      flush=True)
        else:
            with _Bar(job) as bar:
                for event in stream:
                    bar.on_event(event)
    except KeyboardInterrupt:
        stream.close()
        print(f"lmforge: stopped following; job {job_id} goes on (lmforge cancel {job_id} "
              "stops it)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        stream.close()
    job = client.jobs.get(job_id)
    if not as_json:
        result = None
        if job["status"] in EXIT_CODES:
            try:
                result = client.jobs.result(job_id)
            except LMForgeError:
                result = None
        print(_summary(job, result), flush=True)
    return EXIT_CODES.get(job["status"], EXIT_ERROR)


def _follow(args: argparse.Namespace, client: Client) -> int:
    return follow(client, args.job, as_json=args.json, history=args.history)


# -- download --------------------------------------------------------------------------------


def _download(args: argparse.Namespace, client: Client) -> int:
    row = client.checkpoints.find(args.job, args.checkpoint)
    started = time.monotonic()
    if args.json:
        path = client.checkpoints.download(args.job, row["id"], args.output)
    else:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress("[bold]download", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True)) as bar:
            task = bar.add_task("download", total=row["bytes"])
            path = client.checkpoints.download(
                args.job, row["id"], args.output,
                on_progress=lambda done, total: bar.update(task, completed=done))
    info = {"path": str(path), "bytes": row["bytes"], "sha256": row["sha256"],
            "verified": True, "seconds": round(time.monotonic() - started, 3),
            "checkpoint": row}
    _out(args, f"{path}: {row['kind']} checkpoint {row['id']} at step {row['step']}, "
               f"{row['bytes']} bytes, sha256 {row['sha256']} verified", info)
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------------


def _remote_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help="the API's base URL (default: $LMFORGE_URL, else "
                             "http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=None,
                        help="the API key (default: $LMFORGE_API_KEY)")
    common.add_argument("--json", action="store_true",
                        help="machine-readable JSON on stdout")
    return common


def add_commands(sub: Any) -> None:
    """Add the service's user commands to ``lmforge``'s subparsers ``sub``."""
    common = _remote_options()

    def add(name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **kwargs)
        parser.set_defaults(func=_run(handler))
        return parser

    datasets = sub.add_parser("datasets", help="upload and list datasets on the service")
    ds_sub = datasets.add_subparsers(dest="datasets_command", required=True,
                                     metavar="DATASETS_COMMAND")
    up = ds_sub.add_parser("upload", parents=[common],
                           help="upload FILE... as one dataset (joined in order)",
                           description="Upload one file, or several joined in order as one "
                                       "dataset (plain or gzip/Zstandard-compressed; README "
                                       "'Datasets'). Prints the dataset's id.")
    up.add_argument("files", nargs="+", metavar="FILE")
    up.add_argument("--name", default=None, help="the dataset's name (default: the file's)")
    up.add_argument("--format", choices=["text", "jsonl", "csv", "tsv"], default=None)
    up.add_argument("--text-field", default=None, help="jsonl/csv/tsv: the text's field")
    up.add_argument("--label-field", default=None,
                    help="jsonl/csv/tsv: the label's field (a labelled dataset)")
    up.add_argument("--columns", default=None,
                    help="csv/tsv without a header: the columns' names, comma-separated")
    up.add_argument("--idempotency-key", default=None,
                    help="a retry with the same key and file returns the same dataset")
    up.set_defaults(func=_run(_datasets_upload))
    ls = ds_sub.add_parser("list", parents=[common], help="list datasets, newest first")
    ls.add_argument("--limit", type=int, default=None)
    ls.set_defaults(func=_run(_datasets_list))

    submit = add("submit", _submit, help="submit a job spec (JSON or YAML)",
                 description="Submit the job spec in SPEC (JSON, or YAML by its .yaml/.yml "
                             "suffix). With --follow, then follow it as `lmforge follow` does "
                             "and exit with its outcome (0 succeeded, 3 failed, 4 cancelled).")
    submit.add_argument("spec", metavar="SPEC")
    submit.add_argument("--follow", action="store_true",
                        help="follow the job until it ends; exit with its outcome")
    submit.add_argument("--dry-run", action="store_true",
                        help="only estimate (parameters, memory, seconds per step)")
    submit.add_argument("--idempotency-key", default=None,
                        help="a retry with the same key and spec returns the same job")

    jobs = add("jobs", _jobs, help="list jobs, newest first")
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                           "cancelled"], default=None)
    jobs.add_argument("--limit", type=int, default=None)

    status = add("status", _status, help="show a job")
    status.add_argument("job", metavar="JOB")

    fol = add("follow", _follow, help="follow a job live until it ends",
              description="A live progress bar (step/total, loss, validation perplexity, "
                          "tokens/s, ETA) until the job ends; exits with its outcome: 0 "
                          "succeeded, 3 failed, 4 cancelled (1: an error, 130: interrupted; "
                          "the job goes on). --json: one JSON object per event and line.")
    fol.add_argument("job", metavar="JOB")
    fol.add_argument("--history", action="store_true",
                     help="every event from the job's start (default: from about "
                          f"{FOLLOW_BACKLOG_STEPS} steps before its current one)")

    cancel = add("cancel", _cancel, help="cancel a job")
    cancel.add_argument("job", metavar="JOB")

    dl = add("download", _download, help="download a checkpoint (sha256 verified)",
             description="Download a checkpoint of JOB, verify its sha256 against the API's, "
                         "and only then write it (no partial file is ever left).")
    dl.add_argument("job", metavar="JOB")
    dl.add_argument("--checkpoint", default="best", metavar="best|last|ID",
                    help="which checkpoint (default: best)")
    dl.add_argument("-o", "--output", default=None, metavar="PATH",
                    help="a file or a directory (default: <job>-<kind>-step<N>.safetensors)")
