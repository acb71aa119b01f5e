"""A real training run logs loss, lr, throughput, data wait, grad norm and epoch per
step to TensorBoard (read back with tensorboard's reader), W&B (offline files) and
MLflow (a SQLite store); a resumed run continues the same records."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.photos import photo_shards
from tests.helpers.wandb_records import history
from tests.infra.test_tracking import events

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PASSWORD = "wJalrTrackPW"
ROOT = Path(__file__).resolve().parents[2]
TAGS = ["train/data_wait_fraction", "train/epoch", "train/grad_norm", "train/images_per_s", "train/loss", "train/lr"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return photo_shards(tmp_path_factory.mktemp("tracking-data"), 64, seed=5)


def _pretrain(shards: Path, run: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "train.cli", "pretrain", "--config", "tiny_cpu", f"data.url={shards}",
           "data.batch_size=8", f"schedule.max_steps={steps}", "optim.lr=1.0e-3", "schedule.warmup_epochs=0.25",
           f"checkpoint.dir={run}", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
           f"log.metrics_file={run / 'metrics.jsonl'}", "log.tensorboard=true", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _jsonl(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def tracked(shards, tmp_path_factory):
    """ZeRO-2, 8 steps into TensorBoard, W&B (offline) and MLflow (SQLite); then
    the run resumes from its step-5 checkpoint (the step-8 one lost) to step 10."""
    run = tmp_path_factory.mktemp("tracked")
    mlflow_db = f"sqlite:///{run / 'mlflow.db'}"
    backends = ("log.wandb=true", "log.wandb_mode=offline", "log.mlflow=true", f"log.mlflow_uri={mlflow_db}",
                f"data.storage.options={{secret: {PASSWORD}}}")  # unused: the data is local
    _pretrain(shards, run, 8, *backends)
    first = _jsonl(run)
    shutil.rmtree(run / "step000000008")  # as if the run died after step 8, before that checkpoint
    (run / "latest").write_text("step000000005")
    _pretrain(shards, run, 10, *backends)
    return run, first, _jsonl(run), mlflow_db


def test_tensorboard_holds_every_step_of_the_run(tracked):
    run, first, final, _ = tracked
    acc = events(run / "tensorboard")
    assert sorted(acc.Tags()["scalars"]) == TAGS
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == list(range(1, 11))  # steps 6-8 of the first attempt purged, each step once
    for step in range(1, 11):
        assert loss[step] == pytest.approx(final[step]["loss"], rel=1e-6)  # the metrics file's last word
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[1] == 0.0 and lr[4] == pytest.approx(final[4]["lr"], rel=1e-6) and lr[4] > 0
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert len(norms) == 10 and all(math.isfinite(n) and n > 0 for n in norms)
    waits = [e.value for e in acc.Scalars("train/data_wait_fraction")]
    assert all(0 <= w <= 1 for w in waits)
    rates = {e.step: e.value for e in acc.Scalars("train/images_per_s")}
    assert all(r > 0 for r in rates.values()) and rates[3] == pytest.approx(final[3]["images_per_s"], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/epoch")][-1] == 1  # 8 steps per epoch
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "model.name = \"mae_vit_test_patch4\"" in config and "log.tensorboard = true" in config


def test_wandb_offline_run_holds_the_same_values_across_the_resume(tracked):
    pytest.importorskip("wandb")
    run, _, final, _ = tracked
    steps = history(run)
    assert set(range(1, 11)) <= set(steps)
    for step in range(1, 11):  # read in order, the resumed attempt's steps 6-8 replace the first one's
        assert steps[step]["train/loss"] == pytest.approx(final[step]["loss"], rel=1e-6), step
    assert len(list(run.glob("wandb/offline-run-*"))) == 2  # two attempts of one run id
    assert {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")} == {
        next(run.glob("wandb/offline-run-*/run-*.wandb")).stem.removeprefix("run-")}


def test_no_tracking_backend_keeps_a_credential_from_the_command_line(tracked):
    """W&B records the process's command line: a password given in an override was
    kept in plain text in its run file, for `wandb sync` to upload."""
    run, *_ = tracked
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written)
    assert [p for p in written if PASSWORD.encode() in p.read_bytes()] == []


def test_mlflow_run_is_continued_after_the_resume(tracked):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run, first, final, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("maescale").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.name"] == '"mae_vit_test_patch4"'
    history_ = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert {m.step for m in history_} == set(range(1, 11))
    last = {m.step: m.value for m in sorted(history_, key=lambda m: m.timestamp)}
    assert last[10] == pytest.approx(final[10]["loss"], rel=1e-6)


def test_stage_0_measures_the_same_grad_norm_as_deepspeeds_zero_2(shards, tracked, tmp_path):
    run0 = tmp_path / "stage0"
    _pretrain(shards, run0, 3, "deepspeed.stage=0")
    zero0 = {e.step: e.value for e in events(run0 / "tensorboard").Scalars("train/grad_norm")}
    zero2 = {e.step: e.value for e in events(tracked[0] / "tensorboard").Scalars("train/grad_norm")}
    for step in (1, 2, 3):
        assert zero0[step] == pytest.approx(zero2[step], rel=1e-4), step
