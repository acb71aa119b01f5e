"""`mae finetune` end to end on CPU: two ranks under torchrun (ZeRO-2), evaluation
counted once per sample across ranks, best/last exports; a kill -9 mid-epoch then
a restart reproduces every later loss exactly; partial fine-tuning under ZeRO-3
leaves the frozen blocks as they were; the paper's linear probe (LARS, BN head)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infra.net import free_port
from infra.testing.photos import write_photo_folder
from model.registry import create_model
from pipeline.shards.writer import ShardWriterConfig, write_shards
from train.weights.files import export_encoder

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]
STEPS = 9


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Labelled photo crops: 96 to train on (9 classes), 35 to validate (odd: ranks pad)."""
    root = tmp_path_factory.mktemp("ft-data")
    write_photo_folder(root / "train-src", 96, size=(64, 48), seed=3)
    write_photo_folder(root / "val-src", 35, size=(64, 48), seed=4)
    write_photo_folder(root / "val2-src", 18, size=(64, 48), seed=5)
    for split in ("train", "val", "val2"):
        write_shards(str(root / f"{split}-src"), str(root / split), ShardWriterConfig(shard_bytes=60_000))
    torch.manual_seed(0)
    export_encoder(create_model("mae_vit_test_patch4"), root / "encoder.safetensors")
    return {"train": root / "train", "val": root / "val", "val2": root / "val2", "encoder": root / "encoder.safetensors"}


def _overrides(data: dict, run: Path, *extra: str) -> list[str]:
    return [f"data.url={data['train']}", f"eval.url={data['val']}", "data.batch_size=8", "data.num_workers=1",
            f"model.weights={data['encoder']}", f"schedule.max_steps={STEPS}", "schedule.warmup_epochs=0.5",
            f"checkpoint.dir={run / 'ckpt'}", f"log.metrics_file={run / 'metrics.jsonl'}", "checkpoint.every_steps=3",
            "eval.every_epochs=1", *extra]


def _torchrun(data: dict, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "train.finetune", "--config", "finetune_tiny_cpu", *_overrides(data, run, *extra)]


def _run(cmd: list[str], run: Path) -> subprocess.CompletedProcess:
    run.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    (run / "log.txt").write_text(out.stdout + out.stderr)
    return out


def _process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _records(run: Path) -> tuple[dict[int, dict], list[dict]]:
    steps, evals = {}, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (evals.append(rec) if rec.get("eval") else steps.__setitem__(rec["step"], rec))
    return steps, evals


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ft-ref")
    out = _run(_torchrun(data, run, "log.tensorboard=true"), run)
    assert out.returncode == 0, out.stderr[-4000:]
    return run


def test_two_ranks_train_evaluate_once_per_sample_and_export(data, reference):
    steps, evals = _records(reference)
    assert sorted(steps) == list(range(1, STEPS + 1)) and all(torch.isfinite(torch.tensor(r["loss"]))
                                                               for r in steps.values())
    # 48 samples per rank = 6 micro-batches: epochs end at steps 6 (evaluated) and 9 (the end)
    assert [(e["epoch"], e["step"]) for e in evals] == [(0, 6), (1, 9)]
    for e in evals:
        assert e["samples"] == 35  # the rank that was padded counts its repeat once
        assert 0 <= e["top1"] <= e["top5"] <= 1 and e["loss"] > 0
    summary = json.loads((reference / "ckpt" / "run_summary.json").read_text())
    assert summary["init"] == "encoder" and summary["best_top1"] == max(e["top1"] for e in evals)
    best = load_file(str(reference / "ckpt" / "best" / "classifier.safetensors"))
    last = load_file(str(reference / "ckpt" / "last" / "classifier.safetensors"))
    assert best["head.weight"].shape == (9, 64) and "fc_norm.weight" in best and "norm.weight" not in best
    from train.config import load_config
    from train.eval.finetune import build_classifier
    from train.eval.finetune_config import FinetuneConfig

    start, _ = build_classifier(load_config("finetune_tiny_cpu", _overrides(data, reference), FinetuneConfig), 9)
    assert start.head.weight.std() < 3e-5 and (last["head.weight"] - start.head.weight).abs().max() > 1e-4
    assert torch.equal(last["blocks.0.attn.qkv.weight"], best["blocks.0.attn.qkv.weight"]) == (
        summary["best_top1"] == summary["evals"][-1]["top1"])
    from tests.infra.test_tracking import events

    acc = events(reference / "ckpt" / "tensorboard")  # rank 0's curves and accuracies
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(
        {s: r["loss"] for s, r in steps.items()}, rel=1e-6)
    top1 = acc.Scalars("eval/top1")
    assert [e.step for e in top1] == [e["step"] for e in evals]
    assert [e.value for e in top1] == pytest.approx([e["top1"] for e in evals], rel=1e-6)


