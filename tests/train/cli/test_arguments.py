"""Bad arguments are refused with one `error:` line naming the argument and exit code
2 — no traceback, no hang, nothing written — and good ones still run. Most checks fail
in argparse, before any weights or data are read."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.cli import run_mae
from tests.helpers.shards import jpeg_bytes, write_raw_shards
from train.cli import main


def _refused(capsys: pytest.CaptureFixture, *argv: object) -> str:
    """The one error line of a command that must fail with exit code 2."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:] and lines[-1].startswith("mae"), err
    return lines[-1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An `mae export`-style mae.safetensors of the test model (random weights)."""
    from model.registry import create_model
    from train.weights.files import save_safetensors

    path = tmp_path_factory.mktemp("weights") / "mae.safetensors"
    save_safetensors(create_model("mae_vit_test_patch4").state_dict(), path,
                     {"model": "mae_vit_test_patch4", "img_size": 32})
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Six small JPEGs of two classes in two shards."""
    dest = tmp_path_factory.mktemp("shards")
    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((48, 40), seed=n), "cls": str(n % 2).encode()}) for n in range(6)]
    write_raw_shards(dest, [samples[:3], samples[3:]], classes=["a", "b"])
    return dest


@pytest.mark.parametrize("argv, argument", [
    (["--img-size", "33"], "--img-size"),  # not a multiple of the patch size 14
    (["--img-size", "16002"], "--img-size"),  # a torch allocator traceback; 160,000 asked for 153 GB
    (["--gpu-mem", "1e308"], "--gpu-mem"),
    (["--gpu-mem", "nan"], "--gpu-mem"),
    (["--gpus", "0"], "--gpus"),
    (["--mask-ratio", "1"], "--mask-ratio"),
])
def test_plan_refuses(capsys, argv, argument):
    assert argument in _refused(capsys, "plan", *argv)


def test_plan_runs_with_good_values(capsys):
    r = run_mae(capsys, "plan", "--img-size", "224", "--gpu-mem", "80")
    assert r.code == 0 and "ZeRO stage" in r.out


@pytest.mark.parametrize("argv, argument", [
    (["--samples", "nan"], "--samples"),
    (["--samples", "inf"], "--samples"),
    (["--samples", "1e20"], "--samples"),
    (["--samples", "1e20", "--shards", "10"], "--samples"),
    (["--samples", "1e12", "--shards", "0"], "--samples"),
    (["--samples", "1e6", "--shards", "0"], "--shards"),
    (["--samples", "1e6", "--shards", "1e7"], "--shards"),
    (["--samples", "1.5"], "--samples"),
    (["--samples", "2e9"], "--samples"),  # replays 4e9 samples on 8 ranks: minutes
    (["--shards", "5"], "--shards"),  # without --samples
    (["--samples", "1000", "--shard-bytes", "1"], "--shard-bytes"),  # printed "0 B downloaded (0.4 shards)"
    (["--samples", "1000", "data.url=/somewhere"], "--samples"),  # the URL was ignored without a word
])
def test_simulate_refuses(capsys, argv, argument):
    assert argument in _refused(capsys, "simulate", "--world", "8", *argv)


def test_simulate_runs_with_good_values(capsys):
    r = run_mae(capsys, "simulate", "--world", "8", "--samples", "1e4", "--shards", "10", "--epochs", "1")
    assert r.code == 0 and "10,000 samples in 10 shards" in r.out


@pytest.mark.parametrize("argv, argument", [
    (["--mask-ratio", "1"], "--mask-ratio"),
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--mask-ratio", "nan"], "--mask-ratio"),
    (["--cell", "0"], "--cell"),
    (["--cell", "-5"], "--cell"),
    (["--cell", "100000"], "--cell"),
    (["--num", "0"], "--num"),
    (["--out", "grid"], "--out"),  # no image extension
    (["--out", ""], "--out"),
])
def test_reconstruct_refuses(capsys, tmp_path, argv, argument):
    assert argument in _refused(capsys, "reconstruct", tmp_path / "weights", tmp_path, *argv)


