"""The text classifier (``task: "classify"``, worker/engine/classifier.py): it learns, its
metrics are scikit-learn's, padding is invisible to it, freezing, class weights, init_from
and resume do what they say."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

from core.classification import (
    ClassifyStepMetrics,
    balanced_weights,
    classification_metrics,
    stratified_split,
)
from core.contract import CheckpointBlob, CorpusTexts, TrainingError
from core.spec import JobSpec
from worker.engine.checkpoint import load_checkpoint
from worker.engine.classifier import (
    ClassifyData,
    LSTMClassifier,
    batch_indices,
    classify_texts,
    load_classifier,
    pad_batch,
    prepare,
    split_examples,
    train_classifier,
    weighted_cross_entropy,
)
from worker.engine.model import ModelConfig
from worker.engine.trainer import train

from .conftest import RecordingHooks, strip_timing

MARKERS = {"blue": "sky", "green": "leaf", "red": "apple"}


def synthetic(n: int, seed: int = 0, weights: Sequence[float] = (1, 1, 1)) -> list[
        tuple[str, str]]:
    """Sentences of 3-12 random filler words with one marker word inserted at a random
    place; the label is the marker's colour, so the best accuracy is 1."""
    r = random.Random(seed)
    filler = [f"w{i}" for i in range(50)]
    out = []
    for _ in range(n):
        label = r.choices(sorted(MARKERS), weights=weights)[0]
        words = [r.choice(filler) for _ in range(r.randint(3, 12))]
        words.insert(r.randrange(len(words) + 1), MARKERS[label])
        out.append((" ".join(words), label))
    return out


CLASSIFY_TIMING = ("examples_per_s", "tokens_per_s", "elapsed_s")


def untimed(rows: Sequence[ClassifyStepMetrics]) -> list[dict[str, Any]]:
    return strip_timing(rows, CLASSIFY_TIMING)


def cspec(classify: dict[str, Any] | None = None, **training: Any) -> JobSpec:
    """A small word-level classification spec on the CPU (exact resume is a CPU property:
    cuDNN's inter-layer dropout state is not restorable); ``model``/``optimizer``/
    ``schedule``/``top`` keys override those sections / top-level fields."""
    model = training.pop("model", {})
    optimizer = training.pop("optimizer", {})
    schedule = training.pop("schedule", {})
    top = training.pop("top", {})
    t = {"batch_size": 16, "max_steps": 60, "eval_interval": 20, "log_interval": 10,
         "num_threads": 1, "device": "cpu", **training}
    return JobSpec.model_validate({
        "dataset_id": "ds_test", "task": "classify", "tokenizer": {"kind": "word"},
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 1, **model},
        "optimizer": {"lr": 0.01, **optimizer}, "schedule": schedule,
        "classify": classify or {},
        "training": t, **top,
    })


def encoder_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(("encoder.", "lstm."))}


def ckpt_state(blob: CheckpointBlob) -> dict[str, torch.Tensor]:
    return load_checkpoint(blob.data).model_state


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_a_synthetic_task_is_learned_to_high_accuracy(pooling: str) -> None:
    spec = cspec({"pooling": pooling}, top={"test_fraction": 0.2})
    hooks = RecordingHooks()
    res = train_classifier(spec, ClassifyData(synthetic(600)), hooks)
    assert res.stop_reason == "max_steps" and res.steps == 60
    assert res.labels == ["blue", "green", "red"]
    n = res.num_examples  # per label: round(n_label * fraction)
    assert sum(n.values()) == 600 and abs(n["validation"] - 60) <= 2 and abs(n["test"] - 120) <= 2
    assert res.test_accuracy is not None and res.test_accuracy >= 0.95
    assert res.test_macro_f1 is not None and res.test_macro_f1 >= 0.95
    assert res.best_val_macro_f1 is not None and res.best_val_macro_f1 >= 0.95
    cm = res.confusion_matrix
    assert cm is not None and sum(map(sum, cm)) == n["validation"]  # of the best checkpoint
    assert [r.step for r in hooks.rows] == list(range(1, 61))
    evaluated = [r for r in hooks.rows if r.val_loss is not None]
    assert [r.step for r in evaluated] == [20, 40, 60]
    assert all(r.val_per_class is not None and set(r.val_per_class) == set(MARKERS)
               for r in evaluated)
    assert {c.kind for c in hooks.checkpoints} == {"best", "last"}
    assert hooks.last("best").step == res.best_step


