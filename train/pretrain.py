"""MAE pretraining with DeepSpeed ZeRO. One entry, three ways to launch:

    deepspeed --num_gpus 8 [--hostfile H] --module train.pretrain --config vit_l [a.b=c ...]
    torchrun --nproc_per_node 8 -m train.pretrain --config vit_l [a.b=c ...]
    mae pretrain --config tiny_cpu data.url=shards        # one process

Rank, local rank and world size come from the launcher's environment; the sample
plan partitions data by global rank. A restarted run resumes from the latest
complete checkpoint by itself; SIGTERM, SIGINT, SIGUSR1 and SIGHUP save and exit
with 128 + the signal (``StopSignal``, ``stop_exit_code``). The loop itself is
``train.trainer``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from infra.redact import describe, redact_logs
from train.config import RunConfig, load_config
from train.engine import all_ranks, shutdown_distributed
from train.errors import exit_code_of, reported_errors
from train.signals import exiting_with, signals_noted, stall_watch
from train.trainer import RunResult, StopSignal, Trainer


def pretrain(cfg: RunConfig) -> RunResult:
    """Build, resume if a checkpoint exists, train, write the run summary, clean up."""
    return run_to_end(cfg, Trainer)


def run_to_end(cfg, build: Callable):
    """Build a training loop (``Trainer``, ``Finetuner``) of ``cfg``, resume if a
    checkpoint exists, run it, write its summary (saying whether a stop saved);
    always clean up. The stop signals are caught from the start: one that comes
    while the loop is built or resumes (a preemption notice at start-up) stops it
    at the end of its first step, saved, rather than killing it; such a run's exit
    code is 128 + the signal (``stop_exit_code``). A job stuck ``log.stall_dump_s``
    without a step writes every thread's stack to stderr."""
    saves = cfg.checkpoint.enabled
    with StopSignal(saves) as stop, stall_watch.armed(cfg.log.stall_dump_s):
        loop = build(cfg)
        try:
            loop.resume()
            result = loop.run(stop)
            loop.write_summary()
        finally:
            loop.close()
        if result.stopped_by_signal:
            # it exits non-zero, and launchers (deepspeed, srun --kill-on-bad-exit) kill
            # the other ranks once one does: none exits before all have closed
            all_ranks(None)
    if result.stopped_by_signal:
        logging.getLogger(__name__).warning(
            "stopped by %s at step %d %s", result.stopped_by_signal, result.step,
            "after saving a checkpoint" if saves else "with no checkpoint saved (checkpoint.enabled=false)")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny_cpu",
                   help="preset name (tiny_cpu, demo_cpu, vit_b, vit_l, vit_h) or YAML file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides")


def run(args: argparse.Namespace) -> int:
    """The run as every entry point executes it: one-line errors, exit codes."""
    return run_job(lambda: pretrain(load_config(args.config, args.overrides)))


def run_job(job: Callable[[], object], name: str = "train.pretrain") -> int:
    """A training job (pretraining, fine-tuning) under a launcher: per-rank logging,
    typed errors as one log line of the logger ``name`` and an exit code."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))  # srun tasks map RANK later
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    redact_logs()
    log = logging.getLogger(name)
    try:
        result = job()
    except reported_errors() as e:
        log.error("%s", describe(e))
        with signals_noted():
            shutdown_distributed(after_error=True)
        return exit_code_of(e)
    with signals_noted():
        shutdown_distributed()
    return stop_exit_code(getattr(result, "stopped_by_signal", None))


def stop_exit_code(signal_name: str | None) -> int:
    """0 for a run that trained to its end; 128 + the signal for one a stop signal
    ended early (saved where checkpoints are on): the shell's convention for a
    process a signal ended, so `mae finetune ... && mae convert ...`, a Kubernetes
    Job and torchrun see that it did not finish, where exit 0 told them it had. The
    Slurm job script requeues it (infra/slurm/preamble.sh)."""
    if not signal_name:
        return 0
    return 128 + signal.Signals.__members__.get(signal_name, signal.SIGTERM).value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train.pretrain", description=__doc__.splitlines()[0])
    add_arguments(p)
    from train.cli.common import parse_with_overrides

    return run(parse_with_overrides(p, argv))


if __name__ == "__main__":
    sys.exit(exiting_with(main()))
