"""Exports for the ecosystem, loaded by the libraries themselves where they import
here (transformers) and checked against timm's VisionTransformer structure where
they do not (timm needs torchvision, which does not import beside this torch)."""

import json

import pytest
import torch

from model.classifier import ClassifierConfig, ViTClassifier
from model.registry import create_model
from train.errors import WeightsError
from train.weights.ecosystem import convert
from train.weights.files import export_classifier, export_encoder, save_safetensors

transformers = pytest.importorskip("transformers")  # the interop extra (installed by `make test`)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    model = create_model("mae_vit_test_patch4").eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped key would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _classifier(global_pool: bool, head: str = "linear") -> ViTClassifier:
    torch.manual_seed(1)
    model = ViTClassifier(ClassifierConfig(num_classes=5, img_size=32, patch_size=4, embed_dim=64, depth=2,
                                           num_heads=4, global_pool=global_pool, head=head)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_encoder_loads_into_vit_mae_model_and_gives_our_features(mae, tmp_path):
    export_encoder(mae, tmp_path / "encoder.safetensors")
    out = convert(tmp_path / "encoder.safetensors", tmp_path / "hf", "transformers")
    assert out["architecture"] == "ViTMAEModel"
    hf, info = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        ours, mask, _ = mae.forward_encoder(x, 0.75, noise)
        theirs = hf.eval()(pixel_values=x, noise=noise)
    assert torch.equal(theirs.mask, mask)
    assert torch.allclose(theirs.last_hidden_state, ours, atol=1e-5)
    full = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", mask_ratio=0.0).eval()
    with torch.no_grad():
        every = full(pixel_values=x, noise=torch.arange(64.0).expand(3, -1)).last_hidden_state
    assert torch.allclose(every, mae.forward_features(x), atol=1e-5)  # all patches, in order


def test_cls_token_classifier_loads_into_vit_for_image_classification(tmp_path):
    model = _classifier(global_pool=False)
    names = ["cat", "dog", "fish", "owl", "yak"]
    export_classifier(model.state_dict(), model.cfg, tmp_path / "best" / "classifier.safetensors",
                      {"classes": names, "top1": 0.5})
    convert(tmp_path / "best", tmp_path / "hf", "transformers")
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label[3] == "owl" and hf.config.label2id["yak"] == 4
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf.eval()(pixel_values=x).logits, model(x), atol=1e-5)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 32} and pre["image_mean"] == [0.485, 0.456, 0.406]
    # transformers sees what `mae finetune` evaluated on: the centre 0.875 of the shorter side, not the whole
    # image squashed to a square (ViT's own processor)
    import numpy as np
    from PIL import Image

    from pipeline.augment import center_crop_box

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).resize((360, 240), Image.BICUBIC)
    got = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")(img, return_tensors="pt")["pixel_values"]

    def normalized(view: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(view.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255)
        return (x.permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    x0, y0, w, h = center_crop_box(*img.size, 0.875)
    cropped, squashed = normalized(img.crop((x0, y0, x0 + w, y0 + h))), normalized(img)
    assert got.shape == (1, 3, 32, 32)
    assert (got[0] - cropped).abs().mean() < 0.1 < (got[0] - squashed).abs().mean()


def test_pooled_or_probe_classifiers_are_refused_where_the_library_cannot_compute_them(tmp_path):
    pooled = _classifier(global_pool=True)
    export_classifier(pooled.state_dict(), pooled.cfg, tmp_path / "pooled" / "classifier.safetensors")
    with pytest.raises(WeightsError, match="cls token only"):
        convert(tmp_path / "pooled", tmp_path / "x", "transformers")
    probe = _classifier(global_pool=False, head="bn_linear")
    export_classifier(probe.state_dict(), probe.cfg, tmp_path / "probe" / "classifier.safetensors")
    with pytest.raises(WeightsError, match="BatchNorm head"):
        convert(tmp_path / "probe", tmp_path / "y", "timm")


def timm_vit_shapes(embed_dim, depth, patch, grid, classes, pool):
    """The state dict of timm's ``VisionTransformer(class_token=True, qkv_bias=True,
    global_pool=pool, num_classes=classes)``, read off its source
    (timm/models/vision_transformer.py: Block = norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2; ``norm`` is real and ``fc_norm`` Identity unless pool is 'avg',
    then the reverse; ``head`` Identity when num_classes == 0)."""
    d, h = embed_dim, 4 * embed_dim
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d),
              "patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,)}
    for i in range(depth):
        for name, shape in (("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                            ("attn.qkv.bias", (3 * d,)), ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (h, d)),
                            ("mlp.fc1.bias", (h,)), ("mlp.fc2.weight", (d, h)), ("mlp.fc2.bias", (d,))):
            shapes[f"blocks.{i}.{name}"] = shape
    norm = "fc_norm" if pool == "avg" else "norm"
    shapes.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
    if classes:
        shapes.update({"head.weight": (classes, d), "head.bias": (classes,)})
    return shapes


def _shapes(path):
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(path)).items()}