def test_best_checkpoint_metrics_are_scikit_learns_on_its_predictions() -> None:
    spec = cspec(max_steps=20, eval_interval=10, top={"test_fraction": 0.2})
    data = ClassifyData(synthetic(300, seed=3))
    hooks = RecordingHooks()
    res = train_classifier(spec, data, hooks)
    _, val, test = split_examples(spec, data)
    assert test is not None
    clf = load_classifier(hooks.last("best").data)
    for split, acc, macro, per_class, cm in [
        (val, res.best_val_accuracy, res.best_val_macro_f1, res.best_val_per_class,
         res.confusion_matrix),
        (test, res.test_accuracy, res.test_macro_f1, res.test_per_class,
         res.test_confusion_matrix),
    ]:
        y = [label for _, label in split]
        pred = [o["label"] for o in clf.classify([t for t, _ in split])]
        assert acc == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert macro == pytest.approx(f1_score(y, pred, average="macro", labels=res.labels,
                                               zero_division=0), abs=1e-12)
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=res.labels,
                                                     zero_division=0)
        assert per_class is not None
        for i, label in enumerate(res.labels):
            got = per_class[label]
            assert (got["precision"], got["recall"], got["f1"], got["support"]) == \
                pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-12)
        assert cm == sk_confusion(y, pred, labels=res.labels).tolist()


def test_metric_functions_match_scikit_learn_including_never_predicted_classes() -> None:
    r = random.Random(7)
    labels = ["a", "b", "c", "d"]
    for _ in range(20):
        n = r.randint(1, 40)
        y = [r.randrange(4) for _ in range(n)]
        pred = [r.choice([0, 1, 1, 2]) for _ in range(n)]  # "d" never predicted
        m = classification_metrics(y, pred, labels, loss=0.0)
        p, rec, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3],
                                                       zero_division=0)
        assert m.accuracy == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert m.macro_f1 == pytest.approx(f1_score(y, pred, labels=[0, 1, 2, 3],
                                                    average="macro", zero_division=0),
                                           abs=1e-12)
        for i, label in enumerate(labels):
            c = m.per_class[label]
            assert (c.precision, c.recall, c.f1, c.support) == \
                pytest.approx((p[i], rec[i], f[i], s[i]), abs=1e-12)
        assert m.confusion == sk_confusion(y, pred, labels=[0, 1, 2, 3]).tolist()


def test_balanced_weights_are_scikit_learns() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    y = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    expected = compute_class_weight("balanced", classes=np.array(["a", "b", "c"]), y=y)
    assert balanced_weights(["a", "b", "c"], y) == pytest.approx(list(expected))


def test_the_split_is_stratified_deterministic_and_disjoint() -> None:
    data = synthetic(500, seed=1, weights=(8, 1, 1))
    train_a, val_a, test_a = stratified_split(data, 0.1, 0.2)
    assert stratified_split(data, 0.1, 0.2) == (train_a, val_a, test_a)
    assert sorted(train_a + val_a + test_a) == sorted(data)  # disjoint, nothing lost
    for label in MARKERS:
        n = sum(1 for _, y in data if y == label)
        assert sum(1 for _, y in val_a if y == label) == round(n * 0.1)
        assert sum(1 for _, y in test_a if y == label) == round(n * 0.2)
    # a label with a single example stays in training
    tiny = [("x", "rare"), *data[:20]]
    tr, va, te = stratified_split(tiny, 0.1, 0.1)
    assert ("x", "rare") in tr


