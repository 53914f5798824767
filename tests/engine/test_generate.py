"""Generation and scoring (worker.engine.generate): the sampling distribution against hand
computations, <unk> never sampled, byte-level BPE text never ends in half a character,
unseen prompt symbols, determinism by seed, batched samples, and scores that agree with the
engine's own evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from core.contract import CorpusTexts
from worker.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from worker.engine.evaluate import LN2, evaluate
from worker.engine.generate import (
    DeadlineExceeded,
    Utf8Table,
    deadline_after,
    generate,
    next_token_probs,
    score,
)
from worker.engine.model import LSTMLanguageModel
from worker.engine.sample import sample
from worker.engine.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer
from worker.engine.trainer import train

from .conftest import RecordingHooks, make_spec

# -- the distribution, by hand ----------------------------------------------------------------

P = [0.5, 0.3, 0.15, 0.05]


def _probs(**kw: object) -> list[float]:
    logits = torch.tensor([P]).log()
    return next_token_probs(logits, **kw)[0].tolist()  # type: ignore[arg-type]


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}, renormalised by 0.8.
    assert _probs(top_p=0.7) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    # 0.8 < 0.9 <= 0.95: {0, 1, 2}, renormalised by 0.95.
    assert _probs(top_p=0.9) == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                                              abs=1e-6)
    # Below the top probability: the most likely token alone.
    assert _probs(top_p=0.1) == pytest.approx([1, 0, 0, 0], abs=1e-6)
    assert _probs(top_p=1.0) == pytest.approx(P, abs=1e-6)
    assert _probs() == pytest.approx(P, abs=1e-6)


def test_temperature_then_top_k_then_top_p() -> None:
    # T = 0.5 squares the probabilities: [.25, .09, .0225, .0025] / .365.
    sq = [p * p for p in P]
    z = sum(sq)
    assert _probs(temperature=0.5) == pytest.approx([q / z for q in sq], abs=1e-6)
    # Then top_p = 0.9: .25/.365 = .685 < .9 <= (.25 + .09)/.365 = .932: {0, 1}.
    assert _probs(temperature=0.5, top_p=0.9) == pytest.approx([.25 / .34, .09 / .34, 0, 0],
                                                               abs=1e-6)
    # top_k = 3 first ([.5, .3, .15] / .95), then top_p = 0.8: .526 < .8 <= .842: {0, 1}.
    assert _probs(top_k=3, top_p=0.8) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    assert _probs(temperature=0) == [1, 0, 0, 0]


def test_masked_tokens_get_no_probability_even_when_most_likely() -> None:
    allowed = torch.tensor([[False, True, True, True]])
    probs = next_token_probs(torch.tensor([P]).log(), allowed=allowed)[0].tolist()
    assert probs == pytest.approx([0, 0.6, 0.3, 0.1], abs=1e-6)
    greedy = next_token_probs(torch.tensor([P]).log(), temperature=0, allowed=allowed)
    assert greedy[0].tolist() == [0, 1, 0, 0]


def _constant_model(tok: Tokenizer, bias: dict[int, float]) -> LSTMLanguageModel:
    """A model whose next-token logits are ``bias`` (0 elsewhere) whatever it reads: the
    decoder's weight is zero."""
    model = LSTMLanguageModel(tok.vocab_size, 8, 8, 1)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
        for i, b in bias.items():
            model.decoder.bias[i] = b
    return model.eval()


def test_sampling_draws_only_from_the_nucleus_in_its_proportions() -> None:
    tok = CharTokenizer(list("abcd"))  # ids: <unk> 0, a 1, b 2, c 3, d 4
    model = _constant_model(tok, {i + 1: math.log(p) for i, p in enumerate(P)} | {0: -50.0})
    out = generate(model, tok, "a", max_new_tokens=500, top_p=0.7, seed=0, num_samples=4)
    text = "".join(s.text for s in out.samples)
    assert set(text) == {"a", "b"}
    assert text.count("a") / len(text) == pytest.approx(0.625, abs=0.03)


# -- <unk> ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tok", [CharTokenizer(list("ab")), WordTokenizer(["x", "y"])],
                         ids=["char", "word"])
def test_unk_is_never_sampled_even_when_the_model_prefers_it(tok: Tokenizer) -> None:
    assert tok.unk_id == 0
    model = _constant_model(tok, {0: 5.0})  # <unk> far above everything else
    for temperature in (0.0, 1.0, 3.0):
        out = generate(model, tok, "", max_new_tokens=200, temperature=temperature, seed=1,
                       num_samples=3)
        assert all(0 not in s.ids for s in out.samples)
    assert "\ufffd" not in sample_text(model, tok)


def sample_text(model: LSTMLanguageModel, tok: Tokenizer) -> str:
    return generate(model, tok, "", max_new_tokens=100, seed=2).samples[0].text


