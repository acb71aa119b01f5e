"""`mae bench ingest`: `mae index` on the S3 test server (objects/s, bytes read per GiB) and
`mae shard` one process vs Ray with 2 workers — side by side in one run."""

from __future__ import annotations

import argparse
import json

from train.cli.common import parts_of, whole

PARTS = ("index", "shard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", type=parts_of(PARTS), default=PARTS, help="comma list: index, shard")
    p.add_argument("--tars", type=whole(1), default=16, help="index: tars on the S3 test server")
    p.add_argument("--per-tar", type=whole(1), default=200, help="index: samples per tar (.jpg ~500x375, .txt, .json)")
    p.add_argument("--parallel", type=whole(1), default=16, help="index: tars walked at once")
    p.add_argument("--read-ahead", type=whole(0), default=1536, help="index: the read-ahead setting compared")
    p.add_argument("--images", type=whole(1), default=400, help="shard: photos in the source folder")
    p.add_argument("--rounds", type=whole(1), default=2, help="alternated rounds (medians reported)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import os

    from train.bench.ingest import bench_index, bench_shard

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parts = set(args.parts)
    report = {}
    if "index" in parts:
        report["index"] = bench_index(args.tars, args.per_tar, args.rounds, args.parallel, args.read_ahead)
    if "shard" in parts:
        report["shard"] = bench_shard(args.images, args.rounds)
    if args.json:
        print(json.dumps(report))
        return 0
    if "index" in report:
        r = report["index"]
        print(f"mae index on SeaweedFS: {r['tars']} tars, {r['samples']} samples, {r['gib']:.3f} GiB; "
              f"medians of {r['rounds']} alternated rounds")
        for name in [k for k in r if isinstance(r[k], dict)]:
            k = r[name]
            print(f"  {name:>16}: {k['objects_per_s']:.1f} objects/s, {k['requests']} requests "
                  f"({k['requests_per_sample']:.2f}/sample), {k['mib_read_per_gib']:.2f} MiB read per GiB "
                  f"({k['fraction_read']:.3%})")
    if "shard" in report:
        r = report["shard"]
        print(f"mae shard, {r['images']} photos (Ray cluster start {r['ray_start_s']:.1f} s, not timed):")
        for name in ("one_process", "ray_2_workers"):
            k = r[name]
            print(f"  {name:>14}: {k['images_per_s']:.1f} images/s, {k['images_per_s_per_core']:.1f} per worker")
        print(f"  speedup {r['speedup']:.2f}x")
    return 0
