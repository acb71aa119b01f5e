"""`mae launch slurm` on a real Slurm (Debian slurm-wlm + munge, one node on
localhost, started here): a 2-task CPU/gloo pretraining job end to end, then the
same job interrupted three ways — a TERM to its tasks (`scancel --signal=TERM`, a
preemption notice), the time-limit warning to its batch script (`scancel --batch
--signal=USR1`, what `--signal=B:USR1@grace` sends) and `scontrol requeue` — each
time it checkpoints, requeues itself and resumes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.net import free_port, port_is_free
from tests.helpers.photos import photo_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # 96 samples / (2 ranks x 8) = 6 steps per epoch: 10 epochs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from infra.testing.slurm import LocalSlurm

    with LocalSlurm(cpus=2, root=str(tmp_path_factory.mktemp("slurm"))) as cluster:  # logs kept by pytest
        yield cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return photo_shards(tmp_path_factory.mktemp("slurm-data"), 96, seed=3)


def _port_pair() -> int:
    base = free_port()
    while not port_is_free(base + 1):
        base = free_port()
    return base


def _launch(slurm, shards: Path, run: Path) -> tuple[str, int]:
    """Submit the job with `mae launch slurm --submit`; (job id, metrics port base)."""
    port = _port_pair()
    argv = [sys.executable, "-m", "train.cli", "launch", "slurm", "--config", "tiny_cpu", "--gpus-per-node", "0",
            "--tasks-per-node", "2", "--cpus-per-task", "1", "--job-dir", str(run / "job"), "--submit",
            f"data.url={shards}", "data.batch_size=8", "data.num_workers=1", f"schedule.max_steps={STEPS}",
            "optim.lr=1.0e-3", "schedule.warmup_epochs=0.5", f"checkpoint.dir={run / 'ckpt'}",
            "checkpoint.every_steps=1000", f"log.metrics_file={run / 'metrics.jsonl'}", f"metrics.port_base={port}",
            f"metrics.multiproc_dir={run / 'prom'}"]
    env = {**os.environ, **slurm.env(), "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", out.stdout).group(1)
    return job_id, port


def _steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(slurm, job_id: str, run: Path, step: int, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = _steps(run)
        if records and records[-1]["step"] >= step:
            return
        state = slurm.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state}: {_log(run, job_id)[-3000:]}"
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach step {step}: {_log(run, job_id)[-3000:]}")


def _log(run: Path, job_id: str) -> str:
    path = run / "job" / "logs" / f"mae-pretrain-{job_id}.out"
    return path.read_text() if path.exists() else ""


def _release_requeued(slurm, job_id: str, run: Path, restarts: int) -> None:
    """A requeued job waits 2 minutes (its BeginTime) so that the node forgets the
    old attempt's revoked credential; on one node a few seconds do, then start it."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = slurm.job(job_id)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) == restarts:
            time.sleep(3)  # a start within the revocation's second is refused ("Job credential revoked")
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} was not requeued ({slurm.job(job_id).get('JobState')}): "
                       f"{_log(run, job_id)[-3000:]}")


def _finished(slurm, job_id: str, run: Path) -> dict[str, str]:
    info = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 400)
    assert info["JobState"] == "COMPLETED", _log(run, job_id)[-4000:]
    return info


@pytest.fixture(scope="module")
def reference(slurm, shards, tmp_path_factory) -> tuple[Path, str, int, list]:
    """The job uninterrupted; the Prometheus file-SD targets it lists while it runs."""
    run = tmp_path_factory.mktemp("slurm-reference")
    job_id, port = _launch(slurm, shards, run)
    _wait_for_step(slurm, job_id, run, 1)
    targets = [json.loads(p.read_text()) for p in (run / "job" / "prometheus-targets").glob("*.json")]
    _finished(slurm, job_id, run)
    return run, job_id, port, targets


