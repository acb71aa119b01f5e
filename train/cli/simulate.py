"""`mae simulate`: downloads, cache and plan cost of a run, before launching it."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from typing import Any

from infra.options import OptionError, require
from train.cli.common import number, parse_bytes, whole

# The synthetic dataset's bounds: 5x the 2 B samples `mae bench plan` goes to; a million shards (a
# plan of more takes gigabytes); and the samples replayed, over the replayed ranks and epochs, that
# take about half a minute on one core (a plan of more runs for minutes: raise --world, or replay
# fewer --nodes or --epochs).
MAX_SAMPLES = 10**10
MAX_SHARDS = 10**6
MAX_REPLAYED = 10**8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset or YAML file, pretraining or fine-tuning, whose data section is "
                                                  "simulated (data.url, data.sources, data.plan, data.storage, workers, batch)")
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides, e.g. data.url=s3://bucket/shards")
    p.add_argument("--world", type=whole(1, 2**24), required=True, help="ranks of the run")
    p.add_argument("--ranks-per-node", type=whole(1), default=8, help="ranks sharing a node's cache and network")
    p.add_argument("--nodes", type=whole(1), default=1, help="nodes to replay (spread over the run)")
    p.add_argument("--epochs", type=whole(1), default=2, help="epochs to replay; the first starts with an empty cache")
    p.add_argument("--bandwidth", type=number(0, open_lo=True), default=25.0, metavar="GBIT",
                   help="network of one node, Gbit/s")
    p.add_argument("--target-ips", type=number(0), default=0.0, help="the run's images/sec to size the bandwidth for")
    p.add_argument("--samples", type=whole(1, MAX_SAMPLES), default=None,
                   help=f"synthetic dataset: samples in all, up to {MAX_SAMPLES:.0e} (no manifest read); the "
                        f"replayed ranks' samples times --epochs may be at most {MAX_REPLAYED:.0e}")
    p.add_argument("--shards", type=whole(1, MAX_SHARDS), default=None,
                   help=f"synthetic dataset: shards, up to {MAX_SHARDS:.0e} (default: samples / 10,000)")
    p.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("256MiB"), help="synthetic shard size")
    p.add_argument("--json", action="store_true")


def data_config(source: str | None, overrides: list[str]) -> Any:
    """The data section of a pretraining or a fine-tuning config: the file is read as
    a pretraining one, else as a fine-tuning one. When it is neither, the error is the
    pretraining schema's, or the fine-tuning one's for a file with a section only
    fine-tuning has."""
    from train.config import ConfigError, RunConfig, load_config
    from train.eval.finetune_config import FinetuneConfig

    try:
        return load_config(source, overrides).data
    except ConfigError as pretraining_error:
        try:
            return load_config(source, overrides, schema=FinetuneConfig).data
        except ConfigError as finetuning_error:
            only_finetuning = {f.name for f in fields(FinetuneConfig)} - {f.name for f in fields(RunConfig)}
            if any(f"unknown config key {key};" in str(pretraining_error) for key in only_finetuning):
                raise finetuning_error from None
            raise pretraining_error from None


def run(args: argparse.Namespace) -> int:
    from pipeline.simulate import SimulationConfig, report_lines, simulate_data

    data = data_config(args.config, args.overrides)
    started = time.perf_counter()
    synthetic = None
    if args.samples is not None:
        given = [o.split("=", 1)[0] for o in args.overrides if o.startswith(("data.url=", "data.sources="))]
        require(not given, "--samples", f"describes a synthetic dataset, and {', '.join(given)} a real one: give one")
        require(args.shard_bytes >= 512, "--shard-bytes", f"must be at least 512 (one tar header), got {args.shard_bytes}")
        synthetic = (args.samples, args.shards or max(1, args.samples // 10_000), args.shard_bytes)
        ranks = min(args.world, args.ranks_per_node * args.nodes)
        replayed = -(-args.samples // args.world) * ranks * args.epochs
        require(replayed <= MAX_REPLAYED, "--samples", f"{args.samples:,} on {args.world:,} ranks replays {replayed:,} "
                f"samples ({ranks} ranks x {args.epochs} epochs), more than {MAX_REPLAYED:,} (about half a minute): "
                "raise --world, or lower --nodes or --epochs")
    elif args.shards is not None:
        raise OptionError("--shards", "describes a synthetic dataset: give --samples too")
    config = SimulationConfig(world_size=args.world, ranks_per_node=args.ranks_per_node, epochs=args.epochs,
                              nodes=args.nodes, bandwidth_gbit=args.bandwidth, target_images_per_s=args.target_ips)
    report, what = simulate_data(data, config, synthetic, started)
    if args.json:
        print(json.dumps({**asdict(report), "first_batch_seconds": report.first_batch_seconds}))
        return 0
    print("\n".join(report_lines(report, what)))
    return 0
