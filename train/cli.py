"""The `mae` console script: one entry point, subcommands loaded on demand.

Each subcommand lives in the module that owns the work and exposes
``add_arguments(parser)`` and ``run(args) -> exit code``; importing the CLI pulls in
no heavy optional library (DALI, FFCV, DeepSpeed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command path, module, help). Modules are imported only when their command runs.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("shard",), "pipeline.shard_cmd", "write images as webdataset tar shards + manifest to a folder or bucket"),
    (("inspect",), "pipeline.shard_cmd:inspect", "summarize (and --verify) a shard dataset"),
    (("pretrain",), "train.pretrain:cli", "pretrain an MAE (one process; use deepspeed/torchrun for more)"),
    (("export",), "train.export", "consolidate a ZeRO checkpoint to fp32 safetensors (full MAE + encoder)"),
    (("reconstruct",), "train.reconstruct", "PNG grid: original | masked | reconstruction | + visible patches"),
    (("probe",), "train.probe", "linear probe and kNN top-1 of a frozen encoder on labelled shards"),
    (("plan",), "train.plan_cmd", "model-state and activation memory per GPU for each ZeRO stage"),
    (("bench", "train"), "train.bench_train", "DeepSpeed trainer vs a bare PyTorch loop: images/sec, data wait"),
    (("bench", "metrics"), "train.bench_metrics", "trainer step time with the Prometheus exporter on vs off"),
    (("bench", "encoder"), "train.bench_encoder", "time MAE vs the mask-token encoder baseline"),
    (("bench", "pipeline"), "pipeline.bench", "shard read bandwidth, decode img/s and CPU per image, RSS"),
    (("models",), "train.models_cmd", "list registered model sizes with parameter counts"),
    (("demo",), "train.demo", "the end-to-end demo (see README)"),
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae", description="Masked Autoencoder pretraining at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command", required=True)}
    for path, module, help_text in COMMANDS:
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} subcommands")
                groups[prefix] = sub.add_subparsers(dest="_".join(prefix), required=True)
        sub = groups[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        # Argument definitions are cheap to import; the work itself is lazy in run().
        _entry(module, "add_arguments")(sub)
    return parser


def _entry(module: str, name: str):
    """'pkg.mod' -> pkg.mod.<name>; 'pkg.mod:variant' -> pkg.mod.<name>_<variant>
    (with add_arguments -> add_<variant>_arguments)."""
    path, _, variant = module.partition(":")
    mod = importlib.import_module(path)
    if not variant:
        return getattr(mod, name)
    return getattr(mod, f"add_{variant}_arguments" if name == "add_arguments" else f"{name}_{variant}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _entry(args._module, "run")(args)
    except (UserError, ValueError, OSError, ImportError) as e:
        print(f"mae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
