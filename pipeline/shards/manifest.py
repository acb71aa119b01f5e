"""The shard manifest: the one file that says what a dataset is.

Written last and atomically by the writer, so a manifest never points at a shard
that is not fully written. Versioned; readers refuse versions they do not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline.errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "maescale-shards"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the dataset URL
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str


@dataclass
class ShardManifest:
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)  # label i = classes[i]; empty = unlabelled
    rejects: list[Reject] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)  # how it was written
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
               "classes": self.classes, "shards": [asdict(s) for s in self.shards],
               "rejects": [asdict(r) for r in self.rejects], "options": self.options}
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> ShardManifest:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where} is not a maescale shard manifest (format {doc.get('format')!r})"
                                if isinstance(doc, dict) else f"{where} is not a JSON object")
        if doc.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{where} has version {doc.get('version')!r}; this maescale reads version {MANIFEST_VERSION}")
        try:
            shards = [ShardInfo(**s) for s in doc["shards"]]
            rejects = [Reject(**r) for r in doc.get("rejects", [])]
            manifest = cls(shards=shards, classes=list(doc.get("classes", [])), rejects=rejects,
                           options=dict(doc.get("options", {})))
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where} is malformed: {e}") from e
        if manifest.total_samples != doc.get("total_samples"):
            raise ManifestError(f"{where}: total_samples {doc.get('total_samples')} != sum of shard counts {manifest.total_samples}")
        return manifest
