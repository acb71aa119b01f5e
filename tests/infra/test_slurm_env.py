"""Slurm's task variables → torch.distributed's (infra/slurm/env.py)."""

from __future__ import annotations

import pytest

from infra.slurm.env import first_host, tasks_on_node, torch_env_from_slurm

STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "20", "SLURM_NTASKS": "20", "SLURM_STEP_TASKS_PER_NODE": "8(x2),4",
        "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "123456"}


def test_an_srun_task_gets_rank_world_and_local_world():
    env = torch_env_from_slurm({**STEP, "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"})
    assert env == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "20", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    last_node = torch_env_from_slurm({**STEP, "SLURM_NODEID": "2", "MASTER_ADDR": "gpu07"})
    assert last_node["LOCAL_WORLD_SIZE"] == "4"


def test_master_address_and_port_from_the_job_when_the_script_set_none(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    env = torch_env_from_slurm(STEP)
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_the_batch_script_itself_is_not_a_task():
    batch = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}
    assert torch_env_from_slurm(batch) == {}
    assert torch_env_from_slurm({}) == {}


@pytest.mark.parametrize("text, node, count", [("8", 0, 8), ("8(x2),4", 1, 8), ("8(x2),4", 2, 4), ("2,1(x3)", 3, 1)])
def test_tasks_per_node_forms(text, node, count):
    assert tasks_on_node(text, node) == count


def test_bad_tasks_per_node_is_named():
    with pytest.raises(ValueError, match="8x"):
        tasks_on_node("8x", 0)
    with pytest.raises(ValueError, match="node 3"):
        tasks_on_node("8(x2)", 3)


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("node1") == "node1"
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("a-1,b-2") == "a-1"
