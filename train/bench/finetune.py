"""What the fine-tuning step costs through our engine vs a bare PyTorch loop
(`mae bench finetune`).

Same classifier (same initial weights), same layer-decayed AdamW groups, same
device batch (random normalized images, labels over ``classes``), mixup/cutmix +
label smoothing and soft-target cross-entropy on both sides; one process; rounds
alternated (bare, engine, bare, engine ...). The data pipeline is left out on
purpose (`mae bench pipeline` measures it): this is the step. Reports step time,
images/sec and the engine's overhead.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from model.classifier import param_groups_lrd
from train.config import load_config
from train.engine import adamw, build_engine, device_for, init_distributed, set_lr
from train.eval.finetune import build_classifier, optimizer_for
from train.eval.finetune_config import FinetuneConfig
from train.eval.mixup import mix_batch, soft_cross_entropy


@dataclass(frozen=True)
class FinetuneBench:
    model: str = "mae_vit_base_patch16"
    img_size: int = 224
    batch: int = 4
    classes: int = 1000
    steps: int = 5  # timed steps per round and loop
    warmup: int = 1
    rounds: int = 3
    stage: int = 2
    precision: str = "fp32"  # bf16 on a GPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def bench_finetune(args: FinetuneBench) -> dict[str, object]:
    """Bare loop vs engine on the fine-tuning step, rounds alternated; medians and overhead."""
    cfg = load_config("finetune_vit_b", [f"model.name={args.model}", f"data.batch_size={args.batch}",
                                         f"data.augment.img_size={args.img_size}", f"deepspeed.stage={args.stage}",
                                         f"deepspeed.precision={args.precision}", "optim.accum_steps=1",
                                         "optim.lr=1e-4"], schema=FinetuneConfig)
    _, local_rank, _ = init_distributed(cfg.deepspeed)
    device = device_for(local_rank)
    bare, _ = build_classifier(cfg, args.classes)
    tuned, _ = build_classifier(cfg, args.classes)  # the same seeded init
    bare.to(device)
    opt = adamw(cfg, param_groups_lrd(bare, cfg.optim.weight_decay, cfg.model.layer_decay), 1e-4)
    engine = build_engine(cfg, tuned, 1e-4, optimizer_for(cfg, tuned, 1e-4))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    ids = torch.arange(args.batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def bare_step(i: int) -> None:
        for group in opt.param_groups:
            group["lr"] = 1e-4 * group["lr_scale"]
        x, t, _ = mix_batch(cfg.mixup, images, labels, args.classes, 0, 0, ids + i * args.batch)
        with autocast:
            logits = bare(x)
        soft_cross_entropy(logits, t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine_step(i: int) -> None:
        set_lr(engine, 1e-4)
        x, t, _ = mix_batch(cfg.mixup, images, labels, args.classes, 0, 0, ids + i * args.batch)
        loss = soft_cross_entropy(engine(x), t)  # the engine autocasts under bf16
        engine.backward(loss)
        engine.step()

    runs: dict[str, list[float]] = {"bare_pytorch": [], "deepspeed_engine": []}
    for _ in range(args.rounds):
        runs["bare_pytorch"].append(_timed(bare_step, args.steps, args.warmup, device))
        runs["deepspeed_engine"].append(_timed(engine_step, args.steps, args.warmup, device))
    report: dict[str, object] = {"model": args.model, "img_size": args.img_size, "batch": args.batch,
                                 "stage": args.stage, "precision": args.precision, "device": str(device),
                                 "threads": torch.get_num_threads(), "runs": runs}
    for name, times in runs.items():
        step_s = statistics.median(times)
        report[name] = {"step_s": step_s, "images_per_s": args.batch / step_s}
    report["engine_overhead"] = report["deepspeed_engine"]["step_s"] / report["bare_pytorch"]["step_s"] - 1
    return report
