"""`mae demo` / `make demo`: the end-to-end demo.

Until the data pipeline, trainer and evaluation land, the demo runs what exists
today for real — the model registry and a short encoder-speedup measurement on a
small model — and says plainly what the full demo will add.
"""

from __future__ import annotations

import argparse

from train import bench_encoder, models_cmd

PLANNED = """\
Still to come in `make demo` (not built yet, so not run):
  - shard real images from scikit-image / scikit-learn with `mae shard`
  - pretrain a tiny MAE through the DeepSpeed trainer on CPU, Prometheus endpoint up
  - reconstructions and loss-curve PNGs, linear probe pretrained vs random init"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options yet


def run(args: argparse.Namespace) -> int:
    print("== maescale demo (foundation stage): what works today ==\n")
    print("Model registry (parameter counts must match the official MAE release):")
    models_cmd.run(args)
    print("\nEncoder speedup on this machine, mae_vit_tiny_patch16, batch 8, fp32, CPU:")
    report = bench_encoder.run_encoder_bench(
        bench_encoder.EncoderBenchConfig(model="mae_vit_tiny_patch16", batch=8, steps=3, warmup=1,
                                         dtype="fp32", device="cpu"))
    print(bench_encoder.format_report(report))
    print("\n" + PLANNED)
    return 0
