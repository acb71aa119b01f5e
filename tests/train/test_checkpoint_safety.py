"""Checkpoints a user can trust, tried as a hostile and careless user would: a pickle
payload planted in a checkpoint never runs (resume, export); a flipped bit is
refused and resume falls back to the newest checkpoint that verifies; weights gone
bad stop the run before it saves; a second trainer on the same directory is
refused. Each case is a bug the trainer had: see the issue of this change."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers.training import (ROOT, STEPS, all_losses, assert_same_weights, copy_checkpoint, error_lines,
                                    final_weights, flip_bit, mae_pretrain, metrics, plant_pickle, poison_weight,
                                    reseal, run_cmd, start, steps_logged, summary, wait_for)
from train.checkpoint import complete_tags, verify
from train.errors import WeightsError
from train.weights import consolidate as consolidate_module

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
    flip_bit(run / "ckpt" / "step000000008" / OPTIM_STATES)
    alone = _export(run / "ckpt", tmp_path / "export")  # no older checkpoint to point at
    assert alone.returncode == 2 and "it is the run's oldest complete checkpoint: restore it" in alone.stderr
    copy_checkpoint(single_run, tmp_path / "older", 4)
    (tmp_path / "older" / "ckpt" / "step000000004").rename(run / "ckpt" / "step000000004")
    exported = _export(run / "ckpt", tmp_path / "export")  # export refuses it, naming the file
    assert exported.returncode == 2 and not (tmp_path / "export" / "mae.safetensors").exists()
    assert f"{OPTIM_STATES} does not match its recorded sha256" in exported.stderr
    assert f"export an older one ({run / 'ckpt' / 'step000000004'} is the newest of 1)" in exported.stderr
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
    assert first.returncode == 130 and summary(run)["stopped_by_signal"] == "SIGINT"
    assert not (run / "ckpt" / "LOCK").exists()


def test_credentials_in_the_config_never_reach_the_checkpoint(shards, tmp_path):
    """A key and secret in storage options: the run's meta.json keeps the config
    with those values redacted, and the export reads it as before. A password in
    data.storage.endpoint_url is refused before the run starts, redacted."""
    run = tmp_path / "secret"
    password = "data.storage.endpoint_url=http://user:wJalrXUtnFEMIpass@127.0.0.1:9"
    refused = run_cmd(mae_pretrain(shards, run, password), run)
    assert refused.returncode == 2 and "endpoint_url must not carry a user name or password" in refused.stderr
    assert "wJalrXUtnFEMIpass" not in refused.stderr + refused.stdout and not (run / "ckpt").exists()
    out = run_cmd(mae_pretrain(shards, run, "schedule.max_steps=2", "checkpoint.every_steps=2",
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
    assert _export(run / "ckpt", tmp_path / "export").returncode == 0


def _forge_meta(tag_dir, change) -> None:
    meta = json.loads((tag_dir / "meta.json").read_text())
    change(meta)
    (tag_dir / "meta.json").write_text(json.dumps(meta))
    reseal(tag_dir, "meta.json")


def _forge_pipe(tag_dir) -> None:
    import os

    os.mkfifo(tag_dir / "extra.bin")
    record = json.loads((tag_dir / "COMPLETE").read_text())  # listed with 0 bytes: its stat() matches
    record["files"]["extra.bin"] = {"bytes": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
    (tag_dir / "COMPLETE").write_text(json.dumps(record))


@pytest.mark.parametrize("forge, message", [
    (_forge_pipe, "extra.bin is unreadable (a named pipe, not a file)"),  # was a hang
    (lambda t: (t / "COMPLETE").write_text("[" * 100_000 + "]" * 100_000), "COMPLETE is unreadable (JSON nested too "
                                                                             "deep)"),  # was a RecursionError
    (lambda t: _forge_meta(t, lambda m: m.update(step=10**15)), "meta.json says step 1000000000000000, its folder "
                                                                "step 4: altered"),  # resumed as done, trained nothing
    (lambda t: _forge_meta(t, lambda m: m["config"]["data"]["augment"].update(img_size=64)),
     "its metadata does not describe its tensors: patches 256 (the tensors: 64)"),  # exported resized, exit 0
    (lambda t: _forge_meta(t, lambda m: m.update(config={})), "its model settings are incomplete or invalid "
                                                             "(KeyError: 'data')"),  # a traceback
    (lambda t: _forge_meta(t, lambda m: m["config"]["model"].update(norm_pix_loss="false")),
     "norm_pix_loss must be true or false, got 'false'"),  # read as True: reconstruct un-normalized wrongly
    (lambda t: _forge_meta(t, lambda m: m["config"].update(mixup={})), "is a fine-tuning checkpoint, not an MAE"),
    (lambda t: poison_weight(t, "cls_token", float("nan")), "tensor 'cls_token' holds NaN or infinite values"),
])
def test_a_forged_or_foreign_checkpoint_is_one_line_never_a_hang_or_a_wrong_export(single_run, tmp_path, forge,
                                                                                    message):
    """The record is a checksum list, not a signature: what someone with write access
    can forge must still be refused by what the files say of each other."""
    run = copy_checkpoint(single_run, tmp_path / "forged", 4)
    forge(run / "ckpt" / "step000000004")
    exported = _export(run / "ckpt", tmp_path / "export")
    assert exported.returncode == 2 and message in exported.stderr, exported.stderr[-2000:]
    assert "Traceback" not in exported.stderr and not (tmp_path / "export" / "mae.safetensors").exists()


def test_an_export_never_lands_among_checkpoints_nor_half_written(single_run, tmp_path):
    run = copy_checkpoint(single_run, tmp_path / "run", 4)
    into_run = _export(run / "ckpt", run / "ckpt")  # later read in place of the newer checkpoints
    assert into_run.returncode == 2 and "holds checkpoints: an export there would be read in their place" in \
        into_run.stderr
    # into one of its step folders: probe, convert and finetune --weights then read that step as the export
    into_step = _export(run / "ckpt", run / "ckpt" / "step000000004")
    assert into_step.returncode == 2 and "is a checkpoint: an export there would be read in its place" in \
        into_step.stderr and not (run / "ckpt" / "step000000004" / "mae.safetensors").exists()
    out = tmp_path / "export"
    assert _export(run / "ckpt", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "encoder.safetensors").unlink()
    (out / "encoder.safetensors").mkdir()  # the second file cannot be replaced: neither may be
    again = _export(run / "ckpt", out)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert (out / "mae.safetensors").read_bytes() == before["mae.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["encoder.safetensors", "mae.safetensors"]


def test_an_export_of_a_live_run_outlives_its_rotation(single_run, tmp_path, monkeypatch):
    """While `mae export` reads a run's newest checkpoint, the live run saves the
    next one and its keep_last rotation removes the one being read. Exporting the
    run's folder takes the newest checkpoint again; exporting that one step folder
    says what happened instead of naming a missing file."""
    run = copy_checkpoint(single_run, tmp_path / "live", 4)
    ckpt = run / "ckpt"
    read = consolidate_module.consolidate

    def rotated_while_read(root, tag):  # the run's save of step 8, then its rotation
        if tag == "step000000004" and not (ckpt / "step000000008").exists():
            shutil.copytree(single_run / "ckpt" / "step000000008", ckpt / "step000000008")
            shutil.rmtree(ckpt / tag)
        return read(root, tag)

    monkeypatch.setattr(consolidate_module, "consolidate", rotated_while_read)
    _, info = consolidate_module.export(ckpt, tmp_path / "export")
    assert info["tag"] == "step000000008" and info["step"] == 8
    assert (tmp_path / "export" / "encoder.safetensors").is_file()
    shutil.rmtree(ckpt / "step000000008")
    shutil.copytree(single_run / "ckpt" / "step000000004", ckpt / "step000000004")
    with pytest.raises(WeightsError, match="step000000004 was removed while it was read .* export the run's folder"):
        consolidate_module.export(ckpt / "step000000004", tmp_path / "export2")
