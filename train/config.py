"""Run configuration: one dataclass per component, composed into ``RunConfig``.

``data`` is the pipeline's own ``LoaderConfig`` (not a copy), so every pipeline
option is a key here. Loaded from YAML (a preset shipped with the package, or a
file) plus ``a.b=c`` overrides; unknown keys and out-of-range values are errors
that name the key. Each field documents itself (``infra.options``). Derived
values (global batch, effective lr, steps per epoch) are computed by
``train.recipe.derived`` and logged, never written back into the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infra.options import (OptionError, doc_of, option, require, require_choice, require_non_negative,
                           require_positive, require_positive_or_none, require_text)
from infra.redact import redact
from infra.tracking import TrackingConfig
from model.spec import num_visible_patches
from model.registry import list_models, model_config
from pipeline.loader import LoaderConfig
from train.errors import ConfigError

PRESETS_DIR = Path(__file__).with_name("configs")
MAX_PAUSE_S = 86_400  # a pause the run is told to take (a drill, the endpoint's linger): a day at most


@dataclass
class ModelConfig:
    name: str = option("mae_vit_base_patch16", "registered model (mae models)")
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder")
    norm_pix_loss: bool = option(True, "regress per-patch normalized pixels (the paper's best)")
    grad_checkpointing: bool = option(False, "recompute each block in backward: less memory, ~30% more compute")
    compile: bool = option(False, "torch.compile the model")

    def __post_init__(self) -> None:
        require_choice(self, "name", list_models())
        require(0 < self.mask_ratio < 1, "mask_ratio", f"must be in (0, 1) (0 masks nothing: no loss), "
                                                        f"got {self.mask_ratio}")


@dataclass
class OptimConfig:
    blr: float = option(1.5e-4, "base lr; lr = blr * global_batch / 256")
    lr: float | None = option(None, "absolute lr; overrides blr when set")
    min_lr: float = option(0.0, "floor of the cosine decay")
    weight_decay: float = option(0.05, "AdamW; not on 1-D parameters (biases, norms), nor in fine-tuning on the cls "
                                               "token and position embedding (as the official MAE)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas (the paper: 0.9, 0.95)")
    grad_clip: float | None = option(None, "off, as in the paper")
    accum_steps: int = option(1, "micro-steps per optimizer step")

    def __post_init__(self) -> None:
        require_positive(self, "blr", "accum_steps")
        require_positive_or_none(self, "lr", "grad_clip")
        require_non_negative(self, "min_lr", "weight_decay")
        self.betas = tuple(self.betas)  # YAML gives a list
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    epochs: float = option(800, "total epochs (the paper: 800 or 1600)")
    warmup_epochs: float = option(40, "linear lr warmup, then half-cycle cosine")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")

    def __post_init__(self) -> None:
        require_positive(self, "epochs")
        require_non_negative(self, "warmup_epochs")
        require_positive_or_none(self, "max_steps")


@dataclass
class DeepSpeedConfig:
    stage: int = option(2, "ZeRO stage 0-3")
    precision: str = option("bf16", "bf16 | fp32 (fp16 MAE is known to NaN)")
    grad_reduce_dtype: str = option("fp32", "bf16 runs: the dtype gradients are averaged across ranks in. fp32 as "
                                            "the paper's DDP; bf16 halves that traffic (Linear/Conv weights' "
                                            "gradients, DeepSpeed's autocast default) for bandwidth-bound nodes")
    offload_optimizer: bool = option(False, "ZeRO-2/3: optimizer states in CPU memory")
    offload_params: bool = option(False, "ZeRO-3: parameters in CPU memory")
    cpu_shm_allreduce: bool = option(False, "DeepSpeed's JIT-built shm allreduce on CPU (slow first build)")
    raw: dict[str, Any] = option(factory=dict, doc="escape hatch: merged into the generated JSON last")

    def __post_init__(self) -> None:
        require_choice(self, "stage", (0, 1, 2, 3))
        require_choice(self, "precision", ("bf16", "fp32"))
        require_choice(self, "grad_reduce_dtype", ("fp32", "bf16"))
        require(self.grad_reduce_dtype == "fp32" or self.precision == "bf16", "grad_reduce_dtype",
                "bf16 needs deepspeed.precision=bf16 (an fp32 run reduces what it computes)")
        require(self.grad_reduce_dtype == "fp32" or self.stage > 0, "grad_reduce_dtype",
                "bf16 needs deepspeed.stage 1-3 (ZeRO-0 reduces in the weights' fp32)")
        require(not self.offload_params or self.stage == 3, "offload_params", "needs deepspeed.stage=3")
        require(not self.offload_optimizer or self.stage >= 2, "offload_optimizer", "needs deepspeed.stage >= 2")
        zero = self.raw.get("zero_optimization", {})
        if not isinstance(zero, dict):  # DeepSpeed's old boolean form: ZeRO-1 under a stage-0 label
            raise OptionError("raw", f"sets zero_optimization to {zero!r}; it takes a mapping of ZeRO keys (the "
                                     "stage is deepspeed.stage)")
        # an offload section the config enables may be tuned in raw (NVMe path, pinned memory)
        enabled = {"offload_optimizer": self.offload_optimizer, "offload_param": self.offload_params}
        owned = [k for k in RAW_OWNED if k in self.raw] + [
            f"zero_optimization.{k}" for k in RAW_OWNED_ZERO if k in zero and not enabled.get(k)]
        if owned:
            why = " (the batch, lr and schedule are computed from the run config)" if owned[0] in RAW_BATCH else ""
            raise OptionError("raw", f"sets {owned[0]}, which {RAW_OWNED[owned[0]]} decides: set that instead{why}"
                                     + (" (with it set, raw may tune its keys, e.g. nvme_path)"
                                        if owned[0].split(".")[-1] in enabled else ""))


RAW_OWNED = {  # DeepSpeed keys the run config decides; deepspeed.raw may not change them behind its back
    "train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps": "optim.accum_steps",
    "train_batch_size": "data.batch_size x optim.accum_steps x the world size", "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim (the recipe's AdamW or LARS)", "scheduler": "the recipe's lr schedule",
    "bf16": "deepspeed.precision", "fp16": "deepspeed.precision",
    "torch_autocast": "deepspeed.precision (with deepspeed.grad_reduce_dtype)", "bfloat16": "deepspeed.precision",
    "amp": "deepspeed.precision", "communication_data_type": "deepspeed.grad_reduce_dtype",
    "zero_optimization.stage": "deepspeed.stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params"}
RAW_OWNED_ZERO = tuple(k.split(".", 1)[1] for k in RAW_OWNED if k.startswith("zero_optimization."))
RAW_BATCH = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "optimizer",
             "scheduler")


@dataclass
class CheckpointConfig:
    dir: str = option("runs/mae", "where checkpoints, latest and run_summary.json go (shared storage on clusters)")
    every_steps: int = option(1000, "optimizer steps between checkpoints (and one at the end)")
    keep_last: int = option(3, "complete checkpoints kept")
    enabled: bool = option(True, "false: never save (benchmarks)")
    resume: bool = option(True, "resume from the newest checkpoint in dir that verifies, if any; false: start "
                                "over (refused where dir holds an earlier run's checkpoints, and by mae launch slurm)")
    lock_stale_s: float = option(300.0, "a LOCK whose holder on another host (or in another PID namespace) has not "
                                        "refreshed it for this long is taken over (on this host: as soon as its "
                                        "process is gone)")

    def __post_init__(self) -> None:
        require_positive(self, "every_steps", "keep_last", "lock_stale_s")
        require_text(self, "dir")


@dataclass
class FaultConfig:
    max_nonfinite_in_row: int = option(5, "consecutive skipped updates (non-finite loss, or gradients DeepSpeed "
                                          "found overflowed) before the run stops")
    inject_nonfinite_at: tuple[int, ...] = option((), "drill: make these micro-steps' loss non-finite "
                                                      "(0-based, this process)")
    slow_save_s: float = option(0.0, "drill: pause this long inside each checkpoint save, after the files and "
                                      "before COMPLETE (a window for kill tests)")

    def __post_init__(self) -> None:
        require_positive(self, "max_nonfinite_in_row")
        self.inject_nonfinite_at = tuple(self.inject_nonfinite_at)
        require(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.inject_nonfinite_at),
                "inject_nonfinite_at", f"must be micro-step numbers >= 0, got {list(self.inject_nonfinite_at)}")
        require(0 <= self.slow_save_s <= MAX_PAUSE_S, "slow_save_s", f"must be in [0, {MAX_PAUSE_S}], got {self.slow_save_s}")


@dataclass
class LogConfig(TrackingConfig):  # log.tensorboard, log.wandb, ...: infra/tracking.py
    """Logging of every training loop (pretraining adds ``sample_ids_dir``)."""

    every_steps: int = option(10, "optimizer steps between log lines")
    metrics_file: str | None = option(None, "JSON lines of per-step metrics (pretraining: loss, lr, images/s, data "
                                            "wait; fine-tuning: loss, lr, epoch, ids, and one line per evaluation)")
    stall_dump_s: float = option(300.0, "no optimizer step for this long: every thread's stack to stderr, again "
                                        "each interval while stuck (a hung collective or read, named, before the "
                                        "process group's 10-minute timeout); 0: off, else at least 1")

    def __post_init__(self) -> None:
        super().__post_init__()  # the tracking fields' checks
        require_positive(self, "every_steps")
        require(self.stall_dump_s == 0 or self.stall_dump_s >= 1, "stall_dump_s",
                f"must be 0 (off) or at least 1 (each dump holds the interpreter), got {self.stall_dump_s}")
        require(self.stall_dump_s <= MAX_PAUSE_S, "stall_dump_s", f"must be at most {MAX_PAUSE_S} (a day), got "
                f"{self.stall_dump_s}")
        require_text(self, "metrics_file")


@dataclass
class PretrainLogConfig(LogConfig):
    sample_ids_dir: str | None = option(None, "each rank appends the sample ids of every micro-step to "
                                              "samples_rank<R>.jsonl here, R in 5 digits (audits: every sample once "
                                              "per epoch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_text(self, "sample_ids_dir")


@dataclass
class MetricsConfig:
    """The Prometheus endpoint of every training loop (pretraining adds the speedup
    measurement)."""

    enabled: bool = option(False, "a Prometheus endpoint per rank at bind:port_base + local_rank")
    port_base: int = option(9400, "rank's port = port_base + local_rank")
    bind: str = option("127.0.0.1", "0.0.0.0 to be scraped from other hosts")
    multiproc_dir: str | None = option(None, "prometheus_client multiprocess files (default: a temp dir)")
    file_sd_dir: str | None = option(None, "local rank 0 writes a Prometheus file_sd target file here")
    linger_s: float = option(0.0, "keep the endpoint up this long after training (short runs: last scrape)")

    def __post_init__(self) -> None:
        require(1 <= self.port_base <= 65535, "port_base", f"must be a TCP port, got {self.port_base}")
        require_non_negative(self, "linger_s")
        require(self.linger_s <= MAX_PAUSE_S, "linger_s", f"must be at most {MAX_PAUSE_S} (a day), got {self.linger_s}")
        require_text(self, "bind", "multiproc_dir", "file_sd_dir")


@dataclass
class PretrainMetricsConfig(MetricsConfig):
    measure_speedup: bool | None = option(None, "time MAE vs the mask-token baseline at start (None: on a GPU)")
    speedup_steps: int = option(3, "timed steps per side for measure_speedup")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "speedup_steps")


@dataclass
class RunConfig:
    data: LoaderConfig = option(factory=LoaderConfig)  # the pipeline's own config, composed
    model: ModelConfig = option(factory=ModelConfig)
    optim: OptimConfig = option(factory=OptimConfig)
    schedule: ScheduleConfig = option(factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = option(factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    faults: FaultConfig = option(factory=FaultConfig)
    log: PretrainLogConfig = option(factory=PretrainLogConfig)
    metrics: PretrainMetricsConfig = option(factory=PretrainMetricsConfig)
    seed: int = option(0, "model init, mask noise and the model's own random draws (dropout)")

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        require_input_dtype(self.data, self.deepspeed)
        mcfg = sized_model_config(self.model.name, self.data.augment.img_size)
        visible = num_visible_patches(mcfg.num_patches, self.model.mask_ratio)
        require(1 <= visible < mcfg.num_patches, "model.mask_ratio",
                f"{self.model.mask_ratio} keeps {visible} of the {mcfg.num_patches} patches of {self.model.name} at "
                f"{mcfg.img_size} px; at least one must be visible and one masked")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, dataset: str) -> dict[str, Any]:
        """What a checkpoint must match to be resumed, key by key: the model (its whole
        architecture), the seeds, the data (``dataset``: the manifest's hash), what
        shapes the optimizer state and the settings it keeps (weight decay, betas).
        Not lr or schedule, which may change, nor the world size (ZeRO-0; the global
        batch is checked on resume by ``recipe.refuse_another_global_batch``)."""
        arch = dataclasses.asdict(model_config(self.model.name, img_size=self.data.augment.img_size,
                                               norm_pix_loss=self.model.norm_pix_loss))
        return {"model": self.model.name, "architecture": arch, "mask_ratio": self.model.mask_ratio,
                "seed": self.seed, "data_seed": self.data.plan.seed, "dataset": dataset,
                "zero_stage": self.deepspeed.stage, "precision": self.deepspeed.precision,
                "offload": [self.deepspeed.offload_optimizer, self.deepspeed.offload_params],
                "weight_decay_groups": WEIGHT_DECAY_GROUPS, **optimizer_settings(self.optim)}


# Which parameters pretraining decays; a checkpoint of other groups holds optimizer
# state in another layout, so its resume is refused by name (not by DeepSpeed's
# size mismatch). Earlier versions, which spared the cls and mask tokens, saved none.
WEIGHT_DECAY_GROUPS = "all but 1-D parameters (tokens decayed, as the official MAE)"


def optimizer_settings(optim) -> dict[str, Any]:
    """The optimizer settings a checkpoint's optimizer state holds, which a resume
    would silently keep (DeepSpeed restores each parameter group as saved): part of
    the fingerprint, so a change is refused by name instead."""
    if getattr(optim, "name", "adamw") == "lars":
        return {"weight_decay": optim.weight_decay, "momentum": optim.momentum}
    return {"weight_decay": optim.weight_decay, "betas": list(optim.betas)}


def require_input_dtype(data: LoaderConfig, deepspeed: DeepSpeedConfig) -> None:
    """Half-precision images need the bf16 autocast to meet fp32 weights (without it
    the first layer fails on the mixed types, deep inside torch)."""
    require(not data.normalize or data.dtype == "float32" or deepspeed.precision != "fp32", "data.dtype",
            f"{data.dtype} needs deepspeed.precision=bf16 (the weights are fp32 and fp32 runs without autocast); "
            "use data.dtype=float32")


def sized_model_config(name: str, img_size: int | None, field: str = "data.augment.img_size"):
    """The model config of ``name`` at ``img_size`` (None: its own); an ``OptionError``
    naming ``field`` when the size does not fit the model (its patch size)."""
    try:
        return model_config(name, **({} if img_size is None else {"img_size": img_size}))
    except ValueError as e:
        raise OptionError(field, f"does not fit {name}: {e}") from None


# ------------------------------------------------------------- loading
def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"config key {odd[0]!r} in {path or 'the config'} is not a name (YAML reads it as "
                          f"{type(odd[0]).__name__}; quote it)")
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
    except OptionError as e:
        raise ConfigError(f"{path}.{e.field} {e.requirement}" if path else f"{e.field} {e.requirement}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's type; ints become floats where asked,
    floats must be finite, tuples are checked element by element."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for opt in options:
        if dataclasses.is_dataclass(opt) and isinstance(value, dict):  # an entry of a list, e.g. data.sources[0]
            return _build(opt, value, key)
        if opt is type(None) and value is None:
            return None
        base = typing.get_origin(opt) or opt
        if base is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            number = _float_or_none(value)  # a quoted number ("1e-3") is a string
            if number is not None and not math.isfinite(number):
                raise ConfigError(f"{key} = {_shown(value)} is not a finite number")
            if number is not None:
                return number
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:
                raise ConfigError(f"{key} is out of range ({len(str(abs(value)))} digits)")
            return value
        if base in (str, bool, dict) and isinstance(value, base):
            return value
        if base in (tuple, list) and isinstance(value, (list, tuple)):
            item = (typing.get_args(opt) or (Any,))[0]
            return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        if opt is Any:
            return value
    raise ConfigError(f"{key} = {_shown(value)} does not fit type {hint}")


def _shown(value: Any) -> str:
    """``repr(value)`` cut to a line's worth."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _float_or_none(value: int | float | str) -> float | None:
    if isinstance(value, str) and not value.isascii():  # float() reads other scripts' digits
        return None
    try:
        return float(value)
    except ValueError:
        return None
    except OverflowError:  # an int past any float
        return math.inf


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted}=...: an empty name between dots")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # values after anchors and aliases are expanded


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config file means it: a key given twice is an error, and numbers
    follow YAML 1.2 (``0042`` is 42, ``1e-3`` a float; no octal, no base 60)."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rules if tag not in (
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")] for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"config key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_int(loader: _ConfigLoader, node: yaml.ScalarNode) -> int | str:
    text = loader.construct_scalar(node)
    return int(text, 10) if len(text) <= 64 else text  # past any field's range; the field's check names it


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)


