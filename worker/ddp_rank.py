"""Data-parallel jobs (``resources.gpus`` N > 1): the processes of one run.

:func:`train_data_parallel` runs in the worker's pool process, which is rank 0: it keeps the
job's claim, heartbeat and reporting (the runner's hooks), prepares the corpus (the token
cache), then starts ranks 1..N-1 as subprocesses (``python -m worker.ddp_rank DIR``) with the
rendezvous variables ``torchrun`` sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``), a ``torch.distributed.TCPStore`` served by rank 0 on a free
port, and trains with them (:func:`worker.engine.trainer.train_prepared` with a
:class:`worker.engine.distributed.DistContext`). Devices: on CUDA rank ``r`` trains on
``cuda:r`` of the GPUs the worker was given (``CUDA_VISIBLE_DEVICES``, inherited) over NCCL;
on the CPU every rank uses gloo and ``cpu_count // N`` threads (unless
``training.num_threads`` says otherwise).

Why not ``torch.distributed.run`` (the elastic agent): rank 0 must be the pool process that
holds the job's claim and lease, reports through the database and polls for a cancel, and
the elastic agent runs every rank as its own child (and restarts failed groups itself, which
the job's attempts already do, from the last checkpoint). The rendezvous is the same
``env://`` one torchrun's static rendezvous uses.

Faults: a rank started here dies with its parent (``PR_SET_PDEATHSIG`` on Linux, and a thread
watching the parent's pid), so none outlives the job; when a rank dies, rank 0's next
collective raises, and :func:`train_data_parallel` turns that into ``TrainingError
("rank_failed")`` naming the rank and its exit code or signal (or, when the rank failed with a
``TrainingError`` of its own, that error, prefixed with the rank). The runner resumes a
``rank_failed`` job from its last checkpoint on its next attempt (:mod:`worker.runner`).
Every rank's collectives time out after ``LMFORGE_DDP_TIMEOUT_S`` seconds (default 1800: rank
0 evaluates and writes checkpoints while the others wait).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from core.contract import (
    NullHooks,
    TrainingError,
    TrainingHooks,
    TrainingResult,
    failure_site,
)
from core.sources import CorpusSources
from core.spec import JobSpec
from worker.engine.data import corpus_from_prepared
from worker.engine.distributed import init_distributed, shutdown_distributed
from worker.engine.tokencache import PreparedCorpus, prepare_corpus
from worker.engine.tokenizers import tokenizer_from_json
from worker.engine.trainer import (
    _resumable,
    failures_explained,
    resolve_device,
    train_prepared,
)

log = logging.getLogger(__name__)

PAYLOAD = "payload.json"
ERROR_EXIT = 3  # a rank's exit status after a TrainingError (written to rank<r>.error.json)


def ddp_timeout_s() -> float:
    """``LMFORGE_DDP_TIMEOUT_S`` (:class:`store.settings.Settings`), in seconds."""
    from store.settings import get_settings

    return get_settings().ddp_timeout_s


# -- rank 0: the worker's pool process ------------------------------------------------------


@dataclass
class Rank:
    """A started rank: its number, process and the directory of the run."""

    rank: int
    proc: subprocess.Popen[bytes]
    run_dir: Path

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return "is still running"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"was killed by {name}"
        return f"exited with status {rc}"

    def error(self) -> dict[str, Any] | None:
        """The TrainingError the rank wrote before exiting, if any."""
        path = self.run_dir / f"rank{self.rank}.error.json"
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None


def train_data_parallel(spec: JobSpec, sources: CorpusSources, hooks: TrainingHooks,
                        resume_from: bytes | None = None, device: str | None = None,
                        cache_dir: Path | None = None,
                        embeddings: str | None = None) -> TrainingResult:
    """:func:`worker.engine.trainer.train_sources` with ``spec.resources.gpus`` processes
    (this one is rank 0 and reports through ``hooks``; see the module's doc). Equals, within
    floating-point reduction order, one process training with batch ``batch_size * gpus``.

    Raises what :func:`train_sources` raises, ``device_unavailable`` when CUDA is asked for
    and fewer than ``gpus`` devices are visible, and ``rank_failed`` when another rank dies
    (or a rank's own ``TrainingError``)."""
    world = spec.resources.gpus
    timeout = ddp_timeout_s()
    with failures_explained():
        base = _base_device(spec, device, world)
        ckpt = _resumable(resume_from)
        tokenizer = None if ckpt is None else ckpt.tokenizer
        prepared = prepare_corpus(spec, sources, cache_dir, tokenizer=tokenizer)
        corpus_from_prepared(spec, prepared)  # too small for the global batch: fail here
    threads_before = torch.get_num_threads()
    if base.type == "cpu" and spec.training.num_threads is None:
        torch.set_num_threads(_threads_per_rank(world))
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge-ddp-") as tmp:
            run_dir = Path(tmp)
            _write_payload(run_dir, spec, prepared, base, timeout)
            store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                  wait_for_workers=False, timeout=timedelta(seconds=timeout))
            ranks: list[Rank] = []
            try:
                ranks = [_start_rank(run_dir, r, world, store.port) for r in range(1, world)]
                return _run_rank0(spec, prepared, hooks, resume_from, embeddings, base, store,
                                  ranks, timeout)
            finally:
                _stop(ranks)
    finally:
        torch.set_num_threads(threads_before)


def _run_rank0(spec: JobSpec, prepared: PreparedCorpus, hooks: TrainingHooks,
               resume_from: bytes | None, embeddings: str | None, base: torch.device,
               store: Any, ranks: list[Rank], timeout: float) -> TrainingResult:
    world = len(ranks) + 1
    _wait_ready(store, ranks, timeout)
    try:
        ctx = init_distributed(0, world, _rank_device(base, 0), store, timeout)
        failed = True
        try:
            result = train_prepared(spec, prepared, hooks, resume_from, embeddings=embeddings,
                                    dist=ctx)
            failed = False
        finally:
            shutdown_distributed(failed)
    except TrainingError:
        raise
    except Exception as exc:  # a collective that failed: which rank died?
        dead = _dead_rank(ranks, grace_s=10.0)
        if dead is None:
            raise
        raise _rank_error(dead, world, exc) from exc
    for r in ranks:  # they exit once the last checkpoint is gathered
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(timeout=60)
        if r.proc.returncode not in (0, None):
            log.warning("data-parallel rank %d %s after the run", r.rank, r.describe_exit())
    return result


def _base_device(spec: JobSpec, device: str | None, world: int) -> torch.device:
    """The device class of the run: ``device``, else ``resources.device`` when it names one,
    else ``training.device``. CUDA needs ``world`` visible devices (``device_unavailable``)."""
    wanted = device or (spec.resources.device if spec.resources.device in ("cpu", "cuda")
                        else spec.training.device)
    base = resolve_device(wanted)
    if base.type == "cuda" and torch.cuda.device_count() < world:
        raise TrainingError("device_unavailable",
                            f"resources.gpus = {world} needs {world} GPUs but this worker "
                            f"sees {torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES); start "
                            f"it with `lmforge worker --gpus ... --gpus-per-job {world}`")
    return base


def _rank_device(base: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if base.type == "cuda" else torch.device("cpu")


def _threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _write_payload(run_dir: Path, spec: JobSpec, prepared: PreparedCorpus,
                   base: torch.device, timeout: float) -> None:
    """What the other ranks read: the spec, the tokenizer, and each split's token file (the
    token cache's entry, or written here when the corpus was prepared in memory)."""
    splits: dict[str, dict[str, Any]] = {}
    for name, ids in prepared.splits.items():
        if prepared.path is not None:
            path = prepared.path / prepared.meta["splits"][name]["file"]
        else:
            path = run_dir / f"{name}.bin"
            np.ascontiguousarray(ids).tofile(path)
        splits[name] = {"file": str(path), "dtype": ids.dtype.str, "tokens": int(ids.size)}
    payload = {
        "spec": spec.model_dump(mode="json"),
        "tokenizer": prepared.tokenizer.to_json(),
        "train_counts": prepared.meta.get("train_counts"),
        "splits": splits,
        "device": base.type,
        "timeout_s": timeout,
        "threads": spec.training.num_threads or _threads_per_rank(spec.resources.gpus),
    }
    (run_dir / PAYLOAD).write_text(json.dumps(payload), encoding="utf-8")


def _start_rank(run_dir: Path, rank: int, world: int, port: int) -> Rank:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # the directory holding `worker`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               LMFORGE_DDP_PARENT=str(os.getpid()))
    # A session of its own: a Ctrl-C or SIGTERM sent to the worker's process group reaches
    # rank 0, which stops every rank in step (a last checkpoint), not the ranks directly.
    proc = subprocess.Popen([sys.executable, "-m", "worker.ddp_rank", str(run_dir)], env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.info("data-parallel rank %d of %d started (pid %d)", rank, world, proc.pid)
    return Rank(rank, proc, run_dir)


def _wait_ready(store: Any, ranks: list[Rank], timeout: float) -> None:
    """Wait until every rank has prepared and said so in the store (``ready/<r>``); a rank
    that exits meanwhile raises at once."""
    deadline = time.monotonic() + timeout
    keys = [f"ready/{r.rank}" for r in ranks]
    while not store.check(keys):
        dead = next((r for r in ranks if r.proc.poll() is not None), None)
        if dead is not None:
            raise _rank_error(dead, len(ranks) + 1, None)
        if time.monotonic() > deadline:
            raise TrainingError("rank_failed", f"the data-parallel ranks did not start within "
                                f"{timeout:g} s (LMFORGE_DDP_TIMEOUT_S)", phase="prepare")
        time.sleep(0.05)


def _dead_rank(ranks: list[Rank], grace_s: float) -> Rank | None:
    """The first rank (lowest number) that has exited, waiting up to ``grace_s`` seconds
    for one to (a collective can fail a moment before its peer's exit is visible)."""
    deadline = time.monotonic() + grace_s
    while True:
        for r in ranks:
            if r.proc.poll() is not None:
                return r
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _rank_error(dead: Rank, world: int, exc: BaseException | None) -> TrainingError:
    phase, step = (None, None) if exc is None else failure_site(exc)
    own = dead.error()
    if own is not None and own.get("code"):
        return TrainingError(str(own["code"]),
                             f"data-parallel rank {dead.rank} of {world}: {own.get('message')}",
                             own.get("step", step),
                             phase=own.get("phase") or phase)  # type: ignore[arg-type]
    at = f" at step {step}" if step is not None else ""
    return TrainingError(
        "rank_failed",
        f"data-parallel rank {dead.rank} of {world} (pid {dead.proc.pid}) "
        f"{dead.describe_exit()}{at} (the worker's log has the rank's output); the service "
        f"resumes the job from its last checkpoint on its next attempt, up to "
        f"LMFORGE_MAX_ATTEMPTS",
        step, phase=phase or "train")  # type: ignore[arg-type]


def _stop(ranks: list[Rank]) -> None:
    """Kill the ranks still running (SIGKILL: they ignore SIGTERM, and rank 0 has written
    whatever is kept) and reap them."""
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.kill()
    for r in ranks:
        r.proc.wait()


# -- ranks 1..N-1: this module run as a program -----------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies: ``PR_SET_PDEATHSIG`` on Linux, and a daemon
    thread that watches the parent's pid (any platform; also closes the race of a parent that
    died before the prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="ddp-parent-watch", daemon=True).start()


def _read_prepared(payload: dict[str, Any]) -> PreparedCorpus:
    splits: dict[str, np.ndarray] = {}
    for name, s in payload["splits"].items():
        dtype = np.dtype(s["dtype"])
        splits[name] = (np.memmap(s["file"], dtype=dtype, mode="c", shape=(s["tokens"],))
                        if s["tokens"] else np.zeros(0, dtype=dtype))
    meta: dict[str, Any] = {}
    if payload.get("train_counts") is not None:
        meta["train_counts"] = payload["train_counts"]
    return PreparedCorpus(tokenizer_from_json(payload["tokenizer"]), splits, meta)


@contextlib.contextmanager
def _reported(run_dir: Path, rank: int) -> Iterator[None]:
    """Write a TrainingError to ``rank<r>.error.json`` for rank 0 to read, and exit with
    :data:`ERROR_EXIT`."""
    try:
        yield
    except TrainingError as exc:
        (run_dir / f"rank{rank}.error.json").write_text(json.dumps(exc.as_dict()),
                                                        encoding="utf-8")
        log.error("rank %d: %s: %s", rank, exc.code, exc.message)
        raise SystemExit(ERROR_EXIT) from exc


def main(argv: list[str]) -> int:
    """Rank ``$RANK`` of a run started by :func:`train_data_parallel` (``argv[1]``: its
    directory). Returns the exit status."""
    run_dir = Path(argv[1])
    _die_with_parent(int(os.environ["LMFORGE_DDP_PARENT"]))
    # Stopping is rank 0's decision (a shutdown reaches it and every rank then stops in
    # step); a signal meant for the worker must not kill a rank first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    payload = json.loads((run_dir / PAYLOAD).read_text(encoding="utf-8"))
    timeout = float(payload["timeout_s"])
    with _reported(run_dir, rank):
        spec = JobSpec.model_validate(payload["spec"])
        prepared = _read_prepared(payload)
        device = _rank_device(torch.device(payload["device"]), local_rank)
        torch.set_num_threads(int(payload["threads"]))
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timedelta(seconds=timeout))
        store.set(f"ready/{rank}", "1")
        ctx = init_distributed(rank, world, device, store, timeout)
        try:
            train_prepared(spec, prepared, NullHooks(), dist=ctx)
        finally:
            shutdown_distributed()
    return 0


def _run(argv: list[str]) -> None:
    """:func:`main`, then ``os._exit``: a finished rank leaves without the interpreter's
    teardown, in which the C++ destructors of torch.distributed's background threads (the
    store's, the process group's) sometimes abort (SIGABRT, "terminate called without an
    active exception") once the run is over."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("rank failed")
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _run(sys.argv)
