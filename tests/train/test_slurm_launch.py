"""`mae launch slurm` writes the sbatch script a cluster user would write: checked
by bash's own parser and on its content (the real-Slurm runs are test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from infra.slurm.script import SbatchOptions, render, time_limit_s
from train.errors import ConfigError, LaunchError
from train.slurm_launch import job_config, write_job

ROOT = Path(__file__).resolve().parents[2]


def _mae(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _sbatch_lines(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def _srun_command(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    return shlex.split(line.removesuffix(" &"))


def test_pretrain_job_one_task_per_gpu_requeue_and_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_config(nodes=4, gpus_per_node=8, time="48:00:00", partition="gpu", account="vision",
                     sbatch_args=("--constraint=h100",), setup=("module load cuda/13",))
    written = write_job(job, ["data.url=s3://bucket/shards", "checkpoint.dir=runs/vit_l"], "vit_l")
    text = written.script.read_text()
    assert written.script == tmp_path / "runs" / "vit_l" / "slurm" / "mae-pretrain.sbatch"
    assert _sbatch_lines(text) == [
        "--job-name=mae-pretrain", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=12",  # vit_l: 10 workers + 2
        "--gpus-per-node=8", "--time=48:00:00", "--partition=gpu", "--account=vision", f"--chdir={tmp_path}",
        f"--output={tmp_path}/runs/vit_l/slurm/logs/%x-%j.out", "--open-mode=append", "--requeue",
        "--signal=B:USR1@300", "--constraint=h100"]
    cmd = _srun_command(text)
    assert cmd[:4] == ["srun", "--label", "--kill-on-bad-exit=1", sys.executable]
    assert cmd[4:] == ["-m", "train.pretrain", "--config", "vit_l", "data.url=s3://bucket/shards",
                       "checkpoint.dir=runs/vit_l", f"checkpoint.dir={tmp_path}/runs/vit_l", "metrics.enabled=true",
                       "metrics.bind=0.0.0.0", f"metrics.file_sd_dir={tmp_path}/runs/vit_l/slurm/prometheus-targets"]
    assert "module load cuda/13" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert f"{tmp_path}/runs/vit_l/run_summary.json" in text  # the early-stop check reads the run's summary
    assert "{{" not in text and written.log_dir.is_dir()
    subprocess.run(["bash", "-n", str(written.script)], check=True)  # bash parses it


def test_what_the_user_sets_wins_and_cpu_tasks_have_no_gpu_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_config(gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, job_dir=str(tmp_path / "job"))
    text = write_job(job, ["metrics.bind=127.0.0.1", "data.url=shards"], "tiny_cpu").script.read_text()
    assert not any(line.startswith("--gpus") for line in _sbatch_lines(text))
    assert "--ntasks-per-node=2" in _sbatch_lines(text) and "--cpus-per-task=1" in _sbatch_lines(text)
    cmd = _srun_command(text)
    assert "metrics.bind=127.0.0.1" in cmd and "metrics.bind=0.0.0.0" not in cmd
    assert f"metrics.file_sd_dir={tmp_path}/job/prometheus-targets" in cmd
    no_metrics = write_job(job_config(gpus_per_node=0, job_dir=str(tmp_path / "j2"), metrics=False), [], "tiny_cpu")
    assert not any(a.startswith("metrics.") for a in _srun_command(no_metrics.script.read_text()))
    (tmp_path / "run.yaml").write_text("metrics:\n  enabled: false\n  bind: 10.1.2.3\n")  # the file's say wins too
    from_file = _srun_command(write_job(job_config(gpus_per_node=0, job_dir=str(tmp_path / "j3")), [" metrics.file_sd_dir =sd"],
                                        str(tmp_path / "run.yaml")).script.read_text())
    assert not [a for a in from_file if a.startswith("metrics.")] and " metrics.file_sd_dir =sd" in from_file


def test_shard_job_is_one_task_with_its_workers_as_cpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _mae("launch", "slurm", "--task", "shard", "--time", "4:00:00", "--", "/data/imagenet/train",
               "s3://bucket/imagenet", "--workers", "32", "--shard-size", "256MB", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "slurm" / "mae-shard" / "mae-shard.sbatch").read_text()
    assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(_sbatch_lines(text))
    assert not any(line.startswith("--gpus") for line in _sbatch_lines(text))
    assert _srun_command(text)[2:] == [sys.executable, "-m", "train.cli", "shard", "/data/imagenet/train",
                                       "s3://bucket/imagenet", "--workers", "32", "--shard-size", "256MB"]
    subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "mae-shard" / "mae-shard.sbatch")], check=True)


def test_finetune_job_goes_beside_its_checkpoints_with_an_absolute_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = write_job(job_config(task="finetune", gpus_per_node=0), ["checkpoint.dir=runs/ft"], "finetune_tiny_cpu")
    assert written.script == tmp_path / "runs" / "ft" / "slurm" / "mae-finetune.sbatch"
    text = written.script.read_text()
    assert _srun_command(text)[-1] == f"checkpoint.dir={tmp_path}/runs/ft"
    # a TERM to its tasks (a preemption notice) requeues it, as for pretraining: it ended COMPLETED at step 7 of 60
    summary = f"{shlex.quote(sys.executable)} {tmp_path}/runs/ft/run_summary.json"
    assert f"summary_before=$(summary_stamp {summary})\nsrun " in text  # an earlier attempt's summary is not this one's
    assert f'requeue_if_stopped {summary} "$summary_before"' in text
    with pytest.raises(ConfigError, match="unknown config key model.nope"):
        write_job(job_config(task="finetune"), ["model.nope=1"], "finetune_tiny_cpu")


def test_mistakes_fail_at_launch_not_in_the_queue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key data.nope"):
        write_job(job_config(), ["data.nope=1"], "vit_l")
    with pytest.raises(LaunchError, match="--config is required"):
        write_job(job_config(), [], None)
    with pytest.raises(LaunchError, match="nodes must be positive"):
        job_config(nodes=0)
    with pytest.raises(LaunchError, match="one task on one node"):
        job_config(task="shard", nodes=2)
    with pytest.raises(LaunchError, match="whitespace"):
        write_job(job_config(partition="gpu debug", job_dir=str(tmp_path / "j")), [], "vit_l")
    with pytest.raises(LaunchError, match="'48h' is not a Slurm time limit"):
        job_config(time="48h")  # sbatch would refuse it only once the job is submitted
    with pytest.raises(LaunchError, match=r"signal_grace_s \(300 s\) must be less than the time limit 4 \(240 s\)"):
        job_config(time="4")  # minutes: the checkpoint signal would come before the job starts
    # the job name names the script and log files: it wrote the script outside the job folder
    with pytest.raises(LaunchError, match="job_name must be letters"):
        job_config(job_name="../../escaped")
    with pytest.raises(LaunchError, match="job_name must be letters"):
        job_config(job_name="a/b")
    # the launcher's own time-limit signal and requeue: a second --signal or --no-requeue undid them silently
    for arg in ("--signal=USR1@600", "--no-requeue", "--output=/tmp/x.out"):
        with pytest.raises(LaunchError, match=f"'{arg}': the launcher sets {arg.split('=')[0]} itself"):
            job_config(sbatch_args=(arg,))
    # every requeue would have started over, rewriting the job's own checkpoints
    for task, config in (("pretrain", "vit_l"), ("finetune", "finetune_tiny_cpu")):
        with pytest.raises(LaunchError, match="a requeued attempt of this job would start over"):
            write_job(job_config(task=task), ["checkpoint.resume=false"], config)
        # a job that saves nothing has nothing to resume: left as asked
        write_job(job_config(task=task, job_dir=str(tmp_path / task)), ["checkpoint.resume=false",
                                                                       "checkpoint.enabled=false"], config)
    out = _mae("launch", "slurm", "--config", "vit_l", "deepspeed.stage=7", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "deepspeed.stage" in out.stderr
    out = _mae("launch", "slurm", "--task", "shard", "--", "src", "dest", "--bogus", cwd=tmp_path)
    assert out.returncode == 2 and "--bogus" in out.stderr
    assert not (tmp_path / "slurm").exists()  # nothing written for a refused job


@pytest.mark.parametrize("task, args", [
    ("pretrain", ["data.url=s3://bucket/shards",
                  "data.storage.options={headers: {Authorization: Bearer sk_live_SECRETTOKEN123}}"]),
    ("finetune", ["data.storage.options={account_name: acct, account_key: AZUREKEYVALUE777}"]),
    ("pretrain", ["data.url=s3://AKIDEXAMPLE:wJalrXUtnFEMIsecret@bucket/shards"]),
    ("pretrain", ["data.url=s3://bucket/shards",
                  "data.storage.options={key: AKIDEXAMPLE, secret: wJalrXUtnFEMIsecret}"]),
    ("shard", ["--", "src", "s3://bucket/x", "--endpoint-url", "http://user:wJalrXUtnFEMIsecret@host:9000"]),
])
def test_a_credential_on_the_command_line_is_refused_not_written(task, args, tmp_path):
    config = {"pretrain": ["--config", "tiny_cpu"], "finetune": ["--config", "finetune_tiny_cpu"]}.get(task, [])
    out = _mae("launch", "slurm", "--task", task, "--gpus-per-node", "0", *config, *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "holds a credential" in out.stderr and "give it in the environment" in out.stderr
    for secret in ("wJalrXUtnFEMIsecret", "SECRETTOKEN123", "AZUREKEYVALUE777"):
        assert secret not in out.stderr + out.stdout
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no script, no log folder


def test_submit_without_slurm_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "train.cli", "launch", "slurm", "--config", "tiny_cpu",
                          "--gpus-per-node", "0", "--submit"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": "/nonexistent"})
    assert out.returncode == 2 and out.stderr.startswith("mae: error: sbatch not found")


def test_render_refuses_unknown_and_unused_placeholders():
    assert render("a {{x}} b {{ y }}", {"x": "1", "y": "2"}) == "a 1 b 2"
    with pytest.raises(KeyError, match="y"):
        render("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(KeyError, match="unused|no placeholder"):
        render("{{x}}", {"x": "1", "z": "3"})
    opts = SbatchOptions("j", 1, 1, 1, 0, "/w", "/w/logs", 60, qos="high", exclusive=True)
    assert "--qos=high" in opts.lines()[4] and "#SBATCH --exclusive" in opts.lines()


def test_time_limits_read_as_slurm_reads_them():
    forms = {"90": 5400, "1:30": 90, "48:00:00": 172800, "2-12": 216000, "2-12:30": 217800, "2-0:0:5": 172805,
             "UNLIMITED": None, "infinite": None, "0": None}
    assert {text: time_limit_s(text) for text in forms} == forms
    for bad in ("48h", "1:2:3:4", "-1", "", "1-", "1.5"):
        with pytest.raises(ValueError, match="not a Slurm time limit"):
            time_limit_s(bad)


def _requeue_decision(tmp_path: Path, step_rc: int, before: dict | None, after: dict | None) -> str:
    """What the job script's requeue_if_stopped decides after a step that exited
    ``step_rc``, with run_summary.json as ``before`` the step and ``after`` it (None:
    absent, or untouched when ``before`` is given); the functions are the preamble's own."""
    preamble = (ROOT / "infra" / "slurm" / "preamble.sh").read_text()
    functions = "\n".join(re.search(rf"^{name}\(\) {{\n.*?^}}", preamble, re.S | re.M).group(0)
                          for name in ("summary_stamp", "requeue_if_stopped"))
    summary = tmp_path / "run_summary.json"
    summary.unlink(missing_ok=True)
    if before is not None:
        summary.write_text(json.dumps(before))
    step = f"sleep 0.02; printf %s {shlex.quote(json.dumps(after))} > {summary}" if after is not None else "true"
    script = (f"{functions}\nrequeue() {{ echo \"requeue: $1\"; exit 0; }}\n"  # the decision, not scontrol's part
              f"before=$(summary_stamp {shlex.quote(sys.executable)} {summary})\n{step}\nstep_rc={step_rc}\n"
              f"requeue_if_stopped {shlex.quote(sys.executable)} {summary} \"$before\"\necho kept going\n")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_the_job_requeues_only_a_step_that_stopped_and_saved_in_this_attempt(tmp_path):
    """The trainer exits 128 + the signal after a saving stop (it said 0). A summary an
    earlier attempt left, saying it stopped, must not requeue a step that died
    without writing one (an OOM kill, 137): that looped the job."""
    stopped, finished = {"stopped_by_signal": "SIGTERM", "step": 4}, {"stopped_by_signal": None, "step": 8}
    assert _requeue_decision(tmp_path, 143, None, stopped) == "requeue: stopped by a signal before the last step"
    assert _requeue_decision(tmp_path, 143, stopped, stopped) == "requeue: stopped by a signal before the last step"
    assert _requeue_decision(tmp_path, 137, stopped, None) == "kept going"  # the earlier attempt's summary
    assert _requeue_decision(tmp_path, 1, None, finished) == "kept going"
    assert _requeue_decision(tmp_path, 0, None, finished) == "kept going"
    assert _requeue_decision(tmp_path, 1, None, None) == "kept going"
