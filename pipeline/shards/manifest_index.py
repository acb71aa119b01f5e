"""The manifest's compact binary index, ``manifest.index``, beside ``manifest.json``.

The JSON stays the human-readable, versioned source of truth. The index holds
the same per-shard fields as arrays (names, sample counts, sizes, sha256, and
xxh3-128 where every shard has one) plus
the classes and options, so a loader takes in 200,000 shards in a fraction of
the JSON's parse time: ``ShardTable`` is what a loader reads either way.

The index is untrusted input like the JSON. It records the sha256 and size of
the ``manifest.json`` it was made from and a sha256 of itself; it is used only
when the JSON's digest matches (else it is *stale*), its own digest matches
(else *corrupt*) and every field keeps the rules the JSON must keep — checked
with array operations, the same bounds as ``manifest.py``. Otherwise the loader
parses the JSON, logs why, and `mae inspect URL --write-index` rewrites it.

Layout (little-endian): ``MAEIDX01``; u64 header length; the header (JSON:
version, manifest sha256 and bytes, shard count, names bytes, totals, classes,
options, and from version 2 whether the xxh3-128 column is there), padded to 8
bytes; int64[n] samples; int64[n] bytes; uint8[n, 32] sha256; (version 2 with
the column) uint8[n, 16] xxh3-128; the names, UTF-8, joined by newlines; the
sha256 of all of the above. Version 1 indexes (no xxh3 column) are still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import ManifestError
from pipeline.shards.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_SHARD_BYTES, MAX_SHARD_SAMPLES,
                                      MIN_SAMPLE_BYTES, ShardInfo, ShardManifest, _ManifestReader, safe_relative_name)

log = logging.getLogger(__name__)

INDEX_NAME = "manifest.index"
INDEX_MAGIC = b"MAEIDX01"
INDEX_VERSION = 2
MAX_INDEX_BYTES = MAX_MANIFEST_BYTES
_HEADER_KEYS_V1 = {"version", "manifest_sha256", "manifest_bytes", "shards", "names_bytes", "total_samples",
                   "total_bytes", "classes", "options"}
_HEADER_KEYS = {1: _HEADER_KEYS_V1, 2: _HEADER_KEYS_V1 | {"xxh3_128"}}
_INT64 = np.dtype("<i8")
# bytes of plain shard names (manifest.PLAIN_NAME) and their newline separators; a part starts with one of _FIRST
_PLAIN_OR_NEWLINE = np.zeros(256, bool)
_FIRST = np.zeros(256, bool)
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-":
    _PLAIN_OR_NEWLINE[_c] = _FIRST[_c] = True
_PLAIN_OR_NEWLINE[[ord("."), ord("/"), ord("\n")]] = True
INDEXED_FIELDS = ("name", "samples", "bytes", "sha256", "xxh3_128")  # the columns of the index
# ShardInfo's other fields exist only for tars indexed in place (`mae index`), whose
# manifests have no binary index: their tables keep the parsed entries (``infos``).
IN_PLACE_FIELDS = ("etag", "headers_sha256")


@dataclass(frozen=True, eq=False)
class ShardTable:
    """A dataset's shards as arrays: what a loader needs of a manifest. ``table[i]``
    is shard i's ``ShardInfo``, made on demand."""

    names: bytes  # UTF-8 names joined by b"\n"
    samples: np.ndarray  # (n,) int64
    nbytes: np.ndarray  # (n,) int64
    digests: np.ndarray  # (n, 32) uint8: sha256
    classes: list[str] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)
    data_url: str | None = None  # where the shards are, when not beside the manifest (tars indexed in place)
    infos: tuple[ShardInfo, ...] | None = None  # the manifest's entries, when they carry IN_PLACE_FIELDS
    fast: np.ndarray | None = None  # (n, 16) uint8: xxh3-128, when every shard has one
    name_ends: np.ndarray = field(init=False, repr=False)  # (n,) end of each name in ``names``

    def __post_init__(self) -> None:
        seps = np.flatnonzero(np.frombuffer(self.names, np.uint8) == ord("\n"))
        ends = np.append(seps, len(self.names)) if len(self.samples) else np.zeros(0, np.int64)
        object.__setattr__(self, "name_ends", ends.astype(np.int64))

    @classmethod
    def from_manifest(cls, m: ShardManifest) -> ShardTable:
        in_place = not indexable(m)
        digests = np.frombuffer(b"".join(bytes.fromhex(s.sha256 or "00" * 32) for s in m.shards),
                                np.uint8).reshape(-1, 32)
        fast = (np.frombuffer(b"".join(bytes.fromhex(s.xxh3_128) for s in m.shards), np.uint8).reshape(-1, 16)
                if all(s.xxh3_128 for s in m.shards) else None)
        return cls("\n".join(s.name for s in m.shards).encode(), np.array([s.samples for s in m.shards], _INT64),
                   np.array([s.bytes for s in m.shards], _INT64), digests, list(m.classes), dict(m.options),
                   m.data_url, tuple(m.shards) if in_place else None, fast)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> ShardInfo:
        if self.infos is not None:
            return self.infos[i]
        return ShardInfo(self.name(i), int(self.samples[i]), int(self.nbytes[i]), self.digests[i].tobytes().hex(),
                         xxh3_128=self.fast[i].tobytes().hex() if self.fast is not None else None)

    def name(self, i: int) -> str:
        start = int(self.name_ends[i - 1]) + 1 if i else 0
        return self.names[start:int(self.name_ends[i])].decode()

    @property
    def total_samples(self) -> int:
        return int(self.samples.sum())

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def fingerprint(self) -> str:
        """What identifies the dataset's contents for a saved position: every shard's
        name, sample count and sha256 (the same whether read from JSON or index)."""
        digest = hashlib.sha256(b"maescale-shards\n" + self.names + b"\n")
        digest.update(self.samples.astype(_INT64).tobytes())
        digest.update(np.ascontiguousarray(self.digests).tobytes())
        for info in self.infos or ():  # tars indexed in place: what identifies them instead of a sha256
            digest.update(f"{info.etag}\n{info.headers_sha256}\n".encode())
        return digest.hexdigest()[:16]


