"""The submission's side of a job's outbound URLs: the webhook (``notify.url``) and the MLflow
``tracking_uri``, checked against the deployment's rules (:mod:`core.outbound`,
docs/security.md "Outbound requests"), and the job's delivery row.

Called by :func:`app.jobs.create_job`; the delivery itself is :mod:`app.webhooks`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.errors import ValidationFailed
from core.outbound import url_problem
from core.spec import JobSpec, MlflowIntegration
from store.models import Job, WebhookDelivery, new_id
from store.settings import Settings


def _allowed_by_prefix(url: str, prefixes: list[str]) -> bool:
    """``url`` starts with one of ``prefixes`` at a boundary (``http://a:5000`` allows
    ``http://a:5000`` and ``http://a:5000/x``, not ``http://a:50001``)."""
    for prefix in prefixes:
        p = prefix.rstrip("/")
        if url == p or url.startswith(p + "/"):
            return True
    return False


def check_outbound_urls(spec: JobSpec, settings: Settings) -> None:
    """Raise :class:`ValidationFailed` (422) naming ``notify.url`` or
    ``integrations.<i>.tracking_uri`` when the service will not call it:

    - ``notify`` while the deployment has no ``LMFORGE_WEBHOOK_SECRET`` (webhooks are off);
    - a webhook URL whose host is a private, loopback, link-local or multicast address or a
      local name, unless ``LMFORGE_WEBHOOK_ALLOW_PRIVATE``;
    - a tracking URI that is private by the same rule and is not under one of
      ``LMFORGE_MLFLOW_TRACKING_URIS``."""
    if spec.notify is not None:
        if not settings.webhook_secret:
            raise ValidationFailed(
                "notify is not available: this service has no webhook secret "
                "(LMFORGE_WEBHOOK_SECRET), so it sends no webhooks", field="notify.url")
        problem = url_problem(spec.notify.url, allow_private=settings.webhook_allow_private)
        if problem is not None:
            raise ValidationFailed(f"notify.url {problem}", field="notify.url")
    for i, integration in enumerate(spec.integrations):
        if not isinstance(integration, MlflowIntegration):
            continue
        if _allowed_by_prefix(integration.tracking_uri, settings.mlflow_tracking_uri_list):
            continue
        problem = url_problem(integration.tracking_uri, allow_private=False)
        if problem is not None:
            field = f"integrations.{i}.tracking_uri"
            raise ValidationFailed(
                f"{field} {problem}; a private MLflow server must be listed in the "
                "service's LMFORGE_MLFLOW_TRACKING_URIS", field=field)


def add_delivery(session: Session, job: Job, spec: JobSpec) -> None:
    """The job's webhook row (``waiting`` until the job finishes), when its spec has one.
    Not committed: it commits with the job."""
    if spec.notify is None:
        return
    session.add(WebhookDelivery(id=new_id("whd"), job_id=job.id, url=spec.notify.url,
                                state="waiting", attempts=0))
