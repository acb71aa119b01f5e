import pickle

import pytest
import torch

from model import create_model
from model.weights import CheckpointMismatchError, encoder_state_dict, load_mae_state_dict
from train.errors import WeightsError
from train.weights.files import export_encoder, read_state_dict, save_safetensors

TEST = "mae_vit_test_patch4"
# The official release's names (timm ViT + MAE decoder) for a 1-block encoder/decoder.
OFFICIAL_KEYS_DEPTH1 = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    *(f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
      for p in ("weight", "bias")),
    "norm.weight", "norm.bias", "mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed",
    *(f"decoder_blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
      for p in ("weight", "bias")),
    "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
}


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    imgs = torch.randn(2, 3, c.img_size, c.img_size, generator=g)
    return model(imgs, 0.75, torch.rand(2, c.num_patches, generator=g))[0]


def test_state_dict_uses_official_key_names():
    model = create_model(TEST, depth=1)
    assert set(model.state_dict()) == OFFICIAL_KEYS_DEPTH1


def test_official_style_full_checkpoint_round_trip_strict(tmp_path):
    src = create_model(TEST)
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = create_model(TEST)
    assert load_mae_state_dict(dst, read_state_dict(path)) == "full"
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    assert _loss(dst).item() == _loss(src).item()


def test_encoder_only_checkpoint_loads_and_keeps_decoder(tmp_path):
    src = create_model(TEST)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": encoder_state_dict(src)}, path)
    dst = create_model(TEST)
    decoder_before = dst.decoder_pred.weight.clone()
    assert load_mae_state_dict(dst, read_state_dict(path)) == "encoder"
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.equal(dst.decoder_pred.weight, decoder_before)


def test_mismatched_checkpoint_error_lists_missing_and_unexpected_keys():
    sd = create_model(TEST).state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_mae_state_dict(create_model(TEST), {"model": sd})
    msg = str(e.value)
    assert "missing (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected (1): head.weight" in msg


def test_other_size_is_refused_with_shape_mismatch():
    sd = create_model(TEST, embed_dim=32).state_dict()
    with pytest.raises(CheckpointMismatchError, match="shape mismatch .*blocks.0.attn.qkv.weight"):
        load_mae_state_dict(create_model(TEST), sd)


def test_pos_embed_is_resized_for_another_resolution():
    src = create_model(TEST)  # 32 px, grid 8
    dst = create_model(TEST, img_size=64)  # grid 16
    load_mae_state_dict(dst, encoder_state_dict(src))
    assert dst.pos_embed.shape == (1, 1 + 16 * 16, 64)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])


def test_ddp_module_prefix_is_accepted():
    src = create_model(TEST)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    dst = create_model(TEST)
    assert load_mae_state_dict(dst, sd) == "full"
    assert torch.equal(dst.cls_token, src.cls_token)


def test_encoder_exports_as_safetensors_in_timm_layout(tmp_path):
    from safetensors import safe_open

    model = create_model(TEST)
    path = export_encoder(model, tmp_path / "encoder.safetensors")
    sd = read_state_dict(path)
    assert set(sd) == {k for k in OFFICIAL_KEYS_DEPTH1 if k.split(".")[0] in
                       ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")} | {
        k.replace("blocks.0.", "blocks.1.") for k in OFFICIAL_KEYS_DEPTH1 if k.startswith("blocks.0.")}
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["embed_dim"] == "64"
    fresh = create_model(TEST)
    load_mae_state_dict(fresh, sd)
    torch.testing.assert_close(fresh.forward_features(torch.ones(1, 3, 32, 32)),
                               model.forward_features(torch.ones(1, 3, 32, 32)))
    assert not list(tmp_path.glob("*.tmp"))


def test_full_model_safetensors_round_trip(tmp_path):
    model = create_model(TEST)
    path = save_safetensors(model.state_dict(), tmp_path / "mae.safetensors")
    dst = create_model(TEST)
    load_mae_state_dict(dst, read_state_dict(path))
    assert _loss(dst).item() == _loss(model).item()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(WeightsError, match="refused to load .*objects other than tensors"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_non_tensor_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="bad.pth: checkpoint holds no state dict of tensors"):
        read_state_dict(tmp_path / "bad.pth")


def test_weights_that_would_hang_or_mislead_are_refused(tmp_path):
    """A pipe waited for a writer forever; NaN or integer weights were plotted,
    converted and fine-tuned without a word."""
    import os

    from safetensors.torch import save_file

    os.mkfifo(tmp_path / "pipe.safetensors")
    for name in ("pipe.safetensors", "/dev/zero"):
        with pytest.raises(WeightsError, match="a (named pipe|character device), not a file"):
            read_state_dict(tmp_path / name)
    for name, tensor, problem in [("nan.pth", torch.tensor([1.0, float("nan")]), "holds NaN or infinite values"),
                                  ("inf.safetensors", torch.tensor([float("inf")]), "holds NaN or infinite values"),
                                  ("int.safetensors", torch.tensor([1], dtype=torch.int32), "is torch.int32, not "
                                                                                              "floating point")]:
        sd = {"cls_token": tensor}
        save_file(sd, tmp_path / name) if name.endswith(".safetensors") else torch.save({"model": sd}, tmp_path / name)
        with pytest.raises(WeightsError, match=f"{name}: tensor 'cls_token' {problem}"):
            read_state_dict(tmp_path / name)
