"""The fine-tuning presets carry the paper's recipe; the README's fine-tuning
configuration table is generated from the dataclasses."""

from pathlib import Path

import pytest

from train.config import load_config, reference_table
from train.errors import ConfigError
from train.eval.finetune_config import FinetuneConfig
from train.recipe import derived

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name,model,blr,decay,drop,epochs,size", [
    ("finetune_vit_b", "mae_vit_base_patch16", 5e-4, 0.65, 0.1, 100, 224),
    ("finetune_vit_l", "mae_vit_large_patch16", 1e-3, 0.75, 0.2, 50, 224),
    ("finetune_vit_h", "mae_vit_huge_patch14", 1e-3, 0.75, 0.3, 50, 224),
    ("finetune_vit_h448", "mae_vit_huge_patch14", 1e-3, 0.75, 0.3, 50, 448)])
def test_finetune_presets_are_the_papers_recipe(name, model, blr, decay, drop, epochs, size):
    cfg = load_config(name, schema=FinetuneConfig)
    d = derived(cfg, world_size=8, micro_batches_per_epoch=10_000)
    assert (cfg.model.name, cfg.optim.blr, cfg.model.layer_decay, cfg.model.drop_path) == (model, blr, decay, drop)
    assert d.global_batch == 1024 and d.lr == pytest.approx(blr * 1024 / 256)
    assert cfg.schedule.epochs == epochs and cfg.schedule.warmup_epochs == 5 and cfg.optim.min_lr == 1e-6
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.05 and cfg.optim.betas == (0.9, 0.999)
    m, a = cfg.mixup, cfg.data.augment
    assert (m.mixup_alpha, m.cutmix_alpha, m.switch_prob, m.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (a.rand_augment_layers, a.rand_augment_magnitude, a.rand_augment_magnitude_std) == (2, 9, 0.5)
    assert a.erase_prob == 0.25 and a.scale == (0.08, 1.0) and a.img_size == size == cfg.img_size
    assert cfg.model.global_pool and cfg.model.head == "linear"
    assert cfg.eval.crop_fraction == (0.875 if size == 224 else 1.0)


@pytest.mark.parametrize("name", ["linprobe_vit_b", "linprobe_vit_l", "linprobe_vit_h"])
def test_linear_probe_presets_are_the_papers_protocol(name):
    cfg = load_config(name, schema=FinetuneConfig)
    d = derived(cfg, world_size=8, micro_batches_per_epoch=10_000)
    assert d.global_batch == 16384 and d.lr == pytest.approx(0.1 * 16384 / 256)
    assert cfg.optim.name == "lars" and cfg.optim.weight_decay == 0 and cfg.deepspeed.stage == 0
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (90, 10)
    assert cfg.model.head == "bn_linear" and not cfg.model.global_pool and cfg.model.trainable_blocks == 0
    assert cfg.mixup.prob == 0 and cfg.mixup.label_smoothing == 0 and cfg.data.augment.rand_augment_layers == 0
    assert cfg.data.augment.erase_prob == 0 and cfg.data.augment.scale == (0.08, 1.0)  # crop + flip only
    assert cfg.data.batch_size == 512  # BatchNorm's statistics over 512 a GPU, as the official 32-GPU run


def test_a_fine_tuning_config_without_augment_keys_gets_the_recipes_augmentation():
    """Before, it got pretraining's (scale 0.2-1, no RandAugment, no erasing) without
    a word; pretraining's own default stays."""
    a = load_config(None, ["data.augment.img_size=32"], FinetuneConfig).data.augment
    assert (a.scale, a.rand_augment_layers, a.rand_augment_magnitude, a.rand_augment_magnitude_std, a.erase_prob) \
        == ((0.08, 1.0), 2, 9, 0.5, 0.25) and a.img_size == 32
    p = load_config(None, ["data.augment.img_size=32"]).data.augment
    assert (p.scale, p.rand_augment_layers, p.erase_prob) == ((0.2, 1.0), 0, 0)


def test_bad_values_name_their_key():
    with pytest.raises(ConfigError, match="model.layer_decay"):
        load_config("finetune_tiny_cpu", ["model.layer_decay=1.5"], FinetuneConfig)
    with pytest.raises(ConfigError, match="optim.name"):
        load_config("finetune_tiny_cpu", ["optim.name=sgd"], FinetuneConfig)
    with pytest.raises(ConfigError, match="unknown config key model.bogus"):
        load_config("finetune_tiny_cpu", ["model.bogus=1"], FinetuneConfig)
    for override, message in [  # each ran on: random init, no evaluation, or a traceback at build time
            ("model.weights=", "model.weights must not be empty"), ("eval.url=", "eval.url must not be empty"),
            ("data.augment.img_size=30", "data.augment.img_size does not fit mae_vit_test_patch4"),
            ("mixup.cutmix_alpha=-1", "mixup.cutmix_alpha must be >= 0"),
            ("eval.every_epochs=0", "eval.every_epochs must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config("finetune_tiny_cpu", [override], FinetuneConfig)
    for override in ("log.sample_ids_dir=ids", "metrics.measure_speedup=true", "metrics.speedup_steps=2"):
        # pretraining's keys: fine-tuning took them and wrote no ids file, timed nothing
        with pytest.raises(ConfigError, match=f"unknown config key {override.split('=')[0]}"):
            load_config("finetune_tiny_cpu", [override], FinetuneConfig)
    assert load_config("tiny_cpu", ["log.sample_ids_dir=ids", "metrics.speedup_steps=2"]).metrics.speedup_steps == 2


def test_readme_finetune_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- finetune-reference:start -->\n", 1)[1].split("\n<!-- finetune-reference:end -->")[0]
    expected = [row for row in reference_table(FinetuneConfig).splitlines() if not row.startswith("| `data.")]
    assert section.strip().splitlines() == expected, "regenerate from train.config.reference_table(FinetuneConfig)"
