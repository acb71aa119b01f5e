"""Where the labels of tars indexed in place come from (`mae index --label-from`).

A rule is recorded in the manifest (``options.label_from``) and applied the same
way by the indexer (to count classes) and by every reader (to label a sample), so
no per-sample label list is stored. Rules are plain names, never patterns: the
manifest is untrusted, and a regular expression from it could hang a reader.

- ``cls``: the sample's ``.cls`` member, an integer class index (webdataset's
  convention); classes are named ``0`` .. ``max``.
- ``dir``: the first folder of the sample's key (``n01440764/n01440764_10026`` ->
  ``n01440764``); classes are the sorted names found.
- ``prefix:SEP``: the key's file name up to the first ``SEP`` (``n01440764_10026``
  with ``prefix:_`` -> ``n01440764``).
- ``none``: unlabelled, even where ``.cls`` members exist.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import ManifestError, SourceError

RULES = ("cls", "dir", "prefix:SEP", "none")
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; integer labels make this many names


def integer_classes(top: int, where: str) -> list[str]:
    """The names "0".."top" of integer labels, refused beyond ``MAX_CLASSES``: one
    label of 10**12 must not make a list of 10**12 names."""
    if top >= MAX_CLASSES:
        raise SourceError(f"{where}: label {top} would make more than {MAX_CLASSES:,} classes; labels are class "
                          "indices from 0")
    return [str(i) for i in range(top + 1)]
_MAX_SEP = 8


class LabelRule:
    """One parsed ``--label-from`` rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.kind, _, self.sep = text.partition(":")
        if self.kind not in ("cls", "dir", "prefix", "none") or (self.kind == "prefix") != bool(self.sep):
            raise ManifestError(f"label rule {text[:40]!r} is not one of {', '.join(RULES)}")
        if len(self.sep) > _MAX_SEP or "/" in self.sep:
            raise ManifestError(f"label rule {text[:40]!r}: the separator must be 1-{_MAX_SEP} characters, no '/'")

    @property
    def from_keys(self) -> bool:
        """Class names come from sample keys (sorted), not from ``.cls`` numbers."""
        return self.kind in ("dir", "prefix")

    def class_name(self, key: str) -> str | None:
        """The class a key names under ``dir`` / ``prefix`` (None: the key has none)."""
        if self.kind == "dir":
            head, sep, _ = key.partition("/")
            return head if sep and head else None
        if self.kind == "prefix":
            base = key.rsplit("/", 1)[-1]
            head, sep, _ = base.partition(self.sep)
            return head if sep and head else None
        return None

    def members(self, key: str, members: dict[str, bytes], index: Mapping[str, int]) -> dict[str, bytes]:
        """A sample's members as the decode backends read labels: ``.cls`` holds the
        class index the rule gives (``b"?"`` — a bad label, skipped — when the key names
        no known class); removed under ``none``."""
        if self.kind == "cls":
            return members
        members = {ext: data for ext, data in members.items() if ext != "cls"}
        if self.from_keys:
            label = index.get(self.class_name(key) or "")
            members["cls"] = b"?" if label is None else str(label).encode()
        return members


def rule_of(options: Mapping[str, object]) -> LabelRule | None:
    """The label rule a manifest's options name, or None (labels as stored)."""
    text = options.get("label_from")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ManifestError(f"options.label_from must be a string, got {type(text).__name__}")
    return LabelRule(text)
