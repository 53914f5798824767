#!/usr/bin/env python3
"""``make demo``: train a character-level LSTM on Shakespeare as a job of the service.

1. starts the embedded stack (``lmforge up``: SQLite, a real Redis from a wheel, the API, one
   worker) with LMFORGE_HOME=./var/demo on a free port;
2. creates an API key for the principal ``demo`` (``lmforge keys create``, which prints only
   the key), then, with it, uploads the repository's ``data/tinyshakespeare/input.txt``
   (data/README.md gives its source and terms), the same corpus on every machine, and submits
   a job over HTTP;
3. shows the job's progress live, downloads the best checkpoint, checks its sha256 and prints
   text sampled from it;
4. stops the stack with SIGTERM and checks that none of its processes is left running.

Everything goes through the public HTTP API; the sampling at the end runs the checkpoint file
through the engine's ``sample`` function, as a user would after downloading it. Exits non-zero
with a message on any failure, including when the corpus is missing (an installation without a
checkout of the repository). Set ``DEMO_MAX_STEPS`` to train longer or shorter.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.corpora import find_corpus
from lmforge import proctree
from lmforge.processes import free_port, kill_process_group, spawn

REPO_ROOT = Path(__file__).resolve().parents[1]
HOME = REPO_ROOT / "var" / "demo"
CORPUS = "tinyshakespeare/input.txt"  # under the repository's data/
STARTUP_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 3600.0  # generous: a busy 2-core machine can be 10x slower than an idle one
STOP_TIMEOUT_S = 90.0

# Sized for about 75 s of training on 2 idle CPU cores (measured: 60,000-85,000 characters/s
# for this model, 1500 steps in 45 s reaching a validation loss of 1.78): long enough for
# speaker names, line breaks and English words to appear in the sample.
MAX_STEPS = int(os.environ.get("DEMO_MAX_STEPS", "2500"))
SPEC_TRAINING = {
    "batch_size": 32,
    "seq_len": 64,
    "max_steps": MAX_STEPS,
    "eval_interval": 250,
    "seed": 0,
    "device": "auto",
}

console = Console()


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


class Stack:
    """``lmforge up`` as a child process (its output goes to a log file)."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = home / "stack.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.tree: set[int] = set()  # the supervisor's descendants when it was stopped

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Self-contained: the embedded Redis and a SQLite file under var/demo, whatever the
        # caller's environment points at.
        for name in ("REDIS_URL", "DATABASE_URL"):
            env.pop(name, None)
        env["LMFORGE_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        with open(self.log_path, "wb") as log:
            self.proc = spawn(
                [sys.executable, "-m", "lmforge.cli", "up", "--port", str(self.port)],
                env=env,
                log=log,
            )

    def wait_healthy(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise DemoError(f"`lmforge up` exited while starting.\n{self.log_tail()}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise DemoError(
            f"the API did not answer within {STARTUP_TIMEOUT_S:.0f} s.\n{self.log_tail()}"
        )

    def create_key(self) -> str:
        """A new API key of the principal ``demo`` on the stack's database (the only line
        ``lmforge keys create`` prints on stdout). ``lmforge up`` printed an admin key on
        its first start only; a key of its own keeps the demo the same on every run."""
        created = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "keys", "create", "--name", "demo"],
            env=self.env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
            check=False,
        )
        if created.returncode != 0:
            raise DemoError(f"`lmforge keys create` failed:\n{created.stderr[-2000:]}")
        return created.stdout.strip()

    def stop(self) -> int | None:
        """SIGTERM the supervisor, wait, then make sure nothing of it is left."""
        if self.proc is None:
            return None
        self.tree = proctree.descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                console.print("[yellow]the stack did not stop in time; killing it[/]")
        kill_process_group(self.proc)
        self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"


def _check(response: httpx.Response, what: str, expected: int = 200) -> Any:
    if response.status_code != expected:
        raise DemoError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json()


def corpus_path() -> Path:
    """The demo's corpus; the same file on every machine, so a missing one is an error rather
    than a reason to train on something else."""
    path = find_corpus(CORPUS)
    if path is None:
        raise DemoError(
            f"data/{CORPUS} is missing: the demo runs from a checkout of the repository, "
            "which ships it (see data/README.md)"
        )
    return path


