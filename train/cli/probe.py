"""`mae probe WEIGHTS --train URL [--val URL]`: linear probe and kNN top-1 of a frozen encoder."""

from __future__ import annotations

import argparse
import json

from train.cli.common import MAX_IMG_SIZE, check_model, non_empty, number, whole
from train.cli.eval_tracking import add_tensorboard_arguments, record_to_tensorboard


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", help="run checkpoint dir, step* dir, `mae export` folder, mae.safetensors, "
                                   "encoder.safetensors, an official MAE .pth, or random:<model> (a random-init "
                                   "baseline)")
    p.add_argument("--train", type=non_empty, required=True,
                   help="labelled shard dataset (folder or URL with manifest.json)")
    p.add_argument("--val", default=None, help="validation shards (default: a seeded split of --train)")
    p.add_argument("--val-fraction", type=number(0, 1, open_lo=True, open_hi=True), default=0.3,
                   help="without --val: the share of --train held out, in (0, 1)")
    p.add_argument("--pool", choices=["cls", "avg"], default="cls", help="cls token (the paper) or mean of patches")
    p.add_argument("--epochs", type=whole(1, 10_000), default=90, help="linear probe epochs (the paper: 90)")
    p.add_argument("--lr", type=number(0, open_lo=True), default=0.1, help="linear probe learning rate (cosine)")
    p.add_argument("--k", type=whole(1), default=20,
                   help="neighbours for the kNN classifier (at most the training samples; the report gives k as used)")
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=0, help="split, head init and random:<model> weights")
    p.add_argument("--workers", type=whole(0), default=1, help="DataLoader workers extracting features")
    p.add_argument("--img-size", type=whole(1, MAX_IMG_SIZE), default=None,
                   help=f"random:<model> only: input size, a multiple of the model's patch size, at most "
                        f"{MAX_IMG_SIZE}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_tensorboard_arguments(p)


def run(args: argparse.Namespace) -> int:
    from infra.options import OptionError
    from train.eval.probe import probe
    from train.weights.pretrained import RANDOM_PREFIX

    if args.weights.startswith(RANDOM_PREFIX):
        check_model(args.weights[len(RANDOM_PREFIX):], args.img_size, what=RANDOM_PREFIX + "<model>")
    elif args.img_size is not None:
        raise OptionError("--img-size", f"applies to {RANDOM_PREFIX}<model> only (weights have their own size)")
    r = probe(args.weights, args.train, args.val, args.val_fraction, args.pool, args.epochs, args.lr, args.k,
              args.seed, args.workers, args.img_size)
    record_to_tensorboard(args, {"eval/linear_top1": r["linear_top1"], "eval/knn_top1": r["knn_top1"]})
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} ({r['kind']}) from {r['weights']}, {r['pool']} features, {r['classes']} classes, "
              f"{r['train_samples']} train / {r['val_samples']} val: linear probe top-1 {r['linear_top1']:.1%}, "
              f"kNN (k={r['k']}) top-1 {r['knn_top1']:.1%}")
    return 0
