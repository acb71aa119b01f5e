"""The classifier: layer-wise lr decay with the official layer assignment, weight
decay exclusions, drop path, partial freezing, and starting from MAE weights."""

import pytest
import torch

from model.classifier import ClassifierConfig, ViTClassifier, layer_id, param_groups_lrd
from model.registry import create_model, model_config
from model.vit import DropPath
from model.weights import CheckpointMismatchError, load_classifier_state_dict


def _classifier(**kw) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(ClassifierConfig.from_encoder(model_config("mae_vit_test_patch4"), 10, **kw))


def _by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in groups for p in g["params"]}


def test_lr_scales_follow_the_official_layer_assignment():
    model = _classifier()  # depth 2: layers 0 (embeddings), 1-2 (blocks), 3 (fc_norm, head)
    groups = param_groups_lrd(model, 0.05, 0.75)
    of = _by_name(model, groups)
    assert set(of) == {n for n, _ in model.named_parameters()}  # every parameter, once
    expected = {"cls_token": 0.75**3, "pos_embed": 0.75**3, "patch_embed.proj.weight": 0.75**3,
                "patch_embed.proj.bias": 0.75**3, "blocks.0.attn.qkv.weight": 0.75**2, "blocks.0.norm1.bias": 0.75**2,
                "blocks.1.mlp.fc2.weight": 0.75, "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, scale in expected.items():
        assert of[name]["lr_scale"] == pytest.approx(scale), name
    for name, g in of.items():  # decay^(num_layers + 1 - layer_id) for every parameter
        assert g["lr_scale"] == pytest.approx(0.75 ** (2 + 1 - layer_id(name, 2))), name
    assert layer_id("blocks.11.attn.qkv.weight", 12) == 12 and layer_id("norm.weight", 12) == 13


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = _classifier()
    of = _by_name(model, param_groups_lrd(model, 0.05, 0.75))
    no_decay = {n for n, g in of.items() if g["weight_decay"] == 0.0}
    assert {"cls_token", "pos_embed", "fc_norm.weight", "fc_norm.bias", "head.bias", "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.bias", "patch_embed.proj.bias"} <= no_decay
    decayed = set(of) - no_decay
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("cls_token", "pos_embed")}
    assert all(of[n]["weight_decay"] == 0.05 for n in decayed)


def test_partial_fine_tuning_freezes_all_but_the_last_blocks():
    model = _classifier()
    model.freeze_except_last(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "fc_norm.", "head."))}
    assert set(_by_name(model, param_groups_lrd(model, 0.05, 0.75))) == trainable  # frozen ones get no group
    model.freeze_except_last(0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    model.freeze_except_last(None)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="trainable_blocks"):
        model.freeze_except_last(3)


def test_drop_path_is_the_identity_in_eval_and_stochastic_depth_in_training():
    with_dp, without = _classifier(drop_path=0.5), _classifier(drop_path=0.0)
    without.load_state_dict(with_dp.state_dict())
    assert isinstance(with_dp.blocks[1].drop_path, DropPath) and with_dp.blocks[1].drop_path.p == 0.5
    assert isinstance(with_dp.blocks[0].drop_path, torch.nn.Identity)  # linear from 0: the first block gets 0
    x = torch.randn(4, 3, 32, 32)
    with_dp.eval(), without.eval()
    assert torch.equal(with_dp(x), without(x))
    with_dp.train(), without.train()
    assert not torch.equal(with_dp(x), without(x))
    dp = DropPath(0.3).train()
    out = dp(torch.ones(20000, 3, 2))
    kept = out[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.015
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))  # survivors rescaled: same expectation
    assert torch.equal(dp.eval()(out), out)


def test_starts_from_an_mae_encoder_as_the_official_code():
    torch.manual_seed(5)
    mae = create_model("mae_vit_test_patch4").eval()
    probe = _classifier(global_pool=False, head="bn_linear")
    assert load_classifier_state_dict(probe, mae.state_dict()) == "encoder"  # the decoder is ignored
    x = torch.randn(3, 3, 32, 32)
    probe.eval()
    assert torch.allclose(probe.forward_features(x), mae.forward_features(x)[:, 0], atol=1e-6)  # cls after norm
    pooled = _classifier()
    fc_norm = pooled.fc_norm.weight.clone()
    assert load_classifier_state_dict(pooled, mae.state_dict()) == "encoder"
    assert not hasattr(pooled, "norm") and torch.equal(pooled.fc_norm.weight, fc_norm)  # norm dropped, fc_norm kept
    assert torch.equal(pooled.blocks[1].mlp.fc1.weight, mae.blocks[1].mlp.fc1.weight)
    std = pooled.head.weight.std().item()
    assert 1e-5 < std < 3e-5 and pooled.head.bias.abs().max() == 0  # head ~ N(0, 2e-5)
    assert 0.005 < probe.head[1].weight.std().item() < 0.015 and not probe.head[0].affine


def test_position_embeddings_are_resized_for_a_larger_input_and_mismatches_are_named():
    mae = create_model("mae_vit_test_patch4")
    big = _classifier(img_size=64)
    load_classifier_state_dict(big, mae.state_dict())
    assert big.pos_embed.shape == (1, 1 + 16 * 16, 64) and torch.equal(big.pos_embed[:, :1], mae.pos_embed[:, :1])
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    sd = {k: v for k, v in mae.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(12\): blocks\.1\."):
        load_classifier_state_dict(_classifier(), sd)
    trained = _classifier()
    other = ViTClassifier(ClassifierConfig.from_encoder(model_config("mae_vit_test_patch4"), 7))
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight \(10, 64\) vs \(7, 64\)"):
        load_classifier_state_dict(other, trained.state_dict())
    again = _classifier()
    assert load_classifier_state_dict(again, trained.state_dict()) == "classifier"


def test_an_encoder_with_more_than_the_classifier_takes_or_a_broken_grid_is_refused():
    # a depth-3 encoder fine-tuned into 2 blocks without a word, a stray tensor ignored; a non-square
    # pos_embed a ValueError traceback from the resize
    mae = create_model("mae_vit_test_patch4")
    sd = mae.state_dict()
    deeper = {**sd, **{k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")}}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(12\): blocks\.2\."):
        load_classifier_state_dict(_classifier(), deeper)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): evil"):
        load_classifier_state_dict(_classifier(), {**sd, "evil": torch.zeros(1)})
    for cut in (51, 1):  # 50 grid positions, then none
        bad = {**sd, "pos_embed": sd["pos_embed"][:, :cut].clone()}
        with pytest.raises(CheckpointMismatchError, match=f"pos_embed has {cut - 1} grid positions, not a square"):
            load_classifier_state_dict(_classifier(), bad)
