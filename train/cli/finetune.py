"""`mae finetune --config PRESET [a.b=c ...]`: the same run as `python -m train.finetune`, in one process."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from train.finetune import add_arguments as finetune_arguments

    finetune_arguments(p)


def run(args: argparse.Namespace) -> int:
    from train.finetune import run as run_finetune

    return run_finetune(args)
