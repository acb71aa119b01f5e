"""`mae chaos`: kill a tiny pretraining over and over under object-store faults; prove nothing changed."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="chaos", help="where data, runs, logs and chaos_report.json go; emptied "
                                                     "first, so a new or empty folder, or one an earlier soak made")
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs at random points, every other one inside a save")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of the tiny run (8 steps each with 128 images); a kill costs ~3 steps")
    p.add_argument("--images", type=int, default=128, help="real-photo crops (a multiple of ranks x 8)")
    p.add_argument("--ranks", type=int, default=2, help="processes per launch (torchrun, gloo on CPU)")
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    p.add_argument("--backend", default="cpu", help="decode backend: cpu or dali")
    p.add_argument("--fault-rate", type=float, default=0.1, help="share of object GETs that fail")
    p.add_argument("--seed", type=int, default=0, help="kill points and faults")


def run(args: argparse.Namespace) -> int:
    from train.chaos import ChaosConfig, run_chaos

    report = run_chaos(ChaosConfig(workdir=args.workdir, kills=args.kills, epochs=args.epochs, images=args.images,
                                   ranks=args.ranks, stage=args.stage, backend=args.backend,
                                   fault_rate=args.fault_rate, seed=args.seed))
    print(report.summary())
    print(f"report: {args.workdir}/chaos_report.json")
    return 0 if report.ok else 1
