"""The `mae` console script: one thin module per command.

Each command module, ``train.cli.<path joined by _>`` (``mae bench encoder``:
``train.cli.bench_encoder``), has ``add_arguments(parser)`` and ``run(args) -> exit
code`` and turns arguments into one library call. Only the module of the command
being run is imported, and its options added: `mae --help` or `mae inspect` does
not load torch, which a training command's options need. Modules import their
heavy libraries (DeepSpeed, DALI, FFCV) inside ``run``. Only here do the library's
typed errors become one-line messages and exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from infra.redact import one_line, redact_logs
from train.cli.common import parse_with_overrides
from train.errors import exit_code_of, reported_errors

# (command path, help)
COMMANDS: list[tuple[tuple[str, ...], str]] = [
    (("shard",), "write images as webdataset tar shards + manifest to a folder or bucket"),
    (("index",), "index existing webdataset tars in place: a manifest, reading only tar headers"),
    (("inspect",), "summarize (and --verify) a shard dataset"),
    (("pretrain",), "pretrain an MAE (one process; use deepspeed/torchrun for more)"),
    (("finetune",), "fine-tune (or linear-probe, the paper's way) a pretrained encoder on labelled shards"),
    (("export",), "consolidate a ZeRO checkpoint to fp32 safetensors (full MAE + encoder)"),
    (("convert",), "weights in the layout timm's ViT or transformers' ViTMAEModel / ViTForImageClassification "
                          "load"),
    (("reconstruct",), "PNG grid: original | masked | reconstruction | + visible patches"),
    (("probe",), "linear probe and kNN top-1 of a frozen encoder on labelled shards"),
    (("plan",), "model-state and activation memory per GPU for each ZeRO stage"),
    (("simulate",), "a run's downloads, cache use and plan cost per rank, from the manifest alone"),
    (("bench", "train"), "DeepSpeed trainer vs a bare PyTorch loop: images/sec, data wait"),
    (("bench", "finetune"), "the fine-tuning step: DeepSpeed engine vs a bare PyTorch loop"),
    (("bench", "metrics"), "trainer step time with the Prometheus exporter on vs off"),
    (("bench", "checkpoint"), "DeepSpeed's checkpoint save and load vs ours (hashed, verified)"),
    (("bench", "encoder"), "time MAE vs the mask-token encoder baseline"),
    (("bench", "pipeline"), "shard read bandwidth, decode img/s and CPU per image, RSS"),
    (("bench", "ingest"), "mae index on the S3 test server; mae shard one process vs Ray, side by side"),
    (("bench", "plan"), "one rank's sample plan from 1 M to 2 B samples; manifest index vs JSON"),
    (("bench", "inputs"), "cost of validating manifests and images: checked vs trusted, side by side"),
    (("plot", "run"), "a run's loss curve (lr on a second axis) and throughput/data wait, as PNGs"),
    (("plot", "bench"), "figures of benchmark reports (mae bench ... --json)"),
    (("models",), "list registered model sizes with parameter counts"),
    (("launch", "slurm"), "write (and --submit) the sbatch script of a pretrain/finetune/shard job"),
    (("demo",), "the end-to-end demo (see README)"),
    (("chaos",), "kill a tiny pretraining at random points under S3 faults; check losses, weights, samples"),
]


def command_module(path: tuple[str, ...]) -> ModuleType:
    return importlib.import_module("train.cli." + "_".join(path))


def chosen_command(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The command path ``argv`` names (``("bench", "encoder")``), None if none."""
    words = tuple(a for a in argv if not a.startswith("-"))  # `mae` itself has flags only
    return next((path for path, _ in COMMANDS if words[:len(path)] == path), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Every command with its options; given ``argv``, only the options of the
    command it names (the others are listed, for help and errors)."""
    chosen = chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="mae", description="Masked Autoencoder pretraining at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command", required=True)}
    for path, help_text in COMMANDS:
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} subcommands")
                groups[prefix] = sub.add_subparsers(dest="_".join(prefix), required=True)
        sub = groups[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
        if argv is None or path == chosen:
            module = command_module(path)
            sub.set_defaults(_run=module.run)
            module.add_arguments(sub)
    return parser


def console() -> int:
    """The `mae` command itself: ``main``, then the process ends (stop signals are
    only noted from here on: the exit code stays the command's)."""
    from train.signals import exiting_with

    return exiting_with(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_with_overrides(build_parser(argv), argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()  # botocore logs signed requests at DEBUG
    code = None
    try:
        code = args._run(args)
    except reported_errors() as e:
        print(f"mae: error: {one_line(str(e))}", file=sys.stderr)
        code = exit_code_of(e)
    except KeyboardInterrupt:
        print("mae: interrupted", file=sys.stderr)
        code = 130
    finally:
        if "torch.distributed" in sys.modules:  # a command may have started a process group here (a bench)
            from train.engine import shutdown_distributed

            shutdown_distributed(after_error=code != 0)
    return code