def upload_corpus(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        ds = _check(
            client.post(
                "/v1/datasets",
                files={"file": ("tinyshakespeare.txt", f, "text/plain")},
                data={"name": "tinyshakespeare"},
            ),
            "uploading the dataset",
            201,
        )
    console.print(
        f"Uploaded [bold]tinyshakespeare[/]: {ds['num_chars']:,} characters, "
        f"sha256 {ds['sha256'][:12]}... -> {ds['id']}"
    )
    return {"dataset_id": ds["id"]}


def submit(client: httpx.Client, data: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "name": "demo-char-lstm",
        **data,
        "tokenizer": {"kind": "char"},
        "model": {"embed_dim": 64, "hidden_dim": 128, "num_layers": 2, "dropout": 0.0},
        "optimizer": {"name": "adam", "lr": 0.003},
        "training": SPEC_TRAINING,
    }
    job = _check(client.post("/v1/jobs", json=spec), "submitting the job", 201)
    console.print(f"Submitted job {job['id']} (2-layer LSTM, 128 units, {MAX_STEPS} steps)")
    return job


def follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll the job and its metrics until it finishes; show a progress bar."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    after_step = 0
    train_loss = val_text = speed = ""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("queued", total=MAX_STEPS, stats="")
        while True:
            job = _check(client.get(f"/v1/jobs/{job_id}"), "reading the job")
            while True:  # every new metric row, in pages
                page = _check(
                    client.get(
                        f"/v1/jobs/{job_id}/metrics",
                        params={"after_step": after_step, "limit": 1000},
                    ),
                    "reading metrics",
                )
                for row in page["data"]:
                    after_step = row["step"]
                    train_loss = f"loss {row['train_loss']:.3f}"
                    speed = f"{row['tokens_per_s'] / 1000:.1f}k tok/s"
                    if row.get("val_loss") is not None:
                        val_text = f"val {row['val_loss']:.3f} ppl {row['val_ppl']:.2f}"
                if not page["has_more"]:
                    break
            progress.update(
                bar,
                description=job["status"],
                completed=job["progress"]["step"],
                total=job["progress"]["total_steps"] or MAX_STEPS,
                stats=" | ".join(s for s in (train_loss, val_text, speed) if s),
            )
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise DemoError(f"the job did not finish within {JOB_TIMEOUT_S:.0f} s")
            time.sleep(0.5)


def download_best(client: httpx.Client, job_id: str) -> bytes:
    result = _check(client.get(f"/v1/jobs/{job_id}/result"), "reading the result")
    best_id = result["best_checkpoint_id"]
    if best_id is None:
        raise DemoError("the job has no best checkpoint")
    listed = {
        c["id"]: c
        for c in _check(client.get(f"/v1/jobs/{job_id}/checkpoints"), "listing checkpoints")["data"]
    }
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/{best_id}/download")
    if response.status_code != 200:
        raise DemoError(f"downloading the checkpoint: HTTP {response.status_code}")
    data = response.content
    digest = hashlib.sha256(data).hexdigest()
    header = response.headers.get("X-Checkpoint-SHA256")
    if not (digest == header == listed[best_id]["sha256"]):
        raise DemoError(
            f"checkpoint sha256 mismatch: file {digest}, header {header}, "
            f"listed {listed[best_id]['sha256']}"
        )
    path = HOME / "best.safetensors"
    path.write_bytes(data)
    console.print(
        f"Best validation loss {result['best_val_loss']:.3f} nats/char (perplexity "
        f"{result['best_val_ppl']:.2f}) at step {result['best_step']}, in "
        f"{result['duration_s']:.0f} s.\nDownloaded the best checkpoint ({len(data):,} bytes, "
        f"sha256 {digest[:12]}... verified) to {path.relative_to(REPO_ROOT)}"
    )
    return data


def show_sample(checkpoint: bytes, prompt: str) -> None:
    from worker.engine.sample import sample  # torch only for this last step

    text = sample(checkpoint, prompt=prompt, max_new_tokens=500, temperature=0.8, seed=1)
    console.rule("sampled from the downloaded checkpoint")
    console.print(text, markup=False, highlight=False)
    console.rule()


def run() -> int:
    corpus = corpus_path()  # before starting anything
    port = free_port()
    stack = Stack(HOME, port)
    t0 = time.monotonic()
    console.print(f"Starting the embedded stack on {stack.base_url} (logs: {stack.log_path})")
    stack.start()
    ok = False
    try:
        with httpx.Client(base_url=stack.base_url, timeout=60.0) as client:
            stack.wait_healthy(client)
            console.print(f"Stack up in {time.monotonic() - t0:.1f} s")
            key = stack.create_key()
            client.headers["Authorization"] = f"Bearer {key}"
            console.print(f"API key of principal 'demo': {key[:12]}... (lmforge keys create)")
            data = upload_corpus(client, corpus)
            job = submit(client, data)
            job = follow(client, job["id"])
            if job["status"] != "succeeded":
                raise DemoError(f"the job ended {job['status']}: {job.get('error')}")
            checkpoint = download_best(client, job["id"])
        show_sample(checkpoint, "ROMEO:\n")
        ok = True
    finally:
        console.print("Stopping the stack ...")
        code = stack.stop()
        if not ok:
            console.print(stack.log_tail(), markup=False, highlight=False)
    if code != 0:
        raise DemoError(f"`lmforge up` exited with code {code} on SIGTERM\n{stack.log_tail()}")
    if left := proctree.wait_gone(stack.tree):
        raise DemoError(f"processes of the stack still run after it stopped: {sorted(left)}")
    console.print(f"Stopped cleanly. Demo took {time.monotonic() - t0:.0f} s.")
    return 0


def main() -> int:
    try:
        return run()
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
