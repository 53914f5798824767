"""The API's client of the inference server (``lmforge serve``, :mod:`worker.serve.app`).

The API stays torch-free: it resolves the job, its owner and the checkpoint row from the
database, then asks the inference server, a separate process that may import torch, over
HTTP (httpx). Every payload carries ``{"checkpoint": {"storage_key", "sha256", "id"}}`` and the
request's ``deadline_s`` (seconds); the server reads the checkpoint from storage itself.

Errors, in the API's one error shape (:mod:`app.http_errors`), raised as
:class:`InferenceError`:

- 504 ``deadline_exceeded``: the server said the deadline passed, or no answer came within the
  deadline (plus :data:`GRACE_S` for the transfer);
- 503 ``inference_unavailable`` (``Retry-After``): the server cannot be reached (not running,
  refusing connections);
- an error the server answers in the error shape with a 4xx, 501, 503 (``blob_missing``,
  ``checkpoint_corrupt``) or 504 is passed through with its status, code, message and field;
- 502 ``inference_failed``: any other 5xx of the server, or an error not in the error shape.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from core.errors import LMForgeError

log = logging.getLogger(__name__)

# Seconds added to a request's deadline for the HTTP round trip before the client gives up
# (the server enforces the deadline itself, between generated tokens).
GRACE_S = 2.0
# Seconds to wait for a TCP connection to the server before calling it unavailable.
CONNECT_TIMEOUT_S = 2.0
# Retry-After of a 503 inference_unavailable (seconds).
RETRY_AFTER_S = 5


class InferenceError(LMForgeError):
    """An error of an inference request, with the HTTP status it maps to."""

    def __init__(self, status_code: int, code: str, message: str, *, field: str | None = None,
                 details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, field=field, details=details)
        self.status_code = status_code
        self.headers = headers or {}


def deadline_exceeded(deadline_s: float) -> InferenceError:
    return InferenceError(504, "deadline_exceeded",
                          f"the inference did not finish within its deadline of {deadline_s:g} "
                          "s; ask for fewer tokens or samples, a shorter text, or a longer "
                          "deadline_s (at most LMFORGE_INFERENCE_DEADLINE_S)")


def unavailable(url: str) -> InferenceError:
    return InferenceError(503, "inference_unavailable",
                          f"the inference server ({url}) is not reachable; start it with "
                          "`lmforge serve` (`lmforge up` starts it) and retry",
                          headers={"Retry-After": str(RETRY_AFTER_S)})


class InferenceClient:
    """Calls the inference server at ``base_url`` (``LMFORGE_INFERENCE_URL``)."""

    def __init__(self, base_url: str, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport

    def _post(self, path: str, payload: dict[str, Any], deadline_s: float) -> httpx.Response:
        body = {**payload, "deadline_s": deadline_s}
        timeout = httpx.Timeout(deadline_s + GRACE_S, connect=CONNECT_TIMEOUT_S)
        try:
            with httpx.Client(base_url=self.base_url, timeout=timeout,
                              transport=self._transport) as client:
                resp = client.post(path, json=body)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise unavailable(self.base_url) from exc
            raise deadline_exceeded(deadline_s) from exc
        except httpx.TransportError as exc:
            log.warning("inference server %s unreachable: %s", self.base_url, exc)
            raise unavailable(self.base_url) from exc
        if resp.status_code >= 400:
            raise self._error(resp, deadline_s)
        return resp

    def _error(self, resp: httpx.Response, deadline_s: float) -> InferenceError:
        status = resp.status_code
        try:
            err = resp.json()["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            err, code, message = {}, "", ""
        if code and (400 <= status < 500 or status in (501, 503, 504)):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
            return InferenceError(status, code, message, field=err.get("field"),
                                  details=err.get("details") or None, headers=headers)
        if status == 504:
            return deadline_exceeded(deadline_s)
        if status == 503:
            return unavailable(self.base_url)
        log.error("inference server answered %s: %s", status, resp.text[:500])
        detail = f" ({code}: {message})" if code else ""
        return InferenceError(502, "inference_failed",
                              f"the inference server failed with {status}{detail}; the details "
                              "are in its log")

    def post_json(self, path: str, payload: dict[str, Any], deadline_s: float
                  ) -> dict[str, Any]:
        """POST ``payload`` (plus ``deadline_s``) as JSON to ``path``; the JSON object answered.
        Raises :class:`InferenceError` (see the module docstring)."""
        resp = self._post(path, payload, deadline_s)
        try:
            out = resp.json()
        except ValueError as exc:
            raise InferenceError(502, "inference_failed",
                                 "the inference server answered something that is not JSON"
                                 ) from exc
        if not isinstance(out, dict):
            raise InferenceError(502, "inference_failed",
                                 "the inference server answered something that is not a "
                                 "JSON object")
        return out

    def post_bytes(self, path: str, payload: dict[str, Any], deadline_s: float
                   ) -> tuple[bytes, dict[str, str]]:
        """POST ``payload`` (plus ``deadline_s``) as JSON to ``path``; the body answered and
        its headers (lower-case names). Raises :class:`InferenceError`."""
        resp = self._post(path, payload, deadline_s)
        return resp.content, {k.lower(): v for k, v in resp.headers.items()}
