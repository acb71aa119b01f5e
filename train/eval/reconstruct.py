"""What the MAE sees and what it fills in (`mae reconstruct CKPT SRC --out grid.png`).

One row per image: original | masked input | reconstruction | reconstruction
with the visible patches pasted back. Images are centre-cropped to a square and
resized to the model's input size; masks come from fixed noise (``--seed``), so
a figure can be reproduced exactly. Image files are read under the project's
image policy: one that is not a usable image is skipped and named, not fatal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from model.mae import NORM_PIX_EPS, MaskedAutoencoderViT
from pipeline.augment import AugmentConfig, Normalizer, center_crop_box
from pipeline.images import BadImage, ImagePolicy, load_pixels, open_image
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.shards.sources import walk_images
from train.errors import EvalInputError
from train.figures import write_image

log = logging.getLogger(__name__)

COLUMNS = ("original", "masked input", "reconstruction", "+ visible patches")


def load_images(src: str, count: int, size: int,
                policy: ImagePolicy = ImagePolicy()) -> tuple[torch.Tensor, list[str]]:
    """``count`` images from a file, a folder of images or a shard dataset, as
    uint8 (N, 3, size, size): centre square crop, bicubic resize. Files that are
    not usable images under ``policy`` are skipped with a warning naming them."""
    path = Path(src)
    if path.is_file() or (path.is_dir() and not (path / "manifest.json").exists()):
        files = [path] if path.is_file() else _image_files(path)
        if len(files) > count:  # spread over the folder, not just its first subfolder
            files = [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]
        images, names = [], []
        for f in files:
            try:
                img = load_pixels(open_image(f.read_bytes(), policy)[0])
            except (BadImage, OSError) as e:  # unusable, or unreadable (permissions)
                log.warning("skipped %s: %s", f, e)
                continue
            x, y, w, h = center_crop_box(*img.size)
            img = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            names.append(str(f.relative_to(path) if path.is_dir() else f.name))
        if not images:
            raise EvalInputError(f"no usable images under {src}")
        return torch.stack(images), names
    loader = build_loader(LoaderConfig(url=src, batch_size=count, num_workers=0, normalize=False, images=policy,
                                       max_corrupt_fraction=1.0,  # a figure: skip (and name) what cannot be shown
                                       augment=AugmentConfig(img_size=size, deterministic=True),
                                       plan=PlanConfig(shuffle=False)), rank=0, world_size=1)
    batch = next(iter(loader), None)
    if batch is None:
        raise EvalInputError(f"no usable images in {src}")
    return batch.images, batch.keys


def _image_files(folder: Path) -> list[Path]:
    """Image files under a folder, links followed (as `mae shard` lists them); what
    cannot be read as a file (a broken link, a FIFO) is skipped with a warning."""
    files = []
    for found in walk_images(str(folder)):
        if found.problem:
            log.warning("skipped %s: %s", folder / found.rel, found.problem)
        else:
            files.append(folder / found.rel)
    return sorted(files)


NORMALIZE = Normalizer()  # ImageNet mean/std, as the models are trained


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
    x = NORMALIZE(images)
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
    original, recon = NORMALIZE.to_pixels(x), NORMALIZE.to_pixels(recon)
    return {"original": original, "masked": original * (1 - pixel_mask) + 0.5 * pixel_mask,
            "reconstruction": recon, "pasted": original * (1 - pixel_mask) + recon * pixel_mask, "loss": loss}


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
    return write_image(out, lambda tmp: grid.save(tmp, format="PNG"))
