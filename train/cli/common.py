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
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (else AWS_ENDPOINT_URL; credentials from the standard AWS chain)")