def test_timm_exports_have_timms_keys_and_shapes(mae, tmp_path):
    save_safetensors(mae.state_dict(), tmp_path / "export" / "mae.safetensors", {"model": "mae_vit_test_patch4",
                                                                                  "img_size": 32})
    convert(tmp_path / "export", tmp_path / "timm-enc", "timm")
    assert _shapes(tmp_path / "timm-enc" / "model.safetensors") == timm_vit_shapes(64, 2, 4, 8, 0, "token")
    cfg = json.loads((tmp_path / "timm-enc" / "config.json").read_text())
    assert cfg["model_args"] == {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4,
                                 "mlp_ratio": 4.0, "num_classes": 0, "global_pool": "token", "qkv_bias": True,
                                 "class_token": True}
    pooled = _classifier(global_pool=True)
    export_classifier(pooled.state_dict(), pooled.cfg, tmp_path / "ft" / "classifier.safetensors",
                      {"classes": list("abcde")})
    convert(tmp_path / "ft", tmp_path / "timm-cls", "timm")
    assert _shapes(tmp_path / "timm-cls" / "model.safetensors") == timm_vit_shapes(64, 2, 4, 8, 5, "avg")
    cfg = json.loads((tmp_path / "timm-cls" / "config.json").read_text())
    assert cfg["global_pool"] == "avg" and cfg["label_names"] == list("abcde")
    assert cfg["pretrained_cfg"]["crop_pct"] == 0.875 and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_an_official_pth_converts_by_its_shapes(mae, tmp_path):
    torch.save({"model": {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "mae_pretrain_vit_test.pth")
    out = convert(tmp_path / "mae_pretrain_vit_test.pth", tmp_path / "hf", "transformers")
    assert out["architecture"] == "ViTMAEModel"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["patch_size"], cfg["image_size"]) == (64, 2, 4, 32)


def test_convert_and_load_read_a_files_metadata_alike(mae, tmp_path):
    """A foreign mae.safetensors that names its model but not its input size nor
    norm_pix_loss: both readers take the model's own size, and the file's
    norm_pix_loss when it gives one. Before, convert assumed 224 px (so a 32 px
    model was refused as not fitting) and always wrote norm_pix_loss true."""
    from train.weights.pretrained import load_pretrained

    path = save_safetensors(mae.state_dict(), tmp_path / "mae.safetensors",
                            {"model": "mae_vit_test_patch4", "norm_pix_loss": False})
    loaded, info = load_pretrained(path)
    assert (loaded.cfg.img_size, loaded.cfg.norm_pix_loss, info["model"]) == (32, False, "mae_vit_test_patch4")
    convert(path, tmp_path / "hf", "transformers")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_size"], cfg["norm_pix_loss"]) == (32, False)
    text = save_safetensors(mae.state_dict(), tmp_path / "text" / "mae.safetensors",
                            {"model": "mae_vit_test_patch4", "norm_pix_loss": "False"})  # bool("False") is True
    for read in (load_pretrained, lambda p: convert(p, tmp_path / "hf2", "transformers")):
        with pytest.raises(WeightsError, match="norm_pix_loss must be true or false, got 'False'"):
            read(text)


def test_convert_checks_untrusted_metadata_against_the_tensors_before_building(mae, tmp_path):
    # a 430 KB file whose metadata said img_size=8192 built that model first: 24 GB and a minute; 1e9 a traceback
    from safetensors.torch import load_file

    export_encoder(mae, tmp_path / "encoder.safetensors")
    sd = load_file(tmp_path / "encoder.safetensors")
    meta = {"arch": "vit", "img_size": "1000000000", "patch_size": "4", "embed_dim": "64", "depth": "2",
            "num_heads": "4"}
    forged = save_safetensors(sd, tmp_path / "forged" / "encoder.safetensors", meta)
    with pytest.raises(WeightsError, match=r"its metadata does not describe its tensors: patches 62500000000000000"):
        convert(forged, tmp_path / "out", "timm")
    model = _classifier(global_pool=True)
    export_classifier(model.state_dict(), model.cfg, tmp_path / "cls" / "classifier.safetensors",
                      {"classes": ["a", "b", "c"]})
    with pytest.raises(WeightsError, match=r"names 3 classes \(3 distinct\) for a head of 5"):
        convert(tmp_path / "cls" / "classifier.safetensors", tmp_path / "out2", "timm")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_convert_never_writes_among_checkpoints_nor_leaves_another_targets_config(mae, tmp_path):
    export_encoder(mae, tmp_path / "encoder.safetensors")
    run = tmp_path / "run"
    (run / "step000000002").mkdir(parents=True)
    (run / "step000000002" / "COMPLETE").write_text("{}")
    for out in (run, run / "step000000002"):  # a live run's checkpoint.dir, or one of its steps
        with pytest.raises(WeightsError, match="holds checkpoints: converted weights there would be read"):
            convert(tmp_path / "encoder.safetensors", out, "timm")
    convert(tmp_path / "encoder.safetensors", tmp_path / "out", "transformers")
    convert(tmp_path / "encoder.safetensors", tmp_path / "out", "timm")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
