"""bench/scale_out.py at a tiny size, through its main function, against the real stack it
starts (Redis, SQLite, the API and one ``lmforge worker``): the output's structure, every job
succeeded, the worker's pool process preloaded the engine before the first job
(worker.preload), and the latency breakdown adds up to the measured total. No wall-clock
thresholds: the numbers themselves are the benchmark's, not the test's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale_out",
                                                  ROOT / "bench" / "scale_out.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_scale_out_benchmark_runs_and_its_breakdown_adds_up(
        bench: ModuleType, tmp_path: Path) -> None:
    out_file = tmp_path / "scale_out.json"
    out = bench.main(["--workers", "1", "--jobs", "3", "--idle-jobs", "2", "--steps", "2",
                      "--backend", "sqlite", "--settle", "0", "--out", str(out_file)])
    assert json.loads(out_file.read_text(encoding="utf-8")) == json.loads(json.dumps(out))
    assert out["machine"]["nproc"] >= 1 and len(out["machine"]["load_average_at_end"]) == 3
    assert out["settings"]["preload"] == "on"
    (stack,) = out["stacks"]
    assert stack["workers"] == 1 and stack["failed"] == 0
    # the pool process logged its preload (worker.preload) before the first job was sent
    (took,) = stack["preload_s"]
    assert took is not None and took > 0
    tp = stack["throughput"]
    assert tp["jobs"] == 3 and tp["jobs_per_worker"] == {"0": 3} and tp["jobs_per_hour"] > 0
    jobs = [*stack["cold"]["jobs"], *stack["idle"]["jobs"], *tp["times"]]
    assert len(jobs) == 1 + 2 + 3 and {j["status"] for j in jobs} == {"succeeded"}
    for j in jobs:
        ph = j["phases"]
        assert j["submitted"] <= j["claimed"] <= j["first_step"] <= j["terminal"]
        assert j["cache"] in ("prepared", "hit")
        # the six phases cover submission -> first step exactly (each rounded to 0.1 ms)
        parts = sum(ph[k] for k in bench.PHASES)
        assert parts == pytest.approx(ph["submit_to_first_step"], abs=1e-3)
        assert ph["first_step"] >= 0 and ph["data"] >= 0
    # the first job prepared the token cache; the later ones reuse it
    assert stack["cold"]["jobs"][0]["cache"] == "prepared"
    assert {j["cache"] for j in stack["idle"]["jobs"]} == {"hit"}
    idle = stack["idle"]["phases"]
    assert idle["submit_to_first_step"]["count"] == 2
