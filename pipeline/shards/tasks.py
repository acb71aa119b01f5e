"""Running the independent tasks of an ingest job (a shard to write, a batch of tars
to index) here or on a Ray cluster, yielding each result as it completes.

The caller plans the tasks first and each task writes its own output atomically
and idempotently, so where a task ran changes nothing in the output, and a task
that Ray retries after losing its worker or node writes the same bytes again.
Ray is imported only here, and only when asked for (`pip install 'maescale[ray]'`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import DistributedError

log = logging.getLogger(__name__)
K = TypeVar("K")
TASK_RETRIES = 3  # Ray reruns a task whose worker died this many times


@dataclass(frozen=True)
class RayTarget:
    """Where to run: ``address`` of a running cluster ('auto', 'ray://host:10001',
    'host:6379'), or None to start a local one with ``num_cpus``."""

    address: str | None = None
    num_cpus: int | None = None


def run_tasks(fn: Callable[..., Any], calls: Sequence[tuple], keys: Sequence[K], workers: int = 1,
              processes: bool = False, ray: RayTarget | None = None) -> Iterator[tuple[K, Any]]:
    """``fn(*call)`` for every call, as ``(key, result)`` in completion order: on Ray
    when ``ray`` is given, else ``workers`` threads (or spawned processes)."""
    if ray is not None:
        yield from _on_ray(fn, calls, keys, ray)
        return
    if workers <= 1 or len(calls) <= 1:
        for key, call in zip(keys, calls):
            yield key, fn(*call)
        return
    pool = (cf.ProcessPoolExecutor(min(workers, len(calls)), mp_context=multiprocessing.get_context("spawn"))
            if processes else cf.ThreadPoolExecutor(min(workers, len(calls))))  # fsspec's IO thread dies in fork
    with pool:
        futures = {pool.submit(fn, *call): key for key, call in zip(keys, calls)}
        try:
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:  # a failed task, or the caller stopped: queued tasks never start
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"--ray needs Ray: pip install 'maescale[ray]' ({e})") from e
    return ray


def connect(target: RayTarget) -> Any:
    """The ray module, connected to the target cluster (once per process)."""
    ray = import_ray()
    if not ray.is_initialized():
        if target.address is None:
            ray.init(num_cpus=target.num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            check_reachable(target.address)
            ray.init(address=target.address, log_to_driver=False)
        log.info("ray: %s CPUs in the cluster", ray.cluster_resources().get("CPU", 0))
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` cluster address answers a TCP connection: Ray itself retries an
    unreachable one for minutes. 'auto' and 'ray://' addresses are Ray's to check."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise DistributedError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                               "`ray start --head`, or give --ray alone for a local one") from None


def cluster_cpus(target: RayTarget) -> int:
    return int(connect(target).cluster_resources().get("CPU", 1))


def _on_ray(fn: Callable[..., Any], calls: Sequence[tuple], keys: Sequence[K], target: RayTarget
            ) -> Iterator[tuple[K, Any]]:
    ray = connect(target)
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(fn)
    refs = {remote.remote(*call): key for key, call in zip(keys, calls)}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:  # our own error inside the task: raise it as it is
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else DistributedError(str(e))) from None
            except ray.exceptions.RayError as e:
                raise DistributedError(f"a Ray task failed after {TASK_RETRIES} retries "
                                       f"({type(e).__name__}); finished work is kept, rerun to resume") from None
            yield refs[done[0]], result
    except BaseException:
        if target.address is None:  # a Ctrl-C: the local cluster's agents outlived the driver
            ray.shutdown()
        raise
    finally:
        for ref in pending:
            ray.cancel(ref)