def indexable(m: ShardManifest) -> bool:
    """Whether the binary index can stand for ``m``: shards written by `mae shard`
    (a sha256 each, beside the manifest); not tars indexed in place."""
    return m.data_url is None and all(s.sha256 is not None and all(getattr(s, f) is None for f in IN_PLACE_FIELDS)
                                      for s in m.shards)


# ------------------------------------------------------------- writing
def encode_index(manifest: ShardManifest, manifest_json: bytes) -> bytes:
    """The index of ``manifest``, whose JSON (as stored) is ``manifest_json``."""
    if not indexable(manifest):
        raise ManifestError("a manifest of tars indexed in place (`mae index`) has no binary index: readers parse "
                            "its JSON")
    table = ShardTable.from_manifest(manifest)
    header = {"version": INDEX_VERSION, "manifest_sha256": hashlib.sha256(manifest_json).hexdigest(),
              "manifest_bytes": len(manifest_json), "shards": len(table), "names_bytes": len(table.names),
              "total_samples": table.total_samples, "total_bytes": table.total_bytes,
              "classes": table.classes, "options": table.options, "xxh3_128": table.fast is not None}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    body = b"".join([INDEX_MAGIC, struct.pack("<Q", len(head)), head, table.samples.tobytes(), table.nbytes.tobytes(),
                     table.digests.tobytes(), b"" if table.fast is None else table.fast.tobytes(), table.names])
    return body + hashlib.sha256(body).digest()


def write_manifest(folder: Any, manifest: ShardManifest) -> None:
    """The index, then the JSON (last: a crash in between leaves a stale index,
    which readers detect and skip). ``folder`` is a ``pipeline.storage.objects.ObjectFolder``."""
    text = manifest.to_json().encode()
    if indexable(manifest):
        folder.put_bytes(INDEX_NAME, encode_index(manifest, text))
    folder.put_bytes(MANIFEST_NAME, text)