# -- padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_padding_does_not_change_a_prediction(pooling: str) -> None:
    torch.manual_seed(0)
    model = LSTMClassifier(ModelConfig(30, 8, 12, 2, 0.0, False), 3, pooling).eval()
    short = [5, 6, 7]
    batch = [short, list(range(1, 20)), [9, 9]]
    with torch.no_grad():
        alone = model(*pad_batch([short]))
        ids, lengths = pad_batch(batch)
        padded = model(ids, lengths)
        ids_garbage = ids.clone()
        ids_garbage[0, 3:] = 29  # other ids in the padding positions: never read
        garbage = model(ids_garbage, lengths)
    assert torch.allclose(alone[0], padded[0], atol=1e-6, rtol=0)
    assert torch.equal(padded, garbage)


# -- freezing, class weights, init_from ------------------------------------------------------


def test_freezing_keeps_the_encoder_for_n_steps_then_trains_it() -> None:
    spec = cspec({"freeze_encoder_steps": 5}, max_steps=8, checkpoint_interval=1,
                 checkpoint_every_s=None, keep_checkpoints=100)
    data = ClassifyData(synthetic(200))
    initial = prepare(spec, data).model.state_dict()
    hooks = RecordingHooks()
    train_classifier(spec, data, hooks)
    for step in range(1, 6):
        state = ckpt_state(hooks.at("periodic", step))
        assert same(encoder_state(state), encoder_state(initial)), step
        assert not torch.equal(state["head.weight"], initial["head.weight"])
    moved = encoder_state(ckpt_state(hooks.at("periodic", 6)))
    assert not same(moved, encoder_state(initial))
    assert [r.encoder_frozen for r in hooks.rows] == [True] * 5 + [False] * 3


def test_class_weights_change_the_loss_as_computed_by_hand() -> None:
    data = ClassifyData(synthetic(200, weights=(6, 1, 1)))
    weights = {"green": 3.0, "red": 0.5}
    spec = cspec({"class_weights": weights}, max_steps=1, eval_interval=1)
    plain = cspec(max_steps=1, eval_interval=1)
    hooks, plain_hooks = RecordingHooks(), RecordingHooks()
    res = train_classifier(spec, data, hooks)
    train_classifier(plain, data, plain_hooks)
    assert res.class_weights == [1.0, 3.0, 0.5]  # blue, green, red
    # By hand: the initial model's logits on step 1's batch, -log softmax at the label,
    # weighted by the label's weight, over the sum of the weights.
    p = prepare(spec, data)
    idx = batch_indices(len(p.train), 16, 0, 1)
    ids, lengths = pad_batch([p.train.ids[i] for i in idx])
    y = [p.train.y[i] for i in idx]
    with torch.no_grad():
        logp = torch.log_softmax(p.model.train()(ids, lengths).double(), dim=-1)
    w = [[1.0, 3.0, 0.5][c] for c in y]
    by_hand = sum(-wi * float(logp[i, c]) for i, (wi, c) in enumerate(zip(w, y, strict=True)))
    by_hand /= sum(w)
    unweighted = sum(-float(logp[i, c]) for i, c in enumerate(y)) / len(y)
    assert hooks.rows[0].train_loss == pytest.approx(by_hand, rel=1e-5)
    assert abs(by_hand - unweighted) > 1e-3
    # the unweighted run starts from the log-prior head bias instead: a different model
    assert plain_hooks.rows[0].train_loss != pytest.approx(by_hand, rel=1e-5)
    logits = torch.randn(5, 3)
    yy = torch.tensor([0, 1, 2, 1, 1])
    ww = torch.tensor([1.0, 3.0, 0.5])
    nll = -torch.log_softmax(logits, -1)[torch.arange(5), yy]
    assert float(weighted_cross_entropy(logits, yy, ww)) == pytest.approx(
        float((ww[yy] * nll).sum() / ww[yy].sum()), rel=1e-6)
    assert float(weighted_cross_entropy(logits, yy, None)) == pytest.approx(
        float(F.cross_entropy(logits, yy)), rel=1e-6)


