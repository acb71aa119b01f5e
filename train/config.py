"""Run configuration: one dataclass per component, composed into ``RunConfig``.

Loaded from YAML (a preset shipped with the package, or a file) plus ``a.b=c``
overrides; unknown keys are errors that name the key. Derived values (global
batch, effective lr, steps per epoch) are computed by ``derived()`` and logged,
never written back into the config.
"""

from __future__ import annotations

import dataclasses
import inspect
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.registry import list_models

PRESETS_DIR = Path(__file__).with_name("configs")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class DataConfig:
    url: str = "shards"  # dataset folder or URL with manifest.json
    backend: str = "cpu"  # cpu | dali | ffcv (ffcv reads a .beton dataset: mae shard --format beton)
    dali_crop: str = "plan"  # dali: crops from the sample plan (= cpu's) or 'random' (DALI's own RNG)
    hw_decoder_load: float = 0.65  # dali on A100/H100: share of JPEGs for the hardware decoder
    micro_batch: int = 64  # per process (GPU) per micro-step
    num_workers: int = 8  # cpu: DataLoader worker processes; dali: decode threads; ffcv: numba threads
    img_size: int = 224  # input side after RandomResizedCrop
    seed: int = 0  # sample plan order and per-sample augmentation
    window_shards: int = 4  # shards mixed by the per-epoch window permutation (docs/DATA.md)
    uneven: str = "pad"  # samples % world != 0: 'pad' (repeat a few) or 'drop' the tail
    cache_dir: str | None = None  # local shard cache (default ~/.cache/maescale/shards, or $MAESCALE_CACHE)
    cache_limit_gb: float = 20.0  # LRU limit of the shard cache per node
    endpoint_url: str | None = None  # S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)
    max_corrupt_fraction: float = 0.01  # of a rank's epoch; more corrupt samples stop the run

    def __post_init__(self) -> None:
        _positive(self, "micro_batch", "img_size", "window_shards", "cache_limit_gb")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.backend not in ("cpu", "dali", "ffcv", "synthetic"):
            raise ConfigError(f"data.backend must be cpu, dali or ffcv, got {self.backend!r}")
        if self.dali_crop not in ("plan", "random"):
            raise ConfigError(f"data.dali_crop must be 'plan' or 'random', got {self.dali_crop!r}")


@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"  # registered model (mae models)
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    norm_pix_loss: bool = True  # regress per-patch normalized pixels (the paper's best)
    grad_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile the model

    def __post_init__(self) -> None:
        if self.name not in list_models():
            raise ConfigError(f"model.name {self.name!r} is not registered; valid: {', '.join(list_models())}")
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * global_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.05  # AdamW; not on biases, norms and tokens
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (the paper: 0.9, 0.95)
    grad_clip: float | None = None  # off, as in the paper
    accum_steps: int = 1  # micro-steps per optimizer step

    def __post_init__(self) -> None:
        _positive(self, "blr", "accum_steps")
        self.betas = tuple(self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    epochs: float = 800  # total epochs (the paper: 800 or 1600)
    warmup_epochs: float = 40  # linear lr warmup, then half-cycle cosine
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)

    def __post_init__(self) -> None:
        _positive(self, "epochs")
        if self.warmup_epochs < 0:
            raise ConfigError("schedule.warmup_epochs must be >= 0")


@dataclass
class DeepSpeedConfig:
    stage: int = 2  # ZeRO stage 0-3
    precision: str = "bf16"  # bf16 | fp32 (fp16 MAE is known to NaN)
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer states in CPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory
    cpu_shm_allreduce: bool = False  # DeepSpeed's JIT-built shm allreduce on CPU (slow first build)
    raw: dict[str, Any] = field(default_factory=dict)  # escape hatch: merged into the generated JSON last

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"deepspeed.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.offload_params and self.stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.stage=3")
        if self.offload_optimizer and self.stage < 2:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.stage >= 2")


@dataclass
class CheckpointConfig:
    dir: str = "runs/mae"  # where checkpoints, latest and run_summary.json go (shared storage on clusters)
    every_steps: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3  # complete checkpoints kept
    enabled: bool = True  # false: never save (benchmarks)
    resume: bool = True  # resume from the latest complete checkpoint in dir, if any

    def __post_init__(self) -> None:
        _positive(self, "every_steps", "keep_last")


