"""DeepSpeed: process group, the generated JSON config, and the engine.

The DeepSpeed JSON is generated from the one run config; ``deepspeed.raw`` is
merged into it last (the escape hatch for keys we do not model). Mixed precision
is torch.autocast (bf16) of the forward, run by the engine (DeepSpeed's
``torch_autocast`` section), with fp32 master weights, gradients and AdamW states —
the paper's AMP recipe; ZeRO shards those states. Gradients are averaged across
ranks in fp32 too, unless ``deepspeed.grad_reduce_dtype=bf16``.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import os
import time
from collections.abc import KeysView
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from infra.net import free_port
from infra.redact import one_line
from infra.slurm.env import torch_env_from_slurm
from train.config import DeepSpeedConfig, RunConfig
from train.errors import ConfigError
from train.recipe import param_groups

log = logging.getLogger(__name__)
EXIT_GRACE_S = 0.2  # see shutdown_distributed


def init_distributed(ds: DeepSpeedConfig) -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the launcher's environment
    (deepspeed, torchrun, an srun task of a Slurm job), or a single process when
    there is none. Entry points destroy the group before their process ends
    (``shutdown_distributed``)."""
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


def shutdown_distributed(after_error: bool = False) -> None:
    """Destroy this process's group through DeepSpeed, which also drops the groups it
    cached (a later run in the same process would otherwise reuse dead ones).

    Every entry point calls it before its process ends: gloo's threads, left to die
    with the interpreter, may still hold tensors whose release then aborts the
    process (SIGABRT, "terminate called without an active exception"). After an
    error only a gloo group is destroyed: NCCL's destroy waits for this rank's
    pending collectives, which a failed peer never completes. A failure here is
    logged, never raised: the run's own outcome stands."""
    import torch.distributed as dist

    if not dist.is_initialized() or (after_error and dist.get_backend() != "gloo"):
        return
    import deepspeed.comm

    try:
        deepspeed.comm.destroy_process_group()
    except Exception as e:
        log.warning("destroying the process group failed (%s: %s)", type(e).__name__, e)
    gc.collect()
    # A group that DeepSpeed's engine referenced outlives the destroy (its threads
    # run on); a gloo worker may still be releasing the last collective's tensors,
    # which takes the GIL. Give it the GIL while the interpreter is alive.
    time.sleep(EXIT_GRACE_S)


def release_engine(engine: Any) -> None:
    """Remove what DeepSpeed hung on the model (ZeRO's gradient hooks hold their
    parameters in cycles through autograd that Python's GC cannot see, and each
    parameter names its process group), so that the model and the groups go with
    the loop, while the interpreter is alive, not during its finalization."""
    if engine is not None and hasattr(engine, "destroy"):
        try:
            engine.destroy()
        except Exception as e:  # the run's outcome stands; this only frees memory sooner
            log.warning("releasing the DeepSpeed engine failed (%s: %s)", type(e).__name__, e)


