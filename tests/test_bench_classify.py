"""bench/classify.py's synthetic task at a tiny budget, through its main function: the
output's structure, the synthetic data's construction and its exactly known optimum."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_classify", ROOT / "bench" / "classify.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_order_rule_and_the_texts_follow_the_task(bench: ModuleType) -> None:
    assert bench.order_rule("w1 alpha w2 w3 omega w4") == "alpha_first"
    assert bench.order_rule("w1 omega w2 w3 alpha w4") == "omega_first"
    examples, flipped = bench.synthetic_split(2000, 0.25, seed=3)
    for text, _ in examples:
        words = text.split()
        assert words.count("alpha") == 1 and words.count("omega") == 1
        i, j = sorted((words.index("alpha"), words.index("omega")))
        assert i >= 1 and j <= len(words) - 2 and j - i >= 3  # no end, >= 2 fillers between
        assert all(w in bench.FILLERS for w in words if w not in ("alpha", "omega"))
    # a label disagrees with the rule exactly when it was flipped
    assert [bench.order_rule(t) != y for t, y in examples] == flipped
    assert 0.2 < sum(flipped) / len(flipped) < 0.3
    firsts = sum(bench.order_rule(t) == "alpha_first" for t, _ in examples) / len(examples)
    assert 0.45 < firsts < 0.55
    assert bench.synthetic_split(50, 0.25, seed=3) == bench.synthetic_split(50, 0.25, seed=3)


def test_the_synthetic_benchmark_reports_the_optimum_and_both_models(
        bench: ModuleType, tmp_path: Path) -> None:
    out_file = tmp_path / "classify.json"
    args = ["--tasks", "synthetic", "--flip", "0.2", "--syn-train", "1200", "--syn-val", "300",
            "--syn-test", "600", "--syn-steps", "300", "--syn-seeds", "1", "--syn-embed-dim", "16",
            "--syn-hidden-dim", "32", "--threads", "1", "--baseline-c", "1", "4",
            "--json", str(out_file)]
    out = bench.main(args)
    assert json.loads(out_file.read_text(encoding="utf-8")) == json.loads(json.dumps(out))
    assert "sst2" not in out and out["settings"]["flip"] == 0.2
    syn = out["synthetic"]
    assert syn["num_examples"] == {"train": 1200, "validation": 300, "test": 600}
    # the optimum: 1 - flip rate in expectation; on the drawn sets, the unflipped share
    assert syn["optimum"]["expected"] == pytest.approx(0.8)
    for name, seed, n in (("validation", 1, 300), ("test", 2, 600)):
        _, flipped = bench.synthetic_split(n, 0.2, seed=seed)
        assert syn["optimum"][name] == pytest.approx(1 - sum(flipped) / n)
    base = syn["baseline"]
    assert base["C"] in (1.0, 4.0) and [r["C"] for r in base["grid"]] == [1.0, 4.0]
    # bags of uni/bigrams cannot see the order of two words that are never adjacent
    assert 0.35 < base["test_accuracy"] < 0.65
    lstm = syn["lstm"]
    (run,) = lstm["runs"]
    assert run["steps"] == 300 and run["labels"] == ["alpha_first", "omega_first"]
    assert sum(map(sum, run["test_confusion_matrix"])) == 600
    assert lstm["test_accuracy"]["values"] == [run["test_accuracy"]]
    assert lstm["test_accuracy"]["std"] == 0.0
    # no classifier beats the Bayes rule by more than luck on the flipped labels; the LSTM
    # learns the order (seed 0, one thread: 0.76 on the noisy labels, 0.92 agreement with
    # the rule after 300 steps; the thresholds leave a wide margin)
    assert run["test_accuracy"] <= syn["optimum"]["test"] + 0.05
    assert run["test_accuracy"] > 0.65 and run["rule_agreement"] > 0.8
