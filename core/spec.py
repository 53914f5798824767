"""The training-job spec: one pydantic model shared by the API, the worker and `lmforge train`.

This module imports only pydantic, so the API process can validate specs without torch.
Every field has a default except the data source. Defaults follow PyTorch's
`examples/word_language_model/main.py` where it has one (``init_range=0.1``,
plateau ``factor=0.25``, i.e. its divide-by-4 annealing) and the issue's spec otherwise.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

BuiltinCorpus = Literal["python-docs"]
BUILTIN_CORPORA: tuple[str, ...] = get_args(BuiltinCorpus)


# Control characters (C0, DEL and C1): never meaningful in a name, an id or a path, refused by
# PostgreSQL (NUL) and a way to forge log lines and terminal output.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same rule as a JSON-schema pattern, so that the OpenAPI document says what is accepted.
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"


def check_text(value: str) -> str:
    """``value`` unchanged; raises ``ValueError`` when it holds a control character
    (U+0000-U+001F, U+007F-U+009F), naming the first one and its offset."""
    bad = CONTROL_CHARS.search(value)
    if bad is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(bad.group()):04X} "
                         f"at offset {bad.start()})")
    return value


# A text field of a spec: no control characters, at most 1000 characters (a name: 200).
Text = Annotated[str, Field(max_length=1000), AfterValidator(check_text),
                 Field(json_schema_extra={"pattern": NO_CONTROL_PATTERN})]
Name = Annotated[str, Field(max_length=200), AfterValidator(check_text),
                 Field(json_schema_extra={"pattern": NO_CONTROL_PATTERN})]

# "auto", "cpu", "cuda" or "cuda:N" (N: the CUDA device index); anything else cannot run.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,3})?)$"

# An Adam/AdamW beta: in [0, 1) (torch.optim.Adam raises outside it).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    # Unknown keys are a 422 rather than silently ignored: a typo ("hiden_dim") must not
    # train a model the user did not ask for. NaN and +-Infinity (JSON's NaN/Infinity
    # literals, or 1e309, which parses to inf) are a 422 naming the field in every float.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DatasetSource(_Strict):
    """Where a text comes from: exactly one of an uploaded dataset id, a built-in corpus, or a
    local file path (``path`` is accepted by ``lmforge train`` only; the HTTP API refuses it)."""

    id: Text | None = None
    builtin: BuiltinCorpus | None = None
    path: Text | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSource:
        given = [k for k in ("id", "builtin", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'id', 'builtin' or 'path'")
        return self


class TokenizerSpec(_Strict):
    """``char``: one token per Unicode character, plus ``<unk>``.
    ``word``: whitespace split, ``<eos>`` at each line end, ``<unk>`` below ``min_freq`` or
    beyond ``max_vocab``. ``bpe``: Hugging Face ``tokenizers`` byte-level BPE trained on the
    training split with ``vocab_size`` entries."""

    kind: Literal["char", "word", "bpe"] = "char"
    max_vocab: int | None = Field(default=None, ge=2)
    min_freq: int = Field(default=1, ge=1)
    vocab_size: int = Field(default=2000, ge=64, le=100_000)


class PretrainedEmbeddings(_Strict):
    """Initialise the embedding from a dataset in GloVe text format (``word v1 v2 ...``)."""

    dataset_id: Text | None = None
    path: Text | None = None
    freeze: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> PretrainedEmbeddings:
        if (self.dataset_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'dataset_id' or 'path'")
        return self


class ModelSpec(_Strict):
    embed_dim: int = Field(default=128, ge=1, le=8192)
    hidden_dim: int = Field(default=256, ge=1, le=8192)
    num_layers: int = Field(default=2, ge=1, le=16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tie_weights: bool = False
    # None (the default): each layer's own scale, PyTorch's layer defaults: embedding N(0, 1),
    # LSTM and decoder U(-1/sqrt(hidden_dim), 1/sqrt(hidden_dim)); a tied matrix
    # U(-1/sqrt(embed_dim), 1/sqrt(embed_dim)) (worker/engine/model.py, docs/benchmarks.md).
    # A number: U(-init_range, init_range) for the embedding and decoder weights and a zero
    # decoder bias, as PyTorch's word_language_model example (initrange = 0.1).
    init_range: float | None = Field(default=None, gt=0.0, le=10.0)
    pretrained_embeddings: PretrainedEmbeddings | None = None

    @model_validator(mode="after")
    def _tied_dims(self) -> ModelSpec:
        if self.tie_weights and self.embed_dim != self.hidden_dim:
            raise ValueError(
                f"tie_weights requires embed_dim == hidden_dim "
                f"(got embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim})"
            )
        return self


class OptimizerSpec(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0, le=100.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # sgd only
    nesterov: bool = False  # sgd only; needs momentum > 0
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # adam/adamw, each in [0, 1)
    eps: float = Field(default=1e-8, gt=0.0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs name='sgd' and momentum > 0")
        return self


class ScheduleSpec(_Strict):
    """Learning-rate schedule, stepped once per optimizer step (``plateau``: once per evaluation).

    - ``constant``: ``lr`` throughout (after optional linear warm-up).
    - ``cosine``: linear warm-up over ``warmup_steps``, then cosine decay towards ``min_lr``
      over the step budget (``max_steps``, or the step equivalent of ``max_epochs``/
      ``max_tokens``); each step uses the value at the start of its interval, so the last
      step still updates and ``min_lr`` holds from the step after the budget.
    - ``step``: multiply by ``gamma`` every ``step_size`` steps.
    - ``plateau``: divide by ``1/factor`` once the validation loss has not improved for more
      than ``patience`` evaluations in a row, then count again (torch ``ReduceLROnPlateau``);
      the defaults, factor 0.25 and patience 0, divide by 4 at each evaluation without
      improvement: the classic example's divide-by-4.
    """

    kind: Literal["constant", "cosine", "step", "plateau"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0.0)
    step_size: int = Field(default=1000, ge=1)
    gamma: float = Field(default=0.5, gt=0.0, le=1.0)
    factor: float = Field(default=0.25, gt=0.0, lt=1.0)
    patience: int = Field(default=0, ge=0)


class EarlyStoppingSpec(_Strict):
    """Stop after ``patience`` evaluations without a validation-loss improvement of at least
    ``min_delta`` nats."""

    patience: int = Field(default=5, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class TrainingSpec(_Strict):
    batch_size: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=64, ge=1, le=4096)
    # Stopping rules: any combination; the first that holds ends the run. max_steps always
    # applies so that every job has a finite budget.
    max_steps: int = Field(default=1000, ge=1, le=10_000_000)
    max_epochs: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_runtime_s: float | None = Field(default=None, gt=0)
    early_stopping: EarlyStoppingSpec | None = None
    eval_interval: int = Field(default=100, ge=1)
    eval_tokens: int | None = Field(
        default=1_000_000, ge=2,
        description="The most validation tokens one evaluation reads: a larger validation "
                    "split is evaluated on the first eval_tokens / batch_size tokens of each "
                    "of its batch_size evenly spaced streams (the same subset every time). "
                    "None: the whole split. The final test evaluation always reads the whole "
                    "test split. A service refuses more than its LMFORGE_MAX_EVAL_TOKENS.")
    grad_clip: float | None = Field(default=1.0, gt=0)
    # Each step, each stream's carried hidden state is reset to zeros with this probability,
    # so the model also learns to predict from the zero state that evaluation and sampling
    # start from (docs/benchmarks.md, "Robust defaults"). 0 carries it through whole epochs.
    state_reset_prob: float = Field(default=0.02, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    device: str = Field(
        default="auto", pattern=DEVICE_PATTERN,
        description="'auto' (CUDA when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int | None = Field(default=None, ge=1, le=1024)
    # Resumable by default: a ``periodic`` checkpoint (full state, exact resume) is written
    # every ``checkpoint_interval`` steps and whenever ``checkpoint_every_s`` seconds of the
    # run have passed since the last full checkpoint, whichever comes first, so a worker
    # killed at any point loses at most that much work. None turns either bound off (both
    # None: a job keeps only the ``last`` checkpoint of a run that stops normally).
    checkpoint_interval: int | None = Field(
        default=1000, ge=1,
        description="Write a resumable 'periodic' checkpoint every this many steps (None: no "
                    "step bound of the job's own; a service still applies its "
                    "LMFORGE_CHECKPOINT_EVERY_STEPS, 1000 by default, and a smaller value here "
                    "wins).")
    checkpoint_every_s: float | None = Field(
        default=300.0, gt=0,
        description="Also write one once this many wall-clock seconds of the run (training, "
                    "evaluation and checkpoints) have passed since the last full checkpoint "
                    "(None: no time bound of the job's own; a service still applies its "
                    "LMFORGE_CHECKPOINT_EVERY_S, 300 by default, and a smaller value here "
                    "wins).")
    keep_checkpoints: int = Field(default=3, ge=1, le=1000)
    # A wall-clock budget: past it the job fails with ``timeout`` (it keeps a ``last``
    # checkpoint). Unlike ``max_runtime_s``, which ends a run successfully, this is a limit.
    max_duration_s: float | None = Field(
        default=None, gt=0,
        description="Fail the job with error code 'timeout' once its run has taken this many "
                    "wall-clock seconds (counted as max_runtime_s counts them, across "
                    "resumes), keeping a 'last' checkpoint. None: no limit.")
    # Per-step losses stay on the device and are flushed to the reporter every this many steps
    # (each step still gets its own metric row).
    log_interval: int = Field(default=10, ge=1, le=10_000)


def check_outbound_url(value: str) -> str:
    """``value`` unchanged when it is an acceptable outbound URL by its form
    (:func:`core.outbound.syntax_problem`: http(s), a host, no user-info); raises
    ``ValueError`` otherwise. Whether its host may be private is the deployment's to say, at
    submission (``LMFORGE_WEBHOOK_ALLOW_PRIVATE``; docs/security.md)."""
    from core.outbound import syntax_problem

    problem = syntax_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


OutboundUrl = Annotated[str, Field(min_length=1, max_length=2000),
                        AfterValidator(check_outbound_url)]


class NotifySpec(_Strict):
    """A webhook: ``url`` receives a signed ``POST`` with the job (as ``GET /v1/jobs/{id}``
    gives it) when the job reaches a terminal status (succeeded, failed, cancelled); retried
    with exponential backoff (docs/operations.md, "Webhooks")."""

    url: OutboundUrl


class TensorBoardIntegration(_Strict):
    """The worker also writes TensorBoard event files (scalars per step), downloadable as
    ``GET /v1/jobs/{id}/tensorboard.tar.gz``."""

    kind: Literal["tensorboard"]


class MlflowIntegration(_Strict):
    """The worker logs the job's params, metrics per step and best checkpoint to the MLflow
    tracking server at ``tracking_uri``, in ``experiment_name`` (default ``lmforge``) as a run
    named ``run_name`` (default: the job's name, else its id)."""

    kind: Literal["mlflow"]
    tracking_uri: OutboundUrl
    experiment_name: Name | None = None
    run_name: Name | None = None


Integration = Annotated[TensorBoardIntegration | MlflowIntegration,
                        Field(discriminator="kind")]


# A class label of a labelled dataset: a non-empty text of at most 200 characters.
Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_text)]


