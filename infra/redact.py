"""Credentials never reach a log line, a metric label or an error message.

``redact`` removes them from a text: the values of the standard AWS variables and
of credentials given in storage options, request signatures and the access key
id inside ``Authorization`` headers, URL passwords, key-shaped strings.
``redact_logs`` puts the same filter on the root logging handlers, so third-party
debug logs (botocore prints every signed request at DEBUG) are redacted too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 6  # shorter values (test placeholders) would redact common words
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
# A storage option is a credential when its name says so, whatever the filesystem
# (s3fs's key/secret/token, adlfs's account_key/credential/sas_token, gcsfs's token,
# an HTTP filesystem's headers: every header value); a *_version name is not.
_SECRET_NAME = re.compile(r"(?i)key|secret|token|passw|credential|auth|sas|signature|cookie|connection.?string")
_SECRET_PATTERNS = [
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+"),
    re.compile(r"([?&](?:Signature|AWSAccessKeyId|x-amz-security-token)=)[^&\s'\"]+"),  # a SigV2 presigned URL
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|key|token)"
               r"['\"]?\s*[:=]\s*b?['\"]?)[^\s,'\"}]+"),
    re.compile(r"(?i)(Credential=)[^/\s,'\"]+"),  # the access key id in an Authorization header
    re.compile(r"(?i)(Signature=)[0-9a-f]+"),
    re.compile(r"(?i)(Signature:\s*)[0-9a-f]{16,}"),  # botocore.auth's DEBUG line
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"),  # user:password@host
    # the same where a library printed the URL without its scheme (fsspec's HTTP errors)
    # (a whole word: not `--signal=B:USR1@90`)
    re.compile(r"(?:(?<=^)|(?<=[\s'\"\[]))[^/\s:@'\"=]+:[^/\s@'\"]+@(?=[\w\[])"),
]
_registered: set[str] = set()


def secret_option(name: object, within_headers: bool = False) -> bool:
    """Whether a storage option of this name (or any header) holds a credential."""
    text = str(name)
    return within_headers or (bool(_SECRET_NAME.search(text)) and not text.lower().endswith("_version"))


def register_secrets(options: Mapping[str, Any], within_headers: bool = False) -> None:
    """Remember credentials passed as storage options (``key``, ``secret``,
    ``account_key``, any header..., also inside ``client_kwargs``), so ``redact``
    removes them wherever they show up."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            register_secrets(value, within_headers or str(name).lower() == "headers")
        elif secret_option(name, within_headers) and isinstance(value, str):
            for part in (value, *value.split()):  # "Bearer <token>": the token alone, as it may be printed
                if len(part) >= MIN_SECRET_CHARS:
                    _registered.add(part)


def redact(text: str) -> str:
    """Remove credentials from a message: env secrets, signatures, key patterns."""
    secrets = {os.environ.get(var, "") for var in _ENV_SECRETS} | _registered
    for value in sorted((s for s in secrets if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def redact_tree(value: Any, within_headers: bool = False) -> Any:
    """A JSON-like value (a config as a dict) to write to a file: every string
    redacted, and the value of every credential key (``secret``, ``account_key``,
    any header, ...) replaced whatever it is."""
    if isinstance(value, Mapping):
        return {k: REDACTED if secret_option(k, within_headers) and v is not None and not isinstance(v, Mapping)
                else redact_tree(v, within_headers or str(k).lower() == "headers") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, within_headers) for v in value]
    return redact(value) if isinstance(value, str) else value


def one_line(text: str) -> str:
    """A message on one line (whitespace runs, newlines included, become one space), redacted."""
    return redact(" ".join(text.split()))


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line, redacted."""
    return one_line(f"{type(exc).__name__}: {exc}")


class RedactingFilter(logging.Filter):
    """Redacts each record's message (and traceback) before a handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = RedactingFilter()


def redact_logs() -> None:
    """Put the redacting filter on every handler of the root logger (call after
    configuring logging): records from any library pass through it."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FILTER)