def test_balanced_class_weights_are_reported() -> None:
    data = ClassifyData(synthetic(200, weights=(6, 1, 1)))
    res = train_classifier(cspec({"class_weights": "balanced"}, max_steps=2, eval_interval=2),
                           data, RecordingHooks())
    assert res.class_weights is not None
    train, _, _ = split_examples(cspec(), data)
    assert res.class_weights == pytest.approx(
        balanced_weights(res.labels, [y for _, y in train]))


def test_init_from_copies_the_language_models_encoder_exactly() -> None:
    data = synthetic(300)
    lm_spec = JobSpec.model_validate({
        "dataset": {"builtin": "python-docs"}, "tokenizer": {"kind": "word"},
        "model": {"embed_dim": 16, "hidden_dim": 32, "num_layers": 2},
        "training": {"batch_size": 8, "seq_len": 16, "max_steps": 10, "eval_interval": 5,
                     "num_threads": 1}})
    lm_hooks = RecordingHooks()
    train(lm_spec, CorpusTexts(train="\n".join(t for t, _ in data)), lm_hooks)
    lm = load_checkpoint(lm_hooks.last("best").data)
    spec = cspec({"freeze_encoder_steps": 4}, max_steps=4, eval_interval=2,
                 model={"num_layers": 2}, top={"init_from": {"job_id": "job_lm"}})
    hooks = RecordingHooks()
    res = train_classifier(spec, ClassifyData(data), hooks,
                           init_from=lm_hooks.last("best").data)
    final = load_checkpoint(hooks.last("last").data)
    assert final.tokenizer.to_json() == lm.tokenizer.to_json()
    assert same(encoder_state(final.model_state), encoder_state(lm.model_state))
    assert set(encoder_state(final.model_state)) == {
        "encoder.weight", *(f"lstm.{k}_l{i}" for i in (0, 1)
                            for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))}
    assert res.init_from == {"job_id": "job_lm", "checkpoint": "best"}
    # other dimensions than the checkpoint's are refused
    wide = cspec(model={"num_layers": 2, "hidden_dim": 64},
                 top={"init_from": {"job_id": "job_lm"}})
    with pytest.raises(TrainingError) as err:
        train_classifier(wide, ClassifyData(data), RecordingHooks(),
                         init_from=lm_hooks.last("best").data)
    assert err.value.code == "invalid_spec"


def test_pretrained_embeddings_initialise_the_classifier() -> None:
    glove = "sky " + " ".join(["0.5"] * 16) + "\napple " + " ".join(["-0.25"] * 16) + "\n"
    spec = cspec(model={"pretrained_embeddings": {"path": "glove.txt", "freeze": True}},
                 max_steps=3, eval_interval=3)
    data = ClassifyData(synthetic(100), embeddings=glove)
    hooks = RecordingHooks()
    res = train_classifier(spec, data, hooks)
    tok = load_checkpoint(hooks.last("last").data).tokenizer
    emb = ckpt_state(hooks.last("last"))["encoder.weight"]
    sky = [i for i in range(tok.vocab_size) if tok.id_to_token(i) == "sky"][0]
    assert torch.equal(emb[sky], torch.full((16,), 0.5))  # frozen: still the vectors
    assert res.embedding_coverage == pytest.approx(2 / tok.vocab_size)


# -- resume, cancel, errors, inference ---------------------------------------------------------


def test_resume_after_cancel_reproduces_the_uninterrupted_run() -> None:
    spec = cspec({"freeze_encoder_steps": 7, "class_weights": "balanced"}, max_steps=40,
                 eval_interval=10, log_interval=5, model={"dropout": 0.3, "num_layers": 2},
                 early_stopping={"patience": 10}, top={"test_fraction": 0.2},
                 optimizer={"name": "adamw", "weight_decay": 0.01},
                 schedule={"kind": "plateau"})
    data = ClassifyData(synthetic(300, weights=(3, 1, 1)))
    full = RecordingHooks()
    full_res = train_classifier(spec, data, full)
    cancelled = RecordingHooks(stop_when=lambda rows: bool(rows) and rows[-1].step >= 15)
    first = train_classifier(spec, data, cancelled)
    assert first.stop_reason == "cancelled" and cancelled.last("last").step == 15
    resumed = RecordingHooks()
    res = train_classifier(spec, data, resumed, resume_from=cancelled.last("last").data)
    assert [r.step for r in resumed.rows] == list(range(16, 41))
    assert untimed(cancelled.rows + resumed.rows) == untimed(full.rows)
    skip = {"duration_s", "train_examples_per_s"}
    assert {k: v for k, v in res.as_dict().items() if k not in skip} == \
        {k: v for k, v in full_res.as_dict().items() if k not in skip}