def test_kill_9_mid_epoch_then_restart_reproduces_every_loss(data, reference, tmp_path):
    ref, ref_evals = _records(reference)
    run = tmp_path / "killed"
    run.mkdir()
    cmd = _torchrun(data, run)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # past the step-3 checkpoint, before the epoch's end at 6
        if (run / "metrics.jsonl").exists() and len(_records(run)[0]) >= 4:
            break
        time.sleep(0.02)
    for pid in _process_tree(proc.pid):  # torchrun starts each rank in its own session: kill them all
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_records(run)[0])
    assert 4 <= killed_at < STEPS
    out = _run(cmd, run)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr
    got, evals = _records(run)
    for step in range(1, STEPS + 1):
        assert got[step]["ids"] == ref[step]["ids"], step
        assert got[step]["loss"] == ref[step]["loss"], (step, got[step]["loss"], ref[step]["loss"])
    assert [(e["step"], e["top1"], e["loss"]) for e in evals][-2:] == [(e["step"], e["top1"], e["loss"])
                                                                      for e in ref_evals]


def test_partial_fine_tuning_under_zero_3_leaves_frozen_blocks_untouched(data, tmp_path):
    out = _run([sys.executable, "-m", "train.finetune", "--config", "finetune_tiny_cpu", "--trainable-blocks", "1",
                *_overrides(data, tmp_path, "deepspeed.stage=3", "schedule.max_steps=4")], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "0.05M of 0.11M parameters trainable" in out.stderr
    pretrained = load_file(str(data["encoder"]))
    tuned = load_file(str(tmp_path / "ckpt" / "last" / "classifier.safetensors"))
    for key in pretrained:
        if key.startswith(("blocks.0.", "patch_embed.", "cls_token", "pos_embed")):
            assert torch.equal(tuned[key], pretrained[key]), key
    assert not torch.equal(tuned["blocks.1.mlp.fc1.weight"], pretrained["blocks.1.mlp.fc1.weight"])


def test_the_papers_linear_probe_trains_only_the_bn_head_with_lars(data, tmp_path):
    out = _run([sys.executable, "-m", "train.cli", "finetune", "--config", "finetune_tiny_cpu",
                *_overrides(data, tmp_path, "model.head=bn_linear", "model.global_pool=false",
                            "model.trainable_blocks=0", "model.drop_path=0", "optim.name=lars", "optim.blr=0.1",
                            "optim.weight_decay=0", "mixup.prob=0", "mixup.label_smoothing=0",
                            "data.augment.rand_augment_layers=0", "data.augment.erase_prob=0",
                            "deepspeed.stage=0")], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "lars" in out.stderr
    pretrained = load_file(str(data["encoder"]))
    tuned = load_file(str(tmp_path / "ckpt" / "last" / "classifier.safetensors"))
    assert all(torch.equal(tuned[k], v) for k, v in pretrained.items())  # norm included: the encoder is frozen
    assert tuned["head.0.running_var"].ne(1).all() and tuned["head.1.weight"].shape == (9, 64)
    bad = _run([sys.executable, "-m", "train.cli", "finetune", "--config", "finetune_tiny_cpu",
                *_overrides(data, tmp_path / "bad", "optim.name=lars")], tmp_path / "bad")
    assert bad.returncode == 2 and "lars needs deepspeed.stage=0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_batch_the_data_cannot_fill_is_refused(data, tmp_path):
    """96 samples on one rank: a micro-batch of 100 ran 1-step epochs of 96 images
    under the lr scaled for 100, without a word."""
    out = _run([sys.executable, "-m", "train.cli", "finetune", "--config", "finetune_tiny_cpu",
                *_overrides(data, tmp_path, "data.batch_size=100", "deepspeed.stage=0")], tmp_path)
    message = ("ERROR train.finetune: ConfigError: data.batch_size 100 x optim.accum_steps 1 is more than the 96 samples an epoch gives "
               "each of the 1 ranks: lower data.batch_size")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not list((tmp_path / "ckpt").glob("step*"))


@pytest.mark.parametrize("change, expected", [
    ("weights", "weights: '{old}' -> '{new}'"),
    ("model.num_classes=12", "head_classes: 9 -> 12"),
    ("eval.url", "eval_manifest: '"),
])
def test_a_resume_that_changes_the_head_or_the_weights_is_refused_by_name(data, reference, tmp_path, change, expected):
    """Other weights were ignored silently (the run went on from its checkpoint); another
    class count failed inside DeepSpeed with a state-dict size mismatch; another
    validation set's scores were compared with the first one's to pick the best."""
    import shutil

    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    new = tmp_path / "other-encoder.safetensors"
    shutil.copy(data["encoder"], new)
    extra = {"weights": f"model.weights={new}", "eval.url": f"eval.url={data['val2']}"}.get(change, change)
    out = _run([sys.executable, "-m", "train.cli", "finetune", "--config", "finetune_tiny_cpu",
                *_overrides(data, tmp_path, extra)], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "written with a config that changes" in out.stderr, out.stderr[-3000:]
    assert expected.format(old=os.path.abspath(data["encoder"]), new=new) in out.stderr, out.stderr[-3000:]
