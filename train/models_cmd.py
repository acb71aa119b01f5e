"""`mae models`: the registry with parameter counts, counted on the meta device."""

from __future__ import annotations

import argparse

import torch

from model.flops import encoder_speedup_flop_ratio
from model.registry import create_model, list_models
from model.weights import is_encoder_key


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def run(args: argparse.Namespace) -> int:
    print(f"{'name':<24}{'img':>5}{'patch':>6}{'trainable':>12}{'encoder':>11}{'FLOP ratio':>12}")
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        encoder = sum(p.numel() for k, p in m.named_parameters() if is_encoder_key(k))
        print(f"{name:<24}{m.cfg.img_size:>5}{m.cfg.patch_size:>6}{trainable / 1e6:>11.2f}M{encoder / 1e6:>10.2f}M"
              f"{encoder_speedup_flop_ratio(m.cfg):>11.2f}x")
    return 0
