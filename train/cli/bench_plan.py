"""`mae bench plan`: one rank's plan cost from 1 M to 2 B samples, and the manifest
index vs the JSON, side by side in one run."""

from __future__ import annotations

import argparse
import json

from train.cli.common import number, whole


def _sizes(text: str) -> tuple[tuple[int, int, int], ...]:
    """'1e6:100:4096,2e9:200000:4096' -> ((1000000, 100, 4096), ...)."""
    try:
        return tuple(tuple(int(float(v)) for v in item.split(":")) for item in text.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not samples:shards:ranks[,...]: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="samples:shards:ranks rows, comma separated (default: ImageNet on 1,024 ranks, then 1 M to "
                        "2 B samples on 4,096 ranks, 10,000 per shard)")
    p.add_argument("--window", type=whole(1), default=4, help="data.plan.window_shards")
    p.add_argument("--rounds", type=whole(1), default=3)
    p.add_argument("--reference-max", type=number(0), default=1e7,
                   help="largest size the materialized reference runs on")
    p.add_argument("--index-shards", type=whole(0), default=200_000, help="manifest shards to load both ways (0: skip)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw time and memory against the dataset size")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from infra.options import OptionError
    from train.bench.plan import PlanBench, bench_plan, plot_scaling

    if args.plot and not Path(args.plot).resolve().parent.is_dir():  # before the benchmark, not after it
        raise OptionError("--plot", f"{args.plot}: its folder does not exist")
    cfg = PlanBench(window_shards=args.window, rounds=args.rounds, reference_max=int(args.reference_max),
                    index_shards=args.index_shards, **({"sizes": args.sizes} if args.sizes else {}))
    r = bench_plan(cfg)
    if args.plot:
        plot_scaling(r, args.plot)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"mae bench plan: one rank (the middle one) of a fresh plan, window {cfg.window_shards}, "
          f"medians of {cfg.rounds}")
    print(f"{'samples':>14} {'shards':>8} {'ranks':>6} {'ids/rank':>9} {'first ids s':>12} {'MiB':>7} "
          f"{'elastic s':>10} {'v1 s':>8} {'v1 MiB':>8} {'time x':>7} {'mem x':>7}  target")
    for row in r["rows"]:
        ref = (f"{row['reference_s']:>8.3f} {row['reference_peak_mib']:>8.1f} {row['time_ratio']:>7.1f} "
               f"{row['memory_ratio']:>7.1f}") if "reference_s" in row else f"{'-':>8} {'-':>8} {'-':>7} {'-':>7}"
        target = row.get("target")
        goal = (f"< {target['seconds']:g} s, < {target['mib']:g} MiB: {'met' if target['met'] else 'NOT met'}"
                if target else "")
        print(f"{row['samples']:>14,} {row['shards']:>8,} {row['world']:>6,} {row['rank_samples']:>9,} "
              f"{row['first_ids_s']:>12.3f} {row['peak_mib']:>7.1f} {row['elastic_s']:>10.3f} {ref}  {goal}")
    if r["index"]:
        i = r["index"]
        print(f"manifest of {i['shards']:,} shards: manifest.index {i['index_s']:.3f} s ({i['index_mib']:.1f} MiB, "
              f"peak {i['index_peak_mib']:.0f} MiB) vs manifest.json {i['json_s']:.3f} s ({i['json_mib']:.1f} MiB) -> "
              f"{i['speedup']:.1f}x; < 2 s: {'met' if i['met'] else 'NOT met'}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
