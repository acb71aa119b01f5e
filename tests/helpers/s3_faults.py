"""moto's S3 server behind a small WSGI fault layer, for faults a real server
will not produce on demand: 503 SlowDown, 500, delays, truncated bodies, stalls.

Faults apply to GETs of object keys containing ``match``, each a given number of
times, in the order they were added.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

ERROR_XML = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'


@dataclass
class Fault:
    kind: str  # slowdown | error500 | delay | truncate | stall
    match: str
    times: int
    seconds: float = 0.0


class FaultInjector:
    def __init__(self, app) -> None:
        self.app = app
        self.faults: list[Fault] = []
        self.injected: list[str] = []
        self.object_gets = 0
        self._lock = threading.Lock()

    def add(self, kind: str, match: str = ".tar", times: int = 1, seconds: float = 0.0) -> None:
        with self._lock:
            self.faults.append(Fault(kind, match, times, seconds))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.injected.clear()

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path and f.times > 0:
                    f.times -= 1
                    self.injected.append(f.kind)
                    return f
        return None

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        fault = None
        if environ["REQUEST_METHOD"] == "GET" and "." in path.rsplit("/", 1)[-1]:
            with self._lock:
                self.object_gets += 1
            fault = self._take(path)
        if fault is None:
            return self.app(environ, start_response)
        if fault.kind in ("slowdown", "error500"):
            status, code = ("503 Slow Down", "SlowDown") if fault.kind == "slowdown" else ("500 Internal Server Error", "InternalError")
            body = ERROR_XML.replace(b"{code}", code.encode()).replace(b"{msg}", b"injected")
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if fault.kind == "delay":
            time.sleep(fault.seconds)
            return self.app(environ, start_response)
        # truncate / stall: real headers (full Content-Length), then part of the body
        captured = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        start_response(captured["status"], captured["headers"])

        def partial():
            yield body[: len(body) // 2]
            if fault.kind == "stall":
                time.sleep(fault.seconds)  # the client's read timeout fires first
            # returning early closes the connection short of Content-Length

        return partial()


class FaultyS3:
    """``with FaultyS3() as s3: s3.faults.add('slowdown', times=2)``."""

    def __init__(self) -> None:
        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, self.faults, threaded=True)
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
    an endpoint that hangs. ``with SilentEndpoint() as s: s.url``."""

    def __init__(self) -> None:
        import socket

        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.accepted: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)

    def __enter__(self) -> SilentEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import socket

        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self._server.close()
        for conn in self.accepted:
            conn.close()
