"""The speedup MAE's visible-only encoder buys, measured (`mae bench encoder`, and
the trainer's ``mae_encoder_speedup_ratio`` at start-up).

Times full training steps (forward, backward, AdamW step) of MAE and of the
mask-token baseline ("encoder w/ [M]", the paper's Table 2) on the same weights,
batch, dtype and device, interleaved A B A B ... after warm-up so drift (thermal,
other load) hits both alike. Reports median and spread, the measured ratio next
to the analytic FLOP ratio, memory, images/sec and MFU where the card's peak is
known.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from infra.options import require, require_choice
from model.flops import encoder_speedup_flop_ratio, train_step_flops
from model.mae import MaskedAutoencoderViT
from model.registry import create_model, list_models

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_SCOPES = ("", "blocks", "model")
# Dense bf16 tensor-core peak (FLOP/s) by device-name substring, for MFU.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass(frozen=True)
class SpeedupConfig:
    model: str = "mae_vit_base_patch16"
    batch: int = 8
    steps: int = 10
    warmup: int = 3
    dtype: str = "bf16"
    device: str = "auto"
    compile: str = ""  # "": eager; "blocks": each transformer block compiled once per stack; "model": whole
    mask_ratio: float = 0.75
    grad_checkpointing: bool = False
    seed: int = 0
    peak_flops: float | None = None
    img_size: int | None = None  # None: the model's own
    breakdown: bool = False  # profile one more step of each: time per op family

    def __post_init__(self) -> None:
        require_choice(self, "model", list_models())
        require_choice(self, "dtype", tuple(DTYPES))
        require_choice(self, "compile", COMPILE_SCOPES)
        for name in ("batch", "steps"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")


@dataclass
class VariantResult:
    name: str
    step_times_s: list[float]
    median_s: float
    p25_s: float
    p75_s: float
    images_per_s: float
    train_flops_per_step: float
    achieved_flops: float
    mfu: float | None
    first_step_s: float  # the first step run (compiling, when compiled)
    activation_bytes: int  # tensors saved for backward in one step
    peak_memory_bytes: int | None  # device allocator peak during timed steps (CUDA only)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def peak_flops_for(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model: MaskedAutoencoderViT, cfg: SpeedupConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One full training step: forward, backward, AdamW update."""
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    forward = compiled(model, cfg.compile)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if cfg.dtype == "bf16" else nullcontext())

    def step(imgs: torch.Tensor, noise: torch.Tensor) -> None:
        with autocast:
            loss, _, _ = forward(imgs, cfg.mask_ratio, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compiled(model: MaskedAutoencoderViT, scope: str) -> Callable[..., Any]:
    """``model``'s forward under ``torch.compile``: ``"model"`` traces it whole;
    ``"blocks"`` compiles each transformer block in place (regional compilation).
    The blocks of one stack share their code and shapes, so the encoder's compile
    once and the decoder's once, whatever the depth (whole-model compile traces
    every block). Each token count gets its own static graph (MAE's encoder, the
    baseline's, the decoder), never a dynamic-shape one. Patch embedding, masking
    and the loss stay eager. ``""``: eager."""
    if scope == "model":
        return torch.compile(model)
    if scope == "blocks":
        for block in (*model.blocks, *model.decoder_blocks):
            block.compile(dynamic=False)
    return model


def saved_activation_bytes(step: Callable[[torch.Tensor, torch.Tensor], None], imgs: torch.Tensor,
                           noise: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of distinct storages autograd saves for backward during one step,
    parameters excluded (a Linear saves its weight too; that is not activation)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(imgs, noise)
    return sum(seen.values())


# Op families of a training step, by the name of the op that ran the work (first
# match wins); the rest is elementwise work, copies and reductions.
OP_FAMILIES = (
    ("attention", ("attention",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "conv")),
    ("layer_norm", ("layer_norm",)),
    ("optimizer", ("adam", "_foreach")),
    ("masking", ("sort", "gather", "scatter")),
)


def op_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, keys in OP_FAMILIES if any(k in lowered for k in keys)), "other")


