"""How good are the frozen features? The quick check (`mae probe WEIGHTS --train URL
[--val URL]`); the paper's full linear-probe protocol (LARS, batch 16384, 90 epochs of
augmented crops) is `mae finetune --config linprobe_vit_*` (``train.eval.finetune``).

Two classifiers on the frozen encoder's features of a labelled shard dataset:
- linear probe with the paper's head: BatchNorm without affine parameters, then a
  linear layer, trained with SGD (momentum 0.9, cosine schedule, no weight decay);
  features are the cls token or the average of the patch tokens (``--pool``);
- k-nearest neighbours: cosine similarity, k=20, votes weighted by exp(sim / 0.07).
Features are extracted once, without augmentation (centre crop): the paper's
90-epoch probe re-crops every epoch, which matters at ImageNet scale; on small
datasets cached features are the usual cheaper protocol. Reports top-1 on the
validation split (``--val``, or a seeded ``--val-fraction`` of ``--train``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.mae import MaskedAutoencoderViT
from pipeline.augment import AugmentConfig
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from train.errors import EvalInputError, check_classes
from train.weights.pretrained import load_pretrained


@torch.no_grad()
def extract_features(model: MaskedAutoencoderViT, url: str, pool: str, batch: int = 128,
                     workers: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features (N, D), labels (N,), class names) of every sample of a labelled
    dataset, in order."""
    loader = build_loader(LoaderConfig(url=url, batch_size=batch, num_workers=workers,
                                       augment=AugmentConfig(img_size=model.cfg.img_size, deterministic=True),
                                       plan=PlanConfig(shuffle=False), overlap_epochs=False),  # one pass
                          rank=0, world_size=1)
    if not loader.manifest.labelled:
        raise EvalInputError(f"{url} has no labels (shard a folder with one subfolder per class)")
    feats, labels = [], []
    model.eval()
    for b in loader:
        tokens = model.forward_features(b.images)
        feats.append(tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1))
        labels.append(b.labels)
    return torch.cat(feats).float(), torch.cat(labels), list(loader.manifest.classes)


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


DIVERGED = 10  # a final loss over this many times chance's (log classes) is a diverged probe


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 classes: int, epochs: int = 90, lr: float = 0.1, batch: int = 256, seed: int = 0) -> float:
    """Top-1 of BatchNorm(affine=False) + Linear trained on frozen features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)  # as the official probe
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(train_x), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    chance = math.log(classes)
    if step and not loss.item() <= DIVERGED * chance:  # a diverged head's argmax is a made-up top-1 (NaN too)
        raise EvalInputError(f"the linear probe diverged: its loss ended at {loss.item():.3g}, chance is "
                             f"{chance:.2f}; lower --lr ({lr:g})")
    head.eval()
    with torch.no_grad():
        return (head(val_x).argmax(1) == val_y).float().mean().item()


def knn(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, classes: int,
        k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 of a weighted k-NN vote on cosine similarity."""
    tr, va = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, len(tr))
    sim, idx = (va @ tr.T).topk(k, dim=1)
    votes = torch.zeros(len(va), classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(1) == val_y).float().mean().item()


def probe(weights: str, train_url: str, val_url: str | None = None, val_fraction: float = 0.3, pool: str = "cls",
          epochs: int = 90, lr: float = 0.1, k: int = 20, seed: int = 0, workers: int = 1,
          img_size: int | None = None) -> dict[str, object]:
    model, info = load_pretrained(weights, seed=seed, img_size=img_size)
    x, y, names = extract_features(model, train_url, pool, workers=workers)
    check_classes(names, train_url)
    if val_url:
        vx, vy, val_names = extract_features(model, val_url, pool, workers=workers)
        check_classes(names, train_url, val_names, val_url)
    else:
        tr, va = split(len(x), val_fraction, seed)
        x, y, vx, vy = x[tr], y[tr], x[va], y[va]
    if len(x) < 2:
        held_out = "" if val_url else f" once a fraction {val_fraction} is held out for validation"
        raise EvalInputError(f"{train_url} leaves {len(x)} training sample(s){held_out}: the linear probe needs two")
    classes = int(max(y.max(), vy.max())) + 1
    return {"weights": str(weights), "model": info["model"], "kind": info["kind"], "pool": pool,
            "train_samples": len(x), "val_samples": len(vx), "classes": classes,
            "linear_top1": linear_probe(x, y, vx, vy, classes, epochs, lr, seed=seed),
            "knn_top1": knn(x, y, vx, vy, classes, k), "k": min(k, len(x))}  # k as used: at most the samples
