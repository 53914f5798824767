#!/usr/bin/env python3
"""Screenshots of the web dashboard for the README (docs/img/dashboard-*.png), taken from a
real service with a really trained job.

1. starts the embedded stack (``lmforge up``, as ``make demo`` does: scripts/demo.py's
   ``Stack``) with LMFORGE_HOME=./var/screenshots on a free port, and makes an API key;
2. uploads data/tinyshakespeare/input.txt and trains a 2-layer character LSTM to the end
   (``SCREENSHOT_MAX_STEPS``, 400 by default), then starts a second, long job;
3. drives Debian's Chromium (Playwright, ``executable_path``; ``LMFORGE_CHROMIUM`` may name
   another build) through the dashboard: the jobs table, the finished job's page with text
   generated from its best checkpoint, the running job's page with its curves growing, the
   new-job form; cancels the long job from its page;
4. stops the stack.

Run: ``.venv/bin/python scripts/screenshots.py`` (a few minutes on two idle CPU cores). It
starts from an empty ``var/screenshots`` (removed first).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, ViewportSize, sync_playwright

from lmforge.processes import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from demo import Stack, corpus_path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOME = REPO_ROOT / "var" / "screenshots"
OUT = REPO_ROOT / "docs" / "img"
MAX_STEPS = int(os.environ.get("SCREENSHOT_MAX_STEPS", "400"))
JOB_TIMEOUT_S = 3600.0
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
RUNNING_POINTS = 120  # steps of the running job shown (it validates every 25)

MODEL = {"embed_dim": 64, "hidden_dim": 128, "num_layers": 2, "dropout": 0.0}
TRAINING = {"batch_size": 32, "seq_len": 64, "eval_interval": 50, "eval_tokens": 32768, "seed": 0,
            "device": "cpu"}


def wait_status(client: httpx.Client, job_id: str, done: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in done:
            return job
        time.sleep(1.0)
    raise SystemExit(f"job {job_id} not {done} after {JOB_TIMEOUT_S:.0f} s")


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", json=spec)
    if r.status_code != 201:
        raise SystemExit(f"submitting {spec['name']}: {r.status_code} {r.text}")
    job: dict[str, Any] = r.json()
    print(f"submitted {job['id']} ({spec['name']})")
    return job


def shoot(page: Page, name: str, full_page: bool = False) -> None:
    path = OUT / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size:,} bytes)")


def chromium() -> str:
    path = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise SystemExit("no Chromium: apt-get install -y --no-install-recommends chromium")
    return path


def open_job(page: Page, job: dict[str, Any]) -> None:
    """Show the job's page and wait until it is that job's (the previous page's chart would
    otherwise answer the waits below) with its checkpoints listed."""
    page.goto(f"/#/jobs/{job['id']}")
    page.locator("h1", has_text=job["name"]).wait_for()
    page.locator("#checkpoints > *").first.wait_for()


def to_top(page: Page) -> None:
    page.evaluate("() => window.scrollTo(0, 0)")


def take(base_url: str, key: str, finished: dict[str, Any], running: dict[str, Any]) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True)
        ctx = browser.new_context(base_url=base_url, viewport=VIEWPORT)
        page = ctx.new_page()
        page.set_default_timeout(900_000)  # a busy machine trains slowly
        page.goto("/")
        page.fill("#api-key", key)
        page.click("#use-key")
        page.locator("#jobs-table").wait_for()

        # The running job: its curves as they grow (with a few validation points).
        open_job(page, running)
        page.wait_for_function("() => Number(document.querySelector('#chart-loss')"
                               f"?.dataset.points) >= {RUNNING_POINTS}")
        to_top(page)
        shoot(page, "running")

        page.goto("/")
        page.locator(f'#jobs-table tr[data-job-id="{running["id"]}"]').wait_for()
        page.wait_for_function("() => ![...document.querySelectorAll('td.best')]"
                               ".some(td => td.textContent === '…')")
        shoot(page, "jobs")

        open_job(page, running)
        page.on("dialog", lambda d: d.accept())
        page.click("#cancel")
        page.wait_for_selector('h1 [data-status="cancelled"]')

        # The finished job, with text generated from its best checkpoint.
        open_job(page, finished)
        page.locator("#result").wait_for()
        page.fill("#gen-prompt", "ROMEO:")
        page.fill("#gen-tokens", "240")
        page.click("#generate")
        page.locator("#generated pre.generated").first.wait_for()
        to_top(page)
        shoot(page, "job", full_page=True)

        page.goto("/#/new")
        page.locator("#f-training\\.max_steps").wait_for()
        page.locator("#f-dataset_id option[value^='ds_']").first.wait_for(state="attached")
        to_top(page)
        shoot(page, "new", full_page=True)
        browser.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(HOME, ignore_errors=True)  # a fresh database: no job of an earlier run
    stack = Stack(HOME, free_port())
    stack.start()
    try:
        probe = httpx.Client(base_url=stack.base_url, timeout=30.0)
        stack.wait_healthy(probe)
        key = stack.create_key()
        client = httpx.Client(base_url=stack.base_url, timeout=60.0,
                              headers={"Authorization": f"Bearer {key}"})
        with corpus_path().open("rb") as f:
            ds = client.post("/v1/datasets", files={"file": ("input.txt", f, "text/plain")},
                             data={"name": "tinyshakespeare"}).raise_for_status().json()
        finished = submit(client, {
            "name": "shakespeare-char", "dataset_id": ds["id"], "tokenizer": {"kind": "char"},
            "model": MODEL, "optimizer": {"lr": 0.003},
            "training": {**TRAINING, "max_steps": MAX_STEPS}})
        done = wait_status(client, finished["id"], {"succeeded", "failed", "cancelled"})
        if done["status"] != "succeeded":
            raise SystemExit(f"the job ended {done['status']}: {done['error']}")
        running = submit(client, {
            "name": "shakespeare-long", "dataset_id": ds["id"], "tokenizer": {"kind": "char"},
            "model": MODEL, "optimizer": {"lr": 0.002},
            "schedule": {"kind": "cosine", "warmup_steps": 100},
            "training": {**TRAINING, "max_steps": 100_000, "eval_interval": 25,
                         "log_interval": 5}})
        wait_status(client, running["id"], {"running"})
        take(stack.base_url, key, done, running)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
