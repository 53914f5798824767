"""A real TCP proxy between a test's client and a server, to break things the way networks do:
``cut()`` drops every open connection at once (both sides closed, as a proxy or NAT timing
out would), and ``corrupt_body_byte(offset)`` flips one byte of the next response body in
flight. It also records each request's head (client -> server), so a test can check the
headers a client sent (e.g. ``Last-Event-ID`` on a reconnection).

Threads and sockets only; everything is closed by :meth:`close`."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

_HEAD_END = b"\r\n\r\n"


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    head: bytearray = field(default_factory=bytearray)  # a request head being read
    seen: bytearray = field(default_factory=bytearray)  # response bytes since corrupt armed


class TcpProxy:
    """Listens on 127.0.0.1 (``port``/``url``) and forwards each connection to
    ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.pairs: list[_Pair] = []
        self.request_heads: list[str] = []
        self.cuts = 0
        self._corrupt: tuple[bytes, int] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            pair = _Pair(conn, upstream)
            with self._lock:
                self.pairs.append(pair)
            self._start(self._pump_up, pair)
            self._start(self._pump_down, pair)

    def _pump_up(self, pair: _Pair) -> None:
        """Client -> server, recording request heads (a body is not recorded)."""
        try:
            while data := pair.client.recv(65536):
                if pair.head or data[:1].isupper():
                    pair.head += data
                    if _HEAD_END in pair.head:
                        head = bytes(pair.head).partition(_HEAD_END)[0]
                        with self._lock:
                            self.request_heads.append(head.decode("latin-1"))
                        pair.head = bytearray()
                pair.upstream.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _pump_down(self, pair: _Pair) -> None:
        """Server -> client, flipping one body byte when armed (:meth:`corrupt_body_byte`)."""
        try:
            while data := pair.upstream.recv(65536):
                buf = bytearray(data)
                with self._lock:
                    armed = self._corrupt
                if armed is not None:
                    marker, offset = armed
                    start = len(pair.seen)
                    pair.seen += buf
                    at = bytes(pair.seen).lower().find(marker.lower())
                    end = bytes(pair.seen).find(_HEAD_END, at) if at >= 0 else -1
                    i = end + len(_HEAD_END) + offset - start if end >= 0 else -1
                    if 0 <= i < len(buf):
                        buf[i] ^= 0xFF
                        with self._lock:
                            self._corrupt = None
                        pair.seen = bytearray()
                pair.client.sendall(bytes(buf))
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        with self._lock:
            if pair in self.pairs:
                self.pairs.remove(pair)
        for s in (pair.client, pair.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> int:
        """Drop every open connection now; returns how many. New connections are accepted
        as before."""
        with self._lock:
            pairs = list(self.pairs)
        for pair in pairs:
            self._drop(pair)
        self.cuts += 1
        return len(pairs)

    def open_connections(self) -> int:
        with self._lock:
            return len(self.pairs)

    def corrupt_body_byte(self, marker: bytes, offset: int) -> None:
        """Flip the byte at ``offset`` of the body of the next response whose head holds
        ``marker`` (case-insensitive), e.g. a header name only that response has."""
        with self._lock:
            self._corrupt = (marker, offset)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()
        for t in self._threads:
            t.join(timeout=5)
