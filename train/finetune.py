"""Fine-tuning (and the paper's linear probe) with DeepSpeed ZeRO. One entry, three
ways to launch, as pretraining:

    deepspeed --num_gpus 8 --module train.finetune --config finetune_vit_l model.weights=RUN [a.b=c ...]
    torchrun --nproc_per_node 8 -m train.finetune --config linprobe_vit_l model.weights=RUN ...
    mae finetune --config finetune_tiny_cpu data.url=train-shards eval.url=val-shards    # one process

A restarted run resumes from the latest complete checkpoint by itself (exactly);
SIGTERM, SIGINT, SIGUSR1 and SIGHUP save and exit. The loop itself is
``train.eval.finetune``.
"""

from __future__ import annotations

import argparse
import json
import sys


def finetune(cfg):
    """Build, resume if a checkpoint exists, train and evaluate, write the summary, clean up."""
    from train.eval.finetune import Finetuner
    from train.pretrain import run_to_end

    return run_to_end(cfg, Finetuner)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="finetune_tiny_cpu",
                   help="preset (finetune_vit_b/l/h/h448, linprobe_vit_b/l/h, finetune_tiny_cpu) or YAML file")
    p.add_argument("--weights", default=None, help="pretrained weights (same as model.weights=...)")
    p.add_argument("--trainable-blocks", type=int, default=None,
                   help="partial fine-tuning: the last k blocks (+ final norm and head) learn, the rest is frozen")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides")


def config_from(args: argparse.Namespace):
    from train.config import load_config
    from train.eval.finetune_config import FinetuneConfig

    overrides = list(args.overrides)
    if args.weights is not None:
        overrides.append(f"model.weights={json.dumps(args.weights)}")  # quoted: a path named null stays a path
    if args.trainable_blocks is not None:
        overrides.append(f"model.trainable_blocks={args.trainable_blocks}")
    return load_config(args.config, overrides, schema=FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    """The run as every entry point executes it: one-line errors, exit codes."""
    from train.pretrain import run_job

    return run_job(lambda: finetune(config_from(args)), name="train.finetune")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train.finetune", description=__doc__.splitlines()[0])
    add_arguments(p)
    from train.cli.common import parse_with_overrides

    return run(parse_with_overrides(p, argv))


if __name__ == "__main__":
    from train.signals import exiting_with

    sys.exit(exiting_with(main()))