def test_reconstruct_refuses_a_folder_as_out_and_a_mask_that_hides_everything(capsys, tmp_path, weights, shards):
    (tmp_path / "grid.png").mkdir()
    assert "--out" in _refused(capsys, "reconstruct", weights, shards, "--out", tmp_path / "grid.png")
    assert "--mask-ratio" in _refused(capsys, "reconstruct", weights, shards, "--mask-ratio", "0.99",
                                      "--out", tmp_path / "x.png")  # 64 patches: none left visible
    assert not (tmp_path / "x.png").exists()
    r = run_mae(capsys, "reconstruct", weights, shards, "--num", "2", "--cell", "8", "--out", tmp_path / "ok.png")
    assert r.code == 0 and (tmp_path / "ok.png").is_file(), r.err


@pytest.mark.parametrize("argv, argument", [
    (["--val-fraction", "1"], "--val-fraction"),
    (["--val-fraction", "nan"], "--val-fraction"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--k", "0"], "--k"),
    (["--epochs", "0"], "--epochs"),
    (["--tensorboard", "tb", "--step", "-5"], "--step"),  # was recorded at step -5
])
def test_probe_refuses(capsys, tmp_path, argv, argument):
    assert argument in _refused(capsys, "probe", tmp_path / "weights", "--train", tmp_path, *argv)


def test_probe_refuses_unknown_models_sizes_and_splits_without_training_samples(capsys, weights, shards):
    assert "random:<model>" in _refused(capsys, "probe", "random:nope", "--train", shards)
    assert "--img-size" in _refused(capsys, "probe", "random:mae_vit_test_patch4", "--train", shards,
                                    "--img-size", "33")
    assert "--img-size" in _refused(capsys, "probe", weights, "--train", shards, "--img-size", "32")
    line = _refused(capsys, "probe", "random:mae_vit_test_patch4", "--train", shards, "--val-fraction", "0.9")
    assert "1 training sample(s)" in line and "0.9" in line
    r = run_mae(capsys, "probe", "random:mae_vit_test_patch4", "--train", shards, "--epochs", "1", "--k", "2",
                "--workers", "0", "--json")
    assert r.code == 0, r.err


BENCH = ["bench", "encoder", "--model", "mae_vit_test_patch4", "--batch", "2", "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("argv, argument", [
    (["--device", "bogus"], "--device"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),  # one past the GPUs torch sees
    (["--mask-ratio", "1"], "--mask-ratio"),
    (["--batch", "0"], "--batch"),
])
def test_bench_encoder_refuses(capsys, argv, argument):
    assert argument in _refused(capsys, *BENCH, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_bench_encoder_refuses_cuda_without_a_gpu(capsys):
    assert "--device" in _refused(capsys, *BENCH, "--device", "cuda")


@pytest.mark.parametrize("argv, argument", [
    # each crashed: StatisticsError, ZeroDivisionError, a figure for "-3 shards", nothing run at exit 0,
    # ValueError for nan, torch's AssertionError/RuntimeError for a device
    (["bench", "metrics", "--rounds", "0"], "--rounds"),
    (["bench", "inputs", "--images", "0"], "--images"),
    (["bench", "inputs", "--shards", "-3"], "--shards"),
    (["bench", "ingest", "--per-tar", "0"], "--per-tar"),
    (["bench", "ingest", "--parts", "bogus"], "--parts"),
    (["bench", "plan", "--reference-max", "nan"], "--reference-max"),
    (["bench", "checkpoint", "--rounds", "0"], "--rounds"),
    (["bench", "pipeline", "--device", "nonsense"], "--device"),
    (["bench", "pipeline", "--device", f"cuda:{torch.cuda.device_count()}"], "--device"),
])
def test_other_benches_refuse(capsys, argv, argument):
    assert argument in _refused(capsys, *argv)


def test_bench_encoder_runs_on_the_cpu(capsys):
    r = run_mae(capsys, *BENCH, "--device", "cpu", "--json")
    assert r.code == 0, r.err


def test_plot_run_refuses_a_binary_file_and_an_empty_out(capsys, tmp_path, monkeypatch):
    binary = tmp_path / "shard.tar"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a metrics file" in _refused(capsys, "plot", "run", binary, "--out", tmp_path / "x")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "loss": {1 / s}, "lr": 0.001, "time": {s}, "images_per_s": 10.0, '
                               f'"data_wait_fraction": 0.1}}\n' for s in (1, 2)))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert "--out" in _refused(capsys, "plot", "run", metrics, "--out", "")
    assert "metrics_file" in _refused(capsys, "plot", "run", "", "--out", tmp_path / "x")
    assert not any(work.iterdir()) and not (tmp_path / "x").exists()
    r = run_mae(capsys, "plot", "run", metrics, "--out", tmp_path / "figs")
    assert r.code == 0 and (tmp_path / "figs" / "loss_curve.png").is_file(), r.err
    finetune = tmp_path / "ft.jsonl"  # as `mae finetune` writes it: no throughput fields
    finetune.write_text('{"step": 1, "loss": 2.2, "lr": 0.0, "epoch": 0}\n{"step": 2, "loss": 2.1, "lr": 1e-5, "epoch": 0}\n')
    r = run_mae(capsys, "plot", "run", finetune, "--out", tmp_path / "ft-figs")
    assert r.code == 0 and "no throughput.png" in r.out, r.err  # it wrote the loss curve, then failed
    assert sorted(p.name for p in (tmp_path / "ft-figs").iterdir()) == ["loss_curve.png"]