def test_resume_from_a_periodic_checkpoint_continues_exactly() -> None:
    spec = cspec(max_steps=30, checkpoint_interval=12, eval_interval=6,
                 model={"dropout": 0.2}, top={"test_fraction": 0.1})
    data = ClassifyData(synthetic(250))
    full = RecordingHooks()
    full_res = train_classifier(spec, data, full)
    resumed = RecordingHooks()
    res = train_classifier(spec, data, resumed, resume_from=full.at("periodic", 12).data)
    assert untimed(resumed.rows) == untimed(full.rows[12:])
    assert res.test_accuracy == full_res.test_accuracy
    assert res.confusion_matrix == full_res.confusion_matrix


def test_a_cancel_during_validation_is_finished_by_the_resumed_run() -> None:
    spec = cspec(max_steps=12, eval_interval=6, log_interval=3)
    data = ClassifyData(synthetic(200))
    full = RecordingHooks()
    train_classifier(spec, data, full)
    polls = {"n": 0}

    def stop(rows: list[ClassifyStepMetrics]) -> bool:  # inside step 6's validation
        if rows and rows[-1].step >= 3 and len(rows) < 6:
            polls["n"] += 1
        return polls["n"] > 4

    cut = RecordingHooks(stop_when=stop)
    assert train_classifier(spec, data, cut).stop_reason == "cancelled"
    assert cut.last("last").step == 6 and cut.rows[-1].val_loss is None
    resumed = RecordingHooks()
    train_classifier(spec, data, resumed, resume_from=cut.last("last").data)
    assert untimed(resumed.rows) == untimed(full.rows[5:])


def test_bad_labelled_data_is_a_dataset_error() -> None:
    one_label = [(f"w{i} sky", "blue") for i in range(50)]
    with pytest.raises(TrainingError) as err:
        train_classifier(cspec(), ClassifyData(one_label), RecordingHooks())
    assert err.value.code == "dataset_error"
    with pytest.raises(TrainingError) as err:
        train_classifier(cspec(), ClassifyData(synthetic(100),
                                               validation=[("sky", "purple")]), RecordingHooks())
    assert err.value.code == "dataset_error" and "purple" in err.value.message


def test_classify_texts_gives_labels_and_probabilities() -> None:
    hooks = RecordingHooks()
    train_classifier(cspec(), ClassifyData(synthetic(400)), hooks)
    blob = hooks.last("best").data
    out = classify_texts(blob, ["w1 w2 sky w3", "apple w9", "", "leaf " * 1000])
    assert [o["label"] for o in out[:2]] == ["blue", "red"]
    for o in out:
        assert set(o["probabilities"]) == set(MARKERS)
        assert math.isclose(sum(o["probabilities"].values()), 1.0, rel_tol=1e-5)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
    assert classify_texts(load_classifier(blob), ["apple"]) == classify_texts(
        load_checkpoint(blob), ["apple"])


def test_a_language_models_checkpoint_is_not_a_classifier(small_text: str) -> None:
    from .conftest import make_spec

    hooks = RecordingHooks()
    train(make_spec(max_steps=2, eval_interval=2), CorpusTexts(train=small_text), hooks)
    with pytest.raises(TrainingError) as err:
        classify_texts(hooks.last("best").data, ["hello"])
    assert err.value.code == "invalid_checkpoint"


def test_the_language_model_engine_refuses_a_classify_spec() -> None:
    with pytest.raises(TrainingError) as err:
        train(cspec(), CorpusTexts(train="sky w1\n" * 100), RecordingHooks())
    assert err.value.code == "invalid_spec" and "classify" in err.value.message
