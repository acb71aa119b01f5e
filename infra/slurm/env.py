"""A task of an ``srun`` step → the environment torch.distributed reads.

Inside ``srun``, Slurm tells each task who it is (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_TASKS_PER_NODE``,
``SLURM_NODEID``); the rendezvous host is the first node of the job. This is the
one place that turns those into ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` — no ssh, no hostfile.
The batch script itself (not a step: no ``SLURM_STEP_ID``) is left alone, so a
stray single-process command there does not wait for a world that never comes.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT from the job id when the script set none


def in_srun_step(env: Mapping[str, str]) -> bool:
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """``SLURM_STEP_TASKS_PER_NODE`` ("8(x2),4" = 8, 8, 4) → the count on node ``node_id``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"node {node_id} is not in tasks per node {tasks_per_node!r}")
    return counts[node_id]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[03-05,09],cpu1" → "gpu03"), as
    ``scontrol show hostnames`` gives it; parsed here when scontrol is missing."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        if not m:
            raise ValueError(f"cannot read the Slurm node list {nodelist!r}") from None
        return m.group(1) + (m.group(2) or "")


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this ``srun`` task; {} outside a step.
    MASTER_ADDR/MASTER_PORT already set (the sbatch template exports them) win."""
    if not in_srun_step(env):
        return {}
    node_id = int(env.get("SLURM_NODEID", 0))
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or world
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": world,
           "LOCAL_WORLD_SIZE": str(tasks_on_node(per_node, node_id))}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_host(nodelist)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % PORT_SPAN)
    return out