class InitFrom(_Strict):
    """Initialise a classifier's encoder (embedding and LSTM) from a succeeded language-model
    job's checkpoint: ``best`` (the default), ``last`` or the id of one of that job's
    checkpoints. The job must be the submitter's own; the model's dimensions and the
    tokenizer then come from that checkpoint."""

    job_id: Text
    checkpoint: Text = "best"


class ClassifySpec(_Strict):
    """The text-classification settings of a ``task: "classify"`` job (docs/classification.md).

    - ``pooling``: how the LSTM's top-layer states of one example become one vector for the
      linear head: ``mean`` (the default) over the example's real tokens, ``max`` (element-wise
      over them) or ``last`` (the state after its last real token). ``mean`` is the default
      because every position gets a gradient (the last state alone must carry the whole text
      through the recurrence, which is slow to learn in a few hundred steps from scratch) and
      it does not depend on where a text happens to end; padding is never pooled.
    - ``freeze_encoder_steps``: the embedding and LSTM stay fixed for the first N optimizer
      steps (only the new head learns), then train with it.
    - ``class_weights``: ``none``, ``balanced`` (n_examples / (n_classes * n_label), the
      scikit-learn ``class_weight="balanced"`` formula) or ``{label: weight}`` (labels not
      named weigh 1), applied in the cross-entropy.
    - ``max_len``: tokens per example; longer texts keep their first ``max_len`` tokens.

    The split is the job's ``val_fraction``/``test_fraction`` (stratified by label) or
    separate ``validation``/``test`` datasets."""

    pooling: Literal["last", "mean", "max"] = "mean"
    freeze_encoder_steps: int = Field(default=0, ge=0, le=10_000_000)
    class_weights: Literal["none", "balanced"] | dict[Label, Annotated[float, Field(
        gt=0.0, le=1e6)]] = "none"
    max_len: int = Field(default=256, ge=1, le=4096)

    @model_validator(mode="after")
    def _some_weights(self) -> ClassifySpec:
        if isinstance(self.class_weights, dict) and not self.class_weights:
            raise ValueError("class_weights must name at least one label (or be 'none')")
        return self


