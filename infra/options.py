"""Documented, range-checked configuration fields, shared by every config dataclass.

A config field is declared with ``option(default, "what it means")``: the text is
kept as field metadata, so the README's configuration reference is generated from
the dataclasses themselves (no source parsing). ``require`` raises ``OptionError``
naming the field; the YAML loader prefixes the section path (``data.plan.seed``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

DOC = "doc"


class OptionError(ValueError):
    """A config value is out of range; ``field`` names it within its dataclass."""

    def __init__(self, field: str, requirement: str) -> None:
        super().__init__(f"{field} {requirement}")
        self.field, self.requirement = field, requirement


def option(default: Any = dataclasses.MISSING, doc: str = "", *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its one-line documentation."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={DOC: doc})
    return dataclasses.field(default=default, metadata={DOC: doc})


def doc_of(f: dataclasses.Field) -> str:
    return f.metadata.get(DOC, "")


def require(ok: bool, field: str, requirement: str) -> None:
    """``require(x > 0, "batch_size", f"must be positive, got {x}")``."""
    if not ok:
        raise OptionError(field, requirement)


def require_positive(obj: object, *names: str) -> None:
    """Each named field is a finite number above zero."""
    for name in names:
        value = getattr(obj, name)
        require(math.isfinite(value) and value > 0, name, f"must be positive, got {value}")


def require_choice(obj: object, name: str, choices: tuple[str, ...] | list[str]) -> None:
    value = getattr(obj, name)
    require(value in choices, name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def require_fraction(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(0 <= value <= 1, name, f"must be in [0, 1], got {value}")


def require_non_negative(obj: object, *names: str) -> None:
    """Each named field is a finite number, zero or more."""
    for name in names:
        value = getattr(obj, name)
        require(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")


def require_positive_or_none(obj: object, *names: str) -> None:
    """Each named field is unset (None) or a finite number above zero."""
    for name in names:
        if getattr(obj, name) is not None:
            require_positive(obj, name)


def require_text(obj: object, *names: str) -> None:
    """Each named field is a non-empty string (None allowed where the field is optional)."""
    for name in names:
        value = getattr(obj, name)
        require(value is None or (isinstance(value, str) and value.strip() != ""), name,
                f"must not be empty, got {value!r}")
