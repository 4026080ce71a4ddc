import contextlib
import gc
import weakref

import pytest
import torch

import models


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", sorted(models.CNN_PRESETS))
def test_cnn_shapes(preset, channels):
    model = models.build_model(models.cnn_config(preset, in_channels=channels, num_classes=7)).eval()
    x = torch.rand(2, channels, 32, 32)
    widths = models.CNN_PRESETS[preset]["widths"]
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, widths[-1])
    assert [models.layer_channels(model, f"block{i}.conv2", size=32) for i in (1, 2, 3)] == list(widths)


def test_cnn_normalizes_its_input_inside():
    cfg = models.cnn_config("small", mean=[0.1, 0.2, 0.3], std=[0.5, 0.4, 0.2])
    model = models.build_model(cfg).eval()
    x = torch.rand(3, 3, 32, 32)
    expected = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)


def test_layer_names_read_well_and_bad_names_list_the_valid_ones():
    model = models.build_model(models.cnn_config("small"))
    layers = models.list_layers(model)
    for name in ["whiten", "block1.conv1", "block1.act1", "block2.conv2", "block3.act2", "head"]:
        assert name in layers
        assert models.get_layer(model, name) is dict(model.named_modules())[name]
    with pytest.raises(ValueError, match="block1.conv1") as e:
        models.get_layer(model, "block9.conv1")
    assert "block9.conv1" in str(e.value)


def test_whitening_layer_whitens_patches():
    torch.manual_seed(0)
    # correlated images: smooth noise with a colour cast
    x = torch.nn.functional.avg_pool2d(torch.rand(200, 3, 34, 34), 3, 1) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)
    model = models.build_model(models.cnn_config("small"))
    model.init_whiten(x, eps=1e-9)
    with torch.no_grad():
        out = model.whiten(model.normalize(x)) - model.whiten.bias.view(1, -1, 1, 1)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)  # the 12 eigen-filters (the rest are negatives)
    cov = half.T @ half / len(half)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.allclose(out[:, 12:], -out[:, :12])
    # the filters from the patches' highest variance to their lowest, as Classifier.ipynb shows them: a filter's
    # variance before scaling (1 / |filter|^2 of the eigenvector scaled by 1 / sqrt(its eigenvalue)) falls
    variance = 1 / model.whiten.weight[:12].flatten(1).pow(2).sum(1)
    assert (variance[:-1] >= variance[1:]).all() and variance[0] > 10 * variance[-1]
    assert not model.whiten.weight.requires_grad


def test_whitening_reads_uint8_images_as_images():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = models.build_model(models.cnn_config("small")), models.build_model(models.cnn_config("small"))
    a.init_whiten(images)
    b.init_whiten(images.float() / 255)
    torch.testing.assert_close(a.whiten.weight, b.whiten.weight)


def test_models_read_uint8_images_and_keep_their_own_config():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    config = models.cnn_config("small")
    cnn, vae = models.build_model(config).eval(), models.build_model(models.vae_config("small")).eval()
    with torch.no_grad():
        torch.testing.assert_close(cnn(images), cnn(images.float() / 255))
        torch.testing.assert_close(vae.encode(images)[0], vae.encode(images.float() / 255)[0])
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        torch.testing.assert_close(vae.elbo(images, generator=gen())["bpd"],
                                   vae.elbo(images.float() / 255, generator=gen())["bpd"])
    config["widths"] = [8, 8, 8]  # edited after the build: the model's own config is untouched
    assert cnn.config["widths"] == [16, 32, 32]


def test_a_double_vae_samples_in_its_own_dtype():
    vae = models.build_model(models.vae_config("small")).double().eval()
    with torch.no_grad():
        assert vae.sample(2).dtype == vae.sample_aggregate(2).dtype == torch.float64


def test_aggregate_samples_come_from_the_fitted_latent_gaussian():
    """sample_aggregate decodes z from N(latent_mean, latent_cov), not from the prior N(0, I)."""
    vae = models.build_model(models.vae_config("small")).eval()
    d = vae.latent_dim
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=gen) / d ** 0.5
    mean, cov = torch.randn(d, generator=gen), a @ a.T + 0.5 * torch.eye(d)  # correlated, off the prior
    vae.latent_mean.copy_(mean)
    vae.latent_cov.copy_(cov)
    vae.decode = lambda z: z  # the latents themselves
    z = vae.sample_aggregate(50000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.05, rtol=0)


