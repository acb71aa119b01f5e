"""`mae simulate`: downloads, cache and plan cost of a run, before launching it."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from train.cli.common import parse_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset or YAML file whose data section is simulated (data.url, "
                                                  "data.sources, data.plan, data.storage, workers, batch)")
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides, e.g. data.url=s3://bucket/shards")
    p.add_argument("--world", type=int, required=True, help="ranks of the run")
    p.add_argument("--ranks-per-node", type=int, default=8, help="ranks sharing a node's cache and network")
    p.add_argument("--nodes", type=int, default=1, help="nodes to replay (spread over the run)")
    p.add_argument("--epochs", type=int, default=2, help="epochs to replay; the first starts with an empty cache")
    p.add_argument("--bandwidth", type=float, default=25.0, metavar="GBIT", help="network of one node, Gbit/s")
    p.add_argument("--target-ips", type=float, default=0.0, help="the run's images/sec to size the bandwidth for")
    p.add_argument("--samples", type=float, default=None, help="synthetic dataset: samples in all (no manifest read)")
    p.add_argument("--shards", type=int, default=None, help="synthetic dataset: shards")
    p.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("256MiB"), help="synthetic shard size")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pipeline.simulate import SimulationConfig, report_lines, simulate_data
    from train.config import load_config

    data = load_config(args.config, args.overrides).data
    started = time.perf_counter()
    synthetic = (int(args.samples), args.shards or max(1, int(args.samples) // 10_000), args.shard_bytes) \
        if args.samples else None
    config = SimulationConfig(world_size=args.world, ranks_per_node=args.ranks_per_node, epochs=args.epochs,
                              nodes=args.nodes, bandwidth_gbit=args.bandwidth, target_images_per_s=args.target_ips)
    report, what = simulate_data(data, config, synthetic, started)
    if args.json:
        print(json.dumps({**asdict(report), "first_batch_seconds": report.first_batch_seconds}))
        return 0
    print("\n".join(report_lines(report, what)))
    return 0
