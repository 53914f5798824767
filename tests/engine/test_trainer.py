from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from core.contract import CorpusTexts, TrainingError
from worker.engine.checkpoint import read_metadata
from worker.engine.model import LSTMLanguageModel
from worker.engine.sample import sample
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec, strip_timing


def test_same_spec_and_seed_give_identical_metrics(small_text: str) -> None:
    spec = make_spec(max_steps=12, model={"dropout": 0.2})
    a, b = RecordingHooks(), RecordingHooks()
    train(spec, CorpusTexts(train=small_text), a)
    train(spec, CorpusTexts(train=small_text), b)
    assert strip_timing(a.rows) == strip_timing(b.rows)
    assert [r.step for r in a.rows] == list(range(1, 13))


def test_resume_after_cancel_reproduces_the_uninterrupted_metrics(small_text: str) -> None:
    # On the CPU: on CUDA, cuDNN draws the dropout between LSTM layers from a state of its own
    # that no generator state restores (docs/benchmarks.md, "GPU"), so a resumed run with
    # dropout is as good but not bit-equal there.
    spec = make_spec(max_steps=40, eval_interval=10, log_interval=5, device="cpu",
                     model={"dropout": 0.3, "num_layers": 2},
                     schedule={"kind": "plateau", "patience": 0},
                     early_stopping={"patience": 10}, top={"test_fraction": 0.1})
    texts = CorpusTexts(train=small_text)
    full = RecordingHooks()
    full_result = train(spec, texts, full)
    cancelled = RecordingHooks(stop_when=lambda rows: bool(rows) and rows[-1].step >= 15)
    first = train(spec, texts, cancelled)
    assert first.stop_reason == "cancelled" and cancelled.last("last").step == 15
    resumed = RecordingHooks()
    result = train(spec, texts, resumed, resume_from=cancelled.last("last").data)
    assert [r.step for r in resumed.rows] == list(range(16, 41))
    assert strip_timing(cancelled.rows + resumed.rows) == strip_timing(full.rows)
    skip = {"duration_s", "train_tokens_per_s"}
    assert {k: v for k, v in result.as_dict().items() if k not in skip} == \
        {k: v for k, v in full_result.as_dict().items() if k not in skip}


def test_resume_from_a_periodic_checkpoint_continues_exactly(small_text: str) -> None:
    spec = make_spec(max_steps=24, checkpoint_interval=8, schedule={"kind": "cosine",
                     "warmup_steps": 5}, optimizer={"name": "sgd", "momentum": 0.9,
                                                     "nesterov": True, "lr": 0.5})
    texts = CorpusTexts(train=small_text)
    full = RecordingHooks()
    train(spec, texts, full)
    periodic = [c for c in full.checkpoints if c.kind == "periodic" and c.step == 16][0]
    resumed = RecordingHooks()
    train(spec, texts, resumed, resume_from=periodic.data)
    assert strip_timing(resumed.rows) == strip_timing(full.rows[16:])


def test_max_steps_stops_with_one_row_per_step(small_text: str) -> None:
    hooks = RecordingHooks()
    res = train(make_spec(max_steps=7, log_interval=3), CorpusTexts(train=small_text), hooks)
    assert res.stop_reason == "max_steps" and res.steps == 7
    assert [r.step for r in hooks.rows] == list(range(1, 8))
    assert hooks.rows[-1].val_loss is not None  # evaluated at the end
    assert [c.kind for c in hooks.checkpoints][-1] == "last"


def test_max_epochs_stops_after_that_many_passes(small_text: str) -> None:
    text = small_text[:6000]  # 5400 train chars: 675 per stream, 42 batches per epoch
    res = train(make_spec(max_steps=1000, max_epochs=1.5), CorpusTexts(train=text),
                RecordingHooks())
    assert res.stop_reason == "max_epochs" and res.steps == math.ceil(1.5 * 42)
    assert res.epochs >= 1.5


