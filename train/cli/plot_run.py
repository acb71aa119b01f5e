"""`mae plot run`: a run's loss curve (lr on a second axis) and throughput/data wait
over time, from its log.metrics_file."""

from __future__ import annotations

import argparse
from pathlib import Path

from train.cli.common import non_empty_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics_file", type=non_empty_path, help="the run's log.metrics_file (JSON lines)")
    p.add_argument("--out", type=non_empty_path, default=Path("."), help="folder for loss_curve.png and throughput.png")
    p.add_argument("--title", default="training loss")


def run(args: argparse.Namespace) -> int:
    from train.figures import loss_curve, read_metrics, throughput_curve

    records = read_metrics(args.metrics_file)
    first, last = loss_curve(records, args.out / "loss_curve.png", args.title)
    wrote = [args.out / "loss_curve.png"]
    if any("time" in r and "images_per_s" in r for r in records):
        wrote.append(throughput_curve(records, args.out / "throughput.png"))
    else:  # a fine-tuning run logs no throughput
        print("no throughput.png: the file has no images_per_s/time fields (fine-tuning runs log none)")
    print(f"loss {first:.4f} -> {last:.4f}; wrote {', '.join(map(str, wrote))}")
    return 0
