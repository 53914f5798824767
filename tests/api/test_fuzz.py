"""Schemathesis against the API's own OpenAPI document, over real HTTP to a real uvicorn.

``schemathesis run`` (its command line, as a user would run it) sends a bounded number of
generated requests to every operation: valid and invalid ones, in its examples, coverage,
fuzzing and stateful phases, from a fixed seed so that a run is reproducible. With
every check on, every response must not be a 5xx; its status code, content type, headers and
body must be the documented ones; requests the schema forbids must be refused (4xx) and
requests it allows must not be refused as invalid (422) - the schema and the validation agree.

Two exceptions are configured. ``POST /v1/datasets`` is multipart: every part is bytes on
the wire, so a part whose generated value breaks the schema's ``type`` ("name": 1.1) arrives as
valid text and is rightly accepted; the negative cases of that route (a name with control
characters or too long, a missing, empty or non-UTF-8 file, a malformed body) are in
``tests/api/test_hostile.py`` and ``tests/api/test_datasets.py``. And ``POST /v1/jobs`` may
answer 422 to a schema-valid spec, for the cross-field rules JSON Schema cannot state
(``tie_weights`` needs ``embed_dim == hidden_dim``, ``val_fraction + test_fraction < 0.9``, a
validation split or a positive ``val_fraction``, exactly one data source, a dataset that
exists and is large enough, the size and memory limits of the spec as a whole). Each such 422
still names the field.

The app is the real one (a SQLite file in tmp, real storage, real API keys); only the broker
is the recording fake of ``tests/api/conftest.py``. Run with a user key on every operation but
``/v1/keys``, then with an admin key on ``/v1/keys`` without the stateful phase (which could
revoke the key it runs with).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.deps import get_enqueuer
from app.main import create_app
from store import apikeys
from store.settings import Settings
from tests.api.conftest import RecordingEnqueuer
from tests.support.uvicorn_thread import ThreadedServer

# Generated cases per operation and phase (schemathesis' --max-examples), and the seed.
MAX_EXAMPLES = 25
SEED = 12

# Every check is on (schemathesis' default); the two exceptions of the module docstring are set
# per operation (a per-operation setting is ignored when --checks is given on the command line).
CONFIG = """\
[checks]
enabled = true

[[operations]]
include-path = "/v1/jobs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "429"]

[[operations]]
include-path = "/v1/datasets"
include-method = "POST"
checks.negative_data_rejection.enabled = false
"""


@dataclass
class Api:
    url: str
    user_key: str
    admin_key: str
    config: Path


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(
        LMFORGE_HOME=root / "home",
        DATABASE_URL=f"sqlite:///{root / 'api.db'}",
        LMFORGE_MAX_UPLOAD_BYTES=64 * 1024,
        LMFORGE_RATE_LIMIT_PER_MINUTE=0,  # no Redis here: the rate limit is off
    ))
    enqueuer = RecordingEnqueuer()
    app.dependency_overrides[get_enqueuer] = lambda: enqueuer
    config = root / "schemathesis.toml"
    config.write_text(CONFIG)
    with ThreadedServer(app) as server:
        with app.state.session_factory() as session:
            user = apikeys.create_key(session, "fuzzer")
            admin = apikeys.create_key(session, "fuzzadmin", is_admin=True)
            session.commit()
        yield Api(f"http://127.0.0.1:{server.port}", user.key, admin.key, config)


def _schemathesis(api: Api, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color",
           "--config-file", str(api.config),
           "run", f"{api.url}/openapi.json",
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--header", f"Authorization: Bearer {key}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=api.config.parent, stdin=subprocess.DEVNULL)


def test_every_operation_but_keys_conforms_to_the_schema(api: Api) -> None:
    run = _schemathesis(api, api.user_key, "--exclude-path-regex", "^/v1/keys")
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and "generated" in run.stdout


def test_key_routes_conform_to_the_schema(api: Api) -> None:
    run = _schemathesis(api, api.admin_key, "--include-path-regex", "^/v1/keys",
                        "--phases", "examples,coverage,fuzzing")
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
