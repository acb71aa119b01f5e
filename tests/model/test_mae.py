import pytest
import torch

from model import MAEConfig, MaskedAutoencoderViT, MaskTokenBaselineMAE, create_model, list_models, model_config
from model.flops import encoder_speedup_flop_ratio, mae_forward_flops
from model.mae import num_visible_patches
from model.weights import is_encoder_key

TEST = "mae_vit_test_patch4"


def _images(model: MaskedAutoencoderViT, n: int = 2) -> torch.Tensor:
    c = model.cfg
    return torch.randn(n, c.in_chans, c.img_size, c.img_size)


def _counts(model: torch.nn.Module) -> tuple[float, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for k, p in model.named_parameters() if is_encoder_key(k))
    return trainable / 1e6, encoder / 1e6


@pytest.mark.parametrize("name", list_models())
def test_shapes_for_every_registry_size(name):
    with torch.device("meta"):  # L/H would take GBs and seconds on CPU; shapes are the same
        model = create_model(name)
        imgs = _images(model)
        loss, pred, mask = model(imgs)
        feats = model.forward_features(imgs)
    c = model.cfg
    assert loss.shape == ()
    assert pred.shape == (2, c.num_patches, c.patch_size**2 * 3)
    assert mask.shape == (2, c.num_patches)
    assert feats.shape == (2, 1 + c.num_patches, c.embed_dim)


@pytest.mark.parametrize(
    "name, trainable_m, encoder_m",
    [
        ("mae_vit_base_patch16", 111.66, 86),
        ("mae_vit_large_patch16", 329.24, 304),
        ("mae_vit_huge_patch14", 656.61, 632),
    ],
)
def test_parameter_counts_match_official_release(name, trainable_m, encoder_m):
    with torch.device("meta"):
        model = create_model(name)
    trainable, encoder = _counts(model)
    assert round(trainable, 2) == trainable_m
    # the ~86/304/632M usually quoted include pos_embed and a 1000-class head
    assert encoder == pytest.approx(encoder_m, rel=0.01)


def test_real_forward_and_backward_small_size():
    model = create_model("mae_vit_tiny_patch16", img_size=64)
    loss, pred, mask = model(_images(model))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.cls_token.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is None and not model.pos_embed.requires_grad


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.9, 0.0])
def test_masking_keeps_exactly_int_L_times_one_minus_r(ratio):
    model = create_model(TEST)
    L = model.cfg.num_patches
    x = torch.randn(3, L, 8)
    x_masked, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert x_masked.shape == (3, keep, 8)
    assert mask.sum(dim=1).tolist() == [L - keep] * 3
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_ids_restore_inverts_the_shuffle():
    model = create_model(TEST)
    L, D = model.cfg.num_patches, model.cfg.decoder_embed_dim
    token_ids = torch.arange(L, dtype=torch.float32)[None, :, None].expand(2, L, D)  # token i holds value i
    x_masked, mask, ids_restore = model.random_masking(token_ids, 0.75)
    # visible tokens are exactly the unmasked positions
    for n in range(2):
        assert sorted(x_masked[n, :, 0].long().tolist()) == torch.nonzero(mask[n] == 0).flatten().tolist()
    latent = torch.cat([torch.full((2, 1, D), -1.0), x_masked], dim=1)
    with torch.no_grad():
        model.mask_token.fill_(-7.0)
    restored = model._decoder_tokens(latent, ids_restore)
    assert restored.shape == (2, 1 + L, D)
    visible = mask == 0
    positions = torch.arange(L, dtype=torch.float32).expand(2, L)
    torch.testing.assert_close(restored[:, 1:, 0][visible], positions[visible])
    assert (restored[:, 1:, 0][~visible] == -7.0).all()
    assert (restored[:, 0] == -1.0).all()


def test_caller_noise_gives_identical_outputs_and_controls_the_mask():
    model = create_model(TEST).eval()
    imgs = _images(model)
    noise = torch.rand(2, model.cfg.num_patches)
    a = model(imgs, 0.75, noise)
    b = model(imgs, 0.75, noise.clone())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    keep = num_visible_patches(model.cfg.num_patches, 0.75)
    expected_visible = torch.argsort(noise, dim=1)[:, :keep]
    assert (a[2].gather(1, expected_visible) == 0).all()  # lowest noise = visible
    c = model(imgs, 0.75, torch.rand(2, model.cfg.num_patches))
    assert not torch.equal(a[2], c[2])


def test_bad_noise_or_ratio_or_image_shape_is_a_clear_error():
    model = create_model(TEST)
    imgs = _images(model)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(imgs, 0.75, torch.rand(2, 3))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(imgs, 1.0)
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(2, 3, 48, 48))


def test_loss_ignores_visible_patches_and_follows_masked_ones():
    model = create_model(TEST)
    imgs = _images(model)
    loss, pred, mask = model(imgs)
    pred, mask = pred.detach(), mask.detach()
    base = model.forward_loss(imgs, pred, mask)
    patches = model.patchify(imgs)
    visible = torch.nonzero(mask[0] == 0)[0].item()
    masked = torch.nonzero(mask[0] == 1)[0].item()

    changed = patches.clone()
    changed[0, visible] = torch.randn_like(changed[0, visible]) * 5
    torch.testing.assert_close(model.forward_loss(model.unpatchify(changed), pred, mask), base)

    changed = patches.clone()
    changed[0, masked] = torch.randn_like(changed[0, masked]) * 5
    assert abs(model.forward_loss(model.unpatchify(changed), pred, mask) - base) > 1e-3


