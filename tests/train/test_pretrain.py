"""The DeepSpeed trainer on CPU: gloo, 2 processes, under torchrun, the DeepSpeed
launcher and a plain process; ZeRO 0-3 parity, NaN skipping, mismatched resume,
export. Resume after kill -9, SIGTERM and restarts: tests/train/test_resume.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infra.net import free_port
from pipeline.shards.writer import ShardWriterConfig
from tests.helpers.training import ROOT, STEPS, ds_launcher, reseal, run_cmd, torchrun
from tests.helpers.training import metrics as _metrics
from tests.helpers.training import overrides as _overrides
from tests.helpers.training import summary as _summary

pytestmark = pytest.mark.integration


def _torchrun(shards: Path, run: Path, *extra: str, nproc: int = 2) -> list[str]:
    return torchrun(shards, run, *extra, nproc=nproc)


def _run(cmd: list[str], run: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cmd(cmd, run, timeout)


def test_zero_stages_match_stage_0(stage_runs):
    ref = _metrics(stage_runs[0])
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ref.values())
    for stage in (1, 2, 3):
        got = _metrics(stage_runs[stage])
        for step in ref:
            assert got[step]["ids"] == ref[step]["ids"]  # same data order
            assert abs(got[step]["loss"] - ref[step]["loss"]) < 1e-5, (stage, step)
    # it trains: the lr warms up and the loss moves
    assert ref[1]["lr"] == 0.0 and ref[STEPS]["lr"] > 0
    assert ref[1]["loss"] != ref[STEPS]["loss"]


def test_checkpoints_keep_the_last_k_and_latest_points_at_a_complete_one(stage_runs):
    ckpt = stage_runs[2] / "ckpt"
    tags = sorted(p.name for p in ckpt.glob("step*"))
    assert tags == ["step000000004", "step000000008"]  # every 4 steps + the end, keep_last=2
    assert (ckpt / "latest").read_text() == "step000000008"
    assert (ckpt / "step000000008" / "COMPLETE").exists()
    meta = json.loads((ckpt / "step000000008" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["model"] == "mae_vit_test_patch4" and meta["step"] == 8


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_reproduces_the_trained_loss(stage, stage_runs, tmp_path):
    from model.weights import load_mae_state_dict
    from train.config import load_config
    from train.trainer import fixed_batch
    from train.weights.files import read_state_dict

    out = subprocess.run([sys.executable, "-m", "train.cli", "export", str(stage_runs[stage] / "ckpt"),
                          str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    from model.registry import create_model

    model = create_model("mae_vit_test_patch4")
    assert load_mae_state_dict(model, read_state_dict(tmp_path / "export" / "mae.safetensors")) == "full"
    encoder = create_model("mae_vit_test_patch4")
    assert load_mae_state_dict(encoder, read_state_dict(tmp_path / "export" / "encoder.safetensors")) == "encoder"
    imgs, noise = fixed_batch(load_config("tiny_cpu"))
    model.eval()
    with torch.no_grad():
        loss = model(imgs, 0.75, noise)[0].item()
    assert loss == pytest.approx(_summary(stage_runs[stage])["fixed_batch_loss"], abs=1e-6)
    # `mae convert` and `mae finetune --weights` read a run's checkpoint or step dir directly: the same weights
    from train.weights.pretrained import read_weights

    exported = read_state_dict(tmp_path / "export" / "mae.safetensors")
    for source in (stage_runs[stage] / "ckpt", stage_runs[stage] / "ckpt" / "step000000008"):
        sd, meta = read_weights(source)
        assert meta["path"].endswith("step000000008") and sd.keys() == exported.keys()
        assert all(torch.equal(sd[k].float(), exported[k]) for k in sd), source


def test_a_poisoned_batch_is_skipped_and_counted(shards, tmp_path):
    run = tmp_path / "nan"
    out = _run(_torchrun(shards, run, "faults.inject_nonfinite_at=[2]"), run)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = _summary(run)
    assert summary["nonfinite_skipped"] == 1 and summary["step"] == STEPS
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(run).values())
    assert "non-finite loss at step 3 (micro-step 2)" in out.stderr  # the step it was for, as metrics.jsonl numbers it


def test_k_non_finite_in_a_row_stop_with_the_checkpoint_intact(shards, tmp_path):
    run = tmp_path / "nan3"
    out = _run(_torchrun(shards, run, "faults.inject_nonfinite_at=[5,6,7]", "faults.max_nonfinite_in_row=3",
                         "checkpoint.every_steps=2"), run)
    assert out.returncode != 0
    assert "3 non-finite losses or skipped updates in a row, the last: non-finite loss at step 6" in out.stderr
    assert (run / "ckpt" / "latest").read_text() == "step000000004"
    assert (run / "ckpt" / "step000000004" / "COMPLETE").exists()


def test_mismatched_resume_is_refused(shards, stage_runs, tmp_path):
    import shutil

    run = tmp_path / "mismatch"
    shutil.copytree(stage_runs[2] / "ckpt", run / "ckpt")
    out = _run(_torchrun(shards, run, "deepspeed.stage=3", "schedule.max_steps=12"), run)
    assert out.returncode != 0 and "changes the model or optimizer state" in out.stderr
    out = _run(_torchrun(shards, run, "deepspeed.stage=2", "model.name=mae_vit_tiny_patch16",
                         "schedule.max_steps=12"), run)
    assert out.returncode != 0 and "is of model mae_vit_test_patch4, this run is mae_vit_tiny_patch16" in out.stderr
    out = _run(_torchrun(shards, run, "deepspeed.stage=2", "seed=1", "schedule.max_steps=12"), run)
    assert out.returncode != 0 and "seed: 0 -> 1" in out.stderr  # the seed is part of the fingerprint
    for tag in ("step000000004", "step000000008"):  # as versions that spared the cls and mask tokens wrote them
        meta = json.loads((run / "ckpt" / tag / "meta.json").read_text())
        del meta["fingerprint"]["weight_decay_groups"]
        (run / "ckpt" / tag / "meta.json").write_text(json.dumps(meta))
        reseal(run / "ckpt" / tag, "meta.json")
    out = _run(_torchrun(shards, run, "deepspeed.stage=2", "schedule.max_steps=12"), run)
    assert out.returncode != 0 and "written by a maescale that spared the cls and mask tokens from weight decay" \
        in out.stderr


def test_two_nodes_on_loopback_partition_by_global_rank(shards, stage_runs, tmp_path):
    run = tmp_path / "nodes"
    run.mkdir()
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "train.pretrain", "--config", "tiny_cpu", *_overrides(shards, run, "deepspeed.stage=2")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    ref, got = _metrics(stage_runs[2]), _metrics(run)
    for step in ref:  # same global ranks -> same data and the same losses as 1 node x 2
        assert got[step]["ids"] == ref[step]["ids"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6)


def test_deepspeed_launcher_runs_the_same_training(shards, stage_runs, tmp_path):
    run = tmp_path / "dslauncher"
    out = _run(ds_launcher(shards, run, "deepspeed.stage=2"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    ref, got = _metrics(stage_runs[2]), _metrics(run)
    assert [got[s]["loss"] for s in ref] == pytest.approx([ref[s]["loss"] for s in ref], abs=1e-6)


def test_single_process_mae_pretrain(single_run):
    summary = _summary(single_run)
    assert summary["step"] == STEPS and summary["derived"]["world_size"] == 1
    assert summary["derived"]["global_batch"] == 8


def test_accumulation_matches_a_larger_micro_batch(shards, stage_runs, tmp_path):
    run = tmp_path / "accum"
    out = _run(_torchrun(shards, run, "deepspeed.stage=2", "data.batch_size=4", "optim.accum_steps=2"), run)
    assert out.returncode == 0, out.stderr[-3000:]
    ref, got = _metrics(stage_runs[2]), _metrics(run)
    assert _summary(run)["derived"]["global_batch"] == 16
    for step in ref:  # 2 x 4 per rank is the same data and gradient as 1 x 8
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5), step


def test_sigint_in_a_single_process_saves_and_exits(shards, tmp_path):
    run = tmp_path / "ctrl-c"
    run.mkdir()
    cmd = [sys.executable, "-m", "train.cli", "pretrain", "--config", "tiny_cpu",
           *_overrides(shards, run, "schedule.max_steps=500", "checkpoint.every_steps=1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and len(_metrics(run)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]  # saved, not finished: `&&` stops there (it said 0)
    summary = _summary(run)
    assert summary["stopped_by_signal"] == "SIGINT"
    assert (run / "ckpt" / f"step{summary['step']:09d}" / "COMPLETE").exists()


def test_the_dali_backend_trains_the_same_run(dali_run, stage_runs):
    """data.backend=dali: two ranks decode with DALI (CPU mode); its crops are the
    plan's, so the losses track the cpu backend's run closely (decoders differ)."""
    dali, cpu = _metrics(dali_run), _metrics(stage_runs[2])
    assert sorted(dali) == sorted(cpu) == list(range(1, STEPS + 1))
    for step in dali:
        assert dali[step]["ids"] == cpu[step]["ids"]  # the plan's order
        assert abs(dali[step]["loss"] - cpu[step]["loss"]) < 0.02 * cpu[step]["loss"], step


def test_the_ffcv_backend_trains_from_a_beton(shards, tmp_path):
    """data.backend=ffcv on two ranks: the same photos as a .beton, FFCV's JIT
    warm-up paid once per process, every step's loss finite."""
    from pipeline.shards.beton import BetonOptions, write_beton

    write_beton(str(shards.parent / "src"), str(tmp_path / "beton"), ShardWriterConfig(), BetonOptions(workers=2))
    run = tmp_path / "ffcv"
    out = _run(_torchrun(shards, run, "deepspeed.stage=2", "data.backend=ffcv", f"data.url={tmp_path / 'beton'}"),
               run, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = _metrics(run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps.values())
    assert _summary(run)["images"] >= STEPS * 8
    assert "ffcv: first batch after" in out.stdout + out.stderr


def test_a_micro_batch_of_only_corrupt_samples_is_skipped_on_every_rank_in_step(tmp_path):
    """torchrun, 2 ranks, ZeRO-3 (its forward gathers parameters: the empty rank must
    run it too): rank 0's second micro-batch of every epoch is all corrupt. That batch
    was dropped, rank 0 drifted into later epochs than rank 1, and its checkpoint saved
    only rank 0's position. Every rank now skips that update together, and both read
    the same epoch at every micro-step."""
    from tests.helpers.shards import jpeg_bytes, write_raw_shards
    from train.chaos import micro_records

    samples = [(f"{n:06d}", {"jpg": b"garbage" * 10 if 4 <= n < 8 else jpeg_bytes((48, 40), seed=n),
                             "cls": str(n % 2).encode()}) for n in range(32)]
    write_raw_shards(tmp_path / "ds", [samples[i:i + 8] for i in range(0, 32, 8)], classes=["a", "b"])
    run = tmp_path / "run"
    out = _run(_torchrun(tmp_path / "ds", run, "data.batch_size=4", "data.plan.shuffle=false", "deepspeed.stage=3",
                         "data.max_corrupt_fraction=0.5", "schedule.max_steps=12"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "1 rank(s) had a micro-batch of only corrupt samples at step 2 (micro-step 1): update skipped" in out.stderr
    assert _summary(run)["nonfinite_skipped"] == 4  # 12 applied steps: 4 epochs of 4 micro-batches, one skipped each
    records = micro_records(run / "ids")
    for micro in range(16):
        assert records[(0, micro)][-1]["epoch"] == records[(1, micro)][-1]["epoch"], micro
    assert [len(records[(0, m)][-1]["ids"]) for m in range(4)] == [4, 0, 4, 4]


def test_a_zero3_checkpoint_with_a_stray_shard_is_refused_in_one_line(stage_runs, tmp_path):
    # DeepSpeed's ZeRO-3 reader takes every *_optim_states.pt it finds: a stray copy ended in its ValueError
    import shutil

    from train.checkpoint import latest_complete
    from train.errors import WeightsError
    from train.weights.consolidate import consolidate

    run = tmp_path / "ckpt"
    shutil.copytree(stage_runs[3] / "ckpt", run)
    tag = latest_complete(run)
    assert consolidate(run, tag)  # as the run left it
    optim = sorted((run / tag).glob("*_optim_states.pt"))[0]
    shutil.copy(optim, optim.with_name(optim.name.replace("rank_0", "rank_7")))
    with pytest.raises(WeightsError, match="holds files its COMPLETE record does not list: .*rank_7"):
        consolidate(run, tag)
