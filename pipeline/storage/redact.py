"""Credentials never reach a log line, a metric label or an error message."""

from __future__ import annotations

import os
import re

_SECRET_PATTERNS = [
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+"),
    re.compile(r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|key|token)['\"]?\s*[:=]\s*['\"]?)[^\s,'\"}]+"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"),  # user:password@host
]


def redact(text: str) -> str:
    """Remove credentials from a message: env secrets, signatures, key patterns."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "<redacted>")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "<redacted>", text)
    return text


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, redacted."""
    return redact(f"{type(exc).__name__}: {exc}")
