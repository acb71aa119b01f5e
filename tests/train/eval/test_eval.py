"""Reconstructions, probes and weight loading: the pieces under `mae reconstruct`,
`mae probe` and the demo."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.registry import create_model
from train.weights.pretrained import load_pretrained
from train.eval.probe import knn, linear_probe, split
from train.eval.reconstruct import NORMALIZE, reconstruct, save_grid, visible_patch_stats
from train.errors import WeightsError
from train.weights.files import export_encoder, save_safetensors


def test_visible_patch_stats_fill_masked_patches_from_visible_neighbours():
    stat = torch.arange(16, dtype=torch.float32).view(1, 16)  # 4x4 grid
    visible = torch.zeros(1, 16)
    visible[0, [0, 5]] = 1  # (0,0)=0 and (1,1)=5 visible
    est = visible_patch_stats(stat, visible, 4)
    assert est[0, 0] == 0 and est[0, 5] == 5  # visible ones keep their own value
    assert est[0, 1] == pytest.approx(2.5)  # (0,1) has both in its 3x3 window
    assert est[0, 15] == pytest.approx(5.0)  # (3,3): only (1,1) within the 5x5 window
    assert not torch.isnan(est).any()


def _images(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, 3, 8, 8), dtype=np.uint8)
    return torch.nn.functional.interpolate(torch.from_numpy(base).float(), size=size, mode="bilinear").round().to(
        torch.uint8)


def test_reconstruction_panels_with_an_oracle_decoder_give_back_the_image():
    """If the decoder predicted the true normalized patches, un-normalizing with the
    target's statistics must give the image back exactly; with the visible
    patches' statistics it can only approximate it."""
    torch.manual_seed(0)
    model = create_model("mae_vit_test_patch4").eval()
    images = _images()
    x = NORMALIZE(images)
    model.forward_decoder = lambda latent, ids_restore: model.patch_targets(x)  # the oracle
    exact = reconstruct(model, images, 0.75, seed=1, unnormalize="target")
    assert torch.allclose(exact["reconstruction"], exact["original"], atol=1e-4)
    assert exact["loss"].abs().max() < 1e-6
    honest = reconstruct(model, images, 0.75, seed=1, unnormalize="visible")
    err = (honest["reconstruction"] - honest["original"]).abs()
    assert 0.001 < err.mean() < 0.3
    # visible patches pasted back are the original pixels; masked input is grey there
    masked = (honest["masked"] == 0.5).all(1, keepdim=True)
    assert torch.equal(honest["pasted"][~masked.expand_as(honest["pasted"])],
                       honest["original"][~masked.expand_as(honest["original"])])
    assert 0.6 < masked.float().mean() < 0.9  # 75% of patches masked
    # the same seed draws the same masks
    again = reconstruct(model, images, 0.75, seed=1)
    assert torch.equal(again["masked"], honest["masked"])


def test_grid_png_has_four_panels_per_image(tmp_path):
    model = create_model("mae_vit_test_patch4").eval()
    panels = reconstruct(model, _images(n=2), 0.75, seed=0)
    img = Image.open(save_grid(panels, tmp_path / "g.png", cell=64))
    assert img.size == (4 * 68 + 4, 18 + 2 * 68 + 4)


def test_probes_separate_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centers = torch.randn(4, 32, generator=g) * 3
    x = centers[y] + torch.randn(400, 32, generator=g)
    tr, va = split(400, 0.25, seed=0)
    assert len(va) == 100 and not set(tr) & set(va)
    assert linear_probe(x[tr], y[tr], x[va], y[va], 4, epochs=30) > 0.95
    assert knn(x[tr], y[tr], x[va], y[va], 4) > 0.95
    noise = torch.randn(400, 32, generator=g)
    assert linear_probe(noise[tr], y[tr], noise[va], y[va], 4, epochs=30) < 0.45
    assert knn(noise[tr], y[tr], noise[va], y[va], 4) < 0.45


