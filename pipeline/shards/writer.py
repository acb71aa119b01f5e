"""The validating shard writer: images to webdataset tar shards plus a manifest.

Sources are listed by ``pipeline.shards.sources``. Shards are planned before any
image is read — contiguous runs of the (seeded, shuffled) source list filling a
target byte size — so a rerun plans the same shards and skips those already
written and verified. Each shard is written to a
local temporary file, uploaded atomically, and described by a small sidecar
record; the manifest is written last, so it never points at a partial shard.

Every source is judged by the one image policy (``pipeline.images``): unusable
files and what the listing could not use (broken links, non-files) become named
rejects in the manifest; an image whose EXIF orientation turns it is re-encoded
upright (counted as an ``exif_orientation`` conversion). A source that is missing
or denied is rejected; one that still fails after the retry policy stops the
run (rerun to resume) rather than being dropped. The destination bucket must
exist unless ``create_bucket`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from infra.files import remove_dead_temps, staging_dir
from infra.options import option, require, require_positive
from infra.redact import redact
from pipeline.errors import ObjectNotAccessible, SourceError
from pipeline.images import BadImage, ImagePolicy, check_image, is_image_name, max_file_bytes, reencode_jpeg
from pipeline.shards.manifest import Reject, ShardInfo, ShardManifest, read_record
from pipeline.shards.manifest_index import write_manifest
from pipeline.shards.report import classes_line, reject_lines, throughput_line
from pipeline.shards.sources import SourceItem, list_sources
from pipeline.shards.tables import TableColumns, image_extension, read_rows
from pipeline.shards.tar_format import TarShardWriter
from pipeline.shards.tasks import RayTarget, cluster_cpus, run_tasks
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import MANIFEST_HASHES, ObjectFolder, call_at, cat_limited, file_digests

log = logging.getLogger(__name__)
RECORD_SUFFIX = ".record.json"


@dataclass(frozen=True)
class ShardWriterConfig:
    shard_bytes: int = option(256 * 2**20, "target bytes per shard")
    max_samples_per_shard: int | None = option(None, "cap on samples per shard")
    workers: int = option(1, "parallel shard-writing processes")
    shuffle: bool = option(True, "mix classes across shards (the sample plan shuffles again per epoch)")
    seed: int = option(0, "the shuffle's seed")
    reencode: bool = option(False, "re-encode every image as RGB JPEG (default: original bytes)")
    max_side: int | None = option(None, "with reencode: shrink the longer side to this")
    jpeg_quality: int = option(90, "with reencode: JPEG quality")
    with_meta: bool = option(True, "<key>.json with the source path")
    image_column: str | None = option(None, "parquet/Arrow sources: the image column (default: detected)")
    label_column: str | None = option(None, "parquet/Arrow sources: the label column (default: detected; '' none)")
    create_bucket: bool = option(False, "create the destination bucket when it does not exist (else: an error)")
    images: ImagePolicy = option(factory=ImagePolicy)
    storage: StorageConfig = option(factory=StorageConfig)

    def __post_init__(self) -> None:
        require_positive(self, "shard_bytes", "workers")
        for name in ("max_samples_per_shard", "max_side"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be positive, got {value}")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        require(self.max_side is None or self.reencode, "max_side", "only applies with reencode=True")

    def options(self) -> dict[str, object]:
        """What decides shard contents (recorded in the manifest, part of the resume key)."""
        return {"shard_bytes": self.shard_bytes, "max_samples_per_shard": self.max_samples_per_shard,
                "shuffle": self.shuffle, "seed": self.seed, "reencode": self.reencode, "max_side": self.max_side,
                "jpeg_quality": self.jpeg_quality if self.reencode else None, "with_meta": self.with_meta,
                "policy": asdict(self.images),
                **{k: v for k, v in (("image_column", self.image_column), ("label_column", self.label_column))
                   if v is not None}}


@dataclass
class ShardJob:
    index: int
    name: str
    items: list[tuple[int, SourceItem]]  # (global position, item)
    digest: str


@dataclass
class WriteSummary:
    manifest: ShardManifest
    written: int = 0
    skipped_existing: int = 0
    converted: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # wall time of the run
    workers: int = 1

    def format(self) -> str:
        m = self.manifest
        lines = [f"{m.total_samples} samples in {len(m.shards)} shards ({m.total_bytes / 2**20:.1f} MiB); "
                 f"{self.written} written, {self.skipped_existing} already complete",
                 classes_line(m.classes)]
        lines += reject_lines(m.rejects)
        if self.converted:
            lines.append("converted: " + ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items())))
        if self.seconds:
            lines.append(throughput_line(m.total_samples, m.total_bytes, self.seconds, self.workers))
        return "\n".join(lines)


# ------------------------------------------------------------- planning
def shuffled_order(items: list[SourceItem], cfg: ShardWriterConfig) -> list[int]:
    """Source positions in writing order: a seeded shuffle of files; table rows are
    shuffled a row group at a time (kept together), so a shard reads one or two row
    groups instead of a slice of every one."""
    blocks: dict[object, list[int]] = {}
    for pos, it in enumerate(items):
        blocks.setdefault((it.url, it.row.group) if it.row is not None else pos, []).append(pos)
    keys = list(blocks)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(keys)
    return [p for k in keys for p in blocks[k]]


def plan_shards(items: list[SourceItem], cfg: ShardWriterConfig) -> list[ShardJob]:
    order = shuffled_order(items, cfg)
    jobs: list[ShardJob] = []
    current: list[tuple[int, SourceItem]] = []
    size = 0
    options = json.dumps(cfg.options(), sort_keys=True)

    def close() -> None:
        lines = [options] + [f"{pos}\t{it.rel}\t{it.size}\t{it.label}" for pos, it in current]
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        jobs.append(ShardJob(len(jobs), f"shard-{len(jobs):06d}.tar", list(current), digest))

    for pos in order:
        it = items[pos]
        full = current and (size + max(it.size, 0) > cfg.shard_bytes
                            or (cfg.max_samples_per_shard and len(current) >= cfg.max_samples_per_shard))
        if full:
            close()
            current, size = [], 0
        current.append((pos, it))
        size += max(it.size, 0)
    if current:
        close()
    return jobs


def sample_key(position: int, rel: str) -> str:
    stem = rel.rsplit("/", 1)[-1].split(".", 1)[0]
    return f"{position:08d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:80]}"


# -------------------------------------------------------------- writing
UPRIGHT_QUALITY = 95  # re-encoding an image only to apply its EXIF orientation


def _read_source(item: SourceItem, cfg: ShardWriterConfig) -> bytes:
    """The source image's bytes; one larger than any usable image is refused before
    it is read (a sparse file, a listing that lies), or as soon as it proves longer."""
    limit = max_file_bytes(cfg.images)
    if item.size > limit:
        raise BadImage("too_large", f"{item.size:,} bytes, more than an image of max_pixels={cfg.images.max_pixels:,} "
                                    f"needs ({limit:,})")
    data = call_at(item.url, cfg.storage, f"source {item.rel}",
                   lambda fs, path: cat_limited(fs, path, limit, cfg.storage))
    if len(data) > limit:
        raise BadImage("too_large", f"more than {limit:,} bytes, more than an image of max_pixels="
                                    f"{cfg.images.max_pixels:,} needs")
    return data


def _stored_image(data: bytes, item: SourceItem, cfg: ShardWriterConfig) -> tuple[bytes, str, list[str]]:
    """(bytes to store, extension, conversion reasons) of a source image; raises BadImage."""
    mode_reason, turns = check_image(data, cfg.images)
    if cfg.reencode or turns:
        quality = cfg.jpeg_quality if cfg.reencode else UPRIGHT_QUALITY
        data = reencode_jpeg(data, cfg.images, cfg.max_side if cfg.reencode else None, quality, upright=True)
        ext = "jpg"
    else:
        # the name's image extension, else (a table row, a listed file named without one) the bytes' own:
        # readers pick a sample's image by its member's extension
        ext = (item.rel.rsplit(".", 1)[-1].lower() if item.row is None and is_image_name(item.rel)
               else image_extension(data))
        if ext is None:  # a format we do not store as is
            data, ext = reencode_jpeg(data, cfg.images, None, UPRIGHT_QUALITY, upright=True), "jpg"
    return data, ext, [r for r in (mode_reason, "exif_orientation" if turns else None) if r]


def write_shard(job: ShardJob, dest: str, classes: list[str], cfg: ShardWriterConfig) -> dict:
    """Write one shard (runs in a worker process). Returns its sidecar record."""
    rejects: list[dict[str, str]] = []
    converted: Counter = Counter()
    samples = 0

    def reject(item: SourceItem, reason: str, detail: object) -> None:
        rejects.append({"source": item.rel, "reason": reason})
        log.warning("rejected %s: %s", item.rel, detail)

    rows = read_rows([(pos, it.url, it.row) for pos, it in job.items if it.row is not None and not it.problem],
                     cfg.storage)
    with staging_dir("mae-shard-") as tmpdir:
        local = os.path.join(tmpdir, job.name)
        with open(local, "wb") as f:
            tar = TarShardWriter(f)
            for pos, item in job.items:
                if item.problem:
                    reject(item, item.problem, item.problem)
                    continue
                try:
                    data = rows.get(pos) if item.row is not None else _read_source(item, cfg)
                    if data is None:
                        raise BadImage("empty", "the row holds no image bytes")
                    data, ext, reasons = _stored_image(data, item, cfg)
                except BadImage as e:
                    reject(item, e.reason, e)
                    continue
                except ObjectNotAccessible as e:  # missing or denied: a retry cannot help
                    reject(item, "unreadable", e)
                    continue
                converted.update(reasons)
                members = {ext: data}
                if item.label is not None:
                    members["cls"] = str(item.label).encode()
                if cfg.with_meta:
                    meta = {"source": item.rel, **({"class": classes[item.label]} if item.label is not None else {})}
                    members["json"] = json.dumps(meta).encode()
                tar.add(sample_key(pos, item.rel), members)
                samples += 1
            tar.close()
        record = {"name": job.name, "samples": samples, "bytes": os.path.getsize(local),
                  **file_digests(local, algorithms=MANIFEST_HASHES), "sources_digest": job.digest,
                  "rejects": rejects, "converted": dict(converted)}
        folder = ObjectFolder(dest, cfg.storage)
        if samples:  # a shard whose every source was rejected is only its record
            folder.put_file(local, job.name)
    folder.put_bytes(job.name + RECORD_SUFFIX, json.dumps(record).encode())
    return record


def _existing_record(folder: ObjectFolder, job: ShardJob) -> dict | None:
    """The sidecar of a shard already written from the same sources and options,
    if the shard on storage still matches it byte for byte."""
    record = read_record(folder, job.name + RECORD_SUFFIX)
    if record is None or record.get("sources_digest") != job.digest:
        return None
    if record.get("samples") == 0 and isinstance(record.get("rejects"), list):
        return record  # nothing was written but the rejects
    try:
        if folder.size(job.name) != record.get("bytes"):
            return None
        digests = folder.digests(job.name)
    except ObjectNotAccessible:  # the shard itself is gone: write it again
        return None
    if "sha256" not in record or any(record.get(name, digest) != digest for name, digest in digests.items()):
        return None
    return {**record, **digests}  # a record from before xxh3_128 was recorded gains it


def write_shards(src: str, dest: str, cfg: ShardWriterConfig, ray: RayTarget | None = None) -> WriteSummary:
    """Shard ``src`` into ``dest``; resumable and safe to interrupt. The shards are
    written by ``cfg.workers`` processes here, or as tasks on a Ray cluster (``ray``):
    the same plan, the same bytes."""
    start = time.monotonic()
    folder = ObjectFolder(dest, cfg.storage)
    folder.prepare(cfg.create_bucket)  # before any work: a misspelled bucket fails now
    items, classes = list_sources(src, cfg.storage, TableColumns(cfg.image_column, cfg.label_column))
    jobs = plan_shards(items, cfg)
    records: dict[int, dict] = {}
    todo = []
    for job in jobs:
        existing = _existing_record(folder, job)
        if existing is not None:
            records[job.index] = existing
        else:
            todo.append(job)
    summary = WriteSummary(ShardManifest([]), skipped_existing=len(records),
                           workers=cfg.workers if ray is None else cluster_cpus(ray))
    log.info("%d images -> %d shards (%d already complete)", len(items), len(jobs), len(records))
    bar = tqdm(total=len(jobs), initial=len(records), unit="shard", disable=not sys.stderr.isatty(), desc="mae shard")
    try:
        calls = [(job, dest, classes, cfg) for job in todo]
        for job, record in run_tasks(write_shard, calls, todo, cfg.workers, processes=True, ray=ray):
            records[job.index] = record
            bar.update()
    finally:
        bar.close()
    summary.written = len(todo)
    shards, rejects = [], []
    for job in jobs:
        rec = records[job.index]
        summary.converted.update(rec.get("converted", {}))
        rejects += [Reject(**r) for r in rec["rejects"]]
        if rec["samples"]:
            shards.append(ShardInfo(rec["name"], rec["samples"], rec["bytes"], rec["sha256"],
                                    xxh3_128=rec.get("xxh3_128")))
    if not shards:
        reasons = Counter(r.reason for r in rejects)
        raise SourceError(f"no usable images in {redact(src)}: " + (
            f"all {len(rejects)} were rejected ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}); "
            if rejects else "") + "no manifest written")
    manifest = ShardManifest(shards=shards, classes=classes, rejects=rejects, options=cfg.options())
    write_manifest(folder, manifest)  # its index first, the JSON last
    if folder.local:  # a writer killed mid-file (a lost Ray worker) left its temporary file
        remove_dead_temps(folder.root)
    summary.manifest = manifest
    summary.seconds = time.monotonic() - start
    return summary
