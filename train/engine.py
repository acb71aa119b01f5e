"""DeepSpeed: process group, the generated JSON config, and the engine.

The DeepSpeed JSON is generated from the one run config; ``deepspeed.raw`` is
merged into it last (the escape hatch for keys we do not model). Mixed precision
is torch.autocast (bf16) of the forward, run by the engine (DeepSpeed's
``torch_autocast`` section), with fp32 master weights, gradients and AdamW states —
the paper's AMP recipe; ZeRO shards those states.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from infra.net import free_port
from infra.slurm.env import torch_env_from_slurm
from train.config import DeepSpeedConfig, RunConfig
from train.recipe import param_groups

log = logging.getLogger(__name__)


def init_distributed(ds: DeepSpeedConfig) -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the launcher's environment
    (deepspeed, torchrun, an srun task of a Slurm job), or a single process when
    there is none."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("the trainer needs DeepSpeed: pip install 'maescale[deepspeed]'") from e
    if "RANK" not in os.environ:  # an srun task: Slurm's variables say who it is
        os.environ.update(torch_env_from_slurm(os.environ))
    if "RANK" not in os.environ:  # plain `python -m train.pretrain` / `mae pretrain`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu" and not ds.cpu_shm_allreduce:
        # DeepSpeed JIT-compiles a shared-memory allreduce for CPU runs at init (minutes
        # cold). gloo's allreduce is correct and enough for CPU runs; opt in with
        # deepspeed.cpu_shm_allreduce=true.
        builder = accel.create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def deepspeed_json(cfg: RunConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True,
                    reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accum_steps,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # client torch AdamW
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        # torch.autocast around engine(...) is switched off inside the engine unless
        # DeepSpeed's own torch_autocast section enables it (it then autocasts the
        # forward itself): without this, "bf16" runs silently trained in fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.optim.grad_clip:
        config["gradient_clipping"] = cfg.optim.grad_clip
    if ds.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # keep our torch AdamW (param groups, per-step lr)
    return _merge(config, ds.raw)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_engine(cfg: RunConfig, model: nn.Module, lr: float):
    import deepspeed

    fused = torch.cuda.is_available() and not cfg.deepspeed.offload_optimizer
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=cfg.optim.betas,
                                  fused=fused or None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_json(cfg))
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