def _parse_yaml(text: str, what: str) -> Any:
    try:
        value = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader: no Python objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply") from None
    except ConfigError as e:  # a key given twice
        raise ConfigError(f"{what}: {e}") from None
    _check_expanded_size(value, what)
    return value


def _check_expanded_size(value: Any, what: str) -> None:
    """Refuse a tree of more than ``MAX_CONFIG_NODES`` values, counting every alias
    expansion (a kilobyte of nested aliases can stand for billions of values)."""
    todo, count = [value], 0
    while todo:
        node = todo.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(f"{what}: more than {MAX_CONFIG_NODES:,} values once its aliases are expanded")
        if isinstance(node, dict):
            todo += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            todo += node


def _read_config_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is over {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    tree = _parse_yaml(text, str(path))
    if tree is None:
        raise ConfigError(f"config {path} holds no settings (an empty file would run every default: ViT-B, "
                          f"800 epochs); give a preset ({', '.join(list_presets())}) or its settings")
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of settings, got {type(tree).__name__}")
    return tree


YAML_NULLS = ("null", "Null", "NULL", "~")


def _override_value(raw: str, hint: Any, item: str) -> Any:
    """An override's value: verbatim for a text field (a path keeps its ``#`` and is
    never read as a date, a bool or null, except YAML's nulls ``null``, ``Null``,
    ``NULL`` and ``~`` for an optional one, as in a file); parsed as YAML otherwise.
    A text's leading ``~/`` is the home folder: the shell expands it in a word of
    its own, not after ``key=`` (``checkpoint.dir=~/runs`` made a folder named ``~``)."""
    if raw == "":
        return ""
    if _is_text(hint) and not raw.startswith(("'", '"')):
        if raw.startswith("~/"):
            return os.path.expanduser(raw)
        return None if raw in YAML_NULLS and type(None) in typing.get_args(hint) else raw
    return _parse_yaml(raw, f"override {_shown(item)}")


def _is_text(hint: Any) -> bool:
    options = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    return str in options and options <= {str, type(None)}


def _field_hint(schema: type, dotted: str) -> Any:
    """The type of the field ``a.b.c`` names in ``schema``; None where it names none."""
    cls: Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None
        cls = hint
    return cls


def _config_path(source: str) -> Path:
    """The file ``--config`` names: a YAML path, else the preset of that name."""
    if not source.strip():
        raise ConfigError(f"--config is empty: give a preset ({', '.join(list_presets())}) or a YAML file")
    path = Path(source)
    if source in list_presets():
        if path.exists():
            raise ConfigError(f"config {source!r} names both a preset and a path in this folder: write ./{source} "
                              "for the file")
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(f"config {source!r} is neither a file nor a preset ({', '.join(list_presets())})")
    return path


def given_keys(source: str, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys the config file and the overrides set (whatever their values)."""
    keys = {item.partition("=")[0].strip() for item in overrides}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            keys.add(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(_read_config_file(_config_path(source)), "")
    return keys


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type = RunConfig) -> Any:
    """A preset name (see ``list_presets``) or a YAML path, then ``a.b=c`` overrides,
    built as ``schema`` (``RunConfig``; fine-tuning passes its own). ``None`` starts
    from the schema's defaults."""
    tree = _read_config_file(_config_path(source)) if source is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {_shown(item)} is not of the form a.b=value")
        _set_path(tree, key, _override_value(raw, _field_hint(schema, key), item))
    return _build(schema, tree, "")


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """Every key as ``a.b.c: value`` text, credentials redacted: the run's parameters
    as experiment trackers record them."""
    out: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "raw" and key != "options":
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = redact(json.dumps(value))

    walk(cfg.to_dict(), "")
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def reference_table(schema: type = RunConfig) -> str:
    """Every config key of ``schema`` with its type, default and documentation, as
    Markdown (the README's configuration references are these tables)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            type_name = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
            type_name = re.sub(r"\b[a-z_]+(?:\.[a-z_]+)+\.([A-Z]\w*)", r"\1", type_name)  # module paths
            note = doc_of(f).replace("|", "/")
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{json.dumps(default)}` | {note} |")
            item = (typing.get_args(hint) or (None,))[0]
            if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(item):  # fields of each entry
                walk(item, f"{prefix}{f.name}[].")

    walk(schema, "")
    return "\n".join(rows)
