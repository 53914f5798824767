"""Service configuration: one typed Settings object read from the environment.

Read through :func:`get_settings` (cached); nothing is read at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    # Root of everything the service writes: the SQLite file, datasets, checkpoints.
    lmforge_home: Path = Field(default=Path("./var"), alias="LMFORGE_HOME")
    # Defaults to a SQLite file under LMFORGE_HOME; "postgresql+psycopg://..." in production.
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
    # "required" (the default): every /v1 request needs an API key (app.auth). "disabled":
    # no key is asked for and every request acts as an admin; allowed only while the API is
    # bound to a loopback address (lmforge api / lmforge up refuse otherwise), with a warning.
    auth: Literal["required", "disabled"] = Field(default="required", alias="LMFORGE_AUTH")
    # Largest accepted dataset upload, in bytes.
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, alias="LMFORGE_MAX_UPLOAD_BYTES")
    # Redis redelivers an unacked task after this many seconds, even while it runs: keep it above
    # the longest job (docs/operations.md). Duplicates are harmless anyway (the runner claims).
    visibility_timeout_s: int = Field(default=7 * 24 * 3600, alias="LMFORGE_VISIBILITY_TIMEOUT_S")
    # The lease of a running job (seconds): its worker renews it with a heartbeat every
    # heartbeat_interval_s; a running job whose heartbeat is older than this has lost its
    # worker, and the sweep hands it back to the queue (store.sweep, docs/operations.md).
    heartbeat_timeout_s: float = Field(default=30.0, gt=0, alias="LMFORGE_HEARTBEAT_TIMEOUT_S")
    # Attempts per job; past this many the job fails with worker_lost.
    max_attempts: int = Field(default=3, ge=1, alias="LMFORGE_MAX_ATTEMPTS")
    # A queued job whose message was handed to the broker longer ago than this and is no longer
    # in the broker is enqueued again by the queued sweep (seconds).
    requeue_after_s: float = Field(default=60.0, gt=0, alias="LMFORGE_REQUEUE_AFTER_S")
    # The service's resumability bound: every job run by a worker writes a resumable checkpoint
    # at least every this many steps and this many seconds (a job's own
    # training.checkpoint_interval / checkpoint_every_s may only make it more frequent), so a
    # worker killed at any point loses at most that much work.
    checkpoint_every_steps: int = Field(default=1000, ge=1, alias="LMFORGE_CHECKPOINT_EVERY_STEPS")
    checkpoint_every_s: float = Field(default=300.0, gt=0, alias="LMFORGE_CHECKPOINT_EVERY_S")
    # How long an Idempotency-Key is remembered (seconds; default 24 h).
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0, alias="LMFORGE_IDEMPOTENCY_TTL_S")
    # On a warm shutdown with REMAP_SIGTERM=SIGQUIT, a running task gets this long (seconds)
    # before its message is restored to the queue (Celery's worker_soft_shutdown_timeout).
    soft_shutdown_timeout_s: float = Field(default=10.0, alias="LMFORGE_SOFT_SHUTDOWN_TIMEOUT_S")
    # Browser origins allowed to call the API cross-site (CORS), comma-separated
    # ("https://a.example,https://b.example", or "*"); empty (the default): CORS is off.
    cors_origins: str = Field(default="", alias="LMFORGE_CORS_ORIGINS")

    # -- Operations: metrics, webhooks, integrations (docs/operations.md) --------------------
    # A bearer token that may read GET /metrics (besides an admin API key); None: admin keys
    # only (docs/security.md, "/metrics").
    metrics_token: str | None = Field(default=None, alias="LMFORGE_METRICS_TOKEN")
    # The HMAC-SHA256 key of webhook signatures (X-LMForge-Signature). None: webhooks are off
    # (a job with notify is a 422) and the API runs no delivery thread.
    webhook_secret: str | None = Field(default=None, alias="LMFORGE_WEBHOOK_SECRET")
    # Allow webhook URLs on private, loopback, link-local addresses (tests, closed networks).
    webhook_allow_private: bool = Field(default=False, alias="LMFORGE_WEBHOOK_ALLOW_PRIVATE")
    # Tries per delivery; the first retry after webhook_retry_first_s, each wait doubling up
    # to webhook_retry_max_s (seconds). One try's limit: webhook_timeout_s.
    webhook_max_attempts: int = Field(default=8, ge=1, le=100,
                                      alias="LMFORGE_WEBHOOK_MAX_ATTEMPTS")
    webhook_retry_first_s: float = Field(default=10.0, gt=0,
                                         alias="LMFORGE_WEBHOOK_RETRY_FIRST_S")
    webhook_retry_max_s: float = Field(default=1800.0, gt=0, alias="LMFORGE_WEBHOOK_RETRY_MAX_S")
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                     alias="LMFORGE_WEBHOOK_TIMEOUT_S")
    # How often each API process's delivery thread looks for due deliveries (seconds).
    webhook_poll_s: float = Field(default=2.0, gt=0, alias="LMFORGE_WEBHOOK_POLL_S")
    # MLflow tracking servers a job may name although they are private (comma-separated URL
    # prefixes, e.g. "http://mlflow.internal:5000"); any other tracking_uri must be public.
    mlflow_tracking_uris: str = Field(default="", alias="LMFORGE_MLFLOW_TRACKING_URIS")

    # Token files of prepared corpora (worker.engine.tokencache), shared by every worker on this
    # machine; by default LMFORGE_HOME/cache/tokens. Safe to delete between jobs.
    token_cache_dir: Path | None = Field(default=None, alias="LMFORGE_TOKEN_CACHE_DIR")
    # Each worker pool process imports torch and the engine and runs a tiny training step when
    # it starts (worker.preload), so that its first job starts training within tens of
    # milliseconds instead of paying seconds of one-time loading (docs/benchmarks.md).
    worker_preload: bool = Field(default=True, alias="LMFORGE_WORKER_PRELOAD")
    # How long every collective and the rendezvous of a data-parallel job may wait (seconds):
    # past it a rank that stopped answering fails the attempt with rank_failed (docs/deploy.md).
    ddp_timeout_s: float = Field(default=1800.0, gt=0, alias="LMFORGE_DDP_TIMEOUT_S")

    # -- Quotas and resource limits (docs/security.md, "Quotas and resource limits") ----------
    # A job's size, checked at submission (core.estimate; 422 job_too_large): its parameters,
    # and its estimated training memory (bytes) on its device class ("auto" must fit both).
    max_params: int = Field(default=200_000_000, ge=1, alias="LMFORGE_MAX_PARAMS")
    max_train_memory_bytes_cpu: int = Field(default=32 * 1024**3, ge=1,
                                            alias="LMFORGE_MAX_TRAIN_MEMORY_BYTES_CPU")
    max_train_memory_bytes_cuda: int = Field(default=80 * 1024**3, ge=1,
                                             alias="LMFORGE_MAX_TRAIN_MEMORY_BYTES_CUDA")
    # The most validation tokens one evaluation may read (training.eval_tokens may not exceed
    # it unless the validation split is smaller; 422 eval_too_large).
    max_eval_tokens: int = Field(default=10_000_000, ge=2, alias="LMFORGE_MAX_EVAL_TOKENS")
    # Per principal (admins are exempt; 0 = no limit): jobs running and jobs queued when a job
    # is submitted (429 quota_exceeded), bytes of stored datasets (409 quota_exceeded),
    # requests per minute (429 rate_limited with Retry-After, counted in Redis at REDIS_URL),
    # concurrent event streams per API process (GET /v1/jobs/{id}/events, app.quotas.stream_slot).
    quota_running_jobs: int = Field(default=4, ge=0, alias="LMFORGE_QUOTA_RUNNING_JOBS")
    quota_queued_jobs: int = Field(default=20, ge=0, alias="LMFORGE_QUOTA_QUEUED_JOBS")
    quota_dataset_bytes: int = Field(default=10 * 1024**3, ge=0,
                                     alias="LMFORGE_QUOTA_DATASET_BYTES")
    rate_limit_per_minute: int = Field(default=1200, ge=0, alias="LMFORGE_RATE_LIMIT_PER_MINUTE")
    quota_streams: int = Field(default=4, ge=0, alias="LMFORGE_QUOTA_STREAMS")
    # Largest request body other than a dataset upload (bytes; 413 payload_too_large).
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1,
                                     alias="LMFORGE_MAX_JSON_BODY_BYTES")

    # -- Inference (generate/score/classify; `lmforge serve`, docs/architecture.md) ----------
    # Where the API finds the inference server (`lmforge serve`).
    inference_url: str = Field(default="http://127.0.0.1:8765", alias="LMFORGE_INFERENCE_URL")
    # Loaded models the inference server keeps (LRU, keyed by checkpoint sha256).
    inference_cache_models: int = Field(default=4, ge=1, alias="LMFORGE_INFERENCE_CACHE_MODELS")
    # Where the inference server runs models: "auto" is CUDA when available, else the CPU.
    inference_device: Literal["auto", "cpu", "cuda"] = Field(default="auto",
                                                             alias="LMFORGE_INFERENCE_DEVICE")
    # Each inference request's deadline (seconds; a request may ask for less): 504 past it.
    inference_deadline_s: float = Field(default=30.0, gt=0, alias="LMFORGE_INFERENCE_DEADLINE_S")
    # Bounds of one request (422 past them).
    inference_max_prompt_chars: int = Field(default=10_000, ge=1,
                                            alias="LMFORGE_INFERENCE_MAX_PROMPT_CHARS")
    inference_max_text_chars: int = Field(default=100_000, ge=1,
                                          alias="LMFORGE_INFERENCE_MAX_TEXT_CHARS")
    inference_max_new_tokens: int = Field(default=2000, ge=1,
                                          alias="LMFORGE_INFERENCE_MAX_NEW_TOKENS")
    inference_max_samples: int = Field(default=16, ge=1, alias="LMFORGE_INFERENCE_MAX_SAMPLES")
    inference_max_texts: int = Field(default=256, ge=1, alias="LMFORGE_INFERENCE_MAX_TEXTS")

    # -- Job events (GET /v1/jobs/{id}/events, docs/events.md) ---------------------------------
    # A comment heartbeat after this many seconds without another event (seconds).
    events_heartbeat_s: float = Field(default=15.0, gt=0, alias="LMFORGE_EVENTS_HEARTBEAT_S")
    # While Redis cannot be reached, each stream reads the database this often (seconds).
    events_poll_s: float = Field(default=1.0, gt=0, alias="LMFORGE_EVENTS_POLL_S")
    # While Redis delivers, each stream still checks the database this often (seconds), for
    # the changes no process published (the sweeps' requeues and failures).
    events_reconcile_s: float = Field(default=5.0, gt=0, alias="LMFORGE_EVENTS_RECONCILE_S")
    # Each job's Redis stream keeps about this many entries (XADD MAXLEN ~).
    events_maxlen: int = Field(default=10_000, ge=100, alias="LMFORGE_EVENTS_MAXLEN")
    # A job's Redis stream expires this long after its terminal status (seconds); any stream
    # expires a week after its last entry.
    events_ttl_s: int = Field(default=3600, ge=1, alias="LMFORGE_EVENTS_TTL_S")

    # -- Object storage (docs/operations.md, "Object storage (S3)") -----------------------------
    # Where datasets and checkpoints are kept: unset, files under LMFORGE_HOME/storage;
    # "s3://BUCKET/PREFIX", an S3-compatible object store (store.s3storage; needs the "s3"
    # extra), reached at AWS_ENDPOINT_URL with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    # AWS_DEFAULT_REGION (read by boto3 itself). A malformed URL stops the process at start.
    storage_url: str | None = Field(default=None, alias="LMFORGE_STORAGE_URL")
    # Blobs at least this large are uploaded in parts of s3_multipart_chunk_bytes, several at a
    # time (boto3's TransferConfig); S3 needs parts of at least 5 MiB (bytes).
    s3_multipart_threshold_bytes: int = Field(default=64 * 1024**2, ge=5 * 1024**2,
                                              alias="LMFORGE_S3_MULTIPART_THRESHOLD_BYTES")
    s3_multipart_chunk_bytes: int = Field(default=16 * 1024**2, ge=5 * 1024**2,
                                          alias="LMFORGE_S3_MULTIPART_CHUNK_BYTES")
    # How buckets are addressed: "path" (http://HOST/BUCKET/KEY: MinIO and most self-hosted
    # stores), "virtual" (http://BUCKET.HOST/KEY) or "auto" (boto3 decides; AWS S3).
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", alias="LMFORGE_S3_ADDRESSING_STYLE")
    # With S3 storage: a checkpoint download is answered with 307 to a presigned URL of the
    # object that is valid this many seconds, instead of streaming it through the API. Unset:
    # the API streams it. Clients must then reach the store at AWS_ENDPOINT_URL themselves.
    download_presign_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600,
                                           alias="LMFORGE_DOWNLOAD_PRESIGN_S")

    @field_validator("storage_url")
    @classmethod
    def _valid_storage_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from store.storage import parse_storage_url

        parse_storage_url(value.strip())  # a ValueError names the variable and the problem
        return value.strip()

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a running job renews its lease (and polls for a cancel): a sixth of the
        lease, so five heartbeats can be missed before the job is presumed lost."""
        return max(self.heartbeat_timeout_s / 6, 0.05)

    @property
    def mlflow_tracking_uri_list(self) -> list[str]:
        """``LMFORGE_MLFLOW_TRACKING_URIS`` as a list (blank entries dropped)."""
        return [u.strip() for u in self.mlflow_tracking_uris.split(",") if u.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        """``LMFORGE_CORS_ORIGINS`` as a list (blank entries dropped)."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def storage_dir(self) -> Path:
        return self.lmforge_home / "storage"

    @property
    def cache_dir(self) -> Path:
        """Where the worker keeps token files: ``LMFORGE_TOKEN_CACHE_DIR``, else
        ``LMFORGE_HOME/cache/tokens``."""
        return self.token_cache_dir or self.lmforge_home / "cache" / "tokens"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.lmforge_home / 'lmforge.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
