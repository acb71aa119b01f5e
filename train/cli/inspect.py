"""`mae inspect URL [--verify]`: what a shard dataset holds, and whether every shard checks out."""

from __future__ import annotations

import argparse

from train.cli.common import add_storage_arguments, storage_config, whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="dataset folder or URL holding manifest.json")
    p.add_argument("--verify", action="store_true",
                   help="fetch every shard and check every digest the manifest records (xxh3-128, sha256) and its "
                        "sample count; lists every shard that fails")
    p.add_argument("--samples", type=whole(0, 10_000), default=5, help="sample keys to show from the first shard")
    p.add_argument("--write-index", action="store_true",
                   help="(re)write manifest.index, the binary index loaders read, for the current manifest.json")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import ObjectMissing, ShardCorrupt, ShardFormatError
    from pipeline.shards.manifest_index import FORGED
    from pipeline.shards.verify import first_keys, index_report, summarize, verify_shards, write_index
    from pipeline.storage.store import ShardStore

    store = ShardStore(args.url, storage_config(args, cache_limit_gb=1024))
    manifest = write_index(store) if args.write_index else store.read_manifest()
    print(summarize(manifest))
    index_line = index_report(store, manifest)
    print(index_line)
    if args.write_index:
        print(f"wrote manifest.index for {len(manifest.shards)} shards")
    try:
        keys = first_keys(store, manifest, args.samples)
    except (ShardFormatError, ShardCorrupt, ObjectMissing):
        if not args.verify:
            raise
        keys = []  # the first shard's problem is reported with every other shard's below
    if keys:
        print(f"first keys of {manifest.shards[0].name}: {', '.join(keys)}")
    if args.verify:
        problems = verify_shards(store, manifest)
        if index_line.startswith(f"index: {FORGED}"):
            problems.insert(0, index_line.removeprefix("index: "))
        for line in problems:
            print(f"FAIL {line}")
        if problems:
            return 1
        print(f"verified {len(manifest.shards)} shards: checksums and sample counts match")
    return 0
