"""`mae index SRC [--out URL]`: a manifest for existing webdataset tars, read in place."""

from __future__ import annotations

import argparse

from train.cli.common import (
    add_ray_argument,
    add_storage_arguments,
    ray_target,
    storage_config,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="tars to index: a brace pattern (s3://b/laion/{00000..41455}.tar), a folder or "
                               "prefix (every *.tar under it), or one tar")
    p.add_argument("--out", default=None,
                   help="where the manifest goes (default: beside the tars; another prefix for read-only data)")
    p.add_argument("--hash", action="store_true",
                   help="also read every byte for a sha256 (default: headers only, size + ETag + header fingerprint)")
    p.add_argument("--label-from", default="cls", metavar="RULE",
                   help="labels: cls (.cls members), dir (the key's folder), prefix:SEP (key up to SEP), none")
    p.add_argument("--parallel", type=int, default=32, help="tars walked at once (one GET in flight each)")
    p.add_argument("--read-ahead", type=int, default=0, metavar="BYTES",
                   help="extra bytes per header GET: fewer GETs when members are small, more bytes read")
    p.add_argument("--batch", type=int, default=64, help="tars per batch (the unit of resume and of Ray tasks)")
    p.add_argument("--create-bucket", action="store_true", help="create the --out bucket if it does not exist")
    add_ray_argument(p)
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pipeline.shards.index import IndexConfig, index_tars
    from infra.redact import redact

    cfg = IndexConfig(hash=args.hash, label_from=args.label_from, parallel=args.parallel, read_ahead=args.read_ahead,
                      batch_objects=args.batch, create_bucket=args.create_bucket, storage=storage_config(args))
    summary = index_tars(args.src, args.out, cfg, ray_target(args, workers=None))
    print(summary.format())
    print(f"manifest: {redact((args.out or summary.data_url).rstrip('/'))}/manifest.json")
    return 0
