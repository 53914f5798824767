"""Requests and answers of generation, scoring and classification, shared by the API
(``POST /v1/jobs/{id}/generate|score|classify``, :mod:`app.routes.inference`) and the
inference server (``lmforge serve``, :mod:`worker.serve.app`). Pydantic only.

The API's bounds that come from settings (``LMFORGE_INFERENCE_MAX_*``) are checked by the API;
the ranges here hold everywhere.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Seeds are stored by torch as 64-bit integers.
MAX_SEED = 2**63 - 1
# A temperature above this is the uniform distribution to float precision anyway.
MAX_TEMPERATURE = 100.0


def _encodable(value: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate, which JSON can carry as
    ``"\\ud800"`` but UTF-8 cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {exc.start})"
                         ) from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class GenerateParams(BaseModel):
    """What to sample (see :func:`worker.engine.generate.generate`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(default="", description="the text to continue; characters or words "
                                                 "the model never saw are read as <unk>")
    max_new_tokens: int = Field(default=100, ge=0, description="tokens to generate per "
                                                               "sample")
    temperature: float = Field(default=1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="divides the logits; 0 is greedy decoding")
    top_k: int | None = Field(default=None, ge=0, description="keep only the k most likely "
                                                              "tokens (null or 0: all)")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False,
                                description="nucleus sampling (Holtzman et al. 2020): keep the "
                                            "smallest set of most likely tokens whose "
                                            "probability reaches top_p (null or 1: all)")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="the same request and seed "
                                                                "give the same samples")
    num_samples: int = Field(default=1, ge=1, description="samples of the same prompt, drawn "
                                                          "as one batch")


class ScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(min_length=1, description="the text to score; it must encode to at "
                                                 "least 2 tokens")


class ClassifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, description="the texts to classify")


class CheckpointRef(BaseModel):
    """A checkpoint as the inference server reads it: its blob in storage and that blob's
    sha256 (hex), which the server checks and keys its cache of loaded models by."""

    id: str = Field(min_length=1, max_length=100)
    storage_key: str = Field(min_length=1, max_length=300)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ServerCall(BaseModel):
    """The fields every call to the inference server carries."""

    checkpoint: CheckpointRef
    deadline_s: float = Field(gt=0, allow_inf_nan=False, description="seconds")


class GenerateCall(GenerateParams, ServerCall):
    pass


class ScoreCall(ScoreParams, ServerCall):
    pass


class ClassifyCall(ClassifyParams, ServerCall):
    pass


class SampleOut(BaseModel):
    text: str = Field(description="the completion, without the prompt; never ends in half a "
                                  "character")
    num_tokens: int = Field(description="tokens generated")


class GenerateResult(BaseModel):
    samples: list[SampleOut]
    prompt_tokens: int = Field(description="tokens of the prompt as encoded")
    checkpoint_id: str
    tokenizer: str = Field(description="the job's tokenizer kind: char, word or bpe")


class TokenLoss(BaseModel):
    token: str = Field(description="the predicted token's text (a word, a character, or a "
                                   "BPE token's text; <unk> and <eos> by name)")
    id: int
    loss: float = Field(description="its cross-entropy, nats")


class ScoreResult(BaseModel):
    loss: float = Field(description="mean cross-entropy, nats per predicted token")
    ppl: float | None = Field(description="perplexity, exp(loss); null when it overflows a "
                                          "float")
    bpc: float | None = Field(description="bits per character, loss / ln 2 (char jobs only)")
    num_tokens: int = Field(description="predicted tokens: every token of the text but the "
                                        "first, each predicted from the ones before it, "
                                        "starting from a zero hidden state")
    per_token: list[TokenLoss]
    checkpoint_id: str
    tokenizer: str


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResult(BaseModel):
    predictions: list[Prediction]
    checkpoint_id: str
