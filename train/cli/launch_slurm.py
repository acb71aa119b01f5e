"""`mae launch slurm`: write (and with --submit, submit) the sbatch script of a
pretraining, fine-tuning or sharding job (templates in infra/slurm/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["pretrain", "finetune", "shard"], default="pretrain")
    p.add_argument("--config", default=None, help="pretrain/finetune: preset (vit_b, vit_l, vit_h) or YAML file")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="one task per GPU (default 8; shard 0)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="without GPUs: CPU tasks per node")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="default: data.num_workers + 2 (pretrain), --workers (shard), else 8")
    p.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--exclusive", action="store_true", default=None, help="whole nodes only")
    p.add_argument("--job-name", default=None, help="default: mae-<task>")
    p.add_argument("--job-dir", default=None,
                   help="script, logs, file-SD targets (default: <checkpoint.dir>/slurm, or slurm/<job name>)")
    p.add_argument("--signal-grace-s", type=int, default=None,
                   help="checkpoint this many seconds before the time limit, then requeue (default 300)")
    p.add_argument("--max-requeues", type=int, default=None, help="stop requeueing after this many (default 50)")
    p.add_argument("--python", default=None, help="Python on the compute nodes (default: this one)")
    p.add_argument("--setup", action="append", default=None, help="shell line before srun (repeatable), "
                   "e.g. --setup 'module load cuda/13'")
    p.add_argument("--sbatch-arg", action="append", default=None, dest="sbatch_args",
                   help="extra sbatch option (repeatable), e.g. --sbatch-arg=--constraint=h100")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=None,
                   help="pretrain: no Prometheus endpoints / file-SD targets")
    p.add_argument("--file-sd-dir", default=None,
                   help="Prometheus file-SD targets (default: <job dir>/prometheus-targets)")
    p.add_argument("--submit", action="store_true", help="submit with sbatch (default: only write the script)")
    p.add_argument("args", nargs="*", help="pretrain/finetune: a.b=value overrides; shard: `mae shard` arguments "
                   "after --")


def run(args: argparse.Namespace) -> int:
    from train.slurm_launch import job_config, submit, write_job

    job = job_config(task=args.task, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                     partition=args.partition, account=args.account, qos=args.qos, exclusive=args.exclusive,
                     job_name=args.job_name, job_dir=args.job_dir, signal_grace_s=args.signal_grace_s,
                     max_requeues=args.max_requeues, python=args.python,
                     setup=tuple(args.setup) if args.setup else None,
                     sbatch_args=tuple(args.sbatch_args) if args.sbatch_args else None, metrics=args.metrics,
                     file_sd_dir=args.file_sd_dir)
    if job.task == "shard":
        from train.cli import build_parser

        build_parser().parse_args(["shard", *args.args])  # a bad `mae shard` option fails now, not in the queue
    written = write_job(job, args.args, args.config)
    print(f"wrote {written.script}")
    if not args.submit:
        print(f"submit with: sbatch {written.script}")
        return 0
    job_id = submit(written)
    log = Path(written.log_dir) / f"{written.job_name}-{job_id}.out"
    print(f"submitted job {job_id}; log: {log} (squeue -j {job_id}; stop for good: scancel {job_id})")
    return 0