# -- byte-level BPE and UTF-8 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def cjk_bpe() -> BPETokenizer:
    """Byte-level BPE with almost no merges: most CJK characters stay split into bytes."""
    text = "日本語のテキスト。漢字とかな。\nabc déjà vu ☃ 🙂\n" * 20
    return BPETokenizer.train(text, vocab_size=260)


def _byte_id(tok: BPETokenizer, b: int) -> int:
    from worker.engine.generate import byte_decoder

    char = {v: k for k, v in byte_decoder().items()}[b]
    i = tok.hf.token_to_id(char)
    assert i is not None
    return int(i)


def test_utf8_table_gives_each_token_its_bytes(cjk_bpe: BPETokenizer) -> None:
    table = Utf8Table.for_tokenizer(cjk_bpe)
    whole = 0
    for i, b in enumerate(table.token_bytes):
        decoded = cjk_bpe.decode([i])
        if "\ufffd" not in decoded:
            assert b.decode("utf-8") == decoded
            whole += 1
    assert whole > 100
    # A lone lead byte of a 3-byte character leaves the automaton waiting for 2 more bytes.
    lead = _byte_id(cjk_bpe, 0xE6)
    assert table.next_state[0, lead] == 2 and table.next_state[2, lead] == -1


def test_bpe_text_never_ends_in_half_a_character(cjk_bpe: BPETokenizer) -> None:
    lead, cont1, cont2 = (_byte_id(cjk_bpe, b) for b in (0xE6, 0x97, 0xA5))  # 日 = E6 97 A5
    assert cjk_bpe.decode([lead]) == "\ufffd"  # what the old sampler printed
    model = _constant_model(cjk_bpe, {lead: 10.0, cont1: 5.0, cont2: 4.0})
    for n in (1, 2):
        out = generate(model, cjk_bpe, "x", max_new_tokens=n, temperature=0)
        assert out.samples[0].text == "" and out.samples[0].num_tokens == n
    # Greedy: the lead byte, then the best allowed continuations (0x97 twice: U+65D7 旗).
    out = generate(model, cjk_bpe, "x", max_new_tokens=4, temperature=0)
    assert out.samples[0].text == "\u65d7"
    assert out.samples[0].num_tokens == 4


def test_bpe_sampling_makes_only_valid_utf8(cjk_bpe: BPETokenizer) -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel(cjk_bpe.vocab_size, 16, 16, 1).eval()  # random weights
    out = generate(model, cjk_bpe, "日本", max_new_tokens=101, temperature=2.0, seed=5,
                   num_samples=4)
    table = Utf8Table.for_tokenizer(cjk_bpe)
    for s in out.samples:
        assert "\ufffd" not in s.text
        raw = b"".join(table.token_bytes[i] for i in s.ids)
        assert raw.startswith(s.text.encode("utf-8")) and len(raw) - len(s.text.encode()) < 4


# -- trained jobs: unseen symbols, seeds, batches, scores -------------------------------------

@pytest.fixture(scope="module", params=["char", "word", "bpe"])
def trained(request: pytest.FixtureRequest, small_text: str
            ) -> tuple[LSTMLanguageModel, Tokenizer]:
    tok = {"char": {"kind": "char"}, "word": {"kind": "word", "max_vocab": 300},
           "bpe": {"kind": "bpe", "vocab_size": 300}}[request.param]
    hooks = RecordingHooks()
    train(make_spec(max_steps=8, eval_interval=4, top={"tokenizer": tok}),
          CorpusTexts(train=small_text), hooks)
    ckpt = load_checkpoint(hooks.last("best").data)
    return build_model_from_checkpoint(ckpt).eval(), ckpt.tokenizer


def test_prompts_with_unseen_symbols_generate(trained: tuple[LSTMLanguageModel, Tokenizer]
                                              ) -> None:
    model, tok = trained
    prompt = "Zqx 日本語 ☃🙂 \x07"
    out = generate(model, tok, prompt, max_new_tokens=20, seed=0)
    assert out.prompt_tokens == len(tok.encode(prompt)) > 0
    assert out.samples[0].num_tokens == 20
    assert "\ufffd" not in out.samples[0].text
    if tok.unk_id is not None:
        assert tok.unk_id in tok.encode(prompt)  # the unseen symbols were read as <unk>


