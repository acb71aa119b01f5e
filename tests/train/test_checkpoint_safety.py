"""Checkpoints a user can trust, tried as a hostile and careless user would: a pickle
payload planted in a checkpoint never runs (resume, export); a flipped bit is
refused and resume falls back to the newest checkpoint that verifies; weights gone
bad stop the run before it saves; a second trainer on the same directory is
refused. Each case is a bug the trainer had: see the issue of this change."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers.training import (ROOT, STEPS, all_losses, assert_same_weights, copy_checkpoint, error_lines,
                                    final_weights, flip_bit, mae_pretrain, metrics, plant_pickle, poison_weight,
                                    run_cmd, start, steps_logged, summary, wait_for)
from train.checkpoint import complete_tags, verify

pytestmark = pytest.mark.integration
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _export(ckpt, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", "export", str(ckpt), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_planted_pickle_never_runs_on_resume_or_export(shards, single_run, tmp_path):
    run = copy_checkpoint(single_run, tmp_path / "planted", 4)
    tag_dir = run / "ckpt" / "step000000004"
    marker = tmp_path / "code-ran"
    plant_pickle(tag_dir, MODEL_STATES, marker)  # and the record resealed: verification alone cannot see it
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 2, out.stderr[-3000:]
    assert not marker.exists()
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and f"refusing {tag_dir / MODEL_STATES}: it is not plain tensor data" in errors[0]
    exported = _export(run / "ckpt", tmp_path / "export")
    assert exported.returncode == 2 and not marker.exists()
    assert f"refusing {tag_dir / MODEL_STATES}" in exported.stderr and "Traceback" not in exported.stderr


def test_a_flipped_bit_is_refused_and_resume_falls_back_to_a_good_checkpoint(shards, single_run, tmp_path):
    run = tmp_path / "flipped"
    copy_checkpoint(single_run, run, 8)
    copy_checkpoint(single_run, tmp_path / "older", 4)
    (tmp_path / "older" / "ckpt" / "step000000004").rename(run / "ckpt" / "step000000004")
    flip_bit(run / "ckpt" / "step000000008" / OPTIM_STATES)
    exported = _export(run / "ckpt", tmp_path / "export")  # export refuses it, naming the file
    assert exported.returncode == 2 and not (tmp_path / "export" / "mae.safetensors").exists()
    assert f"{OPTIM_STATES} does not match its recorded sha256" in exported.stderr
    out = run_cmd(mae_pretrain(shards, run), run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint " + str(run / "ckpt" / "step000000008") + " fails verification" in out.stderr
    assert "an older checkpoint: step000000008.corrupt failed verification and were set aside" in out.stderr
    assert (run / "ckpt" / "step000000008.corrupt").is_dir()  # kept for inspection, never loaded again
    expected, got = metrics(single_run), all_losses(run)
    assert all(got[s] == [expected[s]["loss"]] for s in range(5, STEPS + 1))  # steps 5-8 redone, exactly
    verify(run / "ckpt" / "step000000008")
    assert_same_weights(final_weights(run), final_weights(single_run))


def test_weights_gone_bad_stop_the_run_before_it_saves(shards, single_run, tmp_path):
    """A query weight of 1e35: the loss stays finite, every update overflows and
    DeepSpeed skips it. Those skips count toward the guard: the run stops with
    an error instead of saving checkpoints that rotate the good ones out."""
    run = copy_checkpoint(single_run, tmp_path / "poisoned", 4)
    poison_weight(run / "ckpt" / "step000000004", "blocks.0.attn.qkv.weight", 1e35)
    out = run_cmd(mae_pretrain(shards, run, "faults.max_nonfinite_in_row=3", "checkpoint.every_steps=1"), run)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and "3 non-finite losses or skipped updates in a row" in errors[0]
    assert "gradient overflow at step" in errors[0]
    logged = all_losses(run)
    assert logged and all(loss == loss and abs(loss) < 1e6 for losses in logged.values() for loss in losses)
    assert complete_tags(run / "ckpt") == ["step000000004"]  # nothing saved during the skipped updates


def test_a_second_trainer_on_the_same_directory_is_refused(shards, tmp_path):
    run = tmp_path / "shared"
    first = start(mae_pretrain(shards, run, "schedule.max_steps=2000", "checkpoint.every_steps=1000"), run)
    try:
        wait_for(lambda: steps_logged(run) >= 1, proc=first)
        second = run_cmd(mae_pretrain(shards, tmp_path / "other", f"checkpoint.dir={run / 'ckpt'}"),
                         tmp_path / "other")
        assert second.returncode == 2
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and f"checkpoint.dir {run / 'ckpt'} is in use by another run" in errors[0]
        assert f"pid {first.pid}" in errors[0]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 0 and summary(run)["stopped_by_signal"] == "SIGINT"
    assert not (run / "ckpt" / "LOCK").exists()


def test_credentials_in_the_config_never_reach_the_checkpoint(shards, tmp_path):
    """A password in data.storage.endpoint_url and a key and secret in storage
    options: the run's meta.json keeps the config with those values redacted, and
    the export reads it as before."""
    run = tmp_path / "secret"
    out = run_cmd(mae_pretrain(shards, run, "schedule.max_steps=2", "checkpoint.every_steps=2",
                               "data.storage.endpoint_url=http://user:wJalrXUtnFEMIpass@127.0.0.1:9",
                               "data.storage.options={key: AKIDEXAMPLEKEY, secret: wJalrXUtnFEMIsecret}"), run)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not any(s in data for s in (b"wJalrXUtnFEMIpass", b"wJalrXUtnFEMIsecret", b"AKIDEXAMPLEKEY")), path
    meta = json.loads((run / "ckpt" / "step000000002" / "meta.json").read_text())
    storage = meta["config"]["data"]["storage"]
    assert storage["options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert storage["endpoint_url"] == "http://<redacted>127.0.0.1:9"
    assert _export(run / "ckpt", tmp_path / "export").returncode == 0
