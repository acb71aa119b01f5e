"""`mae models`: the registry with parameter counts, counted on the meta device."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")


def run(args: argparse.Namespace) -> int:
    from train.memory_plan import model_sizes

    rows = model_sizes()
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
        return 0
    print(f"{'name':<24}{'img':>5}{'patch':>6}{'trainable':>12}{'encoder':>11}{'FLOP ratio':>12}")
    for r in rows:
        print(f"{r['name']:<24}{r['img_size']:>5}{r['patch_size']:>6}{r['trainable'] / 1e6:>11.2f}M"
              f"{r['encoder'] / 1e6:>10.2f}M{r['flop_ratio']:>11.2f}x")
    return 0
