"""A small threaded HTTP fault proxy for S3 tests: it sits on loopback in front of the real S3
API server (moto's server mode), passes every request through, and injects programmable faults
into the requests that match a rule:

- ``503``: ``503 SlowDown`` with S3's XML error body (throttling);
- ``500``: ``500 InternalError`` with S3's XML error body;
- ``reset``: the request is read, then the TCP connection is reset (RST, no response);
- ``slow``: the response is held back ``delay_s`` seconds, then passed through.

A rule matches on the HTTP method (``None``: any) and a regular expression searched in the
path (with query); it fires for the first ``first`` matching requests, or for a ``fraction`` of
them (seeded, so a run is reproducible), or for every one (``always``). Every request is logged
(method, path, status or fault) so tests can check that faults really happened and that the
client retried. Of the headers, only the access key *id* of SigV4 signatures is kept (to check
which credentials a client used); secrets never reach a proxy, and no header is logged.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset", "slow")
_ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Rule:
    kind: str
    method: str | None = None
    path: str = ""
    first: int | None = None  # fire for the first N matching requests
    fraction: float | None = None  # or for this share of them (seeded)
    always: bool = False  # or for every matching request
    delay_s: float = 0.0  # for kind "slow"
    seed: int = 0
    matched: int = 0
    fired: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {KINDS}")
        if sum(x is not None and x is not False for x in (self.first, self.fraction, self.always or None)) != 1:
            raise ValueError("a rule needs exactly one of first=, fraction=, always=True")
        self._rng = random.Random(self.seed)
        self._re = re.compile(self.path)

    def decide(self, method: str, path: str) -> bool:
        """Whether this request gets the fault (called under the proxy's lock)."""
        if (self.method is not None and method != self.method) or not self._re.search(path):
            return False
        self.matched += 1
        if self.always:
            fire = True
        elif self.first is not None:
            fire = self.matched <= self.first
        else:
            fire = self._rng.random() < float(self.fraction or 0.0)
        self.fired += fire
        return fire


@dataclass
class Entry:
    method: str
    path: str
    outcome: str  # upstream status code as text, or the fault kind


class FaultProxy:
    """``with FaultProxy(upstream) as p: p.endpoint`` -- an S3 endpoint with faults on demand."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (u.hostname, u.port)
        self.rules: list[Rule] = []
        self.log: list[Entry] = []
        self.access_key_ids: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

            def log_message(self, *args: object) -> None:  # no per-request stderr lines
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                method, path = self.command, self.path
                akid = re.search(r"Credential=([^/,\s]+)/", self.headers.get("Authorization", ""))
                with proxy.lock:
                    if akid:
                        proxy.access_key_ids.add(akid.group(1))
                    rule = next((r for r in proxy.rules if r.decide(method, path)), None)
                    proxy.log.append(Entry(method, path, rule.kind if rule else "pending"))
                    entry = proxy.log[-1]
                if rule is not None and rule.kind == "reset":
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # RST: the client sees "connection reset by peer"
                    return
                if rule is not None and rule.kind in _ERRORS:
                    code, reason, err, msg = _ERRORS[rule.kind]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{err}</Code>'
                           f"<Message>{msg}</Message><RequestId>faultproxy</RequestId></Error>").encode()
                    self.send_response(code, reason)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(xml)
                    return
                if rule is not None and rule.kind == "slow":
                    time.sleep(rule.delay_s)  # the injected fault itself: a slow endpoint
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                if body or method in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(method, path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    entry.outcome = str(resp.status)
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            self.send_header(k, v)
                    if method == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # resets and client hang-ups
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="faultproxy", daemon=True)

    # -- control ------------------------------------------------------------------------------
    def add(self, kind: str, method: str | None = None, path: str = "", **how: object) -> Rule:
        """Add a fault rule (see ``Rule``); rules are tried in the order they were added."""
        rule = Rule(kind, method, path, **how)  # type: ignore[arg-type]
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def entries(self, method: str | None = None, path: str = "") -> list[Entry]:
        rx = re.compile(path)
        with self.lock:
            return [e for e in self.log if (method is None or e.method == method) and rx.search(e.path)]

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
