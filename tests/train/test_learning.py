"""It learns: the demo's pipeline on a smaller budget — real images, shards, the
DeepSpeed trainer, export, reconstructions, the probes and fine-tuning — and the
pretrained encoder must beat a random one by a clear margin, when probed and when
fine-tuned; partial fine-tuning beats the paper's linear probe and random init."""

import pytest
from PIL import Image

from train.demo import DemoConfig, format_summary, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = DemoConfig(workdir=tmp_path_factory.mktemp("demo"), photos=300, epochs=15, probe_epochs=40, partial_blocks=2)
    return cfg, run_demo(cfg)


def test_the_encoder_learns_features_a_random_one_lacks(demo):
    _, r = demo
    print(format_summary(r))
    pre, rnd = r["probe"]["pretrained"], r["probe"]["random"]
    assert pre["val_samples"] == rnd["val_samples"] == 597 and pre["classes"] == 10
    assert pre["linear_top1"] >= rnd["linear_top1"] + 0.03, (pre, rnd)
    assert pre["knn_top1"] >= rnd["knn_top1"] + 0.15, (pre, rnd)
    assert pre["linear_top1"] > 0.9


def test_fine_tuning_the_pretrained_encoder_beats_random_init_and_so_does_partial(demo):
    _, r = demo
    top1 = {name: run["evals"][-1]["top1"] for name, run in r["finetune"].items()}
    assert all(run["evals"][-1]["samples"] == 597 for run in r["finetune"].values())
    assert r["finetune"]["pretrained"]["init"] == "encoder" and r["finetune"]["random init"]["init"] == "random"
    # measured on this budget (15-epoch pretraining, 4 fine-tuning epochs, seed 0): pretrained 81.9%,
    # random init 58.6%, the paper's LARS probe 57.5%, the last 2 of 4 blocks 85.9% (2026-11-30, once the
    # schedule counted each epoch's partial batch: 4 more steps a run; before, 78.7 / 59.3 / 56.1 / 78.2%).
    # Partial against full fine-tuning moved 8 points with those few steps: at this budget their order is
    # noise, so only the margins over the probe and random init are asserted.
    assert top1["pretrained"] >= top1["random init"] + 0.08, top1
    assert top1["partial"] >= top1["linear probe"] + 0.10 and top1["partial"] >= top1["random init"] + 0.08, top1


def test_held_out_reconstruction_loss_falls_well_below_its_start(demo):
    _, r = demo
    assert r["heldout_loss_pretrained"] < 0.35 * r["heldout_loss_random"], r
    assert r["loss_last"] < 0.35 * r["loss_first"], r
    p = r["pretrain"]
    assert p["step"] > 300 and p["images_per_s"] > 0 and p["nonfinite_skipped"] == 0
    assert p["prometheus"]["scraped"]["mae_trainer_images_total"] > 0  # the endpoint was up and counting


def test_the_pictures_are_written(demo):
    cfg, r = demo
    grid = Image.open(r["files"]["reconstructions"])
    assert grid.size[0] > grid.size[1] / 4 and grid.size[1] > 8 * 100  # 8 rows of 4 panels
    assert Image.open(r["files"]["loss_curve"]).size == (800, 450)  # matplotlib, 8 x 4.5 in at 100 dpi
    assert Image.open(r["files"]["throughput"]).size == (800, 550)
    assert (cfg.workdir / "export" / "encoder.safetensors").exists()


def test_tensorboard_holds_the_run_the_probes_and_the_reconstructions(demo):
    from tests.infra.test_tracking import events

    _, r = demo
    acc = events(r["files"]["tensorboard"])
    steps = r["pretrain"]["step"]
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction", "train/grad_norm"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, steps + 1)), tag
    assert acc.Scalars("train/loss")[0].value == pytest.approx(r["loss_first"], rel=1e-6)
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(r["loss_last"], rel=1e-6)
    for kind in ("pretrained", "random"):
        probe = r["probe"][kind]
        assert [(e.step, e.value) for e in acc.Scalars(f"eval/linear_top1_{kind}")] == [
            (steps, pytest.approx(probe["linear_top1"], rel=1e-6))]
        assert acc.Scalars(f"eval/knn_top1_{kind}")[0].value == pytest.approx(probe["knn_top1"], rel=1e-6)
    grid = Image.open(r["files"]["reconstructions"])
    recon = acc.Images("eval/reconstructions")[0]
    assert (recon.step, recon.width, recon.height) == (steps, *grid.size)


def test_the_demo_runs_against_a_real_s3_server(tmp_path):
    """`make demo-s3` on a tiny budget: the store is a SeaweedFS bucket, the trainer
    (a subprocess) and the probes read it with the same credentials."""
    r = run_demo(DemoConfig(workdir=tmp_path, photos=60, epochs=1, probe_epochs=2, finetune_epochs=0.5, s3=True))
    assert r["store"] == "s3://maescale-demo"
    assert r["pretrain"]["step"] > 0 and r["pretrain"]["images"] > 0
    assert r["probe"]["pretrained"]["val_samples"] == 597
    assert r["finetune"]["pretrained"]["evals"][-1]["samples"] == 597