def test_a_diverged_linear_probe_is_an_error_not_a_top1():
    # --lr 1e30 reported "linear probe top-1 25.0%": the argmax of non-finite logits
    from train.errors import EvalInputError

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    noise = torch.randn(200, 32, generator=g)  # features a head cannot fit: a huge step throws it far off
    with pytest.raises(EvalInputError, match=r"the linear probe diverged: its loss ended at .*lower --lr \(1e\+30\)"):
        linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4, epochs=20, lr=1e30)
    x = torch.randn(4, 32, generator=g)[y] * 3 + noise
    assert linear_probe(x[:150], y[:150], x[150:], y[150:], 4, epochs=20, lr=0.1) > 0.9


def test_load_pretrained_reads_every_kind_of_weights(tmp_path):
    torch.manual_seed(3)
    model = create_model("mae_vit_test_patch4")
    save_safetensors(model.state_dict(), tmp_path / "mae.safetensors", {"model": "mae_vit_test_patch4", "img_size": 32})
    export_encoder(model, tmp_path / "encoder.safetensors")
    full, info = load_pretrained(tmp_path)  # an `mae export` folder
    assert info["kind"] == "full" and torch.equal(full.decoder_pred.weight, model.decoder_pred.weight)
    enc, info = load_pretrained(tmp_path / "encoder.safetensors")
    assert info["kind"] == "encoder"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(enc.forward_features(x), model.eval().forward_features(x), atol=1e-6)
    r1, _ = load_pretrained("random:mae_vit_test_patch4", seed=5)
    r2, _ = load_pretrained("random:mae_vit_test_patch4", seed=5)
    assert torch.equal(r1.pos_embed, r2.pos_embed) and torch.equal(r1.blocks[0].attn.qkv.weight,
                                                                   r2.blocks[0].attn.qkv.weight)
    # an encoder alone cannot reconstruct: a clear error, not a traceback
    out = subprocess.run([sys.executable, "-m", "train.cli", "reconstruct", str(tmp_path / "encoder.safetensors"),
                          str(tmp_path), "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert out.returncode != 0 and "encoder only" in out.stderr and "Traceback" not in out.stderr


def test_an_official_mae_pth_loads_by_its_shapes(tmp_path):
    """The official release ships {'model': state_dict} .pth files without metadata:
    the size is recognized among the registered ones, the pickle read weights-only."""
    torch.manual_seed(4)
    model = create_model("mae_vit_test_patch4").eval()
    encoder_only = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain_vit_test.pth")
    loaded, info = load_pretrained(tmp_path / "mae_pretrain_vit_test.pth")
    assert info["kind"] == "encoder" and info["model"] == "mae_vit_test_patch4"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.forward_features(x), model.forward_features(x), atol=1e-6)
    odd = {**encoder_only, "cls_token": torch.zeros(1, 1, 48)}
    torch.save({"model": odd}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="no registered model has width 48"):
        load_pretrained(tmp_path / "odd.pth")


def test_a_validation_set_of_other_classes_is_refused_not_scored_against_the_wrong_names(tmp_path):
    """Labels are class indices: a validation set of `coffee` and `rocket` had its
    labels 0 and 1 scored as the training set's `astronaut` and `chelsea` (0.0%,
    exit 0). A one-class training set "learned" to 100%."""
    from tests.helpers.shards import jpeg_bytes
    from pipeline.shards.writer import ShardWriterConfig, write_shards
    from train.errors import EvalInputError
    from train.eval.probe import probe

    def dataset(name, classes):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(3):
                (tmp_path / name / c / f"{i}.jpg").write_bytes(jpeg_bytes((40, 32), seed=i))
        write_shards(str(tmp_path / name), str(tmp_path / f"{name}-shards"), ShardWriterConfig())
        return str(tmp_path / f"{name}-shards")

    train, subset, one = dataset("train", ["astronaut", "chelsea", "coffee"]), dataset("val", ["coffee", "rocket"]), \
        dataset("one", ["coffee"])
    with pytest.raises(EvalInputError, match="lists other classes than .*not in .*: astronaut, chelsea; only in "
                                             ".*: rocket"):
        probe("random:mae_vit_test_patch4", train, subset, epochs=1)
    with pytest.raises(EvalInputError, match="has 1 class\\(es\\): a classifier needs at least two"):
        probe("random:mae_vit_test_patch4", one, epochs=1)
    assert probe("random:mae_vit_test_patch4", train, train, epochs=1)["classes"] == 3
