"""The shard manifest: the one file that says what a dataset is.

Written last and atomically by the writer, so a manifest never points at a shard
that is not fully written. Versioned; readers refuse versions they do not know.

A manifest from elsewhere is untrusted input: ``from_json`` checks every field
(types, ranges, names, hashes, counts) and raises one ``ManifestError`` naming
the first field that is wrong. Shard names stay inside the dataset (relative,
no ``..``), and sha256 values are exactly 64 lowercase hex digits, since cache
paths are made from them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import ManifestError
from pipeline.shards.labels import LabelRule
from pipeline.storage.objects import ObjectFolder, is_sha256, is_xxh3_128

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "maescale-shards"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest of a million shards is ~200 MB
MAX_KEYS_BYTES = 2**30  # a beton's sample keys, one short line each: ~60 MB for ImageNet
MAX_RECORD_BYTES = 64 * 2**20  # the record beside a written shard or an indexed batch: kilobytes
MAX_SHARD_BYTES = 2**40
MIN_SAMPLE_BYTES = 512  # every sample has at least one tar header block
# Samples one shard may claim: a reader permutes a shard's samples in memory, so a
# forged count of 2**31 had every rank allocate 16 GiB. A tar shard holds thousands;
# a .beton is one shard of the whole dataset (ImageNet-21k: 14M), so the cap is 2**27
# (a 1 GiB permutation at most).
MAX_SHARD_SAMPLES = 2**27
MAX_ETAG_CHARS = 256
DATASET_FORMATS = ("tar", "beton")
# relative names whose every part starts with [A-Za-z0-9_-] (so none is '.' or '..'):
# safe as they are, without a closer look (shard names, tar member names)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
# newlines, terminal escapes, NUL, bidi overrides, undecodable bytes (lone surrogates)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the dataset URL (or to data_url)
    samples: int
    bytes: int
    sha256: str | None  # None only for a tar indexed in place without --hash
    # tars indexed in place (`mae index`): the object's ETag when indexed, and the
    # sha256 of its header blocks, which readers check against the tar they read
    etag: str | None = None
    headers_sha256: str | None = None
    # a fast checksum beside sha256 (readers verify with it by default); manifests
    # written before it existed have none
    xxh3_128: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The manifest entry: optional fields only when set, so a shard written by
        `mae shard` reads exactly as in manifests before they existed."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str


def read_record(folder: ObjectFolder, name: str) -> dict | None:
    """The JSON object an earlier run left beside its work (a written shard's record,
    an indexed batch's), or None when there is none we could have written: missing,
    over ``MAX_RECORD_BYTES``, not JSON (or nested past the parser's depth) or not an
    object. The work is then done again."""
    data = folder.read_if_exists(name, MAX_RECORD_BYTES)
    if data is None or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def safe_relative_name(name: str) -> bool:
    """A name that stays inside its folder: relative, ``/``-separated parts that are
    neither empty, ``.`` nor ``..``; no backslash, no control character."""
    if len(name) <= 1024 and PLAIN_NAME.fullmatch(name):
        return True  # the common case, e.g. shard-000123.tar
    if not name or len(name) > 1024 or name.startswith("/") or "\\" in name or _CONTROL.search(name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def printable(text: str) -> bool:
    """No control characters: safe to print to a terminal or write to a log."""
    return not _CONTROL.search(text)


def shown(name: str) -> str:
    """A name safe to print and to record: as it is when printable, else with its
    control characters (and undecodable bytes) escaped."""
    return name if printable(name) else repr(name)[1:-1]


@dataclass
class ShardManifest:
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)  # label i = classes[i]; empty = unlabelled
    rejects: list[Reject] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)  # how it was written
    data_url: str | None = None  # where the shards are, when not beside the manifest (`mae index --out`)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def to_json(self) -> str:
        doc = {"format": self.format, "version": self.version,
               "total_samples": self.total_samples, "total_bytes": self.total_bytes,
               "classes": self.classes, "shards": [s.to_dict() for s in self.shards],
               "rejects": [asdict(r) for r in self.rejects], "options": self.options}
        if self.data_url is not None:
            doc["data_url"] = self.data_url
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> ShardManifest:
        """Parse and validate an untrusted manifest; ``ManifestError`` names the field."""
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB; refusing to parse it")
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where} is not valid JSON: {e}") from None
        except RecursionError:
            raise ManifestError(f"{where} is not a manifest: JSON nested too deeply") from None
        return _ManifestReader(where).read(doc)


_NOTHING = object()  # fail(): no value to show


class _ManifestReader:
    """Field-by-field validation of a parsed manifest document."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, requirement: str, value: Any = _NOTHING) -> ManifestError:
        shown = "" if value is _NOTHING else f", got {_show(value)}"
        return ManifestError(f"{self.where}: {key} {requirement}{shown}")

    def read(self, doc: Any) -> ShardManifest:
        if not isinstance(doc, dict):
            raise ManifestError(f"{self.where} is not a JSON object")
        if doc.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{self.where} is not a maescale shard manifest (format {_show(doc.get('format'))})")
        if doc.get("version") != MANIFEST_VERSION or isinstance(doc.get("version"), bool):
            raise ManifestError(f"{self.where} has version {_show(doc.get('version'))}; "
                                f"this maescale reads version {MANIFEST_VERSION}")
        known = {"format", "version", "total_samples", "total_bytes", "classes", "shards", "rejects", "options",
                 "data_url"}
        self.no_unknown_keys(doc, known, "the manifest")
        manifest = ShardManifest(shards=self.shards(doc), classes=self.classes(doc.get("classes", [])),
                                 rejects=self.rejects(doc.get("rejects", [])),
                                 options=self.options(doc.get("options", {})), data_url=self.data_url(doc))
        for key, actual in (("total_samples", manifest.total_samples), ("total_bytes", manifest.total_bytes)):
            if doc.get(key) != actual or isinstance(doc.get(key), bool):
                raise self.fail(key, f"must equal the sum over shards ({actual})", doc.get(key))
        return manifest

    def no_unknown_keys(self, obj: dict, known: set[str], what: str) -> None:
        unknown = sorted(set(obj) - known)
        if unknown:
            raise self.fail(what, f"has an unknown field {_show(unknown[0])}")

    def shards(self, doc: dict) -> list[ShardInfo]:
        if "shards" not in doc:
            raise self.fail("shards", "is missing")
        if not isinstance(doc["shards"], list):
            raise self.fail("shards", "must be a list", doc["shards"])
        entries = [_plain_shard(e) or self.shard(e, f"shards[{i}]") for i, e in enumerate(doc["shards"])]
        seen: set[str] = set()
        digests: dict[str, str] = {}
        for i, s in enumerate(entries):
            if s.name in seen:
                raise self.fail(f"shards[{i}].name", "repeats an earlier shard", s.name)
            seen.add(s.name)
            if s.sha256 and digests.setdefault(s.sha256, s.name) != s.name:  # each sample read twice an epoch
                raise self.fail(f"shards[{i}].sha256", f"equals that of {digests[s.sha256]!r}: the same bytes "
                                "listed twice under two names", s.name)
        return entries

    def shard(self, entry: Any, key: str) -> ShardInfo:
        """One shard entry checked field by field, for the message that names the field."""
        if not isinstance(entry, dict):
            raise self.fail(key, "must be an object with name, samples, bytes and sha256", entry)
        self.no_unknown_keys(entry, {"name", "samples", "bytes", "sha256", "etag", "headers_sha256", "xxh3_128"}, key)
        name = self.string(entry, "name", key, safe_relative_name,
                           "must be a relative name inside the dataset (no '..', no leading '/', no backslash)")
        samples = self.count(entry, "samples", key, 1, MAX_SHARD_SAMPLES)  # writers list no empty shard
        size = self.count(entry, "bytes", key, 0, MAX_SHARD_BYTES)
        headers = self.optional(entry, "headers_sha256", key, is_sha256, "must be 64 lowercase hex digits")
        digest = (self.string(entry, "sha256", key, is_sha256, "must be 64 lowercase hex digits") if headers is None
                  else self.optional(entry, "sha256", key, is_sha256, "must be 64 lowercase hex digits"))
        etag = self.optional(entry, "etag", key, lambda v: 0 < len(v) <= MAX_ETAG_CHARS and printable(v),
                             f"must be a printable string of at most {MAX_ETAG_CHARS} characters")
        fast = self.optional(entry, "xxh3_128", key, is_xxh3_128, "must be 32 lowercase hex digits")
        if samples * MIN_SAMPLE_BYTES > size:
            raise self.fail(f"{key}.samples", f"({samples}) cannot fit in {size} bytes")
        return ShardInfo(name, samples, size, digest, etag, headers, fast)

    def optional(self, obj: dict, name: str, key: str, ok: Callable[[str], bool], requirement: str) -> str | None:
        return self.string(obj, name, key, ok, requirement) if obj.get(name) is not None else None

    def data_url(self, doc: dict) -> str | None:
        value = doc.get("data_url")
        if value is None:
            return None
        if not isinstance(value, str) or not value or len(value) > 4096 or not printable(value):
            raise self.fail("data_url", "must be a URL without control characters", value)
        if "://" not in value and not value.startswith("/"):
            raise self.fail("data_url", "must be a URL (s3://, gs://, file://) or an absolute path", value)
        if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise self.fail("data_url", "must not carry credentials", "<redacted>")
        return value.rstrip("/")

    def classes(self, value: Any) -> list[str]:
        classes = self.list_of(value, "classes", lambda c, key: self.text(c, key))
        if len(set(classes)) != len(classes):
            raise self.fail("classes", "must not repeat a name")
        return classes

    def rejects(self, value: Any) -> list[Reject]:
        def reject(entry: Any, key: str) -> Reject:
            if not isinstance(entry, dict) or set(entry) != {"source", "reason"}:
                raise self.fail(key, "must be an object with source and reason", entry)
            return Reject(self.text(entry["source"], f"{key}.source"), self.text(entry["reason"], f"{key}.reason"))

        return self.list_of(value, "rejects", reject)

    def options(self, value: Any) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.fail("options", "must be an object", value)
        fmt = value.get("format", "tar")
        if fmt not in DATASET_FORMATS:
            raise self.fail("options.format", f"must be one of {', '.join(DATASET_FORMATS)}", fmt)
        if "keys" in value:
            self.string(value, "keys", "options", safe_relative_name, "must be a relative name inside the dataset")
        if "label_from" in value:
            try:
                LabelRule(value["label_from"] if isinstance(value["label_from"], str) else "")
            except ManifestError:
                raise self.fail("options.label_from", "must be cls, dir, prefix:SEP or none",
                                value["label_from"]) from None
        return dict(value)

    # -- typed fields
    def field(self, obj: dict, name: str, key: str) -> Any:
        if name not in obj:
            raise self.fail(f"{key}.{name}", "is missing")
        return obj[name]

    def list_of(self, value: Any, key: str, item: Callable[[Any, str], Any]) -> list:
        if not isinstance(value, list):
            raise self.fail(key, "must be a list", value)
        return [item(v, f"{key}[{i}]") for i, v in enumerate(value)]

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value or not printable(value):
            raise self.fail(key, "must be a non-empty string without control characters", value)
        return value

    def string(self, obj: dict, name: str, key: str, ok: Callable[[str], bool], requirement: str) -> str:
        value = self.field(obj, name, key)
        if not isinstance(value, str) or not ok(value):
            raise self.fail(f"{key}.{name}", requirement, value)
        return value

    def count(self, obj: dict, name: str, key: str, low: int, high: int) -> int:
        value = self.field(obj, name, key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(f"{key}.{name}", f"must be an integer in [{low}, {high}]", value)
        return value


_SHARD_FIELDS = {"name", "samples", "bytes", "sha256"}
_FAST_SHARD_FIELDS = _SHARD_FIELDS | {"xxh3_128"}


def _plain_shard(entry: Any) -> ShardInfo | None:
    """The common case in one pass (a manifest may list 100,000 shards): a
    well-formed entry, or None to check it field by field and name what is wrong."""
    if type(entry) is not dict or (entry.keys() != _FAST_SHARD_FIELDS and entry.keys() != _SHARD_FIELDS):
        return None
    name, samples, size, digest, fast = (entry["name"], entry["samples"], entry["bytes"], entry["sha256"],
                                         entry.get("xxh3_128"))
    if (type(samples) is int and type(size) is int and 1 <= samples <= MAX_SHARD_SAMPLES
            and samples * MIN_SAMPLE_BYTES <= size <= MAX_SHARD_BYTES
            and is_sha256(digest) and (fast is None or is_xxh3_128(fast)) and isinstance(name, str)
            and safe_relative_name(name)):
        return ShardInfo(name, samples, size, digest, xxh3_128=fast)
    return None


def _show(value: Any) -> str:
    """A short, printable rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