def test_max_tokens_stops_at_the_token_budget(small_text: str) -> None:
    res = train(make_spec(max_steps=1000, max_tokens=1000), CorpusTexts(train=small_text),
                RecordingHooks())
    assert res.stop_reason == "max_tokens" and res.steps == math.ceil(1000 / 128)
    assert res.tokens_seen == res.steps * 128


def test_max_runtime_stops_the_run(small_text: str) -> None:
    res = train(make_spec(max_steps=1000, max_runtime_s=1e-6), CorpusTexts(train=small_text),
                RecordingHooks())
    assert res.stop_reason == "max_runtime_s" and res.steps == 1


def test_early_stopping_after_patience_evaluations_without_improvement(small_text: str) -> None:
    spec = make_spec(max_steps=1000, eval_interval=5,
                     early_stopping={"patience": 2, "min_delta": 5.0})
    hooks = RecordingHooks()
    res = train(spec, CorpusTexts(train=small_text), hooks)
    # eval 1 (step 5) sets the best; evals 2 and 3 do not beat it by 5 nats
    assert res.stop_reason == "early_stopping" and res.steps == 15
    assert [r.step for r in hooks.rows if r.val_loss is not None] == [5, 10, 15]


def test_cancel_stops_at_a_flush_and_saves_last(small_text: str) -> None:
    hooks = RecordingHooks(stop_when=lambda rows: len(rows) >= 10)
    res = train(make_spec(max_steps=1000, log_interval=5), CorpusTexts(train=small_text), hooks)
    assert res.stop_reason == "cancelled" and res.steps == 10
    assert hooks.last("last").step == 10


def test_non_finite_loss_fails_and_keeps_the_last_good_checkpoint(
        small_text: str, poison_loss_at: Callable[[int], None]) -> None:
    poison_loss_at(7)
    hooks = RecordingHooks()
    with pytest.raises(TrainingError) as err:
        train(make_spec(max_steps=20, log_interval=5), CorpusTexts(train=small_text), hooks)
    assert err.value.code == "non_finite_loss" and err.value.step == 7
    assert [r.step for r in hooks.rows] == list(range(1, 7))
    assert all(math.isfinite(r.train_loss) for r in hooks.rows)
    last = hooks.last("last")
    assert last.step == 6
    weights = load(last.data)
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_checkpoint_loads_with_plain_safetensors_and_samples(small_text: str, tmp_path) -> None:
    hooks = RecordingHooks()
    train(make_spec(max_steps=10, model={"tie_weights": True, "embed_dim": 32}),
          CorpusTexts(train=small_text), hooks)
    best = hooks.last("best").data
    path = tmp_path / "best.safetensors"
    path.write_bytes(best)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "lmforge.checkpoint.v1"
    cfg = json.loads(meta["model_config"])
    model = LSTMLanguageModel(**cfg)
    model.load_state_dict({k[6:]: v for k, v in tensors.items()}, strict=False)
    assert torch.equal(model.decoder.weight, tensors["model.encoder.weight"])
    text = sample(best, prompt="First", max_new_tokens=20, temperature=0.8, top_k=5, seed=1)
    assert text.startswith("First") and len(text) == 25
    assert text == sample(best, "First", 20, 0.8, 5, seed=1)


def test_markov_chain_validation_loss_reaches_its_entropy_rate() -> None:
    rng = random.Random(0)
    k = 5
    rows = []
    for _ in range(k):
        w = [rng.random() ** 2 for _ in range(k)]
        rows.append([x / sum(w) for x in w])
    # stationary distribution by power iteration; entropy rate H = sum_i pi_i H(P_i) (nats)
    pi = [1.0 / k] * k
    for _ in range(1000):
        pi = [sum(pi[i] * rows[i][j] for i in range(k)) for j in range(k)]
    h = -sum(pi[i] * rows[i][j] * math.log(rows[i][j]) for i in range(k) for j in range(k))
    state, out = 0, []
    for _ in range(60_000):
        state = rng.choices(range(k), weights=rows[state])[0]
        out.append("abcde"[state])
    spec = make_spec(max_steps=300, eval_interval=100, batch_size=16, seq_len=32)
    res = train(spec, CorpusTexts(train="".join(out)), RecordingHooks())
    assert res.best_val_loss is not None
    assert abs(res.best_val_loss - h) / h < 0.05, (res.best_val_loss, h)


