"""`mae bench encoder`: time MAE vs the mask-token encoder baseline (the paper's Table 2)."""

from __future__ import annotations

import argparse
import json

from model.registry import list_models
from train.cli.common import number, torch_device, whole
from train.speedup import SpeedupConfig, format_report, measure_speedup


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SpeedupConfig()
    p.add_argument("--model", default=d.model, choices=list_models(), help="registry name")
    p.add_argument("--batch", type=whole(1), default=d.batch, help="micro-batch per step")
    p.add_argument("--steps", type=whole(1), default=d.steps, help="timed steps per variant")
    p.add_argument("--warmup", type=whole(0), default=d.warmup, help="untimed steps per variant first")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=d.dtype, help="bf16 = autocast, fp32 = plain")
    p.add_argument("--device", type=_device, default=d.device,
                   help="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1' ...")
    p.add_argument("--compile", nargs="?", const="blocks", default="", choices=["blocks", "model"],
                   help="torch.compile both models: each transformer block (the default; a quarter of the "
                        "whole model's compile time on ViT-B/L) or the whole model")
    p.add_argument("--mask-ratio", type=number(0, 1, open_hi=True), default=d.mask_ratio, help="in [0, 1)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=d.seed)
    p.add_argument("--peak-tflops", type=number(0, open_lo=True), default=None,
                   help="peak bf16 TFLOP/s for MFU if the card is not known")
    p.add_argument("--breakdown", action="store_true",
                   help="profile one more step of each variant: its time by op family (matmul, attention, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _device(text: str) -> str:
    """'auto', or a device ``torch_device`` accepts."""
    return text if text == "auto" else torch_device(text)


def run(args: argparse.Namespace) -> int:
    cfg = SpeedupConfig(
        model=args.model, batch=args.batch, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
        device=args.device, compile=args.compile, mask_ratio=args.mask_ratio,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, breakdown=args.breakdown,
    )
    report = measure_speedup(cfg)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
