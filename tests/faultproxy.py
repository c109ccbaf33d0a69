"""A fault-injecting HTTP reverse proxy for tests: 127.0.0.1 in front of an S3 server (moto).

For a share of requests it answers what a real object store answers on a bad day instead of
forwarding them:

* ``slowdown``: 503 with S3's ``SlowDown`` XML error body (throttling);
* ``internal``: 500 with S3's ``InternalError`` XML error body;
* ``reset``: the request is read, then the connection is reset (TCP RST, no response);
* ``cut``: the upstream's response headers and half its body, then a reset (GET with a body only).

Which requests fail is decided by a seeded hash of (method, path, how many times this method and
path were requested before), so the faults do not depend on the order in which concurrent
clients arrive, and a path never fails more than ``max_consecutive`` times in a row (set it
above a client's retry budget to watch that client give up). ``fail_first`` makes the first
requests for given paths fail whatever the share (so a test can be sure a fault lands there). Keys in ``deny`` always get 403
``AccessDenied`` (a permanent refusal, never counted as an injected fault). Every request is
logged, so a test can tell an injected fault from the retry that followed it.

Objects in tests are small: request and response bodies are buffered whole.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULT_KINDS = ("slowdown", "internal", "reset", "cut")
READ_METHODS = ("GET", "HEAD")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


@dataclass(frozen=True)
class Entry:
    """One request the proxy saw and what it did with it."""

    method: str
    path: str  # decoded, without the query: "/bucket/key"
    query: str
    outcome: str  # "forwarded", "denied", or a fault kind
    status: int | None  # the status sent (None for a reset)
    at: float = 0.0  # time.monotonic() when the request arrived

    @property
    def fault(self) -> bool:
        return self.outcome in FAULT_KINDS


class FaultProxy:
    """``with FaultProxy(upstream, share=0.25, seed=1) as proxy: ... proxy.url ... proxy.faults``."""

    def __init__(self, upstream: str, *, share: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS,
                 methods: tuple[str, ...] = READ_METHODS, max_consecutive: int = 2, deny: tuple[str, ...] = (),
                 fail_first: dict[str, int] | None = None):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.share = share
        self.seed = seed
        self.kinds = tuple(kinds)
        self.methods = tuple(m.upper() for m in methods)
        self.max_consecutive = max_consecutive
        self.deny = {"/" + d.lstrip("/") for d in deny}  # "bucket/key" or "/bucket/key"
        self.fail_first = {"/" + p.lstrip("/"): n for p, n in (fail_first or {}).items()}
        self._path_seen: Counter = Counter()  # path -> requests so far (any method)
        self.log: list[Entry] = []
        self._seen: Counter = Counter()  # (method, path, query) -> requests so far
        self._streak: Counter = Counter()  # (method, path, query) -> faults in a row
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:  # noqa: PYI034 - a plain class, never subclassed
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- what happened ---------------------------------------------------------------------------

    def entries(self, path: str | None = None) -> list[Entry]:
        with self._lock:
            return [e for e in self.log if path is None or e.path == "/" + path.lstrip("/")]

    @property
    def faults(self) -> Counter:
        """Injected faults by kind."""
        return Counter(e.outcome for e in self.entries() if e.fault)

    @property
    def n_faults(self) -> int:
        return sum(self.faults.values())

    @property
    def n_requests(self) -> int:
        return len(self.entries())

    # --- the decision ----------------------------------------------------------------------------

    def decide(self, method: str, path: str, query: str, has_body: bool) -> str:
        """What to do with this request: "forwarded", "denied", or a fault kind."""
        if path in self.deny:
            return "denied"
        key = (method, path, query)
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
            nth_on_path = self._path_seen[path]
            self._path_seen[path] += 1
            kinds = [k for k in self.kinds if k != "cut" or (method == "GET" and has_body)] or ["reset"]
            if nth_on_path < self.fail_first.get(path, 0):
                return kinds[nth_on_path % len(kinds)]
            if method not in self.methods or self._streak[key] >= self.max_consecutive:
                self._streak[key] = 0
                return "forwarded"
            digest = hashlib.sha256(f"{self.seed}|{method}|{path}|{query}|{n}".encode()).digest()
            roll = int.from_bytes(digest[:8], "big") / 2**64
            if roll >= self.share:
                self._streak[key] = 0
                return "forwarded"
            self._streak[key] += 1
            return kinds[digest[8] % len(kinds)]

    def _record(self, entry: Entry) -> None:
        with self._lock:
            self.log.append(entry)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        owner = self.owner
        at = time.monotonic()
        body = self._read_body()
        split = urlsplit(self.path)
        path, query = unquote(split.path), split.query
        # Any GET answer can be cut mid-body (an object, a listing, an error); HEAD has no body.
        outcome = owner.decide(self.command, path, query, has_body=self.command == "GET")
        if outcome == "reset":
            owner._record(Entry(self.command, path, query, outcome, None, at))
            self._reset()
            return
        if outcome in _ERRORS:
            status, code, message = _ERRORS[outcome]
            owner._record(Entry(self.command, path, query, outcome, status, at))
            self._error(status, code, message, path)
            return
        upstream = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reply_headers = response.status, response.getheaders()
        finally:
            upstream.close()
        if outcome == "cut" and len(data) < 2:  # nothing to cut: reset instead
            outcome = "reset"
        owner._record(Entry(self.command, path, query, outcome, None if outcome == "reset" else status, at))
        if outcome == "reset":
            self._reset()
            return
        self.send_response(status)
        for name, value in reply_headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command == "HEAD":
            return
        if outcome == "cut":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, path: str) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "faultproxy")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a dropped connection looks."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