def test_plot_refuses_a_pipe_or_a_device_at_once(capsys, tmp_path):
    """Each read forever: /dev/zero until the kernel killed the process, a named pipe
    until a writer came."""
    pipe = tmp_path / "metrics.jsonl"
    os.mkfifo(pipe)
    for kind in ("run", "bench"):
        for path, what in [(pipe, "a named pipe"), ("/dev/zero", "a character device"), (tmp_path, "a directory")]:
            error = _refused(capsys, "plot", kind, path, "--out", tmp_path / "x")
            assert str(path) in error and f"{what}, not a file" in error
    big = tmp_path / "report.json"
    with open(big, "wb") as f:
        f.truncate(2**30)  # sparse
    assert "is over 67,108,864 bytes" in _refused(capsys, "plot", "bench", big, "--out", tmp_path / "x")


@pytest.mark.parametrize("argv, argument", [
    (["shard", "photos", ""], "dest"),
    (["shard", " ", "out"], "src"),
    (["export", "run1", ""], "out"),
    (["export", "", "out"], "ckpt"),
])
def test_an_empty_destination_or_source_is_refused_and_nothing_is_written(capsys, tmp_path, monkeypatch, argv,
                                                                          argument):
    monkeypatch.chdir(tmp_path)
    assert f"argument {argument}: must not be empty" in _refused(capsys, *argv)
    assert not any(tmp_path.iterdir())


def test_overrides_may_follow_options():
    """`mae simulate data.url=x --world 2 data.storage.cache_limit_gb=0` failed with
    "unrecognized arguments", naming no reason."""
    from train.cli import build_parser
    from train.cli.common import parse_with_overrides

    argv = ["simulate", "data.url=x", "--world", "2", "data.storage.cache_limit_gb=0", "data.plan.seed=3"]
    args = parse_with_overrides(build_parser(argv), argv)
    assert args.overrides == ["data.url=x", "data.storage.cache_limit_gb=0", "data.plan.seed=3"] and args.world == 2
    argv = ["simulate", "data.url=x", "--world", "2", "--bogus"]
    with pytest.raises(SystemExit):
        parse_with_overrides(build_parser(argv), argv)
