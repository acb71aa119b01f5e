"""`mae reconstruct CKPT SRC --out grid.png`: what the MAE sees and what it fills in.

One row per image: original | masked input | reconstruction | reconstruction
with the visible patches pasted back. Images are centre-cropped to a square and
resized to the model's input size; masks come from fixed noise (``--seed``), so
a figure can be reproduced exactly.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from model.mae import NORM_PIX_EPS, MaskedAutoencoderViT
from pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from train.pretrained import load_pretrained

UNNORMALIZE_HELP = """\
with norm-pix loss (the default recipe) the decoder predicts each patch's pixels
normalized by that patch's own mean and variance, so a prediction must be
un-normalized before it can be shown. 'visible' (default) uses only what the
model saw: each masked patch gets the mean/variance of the nearest visible
patches. 'target' does what the official MAE visualization does: it uses the
masked patch's true mean/variance, taken from the hidden pixels — prettier, but
it leaks each hidden patch's brightness and contrast into the figure."""
COLUMNS = ("original", "masked input", "reconstruction", "+ visible patches")


def load_images(src: str, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` images from a file, a folder of images or a shard dataset, as
    uint8 (N, 3, size, size): centre square crop, bicubic resize."""
    path = Path(src)
    if path.is_file() or (path.is_dir() and not (path / "manifest.json").exists()):
        exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in exts)
        if not files:
            raise SystemExit(f"no images under {src}")
        if len(files) > count:  # spread over the folder, not just its first subfolder
            files = [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]
        images, names = [], []
        for f in files:
            img = Image.open(f).convert("RGB")
            side = min(img.size)
            box = ((img.size[0] - side) // 2, (img.size[1] - side) // 2)
            img = img.resize((size, size), Image.BICUBIC, box=(*box, box[0] + side, box[1] + side))
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            names.append(str(f.relative_to(path) if path.is_dir() else f.name))
        return torch.stack(images), names
    from pipeline.augment import AugmentConfig
    from pipeline.loader import LoaderConfig, build_loader
    from pipeline.plan import PlanConfig

    loader = build_loader(LoaderConfig(url=src, batch_size=count, num_workers=0, normalize=False,
                                       augment=AugmentConfig(img_size=size, deterministic=True),
                                       plan=PlanConfig(shuffle=False)), rank=0, world_size=1)
    batch = next(iter(loader))
    return batch.images, batch.keys


MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized (N, 3, H, W) -> [0, 1]."""
    return (x * STD + MEAN).clamp(0, 1)


def visible_patch_stats(stat: torch.Tensor, visible: torch.Tensor, grid: int) -> torch.Tensor:
    """Per patch (N, L): the mean of ``stat`` over the nearest visible patches —
    growing square windows until one holds a visible patch — for masked patches;
    the patch's own value for visible ones."""
    s = (stat * visible).view(-1, 1, grid, grid)
    v = visible.view(-1, 1, grid, grid).float()
    est = torch.full_like(s, float("nan"))
    for k in range(3, 2 * grid + 2, 2):
        num = F.avg_pool2d(s, k, stride=1, padding=k // 2, count_include_pad=False)
        den = F.avg_pool2d(v, k, stride=1, padding=k // 2, count_include_pad=False)
        fill = torch.isnan(est) & (den > 0)
        est[fill] = (num / den.clamp_min(1e-12))[fill]
        if not torch.isnan(est).any():
            break
    est = est.view_as(stat)
    return torch.where(visible.bool(), stat, est)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, seed: int,
                unnormalize: str = "visible") -> dict[str, torch.Tensor]:
    """uint8 images -> the four panels in [0, 1] and the per-image masked-patch loss."""
    x = normalize(images)
    cfg = model.cfg
    noise = torch.rand(len(x), cfg.num_patches, generator=torch.Generator().manual_seed(seed))
    latent, mask, ids_restore = model.forward_encoder(x, mask_ratio, noise)
    pred = model.forward_decoder(latent, ids_restore).float()
    target = model.patch_targets(x)
    loss = (((pred - target) ** 2).mean(-1) * mask).sum(1) / mask.sum(1)
    if cfg.norm_pix_loss:
        patches = model.patchify(x)
        mean, var = patches.mean(-1), patches.var(-1)
        if unnormalize == "visible":
            visible = 1 - mask
            mean = visible_patch_stats(mean, visible, cfg.grid_size)
            var = visible_patch_stats(var, visible, cfg.grid_size)
        pred = pred * (var.unsqueeze(-1) + NORM_PIX_EPS) ** 0.5 + mean.unsqueeze(-1)
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, cfg.patch_dim))  # 1 = masked
    original = to_pixels(x)
    return {"original": original, "masked": original * (1 - pixel_mask) + 0.5 * pixel_mask,
            "reconstruction": to_pixels(recon),
            "pasted": original * (1 - pixel_mask) + to_pixels(recon) * pixel_mask, "loss": loss}


def save_grid(panels: dict[str, torch.Tensor], out: Path, cell: int = 128) -> Path:
    keys = ("original", "masked", "reconstruction", "pasted")
    n = len(panels["original"])
    header, pad = 18, 4
    W, H = 4 * (cell + pad) + pad, header + n * (cell + pad) + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(COLUMNS):
        draw.text((pad + c * (cell + pad) + 2, 3), title, fill=(0, 0, 0))
    for r in range(n):
        for c, k in enumerate(keys):
            arr = (panels[k][r].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            # nearest: one patch stays one visible block, nothing is smoothed over
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


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


def run(args: argparse.Namespace) -> int:
    model, info = load_pretrained(args.ckpt)
    if info["kind"] == "encoder":
        raise SystemExit(f"{args.ckpt} holds an encoder only; reconstructions need the decoder too "
                         "(a checkpoint directory, an `mae export` folder or mae.safetensors)")
    images, names = load_images(args.src, args.num, model.cfg.img_size)
    panels = reconstruct(model, images, args.mask_ratio, args.seed, args.unnormalize)
    save_grid(panels, args.out, args.cell)
    losses = panels["loss"].tolist()
    if args.json:
        print(json.dumps({"out": str(args.out), "images": names, "masked_patch_loss": losses}))
    else:
        print(f"wrote {args.out}: {len(names)} images x (original | masked {args.mask_ratio:.0%} | reconstruction | "
              f"+ visible), un-normalized from {args.unnormalize} patch statistics; masked-patch loss "
              f"mean {sum(losses) / len(losses):.4f}" + ("" if math.isfinite(sum(losses)) else " (non-finite!)"))
    return 0
