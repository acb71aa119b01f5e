"""Render the sbatch templates of this folder.

A template is a complete bash script with ``{{name}}`` placeholders; every
placeholder must get a value and every value must be used (a typo fails here, not
on the cluster). ``{{preamble}}`` is ``preamble.sh``: the part every job shares
(rendezvous address, the time-limit trap, requeue). The ``#SBATCH`` header is built
from ``SbatchOptions``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent
TASKS = ("pretrain", "finetune", "shard")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_DAYS = re.compile(r"(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?")  # days-hours[:minutes[:seconds]]
_CLOCK = re.compile(r"(\d+)(?::(\d+)(?::(\d+))?)?")  # minutes | minutes:seconds | hours:minutes:seconds


def time_limit_s(text: str) -> int | None:
    """Seconds of a Slurm ``--time`` value; None for no limit (0, infinite, unlimited).
    Anything sbatch would refuse at submission raises ``ValueError`` here."""
    if text.lower() in ("infinite", "unlimited"):
        return None
    if m := _DAYS.fullmatch(text):
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif m := _CLOCK.fullmatch(text):
        parts = [int(g) for g in m.groups() if g is not None]
        if len(parts) == 3:  # hours:minutes:seconds
            total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
        else:  # minutes[:seconds]
            total = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
    else:
        raise ValueError(f"{text!r} is not a Slurm time limit (minutes, minutes:seconds, hours:minutes:seconds, "
                         "days-hours, days-hours:minutes, days-hours:minutes:seconds, or unlimited)")
    return total or None


@dataclass
class SbatchOptions:
    """What goes into the ``#SBATCH`` lines of a job."""

    job_name: str
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    workdir: str
    log_dir: str
    signal_grace_s: int
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    extra: tuple[str, ...] = field(default_factory=tuple)  # raw sbatch options, e.g. "--constraint=h100"

    def lines(self) -> list[str]:
        opts = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}",
                f"--cpus-per-task={self.cpus_per_task}"]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        for name in ("time", "partition", "account", "qos"):
            if getattr(self, name):
                opts.append(f"--{name}={getattr(self, name)}")
        if self.exclusive:
            opts.append("--exclusive")
        opts += [f"--chdir={self.workdir}", f"--output={self.log_dir}/%x-%j.out", "--open-mode=append",
                 "--requeue", f"--signal=B:USR1@{self.signal_grace_s}", *self.extra]
        for opt in opts:
            if any(c.isspace() for c in opt):
                raise ValueError(f"sbatch option {opt!r} contains whitespace (sbatch cannot take it in a #SBATCH line)")
        return [f"#SBATCH {opt}" for opt in opts]


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{{name}}`` replaced; unknown or unused names raise."""
    used: set[str] = set()

    def value(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{{name}}}}} has no value")
        used.add(name)
        return values[name]

    text = _PLACEHOLDER.sub(value, template)
    unused = sorted(set(values) - used)
    if unused:
        raise KeyError(f"values given for no placeholder: {', '.join(unused)}")
    return text


def job_script(task: str, sbatch: SbatchOptions, command: str, setup: str, max_requeues: int,
               extra: dict[str, str] | None = None) -> str:
    """The sbatch script for ``task`` (pretrain, finetune, shard): header, shared
    preamble, then the task's ``srun`` of ``command`` (already shell-quoted)."""
    if task not in TASKS:
        raise ValueError(f"unknown Slurm task {task!r}; valid: {', '.join(TASKS)}")
    preamble = render((TEMPLATES / "preamble.sh").read_text(), {
        "setup": setup or "# (no setup lines: the same Python everywhere)", "grace_s": str(sbatch.signal_grace_s),
        "max_requeues": str(max_requeues)})
    values = {"sbatch": "\n".join(sbatch.lines()), "preamble": preamble.rstrip("\n"), "command": command,
              **(extra or {})}
    return render((TEMPLATES / f"{task}.sbatch").read_text(), values)
