"""Exact resume, by the strongest measure: a run interrupted and relaunched — kill -9
mid-run or inside a save, SIGTERM, a clean restart from a checkpoint — logs every
later step's loss bit for bit equal to the uninterrupted run's (`==`, on every
replay of a step), reads the same samples at every micro-step, and ends with the
same weights (`torch.equal`). Covered: ZeRO 0/2/3 on 2 ranks, the cpu and dali
backends, and the three entry points (torchrun, the DeepSpeed launcher, `mae
pretrain`). Elastic resume (another world size) sees every sample once."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from infra.net import free_port
from tests.helpers.training import (STEPS, all_losses, assert_same_weights, copy_checkpoint, ds_launcher,
                                    final_weights, kill_9, mae_pretrain, metrics, overrides, run_cmd, sample_ids,
                                    saving, start, steps_logged, summary, torchrun, wait_for)

pytestmark = pytest.mark.integration


def assert_exact(run: Path, ref: Path, resumed_at: int) -> None:
    """Every step after ``resumed_at`` equals the reference exactly, on every replay;
    the same samples at every micro-step; the same final weights."""
    expected, got = metrics(ref), all_losses(run)
    for step in range(resumed_at + 1, STEPS + 1):
        assert got[step] and all(loss == expected[step]["loss"] for loss in got[step]), (step, got[step],
                                                                                         expected[step]["loss"])
    ref_ids = sample_ids(ref)
    for key, records in sample_ids(run).items():  # (rank, micro-step): every time it was read
        assert all(r["ids"] == ref_ids[key][-1]["ids"] for r in records), key
    assert_same_weights(final_weights(run), final_weights(ref))


def resumed_step(log: str) -> int:
    found = re.findall(r"resumed from \S+ \(step (\d+)\)", log)
    assert found, log[-3000:]
    return int(found[0])


def test_a_stop_signal_during_start_up_saves_after_the_first_step_then_resumes_exactly(shards, single_run, tmp_path):
    """`mae pretrain`; SIGUSR1 (Slurm's usual warning) while the trainer is still being
    built. The stop signals were caught only once training began, so a preemption
    notice at start-up (or during a requeued job's resume) killed the run with 143,
    and Slurm failed the job for good; SIGUSR1 and SIGHUP killed it at any time."""
    run = tmp_path / "stopped-at-start"
    proc = start(mae_pretrain(shards, run), run)
    wait_for(lambda: (run / "ckpt" / "LOCK").exists(), proc=proc)  # taken first thing while building
    assert steps_logged(run) == 0
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, output[-3000:]  # saved, not finished: it said 0
    stopped = summary(run)
    assert (stopped["stopped_by_signal"], stopped["step"]) == ("SIGUSR1", 1), output[-3000:]
    assert (run / "ckpt" / "step000000001" / "COMPLETE").exists()
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) == 1
    assert_exact(run, single_run, resumed_at=1)


def test_ctrl_c_twice_stops_at_once_and_the_next_run_starts(shards, tmp_path):
    """With the stop signals caught from the start, Ctrl-C alone could no longer end
    a start-up that hangs: a second one stops at once, without saving."""
    run = tmp_path / "interrupted"
    proc = start(mae_pretrain(shards, run), run)
    wait_for(lambda: (run / "ckpt" / "LOCK").exists(), proc=proc)
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("SIGINT received" in line for line in seen):  # the first one was handled
        line = proc.stdout.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    output = "".join(seen) + output
    assert proc.returncode == 130 and "SIGINT twice: stopping now, without saving" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not list((run / "ckpt").glob("step*"))
    out = run_cmd(mae_pretrain(shards, run), run)  # its LOCK names a dead process: taken over
    assert out.returncode == 0, out.stderr[-4000:]


def test_a_sigterm_during_a_periodic_save_stops_right_after_it(shards, single_run, tmp_path):
    """`mae pretrain`; SIGTERM while the step-4 checkpoint is written. The flag was read
    before the save, so the run trained step 5 and saved again before stopping."""
    run = tmp_path / "term-in-save"
    proc = start(mae_pretrain(shards, run, "faults.slow_save_s=2"), run)
    wait_for(lambda: saving(run, 4), proc=proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert (summary(run)["stopped_by_signal"], summary(run)["step"]) == ("SIGTERM", 4), output[-3000:]
    assert sorted(p.name for p in (run / "ckpt").glob("step*")) == ["step000000004"]
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) == 4
    assert_exact(run, single_run, resumed_at=4)


def test_relaunching_a_finished_run_trains_nothing_and_keeps_its_summary(shards, single_run, tmp_path):
    """It overwrote run_summary.json with `images: 0`, `losses: []`."""
    import shutil

    run = tmp_path / "again"
    shutil.copytree(single_run, run)
    before = summary(run)
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) == STEPS
    assert summary(run) == before and before["images"] > 0 and before["step"] == STEPS


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_restart_from_a_checkpoint_is_exact(stage, shards, stage_runs, tmp_path):
    """A clean restart: a fresh process resumes the step-4 checkpoint of the
    uninterrupted run and reproduces its steps 5-8 and final weights."""
    run = copy_checkpoint(stage_runs[stage], tmp_path / "restart", 4)
    out = run_cmd(torchrun(shards, run, f"deepspeed.stage={stage}"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) == 4
    assert_exact(run, stage_runs[stage], resumed_at=4)


def test_kill_9_inside_a_save_then_restart_is_exact(shards, stage_runs, tmp_path):
    """The DeepSpeed launcher; kill -9 of every process while the step-4 checkpoint
    is half written: the restart takes over the dead run's lock, resumes from step
    2, replaces the partial checkpoint and reproduces the run."""
    run = tmp_path / "killed-in-save"
    every2 = ("deepspeed.stage=2", "checkpoint.every_steps=2")
    proc = start(ds_launcher(shards, run, *every2, "faults.slow_save_s=3"), run)
    wait_for(lambda: saving(run, 4), proc=proc)
    kill_9(proc)
    assert not (run / "ckpt" / "step000000004" / "COMPLETE").exists()
    assert (run / "ckpt" / "LOCK").exists()  # left by the dead rank 0
    out = run_cmd(ds_launcher(shards, run, *every2), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "taking over the checkpoint lock" in out.stderr and "its process is not running" in out.stderr
    assert resumed_step(out.stderr) == 2
    assert (run / "ckpt" / "step000000004" / "COMPLETE").exists() or not (run / "ckpt" / "step000000004").exists()
    assert_exact(run, stage_runs[2], resumed_at=2)


def test_kill_9_mid_run_then_restart_is_exact(shards, single_run, tmp_path):
    """`mae pretrain` (one process), killed between checkpoints."""
    run = tmp_path / "killed"
    proc = start(mae_pretrain(shards, run, "checkpoint.every_steps=2", "faults.slow_save_s=1"), run)
    wait_for(lambda: steps_logged(run) >= 5, proc=proc)
    kill_9(proc)
    killed_at = steps_logged(run)
    assert 5 <= killed_at < STEPS
    out = run_cmd(mae_pretrain(shards, run, "checkpoint.every_steps=2"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) in (4, 6)
    assert_exact(run, single_run, resumed_at=resumed_step(out.stderr))


@pytest.mark.parametrize("launch", [torchrun, ds_launcher])
def test_sigterm_then_restart_is_exact(launch, shards, stage_runs, tmp_path):
    """ZeRO-3: SIGTERM saves at the end of the step and exits; the relaunch continues
    exactly. torchrun gets it alone and passes it on; the DeepSpeed launcher's whole
    process group gets it (its ranks exit 143 now, and it kills the rest once one
    does: every rank's files must be whole first)."""
    run = tmp_path / "preempted"
    proc = start(launch(shards, run, "deepspeed.stage=3", "faults.slow_save_s=1"), run, session=True)
    wait_for(lambda: steps_logged(run) >= 3, proc=proc)
    if launch is torchrun:
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    stopped = summary(run)
    assert stopped["stopped_by_signal"] == "SIGTERM", output[-3000:]
    assert 3 <= stopped["step"] < STEPS
    assert (run / "ckpt" / f"step{stopped['step']:09d}" / "COMPLETE").exists()
    assert not (run / "ckpt" / "LOCK").exists()  # released on the way out
    out = run_cmd(launch(shards, run, "deepspeed.stage=3"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert resumed_step(out.stderr) == stopped["step"]
    assert_exact(run, stage_runs[3], resumed_at=stopped["step"])


def test_a_signal_to_one_rank_stops_every_rank_with_its_exit_code(shards, tmp_path):
    """Two ranks started as a Kubernetes pod or an srun task starts them (no launcher),
    one of them preempted. Every rank saves at the same step and exits 143; the one
    that got no signal crashed on the way out (its summary named "signal on another
    rank", which is no signal) with a traceback and exit 1."""
    run = tmp_path / "one-preempted"
    port = free_port()
    procs = [start([sys.executable, "-m", "train.pretrain", "--config", "tiny_cpu",
                    *overrides(shards, run, "deepspeed.stage=2", "faults.slow_save_s=1")], run,
                   env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    wait_for(lambda: steps_logged(run) >= 2, proc=procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs[0][-3000:] + outs[1][-3000:]
    assert not any("Traceback" in out for out in outs), outs[0][-3000:]
    stopped = summary(run)  # rank 0's, which got no signal
    assert stopped["stopped_by_signal"] == "SIGTERM" and 2 <= stopped["step"] < STEPS
    assert (run / "ckpt" / f"step{stopped['step']:09d}" / "COMPLETE").exists()


def test_the_dali_backend_resumes_exactly(shards, dali_run, tmp_path):
    """data.backend=dali (CPU mode, crops from the plan), killed mid-run."""
    run = tmp_path / "dali-killed"
    dali = ("deepspeed.stage=2", "data.backend=dali", "checkpoint.every_steps=2")
    proc = start(torchrun(shards, run, *dali, "faults.slow_save_s=1"), run)
    wait_for(lambda: steps_logged(run) >= 3, proc=proc)
    kill_9(proc)
    out = run_cmd(torchrun(shards, run, *dali), run)
    assert out.returncode == 0, out.stderr[-4000:]
    resumed = resumed_step(out.stderr)
    assert 2 <= resumed < STEPS
    assert_exact(run, dali_run, resumed_at=resumed)


def test_elastic_resume_sees_every_sample_once(shards, stage_runs, tmp_path):
    """ZeRO-0 checkpoint of 2 ranks at step 4, resumed by one process accumulating
    two micro-batches (the same 16 images a step): the 32 samples the two ranks had
    not read of epoch 0 are read once, none again, and the lr schedule goes on."""
    run = copy_checkpoint(stage_runs[0], tmp_path / "elastic", 4)
    out = run_cmd(mae_pretrain(shards, run, "deepspeed.stage=0", "optim.accum_steps=2"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "elastic resume from 2 to 1 ranks" in out.stderr
    ref, got = metrics(stage_runs[0]), metrics(run)
    assert [got[s]["lr"] for s in range(5, STEPS + 1)] == pytest.approx([ref[s]["lr"] for s in range(5, STEPS + 1)])
    before = [r[-1] for (rank, micro), r in sample_ids(stage_runs[0]).items() if r[-1]["step"] <= 4]
    after = [r[-1] for r in sample_ids(run).values()]
    seen = Counter(i for rec in before + after if rec["epoch"] == 0 for i in rec["ids"])
    assert sorted(seen) == list(range(96)) and set(seen.values()) == {1}
    assert summary(run)["step"] == STEPS


@pytest.mark.parametrize("launch, extra, now", [
    ("one process", (), "is 8 (micro 8 x accum 1 x world 1)"),  # 2 -> 1 ranks: the run trained 2.5 epochs
    ("torchrun", ("optim.accum_steps=2",), "is 32 (micro 8 x accum 2 x world 2)")])  # 1.5 epochs, no warning
def test_a_resume_under_another_global_batch_is_refused_by_name(launch, extra, now, shards, stage_runs, tmp_path):
    """A step is a step of the checkpoint's global batch (16 images here): under
    another, the step counter and the lr schedule would stand for other images."""
    run = copy_checkpoint(stage_runs[0], tmp_path / "batch", 4)
    cmd = mae_pretrain if launch == "one process" else torchrun
    out = run_cmd(cmd(shards, run, "deepspeed.stage=0", *extra), run)
    assert out.returncode == (2 if launch == "one process" else 1), out.stderr[-3000:]  # torchrun: 1, its footer
    errors = [line for line in out.stderr.splitlines() if " ERROR train.pretrain" in line]
    said = f"trained with a global batch of 16 images a step (micro 8 x accum 1 x world 2); this run's {now}"
    assert len(errors) == (1 if launch == "one process" else 2) and all(said in e for e in errors), out.stderr[-3000:]
    assert "Keep data.batch_size x optim.accum_steps x world = 16" in errors[0]
    assert not (run / "metrics.jsonl").read_text()  # not one step
    assert "resumed from" not in out.stderr  # refused before DeepSpeed loaded anything
    assert launch != "one process" or "Traceback" not in out.stderr


def test_elastic_resume_of_partitioned_optimizer_state_is_refused_clearly(shards, stage_runs, tmp_path):
    run = copy_checkpoint(stage_runs[2], tmp_path / "elastic2", 4)
    out = run_cmd(mae_pretrain(shards, run, "deepspeed.stage=2"), run)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "ZeRO-2 optimizer state partitioned for a world size of 2" in errors[0], \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_starting_over_in_a_folder_with_an_earlier_runs_checkpoints_is_refused(shards, single_run, tmp_path):
    """`checkpoint.resume=false` where an earlier run saved: its saves replaced the
    earlier run's checkpoint of the same step (calling it a leftover), left the newer
    ones, and the next resume continued the earlier run's weights without a word.
    Now refused in one line, before anything is written; the checkpoint is intact."""
    run = copy_checkpoint(single_run, tmp_path / "earlier", 4)
    complete = (run / "ckpt" / "step000000004" / "COMPLETE").read_bytes()
    out = run_cmd(mae_pretrain(shards, run, "checkpoint.resume=false", "optim.lr=5e-4"), run)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "earlier run" in line]
    assert len(lines) == 1 and "holds checkpoints of an earlier run (the newest: step000000004)" in lines[0]
    assert (run / "ckpt" / "step000000004" / "COMPLETE").read_bytes() == complete
    assert sorted(p.name for p in (run / "ckpt").iterdir() if p.name.startswith("step")) == ["step000000004"]


def test_a_resume_past_the_last_step_says_it_trains_nothing(shards, single_run, tmp_path):
    """`schedule.max_steps` lowered below the checkpoint's step: it ended at once, exit 0,
    without a word (and a summary of 0 images)."""
    run = copy_checkpoint(single_run, tmp_path / "lowered", 4)
    out = run_cmd(mae_pretrain(shards, run, "schedule.max_steps=2"), run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("nothing to train: the checkpoint resumed is at step 4, and this run ends at step 2 "
            "(schedule.max_steps or the epochs were lowered") in out.stderr, out.stderr[-3000:]
