"""`mae plot bench`: figures of benchmark reports (`mae bench encoder|train|pipeline --json`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", type=Path, help="JSON reports (several encoder or train reports share a figure)")
    p.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder for bench_<kind>.png")


def run(args: argparse.Namespace) -> int:
    from train.bench.plots import plot_reports

    for path in plot_reports(args.reports, args.out):
        print(f"wrote {path}")
    return 0
