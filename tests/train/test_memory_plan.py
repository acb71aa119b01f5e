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
    assert model_states_per_gpu(p, 1, 8) == 8 * p + 8 * p / 8
    assert model_states_per_gpu(p, 2, 8) == 4 * p + 12 * p / 8
    assert model_states_per_gpu(p, 3, 8) == 16 * p / 8


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
    assert "model states alone need 2.45 GiB per GPU at stage 3" in advice and "offload" in advice
    large_batch = plan(PlanRequest(model="mae_vit_huge_patch14", gpus=8, nodes=1, micro_batch=4096, gpu_mem_gib=4.5,
                                   img_size=224, mask_ratio=0.75, dtype="bf16"))
    assert _advice(large_batch) == "lower the micro-batch (raise accumulation) or add GPUs"