def test_norm_pix_target_matches_hand_computation():
    model = create_model(TEST)
    imgs = _images(model, n=1)
    target = model.patch_targets(imgs)
    p = model.cfg.patch_size
    # patch (row 1, col 2): pixels ordered (row-in-patch, col-in-patch, channel)
    values = [imgs[0, ch, 1 * p + i, 2 * p + j].item() for i in range(p) for j in range(p) for ch in range(3)]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased, as the official code
    expected = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in values])
    torch.testing.assert_close(target[0, 1 * model.cfg.grid_size + 2], expected, atol=1e-5, rtol=1e-5)


def test_patchify_round_trip_and_loss_without_norm_pix():
    model = create_model(TEST, norm_pix_loss=False)
    imgs = _images(model)
    torch.testing.assert_close(model.unpatchify(model.patchify(imgs)), imgs)
    pred = model.patchify(imgs)
    mask = torch.ones(2, model.cfg.num_patches)
    assert model.forward_loss(imgs, pred, mask).item() == 0.0
    assert model.forward_loss(imgs, pred + 2.0, mask).item() == pytest.approx(4.0)


def test_init_follows_the_paper():
    model = create_model("mae_vit_small_patch16")
    qkv = model.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5  # xavier-uniform
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    w = model.patch_embed.proj.weight.view(model.cfg.embed_dim, -1)
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5


def test_activation_checkpointing_gives_the_same_gradients():
    ref = create_model(TEST)
    ckpt = create_model(TEST)
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_grad_checkpointing(True)
    imgs, noise = _images(ref), torch.rand(2, ref.cfg.num_patches)
    ref(imgs, 0.75, noise)[0].backward()
    ckpt(imgs, 0.75, noise)[0].backward()
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_runs_on_cpu_and_stays_close_to_fp32():
    model = create_model(TEST)
    imgs, noise = _images(model), torch.rand(2, model.cfg.num_patches)
    loss32, _, _ = model(imgs, 0.75, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pred16, _ = model(imgs, 0.75, noise)
    assert pred16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    loss16.backward()
    assert torch.isfinite(model.blocks[0].mlp.fc1.weight.grad).all()


def test_mask_token_baseline_shares_weights_and_shapes():
    mae = create_model(TEST)
    base = create_model(TEST, baseline=True)
    assert isinstance(base, MaskTokenBaselineMAE)
    mae_sd, base_sd = mae.state_dict(), base.state_dict()
    assert set(base_sd) - set(mae_sd) == {"encoder_mask_token"}
    assert all(base_sd[k].shape == v.shape for k, v in mae_sd.items())
    missing, unexpected = base.load_state_dict(mae_sd, strict=False)
    assert missing == ["encoder_mask_token"] and unexpected == []

    imgs, noise = _images(mae), torch.rand(2, mae.cfg.num_patches)
    latent, mask, _ = base.forward_encoder(imgs, 0.75, noise)
    mae_latent, mae_mask, _ = mae.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + mae.cfg.num_patches, mae.cfg.embed_dim)  # every token encoded
    assert mae_latent.shape[1] == 1 + num_visible_patches(mae.cfg.num_patches, 0.75)
    assert torch.equal(mask, mae_mask)
    loss_b, pred_b, _ = base(imgs, 0.75, noise)
    assert pred_b.shape == mae(imgs, 0.75, noise)[1].shape
    # with no masking the two encoders see the same tokens and agree exactly
    torch.testing.assert_close(base.forward_encoder(imgs, 0.0)[0], mae.forward_features(imgs))


def test_flop_ratio_matches_a_hand_count_and_the_paper():
    cfg = model_config("mae_vit_large_patch16")
    # ViT-L encoder on 50 vs 197 tokens dominates; the paper puts the ratio near 3.3x
    assert encoder_speedup_flop_ratio(cfg) == pytest.approx(3.3, abs=0.1)
    tiny = MAEConfig(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                     decoder_embed_dim=4, decoder_depth=1, decoder_num_heads=1, mlp_ratio=1.0)
    # L=4, keep 1 -> 2 encoder tokens. per block: qkv 2*T*D*3D, attn 4*T*T*D, proj 2*T*D*D, mlp 4*T*D*D
    block = lambda t, d: 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * d  # noqa: E731
    encoder = 2 * 4 * 48 * 8 + block(2, 8)
    decoder = 2 * 2 * 8 * 4 + block(5, 4) + 2 * 5 * 4 * 48
    flops = mae_forward_flops(tiny, 0.75)
    assert flops["encoder"] == encoder and flops["decoder"] == decoder


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="img_size"):
        MAEConfig(img_size=225, patch_size=16)
    with pytest.raises(ValueError, match="decoder_embed_dim"):
        MAEConfig(decoder_embed_dim=500, decoder_num_heads=16)
    with pytest.raises(ValueError, match="valid names"):
        create_model("mae_vit_gigantic")


def test_whole_mae_forward_traces_as_one_graph():
    model = create_model(TEST)
    explanation = torch._dynamo.explain(model)(_images(model), 0.75, torch.rand(2, model.cfg.num_patches))
    assert explanation.graph_break_count == 0


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = create_model(TEST)
    imgs, noise = _images(model), torch.rand(2, model.cfg.num_patches)
    eager = model(imgs, 0.75, noise)
    compiled = torch.compile(model)(imgs, 0.75, noise)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
