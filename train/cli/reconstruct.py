"""`mae reconstruct CKPT SRC --out grid.png`: original | masked | reconstruction | + visible patches."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from train.cli.eval_tracking import add_tensorboard_arguments, record_to_tensorboard

UNNORMALIZE_HELP = """\
with norm-pix loss (the default recipe) the decoder predicts each patch's pixels
normalized by that patch's own mean and variance, so a prediction must be
un-normalized before it can be shown. 'visible' (default) uses only what the
model saw: each masked patch gets the mean/variance of the nearest visible
patches. 'target' does what the official MAE visualization does: it uses the
masked patch's true mean/variance, taken from the hidden pixels — prettier, but
it leaks each hidden patch's brightness and contrast into the figure."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="run checkpoint dir, a step* dir, an `mae export` folder or mae.safetensors")
    p.add_argument("src", help="an image, a folder of images, or a shard dataset (folder or URL with manifest.json)")
    p.add_argument("--out", type=Path, default=Path("reconstructions.png"))
    p.add_argument("--num", type=int, default=8, help="images (rows)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="mask noise: the same seed draws the same masks")
    p.add_argument("--unnormalize", choices=["visible", "target"], default="visible", help=UNNORMALIZE_HELP)
    p.add_argument("--cell", type=int, default=128, help="pixels per panel")
    p.add_argument("--json", action="store_true", help="print the per-image losses as JSON")
    add_tensorboard_arguments(p)


def run(args: argparse.Namespace) -> int:
    from train.errors import EvalInputError
    from train.eval.reconstruct import load_images, reconstruct, save_grid
    from train.weights.pretrained import load_pretrained

    model, info = load_pretrained(args.ckpt)
    if info["kind"] == "encoder":
        raise EvalInputError(f"{args.ckpt} holds an encoder only; reconstructions need the decoder too "
                             "(a checkpoint directory, an `mae export` folder or mae.safetensors)")
    images, names = load_images(args.src, args.num, model.cfg.img_size)
    panels = reconstruct(model, images, args.mask_ratio, args.seed, args.unnormalize)
    save_grid(panels, args.out, args.cell)
    losses = panels["loss"].tolist()
    record_to_tensorboard(args, {"eval/masked_patch_loss": sum(losses) / len(losses)}, str(args.out),
                          "eval/reconstructions")
    if args.json:
        print(json.dumps({"out": str(args.out), "images": names, "masked_patch_loss": losses}))
    else:
        print(f"wrote {args.out}: {len(names)} images x (original | masked {args.mask_ratio:.0%} | reconstruction | "
              f"+ visible), un-normalized from {args.unnormalize} patch statistics; masked-patch loss "
              f"mean {sum(losses) / len(losses):.4f}" + ("" if math.isfinite(sum(losses)) else " (non-finite!)"))
    return 0
