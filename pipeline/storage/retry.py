"""Which object-store errors heal by retrying, and the retry loop itself: the one
retry policy every object-store call goes through (reads, writes, listings).

Transient failures (5xx, 503 SlowDown, resets, refused connections, truncated
bodies, timeouts) are retried with exponential backoff and full jitter until
``max_attempts`` or the ``deadline_s`` of the operation; permanent ones fail at
once: a missing object or bucket, denied or missing credentials, a request the
server calls invalid, a local file whose bytes do not match their checksum.
Either way the caller gets one ``ShardFetchError`` naming what was read, where
(URL and endpoint), and the cause — redacted.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from infra.files import NotAFileError
from infra.redact import describe
from pipeline.errors import ObjectMissing, ObjectNotAccessible, ShardCorrupt, ShardFetchError
from pipeline.storage.config import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "requests", "gcsfs")
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError"}
_INVALID_REQUEST_ERRORS = {"ParamValidationError", "InvalidS3AddressingStyleError", "NoRegionError",
                           "InvalidRegionError"}
# s3fs turns S3 error codes into OSError errnos; these do not change on a retry
_PERMANENT_ERRNOS = {errno.EINVAL: "the server rejected the request as invalid",
                     errno.EPERM: "the server does not allow this request",
                     errno.ENOSYS: "the server does not implement this request",
                     errno.ENAMETOOLONG: "name too long",
                     getattr(errno, "EREMCHG", errno.ENOENT): "redirected: the bucket is in another region or "
                                                               "behind another endpoint",
                     errno.ENOSPC: "no space left on the local disk",
                     errno.EROFS: "read-only file system"}


_NOT_FOUND = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_MISSING = (NotAFileError, *_NOT_FOUND)  # a problem of one object, not of the store or the credentials


class ChecksumMismatch(Exception):
    """Bytes read do not match their recorded sha256. Retried when they came over
    the network (a corrupt body); ``permanent`` when a retry cannot change them
    (a local file, or the same wrong bytes twice)."""

    cause = "checksum mismatch"  # what a permanent one is called in the error

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def permanent_cause(exc: BaseException) -> str | None:
    """Why retrying ``exc`` cannot help, or None when it might."""
    if isinstance(exc, ChecksumMismatch):
        return exc.cause if exc.permanent else None
    if isinstance(exc, PermissionError):
        return "access denied (check credentials)"
    if isinstance(exc, NotAFileError):
        return exc.strerror
    if isinstance(exc, _NOT_FOUND):
        return "not found"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _CREDENTIAL_ERRORS:
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or an instance role)"
    if names & _INVALID_REQUEST_ERRORS:
        return "invalid request"
    if isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError)):
        return _PERMANENT_ERRNOS.get(exc.errno)
    return None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying. s3fs surfaces stalls as FSTimeoutError and even
    IndexError, and 5xx/SlowDown as plain OSError, so the net is wide on purpose."""
    if permanent_cause(exc) is not None:
        return False
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, EOFError, IndexError, ConnectionError,
                        ChecksumMismatch)):
        return True
    return type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES


def no_event(name: str, n: int) -> None:
    """The default ``on_event``: retries and errors are not counted anywhere."""


def with_retries(what: str, where: str, fn: Callable[[], T], policy: RetryPolicy,
                 on_event: Callable[[str, int], None] = no_event) -> T:
    """Call ``fn``, retrying transient failures until ``policy.max_attempts`` or its
    deadline; permanent ones and exhausted retries become one ``ShardFetchError``
    naming ``what`` and ``where`` (already redacted: see ``urls.location``)."""
    start = time.monotonic()
    for attempt in itertools.count(1):
        try:
            return fn()
        except Exception as e:  # classified below; unknown kinds are re-raised as is
            cause = permanent_cause(e)
            if cause is not None:
                on_event("fetch_error", 1)
                error = (ShardCorrupt if isinstance(e, ChecksumMismatch) else ObjectMissing if isinstance(e, _MISSING)
                         else ObjectNotAccessible)
                raise error(f"{what} at {where}: {cause} ({describe(e)})") from None
            if not is_transient(e):
                raise
            elapsed, delay = time.monotonic() - start, policy.delay(attempt)
            if attempt >= policy.max_attempts or elapsed + delay >= policy.deadline_s:
                on_event("fetch_error", 1)
                kind = "checksum mismatch" if isinstance(e, ChecksumMismatch) else "failed"
                limit = "" if attempt >= policy.max_attempts else f", deadline {policy.deadline_s:g} s"
                error = ShardCorrupt if isinstance(e, ChecksumMismatch) else ShardFetchError
                raise error(f"{what} at {where}: {kind} after {attempt} attempts in {elapsed:.1f} s"
                            f"{limit} (last: {describe(e)})") from None
            on_event("fetch_retry", 1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs",
                        what, attempt, policy.max_attempts, describe(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
