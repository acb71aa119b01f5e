"""`mae bench checkpoint`: DeepSpeed's checkpoint save/load vs ours (hashed, fsynced, verified, plain data)."""

from __future__ import annotations

import argparse
import json

from train.cli.common import whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_small_patch16", help="registered model (mae models)")
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    p.add_argument("--rounds", type=whole(1), default=3, help="alternated DeepSpeed/ours saves and loads")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir; use the checkpoint disk)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.checkpoint import bench_checkpoint, format_report

    report = bench_checkpoint(args.model, args.stage, args.rounds, args.dir)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
