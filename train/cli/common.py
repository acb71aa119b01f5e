"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


MAX_IMG_SIZE = 4096  # a model of 16,000 px failed deep in torch's allocator (its position embedding)


def whole(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [lo, hi] (no upper bound without ``hi``); '2e9' is accepted."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and number.is_integer()):
                raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
            value = int(number)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi, False, False)}, got {text}")
        return value
    return parse


def number(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False,
           open_hi: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi]; ``open_lo``/``open_hi`` exclude the bound itself."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and (lo < value if open_lo else lo <= value)
                and (value < hi if open_hi else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(lo, hi, open_lo, open_hi)}, "
                                             f"got {text}")
        return value
    return parse


def _bounds(lo: float, hi: float | None, open_lo: bool, open_hi: bool) -> str:
    def show(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) else f"{x:g}"

    if hi is None or math.isinf(hi):
        return f"{'>' if open_lo else '>='} {show(lo)}"
    if math.isinf(lo):
        return f"{'<' if open_hi else '<='} {show(hi)}"
    return f"in {'(' if open_lo else '['}{show(lo)}, {show(hi)}{')' if open_hi else ']'}"


def non_empty(text: str) -> str:
    """An argparse type: a name or path that is not empty ('' would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parts_of(valid: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma list of at least one of ``valid`` (a benchmark's parts)."""
    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(p for p in text.split(",") if p)
        unknown = sorted(set(parts) - set(valid))
        if unknown or not parts:
            raise argparse.ArgumentTypeError(f"unknown parts {unknown}; valid: {', '.join(valid)}")
        return parts

    return parse


def torch_device(text: str) -> str:
    """An argparse type: 'cpu', or a CUDA device torch sees ('cuda', 'cuda:1')."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1 ...)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def non_empty_path(text: str) -> Path:
    return Path(non_empty(text))


def check_model(name: str, img_size: int | None = None, what: str = "--model") -> None:
    """``name`` is a registered model that builds at ``img_size`` (if given); else an
    ``OptionError`` naming the argument. The size rules are the model config's own."""
    from infra.options import require
    from model.registry import list_models
    from train.config import sized_model_config

    require(name in list_models(), what, f"must be one of {', '.join(list_models())}; got {name!r}")
    sized_model_config(name, img_size, field="--img-size")


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


OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*=.*", re.S)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``a.b=value`` overrides after an option
    (``data.url=x --world 2 data.seed=3``) join the command's ``overrides`` instead
    of failing as unrecognized arguments."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(OVERRIDE.fullmatch(e) for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
