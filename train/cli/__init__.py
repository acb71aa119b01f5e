"""The `mae` console script: one thin module per command, imported explicitly.

Each command module has ``add_arguments(parser)`` and ``run(args) -> exit code``
and turns arguments into one library call. Modules import their heavy libraries
(DeepSpeed, DALI, FFCV) inside ``run``, so `mae --help` loads none of them. Only
here do the library's typed errors become one-line messages and exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from pipeline.storage.redact import one_line, redact_logs
from train.cli import (bench_encoder, bench_inputs, bench_metrics, bench_pipeline, bench_plan, bench_train, demo, export, inspect,
                       models, plan, pretrain, probe, reconstruct, shard, simulate)
from train.errors import exit_code_of, reported_errors

# (command path, module, help)
COMMANDS: list[tuple[tuple[str, ...], ModuleType, str]] = [
    (("shard",), shard, "write images as webdataset tar shards + manifest to a folder or bucket"),
    (("inspect",), inspect, "summarize (and --verify) a shard dataset"),
    (("pretrain",), pretrain, "pretrain an MAE (one process; use deepspeed/torchrun for more)"),
    (("export",), export, "consolidate a ZeRO checkpoint to fp32 safetensors (full MAE + encoder)"),
    (("reconstruct",), reconstruct, "PNG grid: original | masked | reconstruction | + visible patches"),
    (("probe",), probe, "linear probe and kNN top-1 of a frozen encoder on labelled shards"),
    (("plan",), plan, "model-state and activation memory per GPU for each ZeRO stage"),
    (("simulate",), simulate, "a run's downloads, cache use and plan cost per rank, from the manifest alone"),
    (("bench", "train"), bench_train, "DeepSpeed trainer vs a bare PyTorch loop: images/sec, data wait"),
    (("bench", "metrics"), bench_metrics, "trainer step time with the Prometheus exporter on vs off"),
    (("bench", "encoder"), bench_encoder, "time MAE vs the mask-token encoder baseline"),
    (("bench", "pipeline"), bench_pipeline, "shard read bandwidth, decode img/s and CPU per image, RSS"),
    (("bench", "plan"), bench_plan, "one rank's sample plan from 1 M to 2 B samples; manifest index vs JSON"),
    (("bench", "inputs"), bench_inputs, "cost of validating manifests and images: checked vs trusted, side by side"),
    (("models",), models, "list registered model sizes with parameter counts"),
    (("demo",), demo, "the end-to-end demo (see README)"),
]


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
        sub.set_defaults(_run=module.run)
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()  # botocore logs signed requests at DEBUG
    try:
        return args._run(args)
    except reported_errors() as e:
        print(f"mae: error: {one_line(str(e))}", file=sys.stderr)
        return exit_code_of(e)
    except KeyboardInterrupt:
        print("mae: interrupted", file=sys.stderr)
        return 130