class PromptsFromCorpus(_Strict):
    """Random windows of ``prompt_tokens`` tokens of the ``init_from`` job's training text."""

    prompt_tokens: int = Field(default=16, ge=1, le=4096)


class PromptsSpec(_Strict):
    """Where a PPO job's prompts (queries) come from: exactly one of ``dataset_id`` (an
    uploaded text dataset, one prompt per non-empty line), ``from_corpus`` (random windows of
    the ``init_from`` job's training text) or ``empty: true`` (every response is generated
    from the model's zero state with no prompt)."""

    dataset_id: Text | None = None
    from_corpus: PromptsFromCorpus | None = None
    empty: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> PromptsSpec:
        given = [k for k in ("dataset_id", "from_corpus") if getattr(self, k) is not None]
        if self.empty:
            given.append("empty")
        elif self.empty is not None:
            raise ValueError("empty must be true when given (omit it otherwise)")
        if len(given) != 1:
            raise ValueError("give exactly one of 'dataset_id', 'from_corpus' or 'empty': true")
        return self


class CharFractionReward(_Strict):
    """The fraction of response tokens equal to the token ``target`` (its text: a character
    for a char tokenizer, a word for a word tokenizer); in [0, 1]."""

    kind: Literal["char_fraction"]
    target: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_text)]