def all_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` (small picklable objects between our own processes),
    in rank order; a collective, so also a barrier."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def raise_first(error: Exception | None) -> None:
    """Every rank raises the first error any rank hit (in rank order), or none does:
    ranks go on or stop together, all with the same message, and no rank is left
    waiting in a collective for one that raised alone."""
    first = next((e for e in all_ranks(error) if e is not None), None)
    if first is not None:
        raise first


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
        # It also tags the Linear and Conv weights to have their gradients reduced in
        # bf16; an empty list of such modules keeps every reduction in fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                    **({} if ds.grad_reduce_dtype == "bf16" else {"lower_precision_safe_modules": []})}
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


def build_engine(cfg: RunConfig, model: nn.Module, lr: float, optimizer: torch.optim.Optimizer | None = None):
    """The DeepSpeed engine over ``model``: the pretraining AdamW groups, or the
    client ``optimizer`` given (fine-tuning's layer-decayed AdamW, the probe's LARS)."""
    import deepspeed

    if optimizer is None:
        optimizer = adamw(cfg, param_groups(model, cfg.optim.weight_decay), lr)
    config = deepspeed_json(cfg)
    try:
        if cfg.deepspeed.raw:
            refuse_unread_raw_keys(config, cfg.deepspeed.raw)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    except Exception as e:
        if not cfg.deepspeed.raw or not _refused_config(e):
            raise
        said = one_line("\n".join(str(e).splitlines()[:3]))  # pydantic names the field on its 2nd line
        raise ConfigError(f"deepspeed.raw: DeepSpeed refused the config it was merged into ({type(e).__name__}: "
                          f"{said[:300]}); fix or remove the raw key") from None
    return engine


class _ReadKeys(dict):
    """A config mapping that notes each top-level key looked up (by ``[]``, ``get``,
    ``in``, or ``in`` on its ``keys()``); iterating it reads no key."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def keys(self) -> KeysView:  # type: ignore[override]
        return KeysView(self)  # its ``in`` asks this mapping's


def refuse_unread_raw_keys(config: dict[str, Any], raw: dict[str, Any]) -> None:
    """A top-level ``deepspeed.raw`` key that DeepSpeed's config parser never looks
    up (a typo: ``gradient_clipings``) would be ignored without a word; it is a
    ``ConfigError`` naming it and the nearest key DeepSpeed reads. The sections
    DeepSpeed validates refuse their own unknown keys."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig as Parsed

    seen = _ReadKeys(config)
    Parsed(seen)
    # deepspeed.initialize reads these itself; the engine gets the plain dict, which
    # its checkpoints pickle (a class of ours there would fail weights_only loading)
    seen.read.update(("data_parallel_size", "sequence_parallel_size"))
    unread = [k for k in raw if k not in seen.read]
    if unread:
        near = difflib.get_close_matches(unread[0], sorted(k for k in seen.read if isinstance(k, str)), n=1)
        raise ConfigError(f"deepspeed.raw: DeepSpeed {deepspeed.__version__} reads no key {unread[0]!r}"
                          + (f" (did you mean {near[0]!r}?)" if near else "") + "; fix or remove it")


def _refused_config(e: Exception) -> bool:
    """DeepSpeed's ways of refusing a config: its own error, pydantic's validation of
    a section, ZeRO's checks of the keys it reads."""
    from deepspeed.runtime.config import DeepSpeedConfigError
    from deepspeed.runtime.zero.utils import ZeRORuntimeException
    from pydantic import ValidationError

    return isinstance(e, (DeepSpeedConfigError, ZeRORuntimeException, ValidationError))


def adamw(cfg: RunConfig, groups: list[dict], lr: float) -> torch.optim.AdamW:
    """torch AdamW with the config's betas; fused on a GPU unless ZeRO offloads it."""
    fused = torch.cuda.is_available() and not cfg.deepspeed.offload_optimizer
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, fused=fused or None)


def set_lr(engine, lr: float) -> None:
    """The schedule's lr on every group, times the group's ``lr_scale`` where it has
    one (layer-wise lr decay)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def module_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's whole module state dict, floats in fp32, on the CPU (ZeRO-3
    parameters gathered first: call it on every rank)."""
    module = engine.module
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (an all-reduce on ``device``,
    which NCCL needs to be the GPU)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


@dataclass(frozen=True)
class Agreement:
    """What every rank knows after a micro-step's all-reduce."""

    mean_loss: float
    skip: str | None  # why every rank skips this micro-batch's update; None: none does
    stopping: bool  # some rank got a stop signal


def agree_across_ranks(loss: torch.Tensor, stop: bool, world: int, images: int, step: int,
                       micro: int) -> Agreement:
    """One all-reduce per micro-step, so every rank skips, saves and stops at the same
    step. A rank whose micro-batch held only corrupt samples (``images`` 0: its loss is
    NaN) makes every rank skip it, as a non-finite loss does."""
    import torch.distributed as dist

    value = loss.detach().float()
    device = value.device
    flags = torch.stack([value, (~torch.isfinite(value)).float(), torch.tensor(float(stop), device=device),
                         torch.tensor(float(images == 0), device=device)])
    if world > 1:
        dist.all_reduce(flags)
    skip = None
    if flags[3].item() > 0:
        skip = (f"{int(flags[3].item())} rank(s) had a micro-batch of only corrupt samples at step {step} "
                f"(micro-step {micro}): update skipped")
    elif flags[1].item() > 0:
        skip = f"non-finite loss at step {step} (micro-step {micro}): update skipped"
    return Agreement(flags[0].item() / world, skip, flags[2].item() > 0)
