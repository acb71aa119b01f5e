"""`mae pretrain --config PRESET [a.b=c ...]`: the same run as `python -m train.pretrain`, in one process."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from train.pretrain import add_arguments as pretrain_arguments

    pretrain_arguments(p)


def run(args: argparse.Namespace) -> int:
    from train.pretrain import run as run_pretrain

    return run_pretrain(args)