class KeywordsReward(_Strict):
    """The fraction of the response's characters covered by matches of ``words``
    (case-insensitive; whole words when ``whole_words``); in [0, 1]."""

    kind: Literal["keywords"]
    words: list[Annotated[str, Field(min_length=1, max_length=100),
                          AfterValidator(check_text)]] = Field(min_length=1, max_length=100)
    whole_words: bool = True


class LengthReward(_Strict):
    """``1 - |L - target| / max(target, T - target)`` where ``L`` is the number of response
    tokens before the first line end (``T`` = response_length when there is none); in [0, 1],
    1 at ``L == target``."""

    kind: Literal["length"]
    target: int = Field(ge=0, le=4096)


class LMLoglikReward(_Strict):
    """Fluency: the mean log-probability (nats per token, <= 0) of the response's text, after
    its prompt, under another language-model job's checkpoint (its own tokenizer)."""

    kind: Literal["lm_loglik"]
    job_id: Text
    checkpoint: Text = "best"


class ClassifierReward(_Strict):
    """The probability (in [0, 1]) of ``label`` under a classification job's checkpoint,
    applied to the response's text (``include_prompt``: the prompt's text and the response)."""

    kind: Literal["classifier"]
    job_id: Text
    checkpoint: Text = "best"
    label: Label
    include_prompt: bool = False


