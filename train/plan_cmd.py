"""`mae plan`: will this model, stage and micro-batch fit a GPU?

Model states per GPU for each ZeRO stage, counted for this trainer's recipe
(bf16 autocast over fp32 master weights: 4 B weights + 4 B grads + 8 B AdamW per
parameter, the part a stage shards divided by the GPU count, plus 2 B of autocast
weight copies), next to DeepSpeed's own estimators (which assume 16-bit weights);
parameters counted on a meta-device model. Activations per GPU from the tensors
autograd keeps per block (36 bytes per token x width under bf16 autocast, 64 in
fp32 — checked against what autograd really saves; checkpointing keeps only each
block's fp32 input plus one block's activations during recompute). Transient
buffers of the backward pass and allocator fragmentation are not modelled: plan
against 90% of the card and confirm with a short run (infra/gpu_check.sh).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model.mae import MAEConfig, num_visible_patches
from model.registry import create_model, list_models

GiB = 2**30
BYTES_PER_TOKEN_DIM = {"bf16": 36, "fp32": 64}


@dataclass(frozen=True)
class StageEstimate:
    stage: int
    model_states_bytes: float
    deepspeed_estimate_bytes: float | None


def count_params(name: str, img_size: int) -> tuple[int, int]:
    """(trainable parameters, largest single layer) on the meta device."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_states_per_gpu(params: int, stage: int, gpus: int, dtype: str = "fp32") -> float:
    """fp32 weights, grads and AdamW moments, sharded per stage; under bf16 autocast
    plus the 16-bit weight copies autocast keeps for the step (not sharded)."""
    weights, grads, adam = 4.0 * params, 4.0 * params, 8.0 * params
    return _sharded(weights, grads, adam, stage, gpus) + (2.0 * params if dtype == "bf16" else 0.0)


def _sharded(weights: float, grads: float, adam: float, stage: int, gpus: int) -> float:
    if stage == 0:
        return weights + grads + adam
    if stage == 1:
        return weights + grads + adam / gpus
    if stage == 2:
        return weights + (grads + adam) / gpus
    return (weights + grads + adam) / gpus


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_huge_patch14", choices=list_models())
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dtype", choices=sorted(BYTES_PER_TOKEN_DIM), default="bf16")


def plan(args: argparse.Namespace) -> dict:
    params, largest = count_params(args.model, args.img_size)
    gpus = args.gpus * args.nodes
    with torch.device("meta"):
        cfg = create_model(args.model, img_size=args.img_size).cfg
    act = {ck: activation_bytes(cfg, args.micro_batch, args.mask_ratio, args.dtype, ck) for ck in (False, True)}
    per_sample = {ck: activation_bytes(cfg, 1, args.mask_ratio, args.dtype, ck) for ck in (False, True)}
    usable = 0.9 * args.gpu_mem * GiB  # allocator fragmentation, CUDA context, buffers
    rows = []
    for stage in range(4):
        states = model_states_per_gpu(params, stage, gpus, args.dtype)
        ds = deepspeed_estimate(params, largest, stage, args.gpus, args.nodes)
        max_mb = {ck: int(max(0, usable - states) // per_sample[ck]) for ck in (False, True)}
        rows.append({"stage": stage, "model_states": states, "deepspeed": ds,
                     "total": {ck: states + act[ck] for ck in (False, True)}, "max_micro_batch": max_mb})
    return {"params": params, "largest_layer": largest, "gpus": gpus, "activations": act, "rows": rows,
            "usable": usable}


def run(args: argparse.Namespace) -> int:
    r = plan(args)
    print(f"{args.model}: {r['params'] / 1e6:.2f}M trainable parameters (largest layer {r['largest_layer'] / 1e6:.2f}M), "
          f"{r['gpus']} GPUs ({args.nodes} node(s) x {args.gpus}), micro-batch {args.micro_batch}, {args.dtype}, "
          f"{args.gpu_mem:.0f} GiB/GPU (plan for {r['usable'] / GiB:.0f} usable)")
    print(f"activations per GPU: {r['activations'][False] / GiB:.1f} GiB, with activation checkpointing "
          f"{r['activations'][True] / GiB:.1f} GiB")
    print(f"{'stage':<7}{'states GiB':>11}{'DeepSpeed est.':>16}{'total GiB':>11}{'w/ ckpt':>9}{'fits':>6}"
          f"{'max micro-batch':>17}{'w/ ckpt':>9}")
    best = None
    for row in r["rows"]:
        fits = row["total"][False] <= r["usable"]
        ds = f"{row['deepspeed'] / GiB:.1f}" if row["deepspeed"] is not None else "-"
        print(f"{row['stage']:<7}{row['model_states'] / GiB:>11.1f}{ds:>16}{row['total'][False] / GiB:>11.1f}"
              f"{row['total'][True] / GiB:>9.1f}{'yes' if fits else 'no':>6}"
              f"{row['max_micro_batch'][False]:>17}{row['max_micro_batch'][True]:>9}")
        if fits and best is None:
            best = row["stage"]
    if best is not None:
        print(f"-> ZeRO stage {best} fits micro-batch {args.micro_batch} without activation checkpointing "
              "(lowest stage = least communication)")
    else:
        ck = next((row["stage"] for row in r["rows"] if row["total"][True] <= r["usable"]), None)
        print("-> nothing fits without checkpointing; " + (f"stage {ck} with model.grad_checkpointing=true" if ck is not None
              else "lower the micro-batch (raise accumulation) or add GPUs"))
    return 0
