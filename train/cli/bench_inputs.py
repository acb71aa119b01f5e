"""`mae bench inputs`: what validating manifests and images costs, checked vs trusted side by side."""

from __future__ import annotations

import argparse
import json

from train.cli.common import whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=whole(1), default=100_000, help="shards in the synthetic manifest")
    p.add_argument("--images", type=whole(1), default=300, help="real-photo JPEGs (~500x375) for the writer's checks")
    p.add_argument("--rounds", type=whole(1), default=3, help="alternated (trusted, checked) pairs")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.inputs import bench_inputs

    r = bench_inputs(args.shards, args.images, args.rounds)
    if args.json:
        print(json.dumps(r))
        return 0
    m, i = r["manifest"], r["images"]
    print(f"mae bench inputs: medians of {args.rounds} alternated rounds")
    print(f"  manifest of {m['shards']} shards ({m['mib']:.1f} MiB): trusted {m['trusted_s']:.3f} s, validated "
          f"{m['validated_s']:.3f} s -> {m['ratio']:.2f}x")
    for kind, label in (("plain", "plain JPEGs"), ("exif", "JPEGs with EXIF")):
        k = i[kind]
        print(f"  writer checks per image, {i['images']} {label}: decode {k['before_ms_per_image']:.2f} ms, decode "
              f"and EXIF orientation check {k['after_ms_per_image']:.2f} ms -> overhead {k['overhead']:+.1%}")
    return 0
