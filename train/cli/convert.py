"""`mae convert SRC OUT --to timm|transformers`: pretrained or fine-tuned weights in the layout timm's
VisionTransformer or transformers' ViTMAEModel / ViTForImageClassification load."""

from __future__ import annotations

import argparse

from train.cli.common import non_empty_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=non_empty_path,
                   help="a run's checkpoint dir, an `mae export` folder, mae/encoder.safetensors, an official MAE "
                        ".pth, or a fine-tuned classifier (RUN/best, RUN/last)")
    p.add_argument("out", type=non_empty_path, help="output folder (model.safetensors + config.json)")
    p.add_argument("--to", required=True, choices=["timm", "transformers"], dest="target")


def run(args: argparse.Namespace) -> int:
    from train.weights.ecosystem import convert

    r = convert(args.source, args.out, args.target)
    print(f"wrote {r['architecture']} for {r['target']} ({r['tensors']} tensors) to {r['out']}: "
          f"{', '.join(r['files'])}")
    return 0
