import json
import re
import statistics
import subprocess
import sys

import pytest

from model.flops import encoder_speedup_flop_ratio, train_step_flops
from model.registry import create_model, model_config
from train.speedup import SpeedupConfig, compiled, measure_speedup


def test_report_values_are_consistent_with_the_measured_times():
    cfg = SpeedupConfig(model="mae_vit_test_patch4", batch=4, steps=4, warmup=1, dtype="fp32", device="cpu")
    report = measure_speedup(cfg)
    mae, base = report["results"]["mae"], report["results"]["mask_token_baseline"]
    for r in (mae, base):
        assert len(r["step_times_s"]) == 4 and all(t > 0 for t in r["step_times_s"])
        assert r["median_s"] == statistics.median(r["step_times_s"])
        assert r["p25_s"] <= r["median_s"] <= r["p75_s"]
        assert r["images_per_s"] == pytest.approx(4 / r["median_s"])
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU: no known peak, no CUDA allocator
        assert r["first_step_s"] > 0
    assert report["measured_speedup"] == pytest.approx(base["median_s"] / mae["median_s"])
    mcfg = model_config("mae_vit_test_patch4")
    assert report["flop_ratio"] == pytest.approx(encoder_speedup_flop_ratio(mcfg))
    assert mae["train_flops_per_step"] == train_step_flops(mcfg, 4)
    assert base["train_flops_per_step"] == train_step_flops(mcfg, 4, baseline=True)
    # the baseline encodes 4x the tokens, so it must save more activations for backward
    assert base["activation_bytes"] > 1.5 * mae["activation_bytes"] > 0


def test_the_breakdown_puts_the_baselines_extra_tokens_in_its_matmuls():
    """--breakdown profiles one more step of each variant. The FLOPs the profiler
    counts are exact: the baseline encodes 4x the tokens, so its matrix products do
    over 3x MAE's work, and MAE's are most of the analytic step FLOPs (attention and
    a convolution's backward go uncounted)."""
    cmd = [sys.executable, "-m", "train.cli", "bench", "encoder", "--model", "mae_vit_tiny_patch16", "--batch", "4",
           "--steps", "1", "--warmup", "1", "--dtype", "fp32", "--device", "cpu", "--breakdown"]
    report = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True).stdout)
    mae, base = report["breakdown"]["mae"], report["breakdown"]["mask_token_baseline"]
    assert list(mae) == list(base) == ["attention", "matmul", "layer_norm", "optimizer", "masking", "other"]
    assert all(f["ms"] >= 0 and f["gflop"] >= 0 for side in (mae, base) for f in side.values())
    assert all(mae[f]["ms"] > 0 for f in ("matmul", "attention", "optimizer", "masking"))
    mcfg = model_config("mae_vit_tiny_patch16")
    assert base["matmul"]["gflop"] > 3 * mae["matmul"]["gflop"]
    assert 0.8 * train_step_flops(mcfg, 4) < 1e9 * mae["matmul"]["gflop"] < train_step_flops(mcfg, 4)
    assert mae["matmul"]["gflop"] > 0.999 * sum(f["gflop"] for f in mae.values())  # elementwise ops count little
    table = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert re.search(r"^  matmul +[\d.]+ +[\d.]+ +[\d.]+x +[\d.]+ +[\d.]+$", table, re.M), table
    assert "breakdown" in measure_speedup(SpeedupConfig(model="mae_vit_test_patch4", batch=2, steps=1, warmup=0,
                                                        device="cpu", dtype="fp32"))


def test_grad_checkpointing_cuts_saved_activations():
    common = dict(model="mae_vit_test_patch4", batch=4, steps=1, warmup=0, dtype="fp32", device="cpu")
    plain = measure_speedup(SpeedupConfig(**common))
    ckpt = measure_speedup(SpeedupConfig(**common, grad_checkpointing=True))
    for name in ("mae", "mask_token_baseline"):
        assert ckpt["results"][name]["activation_bytes"] < plain["results"][name]["activation_bytes"]


def test_compiling_the_blocks_compiles_one_graph_per_stack_and_computes_as_eager():
    """Regional compilation: ViT-Ti's 12 encoder blocks share one graph and its
    decoder's blocks another, and the step's loss and gradients are eager's."""
    import torch

    torch.manual_seed(0)
    eager, regional = create_model("mae_vit_tiny_patch16"), create_model("mae_vit_tiny_patch16")
    regional.load_state_dict(eager.state_dict())
    imgs, noise = torch.randn(2, 3, 224, 224), torch.rand(2, eager.cfg.num_patches)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = [model(imgs, 0.75, noise)[0] for model in (eager, compiled(regional, "blocks"))]
    for loss in losses:
        loss.backward()
    assert len(eager.blocks) == 12 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for a, b in zip(eager.parameters(), regional.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_bf16_bench_runs_on_cpu():
    report = measure_speedup(SpeedupConfig(model="mae_vit_test_patch4", batch=2, steps=2, warmup=1,
                                                  dtype="bf16", device="cpu"))
    assert report["measured_speedup"] > 0 and report["config"]["dtype"] == "bf16"


def test_cli_json_output_and_bad_arguments():
    cmd = [sys.executable, "-m", "train.cli", "bench", "encoder", "--model", "mae_vit_test_patch4",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--dtype", "fp32", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["config"]["model"] == "mae_vit_test_patch4" and report["device"] == "cpu"
    assert report["config"]["compile"] == ""
    bad = subprocess.run(cmd[:-1] + ["--model", "mae_vit_nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'mae_vit_nope'" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(cmd[:5] + ["--batch", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "argument --batch: must be >= 1, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.gpu
def test_bench_on_gpu_reports_memory_and_mfu():
    report = measure_speedup(SpeedupConfig(model="mae_vit_tiny_patch16", batch=16, steps=3, warmup=2,
                                                  dtype="bf16", device="cuda", peak_flops=1e15))
    mae = report["results"]["mae"]
    assert mae["peak_memory_bytes"] > 0 and 0 < mae["mfu"] < 1
