"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.storage.config import RetryPolicy, StorageConfig

    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (else AWS_ENDPOINT_URL; credentials from the standard AWS chain)")
    p.add_argument("--connect-timeout", type=float, default=StorageConfig.connect_timeout_s, metavar="S",
                   help="seconds to connect to the object store before the attempt fails")
    p.add_argument("--read-timeout", type=float, default=StorageConfig.read_timeout_s, metavar="S",
                   help="seconds without a byte from the object store before the attempt fails")
    p.add_argument("--deadline", type=float, default=RetryPolicy.deadline_s, metavar="S",
                   help="seconds after which no further retry of one object operation starts")


def storage_config(args: argparse.Namespace, **fields: object):
    """The StorageConfig the storage arguments (``add_storage_arguments``) describe."""
    from pipeline.storage.config import RetryPolicy, StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url, connect_timeout_s=args.connect_timeout,
                         read_timeout_s=args.read_timeout, retry=RetryPolicy(deadline_s=args.deadline), **fields)


def add_ray_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the tasks on a Ray cluster: its address ('auto', 'ray://head:10001'), or no value to "
                        "start a local one (pip install 'maescale[ray]')")


def ray_target(args: argparse.Namespace, workers: int | None):
    """The RayTarget ``--ray`` names (None without it); a local cluster gets ``workers`` CPUs."""
    from pipeline.shards.tasks import RayTarget

    if args.ray is None:
        return None
    return RayTarget(None, workers) if args.ray == "local" else RayTarget(args.ray)
