"""`mae bench train`: the DeepSpeed trainer's step vs a bare PyTorch loop, same model and data."""

from __future__ import annotations

import argparse
import json

from model.registry import list_models


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_tiny_patch16", choices=list_models())
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--images", type=int, default=400, help="dataset size (bundled photos)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.trainer import TrainerBench, bench_trainer

    cfg = TrainerBench(model=args.model, img_size=args.img_size, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, rounds=args.rounds, stage=args.stage, workers=args.workers,
                       images=args.images)
    report = bench_trainer(cfg)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"mae bench train: {cfg.model} @{cfg.img_size}, micro-batch {cfg.batch}, ZeRO stage {cfg.stage}, "
          f"1 process, {cfg.rounds} alternated rounds of {cfg.steps} steps")
    for name in report["runs"]:
        r = report[name]
        print(f"  {name:<18}{r['images_per_s']:8.1f} img/s (compute only {r['compute_images_per_s']:.1f}), "
              f"data wait {r['data_wait_fraction']:.0%}")
    print(f"  engine overhead: {report['engine_overhead']:.1%} of compute throughput, "
          f"{report['engine_overhead_end_to_end']:.1%} end to end")
    return 0
