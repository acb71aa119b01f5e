"""`mae bench train`: what the DeepSpeed engine costs over a bare PyTorch loop.

Same model (same initial weights), same micro-batch, same data (one shard dataset
of bundled photos, read by the same `cpu` loader), one process, rounds alternated
(bare, engine, bare, engine ...). Reports images/sec, the engine's overhead and
each loop's data-wait fraction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.registry import create_model, list_models
from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
from train.config import load_config
from train.engine import build_engine, init_distributed
from train.recipe import param_groups


def _timed_steps(step_fn, loader, steps: int, warmup: int) -> dict[str, float]:
    it = iter(loader)
    wait = busy = 0.0
    images = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t1 = time.perf_counter()
        step_fn(batch.images)
        t2 = time.perf_counter()
        if i >= warmup:
            wait, busy, images = wait + (t1 - t0), busy + (t2 - t1), images + len(batch.keys)
    return {"images_per_s": images / (wait + busy), "data_wait_fraction": wait / (wait + busy),
            "compute_images_per_s": images / busy}


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
    from pipeline.sample_photos import write_photo_folder
    from pipeline.writer import ShardWriterConfig, write_shards

    cfg = load_config(None, [f"model.name={args.model}", f"data.micro_batch={args.batch}",
                             f"data.img_size={args.img_size}", f"deepspeed.stage={args.stage}",
                             "deepspeed.precision=fp32", "optim.lr=1e-4"])
    init_distributed(cfg)
    with tempfile.TemporaryDirectory(prefix="mae-bench-train-") as tmp:
        write_photo_folder(Path(tmp) / "src", args.images)
        write_shards(str(Path(tmp) / "src"), str(Path(tmp) / "shards"), ShardWriterConfig(shard_bytes=8 * 2**20))
        loader = build_loader(LoaderConfig(url=str(Path(tmp) / "shards"), batch_size=args.batch,
                                           num_workers=args.workers, augment=AugmentConfig(img_size=args.img_size)), 0, 1)
        torch.manual_seed(0)
        bare_model = create_model(args.model, img_size=args.img_size)
        ds_model = create_model(args.model, img_size=args.img_size)
        ds_model.load_state_dict(bare_model.state_dict())
        opt = torch.optim.AdamW(param_groups(bare_model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        engine = build_engine(cfg, ds_model, 1e-4)

        def bare_step(images: torch.Tensor) -> None:
            loss, _, _ = bare_model(images)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def engine_step(images: torch.Tensor) -> None:
            loss, _, _ = engine(images)
            engine.backward(loss)
            engine.step()

        runs = {"bare_pytorch": [], "deepspeed_engine": []}
        for _ in range(args.rounds):
            runs["bare_pytorch"].append(_timed_steps(bare_step, loader, args.steps, args.warmup))
            runs["deepspeed_engine"].append(_timed_steps(engine_step, loader, args.steps, args.warmup))
    report = {"model": args.model, "batch": args.batch, "img_size": args.img_size, "stage": args.stage,
              "threads": torch.get_num_threads(), "runs": runs}
    for name, rs in runs.items():
        report[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    b, e = report["bare_pytorch"], report["deepspeed_engine"]
    report["engine_overhead"] = 1 - e["compute_images_per_s"] / b["compute_images_per_s"]
    report["engine_overhead_end_to_end"] = 1 - e["images_per_s"] / b["images_per_s"]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"mae bench train: {args.model} @{args.img_size}, micro-batch {args.batch}, ZeRO stage {args.stage}, "
              f"1 process, {args.rounds} alternated rounds of {args.steps} steps")
        for name in runs:
            r = report[name]
            print(f"  {name:<18}{r['images_per_s']:8.1f} img/s (compute only {r['compute_images_per_s']:.1f}), "
                  f"data wait {r['data_wait_fraction']:.0%}")
        print(f"  engine overhead: {report['engine_overhead']:.1%} of compute throughput, "
              f"{report['engine_overhead_end_to_end']:.1%} end to end")
    return 0
