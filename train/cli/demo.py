"""`mae demo` / `make demo`: the whole system on real images, on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("demo"),
                   help="where data, run and pictures go: a new or empty folder, or one an earlier demo made")
    p.add_argument("--s3", action="store_true", help="use a real S3 server (SeaweedFS, started here) as the store")
    p.add_argument("--epochs", type=float, default=50, help="pretraining epochs (~31 steps each)")
    p.add_argument("--photos", type=int, default=800)
    p.add_argument("--finetune-epochs", type=float, default=4, help="epochs of each fine-tuning run on the digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="Prometheus endpoint port (default: a free one)")


def run(args: argparse.Namespace) -> int:
    from train.demo import DemoConfig, format_summary, run_demo

    r = run_demo(DemoConfig(workdir=args.workdir, photos=args.photos, epochs=args.epochs, s3=args.s3,
                            seed=args.seed, port=args.port, finetune_epochs=args.finetune_epochs))
    print(format_summary(r))
    return 0
