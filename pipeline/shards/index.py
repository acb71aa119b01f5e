"""`mae index`: a manifest for webdataset tars that already exist, without rewriting them.

Only the tar headers are read: a 512-byte header gives a member's name and size,
the next header lies at the end of the data rounded up to 512, so each member
costs one small ranged GET (plus ``read_ahead`` bytes, which saves the GET of a
small member's neighbour) and nothing of the image data. Objects are walked in
parallel, every GET under the storage policy (timeouts, retries, deadline). With
``hash`` every byte is read too, for a sha256 that makes the shard verified and
cached exactly like one `mae shard` wrote.

Each shard's entry records its sample count, size, ETag and the sha256 of its
header blocks (the layout readers check; see ``tar_format.index_shard``). Samples
without an image member, unsupported extensions, malformed or non-file members and
a corrupt tail are named rejects, never fatal. The manifest may go to another
prefix than the data (``out``; a read-only bucket): it then names the data's URL.

Work is planned in batches of objects; each batch's result is stored as a small
record beside the manifest, keyed by its objects (name, size, ETag) and the
options, so a rerun after a crash — or a lost Ray node — redoes only the missing
batches, and the manifest is identical however the work was spread.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from tqdm import tqdm

from infra.options import option, require, require_positive
from infra.redact import redact
from pipeline.errors import ManifestError, ObjectNotAccessible, SourceError
from pipeline.shards.labels import RULES, LabelRule, integer_classes
from pipeline.shards.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SHARD_BYTES,
    Reject,
    ShardInfo,
    ShardManifest,
    read_record,
    safe_relative_name,
    shown,
)
from pipeline.shards.report import classes_line, reject_lines, throughput_line
from pipeline.shards.tar_format import (
    SampleIndex,
    TarMember,
    group_samples,
    usable_samples,
    walk_tar,
)
from pipeline.shards.tasks import RayTarget, cluster_cpus, run_tasks
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import ObjectFolder, object_etag
from pipeline.storage.urls import join, split_url

log = logging.getLogger(__name__)
RECORD_DIR = "_index"  # batch records, beside the manifest
MAX_EXPANSION = 1_000_000  # names a brace pattern may make (~100 MiB of them); a larger set is a prefix to list
MAX_CLS_BYTES = 32
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class IndexConfig:
    hash: bool = option(False, "also read every byte for a sha256 (verified and cached like our own shards)")
    label_from: str = option("cls", "labels: cls (.cls members), dir (key's folder), prefix:SEP, none")
    parallel: int = option(32, "objects walked at once (each one GET at a time)")
    read_ahead: int = option(0, "extra bytes per header GET: saves GETs on small members, costs bytes")
    batch_objects: int = option(64, "objects per batch: the unit of resume and of Ray tasks")
    create_bucket: bool = option(False, "create the manifest's bucket when it does not exist (else: an error)")
    storage: StorageConfig = option(factory=StorageConfig)

    def __post_init__(self) -> None:
        require_positive(self, "parallel", "batch_objects")
        require(0 <= self.read_ahead <= 2**20, "read_ahead", f"must be in [0, 1 MiB], got {self.read_ahead}")
        try:
            LabelRule(self.label_from)
        except ManifestError:
            require(False, "label_from", f"must be one of {', '.join(RULES)}; got {self.label_from!r}")

    def options(self) -> dict[str, object]:
        """What decides the manifest (recorded in it, part of each batch's resume key)."""
        return {"format": "tar", "indexed": True, "label_from": self.label_from, "hash": self.hash}


@dataclass(frozen=True)
class TarObject:
    name: str  # relative to the data URL
    size: int
    etag: str | None
    version: str = ""  # what else says the object changed (a local file's mtime): resume redoes it

    @staticmethod
    def listed(name: str, info: dict) -> TarObject:
        """From an fsspec listing entry; a local file has no ETag, its mtime stands in."""
        etag = object_etag(info)
        return TarObject(name, int(info["size"]), etag, "" if etag else str(info.get("mtime", "")))


@dataclass
class IndexSummary:
    manifest: ShardManifest
    data_url: str = ""
    objects: int = 0
    indexed: int = 0  # objects walked in this run (the rest came from batch records)
    bytes_read: int = 0  # by this run
    bytes_indexed: int = 0  # size of the objects this run walked
    requests: int = 0
    seconds: float = 0.0
    workers: int = 1

    def format(self) -> str:
        m = self.manifest
        lines = [(f"{m.total_samples} samples in {len(m.shards)} of {self.objects} tars "
                  f"({m.total_bytes / 2**30:.2f} GiB); {self.indexed} indexed now, "
                  f"{self.objects - self.indexed} from an earlier run"), classes_line(m.classes)]
        lines += reject_lines(m.rejects)
        if self.bytes_indexed:
            per_gib = self.bytes_read / 2**20 / (self.bytes_indexed / 2**30)
            lines.append(f"read {self.bytes_read / 2**20:.2f} MiB in {self.requests} requests for "
                         f"{self.bytes_indexed / 2**30:.3f} GiB of tars: {per_gib:.2f} MiB per GiB "
                         f"({self.bytes_read / self.bytes_indexed:.3%})")
        if self.seconds:
            lines.append(f"{self.indexed / self.seconds:.1f} objects/s")
            lines.append(throughput_line(m.total_samples, self.bytes_indexed, self.seconds, self.workers))
        return "\n".join(lines)


# ------------------------------------------------------------- listing
def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> a/000.tar a/001.tar a/002.tar; '{x,y}' lists; several
    groups multiply. Zero padding follows the range's first number."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    lo, dots, hi = body.partition("..")
    if dots and lo.isdigit() and hi.isdigit():
        if abs(int(hi) - int(lo)) >= MAX_EXPANSION:  # checked before a single name is made
            raise SourceError(_too_many(pattern))
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    rest = expand_braces(tail)
    if len(choices) * len(rest) > MAX_EXPANSION:
        raise SourceError(_too_many(pattern))
    return [head + c + r for c in choices for r in rest]


def _too_many(pattern: str) -> str:
    return (f"pattern {redact(pattern)!r} expands to more than {MAX_EXPANSION:,} names: give the folder or prefix "
            "that holds the tars instead (every *.tar under it is listed)")


def list_tars(src: str, storage: StorageConfig) -> tuple[str, list[TarObject], list[Reject]]:
    """(data URL, the tars in order, rejects for pattern names that do not exist).
    ``src`` is a brace pattern, a folder or prefix (every ``*.tar`` under it) or one tar."""
    src = _absolute(src)
    if "{" in src:
        base = src[:src.rfind("/", 0, src.index("{"))]
        names = [n[len(base) + 1:] for n in expand_braces(src)]
        return base, *_pick(ObjectFolder(base, storage), names)
    folder = ObjectFolder(src, storage)
    info = folder.call("source", lambda: folder.fs.info(folder.root))
    if info.get("type") == "file":
        if not src.endswith(".tar"):
            raise SourceError(f"{redact(src)} is not a .tar: mae index reads webdataset tars (a folder or prefix "
                              "of them, a brace pattern, or one .tar)")
        base, name = src.rsplit("/", 1)
        return base, [TarObject.listed(name, info)], []
    found = folder.call("listing", lambda: folder.fs.find(folder.root, detail=True))
    tars = sorted((PurePosixPath(p).relative_to(folder.root).as_posix(), i) for p, i in found.items()
                  if p.endswith(".tar") and i.get("type", "file") == "file")
    if not tars:
        raise SourceError(f"no .tar objects under {redact(src)}")
    return folder.url, [TarObject.listed(n, i) for n, i in tars], []


def _nameable(objects: list[TarObject], rejects: list[Reject], src: str) -> tuple[list[TarObject], list[Reject]]:
    """Each tar once (a pattern may name one twice), and only tars a manifest can
    name: one with a newline, a backslash or bytes that are not UTF-8 in its name is
    an ``unsafe_name`` reject, not a manifest every reader refuses."""
    kept, seen = [], set()
    for obj in objects:
        if obj.name in seen:
            continue
        seen.add(obj.name)
        try:
            obj.name.encode("utf-8")
            usable = safe_relative_name(obj.name)
        except UnicodeEncodeError:  # a local name that is not UTF-8 (its bytes kept as surrogates)
            usable = False
        if usable:
            kept.append(obj)
        else:
            rejects.append(Reject(shown(obj.name), "unsafe_name"))
    if not kept:
        raise SourceError(f"none of the tars under {redact(src)} has a name a manifest can hold "
                          f"({len(rejects)} rejected: {', '.join(r.source for r in rejects[:3])})")
    return kept, rejects


def _absolute(url: str) -> str:
    """A local path made absolute (manifests name data by absolute path or URL)."""
    protocol, path = split_url(url)
    return path if protocol == "file" else url.rstrip("/")


def _pick(folder: ObjectFolder, names: list[str]) -> tuple[list[TarObject], list[Reject]]:
    """The pattern's names found by listing each parent folder once (not a HEAD per name)."""
    listed: dict[str, dict] = {}
    for parent in sorted({n.rsplit("/", 1)[0] if "/" in n else "" for n in names}):
        path = join(folder.root, parent) if parent else folder.root
        try:
            entries = folder.call(f"listing {parent or '.'}", lambda path=path: folder.fs.ls(path, detail=True))
        except ObjectNotAccessible:
            entries = []
        for e in entries:
            listed[PurePosixPath(e["name"]).relative_to(folder.root).as_posix()] = e
    tars, missing = [], []
    for n in names:
        e = listed.get(n)
        if e is None or e.get("type", "file") != "file":
            missing.append(Reject(n, "missing"))
        else:
            tars.append(TarObject.listed(n, e))
    if not tars:
        raise SourceError(f"none of the {len(names)} names of the pattern exist under {redact(folder.url)}")
    return tars, missing


# ------------------------------------------------------------- one tar
class RangeReader:
    """``read_at(offset, n)`` over one object by ranged GETs (one open file for a
    local one), each GET ``n + read_ahead`` bytes; counts requests and bytes."""

    def __init__(self, folder: ObjectFolder, obj: TarObject, read_ahead: int) -> None:
        self.folder, self.obj, self.read_ahead = folder, obj, read_ahead
        self.path = folder.path(obj.name)
        self.buf_start, self.buf = 0, b""
        self.requests = self.bytes = 0
        self._local = open(self.path, "rb") if folder.local else None  # noqa: SIM115 - closed by close()

    def __call__(self, offset: int, n: int) -> bytes:
        if self.buf_start <= offset and offset + n <= self.buf_start + len(self.buf):
            return self.buf[offset - self.buf_start:offset - self.buf_start + n]
        end = min(self.obj.size, offset + n + self.read_ahead)
        if end <= offset:
            return b""
        data = self.folder.call(f"{self.obj.name} bytes {offset}-{end}", lambda: self._get(offset, end))
        self.requests += 1
        self.bytes += len(data)
        self.buf_start, self.buf = offset, data
        return data[:n]

    def _get(self, start: int, end: int) -> bytes:
        if self._local is not None:
            self._local.seek(start)
            data = self._local.read(end - start)
        else:
            data = self.folder.fs.cat_file(self.path, start=start, end=end)
        if len(data) != end - start:
            raise EOFError(f"range {start}-{end} returned {len(data)} bytes")
        return data

    def close(self) -> None:
        if self._local is not None:
            self._local.close()


def _cls_label(read_at: Callable[[int, int], bytes], sample: SampleIndex) -> int | None:
    offset, size = sample.members["cls"]
    if size > MAX_CLS_BYTES:
        return None
    text = read_at(offset, size).strip()
    return int(text) if text.isdigit() and text.isascii() and len(text) <= 9 else None


def index_object(folder: ObjectFolder, obj: TarObject, cfg: IndexConfig) -> dict:
    """Walk one tar's headers: its manifest entry, rejects, labels and read costs."""
    reader = RangeReader(folder, obj, cfg.read_ahead)
    try:
        walk = walk_tar(reader, obj.size, obj.name, strict=False)
        grouped = group_samples(walk.members, obj.name)
        samples, dropped = usable_samples(grouped)
        rejects = [(f"{obj.name}{m}" if m.startswith("@") else f"{obj.name}/{m}", r) for m, r in walk.problems]
        rejects += [(f"{obj.name}/{k}", r) for k, r in _hidden_named(dropped, grouped, walk.members)]
        labels, names = _labels(reader, samples, obj.name, LabelRule(cfg.label_from), rejects)
    finally:
        reader.close()
    digests = folder.digests(obj.name) if cfg.hash else {"sha256": None, "xxh3_128": None}
    return {"name": obj.name, "samples": len(samples), "bytes": obj.size, "etag": obj.etag,
            "headers_sha256": walk.headers_sha256, **digests, "rejects": rejects, "max_label": labels,
            "class_names": sorted(names), "requests": reader.requests,
            "bytes_read": reader.bytes + (obj.size if cfg.hash else 0)}


def _hidden_named(dropped: list[tuple[str, str]], grouped: list[SampleIndex],
                  members: list[TarMember]) -> list[tuple[str, str]]:
    """The dropped samples' (key, reason), where a sample made only of hidden files
    (macOS's ``._x.jpg`` beside ``x.jpg``, ``.DS_Store``: their keys are their
    folders' names) is one ``hidden`` reject per file, under the file's own name.
    The grouping, and so every reader's samples, stays as it was."""
    hidden = {m.offset: shown(m.name) for m in members if m.name.rpartition("/")[2].startswith(".")}
    by_key = {s.key: s for s in grouped}
    out = []
    for key, reason in dropped:
        names = [hidden.get(offset) for offset, _ in by_key[key].members.values()]
        out += [(name, "hidden") for name in names] if all(names) else [(key, reason)]
    return out


def _labels(read_at: Callable[[int, int], bytes], samples: list[SampleIndex], shard: str, rule: LabelRule,
            rejects: list[tuple[str, str]]) -> tuple[int, set[str]]:
    """(largest .cls label, class names from keys) of a tar's samples; a sample the
    rule cannot label is a ``bad_label`` reject (it stays in the tar and readers skip it)."""
    top, names = -1, set()
    for s in samples:
        if rule.kind == "cls" and "cls" in s.members:
            label = _cls_label(read_at, s)
            if label is None:
                rejects.append((f"{shard}/{s.key}", "bad_label"))
            else:
                top = max(top, label)
        elif rule.from_keys:
            name = rule.class_name(s.key)
            if name is None:
                rejects.append((f"{shard}/{s.key}", "bad_label"))
            else:
                names.add(name)
    return top, names


# ------------------------------------------------------------- batches
@dataclass
class IndexBatch:
    index: int
    objects: list[TarObject]
    digest: str  # of the objects and options: a record with another digest is stale

    @property
    def record_name(self) -> str:
        return f"{RECORD_DIR}/batch-{self.index:06d}.json"


def plan_batches(objects: list[TarObject], cfg: IndexConfig) -> list[IndexBatch]:
    options = json.dumps(cfg.options(), sort_keys=True)
    batches = []
    for i in range(0, len(objects), cfg.batch_objects):
        chunk = objects[i:i + cfg.batch_objects]
        lines = [options] + [f"{o.name}\t{o.size}\t{o.etag}" + (f"\t{o.version}" if o.version else "") for o in chunk]
        batches.append(IndexBatch(len(batches), chunk, hashlib.sha256("\n".join(lines).encode()).hexdigest()))
    return batches


def index_batch(batch: IndexBatch, data_url: str, out: str, cfg: IndexConfig) -> dict:
    """Index one batch (in this process, a thread per object up to ``parallel``) and
    store its record under ``out``: the unit a rerun or a Ray task redoes."""
    folder = ObjectFolder(data_url, cfg.storage)

    def one(obj: TarObject) -> dict:
        try:
            return index_object(folder, obj, cfg)
        except ObjectNotAccessible as e:  # missing or denied since listed: a retry cannot help
            log.warning("%s", e)
            return {"name": obj.name, "samples": 0, "rejects": [(obj.name, "unreadable")], "requests": 0,
                    "bytes_read": 0, "bytes": obj.size}

    with cf.ThreadPoolExecutor(min(cfg.parallel, len(batch.objects))) as pool:
        shards = list(pool.map(one, batch.objects))
    record = {"digest": batch.digest, "shards": shards}
    ObjectFolder(out, cfg.storage).put_bytes(batch.record_name, json.dumps(record).encode())
    return record


def _existing(folder: ObjectFolder, batch: IndexBatch) -> dict | None:
    record = read_record(folder, batch.record_name)
    return record if record is not None and record.get("digest") == batch.digest else None


# ------------------------------------------------------------- the whole job
def index_tars(src: str, out: str | None, cfg: IndexConfig, ray: RayTarget | None = None) -> IndexSummary:
    """Index the tars ``src`` names; the manifest goes to ``out`` (default: beside the data)."""
    start = time.monotonic()
    data_url, objects, missing = list_tars(src, cfg.storage)
    objects, missing = _nameable(objects, missing, src)
    too_big = [o for o in objects if o.size > MAX_SHARD_BYTES]
    objects = [o for o in objects if o.size <= MAX_SHARD_BYTES]
    out_url = (out or data_url).rstrip("/")
    out_folder = ObjectFolder(out_url, cfg.storage)
    out_folder.prepare(cfg.create_bucket)
    _refuse_to_replace_a_shard_manifest(out_folder)
    batches = plan_batches(objects, cfg)
    records: dict[int, dict] = {}
    for b in batches:
        if (rec := _existing(out_folder, b)) is not None:
            records[b.index] = rec
    todo = [b for b in batches if b.index not in records]
    log.info("%d tars in %d batches (%d already indexed)", len(objects), len(batches), len(records))
    summary = IndexSummary(ShardManifest([]), data_url=data_url, objects=len(objects), workers=1 if ray is None else cluster_cpus(ray))
    bar = tqdm(total=len(objects), initial=sum(len(b.objects) for b in batches if b.index in records), unit="tar",
               disable=not sys.stderr.isatty(), desc="mae index")
    try:
        # two batches in flight here hide each one's slowest tar; on Ray, one task per batch
        calls = [(b, data_url, out_url, cfg) for b in todo]
        for batch, record in run_tasks(index_batch, calls, todo, workers=2, ray=ray):
            records[batch.index] = record
            summary.indexed += len(batch.objects)
            summary.bytes_indexed += sum(o.size for o in batch.objects)
            summary.requests += sum(s["requests"] for s in record["shards"])
            summary.bytes_read += sum(s["bytes_read"] for s in record["shards"])
            bar.update(len(batch.objects))
    finally:
        bar.close()
    rejects = missing + [Reject(o.name, "too_large") for o in too_big]
    summary.manifest = _manifest([s for b in batches for s in records[b.index]["shards"]], rejects, cfg,
                                 None if out_url == data_url.rstrip("/") else data_url)
    out_folder.put_bytes(MANIFEST_NAME, summary.manifest.to_json().encode())
    summary.seconds = time.monotonic() - start
    return summary


def _refuse_to_replace_a_shard_manifest(folder: ObjectFolder) -> None:
    """The manifest already at the destination may be replaced only if `mae index`
    wrote it: one `mae shard` wrote holds checksums of every byte, which a headers-only
    index would lose, and one that cannot be read is not ours to overwrite."""
    data = folder.read_if_exists(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if data is None:
        return
    where = folder.where_of(MANIFEST_NAME)
    try:
        old = ShardManifest.from_json(data, where)
    except ManifestError as e:
        raise SourceError(f"{where} exists and is not a readable manifest ({e}); mae index would replace it: "
                          "remove it, or give --out another folder") from e
    if any(s.headers_sha256 is None for s in old.shards):
        raise SourceError(f"{where} is the manifest of a dataset `mae shard` wrote, with checksums of every byte; "
                          "an index would replace it with a headers-only one: give --out another folder")


def _manifest(entries: list[dict], rejects: list[Reject], cfg: IndexConfig, data_url: str | None) -> ShardManifest:
    rule = LabelRule(cfg.label_from)
    top = max((e.get("max_label", -1) for e in entries), default=-1)
    classes = (integer_classes(top, "a .cls member") if rule.kind == "cls"
               else sorted({n for e in entries for n in e.get("class_names", [])}) if rule.from_keys else [])
    shards = []
    for e in entries:
        rejects += [Reject(shown(source), reason)
                    for source, reason in e["rejects"]]
        if e["samples"]:
            shards.append(ShardInfo(e["name"], e["samples"], e["bytes"], e["sha256"], e["etag"],
                                    e["headers_sha256"], e.get("xxh3_128")))
        elif not e["rejects"]:
            rejects.append(Reject(e["name"], "no_samples"))
    return ShardManifest(shards=shards, classes=classes, rejects=rejects, options=cfg.options(), data_url=data_url)
