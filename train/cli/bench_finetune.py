"""`mae bench finetune`: the fine-tuning step through our DeepSpeed engine vs a bare PyTorch loop, same model."""

from __future__ import annotations

import argparse
import json

from model.registry import list_models
from train.cli.common import whole


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_base_patch16", choices=list_models(), help="encoder size")
    p.add_argument("--img-size", type=whole(1), default=224, help="448 for ViT-H at 448 (GPU)")
    p.add_argument("--batch", type=whole(1), default=4)
    p.add_argument("--classes", type=whole(2), default=1000)
    p.add_argument("--steps", type=whole(1), default=5, help="timed steps per round and loop")
    p.add_argument("--warmup", type=whole(0), default=1)
    p.add_argument("--rounds", type=whole(1), default=3)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 on a GPU")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.finetune import FinetuneBench, bench_finetune

    cfg = FinetuneBench(model=args.model, img_size=args.img_size, batch=args.batch, classes=args.classes,
                        steps=args.steps, warmup=args.warmup, rounds=args.rounds, stage=args.stage,
                        precision=args.precision)
    report = bench_finetune(cfg)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"mae bench finetune: {cfg.model} @{cfg.img_size}, batch {cfg.batch}, {cfg.classes} classes, ZeRO stage "
          f"{cfg.stage}, {cfg.precision} on {report['device']}, {cfg.rounds} alternated rounds of {cfg.steps} steps")
    for name in report["runs"]:
        r = report[name]
        print(f"  {name:<18}{r['step_s'] * 1000:9.1f} ms/step  {r['images_per_s']:8.1f} img/s")
    print(f"  engine overhead: {report['engine_overhead']:.1%} of the bare loop's step time")
    return 0
