"""Which object-store errors heal by retrying, and the retry loop itself.

Transient failures (5xx, 503 SlowDown, resets, truncated bodies, stalls) are
retried with exponential backoff and full jitter; permanent ones (missing
object, denied credentials) and exhausted retries become one ``ShardFetchError``
naming what was read, where, and the cause — redacted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import ObjectNotAccessible, ShardFetchError
from pipeline.storage.config import RetryPolicy
from pipeline.storage.redact import describe, redact

log = logging.getLogger(__name__)
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "requests", "gcsfs")


class ChecksumMismatch(Exception):
    """Bytes read do not match their recorded sha256 (retried: a corrupt body)."""


def is_permanent(exc: BaseException) -> bool:
    """Missing objects and denied access do not heal by retrying."""
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying. s3fs surfaces stalls as FSTimeoutError and even
    IndexError, and 5xx/SlowDown as plain OSError, so the net is wide on purpose."""
    if is_permanent(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, EOFError, IndexError, ConnectionError,
                        ChecksumMismatch)):
        return True
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def with_retries(what: str, url: str, fn: Callable[[], Any], policy: RetryPolicy,
                 on_event: Callable[[str, int], None] = lambda name, n: None) -> Any:
    """Call ``fn``, retrying transient failures; permanent ones and exhausted
    retries become one ``ShardFetchError`` naming ``what`` and the cause."""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except Exception as e:  # classified below; unknown kinds are re-raised as is
            if is_permanent(e):
                cause = "access denied (check credentials)" if isinstance(e, PermissionError) else "not found"
                on_event("fetch_error", 1)
                raise ObjectNotAccessible(f"{what} at {redact(url)}: {cause} ({describe(e)})") from None
            if not is_transient(e):
                raise
            if attempt == policy.max_attempts:
                on_event("fetch_error", 1)
                kind = "checksum mismatch" if isinstance(e, ChecksumMismatch) else "failed"
                raise ShardFetchError(f"{what} at {redact(url)}: {kind} after {attempt} attempts "
                                      f"(last: {describe(e)})") from None
            delay = policy.delay(attempt)
            on_event("fetch_retry", 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs",
                        what, attempt, policy.max_attempts, describe(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