RewardSpec = Annotated[
    CharFractionReward | KeywordsReward | LengthReward | LMLoglikReward | ClassifierReward,
    Field(discriminator="kind"),
]


class PPOSpec(_Strict):
    """The settings of a ``task: "ppo"`` job (docs/ppo.md): fine-tune the ``init_from``
    language model (the policy) to maximise ``reward`` minus ``kl_coef`` times its KL
    divergence (nats) from the frozen starting model (the reference).

    Defaults and their sources. Z = Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", code ``openai/lm-human-preferences`` (``train_policy.py``
    ``PpoHParams``/``RewardHParams``, ``launch.py``); TRL = Hugging Face TRL's PPO trainer
    (``PPOConfig``):

    - ``response_length`` 24 tokens: Z's stylistic tasks (``launch.py``,
      ``task.response_length``).
    - ``rollout_batch_size`` 64 responses per iteration: Z (``ppo.batch_size = 64``).
    - ``ppo_epochs`` 4: Z (``noptepochs``) and TRL (``ppo_epochs``/``num_ppo_epochs``).
    - ``num_minibatches`` 1: Z (``nminibatches``) and TRL v2 (``num_mini_batches``).
    - ``clip_range`` 0.2 and ``value_clip`` 0.2: Z (``cliprange``, ``cliprange_value``) and
      TRL (``cliprange``, ``cliprange_value``).
    - ``vf_coef`` 0.1: Z and TRL.
    - ``gamma`` 1.0 and ``lam`` 0.95 (GAE, Schulman et al. 2016): Z and TRL.
    - ``kl_coef`` 0.2: Z (``rewards.kl_coef``) and TRL v0 (``init_kl_coef``).
    - ``target_kl`` None (a fixed coefficient): Z's default (``adaptive_kl = None``); a
      number turns on Z's adaptive controller (TRL v0's ``adap_kl_ctrl`` with
      ``target = 6``) with ``kl_horizon`` 10,000 responses (Z and TRL ``horizon``).
    - ``whiten_rewards`` False: TRL (Z's default is True: per-token rewards divided by their
      standard deviation over the batch, the mean not shifted).
    - ``temperature`` 1.0: Z's ``PolicyHParams`` default (its ``launch.py`` and TRL v2
      sample at 0.7); both the policy's and the reference's log-probabilities are taken at
      this temperature, as in Z and TRL v2.
    - ``lr`` None: ``optimizer.lr`` (1e-3 by default). Z (5e-6) and TRL (1.41e-5) tuned
      theirs for GPT-2 transformers; the small LSTMs here need about 1e-3 (docs/ppo.md).
      The optimizer's other settings (``optimizer``), ``schedule`` and
      ``training.grad_clip`` apply as for language-model jobs.
    - ``algorithm``: ``ppo``, or ``reinforce`` (REINFORCE with the value head as a baseline:
      one gradient step per rollout batch on ``-(G_t - V_t) log pi``, the same rollouts,
      rewards and KL penalty; for comparison, docs/benchmarks.md).
    """

    prompts: PromptsSpec = PromptsSpec(empty=True)
    reward: RewardSpec
    response_length: int = Field(default=24, ge=1, le=4096)
    rollout_batch_size: int = Field(default=64, ge=1, le=4096)
    ppo_epochs: int = Field(default=4, ge=1, le=100)
    num_minibatches: int = Field(default=1, ge=1, le=4096)
    clip_range: float = Field(default=0.2, gt=0.0, le=10.0)
    value_clip: float | None = Field(default=0.2, gt=0.0)
    vf_coef: float = Field(default=0.1, ge=0.0, le=1000.0)
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    kl_coef: float = Field(default=0.2, ge=0.0, le=1000.0)
    target_kl: float | None = Field(default=None, gt=0.0)
    kl_horizon: int = Field(default=10_000, ge=1)
    whiten_rewards: bool = False
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    lr: float | None = Field(default=None, ge=0.0, le=100.0)
    algorithm: Literal["ppo", "reinforce"] = "ppo"

    @model_validator(mode="after")
    def _shapes(self) -> PPOSpec:
        if self.rollout_batch_size % self.num_minibatches:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a "
                             f"multiple of num_minibatches ({self.num_minibatches})")
        if self.reward.kind == "length" and self.reward.target > self.response_length:
            raise ValueError(f"reward.target ({self.reward.target}) must be at most "
                             f"response_length ({self.response_length})")
        return self