def test_bn_scale_is_frozen_and_momentum_follows_airbench():
    model = models.build_model(models.cnn_config("small"))
    bn = model.block1.bn1
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    assert bn.momentum == pytest.approx(0.4) and bn.eps == 1e-12


def test_bad_config_errors():
    with pytest.raises(ValueError, match="airbench"):
        models.cnn_config("huge")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['latent_dims'\] for a vae; valid: .*latent_dim"):
        models.vae_config("small", latent_dims=8)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['width'\] for a cnn; valid: .*widths"):
        models.cnn_config("small", width=(8, 8, 8))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['kind'\] for a cnn"):  # a CNN's config says vae
        models.cnn_config("small", kind="vae")
    for bad in (3.0, "3", 0):  # was "can't multiply sequence by non-int" for the default statistics
        with pytest.raises(ValueError, match=f"in_channels must be an int >= 1, got {bad!r}"):
            models.cnn_config("small", in_channels=bad)
    with pytest.raises(ValueError, match=r"widths must give the channels of 3 stages \(3 ints >= 1\), got \(16, 32\)"):
        models.vae_config("small", widths=(16, 32))
    with pytest.raises(ValueError, match=r"widths must give the channels of 3 stages \(3 ints >= 1\), got 64"):
        models.cnn_config("small", widths=64)  # was a TypeError on len()
    with pytest.raises(ValueError, match=r"mixtures must be an int >= 1 \(logistics per pixel\), got 0"):
        models.vae_config("small", mixtures=0)  # was an error deep inside a convolution
    with pytest.raises(ValueError, match="kind"):
        models.build_model({"kind": "transformer"})
    for build, key, value, what in [  # each used to train silently on nonsense or fail deep inside torch
            (models.cnn_config, "bn_momentum", 1.5, r"a number in \[0, 1\) \(the old running statistics' weight\)"),
            (models.cnn_config, "logit_scale", 1j, "a number > 0"),  # was a TypeError converting it to float
            (models.cnn_config, "logit_scale", 0, "a number > 0"),
            (models.cnn_config, "whiten_kernel", 0, r"an int >= 1 \(pixels\)"),
            (models.vae_config, "latent_dim", 1.5, "an int >= 1")]:
        with pytest.raises(ValueError, match=rf"{key} must be {what}, got {value}"):
            build("small", **{key: value})
    with pytest.raises(ValueError, match=r"std must be > 0 for every channel, got \[0.2, 0.0, 0.2\]"):
        models.cnn_config("small", std=[0.2, 0.0, 0.2])  # a constant channel: was a NaN loss blamed on the lr
    with pytest.raises(ValueError, match=r"mean must give one number per input channel \(3\), got \[0.5\]"):
        models.cnn_config("small", mean=[0.5])
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 2.5"):
        models.cnn_config("small", num_classes=2.5)


def test_recorder_keeps_nothing_past_a_pass():
    """A pass's outputs, and the autograd graph they hold, live only as long as the caller keeps them: a
    render step's graph is gone before the next step (a CUDA graph's capture needs it gone)."""
    model = models.build_model(models.cnn_config("small")).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with models.Recorder(model, ["block1.act2", None]).hooked() as run:
        for _ in range(2):  # the first pass learns how the model runs, the second is a plain one
            acts = run(x)
            held = [weakref.ref(a) for a in acts.values()]
            del acts
            gc.collect()
            assert all(ref() is None for ref in held)


class Pair(torch.nn.Module):
    """A layer whose output is not a tensor."""

    def forward(self, x):
        return x, x


