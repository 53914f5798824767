"""The ``lmforge`` command.

    lmforge up [--host H] [--port P]        everything on one machine (embedded Redis, SQLite)
    lmforge api [--host H] [--port P]       the HTTP API (uvicorn, app.main:app)
    lmforge worker [--concurrency N] [--device cpu|cuda] [--queues Q,..] [--gpus 0,1]
                   [--gpus-per-job N]       a Celery worker (prefork); with --gpus one
                                            worker process per GPU (group), supervised
    lmforge serve [--host H] [--port P]     the inference server (generate/score/classify)
    lmforge db upgrade                      upgrade the database schema to the newest revision
    lmforge keys create --name NAME [--admin]   create an API key; prints only the key
    lmforge keys list                       list API keys (prefix, name, admin, dates)
    lmforge keys revoke PREFIX              revoke the API key with this prefix
    lmforge train SPEC.json --output DIR [--overwrite | --resume] [--cache-dir D | --no-cache]
                                            train without any service
    lmforge sample CHECKPOINT --prompt P    sample text from a checkpoint file

A running service's users (lmforge.remote, over lmforge.client; --url, --api-key, --json):

    lmforge datasets upload FILE... | datasets list
    lmforge submit SPEC.json|SPEC.yaml [--follow]    lmforge jobs [--status S]
    lmforge status JOB | follow JOB | cancel JOB | download JOB [--checkpoint C] [-o PATH]

Each subcommand imports only what it needs: ``up`` and ``api`` never import torch, and
``worker`` leaves torch to the task inside the forked pool process (docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cmd_up(args: argparse.Namespace) -> int:
    from lmforge.supervisor import run_up

    return run_up(args.host, args.port, concurrency=args.concurrency)


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from app.auth import check_bind
    from store.logs import log_format
    from store.settings import get_settings

    check_bind(get_settings().auth, args.host)
    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # A supervisor or a load balancer stops us; do not wait long for keep-alive clients.
        timeout_graceful_shutdown=10,
        # JSON logs: uvicorn's loggers propagate to the root's JSON handler instead of their
        # own text handlers (store.logs).
        log_config=None if log_format() == "json" else LOGGING_CONFIG,
    )
    return 0


def _worker_plan(args: argparse.Namespace) -> tuple[str, list[str], list[list[str]]]:
    """``lmforge worker``'s device class, queues and GPU groups (one worker process each;
    empty: one worker in this process). Raises ``ValueError`` naming the bad option."""
    from core.routing import queue_name
    from store.workers import detect_device_class

    per_job = args.gpus_per_job
    if per_job < 1:
        raise ValueError(f"--gpus-per-job must be at least 1 (got {per_job})")
    gpus = [g.strip() for g in (args.gpus or "").split(",") if g.strip()]
    if args.gpus is not None and not gpus:
        raise ValueError("--gpus names no GPU (expected e.g. --gpus 0,1)")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus names a GPU twice: {args.gpus}")
    if len(gpus) % per_job:
        raise ValueError(f"--gpus lists {len(gpus)} GPUs, not a multiple of "
                         f"--gpus-per-job {per_job}")
    device = args.device or ("cuda" if gpus else detect_device_class())
    if args.queues:
        queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    else:  # its own device queue first: it is tried first within a priority step
        queues = [queue_name(device, per_job), queue_name("auto", per_job)]
    groups = [gpus[i:i + per_job] for i in range(0, len(gpus), per_job)]
    return device, queues, groups


def _cmd_worker(args: argparse.Namespace) -> int:
    try:
        device, queues, groups = _worker_plan(args)
    except ValueError as exc:
        print(f"lmforge worker: {exc}", file=sys.stderr)
        return 2
    if groups:
        from store.workers import nvidia_gpu_count

        if device == "cuda" and nvidia_gpu_count() == 0:
            print("lmforge worker: warning: --gpus was given but this machine shows no NVIDIA "
                  "GPU (/proc/driver/nvidia/gpus): its jobs will fail with "
                  "device_unavailable", file=sys.stderr)
        return _supervise_workers(args, device, queues, groups)
    from store.workers import ENV_DEVICE, ENV_GPUS_PER_JOB

    os.environ[ENV_DEVICE] = device  # read by the registry step (worker.celery_app)
    os.environ[ENV_GPUS_PER_JOB] = str(args.gpus_per_job)
    # billiard reads REMAP_SIGTERM at import time: a SIGTERM (docker stop, `lmforge up`
    # stopping) then does a cold shutdown that gives the running task
    # `worker_soft_shutdown_timeout` seconds to save a checkpoint and requeues its message,
    # instead of a warm shutdown that would wait for a training run to finish.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from worker.celery_app import celery

    argv = [
        "worker",
        # prefork is the only pool that survives every shutdown path (docs/operations.md).
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        f"--loglevel={args.loglevel}",
        # We use neither revokes nor worker events; skipping them saves seconds of start-up.
        "--without-mingle",
        "--without-gossip",
        # Nor Celery's worker heartbeats (our lease is the job's heartbeat in the database).
        # With them, a worker whose broker died with its supervisor (a SIGKILLed `lmforge
        # up`) never exited: its timer thread retried a heartbeat publish forever while the
        # shutdown waited for it.
        "--without-heartbeat",
        f"--queues={','.join(queues)}",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    celery.worker_main(argv)
    return 0


def _supervise_workers(args: argparse.Namespace, device: str, queues: list[str],
                       groups: list[list[str]]) -> int:
    """``lmforge worker --gpus ...``: one ``lmforge worker`` process per GPU group, each with
    ``CUDA_VISIBLE_DEVICES`` set to its group and node name ``gpu<ids>@%h`` (``gpu0``,
    ``gpu0+1`` for a group; ``gpu0.<--hostname>`` when one is given). A SIGTERM, SIGINT or
    SIGQUIT is forwarded to each; when one exits on its own the others are sent SIGTERM.
    Returns once all have exited: the first non-zero exit code, else 0."""
    from lmforge.processes import spawn

    cli = [sys.executable, "-m", "lmforge.cli", "worker", "--device", device,
           "--queues", ",".join(queues), "--gpus-per-job", str(args.gpus_per_job),
           "--concurrency", str(args.concurrency), "--loglevel", args.loglevel]
    children = []
    for group in groups:
        label = "gpu" + "+".join(group)
        name = f"{label}.{args.hostname}" if args.hostname else f"{label}@%h"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(group)}
        # Its own process group: a terminal's Ctrl-C reaches only this supervisor, which
        # forwards it; a killed supervisor takes each child with it (SIGTERM).
        children.append(spawn([*cli, "--hostname", name], env=env))
    print(f"lmforge worker: {len(children)} worker processes on GPUs "
          f"{' | '.join(','.join(g) for g in groups)} serving {','.join(queues)} "
          f"(pids {' '.join(str(c.pid) for c in children)})", file=sys.stderr, flush=True)
    return _wait_workers(children)


def _wait_workers(children: list[Any]) -> int:
    """Forward SIGTERM/SIGINT/SIGQUIT to ``children`` (``subprocess.Popen``) and wait until
    all have exited; the first to exit on its own gets the others sent SIGTERM. Returns the
    first non-zero exit code (1 for an unexpected exit with 0), else 0."""
    import signal
    import time

    from lmforge.processes import kill_process_group

    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                try:
                    os.kill(child.pid, signum)
                except OSError:
                    pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, forward)
    code = 0
    while any(c.poll() is None for c in children):
        exited = [c for c in children if c.poll() is not None]
        if exited and not stopping:
            print(f"lmforge worker: pid {exited[0].pid} exited ({exited[0].returncode}); "
                  f"stopping the others", file=sys.stderr, flush=True)
            code = exited[0].returncode or 1
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    for child in children:
        kill_process_group(child)  # whatever a child left in its group (a pool process)
        code = code or child.returncode
    return int(code)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from worker.serve.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from store.db import upgrade_database
    from store.settings import get_settings

    settings = get_settings()
    if settings.database_url is None:
        settings.lmforge_home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.sqlalchemy_url)
    print(f"database upgraded: {_redact(settings.sqlalchemy_url)}")
    return 0


def _keys_session() -> Any:
    """A session factory on the configured database (``DATABASE_URL`` or the SQLite file
    under ``LMFORGE_HOME``), its schema upgraded first (idempotent)."""
    from store.db import make_engine, make_session_factory, upgrade_database
    from store.settings import get_settings

    settings = get_settings()
    if settings.database_url is None:
        settings.lmforge_home.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.sqlalchemy_url)
    return make_session_factory(make_engine(settings.sqlalchemy_url))


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from core.errors import ValidationFailed
    from store import apikeys
    from store.db import session_scope

    try:
        apikeys.validate_name(args.name)
    except ValidationFailed as exc:
        print(f"lmforge keys create: {exc.message}", file=sys.stderr)
        return 2
    with session_scope(_keys_session()) as session:
        created = apikeys.create_key(session, args.name, is_admin=args.admin)
        prefix = created.row.prefix
    # The key is the only line on stdout, so that scripts can capture it; it is not stored.
    print(created.key, flush=True)
    print(f"created {'admin ' if args.admin else ''}key {prefix}... for {args.name!r}; it is "
          "shown only this once", file=sys.stderr)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from store import apikeys
    from store.db import session_scope

    def when(t: Any) -> str:
        return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%SZ")

    with session_scope(_keys_session()) as session:
        rows = apikeys.list_keys(session)
        print(f"{'PREFIX':<14}{'NAME':<24}{'ADMIN':<7}{'CREATED':<22}{'LAST USED':<22}REVOKED")
        for r in rows:
            print(f"{r.prefix:<14}{r.name:<24}{'yes' if r.is_admin else 'no':<7}"
                  f"{when(r.created_at):<22}{when(r.last_used_at):<22}{when(r.revoked_at)}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from store import apikeys
    from store.db import session_scope
    from store.models import utcnow

    now = utcnow()
    try:
        with session_scope(_keys_session()) as session:
            row = apikeys.revoke_key(session, args.prefix, at=now)
            name, prefix, revoked_at = row.name, row.prefix, row.revoked_at
    except NotFound as exc:
        print(f"lmforge keys revoke: {exc.message}", file=sys.stderr)
        return 1
    if revoked_at != now:
        print(f"key {prefix} of {name!r} was already revoked (at {revoked_at:%Y-%m-%d %H:%M:%S} "
              f"UTC)")
    else:
        print(f"revoked key {prefix} of {name!r}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lmforge.local import train_command

    output = Path(args.output)
    resume = output / "last.safetensors" if args.resume else None
    return int(train_command(Path(args.spec), output, resume=resume, overwrite=args.overwrite,
                             cache_dir=None if args.cache_dir is None else Path(args.cache_dir),
                             use_cache=not args.no_cache))


def _cmd_sample(args: argparse.Namespace) -> int:
    from lmforge.local import sample_command

    return int(
        sample_command(
            Path(args.checkpoint),
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    )


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="LMForge: a REST service for training LSTM language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run the API, a worker, the inference server and (unless REDIS_URL is set) an "
             "embedded Redis",
        description="Run everything on one machine. Ctrl-C or SIGTERM stops it all.",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--concurrency", type=int, default=1, help="training jobs at a time")
    up.set_defaults(func=_cmd_up)

    api = sub.add_parser("api", help="serve the HTTP API (app.main:app)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    api.set_defaults(func=_cmd_api)

    worker = sub.add_parser(
        "worker", help="run a Celery worker that trains jobs",
        description="A Celery worker. By default it serves its device class's queue (\"cuda\" "
                    "when the machine has an NVIDIA GPU, else \"cpu\") and \"lmforge\" (jobs "
                    "of device \"auto\"); with --gpus-per-job N, \"<class>-xN\" and "
                    "\"lmforge-xN\" instead (data-parallel jobs of N processes). --gpus 0,1 "
                    "starts one worker process per GPU (or per group of N GPUs), each with "
                    "CUDA_VISIBLE_DEVICES set, and stops them all on SIGTERM/Ctrl-C. "
                    "docs/deploy.md, \"Queues and devices\".")
    worker.add_argument(
        "--concurrency", type=int, default=1,
        help="jobs at a time per worker process (default 1; with --gpus, one per GPU group)")
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="the device class served (default: cuda when /proc/driver/nvidia "
                             "lists a GPU or --gpus is given, else cpu)")
    worker.add_argument("--queues", default=None,
                        help="comma-separated queues, replacing the default ones "
                             "(<device> and lmforge, or their -xN forms)")
    worker.add_argument("--gpus", default=None, metavar="IDS",
                        help="comma-separated GPU ids (CUDA_VISIBLE_DEVICES values): one worker "
                             "process per GPU, or per group of --gpus-per-job GPUs")
    worker.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                        help="processes (GPUs) per data-parallel job: serve the -xN queues "
                             "(default 1)")
    worker.add_argument("--hostname", default=None, help="Celery node name")
    worker.set_defaults(func=_cmd_worker)

    serve = sub.add_parser(
        "serve", help="serve inference (generate, score, classify) for the API",
        description="The inference server the API calls (LMFORGE_INFERENCE_URL); it loads "
                    "checkpoints from storage and may use torch. Bind it to a private address: "
                    "it has no authentication of its own.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=_cmd_serve)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_sub.add_parser("upgrade", help="upgrade the schema to the newest revision")
    upgrade.set_defaults(func=_cmd_db_upgrade)

    keys = sub.add_parser("keys", help="manage API keys (on the database directly)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    create = keys_sub.add_parser(
        "create", help="create an API key and print it (its only line on stdout)",
        description="Create an API key for principal NAME and print it: the key is shown only "
                    "this once (only its hash is stored). Keys with the same NAME share "
                    "datasets and jobs, so a key is rotated by creating a new one with the "
                    "same name and revoking the old one.")
    create.add_argument("--name", required=True,
                        help="the principal: 1-40 letters, digits and _ . @ -")
    create.add_argument("--admin", action="store_true",
                        help="an admin key: sees every principal's resources, manages keys")
    create.set_defaults(func=_cmd_keys_create)
    keys_list = keys_sub.add_parser("list", help="list API keys (never the keys themselves)")
    keys_list.set_defaults(func=_cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke an API key by its prefix")
    revoke.add_argument("prefix", metavar="PREFIX",
                        help="the key's prefix (lmf_ + 8 characters, as `keys list` shows; a "
                             "whole key works too)")
    revoke.set_defaults(func=_cmd_keys_revoke)

    train = sub.add_parser("train", help="train a model locally, without the service")
    train.add_argument("spec", metavar="SPEC.json", help="a job spec (JSON)")
    train.add_argument("--output", required=True, metavar="DIR",
                       help="checkpoints and metrics; must be empty unless --overwrite or --resume")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the earlier lmforge run in DIR (removes only the files its "
                               "manifest.json lists, their sidecars, metrics.jsonl and "
                               "manifest.json; refuses when DIR holds anything else)")
    existing.add_argument("--resume", action="store_true",
                          help="continue the run in DIR from its last.safetensors")
    cache = train.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", metavar="DIR",
                       help="where token files are kept and reused (default: "
                            "$LMFORGE_TOKEN_CACHE_DIR, else ~/.cache/lmforge/tokens)")
    cache.add_argument("--no-cache", action="store_true",
                       help="tokenise the texts in memory, without reading or writing the cache")
    train.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="sample text from a checkpoint or exported model")
    sample.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a .safetensors checkpoint or exported model (lmforge.model.v1)")
    sample.add_argument("--prompt", default="")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_cmd_sample)

    # The service's users: datasets upload, submit, jobs, status, follow, cancel, download.
    from lmforge.remote import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # LMFORGE_LOG_FORMAT=json|text (store.logs: every line carries the job and request ids).
    from store.logs import configure_logging

    configure_logging()
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of our output went away (`lmforge jobs | head`): stop quietly, as a Unix
        # filter does. Python's documented recipe: point stdout at devnull so that the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter killed by it


if __name__ == "__main__":
    sys.exit(main())