# A Celery queue name a job may ask for (resources.queue): lowercase letters, digits, ".", "_"
# and "-", starting with a letter or digit.
QUEUE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ResourcesSpec(_Strict):
    """Where a job runs (docs/deploy.md, "Queues and devices"). ``device``: the device class
    the job needs ("cuda", "cpu", or "auto": any worker); None takes the class of
    ``training.device`` ("cuda:N" is "cuda"). ``gpus``: the number of data-parallel processes
    (DistributedDataParallel; one per GPU on "cuda", gloo processes on the CPU for "cpu");
    ``training.batch_size`` is per process, so the global batch is ``batch_size * gpus``.
    ``queue``: a named Celery queue instead of the one the device class and ``gpus`` imply
    (:func:`core.routing.job_route`)."""

    device: Literal["auto", "cpu", "cuda"] | None = None
    gpus: int = Field(default=1, ge=1, le=64)
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)


# Tasks whose checkpoints hold a language model (weights, config and tokenizer): a PPO job's
# are its policy's, so generation, scoring, export, another PPO job's init_from and an
# lm_loglik reward take them as they take a language-model job's.
LM_CHECKPOINT_TASKS: frozenset[str] = frozenset({"lm", "ppo"})


class JobSpec(_Strict):
    """A training job. The data is ``dataset_id`` (an uploaded dataset) or ``dataset``
    (``{"id"}``, ``{"builtin": "python-docs"}`` or, for ``lmforge train`` only, ``{"path"}``);
    ``validation``/``test`` optionally name separate splits, otherwise ``val_fraction`` and
    ``test_fraction`` of the dataset's tail are held out (validation before test)."""

    name: Name | None = None
    dataset_id: Text | None = None
    dataset: DatasetSource | None = None
    validation: DatasetSource | None = None
    test: DatasetSource | None = None
    tokenizer: TokenizerSpec = TokenizerSpec()
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    training: TrainingSpec = TrainingSpec()
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    # "lm": a language model (the default). "classify": a text classifier on a labelled
    # dataset (``classify`` settings, optional ``init_from``; docs/classification.md).
    task: Literal["lm", "classify", "ppo"] = "lm"
    init_from: InitFrom | None = None
    classify: ClassifySpec | None = None
    # "ppo": fine-tune the init_from language model with a reward (docs/ppo.md).
    ppo: PPOSpec | None = None
    # Operations (docs/operations.md): a webhook called at the terminal status, and the
    # TensorBoard / MLflow integrations (at most one of each kind). Neither changes training.
    notify: NotifySpec | None = None
    integrations: list[Integration] = Field(default_factory=list, max_length=2)
    # Scheduling (docs/deploy.md): the queue / device class / process count, and the order
    # within a queue: 0 (lowest) to 9 (highest); equal priorities run in submission order.
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    priority: int = Field(default=5, ge=0, le=9)

    @model_validator(mode="after")
    def _resources_device(self) -> JobSpec:
        # resources.device and training.device describe one device: fill the one left out
        # from the other, and refuse a contradiction (the message names resources.device).
        train_class = self.training.device.split(":")[0]
        if self.resources.device is None:
            self.resources.device = train_class  # type: ignore[assignment]
        elif self.training.device == "auto":
            self.training.device = self.resources.device
        elif self.resources.device != "auto" and self.resources.device != train_class:
            raise ValueError(f"resources.device is {self.resources.device!r} but "
                             f"training.device is {self.training.device!r}: give one device")
        if self.resources.gpus > 1 and self.task != "lm":
            raise ValueError(f"resources.gpus > 1 (data-parallel training) applies only to "
                             f"task 'lm', not {self.task!r}")
        return self

    @model_validator(mode="after")
    def _one_integration_per_kind(self) -> JobSpec:
        kinds = [i.kind for i in self.integrations]
        if len(kinds) != len(set(kinds)):
            raise ValueError("integrations may name each kind at most once")
        return self

    @model_validator(mode="after")
    def _task_fields(self) -> JobSpec:
        # Messages start with the field's name so that the API's 422 names it.
        if self.task == "ppo":
            return self  # _ppo_fields
        if self.task == "lm":
            return self._lm_fields()
        if self.classify is None:
            self.classify = ClassifySpec()
        for name in ("dataset", "validation", "test"):
            source = getattr(self, name)
            if source is not None and source.builtin is not None:
                raise ValueError(f"{name} must be a labelled dataset for task 'classify' "
                                 f"(the built-in corpora are plain text)")
        if self.model.tie_weights:
            raise ValueError("model has tie_weights=true, which does not apply to task "
                             "'classify' (a classifier has no output embedding to tie)")
        if self.training.max_tokens is not None:
            raise ValueError("training has max_tokens set, which does not apply to task "
                             "'classify' (use max_steps or max_epochs)")
        if self.init_from is not None and self.model.pretrained_embeddings is not None:
            raise ValueError("init_from and model.pretrained_embeddings both initialise the "
                             "embedding: give one of them")
        return self

    def _lm_fields(self) -> JobSpec:
        if self.classify is not None:
            raise ValueError("classify settings apply only to task 'classify'")
        if self.init_from is not None:
            raise ValueError("init_from applies only to tasks 'classify' and 'ppo' (a "
                             "classifier's encoder or a policy initialised from a "
                             "language model)")
        return self

    @model_validator(mode="after")
    def _ppo_fields(self) -> JobSpec:
        if self.task != "ppo":
            if self.ppo is not None:
                raise ValueError("ppo settings apply only to task 'ppo'")
            return self
        if self.classify is not None:
            raise ValueError("classify settings apply only to task 'classify'")
        if self.init_from is None:
            raise ValueError("init_from is required for task 'ppo' (the language-model job "
                             "whose checkpoint is the policy's start and the reference)")
        if self.ppo is None:
            raise ValueError("ppo settings are required for task 'ppo' (at least 'reward')")
        for name in ("max_epochs", "max_tokens", "early_stopping"):
            if getattr(self.training, name) is not None:
                raise ValueError(f"training has {name} set, which does not apply to task "
                                 f"'ppo' (training.max_steps counts PPO iterations)")
        if self.model.pretrained_embeddings is not None:
            raise ValueError("model.pretrained_embeddings does not apply to task 'ppo' (the "
                             "policy is the init_from checkpoint)")
        if self.training.precision != "fp32":
            raise ValueError("training.precision must be 'fp32' for task 'ppo' (the policy's "
                             "log-probabilities are recomputed exactly as sampled)")
        return self

    @model_validator(mode="after")
    def _normalise_dataset(self) -> JobSpec:
        if self.task == "ppo":
            # The data of a PPO job is its prompts (ppo.prompts); a dataset is not read.
            for name in ("dataset_id", "dataset", "validation", "test"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to task 'ppo' (give the prompts "
                                     f"as ppo.prompts)")
            return self
        # Both may be present when they agree: a spec dumped by the service (defaults filled in)
        # must validate again unchanged.
        if (
            self.dataset_id is not None
            and self.dataset is not None
            and self.dataset.id != self.dataset_id
        ):
            raise ValueError("dataset_id and dataset name different data: give one of them")
        if self.dataset_id is None and self.dataset is None:
            raise ValueError("dataset_id (or dataset) is required: a job needs data")
        if self.dataset is None:
            self.dataset = DatasetSource(id=self.dataset_id)
        self.dataset_id = self.dataset.id
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.validation is None and self.val_fraction == 0.0:
            raise ValueError("val_fraction must be > 0 unless a separate 'validation' dataset "
                             "is given")
        return self
