"""moto's S3 server behind a small WSGI fault layer, for faults a real server will
not produce on demand: 503 SlowDown, 500, delays, connection resets, truncated
bodies, stalls.

Two ways to inject, on GETs of object keys containing ``match``:

- ``faults.add(kind, match, times)``: exactly these faults, in the order added;
- ``faults.set_rate(0.1, kinds, seed)``: each GET fails with probability ``rate``,
  the kind drawn at random (seeded) — the chaos soak's object store.

``injected`` lists the kinds injected so far; ``object_gets`` counts object GETs and
``user_agents`` their User-Agent headers.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

ERROR_XML = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'
KINDS = ("slowdown", "error500", "delay", "reset", "truncate", "stall")
# Injected only by ``add``, never drawn by ``set_rate``: a server that ignores ranged
# GETs (the whole object, 200, with its Content-Length or, unsized, without one:
# permanent), and a body cut after three small pieces sent apart (transient; the
# retry's chunks then start at other offsets than the cut attempt's), and a body
# dribbled a byte every ``seconds`` (under any read timeout: a stall no timeout sees).
# ``wrong_region``: the 400 S3 answers a request signed for another region than the
# bucket's; ``request_timeout``: S3's 400 for a request it gave up waiting on (its
# client retries it); ``empty_416``: a range refused with no body (as a proxy may answer);
# ``html_403``: a proxy's HTML page refusing the request (no S3 error code); ``other_bytes``:
# a 206 of the asked length for the range one byte before (after, at offset 0), saying so.
IGNORE_RANGE = ("ignore_range", "ignore_range_unsized")
MISBEHAVIOURS = (*IGNORE_RANGE, "cut_in_pieces", "drip", "wrong_region", "request_timeout", "empty_416",
                 "html_403", "other_bytes")


@dataclass
class Fault:
    kind: str  # one of KINDS
    match: str
    times: int
    seconds: float = 0.0


@dataclass
class FaultRate:
    rate: float
    kinds: tuple[str, ...]
    match: str
    seconds: float  # delay and stall length
    rng: random.Random


class FaultInjector:
    def __init__(self, app) -> None:
        self.app = app
        self.faults: list[Fault] = []
        self.random_faults: FaultRate | None = None
        self.injected: list[str] = []
        self.object_gets = 0
        self.user_agents: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, match: str = ".tar", times: int = 1, seconds: float = 0.0) -> None:
        if kind not in KINDS + MISBEHAVIOURS:
            raise ValueError(f"fault kind must be one of {', '.join(KINDS + MISBEHAVIOURS)}; got {kind!r}")
        with self._lock:
            self.faults.append(Fault(kind, match, times, seconds))

    def set_rate(self, rate: float, kinds: tuple[str, ...] = KINDS, seed: int = 0, match: str = "",
                 seconds: float = 2.0) -> None:
        """Fail each matching object GET with probability ``rate`` (0 turns it off)."""
        unknown = set(kinds) - set(KINDS)
        if unknown or not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1] and kinds among {KINDS}; got {rate}, {sorted(unknown)}")
        with self._lock:
            self.random_faults = FaultRate(rate, tuple(kinds), match, seconds, random.Random(seed)) if rate else None

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.injected.clear()
            self.random_faults = None

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path and f.times > 0:
                    f.times -= 1
                    self.injected.append(f.kind)
                    return f
            r = self.random_faults
            if r is not None and r.match in path and r.rng.random() < r.rate:
                kind = r.rng.choice(r.kinds)
                self.injected.append(kind)
                return Fault(kind, r.match, 1, r.seconds)
        return None

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        fault = None
        if environ["REQUEST_METHOD"] == "GET" and "." in path.rsplit("/", 1)[-1]:
            with self._lock:
                self.object_gets += 1
                self.user_agents[environ.get("HTTP_USER_AGENT", "")] += 1
            fault = self._take(path)
        if fault is None:
            return self.app(environ, start_response)
        if fault.kind in ("slowdown", "error500"):
            status, code = ("503 Slow Down", "SlowDown") if fault.kind == "slowdown" else ("500 Internal Server Error", "InternalError")
            body = ERROR_XML.replace(b"{code}", code.encode()).replace(b"{msg}", b"injected")
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if fault.kind == "wrong_region":
            msg = b"Error parsing the X-Amz-Credential parameter; the region is wrong; expecting &apos;eu-west-1&apos;"
            body = ERROR_XML.replace(b"{code}", b"AuthorizationQueryParametersError").replace(b"{msg}", msg)
            start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                                               ("x-amz-bucket-region", "eu-west-1")])
            return [body]
        if fault.kind == "request_timeout":
            body = ERROR_XML.replace(b"{code}", b"RequestTimeout").replace(b"{msg}", b"Your socket connection to the "
                                                                          b"server was not read from or written to")
            start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if fault.kind == "empty_416":
            start_response("416 Requested Range Not Satisfiable", [("Content-Length", "0")])
            return [b""]
        if fault.kind == "html_403":
            body = b"<html><body><h1>403 Forbidden</h1>blocked by the proxy</body></html>"
            start_response("403 Forbidden", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))])
            return [body]
        if fault.kind == "other_bytes":
            first, last = map(int, environ["HTTP_RANGE"].removeprefix("bytes=").split("-"))
            shift = -1 if first > 0 else 1
            return self.app({**environ, "HTTP_RANGE": f"bytes={first + shift}-{last + shift}"}, start_response)
        if fault.kind in IGNORE_RANGE:
            whole = {k: v for k, v in environ.items() if k != "HTTP_RANGE"}
            if fault.kind == "ignore_range":
                return self.app(whole, start_response)

            def unsized(status, headers, exc_info=None):
                return start_response("200 OK", [(k, v) for k, v in headers if k.lower() != "content-length"], exc_info)

            return self.app(whole, unsized)
        if fault.kind == "delay":
            time.sleep(fault.seconds)
            return self.app(environ, start_response)
        if fault.kind == "reset":
            _reset(environ["werkzeug.socket"])
            raise ConnectionResetError("injected reset")  # the handler drops the dead connection
        # truncate / stall / cut_in_pieces / drip: real headers (full Content-Length), then (part of) the body
        captured = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        start_response(captured["status"], captured["headers"])

        def partial():
            if fault.kind == "drip":
                for i in range(len(body)):
                    yield body[i:i + 1]
                    time.sleep(fault.seconds)
                return
            if fault.kind == "cut_in_pieces":
                for start in range(0, min(3000, len(body) // 2), 1000):
                    yield body[start:start + 1000]
                    time.sleep(0.1)
                return
            yield body[: len(body) // 2]
            if fault.kind == "stall":
                time.sleep(fault.seconds)  # the client's read timeout fires first
            # returning early closes the connection short of Content-Length

        return partial()


def _reset(sock: socket.socket) -> None:
    """Abort the connection: RST instead of FIN, before any response byte."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)


class _QuietHandler(WSGIRequestHandler):
    """No access log; a connection the fault layer aborted is not an error."""

    def log_request(self, *args, **kwargs) -> None:
        pass

    def log_error(self, *args, **kwargs) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, OSError):
            pass


class FaultyS3:
    """``with FaultyS3() as s3: s3.faults.add('slowdown', times=2)``."""

    def __init__(self) -> None:
        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, self.faults, threaded=True, request_handler=_QuietHandler)
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="fake",
                            aws_secret_access_key="fake-secret", region_name="us-east-1")


class SilentEndpoint:
    """A loopback TCP server that accepts every connection and never sends a byte:
    an endpoint that hangs. ``with SilentEndpoint() as s: s.url``. With ``answer``,
    it sends those bytes after the request's first bytes arrive (not HTTP: an
    endpoint that is some other service), and keeps the connection open."""

    def __init__(self, answer: bytes = b"") -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.answer = answer
        self.accepted: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)
            if self.answer:
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(self.answer)

    def __enter__(self) -> SilentEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._server.close()
        for conn in self.accepted:
            conn.close()
