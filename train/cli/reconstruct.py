"""`mae reconstruct CKPT SRC --out grid.png`: original | masked | reconstruction | + visible patches."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from train.cli.common import non_empty_path, number, whole
from train.cli.eval_tracking import add_tensorboard_arguments, record_to_tensorboard

MAX_NUM, MAX_CELL = 64, 1024  # the grid stays under 300 M pixels

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
    p.add_argument("--out", type=_image_file, default=Path("reconstructions.png"),
                   help="the grid, an image file (.png, .jpg, ...)")
    p.add_argument("--num", type=whole(1, MAX_NUM), default=8, help=f"images (rows), at most {MAX_NUM}")
    p.add_argument("--mask-ratio", type=number(0, 1, open_lo=True, open_hi=True), default=0.75,
                   help="in (0, 1); at least one patch stays visible")
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=0, help="mask noise: the same seed draws the same masks")
    p.add_argument("--unnormalize", choices=["visible", "target"], default="visible", help=UNNORMALIZE_HELP)
    p.add_argument("--cell", type=whole(1, MAX_CELL), default=128, help=f"pixels per panel, at most {MAX_CELL}")
    p.add_argument("--json", action="store_true", help="print the per-image losses as JSON")
    add_tensorboard_arguments(p)


def _image_file(text: str) -> Path:
    from PIL import Image

    path = non_empty_path(text)
    if path.is_dir() or Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"not an image file name PIL can write: {text!r} (e.g. grid.png)")
    return path


def run(args: argparse.Namespace) -> int:
    from model.mae import num_visible_patches
    from train.errors import EvalInputError
    from train.eval.reconstruct import load_images, reconstruct, save_grid
    from train.weights.pretrained import load_pretrained

    model, info = load_pretrained(args.ckpt)
    if info["kind"] == "encoder":
        raise EvalInputError(f"{args.ckpt} holds an encoder only; reconstructions need the decoder too "
                             "(a checkpoint directory, an `mae export` folder or mae.safetensors)")
    if num_visible_patches(model.cfg.num_patches, args.mask_ratio) < 1:
        raise EvalInputError(f"--mask-ratio {args.mask_ratio} hides all {model.cfg.num_patches} patches of "
                             f"{info['model']}: at least one must stay visible")
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
