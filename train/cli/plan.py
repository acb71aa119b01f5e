"""`mae plan`: model-state and activation memory per GPU for each ZeRO stage."""

from __future__ import annotations

import argparse

from model.registry import list_models
from train.cli.common import MAX_IMG_SIZE, check_model, number, whole

MAX_COUNT = 2**24  # GPUs per node, nodes, micro-batch: far past any real run
MAX_GPU_MEM_GIB = 2**20  # 1 PiB per GPU


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mae_vit_huge_patch14", choices=list_models())
    p.add_argument("--gpus", type=whole(1, MAX_COUNT), default=8, help="GPUs per node")
    p.add_argument("--nodes", type=whole(1, MAX_COUNT), default=1)
    p.add_argument("--micro-batch", type=whole(1, MAX_COUNT), default=32)
    p.add_argument("--gpu-mem", type=number(0, MAX_GPU_MEM_GIB, open_lo=True), default=80.0,
                   help=f"GiB per GPU, in (0, {MAX_GPU_MEM_GIB}]")
    p.add_argument("--img-size", type=whole(1, MAX_IMG_SIZE), default=224,
                   help=f"a multiple of the model's patch size, at most {MAX_IMG_SIZE}")
    p.add_argument("--mask-ratio", type=number(0, 1, open_lo=True, open_hi=True), default=0.75)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")


def run(args: argparse.Namespace) -> int:
    from train.memory_plan import GiB, PlanRequest, plan

    check_model(args.model, args.img_size)
    r = plan(PlanRequest(model=args.model, gpus=args.gpus, nodes=args.nodes, micro_batch=args.micro_batch,
                         gpu_mem_gib=args.gpu_mem, img_size=args.img_size, mask_ratio=args.mask_ratio,
                         dtype=args.dtype))
    print(f"{args.model}: {r['params'] / 1e6:.2f}M trainable parameters (largest layer {r['largest_layer'] / 1e6:.2f}M), "
          f"{r['gpus']} GPUs ({args.nodes} node(s) x {args.gpus}), micro-batch {args.micro_batch}, {args.dtype}, "
          f"{args.gpu_mem:.4g} GiB/GPU (plan for {r['usable'] / GiB:.4g} usable)")
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
        print("-> nothing fits without checkpointing; " + _advice(r))
    return 0


def _advice(r: dict) -> str:
    """What to change when no stage fits the micro-batch without checkpointing."""
    from train.memory_plan import GiB

    ck = next((row["stage"] for row in r["rows"] if row["total"][True] <= r["usable"]), None)
    if ck is not None:
        return f"stage {ck} with model.grad_checkpointing=true"
    smallest = min(r["rows"], key=lambda row: row["model_states"])
    if smallest["model_states"] > r["usable"]:  # no micro-batch can help
        return (f"the model states alone need {smallest['model_states'] / GiB:.3g} GiB per GPU at stage "
                f"{smallest['stage']}, more than the {r['usable'] / GiB:.3g} usable: add GPUs (stage 3 divides them) "
                "or offload (deepspeed.offload_optimizer=true, deepspeed.offload_params=true)")
    return "lower the micro-batch (raise accumulation) or add GPUs"
