"""Outbound URLs a job names (a webhook's ``notify.url``, an MLflow ``tracking_uri``): which
ones the service will call.

A URL a user names makes the service send requests from inside its network, so it is held to
three rules (docs/security.md, "Outbound requests"):

- ``http`` or ``https`` only, with a host, no user-info (``user:pass@``), no fragment, at most
  2000 characters, no control characters.
- The host must not be a private, loopback, link-local, multicast, reserved, unspecified or
  shared (CGNAT) address, nor a name that stands for one (``localhost``, ``*.localhost``,
  ``*.local``, ``*.internal``), unless the deployment allows private targets. Checked on the
  name at submission (:func:`url_problem`) and on every address the name resolves to just
  before each request (:func:`resolve_public`), against DNS rebinding; the request is then
  sent to the address that was checked.
- Redirects are never followed (a redirect to a private address would bypass the check).

Standard library only (``ipaddress``, ``socket``, ``urllib.parse``), so that the spec, the API
and the worker share one rule.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_URL_CHARS = 2000
_BLOCKED_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_BLOCKED_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(ValueError):
    """A URL, or an address its host resolved to, that the service will not call."""


def syntax_problem(url: str) -> str | None:
    """Why ``url`` is not an acceptable outbound URL by its form alone (scheme, host,
    user-info, port, length), or None. The message starts with what is wrong."""
    if len(url) > MAX_URL_CHARS:
        return f"is longer than {MAX_URL_CHARS} characters"
    if any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"must be an http or https URL (got scheme {parts.scheme or 'none'!r})"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password (user:pass@)"
    if parts.fragment:
        return "must not contain a fragment (#...)"
    if port == 0:
        return "must not use port 0"
    return None


def host_of(url: str) -> str:
    """The URL's host, lower-case, without IPv6 brackets."""
    host = urlsplit(url).hostname
    if not host:
        raise OutboundRefused("the URL names no host")
    return host.lower().rstrip(".")


def address_problem(address: IPAddress) -> str | None:
    """Why the service must not call ``address`` (a private or special-purpose address), or
    None for a global unicast one. IPv4-mapped IPv6 addresses are judged as their IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, flag in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                       ("multicast", address.is_multicast),
                       ("unspecified", address.is_unspecified),
                       ("reserved", address.is_reserved), ("private", address.is_private)):
        if flag:
            return f"{address} is a {kind} address"
    if not address.is_global:  # 100.64.0.0/10 (shared, CGNAT) and other non-global ranges
        return f"{address} is not a public address"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def name_problem(host: str) -> str | None:
    """Why ``host`` (as written in a URL) names a private target: an address literal that
    :func:`address_problem` refuses, or a name reserved for local use; else None. Says
    nothing of what a public-looking name resolves to (:func:`resolve_public` does)."""
    literal = _literal(host)
    if literal is not None:
        return address_problem(literal)
    if host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES):
        return f"{host} names a local host"
    if "." not in host:
        return f"{host} is not a fully qualified name (a local host)"
    return None


def url_problem(url: str, *, allow_private: bool) -> str | None:
    """Why the service must not call ``url`` as written (its form, and unless
    ``allow_private`` its host by name), or None. Used at submission."""
    problem = syntax_problem(url)
    if problem is not None or allow_private:
        return problem
    return name_problem(host_of(url))


@dataclass(frozen=True)
class Target:
    """Where one request goes: the URL as given, its host and port, and the checked address
    to connect to."""

    url: str
    host: str
    port: int
    address: str


def resolve_public(url: str, *, allow_private: bool,
                   resolver: Callable[..., Any] = socket.getaddrinfo) -> Target:
    """Resolve ``url``'s host now and check every address it resolves to (a name that
    resolves to any private address is refused, as a rebinding attacker's name would be).
    Returns the first address, to which the caller connects (so that the request goes to the
    address that was checked, not to a second resolution's answer).

    Raises :class:`OutboundRefused` for a refused URL or address, and when the name does not
    resolve (``socket.gaierror``'s message). ``resolver``: ``socket.getaddrinfo`` or a
    function of the same signature (a test's DNS server that answers as a rebinding attacker
    would)."""
    problem = syntax_problem(url)
    if problem is not None:
        raise OutboundRefused(f"the URL {problem}")
    parts = urlsplit(url)
    host = host_of(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not allow_private:
        problem = name_problem(host)
        if problem is not None:
            raise OutboundRefused(problem)
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OutboundRefused(f"{host} does not resolve ({exc})") from exc
    addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
    if not addresses:
        raise OutboundRefused(f"{host} does not resolve")
    if not allow_private:
        for a in addresses:
            problem = address_problem(ipaddress.ip_address(a))
            if problem is not None:
                raise OutboundRefused(f"{host} resolves to {problem}")
    return Target(url=url, host=host, port=port, address=addresses[0])
