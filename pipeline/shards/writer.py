"""The validating shard writer: images to webdataset tar shards plus a manifest.

Sources are listed by ``pipeline.shards.sources``. Shards are planned before any
image is read — contiguous runs of the (seeded, shuffled) source list filling a
target byte size — so a rerun plans the same shards and skips those already
written and verified. Each shard is written to a
local temporary file, uploaded atomically, and described by a small sidecar
record; the manifest is written last, so it never points at a partial shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from infra.options import option, require, require_positive
from pipeline.errors import ShardFetchError
from pipeline.images import BadImage, ImagePolicy, reencode_jpeg, validate_image
from pipeline.shards.manifest import MANIFEST_NAME, Reject, ShardInfo, ShardManifest
from pipeline.shards.sources import SourceItem, list_sources
from pipeline.shards.tar_format import TarShardWriter
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import put_bytes, put_file, sha256_file
from pipeline.storage.retry import with_retries
from pipeline.storage.urls import filesystem, join

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
    images: ImagePolicy = option(factory=ImagePolicy)
    storage: StorageConfig = option(factory=StorageConfig)

    def __post_init__(self) -> None:
        require_positive(self, "shard_bytes", "workers")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", f"must be in [1, 100], got {self.jpeg_quality}")
        require(self.max_side is None or self.reencode, "max_side", "only applies with reencode=True")

    def options(self) -> dict[str, object]:
        """What decides shard contents (recorded in the manifest, part of the resume key)."""
        return {"shard_bytes": self.shard_bytes, "max_samples_per_shard": self.max_samples_per_shard,
                "shuffle": self.shuffle, "seed": self.seed, "reencode": self.reencode, "max_side": self.max_side,
                "jpeg_quality": self.jpeg_quality if self.reencode else None, "with_meta": self.with_meta,
                "policy": asdict(self.images)}


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

    def format(self) -> str:
        m = self.manifest
        reasons = Counter(r.reason for r in m.rejects)
        lines = [f"{m.total_samples} samples in {len(m.shards)} shards ({m.total_bytes / 2**20:.1f} MiB); "
                 f"{self.written} written, {self.skipped_existing} already complete",
                 f"classes: {len(m.classes)}" + (f" ({', '.join(m.classes[:8])}{' ...' if len(m.classes) > 8 else ''})"
                                                 if m.classes else " (unlabelled)")]
        if m.rejects:
            lines.append(f"rejected {len(m.rejects)}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
            lines += [f"  {r.source}: {r.reason}" for r in m.rejects[:20]]
            if len(m.rejects) > 20:
                lines.append(f"  ... {len(m.rejects) - 20} more in the manifest")
        if self.converted:
            lines.append("converted to RGB: " + ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items())))
        return "\n".join(lines)


# ------------------------------------------------------------- planning
def plan_shards(items: list[SourceItem], cfg: ShardWriterConfig) -> list[ShardJob]:
    order = list(range(len(items)))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
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
def _read_source(item: SourceItem, storage: StorageConfig) -> bytes:
    fs, path = filesystem(item.url, storage)
    return with_retries(f"source {item.rel}", item.url, lambda: fs.cat_file(path), storage.retry)


def write_shard(job: ShardJob, dest: str, classes: list[str], cfg: ShardWriterConfig) -> dict:
    """Write one shard (runs in a worker process). Returns its sidecar record."""
    rejects: list[dict[str, str]] = []
    converted: Counter = Counter()
    samples = 0
    with tempfile.TemporaryDirectory(prefix="mae-shard-") as tmpdir:
        local = os.path.join(tmpdir, job.name)
        with open(local, "wb") as f:
            tar = TarShardWriter(f)
            for pos, item in job.items:
                try:
                    data = _read_source(item, cfg.storage)
                    if cfg.reencode:
                        data, ext = reencode_jpeg(data, cfg.images, cfg.max_side, cfg.jpeg_quality), "jpg"
                    else:
                        ext = item.rel.rsplit(".", 1)[-1].lower()
                    _, _, mode_reason = validate_image(data, cfg.images)
                except BadImage as e:
                    rejects.append({"source": item.rel, "reason": e.reason})
                    log.warning("rejected %s: %s", item.rel, e)
                    continue
                except ShardFetchError as e:
                    rejects.append({"source": item.rel, "reason": "unreadable"})
                    log.warning("rejected %s: %s", item.rel, e)
                    continue
                if mode_reason:
                    converted[mode_reason] += 1
                members = {ext: data}
                if item.label is not None:
                    members["cls"] = str(item.label).encode()
                if cfg.with_meta:
                    meta = {"source": item.rel, **({"class": classes[item.label]} if item.label is not None else {})}
                    members["json"] = json.dumps(meta).encode()
                tar.add(sample_key(pos, item.rel), members)
                samples += 1
            tar.close()
        record = {"name": job.name, "samples": samples, "bytes": os.path.getsize(local), "sha256": sha256_file(local),
                  "sources_digest": job.digest, "rejects": rejects, "converted": dict(converted)}
        fs, root = filesystem(dest, cfg.storage)
        put_file(fs, local, join(root, job.name), cfg.storage.retry)
    put_bytes(fs, join(root, job.name + RECORD_SUFFIX), json.dumps(record).encode(), cfg.storage.retry)
    return record


def _existing_record(fs, root: str, job: ShardJob) -> dict | None:
    """The sidecar of a shard already written from the same sources and options,
    if the shard on storage still matches it byte for byte."""
    try:
        record = json.loads(fs.cat_file(join(root, job.name + RECORD_SUFFIX)))
        if record.get("sources_digest") != job.digest or fs.size(join(root, job.name)) != record["bytes"]:
            return None
        return record if sha256_file(join(root, job.name), fs) == record["sha256"] else None
    except (FileNotFoundError, KeyError, ValueError):
        return None


def write_shards(src: str, dest: str, cfg: ShardWriterConfig) -> WriteSummary:
    """Shard ``src`` into ``dest``; resumable and safe to interrupt."""
    items, classes = list_sources(src, cfg.storage)
    jobs = plan_shards(items, cfg)
    fs, root = filesystem(dest, cfg.storage)
    fs.makedirs(root, exist_ok=True)
    records: dict[int, dict] = {}
    todo = []
    for job in jobs:
        existing = _existing_record(fs, root, job)
        if existing is not None:
            records[job.index] = existing
        else:
            todo.append(job)
    summary = WriteSummary(ShardManifest([]), skipped_existing=len(records))
    log.info("%d images -> %d shards (%d already complete)", len(items), len(jobs), len(records))
    bar = tqdm(total=len(jobs), initial=len(records), unit="shard", disable=not sys.stderr.isatty(), desc="mae shard")
    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for job in todo:
                records[job.index] = write_shard(job, dest, classes, cfg)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # fsspec's IO thread does not survive fork
            with cf.ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(write_shard, job, dest, classes, cfg): job for job in todo}
                for fut in cf.as_completed(futures):
                    records[futures[fut].index] = fut.result()
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
            shards.append(ShardInfo(rec["name"], rec["samples"], rec["bytes"], rec["sha256"]))
    manifest = ShardManifest(shards=shards, classes=classes, rejects=rejects, options=cfg.options())
    put_bytes(fs, join(root, MANIFEST_NAME), manifest.to_json().encode(), cfg.storage.retry)
    summary.manifest = manifest
    return summary
