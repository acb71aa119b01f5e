"""Prometheus implementation of the metrics sink: one HTTP endpoint per rank.

Each rank's main process serves ``bind:port_base + local_rank``; its DataLoader
workers write through prometheus_client's multiprocess mode into a directory of
that rank, and the endpoint sums them (counters and histograms across processes;
gauges report the most recent value). ``PROMETHEUS_MULTIPROC_DIR`` is set before
prometheus_client is first used, and workers mark themselves dead on exit
(``multiprocessing.util.Finalize``: atexit does not run in DataLoader workers).

Label values are limited to rank, backend, reason and source (a data source's
name: set in the config, or the last part of its URL without user or password)
— never paths, URLs or anything a credential could hide in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import socketserver
import tempfile
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from infra.files import atomic_write
from infra.metrics import METRICS, MetricSpec

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 64  # scrapes served at once; a connection past them is closed at once
CONNECTION_TIMEOUT_S = 10.0  # a client that sends or reads nothing for this long is dropped


class EndpointError(OSError):
    """The metrics endpoint could not be opened."""


class FolderInUse(EndpointError):
    """``metrics.multiproc_dir`` holds a live run's files."""


class PrometheusSink:
    def __init__(self, rank: int, local_rank: int, local_world_size: int, port_base: int = 9400,
                 bind: str = "127.0.0.1", multiproc_dir: str | None = None, backend: str = "cpu") -> None:
        self.rank, self.port = str(rank), port_base + local_rank
        self._own_root = None if multiproc_dir else tempfile.mkdtemp(prefix="mae-prom-")  # removed by close()
        directory = Path(multiproc_dir or self._own_root) / f"rank{rank}"
        _refuse_if_in_use(directory)
        shutil.rmtree(directory, ignore_errors=True)  # stale files of an earlier run would be summed in
        directory.mkdir(parents=True)
        (directory / OWNER_FILE).write_text(str(os.getpid()))
        self.directory = directory
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
            from prometheus_client.multiprocess import MultiProcessCollector
        except ImportError as e:
            raise ImportError("metrics need prometheus-client: pip install 'maescale[metrics]'") from e
        values.ValueClass = values.get_value_class()  # in case something imported it before the env was set
        self._metrics = {}
        for spec in METRICS.values():
            self._metrics[spec.name] = _make(spec, Counter, Gauge, Histogram)
        for spec in METRICS.values():  # series that exist from the start read 0, not "no data"
            if spec.kind == "counter" and set(spec.labels) <= {"rank", "backend"}:
                extra = {"backend": backend} if "backend" in spec.labels else {}
                self._metrics[spec.name].labels(rank=self.rank, **extra)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))
        try:
            self.server, self._thread = _serve(self.port, bind, registry)
        except OSError as e:  # an address that does not resolve, a port in use
            raise EndpointError(f"cannot serve metrics on {bind}:{self.port} ({e.strerror or e})") from None
        self.bind, self.local_world_size = bind, local_world_size
        self.file_sd_path: Path | None = None
        log.info("metrics endpoint http://%s:%d/metrics (rank %s)", f"[{bind}]" if ":" in bind else bind, self.port,
                 self.rank)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._metrics[name].labels(rank=self.rank, **labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._metrics[name].labels(rank=self.rank, **labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._metrics[name].labels(rank=self.rank, **labels).observe(value)

    def worker_init(self) -> None:
        """In a forked DataLoader worker: drop this pid's live gauges when it exits."""
        from multiprocessing.util import Finalize

        from prometheus_client import multiprocess

        Finalize(None, multiprocess.mark_process_dead, args=(os.getpid(), str(self.directory)), exitpriority=16)

    def write_file_sd(self, directory: str | os.PathLike[str], port_base: int, run: str = "") -> Path:
        """A Prometheus file_sd target file for this node's ranks (written by local
        rank 0), labelled with the node and the run, named by both and the ports;
        ``close`` removes it, so a run that ended is no longer scraped (a crashed one
        stays, and alerts)."""
        host = self.bind if self.bind not in ("0.0.0.0", "::") else socket.getfqdn()
        host = f"[{host}]" if ":" in host else host  # an IPv6 address in host:port
        node = socket.gethostname()
        run = re.sub(r"[^A-Za-z0-9_.-]", "_", run)[:64]
        labels = {"job": "maescale", "node": node, **({"run": run} if run else {})}
        targets = [{"targets": [f"{host}:{port_base + i}" for i in range(self.local_world_size)], "labels": labels}]
        # the ports tell apart the runs a node serves at once: two runs of one name must not share a file
        path = Path(directory) / (f"maescale-{node}-{run}-{port_base}.json" if run else f"maescale-{node}-{port_base}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file_sd_path = atomic_write(path, json.dumps(targets))
        return self.file_sd_path

    def close(self) -> None:
        if self.file_sd_path is not None:
            self.file_sd_path.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()
        if self._own_root is not None:  # each run left ~3 files per DataLoader worker per epoch in /tmp
            shutil.rmtree(self._own_root, ignore_errors=True)


OWNER_FILE = "owner.pid"


def _refuse_if_in_use(directory: Path) -> None:
    """A rank folder of ``metrics.multiproc_dir`` that a live process on this node
    still writes: a second run wiped it, and each endpoint then reported the other
    run's values."""
    try:
        pid = int((directory / OWNER_FILE).read_text())
        os.kill(pid, 0)
    except PermissionError:
        pass  # alive, another user's
    except (OSError, ValueError):
        return  # no owner, an unreadable one, or one that has ended
    if pid != os.getpid():
        raise FolderInUse(f"metrics.multiproc_dir {directory} is in use by process {pid} (another run on this "
                            "node): give each run its own folder, or leave the key unset for a temporary one")


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S  # socket timeout: an idle client does not hold its thread for good

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape would flood the run's log


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` of them: prometheus_client's
    own server starts one for every connection with no timeout, so idle connections
    piled up threads and open files until the trainer's DataLoader failed with "Too
    many open files"."""

    daemon_threads = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this one is closed, the run goes on
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics endpoint: a connection from %s failed", client_address, exc_info=True)


def _serve(port: int, bind: str, registry: object) -> tuple[WSGIServer, threading.Thread]:
    """The registry's /metrics on ``bind:port``, served from a daemon thread."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server = make_server(bind, port, make_wsgi_app(registry), server_class, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True)
    thread.start()
    return server, thread


def _make(spec: MetricSpec, Counter, Gauge, Histogram):
    # registry=None: in multiprocess mode the endpoint's MultiProcessCollector reads the files
    name = spec.name[: -len("_total")] if spec.kind == "counter" else spec.name
    if spec.kind == "counter":
        return Counter(name, spec.help, spec.labels, registry=None)
    if spec.kind == "gauge":
        return Gauge(name, spec.help, spec.labels, registry=None, multiprocess_mode="mostrecent")
    return Histogram(name, spec.help, spec.labels, registry=None, buckets=spec.buckets)