def test_pretrained_embeddings_initialise_rows_and_report_coverage(small_text: str) -> None:
    glove = "e " + " ".join(["0.5"] * 16) + "\nt " + " ".join(["-0.5"] * 16) + "\n"
    spec = make_spec(max_steps=2, model={"pretrained_embeddings": {"path": "g.txt",
                                                                   "freeze": True}})
    hooks = RecordingHooks()
    res = train(spec, CorpusTexts(train=small_text, embeddings=glove), hooks)
    assert res.embedding_coverage == pytest.approx(2 / res.vocab_size)
    weights = load(hooks.last("last").data)["model.encoder.weight"]
    assert torch.all(weights[weights[:, 0] == 0.5] == 0.5)  # frozen rows kept their vectors
    assert int((weights[:, 0] == 0.5).sum()) == 1


def test_pretrained_embeddings_of_the_wrong_width_are_invalid_spec(small_text: str) -> None:
    spec = make_spec(model={"pretrained_embeddings": {"path": "g.txt"}})
    with pytest.raises(TrainingError) as err:
        train(spec, CorpusTexts(train=small_text, embeddings="e 1.0 2.0\n"), RecordingHooks())
    assert err.value.code == "invalid_spec" and "2 dimensions" in err.value.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_device_unavailable(small_text: str) -> None:
    with pytest.raises(TrainingError) as err:
        train(make_spec(device="cuda"), CorpusTexts(train=small_text), RecordingHooks())
    assert err.value.code == "device_unavailable"


def test_garbage_resume_bytes_are_invalid_checkpoint(small_text: str) -> None:
    with pytest.raises(TrainingError) as err:
        train(make_spec(), CorpusTexts(train=small_text), RecordingHooks(), resume_from=b"junk")
    assert err.value.code == "invalid_checkpoint"


def test_word_and_bpe_jobs_train_and_test_on_the_best_weights(small_text: str) -> None:
    for tok in ({"kind": "word", "max_vocab": 500}, {"kind": "bpe", "vocab_size": 300}):
        spec = make_spec(max_steps=6, eval_interval=3, batch_size=4, seq_len=8,
                         top={"tokenizer": tok, "test_fraction": 0.1})
        res = train(spec, CorpusTexts(train=small_text), RecordingHooks())
        assert res.test_loss is not None and res.test_bpc is None
        assert res.best_val_loss is not None


def test_resume_from_a_checkpoint_at_the_end_of_the_budget_trains_no_more(
    small_text: str,
) -> None:
    spec = make_spec(max_steps=6, log_interval=3)
    first = RecordingHooks()
    done = train(spec, CorpusTexts(train=small_text), first)
    again = RecordingHooks()
    res = train(spec, CorpusTexts(train=small_text), again, resume_from=first.last("last").data)
    assert (done.steps, res.steps, res.stop_reason) == (6, 6, "max_steps")
    assert again.rows == []


def test_checkpoint_header_is_strict_json_before_any_validation(small_text: str) -> None:
    # A periodic checkpoint before the first evaluation: no best loss yet (infinite in memory).
    spec = make_spec(max_steps=4, eval_interval=100, checkpoint_interval=2,
                     schedule={"kind": "plateau"}, early_stopping={"patience": 2})
    hooks = RecordingHooks()
    train(spec, CorpusTexts(train=small_text), hooks)
    blob = [c for c in hooks.checkpoints if c.kind == "periodic"][0].data
    state = json.loads(read_metadata(blob)["trainer_state"], parse_constant=_refuse)
    assert state["best_val_loss"] is None
    assert state["schedule"]["plateau_best"] is None
    assert state["early_stopping"]["best"] is None
    resumed = RecordingHooks()
    train(spec, CorpusTexts(train=small_text), resumed, resume_from=blob)
    assert [r.step for r in resumed.rows] == [3, 4]


def _refuse(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")

