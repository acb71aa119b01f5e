"""The --tensorboard option of the evaluation commands (`mae probe`, `mae
reconstruct`): their results into a run's TensorBoard record."""

from __future__ import annotations

import argparse

from train.cli.common import whole


def add_tensorboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the results as TensorBoard events here (e.g. <checkpoint.dir>/tensorboard)")
    p.add_argument("--step", type=whole(0, 2**53 - 1), default=0,
                   help="with --tensorboard: the step to record them at (a training step, >= 0)")


def record_to_tensorboard(args: argparse.Namespace, scalars: dict[str, float], image_png: str | None = None,
                          image_tag: str = "") -> None:
    """Evaluation results into TensorBoard when ``--tensorboard`` was given."""
    if not args.tensorboard:
        return
    import numpy as np
    from PIL import Image

    from infra.tracking import TrackingConfig, record_results

    images = {image_tag: np.asarray(Image.open(image_png).convert("RGB"))} if image_png else {}
    record_results(TrackingConfig(tensorboard=True, tensorboard_dir=args.tensorboard), args.tensorboard, args.step,
                   scalars, images)
