"""`mae launch slurm`: write (and submit) the sbatch script of a pretraining,
fine-tuning or sharding job from the templates in ``infra/slurm/``.

Pretraining: the run config is loaded and checked here, before anything reaches
the queue; the job runs ``python -m train.pretrain`` with one task per GPU, each
task's rank from Slurm (``infra/slurm/env.py``); Prometheus is on, bound for
scraping from other hosts, and local rank 0 of every node writes its file-SD
targets into the job folder. Logs of every attempt of the job go to one file per
job in ``<job dir>/logs``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.options import OptionError, option, require, require_choice, require_positive
from infra.redact import redact, register_secrets
from infra.slurm.script import TASKS, SbatchOptions, job_script, time_limit_s
from train.errors import LaunchError

log = logging.getLogger(__name__)
SUBMIT_TIMEOUT_S = 120
# sbatch options the job script relies on, so --sbatch-arg may not set them
OWN_SBATCH_FLAGS = ("--signal", "--requeue", "--no-requeue", "--output", "-o", "--chdir", "-D", "--job-name", "-J")


@dataclass
class SlurmJobConfig:
    task: str = option("pretrain", "pretrain | finetune | shard")
    nodes: int = option(1, "nodes of the job")
    gpus_per_node: int | None = option(None, "GPUs per node, one task each (default 8; shard 0; 0: CPU tasks)")
    tasks_per_node: int | None = option(None, "tasks per node (default: gpus_per_node, or 1 without GPUs)")
    cpus_per_task: int | None = option(None, "default: data.num_workers + 2 (pretrain), --workers (shard), else 8")
    time: str | None = option(None, "time limit, e.g. 48:00:00 (default: the partition's)")
    partition: str | None = option(None, "Slurm partition")
    account: str | None = option(None, "Slurm account")
    qos: str | None = option(None, "Slurm QOS")
    exclusive: bool = option(False, "whole nodes only")
    job_name: str | None = option(None, "default: mae-<task>")
    job_dir: str | None = option(None, "script, logs and file-SD targets (default: <checkpoint.dir>/slurm, "
                                       "or slurm/<job name>)")
    signal_grace_s: int = option(300, "seconds before the time limit at which every rank checkpoints")
    max_requeues: int = option(50, "the job stops requeueing itself after this many restarts")
    python: str = option(sys.executable, "the Python on the compute nodes (same path everywhere)")
    setup: tuple[str, ...] = option((), "shell lines run before srun (module load ..., source venv)")
    sbatch_args: tuple[str, ...] = option((), "extra sbatch options, e.g. --constraint=h100")
    metrics: bool = option(True, "pretrain: Prometheus endpoints on 0.0.0.0 and file-SD targets per node")
    file_sd_dir: str | None = option(None, "file-SD target files (default: <job dir>/prometheus-targets)")

    def __post_init__(self) -> None:
        require_choice(self, "task", TASKS)
        require_positive(self, "nodes", "signal_grace_s")
        require(self.gpus() >= 0, "gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        require(self.max_requeues >= 0, "max_requeues", f"must be >= 0, got {self.max_requeues}")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be positive, got {value}")
        if self.time is not None:
            try:
                limit = time_limit_s(self.time)
            except ValueError as e:
                raise OptionError("time", str(e)) from None
            require(limit is None or self.signal_grace_s < limit, "signal_grace_s",
                    f"({self.signal_grace_s} s) must be less than the time limit {self.time} ({limit} s): every rank "
                    "checkpoints that long before the limit")
        if self.task == "shard":
            require(self.nodes == 1 and self.tasks() == 1, "nodes",
                    "sharding runs as one task on one node (its --workers processes)")
        if self.job_name is not None:  # it names the script file and the log files
            require(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}", self.job_name) is not None, "job_name",
                    f"must be letters, digits and _ . + - (at most 128, no leading dot), got {self.job_name!r}")
        for arg in self.sbatch_args:
            flag = arg.split("=", 1)[0]
            require(flag not in OWN_SBATCH_FLAGS, "sbatch_args",
                    f"{arg!r}: the launcher sets {flag} itself (the time-limit signal, the requeue, the job's "
                    "folder, name and log that resume it); use --signal-grace-s, --max-requeues, --job-name")

    def gpus(self) -> int:
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return 0 if self.task == "shard" else 8

    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus() or 1


@dataclass
class WrittenJob:
    script: Path
    log_dir: Path
    job_name: str
    job_id: str | None = None


@dataclass
class TaskCommand:
    command: list[str]
    cpus_per_task: int  # the default when the job does not say
    run_dir: Path | None = None  # pretrain: the checkpoint dir
    values: dict[str, str] = field(default_factory=dict)  # the template's own placeholders


def write_job(job: SlurmJobConfig, args: list[str], config: str | None = None) -> WrittenJob:
    """Render and write the job's script. ``args``: config overrides (pretrain,
    finetune) or the `mae shard` arguments (shard)."""
    workdir = Path.cwd().resolve()
    name = job.job_name or f"mae-{job.task}"
    task = _COMMANDS[job.task](job, args, config, workdir)
    if job.job_dir:
        job_dir = Path(job.job_dir).resolve()
    else:
        job_dir = task.run_dir / "slurm" if task.run_dir else workdir / "slurm" / name
    if job.task == "pretrain" and job.metrics:
        sd_dir = Path(job.file_sd_dir).resolve() if job.file_sd_dir else job_dir / "prometheus-targets"
        from train.config import given_keys

        given = given_keys(config, args)  # in the file or on the command line: what the user set wins
        task.command += [o for o in ("metrics.enabled=true", "metrics.bind=0.0.0.0", f"metrics.file_sd_dir={sd_dir}")
                         if o.split("=", 1)[0] not in given]
    log_dir = job_dir / "logs"
    sbatch = SbatchOptions(job_name=name, nodes=job.nodes, tasks_per_node=job.tasks(),
                           cpus_per_task=job.cpus_per_task or task.cpus_per_task, gpus_per_node=job.gpus(),
                           workdir=str(workdir), log_dir=str(log_dir), signal_grace_s=job.signal_grace_s,
                           time=job.time, partition=job.partition, account=job.account, qos=job.qos,
                           exclusive=job.exclusive, extra=tuple(job.sbatch_args))
    try:
        text = job_script(job.task, sbatch, shlex.join(task.command), "\n".join(job.setup), job.max_requeues,
                          task.values)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if redact(text) != text:
        raise LaunchError("the job's command holds a credential (a password in a URL, a key or secret in storage "
                          "options), which the script would keep in plain text: give it in the environment "
                          "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), which sbatch passes to "
                          "the job")
    log_dir.mkdir(parents=True, exist_ok=True)
    script = job_dir / f"{name}.sbatch"
    script.write_text(text)
    script.chmod(0o755)
    return WrittenJob(script, log_dir, name)


def _pretrain(job: SlurmJobConfig, args: list[str], config: str | None, workdir: Path) -> TaskCommand:
    from train.config import load_config

    config = _required(config)
    cfg = load_config(config, args)  # a bad key or value fails here, not on the cluster
    register_secrets(cfg.data.storage.options)  # the script must not keep them (checked once written)
    return _training("train.pretrain", job, args, config, (workdir / cfg.checkpoint.dir).resolve(),
                     cfg.data.num_workers + 2, cfg.checkpoint)


def _finetune(job: SlurmJobConfig, args: list[str], config: str | None, workdir: Path) -> TaskCommand:
    if importlib.util.find_spec("train.finetune") is None:
        raise LaunchError("fine-tuning jobs run `python -m train.finetune`, which this checkout does not have")
    from train.config import load_config
    from train.eval.finetune_config import FinetuneConfig

    config = _required(config)
    cfg = load_config(config, args, schema=FinetuneConfig)  # a bad key or value fails here, not on the cluster
    register_secrets(cfg.data.storage.options)
    return _training("train.finetune", job, args, config, (workdir / cfg.checkpoint.dir).resolve(), 8,
                     cfg.checkpoint)


def _training(module: str, job: SlurmJobConfig, args: list[str], config: str, run_dir: Path,
              cpus: int, checkpoint: Any) -> TaskCommand:
    """A training task (pretraining, fine-tuning) writing to ``run_dir``: its
    run_summary.json tells the job script whether a signal stopped it early. Its
    requeues resume, so ``checkpoint.resume=false`` is refused where it saves."""
    if checkpoint.enabled and not checkpoint.resume:
        raise LaunchError("checkpoint.resume=false: a requeued attempt of this job would start over instead of "
                          "resuming; start a new run in an empty checkpoint.dir instead")
    return TaskCommand([job.python, "-m", module, "--config", config, *args, f"checkpoint.dir={run_dir}"], cpus,
                       run_dir, {"python": shlex.quote(job.python),
                                 "summary": shlex.quote(str(run_dir / "run_summary.json"))})


def _shard(job: SlurmJobConfig, args: list[str], config: str | None, workdir: Path) -> TaskCommand:
    if config is not None:
        raise LaunchError("--config is for pretrain and finetune jobs; a shard job takes `mae shard` arguments")
    return TaskCommand([job.python, "-m", "train.cli", "shard", *args], _shard_workers(args))


def _required(config: str | None) -> str:
    if not config:
        raise LaunchError("--config is required for pretrain and finetune jobs (a preset such as vit_l, or YAML)")
    return config


_COMMANDS = {"pretrain": _pretrain, "finetune": _finetune, "shard": _shard}


def _shard_workers(args: list[str]) -> int:
    """`mae shard`'s --workers: the CPUs the task needs (8 when not given)."""
    for i, arg in enumerate(args):
        m = re.fullmatch(r"--workers(?:=(.*))?", arg)
        if m:
            value = m.group(1) if m.group(1) is not None else (args[i + 1] if i + 1 < len(args) else "")
            if value.isdigit() and int(value) > 0:
                return int(value)
            raise LaunchError(f"--workers needs a positive number, got {value!r}")
    return 8


def submit(written: WrittenJob) -> str:
    """``sbatch --parsable``; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(written.script)], capture_output=True, text=True,
                             timeout=SUBMIT_TIMEOUT_S)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run on a Slurm login node (or install slurm-client)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"sbatch did not answer within {SUBMIT_TIMEOUT_S} s") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise LaunchError(f"sbatch refused {written.script}: {last}")
    written.job_id = out.stdout.strip().split(";")[0]
    return written.job_id


def job_config(**values: object) -> SlurmJobConfig:
    """``SlurmJobConfig`` from CLI values; a bad value is a ``LaunchError`` naming it."""
    try:
        return SlurmJobConfig(**{k: v for k, v in values.items() if v is not None})
    except OptionError as e:
        raise LaunchError(f"{e.field} {e.requirement}") from None

