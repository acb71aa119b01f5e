import math
import os
import re
from pathlib import Path

import pytest
import torch

from model.registry import create_model
from train.config import PRESETS_DIR, RunConfig, list_presets, load_config, reference_table
from train.errors import ConfigError
from train.engine import deepspeed_json
from train.recipe import derived, lr_at, param_groups


def test_presets_load_and_reach_the_papers_batch_on_8_gpus():
    assert {"tiny_cpu", "vit_b", "vit_l", "vit_h"} <= set(list_presets())
    for name, model in (("vit_b", "mae_vit_base_patch16"), ("vit_l", "mae_vit_large_patch16"),
                        ("vit_h", "mae_vit_huge_patch14")):
        cfg = load_config(name)
        assert cfg.model.name == model
        d = derived(cfg, world_size=8, micro_batches_per_epoch=1000)
        assert d.global_batch == 4096
        assert d.lr == pytest.approx(1.5e-4 * 4096 / 256)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip is None


def test_overrides_and_derived_values_are_not_written_back():
    cfg = load_config("tiny_cpu", ["optim.lr=1e-3", "data.batch_size=4", "optim.accum_steps=3",
                                   "deepspeed.raw={zero_optimization: {reduce_bucket_size: 100}}"])
    d = derived(cfg, world_size=2, micro_batches_per_epoch=30)
    assert d.global_batch == 4 * 3 * 2 and d.lr == 1e-3 and d.steps_per_epoch == 10
    assert cfg.optim.lr == 1e-3 and cfg.optim.blr == 1.5e-4  # nothing derived stored
    assert d.total_steps == 20 * 10 and d.warmup_steps == 2 * 10


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key optim.lrr"),
    ("nope.x=1", "unknown config key nope"),
    ("deepspeed.stage=4", "deepspeed.stage must be one of 0, 1, 2, 3; got 4"),
    ("data.batch_size=many", "data.batch_size = 'many' does not fit"),
    ("model.name=vit_tiny", "model.name must be one of mae_vit_base_patch16, "),
    ("data.plan.window_shards=0", "data.plan.window_shards must be >= 1, got 0"),
    ("data.storage.retry.max_attempts=0", "data.storage.retry.max_attempts must be positive, got 0"),
    ("data.augment.scale=[0.5, 0.1]", "data.augment.scale must be [lo, hi] with 0 < lo <= hi <= 1"),
    ("data.images.mode_policy=drop", "data.images.mode_policy must be one of convert, skip; got 'drop'"),
    ("data.backend=gpu", "data.backend must be one of cpu, dali, ffcv, synthetic; got 'gpu'"),
    ("data.dali.crop=center", "data.dali.crop must be one of plan, random; got 'center'"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params needs deepspeed.stage=3"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("justakey", "not of the form a.b=value"),
    # values that used to pass and then fail (or silently do nothing) at run time
    ("model.mask_ratio=0", "model.mask_ratio must be in (0, 1) (0 masks nothing: no loss), got 0.0"),
    ("model.mask_ratio=0.999", "model.mask_ratio 0.999 keeps 0 of the 64 patches of mae_vit_test_patch4 at 32 px"),
    ("log.every_steps=0", "log.every_steps must be positive, got 0"),
    ("schedule.max_steps=0", "schedule.max_steps must be positive, got 0"),
    ("schedule.max_steps=-1", "schedule.max_steps must be positive, got -1"),
    ("optim.blr=.inf", "optim.blr = inf is not a finite number"),
    ("optim.lr=-1e-3", "optim.lr must be positive, got -0.001"),
    ("optim.betas=[.nan, 0.9]", "optim.betas[0] = nan is not a finite number"),
    ("optim.weight_decay=-0.05", "optim.weight_decay must be >= 0, got -0.05"),
    ("optim.grad_clip=0", "optim.grad_clip must be positive, got 0.0"),
    ("seed=-1", "seed must be in [0, 2**32), got -1"),
    ("data.plan.seed=-3", "data.plan.seed must be in [0, 2**32), got -3"),
    ("data.augment.img_size=30", "data.augment.img_size does not fit mae_vit_test_patch4: MAEConfig.img_size (30) "
                                 "must be a multiple of patch_size (4)"),
    ("data.augment.std=[0.2, 0, 0.2]", "data.augment.std must be three numbers in (0, 1]"),
    ("data.augment.scale=[a, b]", "data.augment.scale[0] = 'a' does not fit type <class 'float'>"),
    ("data.url=", "data.url must not be empty, got ''"),
    ("data.storage.read_timeout_s=0", "data.storage.read_timeout_s must be positive, got 0.0"),
    ("data.storage.retry.deadline_s=-5", "data.storage.retry.deadline_s must be positive, got -5.0"),
    ("data.storage.endpoint_url=127.0.0.1:9000", "data.storage.endpoint_url must be http://host"),
    ("checkpoint.dir=''", "checkpoint.dir must not be empty"),
    ("faults.max_nonfinite_in_row=0", "faults.max_nonfinite_in_row must be positive, got 0"),
    ("faults.inject_nonfinite_at=[-1]", "faults.inject_nonfinite_at must be micro-step numbers >= 0, got [-1]"),
    ("metrics.linger_s=-1", "metrics.linger_s must be >= 0, got -1.0"),
    ("metrics.linger_s=1e10", "metrics.linger_s must be at most 86400 (a day)"),  # was an OverflowError at the end
    ("faults.slow_save_s=1e10", "faults.slow_save_s must be in [0, 86400]"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny_cpu", [override])


BOMB = "deepspeed:\n  raw:\n    a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))  # 405 bytes, 9**9 values


@pytest.mark.parametrize("text, message", [
    ("schedule:\n  max_steps: 1\nschedule:\n  epochs: 1\n", "config key 'schedule' is given twice (line 3)"),
    (b"# r\xe9sum\xe9\noptim:\n  lr: 0.001\n", "is not UTF-8 text (byte 3: b'\\xe9')"),
    ("- data\n- model\n", "must be a mapping of settings, got list"),
    ("model:\n  on: true\n  nmae: x\n", "config key True in model is not a name (YAML reads it as bool; quote it)"),
    ("seed: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("", "holds no settings"),
    ("# nothing but a comment\n", "holds no settings"),
    (BOMB, "more than 100,000 values once its aliases are expanded"),
    ("data:\n  batch_size: 0x10\n", "data.batch_size = '0x10' does not fit type"),
    ("checkpoint:\n  lock_stale_s: 5:00\n", "checkpoint.lock_stale_s = '5:00' does not fit type"),
    ("data:\n  batch_size: " + "1" * 400 + "\n", "data.batch_size = '1111111"),
    ("optim:\n  lr: " + "1" * 400 + "\n", "is not a finite number"),
    ("data:\n  batch_size: " + "1" * 30 + "\n", "data.batch_size is out of range (30 digits)"),
])
def test_a_careless_config_file_is_one_error_naming_the_problem(tmp_path, text, message):
    """Each was a traceback, a hang, or a silently different run."""
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path), ["schedule.max_steps=2"])


def test_numbers_read_as_yaml_1_2_and_text_overrides_as_written(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0042\ndata:\n  batch_size: 064\n")  # YAML 1.1: octal 34 and 52
    cfg = load_config(str(path), ["checkpoint.dir=runs/exp #2", "data.url=/data/set #1", "optim.lr=1e-3",
                                  "log.run_name=2024-05-01", "data.augment.scale=[0.5, 1.0]", "optim.blr=016"])
    assert (cfg.seed, cfg.data.batch_size, cfg.optim.lr, cfg.optim.blr) == (42, 64, 0.001, 16.0)
    assert (cfg.checkpoint.dir, cfg.data.url, cfg.log.run_name) == ("runs/exp #2", "/data/set #1", "2024-05-01")
    assert cfg.data.augment.scale == (0.5, 1.0)
    assert load_config("tiny_cpu", ["log.run_name=null", "data.url='quoted'"]).data.url == "quoted"
    # the shell leaves ~ alone after key=: it made a folder named ~ in the working directory
    home = load_config("tiny_cpu", ["checkpoint.dir=~/runs/x", "data.url=~/shards"])
    assert (home.checkpoint.dir, home.data.url) == (os.path.expanduser("~/runs/x"), os.path.expanduser("~/shards"))
    assert home.checkpoint.dir.startswith("/") and "~" not in home.checkpoint.dir
    quoted = load_config("tiny_cpu", ["checkpoint.dir='~/quoted'", "data.url=a~/b"])
    assert (quoted.checkpoint.dir, quoted.data.url) == ("~/quoted", "a~/b")
    for null in ("null", "Null", "NULL", "~"):  # YAML's nulls unset an optional text field, as in a file
        assert load_config("tiny_cpu", [f"log.run_name={null}"]).log.run_name is None
        assert load_config("tiny_cpu", [f"log.run_name='{null}'"]).log.run_name == null
    for bad, message in [("", "--config is empty"), (str(tmp_path), "is not a file"), ("/dev/zero", "is not a file")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(bad)
    for override, message in [(".seed=1", "an empty name between dots"), ("optim.lr=\u0661\u0662", "does not fit"),
                              ("deepspeed.raw.gradient_accumulation_steps=4", "deepspeed.raw sets "
                               "gradient_accumulation_steps, which optim.accum_steps decides"),
                              ("deepspeed.raw={zero_optimization: {stage: 3}}", "sets zero_optimization.stage"),
                              # DeepSpeed's bf16 alias: logged as fp32, trained into a dtype error deep in torch
                              ("deepspeed.raw.bfloat16.enabled=true", "sets bfloat16, which deepspeed.precision"),
                              ("deepspeed.raw.amp.enabled=true", "sets amp, which deepspeed.precision"),
                              ("deepspeed.raw.torch_autocast.dtype=float16", "sets torch_autocast, which "
                               "deepspeed.precision"),  # fp16 without a loss scaler, labelled bf16
                              # the old boolean form: ZeRO-1 under a stage-0 label and fingerprint
                              ("deepspeed.raw.zero_optimization=true", "sets zero_optimization to True; it takes a "
                               "mapping"),
                              ("deepspeed.raw.zero_optimization.offload_optimizer.device=cpu", "sets "
                               "zero_optimization.offload_optimizer, which deepspeed.offload_optimizer decides"),
                              ("deepspeed.raw.communication_data_type=bf16", "sets communication_data_type, which "
                               "deepspeed.grad_reduce_dtype decides")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("tiny_cpu", [override])


def test_raw_may_tune_an_offload_the_config_enables():
    """NVMe offload, or pinned memory off on a host with a low ``ulimit -l``: keys
    the config has no option for, merged into the section it writes."""
    from train.engine import deepspeed_json

    cfg = load_config("tiny_cpu", ["deepspeed.stage=3", "deepspeed.offload_params=true",
                                   "deepspeed.raw.zero_optimization.offload_param.pin_memory=false",
                                   "deepspeed.raw.zero_optimization.offload_param.buffer_count=8"])
    assert deepspeed_json(cfg)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False,
                                                                         "buffer_count": 8}
    with pytest.raises(ConfigError, match="deepspeed.grad_reduce_dtype bf16 needs deepspeed.stage 1-3"):
        load_config("tiny_cpu", ["deepspeed.stage=0", "deepspeed.precision=bf16", "deepspeed.grad_reduce_dtype=bf16"])


def test_a_schedule_that_cannot_train_is_refused():
    with pytest.raises(ConfigError, match=r"schedule.epochs 0.01 is 0.1 of an optimizer step \(10 per epoch\)"):
        derived(load_config("tiny_cpu", ["schedule.epochs=0.01"]), 1, 10)
    with pytest.raises(ConfigError, match=r"optim.min_lr 1 is above the peak lr 0.0001: the cosine decay would climb"):
        derived(load_config("tiny_cpu", ["optim.lr=1e-4", "optim.min_lr=1"]), 1, 10)


def test_unknown_preset_or_file():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("vit_gigantic")


def test_half_precision_images_need_the_bf16_autocast():
    """fp32 weights met float16 images in the first layer: a torch traceback."""
    from train.eval.finetune_config import FinetuneConfig

    for schema, preset in ((RunConfig, "tiny_cpu"), (FinetuneConfig, "finetune_tiny_cpu")):
        with pytest.raises(ConfigError, match="data.dtype float16 needs deepspeed.precision=bf16"):
            load_config(preset, ["data.dtype=float16", "deepspeed.precision=fp32"], schema=schema)
        assert load_config(preset, ["data.dtype=float16", "deepspeed.precision=bf16"], schema=schema).data.dtype == \
            "float16"
        assert load_config(preset, ["data.dtype=float16", "data.normalize=false", "data.augment.erase_prob=0"],
                           schema=schema).data.normalize is False  # uint8 images: the dtype is not used


def test_a_file_named_like_a_preset_is_not_taken_for_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny_cpu").write_text("model:\n  name: mae_vit_base_patch16\n")
    with pytest.raises(ConfigError, match=r"names both a preset and a path in this folder: write ./tiny_cpu for the file"):
        load_config("tiny_cpu")
    assert load_config("./tiny_cpu").model.name == "mae_vit_base_patch16"
    assert load_config(str(PRESETS_DIR / "tiny_cpu.yaml")).model.name == "mae_vit_test_patch4"


def test_yaml_file_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: mae_vit_test_patch4\ndata:\n  batch_size: 2\n  augment:\n    img_size: 32\n"
                    "    scale: [0.3, 0.9]\n  plan:\n    window_shards: 8\n  images:\n    max_pixels: 1000\n")
    cfg = load_config(str(path), ["seed=7"])
    assert cfg.model.name == "mae_vit_test_patch4" and cfg.data.batch_size == 2 and cfg.seed == 7
    # every pipeline option is reachable from YAML: the data section *is* the LoaderConfig
    assert cfg.data.augment.img_size == 32 and cfg.data.augment.scale == (0.3, 0.9)
    assert cfg.data.plan.window_shards == 8 and cfg.data.images.max_pixels == 1000


def test_deepspeed_json_is_generated_from_the_config():
    cfg = load_config("vit_h", ["optim.grad_clip=1.0", "deepspeed.offload_optimizer=true",
                                "deepspeed.raw={zero_optimization: {stage3_max_live_parameters: 1000}, zero_force_ds_cpu_optimizer: false}"])
    ds = deepspeed_json(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 16
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 1000  # raw merged deep
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # generated keys kept
    assert ds["gradient_clipping"] == 1.0 and ds["zero_force_ds_cpu_optimizer"] is False


def test_fingerprint_tracks_the_model_seeds_data_and_optimizer_state():
    a = load_config("tiny_cpu").fingerprint("data-a")
    assert a == load_config("tiny_cpu", ["optim.lr=0.5", "schedule.epochs=3", "data.batch_size=4"]).fingerprint("data-a")
    changed = {
        "zero_stage": load_config("tiny_cpu", ["deepspeed.stage=3"]).fingerprint("data-a"),
        "model": load_config("tiny_cpu", ["model.name=mae_vit_tiny_patch16"]).fingerprint("data-a"),
        "seed": load_config("tiny_cpu", ["seed=1"]).fingerprint("data-a"),
        "data_seed": load_config("tiny_cpu", ["data.plan.seed=1"]).fingerprint("data-a"),
        "dataset": load_config("tiny_cpu").fingerprint("data-b"),
        "mask_ratio": load_config("tiny_cpu", ["model.mask_ratio=0.5"]).fingerprint("data-a"),
        # kept in the optimizer state: a resume restored the saved values silently
        "weight_decay": load_config("tiny_cpu", ["optim.weight_decay=5.0"]).fingerprint("data-a"),
        "betas": load_config("tiny_cpu", ["optim.betas=[0.5, 0.6]"]).fingerprint("data-a"),
    }
    for key, other in changed.items():
        assert a[key] != other[key], key
    assert a["architecture"]["embed_dim"] == 64 and a["architecture"]["img_size"] == 32
    img = load_config("tiny_cpu", ["data.augment.img_size=64"]).fingerprint("data-a")
    assert [k for k in a if a[k] != img[k]] == ["architecture"]


def test_a_fingerprint_key_added_later_is_not_compared_when_the_checkpoint_lacks_it():
    from train.checkpoint import fingerprint_differences

    ours = load_config("tiny_cpu").fingerprint("data-a")
    old = {k: v for k, v in ours.items() if k not in ("weight_decay", "betas")}  # written before they were added
    assert fingerprint_differences(old, ours) == []
    assert fingerprint_differences({k: v for k, v in ours.items() if k != "seed"}, ours) == ["seed: None -> 0"]
    assert fingerprint_differences({**ours, "betas": [0.5, 0.6]}, ours) == ["betas: [0.5, 0.6] -> [0.9, 0.95]"]


def test_lr_schedule_warmup_then_half_cosine():
    cfg = load_config("tiny_cpu", ["optim.lr=1.0", "optim.min_lr=0.1"])
    d = derived(cfg, 1, 100)  # 100 steps/epoch, 20 epochs, 2 warmup epochs
    min_lr = cfg.optim.min_lr
    assert lr_at(0, d, min_lr) == 0.0
    assert lr_at(100, d, min_lr) == pytest.approx(0.5)
    assert lr_at(200, d, min_lr) == pytest.approx(1.0)
    mid = 200 + (2000 - 200) // 2
    assert lr_at(mid, d, min_lr) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(2000, d, min_lr) == pytest.approx(0.1)


def test_weight_decay_spares_biases_and_norms_only_as_the_official_pretraining():
    """timm's ``add_weight_decay`` with no skip list (the official main_pretrain.py):
    the cls and mask tokens (3-D) are decayed."""
    model = create_model("mae_vit_test_patch4")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"norm.weight", "norm.bias", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= no_decay_names
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decay_names
    assert all(p.ndim > 1 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not any(n == "pos_embed" for n in no_decay_names | {names[id(p)] for p in decay["params"]})


def test_reference_table_lists_every_key_with_its_documentation():
    table = reference_table()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[4].strip() for line in table.splitlines()[2:]}
    for key in ("data.url", "data.plan.window_shards", "data.storage.retry.max_attempts", "data.augment.scale",
                "data.images.mode_policy", "data.dali.crop", "model.grad_checkpointing", "optim.blr", "deepspeed.raw",
                "checkpoint.keep_last", "faults.max_nonfinite_in_row", "schedule.warmup_epochs"):
        assert key in rows
    assert rows["optim.blr"] == "base lr; lr = blr * global_batch / 256"
    assert [k for k, doc in rows.items() if not doc] == []  # every key explains itself
    assert isinstance(RunConfig(), RunConfig) and torch  # defaults construct


def test_an_epoch_with_no_samples_for_a_rank_names_why_not_the_batch_size():
    """It said "lower data.batch_size", which cannot help."""
    from train.errors import ConfigError
    from train.recipe import micro_batches_per_epoch

    with pytest.raises(ConfigError, match="an epoch gives each of the 64 ranks no samples: the data holds fewer"):
        micro_batches_per_epoch(load_config("tiny_cpu"), 0, 64)
    with pytest.raises(ConfigError, match="is more than the 3 samples an epoch gives each of the 2 ranks: lower"):
        micro_batches_per_epoch(load_config("tiny_cpu"), 3, 2)


def test_the_schedule_counts_the_micro_batches_the_loader_gives():
    """30 samples, batch 4, accum 2: the loader gives 8 micro-batches an epoch (the
    last of 2 samples), 4 steps. The schedule counted 7 whole ones and floored the
    steps per epoch to 3, so 4 configured epochs trained 3, warmup and decay stretched."""
    from train.recipe import micro_batches_per_epoch

    cfg = load_config("tiny_cpu", ["data.batch_size=4", "optim.accum_steps=2", "schedule.epochs=4",
                                   "schedule.warmup_epochs=1"])
    assert micro_batches_per_epoch(cfg, 30, 1) == 8
    assert micro_batches_per_epoch(load_config("tiny_cpu", ["data.batch_size=4", "data.drop_last=true"]), 30, 1) == 7
    d = derived(cfg, world_size=1, micro_batches_per_epoch=8)
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (4, 16, 4)
    d = derived(cfg, world_size=1, micro_batches_per_epoch=7)  # a window spans two epochs: 28 micro-batches
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (3.5, 14, 3)
    thirds = load_config("tiny_cpu", ["optim.accum_steps=3", "schedule.epochs=3"])
    assert derived(thirds, world_size=1, micro_batches_per_epoch=10).total_steps == 10  # not 9.999 -> 9