@pytest.fixture(scope="module")
def interrupted(slurm, shards, tmp_path_factory) -> tuple[Path, str, list[int]]:
    """The same job, interrupted at three steps by the three ways a job is stopped."""
    run = tmp_path_factory.mktemp("slurm-interrupted")
    job_id, _ = _launch(slurm, shards, run)
    stops = []
    interrupts = [("scancel", "--signal=TERM", job_id),  # a TERM to the tasks only
                  ("scancel", "--batch", "--signal=USR1", job_id),  # the time-limit warning to the batch script
                  ("scontrol", "requeue", job_id)]  # Slurm kills the job (TERM, KillWait) and requeues it
    for attempt, command in enumerate(interrupts, start=1):
        _wait_for_step(slurm, job_id, run, (stops[-1] if stops else 0) + 8)
        slurm.run(*command)
        _release_requeued(slurm, job_id, run, attempt)
        stops.append(_steps(run)[-1]["step"])
    _finished(slurm, job_id, run)
    return run, job_id, stops


def test_a_two_task_job_trains_end_to_end_under_slurm(slurm, reference):
    run, job_id, port, targets = reference
    steps = [r["step"] for r in _steps(run)]
    assert steps == list(range(1, STEPS + 1))
    summary = json.loads((run / "ckpt" / "run_summary.json").read_text())
    assert summary["step"] == STEPS and summary["stopped_by_signal"] is None
    assert summary["derived"]["global_batch"] == 16  # 2 ranks (from SLURM_PROCID/NTASKS) x 8
    log = _log(run, job_id)
    assert "attempt 1 on" in log and "2 tasks" in log and "requeueing" not in log
    assert re.search(r"^0: .*world 2, global batch 16", log, re.M)  # srun --label: rank 0's line
    assert slurm.job(job_id)["Restarts"] == "0"
    # while it ran, local rank 0 listed this node's two endpoints for Prometheus file-SD
    assert targets == [[{"targets": [f"{socket.getfqdn()}:{port}", f"{socket.getfqdn()}:{port + 1}"],
                         "labels": {"job": "maescale", "node": socket.gethostname(), "run": "ckpt"}}]]
    assert list((run / "job" / "prometheus-targets").glob("*.json")) == []  # and removed them at the end


def test_each_interruption_checkpoints_requeues_and_resumes_the_remaining_steps(slurm, reference, interrupted):
    run, job_id, stops = interrupted
    ref = {r["step"]: r for r in _steps(reference[0])}
    records = _steps(run)
    # exactly the remaining steps after each resume: every step once, none repeated or skipped
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert 0 < stops[0] < stops[1] < stops[2] < STEPS, stops
    info = slurm.job(job_id)
    assert info["Restarts"] == "3" and info["JobState"] == "COMPLETED"
    log = _log(run, job_id)
    for attempt in (1, 2, 3, 4):
        assert f"attempt {attempt} on" in log
    assert "requeueing job" in log and "stopped by a signal before the last step" in log
    assert log.count("maescale: step exited with 143") == 2  # the TERM and the time limit: saved, not finished
    assert "time limit in 300 s" in log  # the USR1 trap: tasks checkpoint, then requeue
    for stop in stops:  # each attempt resumed from the checkpoint the signal made, at the step it stopped
        assert re.search(rf"resumed from \S+step{stop:09d} \(step {stop}\)", log), (stop, log[-3000:])
    for step, rec in ref.items():
        assert records[step - 1]["ids"] == rec["ids"], step  # the same data order as the uninterrupted run
    for step in range(1, stops[0] + 1):  # before the first interruption: the very same run
        assert records[step - 1]["loss"] == ref[step]["loss"], step
    summary = json.loads((run / "ckpt" / "run_summary.json").read_text())
    assert summary["step"] == STEPS and summary["stopped_by_signal"] is None


def test_the_resumed_job_has_the_uninterrupted_losses(reference, interrupted):
    ref = {r["step"]: r["loss"] for r in _steps(reference[0])}
    got = {r["step"]: r["loss"] for r in _steps(interrupted[0])}
    assert got == ref
