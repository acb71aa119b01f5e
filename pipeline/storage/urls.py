"""URLs to fsspec filesystems: plain paths and ``file://`` are local, anything else
(``s3://``, ``gs://``, ...) goes to its fsspec backend.

Every object-store client is made here, so every one gets the same settings:
connect and read timeouts always set, and the client's own retries off — the one
retry policy is ``pipeline.storage.retry``, which knows which errors heal.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

from infra.redact import redact, register_secrets
from pipeline.errors import ObjectNotAccessible
from pipeline.storage.config import StorageConfig, endpoint_problem


def split_url(url: str) -> tuple[str, str]:
    """'s3://b/x' -> ('s3', 'b/x'); plain paths and file:// -> ('file', abs path)."""
    protocol, path = fsspec.core.split_protocol(str(url))
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(os.path.expanduser(path))
    if protocol in ("http", "https"):  # fsspec's HTTP filesystem takes whole URLs
        return protocol, str(url).rstrip("/")
    return protocol, path.rstrip("/")


def is_local(url: str) -> bool:
    return split_url(url)[0] == "file"


def filesystem(url: str, config: StorageConfig | None = None, fresh: bool = False,
               parent: fsspec.AbstractFileSystem | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URL and the path within it. ``fresh`` skips
    fsspec's instance cache (needed after fork: s3fs's event loop is not fork-safe).
    ``parent``: the filesystem this process inherited through fork; a new S3 client
    reuses its botocore session (parsed service models, resolved credentials), which
    makes each DataLoader worker's client several times cheaper to create."""
    config = config or StorageConfig()
    protocol, path = split_url(url)
    options = config.fsspec_options()
    register_secrets(options)
    if fresh:
        options["skip_instance_cache"] = True
    if protocol == "s3":
        options = _s3_options(options, config)
        if getattr(parent, "session", None) is not None and "session" not in options:
            options["session"] = parent.session
    if protocol not in fsspec.available_protocols():
        raise ObjectNotAccessible(f"{redact(str(url))}: no filesystem for URLs of the form {protocol}://; give a local "
                                  "path, s3://bucket/prefix or another fsspec URL (gs://, az://, https://)")
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as e:
        install = "pip install 'maescale[s3]'" if protocol == "s3" else "install the fsspec backend it names"
        raise ImportError(f"reading {protocol}:// needs an fsspec backend: {install} ({e})") from e
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs retries some errors itself; ours decide
    return fs, path


def _s3_options(options: dict[str, Any], config: StorageConfig) -> dict[str, Any]:
    """Timeouts always set, botocore's retries off, the endpoint from the environment
    unless given; what the user put in ``options.config_kwargs`` wins."""
    kwargs = {"connect_timeout": config.connect_timeout_s, "read_timeout": config.read_timeout_s,
              "retries": {"total_max_attempts": 1}, **options.get("config_kwargs", {})}
    options = {**options, "config_kwargs": kwargs}
    endpoint = s3_endpoint(options)
    _check_endpoint(endpoint)
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
        options["endpoint_url"] = endpoint
    return options


def _check_endpoint(endpoint: str | None) -> None:
    """An endpoint from the environment is checked as ``--endpoint-url`` is: botocore
    would raise deep inside the first request, or retry a bad scheme as a network error."""
    problem = endpoint_problem(endpoint) if endpoint else None
    if problem is not None:
        raise ObjectNotAccessible(f"S3 endpoint {redact(endpoint)} {problem}; check AWS_ENDPOINT_URL or --endpoint-url")


def s3_endpoint(options: dict[str, Any]) -> str | None:
    """The S3 endpoint a client made from these options talks to (None: AWS's own)."""
    return (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def location(url: str, config: StorageConfig | None = None) -> str:
    """How messages name where an object lives: the URL and, on S3, the endpoint."""
    protocol, _ = split_url(url)
    if protocol != "s3":
        return redact(str(url))
    endpoint = s3_endpoint((config or StorageConfig()).fsspec_options()) or "AWS"
    return redact(f"{url} (endpoint {endpoint})")


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"
