"""`mae export CKPT OUT`: a ZeRO checkpoint of any stage -> fp32 safetensors (full MAE + encoder)."""

from __future__ import annotations

import argparse

from train.cli.common import non_empty_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=non_empty_path,
                   help="checkpoint.dir of a run (latest complete checkpoint) or one step* dir")
    p.add_argument("out", type=non_empty_path, help="output folder for mae.safetensors and encoder.safetensors")


def run(args: argparse.Namespace) -> int:
    from train.weights.consolidate import export

    model, info = export(args.ckpt, args.out)
    trainable = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"exported {info['model']} ({trainable:.2f}M parameters) from {info['root']}/{info['tag']} "
          f"(step {info['step']}) to {args.out}/mae.safetensors and {args.out}/encoder.safetensors")
    return 0
