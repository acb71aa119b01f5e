"""`mae shard SRC DEST`: images to webdataset tar shards (or an FFCV .beton) plus a manifest."""

from __future__ import annotations

import argparse
import os

from pipeline.images import ImagePolicy
from train.cli.common import (add_ray_argument, add_storage_arguments, non_empty, parse_bytes, ray_target,
                              storage_config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=non_empty,
                   help="image folder (class subfolders = labels), list file, parquet file or folder, a "
                        "datasets.save_to_disk folder, or any fsspec URL of these (s3://..., hf://datasets/...)")
    p.add_argument("dest", type=non_empty, help="output folder or URL (plain path, file://, s3://, gs://)")
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
    p.add_argument("--create-bucket", action="store_true",
                   help="create DEST's bucket if it does not exist (default: a missing bucket is an error)")
    p.add_argument("--image-column", default=None, help="parquet/Arrow: the image column (default: detected)")
    p.add_argument("--label-column", default=None,
                   help="parquet/Arrow: the label column (default: label, labels, cls or class if present; '' none)")
    add_ray_argument(p)
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pipeline.shards.writer import ShardWriterConfig, write_shards
    from infra.redact import redact

    cfg = ShardWriterConfig(
        shard_bytes=args.shard_size, max_samples_per_shard=args.max_samples_per_shard, workers=args.workers,
        shuffle=not args.no_shuffle, seed=args.seed, reencode=args.reencode,
        max_side=args.max_side if args.format == "tar" or args.reencode else None,
        jpeg_quality=args.quality, with_meta=not args.no_meta, create_bucket=args.create_bucket,
        image_column=args.image_column, label_column=args.label_column,
        images=ImagePolicy(min_side=args.min_side, max_pixels=args.max_pixels, mode_policy=args.mode_policy),
        storage=storage_config(args))
    if args.format == "beton":
        from pipeline.shards.beton import BetonOptions, write_beton

        summary = write_beton(args.src, args.dest, cfg, BetonOptions(
            jpeg_quality=args.quality, max_side=args.max_side, workers=args.workers,
            stall_timeout_s=args.stall_timeout, staging_dir=args.staging))
    else:
        summary = write_shards(args.src, args.dest, cfg, ray_target(args, workers=args.workers))
    print(summary.format())
    print(f"manifest: {redact(args.dest.rstrip('/'))}/manifest.json")
    return 0
