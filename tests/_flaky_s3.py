"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto): object storage as it fails in the wild.

Every request is forwarded to the endpoint, except that with probability ``rate`` (drawn from a seeded random
generator) one fault is injected instead, chosen evenly among :data:`FAULTS`:

- ``slowdown``: answered ``503 SlowDown`` without reaching the endpoint (S3's request-rate refusal);
- ``reset_before``: the connection reset before the request is forwarded (nothing happened);
- ``reset_after``: the request forwarded and done, then the connection reset before the answer (it happened, the
  client does not know: a retry must be harmless).

``injected`` counts the faults by kind and ``faulted`` lists them with the request each replaced or cut
(``(kind, method, path)``). The proxy is off (``rate`` 0) until :meth:`FlakyS3.faults` turns it on.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from _ports import free_port


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on a free loopback port (``env``: more environment variables of the server);
    returns the process and its endpoint once it accepts connections."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("moto server did not start")


FAULTS = ("slowdown", "reset_before", "reset_after")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>flaky</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyS3:
    """The proxy: ``endpoint`` is its URL; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate = 0.0
        self.kinds: tuple[str, ...] = FAULTS
        self.focus: tuple[str, ...] = ()  # paths (parts of) whose requests get faults at focus_rate instead
        self.focus_rate = 0.0
        self.injected: collections.Counter[str] = collections.Counter()
        self.faulted: list[tuple[str, str, str]] = []
        self.forwarded = 0
        self._random = random.Random(0)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-s3", daemon=True)

    def start(self) -> FlakyS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @contextlib.contextmanager
    def faults(
        self,
        rate: float,
        seed: int = 0,
        kinds: tuple[str, ...] = FAULTS,
        focus: tuple[str, ...] = (),
        focus_rate: float = 0.0,
    ) -> Iterator[FlakyS3]:
        """Inject faults into a share ``rate`` of the requests while in the block, ``focus_rate`` of those whose
        path holds one of ``focus``; ``injected``, ``faulted`` and ``forwarded`` restart empty."""
        with self._lock:
            self.rate, self.kinds, self._random = rate, kinds, random.Random(seed)
            self.focus, self.focus_rate = focus, focus_rate
            self.injected.clear()
            self.faulted.clear()
            self.forwarded = 0
        try:
            yield self
        finally:
            with self._lock:
                self.rate, self.focus = 0.0, ()

    def draw(self, method: str = "", path: str = "") -> str | None:
        """The fault for the next request (``method`` ``path``), or None to forward it."""
        with self._lock:
            rate = self.focus_rate if any(part in path for part in self.focus) else self.rate
            if rate <= 0 or self._random.random() >= rate:
                self.forwarded += 1
                return None
            kind = self._random.choice(self.kinds)
            self.injected[kind] += 1
            self.faulted.append((kind, method, path))
            return kind


def _handler(proxy: FlakyS3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pools use it

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            """Close with a TCP reset (SO_LINGER 0): the client sees 'connection reset by peer'."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                return answer.status, answer.reason, answer.getheaders(), data
            finally:
                upstream.close()

        def _handle(self) -> None:
            body = self._body()
            fault = proxy.draw(self.command, self.path)
            if fault == "reset_before":
                return self._reset()
            if fault == "slowdown":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN)
                return
            status, reason, headers, data = self._forward(body)
            if fault == "reset_after":
                return self._reset()
            self.send_response(status, reason)
            for key, value in headers:
                if key.lower() not in HOP_BY_HOP and key.lower() not in ("content-length", "server", "date"):
                    self.send_header(key, value)
            length = dict((k.lower(), v) for k, v in headers).get("content-length", str(len(data)))
            self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
