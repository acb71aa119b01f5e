"""Will this model, ZeRO stage and micro-batch fit a GPU? (`mae plan`)

Model states per GPU for each ZeRO stage, counted for this trainer's recipe
(bf16 autocast over fp32 master weights: 4 B weights + 4 B grads + 8 B AdamW per
parameter, and under ZeRO 1-3 4 B more for the optimizer's fp32 copy of each
partition; the part a stage shards divided by the GPU count, plus 2 B of autocast
weight copies), next to DeepSpeed's own estimators (which assume 16-bit weights);
parameters counted on a meta-device model. Activations per GPU from the tensors
autograd keeps per block (36 bytes per token x width under bf16 autocast, 64 in
fp32 — checked against what autograd really saves; checkpointing keeps only each
block's fp32 input plus one block's activations during recompute). Transient
buffers of the backward pass and allocator fragmentation are not modelled: plan
against 90% of the card and confirm with a short run (infra/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infra.options import option, require, require_choice, require_positive
from model.flops import encoder_speedup_flop_ratio
from model.spec import MAEConfig, num_visible_patches
from model.registry import create_model, list_models
from model.weights import is_encoder_key

GiB = 2**30
BYTES_PER_TOKEN_DIM = {"bf16": 36, "fp32": 64}


@dataclass(frozen=True)
class PlanRequest:
    model: str = option("mae_vit_huge_patch14", "registered model")
    gpus: int = option(8, "GPUs per node")
    nodes: int = option(1, "nodes")
    micro_batch: int = option(32, "samples per GPU per micro-step")
    gpu_mem_gib: float = option(80.0, "memory of one GPU, GiB")
    img_size: int = option(224, "input side")
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder")
    dtype: str = option("bf16", "activation dtype")

    def __post_init__(self) -> None:
        require_choice(self, "model", list_models())
        require_positive(self, "gpus", "nodes", "micro_batch", "gpu_mem_gib", "img_size")
        require(0 < self.mask_ratio < 1, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        require_choice(self, "dtype", tuple(BYTES_PER_TOKEN_DIM))


def count_params(name: str, img_size: int) -> tuple[int, int]:
    """(trainable parameters, largest single layer) on the meta device."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_sizes() -> list[dict[str, object]]:
    """Every registered model: input size, patch, parameter counts, FLOP ratio."""
    rows = []
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name)
        rows.append({"name": name, "img_size": m.cfg.img_size, "patch_size": m.cfg.patch_size,
                     "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                     "encoder": sum(p.numel() for k, p in m.named_parameters() if is_encoder_key(k)),
                     "flop_ratio": encoder_speedup_flop_ratio(m.cfg)})
    return rows


def model_states_per_gpu(params: int, stage: int, gpus: int, dtype: str = "fp32") -> float:
    """fp32 weights, grads and AdamW moments, sharded per stage; ZeRO 1-3 also keep
    an fp32 master copy of each rank's partition apart from the model's own fp32
    weights (DeepSpeed's optimizer steps the copy, then writes the weights back);
    under bf16 autocast plus the 16-bit weight copies autocast keeps for the step
    (not sharded)."""
    weights, grads, adam = 4.0 * params, 4.0 * params, 8.0 * params
    master = 0.0 if stage == 0 else 4.0 * params  # stage 0: torch AdamW steps the weights themselves
    return _sharded(weights, grads, adam + master, stage, gpus) + (2.0 * params if dtype == "bf16" else 0.0)


def _sharded(weights: float, grads: float, optimizer: float, stage: int, gpus: int) -> float:
    if stage == 0:
        return weights + grads + optimizer
    if stage == 1:
        return weights + grads + optimizer / gpus
    if stage == 2:
        return weights + (grads + optimizer) / gpus
    return (weights + grads + optimizer) / gpus


def deepspeed_estimate(params: int, largest: int, stage: int, gpus_per_node: int, nodes: int) -> float | None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        return estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest, gpus_per_node, nodes, cpu_offload=False,
                                                     cpu_offload_params=False)[1]
    return None


def activation_bytes(cfg: MAEConfig, micro_batch: int, mask_ratio: float, dtype: str, checkpointing: bool) -> float:
    """Bytes autograd keeps for one micro-batch (encoder on visible tokens, decoder on all)."""
    per = BYTES_PER_TOKEN_DIM[dtype]
    enc_t = 1 + num_visible_patches(cfg.num_patches, mask_ratio)
    dec_t = 1 + cfg.num_patches
    enc_block, dec_block = enc_t * cfg.embed_dim, dec_t * cfg.decoder_embed_dim
    if checkpointing:  # fp32 block inputs, plus the largest block's activations during its recompute
        stored = 4 * (cfg.depth * enc_block + cfg.decoder_depth * dec_block) + per * max(enc_block, dec_block)
    else:
        stored = per * (cfg.depth * enc_block + cfg.decoder_depth * dec_block)
    head = 4 * (dec_t * cfg.patch_dim * 3)  # prediction, target, loss terms in fp32
    return micro_batch * (stored + head)


def plan(req: PlanRequest) -> dict:
    """Per ZeRO stage: model states, DeepSpeed's estimate, totals with and without
    activation checkpointing, and the largest micro-batch that fits."""
    params, largest = count_params(req.model, req.img_size)
    gpus = req.gpus * req.nodes
    with torch.device("meta"):
        cfg = create_model(req.model, img_size=req.img_size).cfg
    act = {ck: activation_bytes(cfg, req.micro_batch, req.mask_ratio, req.dtype, ck) for ck in (False, True)}
    per_sample = {ck: activation_bytes(cfg, 1, req.mask_ratio, req.dtype, ck) for ck in (False, True)}
    usable = 0.9 * req.gpu_mem_gib * GiB  # allocator fragmentation, CUDA context, buffers
    rows = []
    for stage in range(4):
        states = model_states_per_gpu(params, stage, gpus, req.dtype)
        ds = deepspeed_estimate(params, largest, stage, req.gpus, req.nodes)
        max_mb = {ck: int(max(0, usable - states) // per_sample[ck]) for ck in (False, True)}
        rows.append({"stage": stage, "model_states": states, "deepspeed": ds,
                     "total": {ck: states + act[ck] for ck in (False, True)}, "max_micro_batch": max_mb})
    return {"params": params, "largest_layer": largest, "gpus": gpus, "activations": act, "rows": rows,
            "usable": usable}
