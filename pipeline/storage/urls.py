"""URLs to fsspec filesystems: plain paths and ``file://`` are local, anything else
(``s3://``, ``gs://``, ...) goes to its fsspec backend."""

from __future__ import annotations

import os

import fsspec

from pipeline.storage.config import StorageConfig


def split_url(url: str) -> tuple[str, str]:
    """'s3://b/x' -> ('s3', 'b/x'); plain paths and file:// -> ('file', abs path)."""
    protocol, path = fsspec.core.split_protocol(str(url))
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(os.path.expanduser(path))
    return protocol, path.rstrip("/")


def is_local(url: str) -> bool:
    return split_url(url)[0] == "file"


def filesystem(url: str, config: StorageConfig | None = None, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URL and the path within it. ``fresh`` skips
    fsspec's instance cache (needed after fork: s3fs's event loop is not fork-safe)."""
    config = config or StorageConfig()
    protocol, path = split_url(url)
    options = config.fsspec_options()
    if fresh:
        options["skip_instance_cache"] = True
    if protocol == "s3":
        if config.read_timeout_s:
            kwargs = dict(options.get("config_kwargs", {}))
            kwargs.setdefault("read_timeout", config.read_timeout_s)
            kwargs.setdefault("connect_timeout", config.read_timeout_s)
            options["config_kwargs"] = kwargs
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
            options["endpoint_url"] = endpoint
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as e:
        extra = {"s3": "s3", "gs": "gcs (pip install gcsfs)"}.get(protocol, protocol)
        raise ImportError(f"reading {protocol}:// needs an fsspec backend: pip install 'maescale[{extra}]' ({e})") from e
    if config.backend_retries is not None and hasattr(fs, "retries"):
        fs.retries = config.backend_retries
    return fs, path


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"
