"""What `mae inspect` reports about a dataset, and its ``--verify`` pass."""

from __future__ import annotations

import io
from collections import Counter
from typing import BinaryIO

from pipeline.errors import ObjectMissing, ShardCorrupt, ShardFormatError
from pipeline.shards.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ShardInfo, ShardManifest
from pipeline.shards.manifest_index import INDEX_NAME, MAX_INDEX_BYTES, encode_index, index_status, indexable
from pipeline.shards.tar_format import index_shard
from pipeline.storage.objects import HASHES
from pipeline.storage.store import ShardStore


def summarize(manifest: ShardManifest) -> str:
    sizes = [s.samples for s in manifest.shards]
    reasons = Counter(r.reason for r in manifest.rejects)
    classes = f": {', '.join(manifest.classes[:10])}" if manifest.classes else " (unlabelled)"
    rejects = ": " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) if reasons else ""
    return "\n".join([
        f"format {manifest.format} v{manifest.version}",
        f"samples {manifest.total_samples} in {len(sizes)} shards ({manifest.total_bytes / 2**20:.1f} MiB); "
        f"per shard min {min(sizes, default=0)} / max {max(sizes, default=0)}",
        f"classes {len(manifest.classes)}{classes}",
        f"rejects {len(manifest.rejects)}{rejects}",
        f"options {manifest.options}"])


def write_index(store: ShardStore) -> ShardManifest:
    """(Re)write ``manifest.index`` for the dataset's current ``manifest.json``."""
    data = store.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    manifest = ShardManifest.from_json(data, store.folder.where_of(MANIFEST_NAME))
    store.folder.put_bytes(INDEX_NAME, encode_index(manifest, data))
    return manifest


def index_report(store: ShardStore, manifest: ShardManifest) -> str:
    """One line: is the dataset's binary index (for ``manifest``, already read)
    current, missing, stale or corrupt."""
    if not indexable(manifest):
        return "index: none (tars indexed in place: readers parse manifest.json)"
    data = store.read_object(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    return f"index: {index_status(data, store.folder.read_if_exists(INDEX_NAME, limit=MAX_INDEX_BYTES), manifest)}"


def first_keys(store: ShardStore, manifest: ShardManifest, count: int) -> list[str]:
    """The first ``count`` sample keys of the first shard."""
    if not manifest.shards or count < 1:
        return []
    if is_beton(manifest):  # one .beton: its keys are listed beside it
        return store.read_keys(manifest.options["keys"])[:count]
    with store.open_shard(manifest.shards[0]) as f:
        return [s.key for s in index_shard(f, manifest.shards[0])[:count]]


def verify_shards(store: ShardStore, manifest: ShardManifest) -> list[str]:
    """Fetch every shard (which checks the digest readers use), check every other
    digest the manifest records, and index it; returns one line per problem, for
    every shard: a digest or sample count that differs, repeated keys, a shard that
    is missing, corrupt or not a safe tar. A failure that is not one shard's own
    (credentials, an endpoint that does not answer) is raised at once."""
    problems = []
    for shard in manifest.shards:
        try:
            problems += _shard_problems(store, manifest, shard)
        except (ShardFormatError, ShardCorrupt, ObjectMissing) as e:
            problems.append(str(e) if shard.name in str(e) else f"{shard.name}: {e}")
    return problems


def _shard_problems(store: ShardStore, manifest: ShardManifest, shard: ShardInfo) -> list[str]:
    problems = []
    beton = is_beton(manifest)
    checked = store.checksum(shard)
    with store.open_shard(shard) as f:
        recorded = {name: getattr(shard, name) for name in HASHES if getattr(shard, name)}  # sha256, xxh3_128
        wrong = _wrong_digests(f, recorded, checked[0] if checked else None)
        size = f.seek(0, io.SEEK_END)
        samples = [] if beton else index_shard(f, shard)  # a .beton's samples are not tar members
        count = beton_samples(f) if beton else len(samples)
    if size != shard.bytes:  # a cached copy is found by its digest, whatever size the manifest claims
        problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
    if wrong:
        verb = "does" if len(wrong) == 1 else "do"
        passed = checked[0] if checked else "header fingerprint"
        problems.append(f"{shard.name}: its {' and '.join(wrong)} {verb} not match the manifest (its {passed} does)")
    if count != shard.samples:
        held = f"its header holds {count}" if beton else str(count)
        problems.append(f"{shard.name}: {held} samples, manifest says {shard.samples}")
    renamed = [s for s in samples if s.renamed_from]
    if renamed:
        problems.append(f"{shard.name}: {len(renamed)} duplicate keys (first: {renamed[0].renamed_from!r}; "
                        f"read as {renamed[0].key!r})")
    return problems


def is_beton(manifest: ShardManifest) -> bool:
    """A dataset of one FFCV ``.beton`` (``mae shard --format beton``), not tar shards."""
    return manifest.options.get("format") == "beton" and isinstance(manifest.options.get("keys"), str)


def beton_samples(f: BinaryIO) -> int:
    """The sample count in a ``.beton``'s header (a little-endian u64 at byte 8)."""
    f.seek(8)
    return int.from_bytes(f.read(8).ljust(8, b"\0"), "little")


def _wrong_digests(f: BinaryIO, recorded: dict[str, str], checked: str | None) -> list[str]:
    """The recorded digests, besides ``checked`` (verified by the fetch), that the
    bytes of ``f`` do not match."""
    want = {name: digest for name, digest in recorded.items() if name != checked}
    if not want:
        return []
    hashes = {name: HASHES[name]() for name in want}
    f.seek(0)
    while chunk := f.read(1 << 20):
        for h in hashes.values():
            h.update(chunk)
    return [name for name, h in hashes.items() if h.hexdigest() != want[name]]