def test_seed_makes_samples_reproducible_and_num_samples_batches(
        trained: tuple[LSTMLanguageModel, Tokenizer]) -> None:
    model, tok = trained
    kw = {"max_new_tokens": 40, "temperature": 1.5, "num_samples": 5}
    a = generate(model, tok, "The", seed=7, **kw)  # type: ignore[arg-type]
    b = generate(model, tok, "The", seed=7, **kw)  # type: ignore[arg-type]
    c = generate(model, tok, "The", seed=8, **kw)  # type: ignore[arg-type]
    assert [s.ids for s in a.samples] == [s.ids for s in b.samples]
    assert [s.ids for s in a.samples] != [s.ids for s in c.samples]
    assert len(a.samples) == 5 and all(s.num_tokens == 40 for s in a.samples)
    assert len({tuple(s.ids) for s in a.samples}) > 1  # the batch rows are distinct draws
    # The first row of a batch is one draw from the same distribution as a single sample:
    # greedy decoding makes every row the single greedy sample.
    greedy = generate(model, tok, "The", max_new_tokens=30, temperature=0, num_samples=3)
    one = generate(model, tok, "The", max_new_tokens=30, temperature=0)
    assert all(s.ids == one.samples[0].ids for s in greedy.samples)


def test_score_matches_the_engines_evaluation(trained: tuple[LSTMLanguageModel, Tokenizer],
                                              small_text: str) -> None:
    model, tok = trained
    text = small_text[1000:2500]
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    ref = evaluate(model, ids, batch_size=1, seq_len=ids.numel(), device=torch.device("cpu"),
                   char_level=tok.kind == "char")
    for window in (5, 512):  # the hidden state is carried across windows
        res = score(model, tok, text, window=window)
        assert res.num_tokens == ref.tokens == ids.numel() - 1
        assert res.loss == pytest.approx(ref.loss, abs=1e-5)
        assert res.ppl == pytest.approx(math.exp(res.loss))
        assert len(res.per_token) == res.num_tokens
        assert sum(t.loss for t in res.per_token) / res.num_tokens == pytest.approx(res.loss,
                                                                                   abs=1e-5)
        assert [t.id for t in res.per_token] == ids[1:].tolist()
    if tok.kind == "char":
        assert res.bpc == pytest.approx(res.loss / LN2) and ref.bpc is not None
        assert res.per_token[0].token == text[1]
    else:
        assert res.bpc is None


def test_score_needs_two_tokens_and_stops_at_its_deadline(
        trained: tuple[LSTMLanguageModel, Tokenizer]) -> None:
    model, tok = trained
    if tok.kind != "word":  # one word is two tokens (the word and <eos>)
        with pytest.raises(ValueError, match="at least 2"):
            score(model, tok, "T")
    with pytest.raises(DeadlineExceeded):
        score(model, tok, "The quick brown fox", should_stop=lambda: True)


def test_generation_stops_at_its_deadline(trained: tuple[LSTMLanguageModel, Tokenizer]) -> None:
    model, tok = trained
    polls: list[int] = []

    def stop_at_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(DeadlineExceeded):
        generate(model, tok, "The", max_new_tokens=50, should_stop=stop_at_third_poll)
    assert len(polls) == 3  # polled once before the prompt and before each token
    with pytest.raises(DeadlineExceeded):
        generate(model, tok, "The", max_new_tokens=5, should_stop=deadline_after(0.0))
    assert model.training is False


def test_sample_keeps_its_callers_contract(small_text: str) -> None:
    hooks = RecordingHooks()
    train(make_spec(max_steps=4, eval_interval=2), CorpusTexts(train=small_text), hooks)
    best = hooks.last("best").data
    text = sample(best, prompt="Fir", max_new_tokens=15, temperature=0.8, top_p=0.9, seed=3)
    assert text.startswith("Fir") and len(text) == 18
    assert text == sample(best, "Fir", 15, 0.8, None, seed=3, top_p=0.9)
    with pytest.raises(ValueError, match="top_p"):
        sample(best, "Fir", 5, top_p=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generation_and_scoring_on_cuda_agree_with_the_cpu(
        trained: tuple[LSTMLanguageModel, Tokenizer], small_text: str) -> None:
    cpu_model, tok = trained
    gpu_model = LSTMLanguageModel(**cpu_model.config.as_dict()).cuda().eval()  # type: ignore[arg-type]
    gpu_model.load_state_dict(cpu_model.state_dict())
    text = small_text[:800]
    assert score(gpu_model, tok, text).loss == pytest.approx(score(cpu_model, tok, text).loss,
                                                             abs=1e-4)
    kw = {"max_new_tokens": 50, "temperature": 1.3, "top_p": 0.95, "num_samples": 4, "seed": 2}
    a = generate(gpu_model, tok, "The 日本", **kw)  # type: ignore[arg-type]
    b = generate(gpu_model, tok, "The 日本", **kw)  # type: ignore[arg-type]
    assert [s.ids for s in a.samples] == [s.ids for s in b.samples]
    for s in a.samples:
        assert s.num_tokens == 50 and "\ufffd" not in s.text
        assert tok.unk_id is None or tok.unk_id not in s.ids
    greedy_gpu = generate(gpu_model, tok, "The", max_new_tokens=20, temperature=0)
    greedy_cpu = generate(cpu_model, tok, "The", max_new_tokens=20, temperature=0)
    assert greedy_gpu.prompt_tokens == greedy_cpu.prompt_tokens
