"""Export (worker.engine.export) and the standalone loader (lmforge.load) on real checkpoints
of tiny trained models: char (2 layers, tied weights, dropout), word and byte-level BPE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

import lmforge
from core.contract import CorpusTexts, TrainingError
from lmforge.loader import LoadedModel
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.export import (
    MODEL_FORMAT,
    export_checkpoint,
    to_onnx,
    to_safetensors,
)
from worker.engine.generate import score as engine_score
from worker.engine.sample import sample
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec

REPO = Path(__file__).resolve().parents[2]

KINDS = {
    "char": make_spec(max_steps=8, eval_interval=4, model={
        "num_layers": 2, "embed_dim": 32, "hidden_dim": 32, "tie_weights": True,
        "dropout": 0.1}),
    "word": make_spec(max_steps=6, eval_interval=3, seq_len=8,
                      top={"tokenizer": {"kind": "word", "max_vocab": 500}}),
    "bpe": make_spec(max_steps=6, eval_interval=3,
                     top={"tokenizer": {"kind": "bpe", "vocab_size": 300}}),
}


@pytest.fixture(scope="module")
def checkpoints(small_text: str) -> dict[str, dict[str, bytes]]:
    """kind -> {"best": bytes, "last": bytes} of a short real training run."""
    out = {}
    for kind, spec in KINDS.items():
        hooks = RecordingHooks()
        train(spec, CorpusTexts(train=small_text), hooks)
        out[kind] = {"best": hooks.last("best").data, "last": hooks.last("last").data}
    return out


def _engine_logits(ckpt_bytes: bytes, ids: torch.Tensor,
                   state: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    model = build_model_from_checkpoint(load_checkpoint(ckpt_bytes)).eval()
    with torch.no_grad():
        return model(ids, state)


# -- safetensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_safetensors_export_holds_only_the_weights_config_and_tokenizer(
        checkpoints: dict[str, dict[str, bytes]], kind: str, tmp_path: Path) -> None:
    data = checkpoints[kind]["last"]  # a resumable checkpoint: optimizer, rng, state, best.*
    ckpt = load_checkpoint(data)
    path = tmp_path / "model.safetensors"
    path.write_bytes(export_checkpoint(data, "safetensors"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {k for k in ckpt.model_state if not (ckpt.model_config.tie_weights
                                                    and k == "decoder.weight")}
    assert set(tensors) == expected  # no optim.*, rng.*, state.*, best.*
    for k, v in tensors.items():
        assert v.dtype == torch.float32 and torch.equal(v, ckpt.model_state[k])
    assert meta["format"] == MODEL_FORMAT
    assert json.loads(meta["model_config"]) == ckpt.model_config.as_dict()
    assert json.loads(meta["tokenizer"]) == json.loads(ckpt.tokenizer.to_json())
    assert meta["checkpoint_kind"] == "last" and int(meta["step"]) == ckpt.trainer_state["step"]
    assert set(meta) == {"format", "model_config", "tokenizer", "checkpoint_kind", "step"}


def test_export_refuses_an_unknown_format_and_a_file_that_is_not_a_checkpoint(
        checkpoints: dict[str, dict[str, bytes]]) -> None:
    with pytest.raises(ValueError, match="unknown export format 'pt'"):
        export_checkpoint(checkpoints["char"]["best"], "pt")
    with pytest.raises(TrainingError) as err:
        export_checkpoint(b"not a checkpoint at all", "onnx")
    assert err.value.code == "invalid_checkpoint"


# -- ONNX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_onnx_runtime_gives_the_pytorch_logits_and_state(
        checkpoints: dict[str, dict[str, bytes]], kind: str) -> None:
    data = checkpoints[kind]["best"]
    ckpt = load_checkpoint(data)
    cfg = ckpt.model_config
    proto = onnx.load_from_string(to_onnx(ckpt))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["format"] == MODEL_FORMAT
    assert json.loads(meta["tokenizer"]) == json.loads(ckpt.tokenizer.to_json())
    assert json.loads(meta["model_config"]) == cfg.as_dict()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes == {"input_ids": ["batch", "seq_len"],
                      "h0": [cfg.num_layers, "batch", cfg.hidden_dim],
                      "c0": [cfg.num_layers, "batch", cfg.hidden_dim]}
    assert [o.name for o in sess.get_outputs()] == ["logits", "h", "c"]
    assert sess.get_outputs()[0].shape == ["batch", "seq_len", cfg.vocab_size]
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(1, 1), (3, 7), (5, 40), (2, 129)]:
        ids = torch.randint(0, cfg.vocab_size, (batch, 2 * length), generator=gen)
        zeros = torch.zeros(cfg.num_layers, batch, cfg.hidden_dim)
        h, c = zeros.numpy(), zeros.numpy()
        state = None
        for chunk in (ids[:, :length], ids[:, length:]):  # the second from the carried state
            want, state = _engine_logits(data, chunk, state)
            logits, h, c = sess.run(None, {"input_ids": chunk.numpy(), "h0": h, "c0": c})
            assert logits.shape == (batch, length, cfg.vocab_size)
            np.testing.assert_allclose(logits, want.numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(h, state[0].numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(c, state[1].numpy(), atol=1e-4, rtol=0)


# -- the loader -------------------------------------------------------------------------------


def _load(data: bytes, tmp_path: Path, name: str) -> LoadedModel:
    path = tmp_path / name
    path.write_bytes(data)
    return lmforge.load(path)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loaded_model_gives_the_engine_logits_from_an_export_and_a_checkpoint(
        checkpoints: dict[str, dict[str, bytes]], kind: str, tmp_path: Path) -> None:
    data = checkpoints[kind]["last"]
    ckpt = load_checkpoint(data)
    exported = _load(to_safetensors(ckpt), tmp_path, "model.safetensors")
    raw = _load(data, tmp_path, "checkpoint.safetensors")
    ids = torch.randint(0, ckpt.model_config.vocab_size, (3, 50),
                        generator=torch.Generator().manual_seed(1))
    want, (h, c) = _engine_logits(data, ids)
    for lm in (exported, raw):
        assert not lm.model.training
        with torch.no_grad():
            got, (gh, gc) = lm.model(ids)
        assert (got - want).abs().max() <= 1e-6
        assert (gh - h).abs().max() <= 1e-6 and (gc - c).abs().max() <= 1e-6
        assert lm.config == ckpt.model_config.as_dict()
    if ckpt.model_config.tie_weights:
        assert exported.model.decoder.weight is exported.model.encoder.weight


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loaded_tokenizer_encodes_and_decodes_as_the_engine(
        checkpoints: dict[str, dict[str, bytes]], kind: str, tmp_path: Path,
        small_text: str) -> None:
    ckpt = load_checkpoint(checkpoints[kind]["best"])
    lm = _load(to_safetensors(ckpt), tmp_path, "model.safetensors")
    text = small_text[1000:3000] + "\nunseen: \u00e9\u4e2d\U0001f600 zyzzyva\r\nend"
    ids = lm.tokenizer.encode(text)
    assert ids == ckpt.tokenizer.encode(text)
    assert lm.tokenizer.decode(ids) == ckpt.tokenizer.decode(ids)
    assert lm.tokenizer.vocab_size == ckpt.tokenizer.vocab_size == ckpt.model_config.vocab_size


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("prompt", "temperature", "top_k", "top_p", "seed"), [
    ("First Citizen", 0.8, 5, None, 3), ("", 1.0, None, None, 0), ("Speak", 0.0, None, None, 1),
    ("Speak \u00e9\u4e2d", 1.5, None, 0.9, 7), ("MENENIUS", 2.0, 50, 0.95, 11),
])
def test_generate_gives_the_text_of_the_engine_sampler(
        checkpoints: dict[str, dict[str, bytes]], kind: str, tmp_path: Path, prompt: str,
        temperature: float, top_k: int | None, top_p: float | None, seed: int) -> None:
    data = checkpoints[kind]["best"]
    lm = _load(to_safetensors(load_checkpoint(data)), tmp_path, "model.safetensors")
    got = lm.generate(prompt, max_new_tokens=30, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed)
    assert prompt + got == sample(data, prompt, 30, temperature, top_k, seed, top_p=top_p)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_score_is_the_engine_score(checkpoints: dict[str, dict[str, bytes]], kind: str,
                                   tmp_path: Path, small_text: str) -> None:
    data = checkpoints[kind]["best"]
    ckpt = load_checkpoint(data)
    lm = _load(to_safetensors(ckpt), tmp_path, "model.safetensors")
    text = small_text[5000:5400] + " \u00e9\u4e2d"
    got = lm.score(text)
    want = engine_score(build_model_from_checkpoint(ckpt), ckpt.tokenizer, text)
    assert got["num_tokens"] == want.num_tokens == len(ckpt.tokenizer.encode(text)) - 1
    assert got["loss"] == pytest.approx(want.loss, abs=1e-6)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-6)
    assert (got["bpc"] is None) == (want.bpc is None) == (kind != "char")
    if want.bpc is not None:
        assert got["bpc"] == pytest.approx(want.bpc, abs=1e-6)
    np.testing.assert_allclose(got["per_token"], [t.loss for t in want.per_token], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        lm.score("")


def test_load_refuses_a_safetensors_file_of_another_kind(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an LMForge model: its format is 'pt'"):
        lmforge.load(path)


_BLOCKED = """
import importlib.abc, sys
BLOCKED = {"app", "store", "core", "worker", "pydantic", "pydantic_settings", "fastapi",
           "sqlalchemy", "celery", "onnx", "onnxruntime"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Refuse())
import lmforge
lm = lmforge.load(sys.argv[1])
text = lm.generate("First", max_new_tokens=20, temperature=0.8, top_k=5, seed=2)
score = lm.score("First Citizen:")
import json
print(json.dumps({"text": text, "loss": score["loss"],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_loader_needs_only_torch_safetensors_and_tokenizers(
        checkpoints: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    for kind in ("char", "bpe"):
        data = checkpoints[kind]["best"]
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(to_safetensors(load_checkpoint(data)))
        proc = subprocess.run([sys.executable, "-c", _BLOCKED, str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["loaded"] == []
        assert "First" + out["text"] == sample(data, "First", 20, 0.8, 5, seed=2)
