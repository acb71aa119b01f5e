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
from train.cli import (bench_checkpoint, bench_encoder, bench_finetune, bench_ingest, bench_inputs, bench_metrics,
                       bench_pipeline, bench_plan, bench_train, chaos, convert, demo, export, finetune, index, inspect,
                       launch_slurm, models, plan, plot_bench, plot_run, pretrain, probe, reconstruct, shard, simulate)
from train.errors import exit_code_of, reported_errors

# (command path, module, help)
COMMANDS: list[tuple[tuple[str, ...], ModuleType, str]] = [
    (("shard",), shard, "write images as webdataset tar shards + manifest to a folder or bucket"),
    (("index",), index, "index existing webdataset tars in place: a manifest, reading only tar headers"),
    (("inspect",), inspect, "summarize (and --verify) a shard dataset"),
    (("pretrain",), pretrain, "pretrain an MAE (one process; use deepspeed/torchrun for more)"),
    (("finetune",), finetune, "fine-tune (or linear-probe, the paper's way) a pretrained encoder on labelled shards"),
    (("export",), export, "consolidate a ZeRO checkpoint to fp32 safetensors (full MAE + encoder)"),
    (("convert",), convert, "weights in the layout timm's ViT or transformers' ViTMAEModel / ViTForImageClassification "
                            "load"),
    (("reconstruct",), reconstruct, "PNG grid: original | masked | reconstruction | + visible patches"),
    (("probe",), probe, "linear probe and kNN top-1 of a frozen encoder on labelled shards"),
    (("plan",), plan, "model-state and activation memory per GPU for each ZeRO stage"),
    (("simulate",), simulate, "a run's downloads, cache use and plan cost per rank, from the manifest alone"),
    (("bench", "train"), bench_train, "DeepSpeed trainer vs a bare PyTorch loop: images/sec, data wait"),
    (("bench", "finetune"), bench_finetune, "the fine-tuning step: DeepSpeed engine vs a bare PyTorch loop"),
    (("bench", "metrics"), bench_metrics, "trainer step time with the Prometheus exporter on vs off"),
    (("bench", "checkpoint"), bench_checkpoint, "DeepSpeed's checkpoint save and load vs ours (hashed, verified)"),
    (("bench", "encoder"), bench_encoder, "time MAE vs the mask-token encoder baseline"),
    (("bench", "pipeline"), bench_pipeline, "shard read bandwidth, decode img/s and CPU per image, RSS"),
    (("bench", "ingest"), bench_ingest, "mae index on the S3 test server; mae shard one process vs Ray, side by side"),
    (("bench", "plan"), bench_plan, "one rank's sample plan from 1 M to 2 B samples; manifest index vs JSON"),
    (("bench", "inputs"), bench_inputs, "cost of validating manifests and images: checked vs trusted, side by side"),
    (("plot", "run"), plot_run, "a run's loss curve (lr on a second axis) and throughput/data wait, as PNGs"),
    (("plot", "bench"), plot_bench, "figures of benchmark reports (mae bench ... --json)"),
    (("models",), models, "list registered model sizes with parameter counts"),
    (("launch", "slurm"), launch_slurm, "write (and --submit) the sbatch script of a pretrain/finetune/shard job"),
    (("demo",), demo, "the end-to-end demo (see README)"),
    (("chaos",), chaos, "kill a tiny pretraining at random points under S3 faults; check losses, weights, samples"),
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