# ------------------------------------------------------------- reading
def table_for(manifest_json: bytes, index: bytes | None, where: str) -> ShardTable:
    """The dataset's shards: from the index when it is current and well-formed,
    else parsed from the JSON (with a warning that says why)."""
    if index is not None:
        try:
            return read_index(index, manifest_json, f"{where} ({INDEX_NAME})")
        except ManifestError as e:
            log.warning("%s; reading %s instead (slower; `mae inspect URL --write-index` rewrites the index)",
                        e, MANIFEST_NAME)
    return ShardTable.from_manifest(ShardManifest.from_json(manifest_json, where))


FORGED = "forged"


def index_status(manifest_json: bytes, index: bytes | None, manifest: ShardManifest | None = None) -> str:
    """One word for `mae inspect`: current, missing, stale or corrupt (with why); and,
    given the parsed ``manifest``, forged: an index that carries the JSON's real digest
    but other shards (a subset), which loaders would read as it says."""
    if index is None:
        return "missing"
    try:
        table = read_index(index, manifest_json, INDEX_NAME)
    except ManifestError as e:
        return str(e)
    if manifest is not None:
        parsed = ShardTable.from_manifest(manifest)
        if table.fingerprint() != parsed.fingerprint():
            return (f"{FORGED}: it lists {len(table)} shards of {table.total_samples} samples, {MANIFEST_NAME} "
                    f"{len(parsed)} of {parsed.total_samples}, and loaders read the index; `mae inspect URL "
                    "--write-index` rewrites it from the JSON")
    return "current"


