"""`mae bench metrics`: the trainer's step time with the Prometheus exporter (and
with --tracking, TensorBoard) on vs off."""

from __future__ import annotations

import argparse
import json

from train.cli.common import whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=whole(1), default=150, help="optimizer steps per run")
    p.add_argument("--rounds", type=whole(1), default=3, help="alternated off/on pairs")
    p.add_argument("--images", type=whole(1), default=256)
    p.add_argument("--workers", type=whole(0), default=1)
    p.add_argument("--tracking", action="store_true", help="'on' also writes TensorBoard events (log.tensorboard)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.metrics import bench_metrics

    r = bench_metrics(args.steps, args.rounds, args.images, args.workers, args.tracking)
    if args.json:
        print(json.dumps(r))
        return 0
    off, on = r["median_step_s"]["off"], r["median_step_s"]["on"]
    print(f"mae bench metrics: tiny MAE @32px, micro-batch 8, {args.workers} worker(s), {args.rounds} x "
          f"(off, on) runs of {args.steps} steps")
    print(f"  median step time: metrics off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms -> overhead "
          f"{r['overhead']:+.1%}  (per-round medians off {[round(m * 1e3, 2) for m in r['per_round']['off']]}, "
          f"on {[round(m * 1e3, 2) for m in r['per_round']['on']]} ms)")
    print(f"  exporter cost per micro-step, timed in a loop: {r['sink_cost_per_step_s'] * 1e6:.1f} us = "
          f"{r['sink_cost_fraction']:.2%} of this step (and less of any real GPU step)")
    if args.tracking:
        print(f"  tracking (TensorBoard) cost per step to the loop, timed in a loop: "
              f"{r['tracker_cost_per_step_s'] * 1e6:.1f} us = {r['tracker_cost_fraction']:.2%} of this step")
    return 0
