"""Domain errors: a code for machines, a message for people, and the request field at fault.

Raised by the API's operations, the storage layer and the job status machine; mapped to HTTP
statuses in one place (``app.http_errors``). No web framework here: the worker and the storage
layer raise these without loading FastAPI or Starlette.
"""

from __future__ import annotations

from typing import Any


class LMForgeError(Exception):
    """Base of the domain errors: a code for machines, a message for people, optionally the
    request field at fault (dotted path, e.g. ``model.tie_weights``)."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.details = details or []


class NotFound(LMForgeError):
    status_code = 404
    code = "not_found"


class Conflict(LMForgeError):
    status_code = 409
    code = "conflict"


class WrongTask(Conflict):
    """A route or operation that does not apply to the job's task (e.g. ``generate`` on a
    classifier, ``classify`` or ``export`` of a language model's opposite)."""

    code = "wrong_task"


class ValidationFailed(LMForgeError):
    status_code = 422
    code = "validation_error"


class PayloadTooLarge(LMForgeError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(LMForgeError):
    status_code = 503
    code = "service_unavailable"