def read_index(data: bytes, manifest_json: bytes, where: str = INDEX_NAME) -> ShardTable:
    """Parse and check an untrusted index against the JSON it must stand for."""
    if len(data) > MAX_INDEX_BYTES:
        raise ManifestError(f"{where} is larger than {MAX_INDEX_BYTES // 2**20} MiB")
    if len(data) < 16 + 32 or data[:8] != INDEX_MAGIC:
        raise ManifestError(f"{where} is not a maescale manifest index (or another version of it)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise ManifestError(f"{where} is corrupt: its checksum does not match")
    (head_len,) = struct.unpack("<Q", data[8:16])
    if head_len > len(data) - 48:
        raise ManifestError(f"{where} is corrupt: header length {head_len} runs past the end")
    header = _header(data[16:16 + head_len], where)
    if header["manifest_sha256"] != hashlib.sha256(manifest_json).hexdigest():
        raise ManifestError(f"{where} is stale: it was made for another {MANIFEST_NAME}")
    n, names_len = header["shards"], header["names_bytes"]
    row = 48 + (16 if header.get("xxh3_128") else 0)  # bytes per shard before the names
    body = data[16 + head_len:-32]
    if len(body) != row * n + names_len:
        raise ManifestError(f"{where} is corrupt: {len(body)} bytes of arrays for {n} shards and {names_len} "
                            "bytes of names")
    fast = np.frombuffer(body, np.uint8, 16 * n, 48 * n).reshape(n, 16) if row > 48 else None
    table = ShardTable(bytes(body[row * n:]), np.frombuffer(body, _INT64, n, 0), np.frombuffer(body, _INT64, n, 8 * n),
                       np.frombuffer(body, np.uint8, 32 * n, 16 * n).reshape(n, 32), header["classes"],
                       header["options"], fast=fast)
    _check_columns(table, header, where)
    return table


def _header(raw: bytes, where: str) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ManifestError(f"{where} is corrupt: its header is not JSON") from None
    version = header.get("version") if isinstance(header, dict) else None
    keys = _HEADER_KEYS.get(version) if type(version) is int else None
    if keys is None or set(header) != keys:
        raise ManifestError(f"{where}: header must have exactly {', '.join(sorted(_HEADER_KEYS[INDEX_VERSION]))} "
                            f"(version {INDEX_VERSION}, or version 1 without xxh3_128)")
    if type(header.get("xxh3_128", False)) is not bool:
        raise ManifestError(f"{where}: header xxh3_128 must be true or false")
    for key in keys - {"manifest_sha256", "classes", "options", "xxh3_128"}:
        value = header[key]
        if type(value) is not int or not 0 <= value < 2**62:
            raise ManifestError(f"{where}: header {key} must be a non-negative integer")
    if not isinstance(header["manifest_sha256"], str):
        raise ManifestError(f"{where}: header manifest_sha256 must be a string")
    reader = _ManifestReader(where)
    header["classes"], header["options"] = reader.classes(header["classes"]), reader.options(header["options"])
    return header


def _check_columns(t: ShardTable, header: dict[str, Any], where: str) -> None:
    """The JSON's per-shard rules (``manifest._ManifestReader.shard``), on arrays."""
    n = len(t)
    bad = np.flatnonzero((t.samples < 1) | (t.samples > MAX_SHARD_SAMPLES) | (t.nbytes < 0)
                         | (t.nbytes > MAX_SHARD_BYTES) | (t.samples * MIN_SAMPLE_BYTES > t.nbytes))
    if len(bad):
        i = int(bad[0])
        raise ManifestError(f"{where}: shards[{i}] has {int(t.samples[i])} samples in {int(t.nbytes[i])} bytes: "
                            f"samples must be in [1, {MAX_SHARD_SAMPLES}], bytes in [0, {MAX_SHARD_BYTES}], and fit")
    if t.total_samples != header["total_samples"] or t.total_bytes != header["total_bytes"]:
        raise ManifestError(f"{where}: header totals differ from the sums over shards")
    if n and len(t.name_ends) != n or not n and t.names:
        raise ManifestError(f"{where}: {len(t.name_ends)} names for {n} shards")
    _check_names(t, where)
    _check_digests(t, where)


def _check_digests(t: ShardTable, where: str) -> None:
    """No two shards with the same sha256 (the same bytes under two names: each
    sample read twice an epoch). Sorted on the digests' first 8 bytes, then the
    candidates compared whole: ~10 ms for 200,000 shards."""
    present = t.digests[t.digests.any(axis=1)]  # shards indexed in place without --hash have none
    if len(present) < 2:
        return
    prefix = np.ascontiguousarray(present[:, :8]).view("<u8").ravel()
    order = np.argsort(prefix, kind="stable")
    same = np.flatnonzero(prefix[order][1:] == prefix[order][:-1])
    if any((present[order[i]] == present[order[i + 1]]).all() for i in same.tolist()):
        raise ManifestError(f"{where}: two shards have the same sha256: the same bytes listed twice under two names")


def _check_names(t: ShardTable, where: str) -> None:
    """``safe_relative_name`` for every name, as array operations where all names
    are plain ASCII (the usual case), one by one otherwise; and no name twice."""
    raw = np.frombuffer(t.names, np.uint8)
    starts = np.concatenate([[0], t.name_ends[:-1] + 1]).astype(np.int64) if len(t) else np.zeros(0, np.int64)
    if ((t.name_ends - starts) > 1024).any():
        raise ManifestError(f"{where}: a shard name is longer than 1024 bytes")
    names = t.names.split(b"\n") if len(t) else []
    if _PLAIN_OR_NEWLINE[raw].all():  # every part of every name starts with [A-Za-z0-9_-]
        parts = np.concatenate([starts, np.flatnonzero(raw == ord("/")) + 1])
        wrong = parts[(parts >= len(raw)) | ~_FIRST[raw[np.minimum(parts, max(len(raw) - 1, 0))]]] if len(raw) \
            else parts
        bad = int(np.searchsorted(t.name_ends, wrong.min())) if len(wrong) else None
    else:
        bad = next((i for i, name in enumerate(names) if not _safe_utf8_name(name)), None)
    if bad is not None:
        raise ManifestError(f"{where}: shards[{bad}].name must be a relative name inside the dataset (no '..', no "
                            "leading '/', no backslash, no control characters)")
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: a shard name repeats an earlier shard")


def _safe_utf8_name(name: bytes) -> bool:
    try:
        return safe_relative_name(name.decode())
    except UnicodeDecodeError:
        return False