def test_capture_returns_layer_outputs_and_leaves_no_hooks():
    model = models.build_model(models.cnn_config("small")).train()
    x = torch.rand(2, 3, 32, 32)
    maps = models.capture(model, x, ["block1.act2", "block3.conv1"])
    with torch.no_grad():
        model.eval()
        h = model.whiten_act(model.whiten(model.normalize(x)))
        expected = model.block1(h)
    assert torch.allclose(maps["block1.act2"], expected) and maps["block3.conv1"].shape == (2, 32, 7, 7)
    graphed = models.capture(model, x.clone().requires_grad_(), "block1.act2")["block1.act2"]
    assert not graphed.requires_grad  # no graph is kept, whatever the images
    assert all(not m._forward_hooks for m in model.modules())
    model.train()
    models.capture(model, x, ["head"])
    assert model.training
    with pytest.raises(ValueError, match="valid layers"):
        models.capture(model, x, ["nope"])
    model.spare = torch.nn.ReLU()  # a module the forward pass never calls
    with pytest.raises(ValueError, match=r"layer 'spare' does not run in CNN's forward pass in eval mode \(a layer "
                                         r"some models run only in training"):
        models.capture(model, x, ["spare"])
    with pytest.raises(TypeError, match="layer '0' outputs a tuple, not a tensor"):
        models.capture(torch.nn.Sequential(Pair()), torch.rand(2, 3, 4, 4), ["0"])
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_channels():
    model = models.build_model(models.cnn_config("small", in_channels=1, image_size=28))
    assert models.layer_channels(model, "block2.conv1") == 32
    assert models.layer_channels(model, "whiten") == 8 and models.layer_channels(model, "head") == 10


def test_evaluating_restores_modes_and_flags_and_drops_hooks_added_inside():
    model = models.build_model(models.cnn_config("small")).train()
    model.block2.eval()  # a mixed state must come back exactly
    model.head.weight.requires_grad_(False)
    kept = model.block1.register_forward_hook(lambda *a: None)  # the caller's own hook stays
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    for fail in (False, True):
        with pytest.raises(KeyboardInterrupt) if fail else contextlib.nullcontext():
            with models.evaluating(model, None):
                assert not any(m.training for m in model.modules())
                assert not any(p.requires_grad for p in model.parameters())
                model.block3.register_forward_hook(lambda *a: None)
                model.head.register_forward_pre_hook(lambda *a: None)
                if fail:
                    raise KeyboardInterrupt
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert list(model.block1._forward_hooks) == [kept.id]
        assert not model.block3._forward_hooks and not model.head._forward_pre_hooks


def test_input_channels_from_the_config_or_the_first_convolution():
    assert models.input_channels(models.build_model(models.cnn_config("small", in_channels=1))) == 1
    assert models.input_channels(torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3))) == 4
    with pytest.raises(ValueError, match="cannot tell how many input channels"):
        models.input_channels(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


def test_exact_gives_float64_on_the_tensors_device_where_it_has_float64():
    t = torch.rand(3, dtype=torch.float16)
    wide = models.exact(t)
    assert wide.dtype == torch.float64 and wide.device == t.device and torch.equal(wide.half(), t)


def test_the_whitening_is_fitted_only_to_images_of_the_models_channels():
    rgb = models.build_model(models.cnn_config("small"))
    before = rgb.whiten.weight.clone()
    with pytest.raises(ValueError, match="images have 1 channel.*the model takes 3"):  # gray images would broadcast into three equal channels
        rgb.init_whiten(torch.rand(8, 1, 32, 32))
    assert torch.equal(rgb.whiten.weight, before)


def test_the_cnns_global_pool_is_adaptive_max_pools_values_and_gradient_with_a_deterministic_backward():
    x = torch.randn(4, 8, 3, 5, requires_grad=True)  # distinct values: one maximum per channel
    ours, theirs = models.GlobalMaxPool()(x), torch.nn.AdaptiveMaxPool2d(1)(x)
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    assert torch.equal(*(torch.autograd.grad(y, x, g)[0] for y in (ours, theirs)))
    # where a channel's largest value is tied (often so in bf16), amax shares its gradient, where the pool gave it
    # to one position: the one difference, which retrained the bf16 classifiers to other weights
    tied = torch.tensor([[[[1.0, 3.0], [3.0, 0.0]]]], requires_grad=True)
    assert torch.autograd.grad(models.GlobalMaxPool()(tied).sum(), tied)[0].flatten().tolist() == [0, 0.5, 0.5, 0]
    assert torch.autograd.grad(torch.nn.AdaptiveMaxPool2d(1)(tied).sum(), tied)[0].sum() == 1
    # AdaptiveMaxPool2d's CUDA backward refuses torch.use_deterministic_algorithms(True) (no GPU here to show it)
    model = models.build_model(models.cnn_config("small"))
    assert not any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in model.modules())