def _inside_optimizer_step(event) -> bool:
    """Whether the optimizer's step ran this op (an unfused AdamW is plain mul_,
    lerp_, sqrt ... under the profiler's ``Optimizer.step#AdamW.step`` range)."""
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def step_breakdown(step: Callable[[torch.Tensor, torch.Tensor], None], imgs: torch.Tensor, noise: torch.Tensor,
                   device: torch.device) -> dict[str, dict[str, float]]:
    """One profiled step by op family: milliseconds (the GPU time of the kernels each
    op launched itself; on a CPU, each op's own CPU time) and the FLOPs torch's
    profiler counts (matrix products and convolutions forward; attention and a
    convolution's backward are not counted). Where the step's time goes, and how
    fast each family runs, to say why a step falls short of its FLOP share."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_flops=True):  # a process's first profile is slow (its set-up)
        torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    _synchronize(device)
    with profile(activities=activities, with_flops=True) as prof:
        step(imgs, noise)
        _synchronize(device)
    out = {family: {"ms": 0.0, "gflop": 0.0} for family in [*(f for f, _ in OP_FAMILIES), "other"]}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels count through the op that launched them
        family = out["optimizer" if _inside_optimizer_step(event) else op_family(event.name)]
        family["ms"] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        family["gflop"] += (event.flops or 0) / 1e9
    return out


def measure_speedup(cfg: SpeedupConfig) -> dict[str, object]:
    """Run the interleaved benchmark and return a JSON-ready report."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    size = {"img_size": cfg.img_size} if cfg.img_size else {}
    mae = create_model(cfg.model, **size)
    baseline = create_model(cfg.model, baseline=True, **size)
    baseline.load_state_dict(mae.state_dict(), strict=False)  # same weights; baseline adds its mask token
    variants, models = {}, {"mae": mae, "mask_token_baseline": baseline}
    for name, model in models.items():
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        variants[name] = _make_step(model.to(device).train(), cfg, device)

    mcfg = mae.cfg
    imgs = torch.randn(cfg.batch, mcfg.in_chans, mcfg.img_size, mcfg.img_size, device=device)
    noise_gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, float] = {}
    peaks: dict[str, int] = {name: 0 for name in variants}
    for i in range(cfg.warmup + cfg.steps):
        for name, step in variants.items():  # interleaved: A B A B ...
            noise = torch.rand(cfg.batch, mcfg.num_patches, generator=noise_gen).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            t0 = time.perf_counter()
            step(imgs, noise)
            _synchronize(device)
            elapsed = time.perf_counter() - t0
            if i == 0:
                first[name] = elapsed
            if i >= cfg.warmup:
                times[name].append(elapsed)
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))

    noise = torch.rand(cfg.batch, mcfg.num_patches, generator=noise_gen).to(device)
    peak = peak_flops_for(device, cfg.peak_flops)
    results = {}
    for name, step in variants.items():
        flops = train_step_flops(mcfg, cfg.batch, cfg.mask_ratio, baseline=name != "mae")
        median = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [median] * 3
        results[name] = VariantResult(
            name=name, step_times_s=times[name], median_s=median, p25_s=q[0], p75_s=q[2],
            images_per_s=cfg.batch / median, train_flops_per_step=flops, achieved_flops=flops / median,
            mfu=(flops / median / peak) if peak else None, first_step_s=first[name],
            activation_bytes=saved_activation_bytes(step, imgs, noise, models[name]),
            peak_memory_bytes=peaks[name] if device.type == "cuda" else None,
        )
    breakdown = {name: step_breakdown(step, imgs, noise, device) for name, step in variants.items()} \
        if cfg.breakdown else None
    return {
        "config": asdict(cfg),
        "breakdown": breakdown,
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": {k: asdict(v) for k, v in results.items()},
        "measured_speedup": results["mask_token_baseline"].median_s / results["mae"].median_s,
        "flop_ratio": encoder_speedup_flop_ratio(mcfg, cfg.mask_ratio),
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_report(report: dict[str, object]) -> str:
    cfg = report["config"]
    lines = [
        f"mae bench encoder: {cfg['model']} batch={cfg['batch']} dtype={cfg['dtype']} "
        f"compile={cfg['compile'] or 'no'} "
        f"device={report['device']} threads={report['threads']} steps={cfg['steps']} (+{cfg['warmup']} warm-up)",
        f"{'variant':<22}{'median ms':>11}{'p25-p75 ms':>17}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'saved act MiB':>15}"
        f"{'peak MiB':>10}{'first step s':>14}",
    ]
    for r in report["results"].values():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] is not None else "-"
        lines.append(
            f"{r['name']:<22}{r['median_s'] * 1e3:>11.1f}{r['p25_s'] * 1e3:>8.1f}-{r['p75_s'] * 1e3:<8.1f}"
            f"{r['images_per_s']:>9.1f}{r['achieved_flops'] / 1e12:>9.2f}{mfu:>7}"
            f"{r['activation_bytes'] / 2**20:>15.1f}{peak:>10}{r['first_step_s']:>14.2f}"
        )
    lines.append(f"measured speedup (baseline / MAE step time): {report['measured_speedup']:.2f}x   "
                 f"analytic FLOP ratio: {report['flop_ratio']:.2f}x")
    if report.get("breakdown"):
        mae, base = report["breakdown"]["mae"], report["breakdown"]["mask_token_baseline"]
        where = "GPU time of the kernels each op launched" if report["device"] != "cpu" else "CPU time of each op"
        lines.append(f"one profiled step by op family ({where}; TFLOP/s where the profiler counts FLOPs):")
        lines.append(f"  {'family':<12}{'MAE ms':>9}{'baseline ms':>13}{'baseline/MAE':>14}{'MAE TFLOP/s':>13}"
                     f"{'baseline TFLOP/s':>18}")
        for family in [*mae, "total"]:
            m, b = ({k: sum(f[k] for f in side.values()) for k in ("ms", "gflop")} if family == "total"
                    else side[family] for side in (mae, base))
            ratio = f"{b['ms'] / m['ms']:.2f}x" if m["ms"] > 0 else "-"
            rates = [f"{f['gflop'] / f['ms']:.2f}" if f["gflop"] and f["ms"] > 0 else "-" for f in (m, b)]
            lines.append(f"  {family:<12}{m['ms']:>9.2f}{b['ms']:>13.2f}{ratio:>14}{rates[0]:>13}{rates[1]:>18}")
    return "\n".join(lines)
