"""`mae shard SRC DEST` and `mae inspect URL`."""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter

from pipeline.images import ImagePolicy
from pipeline.manifest import ShardManifest
from pipeline.storage import ShardStore, StorageConfig, redact
from pipeline.tar_shards import index_tar
from pipeline.writer import ShardWriterConfig, write_shards

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (else AWS_ENDPOINT_URL; credentials from the standard AWS chain)")


def storage_config(args: argparse.Namespace, **kwargs: object) -> StorageConfig:
    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    return StorageConfig(options=options, **kwargs)


# ------------------------------------------------------------------ shard
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="image folder (class subfolders = labels), list file, or fsspec URL (s3://...)")
    p.add_argument("dest", help="output folder or URL (plain path, file://, s3://, gs://)")
    p.add_argument("--shard-size", type=parse_bytes, default=parse_bytes("256MB"), help="target bytes per shard")
    p.add_argument("--max-samples-per-shard", type=int, default=None)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel shard writers")
    p.add_argument("--no-shuffle", action="store_true", help="keep source order (default: seeded shuffle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reencode", action="store_true", help="re-encode as JPEG (default: original bytes)")
    p.add_argument("--max-side", type=int, default=None, help="with --reencode: shrink the longer side to this")
    p.add_argument("--quality", type=int, default=90, help="with --reencode: JPEG quality")
    p.add_argument("--no-meta", action="store_true", help="no <key>.json with the source path")
    p.add_argument("--mode-policy", choices=["convert", "skip"], default="convert",
                   help="CMYK/grayscale/16-bit images: convert to RGB when read, or reject")
    p.add_argument("--format", choices=["tar", "beton"], default="tar",
                   help="tar: webdataset shards (cpu, dali backends); beton: one FFCV file (ffcv backend)")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="beton: kill FFCV's writer when its output has not grown for this many seconds")
    p.add_argument("--staging", default=None,
                   help="beton: local folder for the validated pass-1 shards (kept, so a rerun resumes; "
                        "default: a temporary folder)")
    p.add_argument("--min-side", type=int, default=ImagePolicy.min_side)
    p.add_argument("--max-pixels", type=int, default=ImagePolicy.max_pixels, help="decompression-bomb guard")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = ShardWriterConfig(
        shard_bytes=args.shard_size, max_samples_per_shard=args.max_samples_per_shard, workers=args.workers,
        shuffle=not args.no_shuffle, seed=args.seed, reencode=args.reencode,
        max_side=args.max_side if args.format == "tar" or args.reencode else None,
        jpeg_quality=args.quality, with_meta=not args.no_meta,
        policy=ImagePolicy(min_side=args.min_side, max_pixels=args.max_pixels, mode_policy=args.mode_policy),
        storage=storage_config(args))
    if args.format == "beton":
        from pipeline.beton import BetonOptions, write_beton

        summary = write_beton(args.src, args.dest, cfg, BetonOptions(
            jpeg_quality=args.quality, max_side=args.max_side, workers=args.workers,
            stall_timeout_s=args.stall_timeout, staging_dir=args.staging))
    else:
        summary = write_shards(args.src, args.dest, cfg)
    print(summary.format())
    print(f"manifest: {redact(args.dest.rstrip('/'))}/manifest.json")
    return 0


# ---------------------------------------------------------------- inspect
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="dataset folder or URL holding manifest.json")
    p.add_argument("--verify", action="store_true", help="fetch every shard and check its sha256 and sample count")
    p.add_argument("--samples", type=int, default=5, help="sample keys to show from the first shard")
    add_storage_arguments(p)


def inspect_summary(manifest: ShardManifest) -> str:
    sizes = [s.samples for s in manifest.shards]
    reasons = Counter(r.reason for r in manifest.rejects)
    lines = [f"format {manifest.format} v{manifest.version}",
             f"samples {manifest.total_samples} in {len(sizes)} shards ({manifest.total_bytes / 2**20:.1f} MiB); "
             f"per shard min {min(sizes, default=0)} / max {max(sizes, default=0)}",
             f"classes {len(manifest.classes)}" + (f": {', '.join(manifest.classes[:10])}" if manifest.classes else " (unlabelled)"),
             f"rejects {len(manifest.rejects)}" + (": " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) if reasons else ""),
             f"options {manifest.options}"]
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    store = ShardStore(args.url, storage_config(args, cache_limit_bytes=2**40))
    manifest = store.read_manifest()
    print(inspect_summary(manifest))
    if manifest.shards and args.samples:
        with store.open_shard(manifest.shards[0]) as f:
            keys = [s.key for s in index_tar(f, manifest.shards[0].name)[: args.samples]]
        print(f"first keys of {manifest.shards[0].name}: {', '.join(keys)}")
    if args.verify:
        for shard in manifest.shards:
            with store.open_shard(shard) as f:  # fetching checks sha256 (raises on mismatch)
                count = len(index_tar(f, shard.name))
            if count != shard.samples:
                print(f"FAIL {shard.name}: {count} samples, manifest says {shard.samples}")
                return 1
        print(f"verified {len(manifest.shards)} shards: checksums and sample counts match")
    return 0
