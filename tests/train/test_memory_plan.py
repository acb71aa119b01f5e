import pytest
import torch

from model.registry import create_model
from train.speedup import saved_activation_bytes
from train.memory_plan import PlanRequest, activation_bytes, count_params, model_states_per_gpu, plan


def test_counts_on_meta_match_the_registry():
    params, largest = count_params("mae_vit_huge_patch14", 224)
    assert round(params / 1e6, 2) == 656.61
    assert largest == 1280 * 5120 + 5120  # one MLP fc1 of ViT-H


def test_model_states_per_stage():
    p = 1_000_000
    assert model_states_per_gpu(p, 0, 8) == 16 * p
    assert model_states_per_gpu(p, 1, 8) == 8 * p + 12 * p / 8  # + the fp32 master partition
    assert model_states_per_gpu(p, 2, 8) == 4 * p + 16 * p / 8
    assert model_states_per_gpu(p, 3, 8) == 20 * p / 8


def test_activation_estimate_matches_what_autograd_saves():
    model = create_model("mae_vit_small_patch16")
    imgs, noise = torch.randn(2, 3, 224, 224), torch.rand(2, 196)

    def step(i, n):
        model(i, 0.75, n)[0].backward()

    measured = saved_activation_bytes(step, imgs, noise, model)
    assert activation_bytes(model.cfg, 2, 0.75, "fp32", False) == pytest.approx(measured, rel=0.1)


def test_vit_h_on_8_h100s_needs_sharding_and_fits_with_zero():
    r = plan(PlanRequest(model="mae_vit_huge_patch14", gpus=8, nodes=1, micro_batch=32, gpu_mem_gib=80.0))
    rows = {row["stage"]: row for row in r["rows"]}
    assert rows[0]["model_states"] / 2**30 == pytest.approx(656.61e6 * (16 + 2) / 2**30, rel=1e-3)  # + bf16 copies
    assert rows[3]["model_states"] < rows[2]["model_states"] < rows[1]["model_states"] < rows[0]["model_states"]
    assert rows[3]["deepspeed"] is not None and rows[1]["deepspeed"] is None
    assert rows[3]["max_micro_batch"][True] > rows[3]["max_micro_batch"][False] > 0
    assert r["activations"][True] < r["activations"][False]


def test_plan_advice_names_what_can_help():
    from train.cli.plan import _advice

    tiny = plan(PlanRequest(model="mae_vit_huge_patch14", gpus=8, nodes=1, micro_batch=32, gpu_mem_gib=0.001,
                            img_size=224, mask_ratio=0.75, dtype="bf16"))
    # lowering the micro-batch cannot help when the model states alone do not fit: it said so anyway
    advice = _advice(tiny)
    assert "model states alone need 2.75 GiB per GPU at stage 3" in advice and "offload" in advice
    large_batch = plan(PlanRequest(model="mae_vit_huge_patch14", gpus=8, nodes=1, micro_batch=4096, gpu_mem_gib=4.5,
                                   img_size=224, mask_ratio=0.75, dtype="bf16"))
    assert _advice(large_batch) == "lower the micro-batch (raise accumulation) or add GPUs"


MASTER_PROBE = """
import json, sys, torch
from train.config import load_config
from train.engine import build_engine, init_distributed
from model.registry import create_model
cfg = load_config("tiny_cpu", ["data.augment.img_size=32", f"deepspeed.stage={sys.argv[1]}"])
init_distributed(cfg.deepspeed)
model = create_model(cfg.model.name, img_size=32)
params = sum(p.numel() for p in model.parameters())
engine = build_engine(cfg, model, 1e-3)
opt = engine.optimizer
masters = opt.fp32_partitioned_groups_flat if sys.argv[1] == "3" else opt.single_partition_of_fp32_groups
weights = {p.ds_tensor.untyped_storage().data_ptr() if hasattr(p, "ds_tensor") else p.untyped_storage().data_ptr()
           for p in engine.module.parameters()}
print(json.dumps({"params": params, "master": sum(m.numel() for m in masters), "dtype": str(masters[0].dtype),
                  "shared": any(m.untyped_storage().data_ptr() in weights for m in masters)}))
"""


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_keeps_an_fp32_master_copy_apart_from_the_weights_as_the_plan_counts(stage):
    """DeepSpeed's ZeRO optimizer over fp32 weights: on one rank, a master
    partition of every parameter, in fp32, in storage of its own (4 B a parameter
    the plan adds to stages 1-3)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", MASTER_PROBE, str(stage)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["master"] == probe["params"] and probe["dtype"] == "torch.float32" and not probe["shared"]