@dataclass
class FaultConfig:
    max_nonfinite_in_row: int = 5  # consecutive non-finite losses before the run stops
    inject_nonfinite_at: tuple[int, ...] = ()  # drill: make these micro-steps' loss non-finite (0-based, this process)


@dataclass
class LogConfig:
    every_steps: int = 10  # optimizer steps between log lines
    metrics_file: str | None = None  # JSON lines of per-step metrics (loss, lr, images/s, data wait)


@dataclass
class MetricsConfig:
    enabled: bool = False  # a Prometheus endpoint per rank at bind:port_base + local_rank
    port_base: int = 9400  # rank's port = port_base + local_rank
    bind: str = "127.0.0.1"  # 0.0.0.0 to be scraped from other hosts
    multiproc_dir: str | None = None  # prometheus_client multiprocess files (default: a temp dir)
    file_sd_dir: str | None = None  # local rank 0 writes a Prometheus file_sd target file here
    linger_s: float = 0.0  # keep the endpoint up this long after training (short runs: last scrape)
    measure_speedup: bool | None = None  # time MAE vs the mask-token baseline at start (None: on a GPU)
    speedup_steps: int = 3  # timed steps per side for measure_speedup

    def __post_init__(self) -> None:
        if not 1 <= self.port_base <= 65535:
            raise ConfigError(f"metrics.port_base must be a TCP port, got {self.port_base}")
        if self.speedup_steps < 1:
            raise ConfigError("metrics.speedup_steps must be >= 1")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    seed: int = 0  # model init and mask noise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the model and what shapes the
        optimizer state (not lr, schedule or data, which may change on resume)."""
        key = {"model": self.model.name, "norm_pix_loss": self.model.norm_pix_loss, "img_size": self.data.img_size,
               "stage": self.deepspeed.stage, "precision": self.deepspeed.precision,
               "offload": [self.deepspeed.offload_optimizer, self.deepspeed.offload_params]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Derived:
    world_size: int
    global_batch: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def derived(cfg: RunConfig, world_size: int, micro_batches_per_epoch: int) -> Derived:
    """Values computed from the config and the run's world/data; never stored back."""
    global_batch = cfg.data.micro_batch * cfg.optim.accum_steps * world_size
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * global_batch / 256
    steps_per_epoch = max(1, micro_batches_per_epoch // cfg.optim.accum_steps)
    total = cfg.schedule.max_steps or int(cfg.schedule.epochs * steps_per_epoch)
    warmup = int(cfg.schedule.warmup_epochs * steps_per_epoch)
    return Derived(world_size, global_batch, lr, steps_per_epoch, total, min(warmup, total))


# ------------------------------------------------------------- loading
def _positive(obj: object, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {getattr(obj, name)}")


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{path}.{name}" if path else name)
        else:
            kwargs[name] = _coerce(value, hint, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's type; ints become floats where asked."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        base = typing.get_origin(opt) or opt
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict) and isinstance(value, base):
            return value
        if base in (tuple, list) and isinstance(value, (list, tuple)):
            return tuple(value)
        if opt is Any:
            return value
    raise ConfigError(f"{key} = {value!r} does not fit type {hint}")


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A preset name (see ``list_presets``) or a YAML path, then ``a.b=c`` overrides."""
    tree: dict[str, Any] = {}
    if source:
        path = Path(source)
        if not path.exists() and (PRESETS_DIR / f"{source}.yaml").exists():
            path = PRESETS_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"config {source!r} is neither a file nor a preset ({', '.join(list_presets())})")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: bad value ({e})") from e
        _set_path(tree, key.strip(), value)
    return _build(RunConfig, tree, "")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def reference_table() -> str:
    """Every config key with its type, default and the comment beside its field,
    as Markdown (the README's configuration reference is this table)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            type_name = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
            note = notes.get(f.name, "").replace("|", "/")
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{json.dumps(default)}` | {note} |")

    walk(RunConfig, "")
    return "\n".join(rows)


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass: name -> comment."""
    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes
