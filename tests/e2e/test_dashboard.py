"""The web dashboard and the API docs in a real headless Chromium (Debian's ``chromium``
package, driven by Playwright's Python package through ``executable_path``; no browser is
downloaded), against a real service: API, Celery worker and inference server as processes.

Every page is loaded with a request recorder that lets requests to the service through and
aborts (and records) any other: the pages must work with nothing leaving the machine. The
tests skip only when no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright

from tests.e2e.conftest import Api

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

# Safety nets for waiting on the page, not statements about speed (milliseconds, Playwright's
# unit): a step that takes longer fails the test with the page's state in the message.
UI_TIMEOUT_MS = 30_000
TRAINING_TIMEOUT_MS = 150_000
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
BUILTIN = {"dataset": {"builtin": "python-docs"}}


def chromium_executable() -> str | None:
    """Debian's Chromium (``LMFORGE_CHROMIUM`` may name another build of it)."""
    named = os.environ.get("LMFORGE_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_executable()
    if path is None:
        pytest.skip("no Chromium installed: the dashboard's browser tests need Debian's "
                    "`chromium` package (apt-get install -y --no-install-recommends chromium) "
                    "or LMFORGE_CHROMIUM naming its executable")
    return path


@pytest.fixture(scope="module")
def svc(chromium: str, start_service: Callable[..., Any],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard-db') / 'lmforge.db'}"
    service = start_service(url, name="dashboard", inference=True)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def api(svc: Any) -> Api:
    return Api(svc, BUILTIN)


@pytest.fixture(scope="module")
def finished_job(api: Api) -> dict[str, Any]:
    """A small character model trained to the end (60 steps, validated every 20)."""
    job = api.submit(name="dashboard-finished",
                     training={"max_steps": 60, "eval_interval": 20, "log_interval": 10})
    done = api.wait_finished(job["id"])
    assert done["status"] == "succeeded", done
    return done


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@dataclass
class Recorder:
    """What a browser context asked for: every request URL, the ones aborted for leaving the
    machine, and the pages' console errors and uncaught exceptions."""

    requests: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


@dataclass
class Session:
    context: BrowserContext
    page: Page
    rec: Recorder


@pytest.fixture
def open_session(browser: Browser, svc: Any) -> Iterator[Callable[[], Session]]:
    contexts: list[BrowserContext] = []

    def open_() -> Session:
        ctx = browser.new_context(base_url=svc.base_url, accept_downloads=True)
        contexts.append(ctx)
        rec = Recorder()

        def gate(route: Route) -> None:
            url = route.request.url
            rec.requests.append(url)
            if urlsplit(url).hostname in LOCAL_HOSTS:
                route.continue_()
            else:
                rec.external.append(url)
                route.abort()

        ctx.route("**/*", gate)
        page = ctx.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("console", lambda m: rec.console_errors.append(m.text)
                if m.type == "error" else None)
        page.on("pageerror", lambda e: rec.page_errors.append(str(e)))
        return Session(ctx, page, rec)

    yield open_
    for ctx in contexts:
        ctx.close()


def log_in(page: Page, key: str) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.click("#use-key")


def points(page: Page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def assert_stayed_local(rec: Recorder) -> None:
    assert rec.requests, "the page made no request at all"
    assert rec.external == [], f"requests left the machine: {rec.external}"


def test_pages_load_with_no_request_leaving_the_machine(
    open_session: Callable[[], Session], svc: Any, finished_job: dict[str, Any], api: Api
) -> None:
    s = open_session()
    page = s.page
    log_in(page, svc.key)
    row = page.locator(f'#jobs-table tr[data-job-id="{finished_job["id"]}"]')
    row.wait_for()
    assert row.locator("[data-status]").get_attribute("data-status") == "succeeded"
    # Best validation perplexity: exp of the lowest validation loss the job reported.
    val = [m["val_loss"] for m in api.metrics(finished_job["id"]) if m["val_loss"] is not None]
    best = row.locator("td.best")
    page.wait_for_function("el => el.textContent !== '…'", arg=best.element_handle())
    assert float(best.inner_text()) == pytest.approx(math.exp(min(val)), abs=0.01)
    assert page.evaluate("sessionStorage.getItem('lmforge.apiKey')") == svc.key

    # The job page: the whole curve, the checkpoints, the spec and the result.
    row.locator("a").first.click()
    page.wait_for_url(f"**/#/jobs/{finished_job['id']}")
    n_rows = len(api.metrics(finished_job["id"]))
    # (Arrow functions: Playwright evaluates a bare expression with eval, which the page's
    # Content-Security-Policy forbids.)
    page.wait_for_function(f"() => document.querySelector('#chart-loss')?.dataset.points"
                           f" == {n_rows}")
    ckpts = api.checkpoints(finished_job["id"])
    page.locator("#checkpoints tbody tr").nth(len(ckpts) - 1).wait_for()
    assert page.locator("#checkpoints tbody tr").count() == len(ckpts)
    assert '"max_steps": 60' in page.inner_text("#spec")
    page.locator("#result").wait_for()
    assert "best_val_ppl" in page.inner_text("#result")
    assert page.locator("#charts canvas").count() == 3  # loss, learning rate, tokens/s

    # The submit page, with the API's own defaults in the form.
    page.goto("/#/new")
    page.locator("#f-training\\.max_steps").wait_for()
    spec_schema = svc.client.get("/openapi.json").json()["components"]["schemas"]["JobSpec"]
    defaults = spec_schema["properties"]["training"]["default"]
    assert page.input_value("#f-training\\.max_steps") == str(defaults["max_steps"])
    assert page.input_value("#f-training\\.batch_size") == str(defaults["batch_size"])
    model_defaults = spec_schema["properties"]["model"]["default"]
    assert page.input_value("#f-model\\.hidden_dim") == str(model_defaults["hidden_dim"])

    assert_stayed_local(s.rec)
    # No script error and no Content-Security-Policy violation; the one 401 is the page's
    # first request, sent before it had a key (a service without keys needs none).
    assert [e for e in s.rec.console_errors if "status of 401" not in e] == []
    assert s.rec.page_errors == []


def test_a_running_jobs_curve_grows_and_the_cancel_button_stops_it(
    open_session: Callable[[], Session], svc: Any, api: Api
) -> None:
    job = api.submit(name="dashboard-long", training={
        "max_steps": 1_000_000, "eval_interval": 1_000_000, "log_interval": 5})
    try:
        s = open_session()
        page = s.page
        log_in(page, svc.key)
        page.goto(f"/#/jobs/{job['id']}")
        page.wait_for_function("() => Number(document.querySelector('#chart-loss')"
                               "?.dataset.points) >= 1", timeout=TRAINING_TIMEOUT_MS)
        first = points(page)
        page.wait_for_function(f"() => Number(document.querySelector('#chart-loss')"
                               f"?.dataset.points) > {first}", timeout=TRAINING_TIMEOUT_MS)
        assert points(page) > first
        assert page.get_attribute("h1 [data-status]", "data-status") == "running"
        paths = svc.client.get("/openapi.json").json()["paths"]
        if "/v1/jobs/{job_id}/events" in paths:  # followed through the event stream
            assert any(u.endswith(f"/v1/jobs/{job['id']}/events") for u in s.rec.requests)

        page.on("dialog", lambda d: d.accept())
        page.click("#cancel")
        page.wait_for_selector('h1 [data-status="cancelled"]', timeout=TRAINING_TIMEOUT_MS)
        assert api.job(job["id"])["status"] == "cancelled"
        # A running job stops with a last checkpoint, which the page then lists.
        page.locator('#checkpoints tr:has(td:text-is("last"))').wait_for()
        assert page.locator("#cancel").count() == 0
        assert_stayed_local(s.rec)
        assert s.rec.page_errors == []
    finally:
        if api.job(job["id"])["status"] not in ("cancelled", "succeeded", "failed"):
            api.cancel(job["id"])
        api.wait_finished(job["id"])


def test_a_bad_key_is_refused_with_a_message(
    open_session: Callable[[], Session], svc: Any
) -> None:
    s = open_session()
    page = s.page
    log_in(page, "lmf_" + "x" * 40)
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert "invalid or revoked" in banner.inner_text()
    assert page.locator("#key-form").is_visible()
    assert page.evaluate("sessionStorage.getItem('lmforge.apiKey')") is None
    # A good key then works in the same tab.
    page.fill("#api-key", svc.key)
    page.click("#use-key")
    page.locator("#jobs-table:visible, #no-jobs:visible").first.wait_for()
    assert banner.is_hidden()


def test_upload_and_submit_from_the_form_and_a_422_is_shown(
    open_session: Callable[[], Session], svc: Any, api: Api, tmp_path: Path
) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    s = open_session()
    page = s.page
    log_in(page, svc.key)
    page.goto("/#/new")
    page.set_input_files("#upload-file", str(corpus))
    page.fill("#upload-name", "dashboard-upload")
    page.click("#upload")
    page.locator("#upload-message.ok").wait_for()
    uploaded = [d for d in svc.client.get("/v1/datasets").json()["data"]
                if d["name"] == "dashboard-upload"]
    assert len(uploaded) == 1 and uploaded[0]["bytes"] == corpus.stat().st_size
    assert page.input_value("#f-dataset_id") == uploaded[0]["id"]

    # A value the API refuses: its 422 is shown, naming the field, which is marked.
    page.fill("#f-training\\.batch_size", "0")
    page.click("#submit-job")
    message = page.locator("#submit-message p.error").first
    message.wait_for()
    assert "422" in message.inner_text() and "training.batch_size" in message.inner_text()
    assert page.get_attribute("#f-training\\.batch_size", "aria-invalid") == "true"

    # Corrected, the job is created with the form's values and the page follows it.
    for path, value in (("training.batch_size", "4"), ("training.seq_len", "16"),
                        ("training.max_steps", "10"), ("training.eval_interval", "5"),
                        ("training.device", "cpu"), ("model.embed_dim", "16"),
                        ("model.hidden_dim", "32"), ("model.num_layers", "1")):
        page.fill(f"#f-{path.replace('.', chr(92) + '.')}", value)
    page.fill("#f-name", "dashboard-form")
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[-1]
    job = api.job(job_id)
    assert job["name"] == "dashboard-form" and job["spec"]["dataset_id"] == uploaded[0]["id"]
    assert job["spec"]["training"]["max_steps"] == 10
    assert job["spec"]["model"]["hidden_dim"] == 32
    done = api.wait_finished(job_id)
    assert done["status"] == "succeeded", done
    page.wait_for_selector('h1 [data-status="succeeded"]', timeout=TRAINING_TIMEOUT_MS)
    assert_stayed_local(s.rec)
    assert s.rec.page_errors == []


def test_checkpoint_download_and_generated_text_on_the_job_page(
    open_session: Callable[[], Session], svc: Any, api: Api, finished_job: dict[str, Any],
    tmp_path: Path,
) -> None:
    s = open_session()
    page = s.page
    log_in(page, svc.key)
    page.goto(f"/#/jobs/{finished_job['id']}")
    best = next(c for c in api.checkpoints(finished_job["id"]) if c["kind"] == "best")
    button = page.locator(f'button.download[data-checkpoint-id="{best["id"]}"]')
    with page.expect_download() as info:
        button.click()
    saved = tmp_path / "best.safetensors"
    info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == best["sha256"]
    assert info.value.suggested_filename.endswith(".safetensors")

    page.fill("#gen-prompt", "def ")
    page.fill("#gen-tokens", "40")
    page.click("#generate")
    sample = page.locator("#generated pre.generated").first
    sample.wait_for()
    assert sample.inner_text().startswith("def ") and len(sample.inner_text()) > len("def ")
    assert "best checkpoint" in page.inner_text("#generated")
    assert_stayed_local(s.rec)
    assert s.rec.page_errors == []


def test_docs_and_redoc_render_offline(open_session: Callable[[], Session]) -> None:
    s = open_session()
    page = s.page
    page.goto("/docs")
    page.locator(".swagger-ui .opblock-tag").first.wait_for()
    assert page.locator(".swagger-ui .opblock").count() > 10
    assert "/v1/jobs" in page.inner_text(".swagger-ui")
    page.goto("/redoc")
    page.locator("h2", has_text="Upload Dataset").first.wait_for()  # an operation's heading
    assert_stayed_local(s.rec)
    # The only console error: the page's Content-Security-Policy blocking ReDoc's side-menu
    # logo, which its bundle would load from cdn.redoc.ly (app/routes/dashboard.py).
    assert [e for e in s.rec.console_errors if "cdn.redoc.ly/redoc/logo-mini.svg" not in e] == []
    assert s.rec.page_errors == []
