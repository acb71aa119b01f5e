"""`mae bench checkpoint`: DeepSpeed's checkpoint save/load vs ours (hashed, fsynced, verified, plain data)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_small_patch16", help="registered model (mae models)")
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    p.add_argument("--rounds", type=int, default=3, help="alternated DeepSpeed/ours saves and loads")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir; use the checkpoint disk)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from train.bench.checkpoint import bench_checkpoint

    r = bench_checkpoint(args.model, args.stage, args.rounds, args.dir)
    if args.json:
        print(json.dumps(r))
        return 0
    m = r["median_s"]
    print(f"mae bench checkpoint: {args.model}, ZeRO-{args.stage}, one process, {r['checkpoint_bytes'] / 2**20:.0f} "
          f"MiB per checkpoint, median of {args.rounds} alternated rounds")
    print(f"  save: DeepSpeed {m['plain_save']:.2f} s, ours {m['our_save']:.2f} s (sha256 + fsync + record) -> "
          f"{r['save_overhead']:+.0%}")
    print(f"  verify (read back every file against its sha256): {m['verify']:.2f} s = {r['verify_gb_per_s']:.2f} GB/s")
    print(f"  load: DeepSpeed {m['plain_load']:.2f} s, ours {m['our_load']:.2f} s (verify + weights_only) -> "
          f"{r['load_overhead']:+.0%}")
    return 0
