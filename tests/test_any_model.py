"""Feature visualization, exemplars and attribution for models that are not ours and sizes other than 32 px.

The four kinds of model: a 28 px 1-channel nn.Sequential (Fashion-MNIST-like), our 32 px CNN, a
torchvision resnet18 at 32 px, and our CNN at 64 px; and a fifth, an nn.Sequential that takes only 23x40
images (not square). Weights are untrained: what is checked is that every
technique that applies renders at the model's own size and raises the activation, and that the rest
fail with an error that says what to do.
"""
import ast
import copy
import functools
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import atlas
import attribution
import data
import featureviz as fv
import metrics
import models
import training
import utils

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


def sequential_28():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).eval()


def sequential_23x40():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 5 * 10, 10)).eval()  # its linear layer fits 23x40 alone


def cnn(size):
    torch.manual_seed(0)
    return models.build_model(models.cnn_config("small", image_size=size)).eval()


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def vae():
    torch.manual_seed(0)
    return models.build_model(models.vae_config("small")).eval()


# name -> (build, size to pass (None: the model records it), channels, a channel target)
MODELS = {
    "sequential 28 px, 1 channel": (sequential_28, 28, 1, fv.Channel("3", 5)),
    "our CNN at 32 px": (lambda: cnn(32), None, 3, fv.Channel("block2.act2", 3)),
    "resnet18 at 32 px": (resnet18, 32, 3, fv.Channel("layer3.1.conv2", 7)),
    "our CNN at 64 px": (lambda: cnn(64), None, 3, fv.Channel("block3.act2", 1)),
    "sequential 23x40 px": (sequential_23x40, (23, 40), 3, fv.Channel("3", 5)),
}
LATENT_FITS = {"our CNN at 32 px", "resnet18 at 32 px"}  # the VAE draws 3-channel 32 px images
KNOWN_CHANNELS = {"sequential 28 px, 1 channel": 16, "our CNN at 32 px": 32, "resnet18 at 32 px": 512,
                  "our CNN at 64 px": 32, "sequential 23x40 px": 16}  # the channels of each one's last spatial layer


def _size_kw(size):
    return {} if size is None else dict(size=size)


def _magnitude(channels, size):
    """A magnitude spectrum for MaCo at the model's channels and size (a side or (h, w)) (of random images: any
    will do)."""
    shape = (8, channels, *models.image_shape(size))
    return fv.magnitude_spectrum(torch.rand(shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("technique", fv.TECHNIQUE_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_every_technique_renders_at_the_model_size_or_says_why_not(name, technique):
    build, size, channels, channel = MODELS[name]
    model = build()
    h, w = models.input_size(model, size)
    how = fv.techniques(vae()) if technique in fv.LATENT_TECHNIQUES else fv.techniques(
        magnitude=_magnitude(channels, (h, w)))
    if technique in fv.LATENT_TECHNIQUES and name not in LATENT_FITS:
        with pytest.raises(ValueError, match=rf"the VAE makes 3-channel 32x32 images and the model takes "
                                             rf"{channels}-channel {h}x{w} ones"):
            how[technique](model, [0], steps=2, progress=False, **_size_kw(size))
        return
    r = how[technique](model, [fv.Class(1), channel], steps=24, progress=False, **_size_kw(size))
    assert r.images.shape == (2, channels, h, w)
    assert r.images.min() >= 0 and r.images.max() <= 1
    if technique != "pixel+reg":  # (its penalties outweigh an untrained model's tiny activations)
        assert (r.history[-4:].mean(0) > r.history[:4].mean(0)).all(), r.history  # it climbs on every target
    assert sum(len(getattr(m, h)) for m in model.modules() for h in HOOKS) == 0


@pytest.mark.parametrize("name", MODELS)
def test_diversity_and_exemplars_follow_the_model(name):
    build, size, channels, channel = MODELS[name]
    model = build()
    h, w = models.input_size(model, size)
    layer = models.last_spatial_layer(model, size)
    kw = dict(images_per_target=2, steps=3, progress=False, **_size_kw(size))
    r = fv.render(model, [channel], regularizers=[fv.Diversity(1.0)], **kw)
    assert r.images.shape == (2, channels, h, w)
    assert not torch.equal(r.images, fv.render(model, [channel], regularizers=[fv.Diversity(0.0)], **kw).images)
    images = torch.randint(0, 256, (20, channels, h, w), dtype=torch.uint8)
    ex = fv.exemplars(model, images, channel, k=3)
    with torch.no_grad():  # the channel's mean, one image at a time, through a plain hook
        maps = []
        hook = models.get_layer(model, channel.layer).register_forward_hook(lambda m, a, out: maps.append(out))
        for image in images:
            model(image[None].float() / 255)
        hook.remove()
    by_hand = torch.cat(maps)[:, channel.channel].float().mean((1, 2))
    assert torch.allclose(ex.top_values, by_hand.topk(3).values, atol=1e-5)
    assert torch.equal(ex.top, by_hand.topk(3).indices)
    assert models.layer_channels(model, layer, size) == KNOWN_CHANNELS[name]
    cam = attribution.grad_cam(model, images[:2], 0)  # default layer: the last spatial one
    assert cam.shape == (2, h, w)


def test_naturalness_reads_a_model_of_images_that_are_not_square_at_their_size():
    """The independent model's blocks are found at the images' (height, width): this one's linear layer takes
    23x40 images alone. Renders of another size are refused, naming the size to render at."""
    other, gen = sequential_23x40(), torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 23, 40, generator=gen), torch.arange(40) % 2
    assert metrics.naturalness(other, x[:4], y[:4], x[:30], y[:30], x[30:], y[30:]) > 0
    with pytest.raises(ValueError, match=r"vis are 40x23, the reference images 23x40: .* render at size=\(23, 40\)"):
        metrics.naturalness(other, x[:4].mT, y[:4], x[:30], y[:30], x[30:], y[30:])


def test_a_layer_reads_the_same_whatever_runs_after_it():
    """torchvision's ResNet runs one ReLU twice in each block and writes over outputs in place
    (ReLU(inplace=True), `out += identity`). A layer's output is its module's last call, untouched by the
    ops after it: in capture, activations and render alike, and whether or not the pass goes on."""
    model, x = resnet18(), torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the reference, module by module and without hooks
        stem = model.bn1(model.conv1(x))
        block = model.layer1(model.maxpool(model.relu(stem.clone())))  # layer1.1.relu's second call
    for name, want in (("bn1", stem), ("layer1.1.relu", block)):
        assert torch.allclose(models.capture(model, x, [name])[name], want, atol=1e-6), name
        with torch.inference_mode():  # inference tensors keep no version to check: always copied
            assert torch.allclose(models.capture(model, x, [name])[name], want, atol=1e-6), name
        for targets in ([fv.Channel(name, 5)], [fv.Channel(name, 5), fv.Class(0)]):  # the pass stops, goes on
            got = fv.activations(model, x, targets)[:, 0]
            assert torch.allclose(got, want[:, 5].mean((1, 2)), atol=1e-6), (name, targets)
    # a render climbs the layer's own output, with or without a target after it in the same batch
    alone, mixed = (fv.render(model, targets, param="pixel", transforms=None, steps=8, size=32, progress=False)
                    for targets in ([fv.Channel("bn1", 5)], [fv.Channel("bn1", 5), fv.Class(0)]))
    assert torch.allclose(alone.images[0], mixed.images[0], atol=1e-6)
    assert torch.allclose(alone.activation, model.bn1(model.conv1(alone.images))[:, 5].mean((1, 2)), atol=1e-5)


class _Block(nn.Module):
    """A residual block with functional ReLUs, as in many CIFAR ResNets: no module outputs what it returns."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class _FunctionalResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.layer1, self.linear = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(_Block(8), _Block(8)), nn.Linear(8, 10)

    def forward(self, x):
        return self.linear(self.layer1(torch.relu(self.conv1(x))).mean((2, 3)))


def test_last_spatial_layer_is_read_from_the_forward_pass():
    assert models.last_spatial_layer(cnn(32)) == "block3.act2"
    assert models.last_spatial_layer(resnet18(), 32) == "layer4.1.relu"
    # a block that makes its own output goes by its own name, not by its last convolution's
    model, x = _FunctionalResNet().eval(), torch.rand(3, 3, 32, 32)
    assert models.last_spatial_layer(model, 32) == "layer1.1" and models.block_layers(model, 32) == ["conv1", "layer1.1"]
    with torch.no_grad():
        block = model.layer1(torch.relu(model.conv1(x)))
    assert torch.allclose(fv.activations(model, x, [fv.Channel("layer1.1", 2)])[:, 0], block[:, 2].mean((1, 2)))
    assert torch.equal(attribution.grad_cam(model, x, 1), attribution.grad_cam(model, x, 1, layer="layer1.1"))
    assert models.last_spatial_layer(sequential_28(), 28) == "4"  # the ReLU after the last conv
    # any activation module is a layer, not only ReLU, GELU and SiLU: the default was the last conv, before
    # its batch norm and activation, for a net with LeakyReLU (or ReLU6 as in MobileNetV2, Hardswish in V3)
    for act in (nn.LeakyReLU(0.1), nn.ReLU6(), nn.Hardswish(), nn.ELU()):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 10)).eval()
        assert models.last_spatial_layer(net, 32) == "2" and models.block_layers(net, 32) == ["0", "2"]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    mlp.config = dict(in_channels=3)
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        models.last_spatial_layer(mlp, 2)
    # the tutorial CNN's one ReLU module, called after conv1, conv2 and fc1, is read by its last call (fc1's):
    # not a map, so neither the last spatial layer nor a block (Grad-CAM's default used to fail on it)
    tutorial, x = _OneReLU().eval(), torch.rand(2, 3, 32, 32)
    assert models.last_spatial_layer(tutorial, 32) == "conv2" and models.block_layers(tutorial, 32) == ["conv1", "conv2"]
    assert torch.equal(attribution.grad_cam(tutorial, x, 1), attribution.grad_cam(tutorial, x, 1, layer="conv2"))
    # named by the user, it warns that it reads fc1's output; a BasicBlock's ReLU, twice on one shape, and a
    # Bottleneck's, on maps of three shapes (its block's output last, as captum reads it), do not
    with pytest.warns(UserWarning, match=r"layer 'relu' is one module that runs 3 times in a pass, on outputs of "
                                         r"shapes \(6, 28, 28\), \(16, 10, 10\), \(120,\): its name reads the last"):
        assert models.layer_channels(tutorial, "relu", 32) == 120
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.capture(resnet18(), x, "layer1.0.relu")
        models.capture(torchvision.models.resnet50(weights=None, num_classes=10).eval(), x, "layer2.0.relu")


class _OneReLU(nn.Module):
    """The PyTorch CIFAR-10 tutorial's CNN with one nn.ReLU module for all three activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.relu = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 10), nn.ReLU()

    def forward(self, x):
        x = self.pool(self.relu(self.conv2(self.pool(self.relu(self.conv1(x))))))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def test_a_bfloat16_model_runs_in_its_own_dtype():
    """Images are made in float32 and cast to the model's dtype; activations and maps come back float32."""
    model, x = cnn(32), torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = [fv.Class(1), fv.Channel("block2.act2", 3), fv.Direction("block3.act2", torch.linspace(-1, 1, 32))]

    def outputs(m):  # -> (output, the correlation it keeps with its float32 copy's)
        return [(fv.activations(m, x, targets), 0.98), (attribution.grad_cam(m, x, 1), 0.98),
                (attribution.saliency(m, x, 1), 0.9),  # pixel gradients lose more to bfloat16
                (attribution.integrated_gradients(m, x, 1, steps=8), 0.9)]

    ref = outputs(model)
    model = model.to(torch.bfloat16)
    for (a, _), (b, least) in zip(ref, outputs(model)):
        assert b.dtype == torch.float32 and torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > least
    r = fv.render(model, targets, steps=24, progress=False)
    assert r.images.dtype == r.activation.dtype == torch.float32
    assert (r.history[-4:].mean(0) > r.history[:4].mean(0)).all(), r.history
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


class _DictOutput(nn.Module):
    """A model that returns its logits in a dict, as some libraries' classifiers do."""

    def __init__(self):
        super().__init__()
        self.net = sequential_28()

    def forward(self, x):
        return {"logits": self.net(x)}


def test_a_model_that_returns_no_tensor_renders_its_layers_and_says_what_to_do_for_classes():
    r = fv.render(_DictOutput(), [fv.Channel("net.3", 2)], steps=8, size=28, progress=False)
    assert r.images.shape == (1, 1, 28, 28) and r.history[-1] > r.history[0]
    with pytest.raises(TypeError, match=r"_DictOutput returns a dict, not a tensor of logits .* wrap it"):
        fv.render(_DictOutput(), [0], steps=1, size=28, progress=False)
    for attribute in (attribution.saliency, attribution.grad_cam, attribution.integrated_gradients,
                      lambda model, x, t: training.predict(model, x)):
        with pytest.raises(TypeError, match=r"_DictOutput returns a dict, not a tensor of logits .* wrap it"):
            attribute(_DictOutput(), torch.rand(2, 1, 28, 28), 0)


class _PartlyNoGrad(nn.Module):
    """A forward whose second block runs without gradients (as a frozen feature extractor under a probe does)."""

    def __init__(self):
        super().__init__()
        self.net = sequential_28()

    def forward(self, x):
        x = self.net[:3](x)
        with torch.no_grad():
            x = self.net[3:6](x)
        return self.net[6:](x)


def test_a_layer_made_without_gradients_is_named_not_left_unoptimized():
    model = _PartlyNoGrad()
    for target, what in [(fv.Channel("net.3", 2), "layer 'net.3'"), (fv.Class(1), "the model's output")]:
        with pytest.raises(ValueError, match=f"{what} is computed without gradients in the model's forward"):
            fv.render(model, [fv.Channel("net.0", 0), target], steps=2, size=28, progress=False)
    r = fv.render(model, [fv.Channel("net.0", 0)], steps=8, size=28, progress=False)  # before the no_grad: fine
    assert r.history[-1] > r.history[0]


def test_the_default_layers_of_a_vit_say_that_its_tokens_are_left_out():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=10).eval()
    with pytest.warns(UserWarning, match=r"VisionTransformer's layers after its last map \('conv_proj'\) output "
                                         r"tokens \(B, N, D\) \('encoder.layers.encoder_layer_0.*pass layers=") as w:
        assert models.block_layers(vit, 32) == ["conv_proj"]
    assert w[0].filename == __file__  # shown at the line that called, not inside models


def test_block_layers_look_through_a_wrapper():
    blocks = ["conv1", "relu"] + [f"layer{i}.1.relu" for i in range(1, 5)]
    assert models.block_layers(resnet18(), 32) == blocks
    # a torchvision model trained on normalized images takes [0, 1] ones once wrapped with its Normalize
    wrapped = nn.Sequential(torchvision.transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), resnet18())
    assert models.block_layers(wrapped, 32) == [f"1.{name}" for name in blocks]
    assert models.block_layers(nn.Sequential(nn.Sequential(sequential_28())), 28) == ["0.0.0", "0.0.1", "0.0.3", "0.0.4"]


class _VGGLike(nn.Module):
    """torchvision's VGG layout: every spatial layer in `features`, which ends with a max-pool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool, self.classifier = nn.AdaptiveAvgPool2d(2), nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def test_block_layers_of_a_model_whose_layers_all_sit_in_one_container():
    # the container's own output (a max-pool's, a batch norm's: not layers) used to hide its children
    assert models.block_layers(_VGGLike(), 32) == ["features.0", "features.1", "features.3", "features.4", "features"]
    densenet = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                                           num_classes=10).eval()
    blocks = ["features.conv0", "features.relu0", "features.denseblock1", "features.transition1",
              "features.denseblock2", "features"]
    assert models.block_layers(densenet, 32) == blocks
    assert models.block_layers(nn.Sequential(nn.Identity(), densenet), 32) == [f"1.{name}" for name in blocks]
    acts = models.capture(densenet, torch.rand(2, 3, 32, 32), blocks)  # each a feature map of its own
    assert [a.shape[-1] for a in acts.values()] == [16, 16, 8, 4, 4, 4]


def test_block_layers_split_a_container_of_stages_into_its_stages():
    # a RegNet's stages sit in trunk_output, a SqueezeNet's Fire modules in features beside a convolutional
    # classifier: each container was one "block", its last layer, so the atlas showed two layers of a RegNet
    for build in (torchvision.models.regnet_x_400mf, torchvision.models.regnet_y_400mf):
        # (the y's squeeze-and-excitation gates make 1x1 maps in every stage: a third size, which is no stage)
        regnet = build(num_classes=10).eval()
        stages = models.block_layers(regnet, 32)
        assert stages[0] == "stem.2" and [s.split(".")[:2] for s in stages[1:]] == [["trunk_output", f"block{i}"]
                                                                                 for i in range(1, 5)]
        assert stages[-1] == models.last_spatial_layer(regnet, 32)
    squeezenet = torchvision.models.squeezenet1_1(num_classes=10).eval()
    fires = [f"features.{i}" for i in (3, 4, 6, 7, 9, 10, 11, 12)]
    assert models.block_layers(squeezenet, 32) == ["features.0", "features.1", *fires, "classifier"]
    # a stage that changes the resolution once (by a max-pool inside it, or a strided first convolution) is one
    # block; their container, whose maps come in three sizes, is not
    pooled = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                           nn.ReLU())
    strided = [nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()) for _ in range(2)]
    staged = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Sequential(pooled, *strided),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    assert models.block_layers(staged, 28) == ["0", "1", "2.0.4", "2.1.1", "2.2.1"]
    stem = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())])
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), stem, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    assert models.block_layers(plain, 28) == ["0", "1.5"]  # a stem of plain layers: one block, in three sizes


def test_a_model_replicated_over_several_gpus_is_refused_and_on_one_device_runs():
    """nn.DataParallel's replicas each run their share of the batch, and forward hooks fire in each: a layer's
    output would come back in pieces. On a CPU (or one GPU) it runs the module itself, and works."""
    dp = nn.DataParallel(cnn(32))
    assert fv.render(dp, [0], steps=1, progress=False).images.shape == (1, 3, 32, 32)  # its module's image_size
    # what the module records, which DataParallel does not pass on: its channels refuse gray images
    with pytest.raises(ValueError, match="images have 1 channel\(s\), the model takes 3"):
        models.check_input(dp, torch.rand(2, 1, 32, 32))
    assert models.block_layers(dp) == ["module." + name for name in models.block_layers(dp.module)]
    dp.device_ids = [0, 1]  # as over two GPUs
    x = torch.rand(2, 3, 32, 32)
    for call in (lambda: fv.render(dp, [0], steps=1, size=32, progress=False),
                 lambda: models.capture(dp, x, ["module.block2.act2"]),
                 lambda: models.last_to_run(dp, x, nn.Linear)):
        with pytest.raises(TypeError, match=r"nn.DataParallel over the GPUs \[0, 1\].*pass model.module"):
            call()


def test_the_readme_example_for_lucent_users_runs(tmp_path, monkeypatch):
    """The code block of the README's "Coming from Lucent", as it is written, on an untrained resnet18 (4 steps)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Coming from Lucent", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # where it saves its figure
    monkeypatch.setattr(fv, "visualize_unit", functools.partial(fv.visualize_unit, steps=4, progress=False))
    names = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), net=resnet18(),
                 train_images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    exec(compile(block, "README.md", "exec"), names)
    plt.close("all")
    assert names["r"].images.shape == (1, 3, 32, 32) and (tmp_path / "channel7.png").is_file()


def test_a_size_the_model_cannot_tell_asks_for_size():
    for model in (sequential_28(), resnet18()):
        with pytest.raises(ValueError, match=r"cannot tell the image size .* pass size=\.\.\."):
            fv.render(model, [0], steps=1, progress=False)
        with pytest.raises(ValueError, match=r"pass size="):
            models.layer_channels(model, "fc" if isinstance(model, torchvision.models.ResNet) else "7")
    for bad in (0, (28, 0), (28,), (28, 28, 28), "28", 28.0, True, (28, 2.5)):
        with pytest.raises(ValueError, match=r"^size must be an int >= 1 \(the side of square images, in pixels\) "
                                             r"or a pair \(height, width\) of them, got "):
            models.input_size(cnn(32), bad)
    recorded = sequential_28()
    recorded.image_size = (28, -28)  # a model's own record, not the size= argument, is named as the culprit
    with pytest.raises(ValueError, match=r"^Sequential's recorded image_size must be an int >= 1 .*got \(28, -28\)"):
        models.input_size(recorded)
    recorded.image_size = (28, 28)  # a pair is a size
    assert models.input_size(recorded) == (28, 28) == models.input_size(cnn(32), np.int64(28))
    assert models.input_size(cnn(64)) == (64, 64) and models.input_size(vae()) == (32, 32)
    assert models.input_size(cnn(32), (23, 40)) == (23, 40) == models.input_size(cnn(32), torch.Size([23, 40]))
    with pytest.raises(ValueError, match=r"size must be .* got \{"):  # a set has no order
        models.input_size(cnn(32), {23, 40})
    # a model of images that are not square: its recorded size, or a built parameterization's, is the render's
    other = sequential_23x40()
    r = fv.render(other, [0], param=fv.PixelParam(1, 3, (23, 40)), steps=1, progress=False)
    assert r.images.shape == (1, 3, 23, 40)
    other.image_size = (23, 40)
    assert fv.render(other, [0], steps=1, progress=False).images.shape == (1, 3, 23, 40)
    # a size the model cannot take fails inside it; a built parameterization gives its own size
    r = fv.render(sequential_28(), [0], param=fv.PixelParam(1, 1, 28), steps=1, progress=False)
    assert r.images.shape == (1, 1, 28, 28)


def test_a_gray_model_takes_its_own_colour_covariance_and_names_an_rgb_one():
    fourier = fv.get_technique("fourier", color_cov=torch.eye(3))  # the RGB data's, on a gray model
    with pytest.raises(ValueError, match=r"color_cov must be a finite \(1, 1\) covariance.*got shape \(3, 3\)"):
        fourier(sequential_28(), [0], steps=1, size=28, progress=False)
    gray = fv.color_covariance(torch.rand(8, 1, 28, 28))
    r = fv.get_technique("fourier", color_cov=gray)(sequential_28(), [0], steps=1, size=28, progress=False)
    assert r.images.shape == (1, 1, 28, 28)


class _ChannelsLastNet(nn.Module):
    """Linear layers on a channels-last map (B, H, W, C), as in ConvNeXt's blocks, and on tokens (B, N, D),
    as in a ViT's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.mix, self.tokens = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6), nn.Linear(6, 5)
        self.head = nn.Linear(5, 10)

    def forward(self, x):
        mixed = self.mix(self.conv(x).permute(0, 2, 3, 1))  # (B, H, W, 6)
        return self.head(self.tokens(mixed.flatten(1, 2)).mean(1))  # tokens (B, H * W, 5)


def test_a_linear_layer_over_channels_last_maps_or_tokens_reads_its_features_as_channels():
    model, x = _ChannelsLastNet().eval(), torch.rand(3, 3, 8, 8)
    assert models.layer_channels(model, "mix", 8) == 6 and models.layer_channels(model, "tokens", 8) == 5
    with torch.no_grad():
        mixed = model.mix(model.conv(x).permute(0, 2, 3, 1))
        tokens = model.tokens(mixed.flatten(1, 2))
    acts = fv.activations(model, x, [fv.Channel("mix", 4), fv.Channel("tokens", 2)])
    assert torch.allclose(acts[:, 0], mixed[..., 4].mean((1, 2)), atol=1e-6)
    assert torch.allclose(acts[:, 1], tokens[..., 2].mean(1), atol=1e-6)
    assert models.capture(model, x, "mix")["mix"].shape == (3, 6, 8, 8)
    assert models.last_spatial_layer(model, 8) == "mix"  # a (B, 6, H, W) map, read as one
    r = fv.render(model, [fv.Channel("mix", 4), fv.Channel("tokens", 2)], steps=8, size=8, progress=False)
    assert (r.history[-1] > r.history[0]).all()


def test_a_layer_named_by_an_int_asks_for_a_str():
    model, match = sequential_28(), r"a layer name must be a str, got 3 \(int\); valid layers: 0, 1, 3, 4, 7"
    with pytest.raises(TypeError, match=match):
        fv.render(model, [fv.Channel(3, 5)], steps=1, size=28, progress=False)
    with pytest.raises(TypeError, match=match):
        models.capture(model, torch.rand(1, 1, 28, 28), [3])


@dataclass
class _LibraryConfig:
    """A config object of another library's model: not a dict."""
    hidden_size: int = 8


class _ConfiguredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.config = sequential_28(), _LibraryConfig()

    def forward(self, x):
        return self.net(x)


def test_a_model_whose_config_is_not_a_dict_runs_as_one_without_a_config():
    model, x = _ConfiguredNet().eval(), torch.rand(2, 1, 28, 28)
    r = fv.render(model, [fv.Channel("net.3", 2), 1], steps=2, size=28, progress=False)
    assert r.images.shape == (2, 1, 28, 28)
    assert models.capture(model, x, "net.3")["net.3"].shape == (2, 16, 14, 14)
    assert attribution.saliency(model, x, 0).shape == (2, 28, 28)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert training.evaluate(model, x, y)["acc"] == pytest.approx(expected)


def test_grad_cam_defaults_to_the_last_map_larger_than_1x1_and_takes_non_square_images():
    model = resnet18()  # its last spatial layer, layer4.1.relu, is 1x1 at 32 px: a flat heatmap
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert models.last_map_layer(model, x) == "layer3.1.relu"  # 2x2
    cam = attribution.grad_cam(model, x, 1)
    assert torch.equal(cam, attribution.grad_cam(model, x, 1, layer="layer3.1.relu"))
    assert (cam.flatten(1).std(1) > 0.1 * cam.flatten(1).mean(1)).all()  # not flat, as layer4.1.relu's is
    flat = nn.Sequential(nn.Conv2d(3, 4, 32), nn.ReLU(), nn.Flatten(), nn.Linear(4, 10))  # only 1x1 maps
    assert models.last_map_layer(flat, x) == "1"
    # every map channels-last, the last one handed on by its block: it is the default, and no later map
    # (its block's copy was taken for one) is said to be passed over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.last_map_layer(AllLast(), x) == "stage.1"
    # a model of a fixed non-square input is probed with its own images, not a square of their width
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 48, 10))
    assert attribution.grad_cam(wide, torch.rand(2, 3, 16, 48), 1).shape == (2, 16, 48)


def test_diversity_defaults_to_the_last_map_larger_than_1x1():
    """A Gram matrix of one position is the pooled vector's outer product: Diversity's default layer is the
    last map larger than 1x1."""
    model = resnet18()  # layer4.1.relu, its last spatial layer, is 1x1 at 32 px; layer3.1.relu 2x2
    assert models.last_wide_layer(model, 32) == "layer3.1.relu" and models.last_wide_layer(cnn(32)) == "block3.act2"
    flat = nn.Sequential(nn.Conv2d(3, 4, 32), nn.ReLU(), nn.Flatten(), nn.Linear(4, 10))  # only 1x1 maps
    flat.config = dict(in_channels=3)
    assert models.last_wide_layer(flat, 32) == "1"
    kw = dict(images_per_target=2, steps=3, size=32, progress=False)
    images = fv.render(model, [1], regularizers=[fv.Diversity()], **kw).images
    assert torch.equal(images, fv.render(model, [1], regularizers=[fv.Diversity(layer="layer3.1.relu")], **kw).images)
    assert not torch.equal(images, fv.render(model, [1], regularizers=[fv.Diversity(layer="layer4.1.relu")],
                                             **kw).images)


class AllLast(nn.Module):
    """Linear layers on the pixels of a channels-last map: every map keeps its features last."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.stage(x.permute(0, 2, 3, 1)).mean((1, 2)))


class ViewNet(nn.Module):
    """The classic tutorial CNN: it flattens a feature map with .view, which a channels-last one cannot do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.view(x.size(0), -1))


def test_a_model_that_views_its_feature_maps_renders_in_its_own_memory_format():
    model = ViewNet().eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    for technique in ("pixel", "fourier", "pixel+reg"):
        r = fv.techniques()[technique](model, [fv.Class(2), fv.Channel("conv2", 3)], steps=8, size=32, progress=False)
        assert r.images.shape == (2, 3, 32, 32)
    assert fv.activations(model, images, [fv.Class(1)]).shape == (6, 1)
    assert fv.exemplars(model, images, fv.Channel("conv2", 0), k=2).top.shape == (2,)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = (training.predict(model, images).argmax(1) == labels).float().mean().item()
    assert metrics.transferability(model, images, labels) == pytest.approx(expected)


def test_cpu_renders_run_eagerly_and_never_build_a_cuda_graph(monkeypatch):
    def no_graph(*args, **kwargs):
        raise AssertionError("a CUDA graph was built on the CPU")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
    model = cnn(32)
    a = fv.render(model, [0, 1], steps=8, progress=False)
    monkeypatch.setattr(fv, "CUDA_GRAPHS", False)
    b = fv.render(model, [0, 1], steps=8, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.history, b.history)


def test_render_asks_cudnn_for_its_deterministic_algorithms_and_restores_the_flag():
    seen = []
    model = cnn(32)
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cudnn.deterministic))
    assert torch.backends.cudnn.deterministic is False
    fv.render(model, [0], steps=2, progress=False)
    assert seen and all(seen) and torch.backends.cudnn.deterministic is False
    with pytest.raises(ValueError, match="parameterization makes images"):  # restored after a failure too
        fv.render(model, [0], param=fv.PixelParam(1, 3, 16), steps=2, progress=False)
    assert torch.backends.cudnn.deterministic is False


# how far two renders of the same seed may differ on a GPU: pixel+reg's resampling backward (grid_sample)
# and the latent techniques' jitter backward (a gather) have no deterministic CUDA kernel (README)
SAME_SEED_ON_A_GPU = {"pixel": 0, "fourier": 0, "maco": 0, "hybrid": 1e-2, "pixel+reg": 1e-2, "whitened": 1e-2,
                      "latent": 1e-2}  # hybrid: whitened's first stage (it came out the same three times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("technique", SAME_SEED_ON_A_GPU)
def test_the_same_seed_gives_the_same_images_on_a_gpu(monkeypatch, technique):
    """cuDNN's default algorithms for a batch of 10 may sum in another order from run to run, and the
    ascent magnifies that: two renders of the airbench model's 10 classes once came out 0.6 apart. The
    graph is captured without a warning (no fallback to eager; no autograd graph of the warm-up kept)."""
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("airbench", image_size=32)).cuda().eval()
    how = fv.techniques(vae().cuda(), magnitude=_magnitude(3, 32))[technique]
    for graphs in (False, True):
        monkeypatch.setattr(fv, "CUDA_GRAPHS", graphs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a, b = (how(model, list(range(10)), steps=128, progress=False) for _ in range(2))
        assert (a.images - b.images).abs().max() <= SAME_SEED_ON_A_GPU[technique], f"CUDA_GRAPHS={graphs}"
        assert not [str(w.message) for w in caught if "graph" in str(w.message) or "stream" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("lr", [np.float64(0.05), 1, lambda t: np.float32(0.05)])
def test_a_graphed_render_takes_any_real_lr(lr):
    """The captured Adam reads its lr from a float32 tensor: a NumPy float or an int lr, taken on a CPU, made
    it float64 or int64, which the fused CUDA kernel does not convert."""
    result = fv.render(cnn(32).cuda(), [0, 1], lr=lr, steps=8, progress=False)
    assert result.images.isfinite().all()


def test_a_compiled_model_is_read_as_its_module():
    """torch.compile's code keeps no hook added after it ran: each hooked pass runs the module it wraps, whose
    layers are the same (named _orig_mod.*), so a compiled model reads, renders and explains as the plain one."""
    model = cnn(32)
    compiled = torch.compile(model, backend="eager")  # dynamo's guards, without a C++ compiler
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    training.predict(compiled, x)  # traced without hooks first, as after any plain use
    layer = "_orig_mod.block2.act2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompile storm either
        assert torch.equal(models.capture(compiled, x, [layer])[layer], models.capture(model, x, ["block2.act2"])[
            "block2.act2"])
        assert models.block_layers(compiled, 32) == ["_orig_mod." + name for name in models.block_layers(model, 32)]
        torch.testing.assert_close(attribution.grad_cam(compiled, x, [0, 1, 2, 3]),
                                   attribution.grad_cam(model, x, [0, 1, 2, 3]))
        labels = torch.tensor([0, 1, 0, 1])
        contributions = atlas.head_contributions(compiled, x, labels, 10)[1]  # the head's inputs, hooked
        assert contributions is not None
        torch.testing.assert_close(contributions, atlas.head_contributions(model, x, labels, 10)[1], equal_nan=True)
        a, b = (fv.render(m, [0, fv.Channel(prefix + "block2.act2", 1)], steps=4, progress=False).images
                for m, prefix in ((compiled, "_orig_mod."), (model, "")))
    torch.testing.assert_close(a, b)


def test_a_tensor_lr_is_set_in_place():
    """A captured Adam reads its lr tensor on every replay: the schedule must write into that tensor."""
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=lr)
    fv._set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.5
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.1)
    fv._set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    model = cnn(32).cuda()
    monkeypatch.setattr(fv, "CUDA_GRAPHS", False)
    eager = fv.render(model, [0, 1], steps=16, progress=False)
    monkeypatch.setattr(fv, "CUDA_GRAPHS", True)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not capturable")))
    with pytest.warns(UserWarning, match=r"could not capture a CUDA graph \(not capturable\); running the steps"):
        fallen = fv.render(model, [0, 1], steps=16, progress=False)
    assert (fallen.images - eager.images).abs().max() < 2e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_another_gpu_than_the_current_one_is_graphed_on_its_own(monkeypatch):
    model = cnn(32).to("cuda:1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = fv.render(model, [0, 1], steps=16, progress=False)
    monkeypatch.setattr(fv, "CUDA_GRAPHS", False)
    eager = fv.render(model, [0, 1], steps=16, progress=False)
    assert torch.cuda.current_device() == 0  # left as it was
    assert (graphed.images - eager.images).abs().max() < 2e-3
    assert not [str(w.message) for w in caught if "graph" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("technique", ["pixel+reg", "fourier", "maco", "whitened"])
def test_cuda_graph_matches_eager(monkeypatch, technique):
    """Replayed steps compute what eager steps compute: images within 2e-3 after 64 steps (float32 on
    the GPU: the two differ only in the order of floating-point reductions), or within what two eager runs
    of the technique may differ by (SAME_SEED_ON_A_GPU)."""
    model = cnn(32).cuda()
    magnitude = fv.magnitude_spectrum(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    how = fv.techniques(vae().cuda(), magnitude=magnitude)[technique]
    out = {}
    for graphs in (False, True):
        monkeypatch.setattr(fv, "CUDA_GRAPHS", graphs)
        with warnings.catch_warnings(record=True) as caught:  # a capture that fell back to eager warns
            warnings.simplefilter("always")
            out[graphs] = how(model, [0, 1, fv.Channel("block2.act2", 3)], steps=64, progress=False)
        assert not [str(w.message) for w in caught if "graph" in str(w.message)]
    assert (out[True].images - out[False].images).abs().max() < max(2e-3, SAME_SEED_ON_A_GPU[technique])
    assert torch.allclose(out[True].history, out[False].history, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- dtypes and memory formats

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("build", [lambda: cnn(32), resnet18], ids=["our CNN", "resnet18"])
def test_metrics_run_a_model_in_its_own_dtype(build, dtype):
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref, net = build(), build().to(dtype)
    f = metrics.features(net, x)  # float32 images used to reach a bfloat16 model (or a float64 resnet) as they were
    assert f.dtype == torch.float32 and F.cosine_similarity(f.flatten(), metrics.features(ref, x).flatten(), 0) > 0.99
    predicted = training.predict(ref, x).argmax(1)
    assert metrics.transferability(net, x, predicted) > 0.6  # agrees with the float32 model (1.0 but for rounding)


def test_channels_last_images_reach_a_model_that_views_its_feature_maps():
    net = ViewNet().eval()
    x = torch.rand(2, 32, 32, 3).permute(0, 3, 1, 2)  # NHWC arrays as (N, C, H, W): channels_last strides
    plain = x.contiguous()
    torch.testing.assert_close(training.predict(net, x), training.predict(net, plain))
    torch.testing.assert_close(attribution.saliency(net, x, 1), attribution.saliency(net, plain, 1))
    torch.testing.assert_close(models.capture(net, x, ["conv2"])["conv2"], models.capture(net, plain, ["conv2"])["conv2"])
    neuron = fv.Neuron("conv2", 0, 1, 2)  # its cell found by a pass of the first image alone
    assert fv.looks_at(net, neuron, x) == fv.looks_at(net, neuron, plain)
    assert models.last_map_layer(net, x) == "conv2"
    y = torch.tensor([1, 2])
    expected = (training.predict(net, plain).argmax(1) == y).float().mean().item()
    assert training.evaluate(net, x, y.int())["acc"] == pytest.approx(expected)  # int32 labels too


def test_grad_cam_passes_over_a_linear_layers_channels_last_map_and_refuses_it_by_name():
    """captum's Grad-CAM reads a layer's own output, which an nn.Linear gives with its channels last: it would
    take the map's rows for channels. The default is the last conv map; naming the linear layer is an error."""
    model, x = _ChannelsLastNet().eval(), torch.rand(2, 3, 8, 8)
    later = r"Grad-CAM's default layer is 'conv', the last map with its channels on dim 1: the later maps \('mix'"
    with pytest.warns(UserWarning, match=later):  # as a Swin's stages: the default may be far from the output
        assert models.last_map_layer(model, x) == "conv"
    with pytest.warns(UserWarning, match=later) as w:
        assert torch.equal(attribution.grad_cam(model, x, 1), attribution.grad_cam(model, x, 1, layer="conv"))
    assert w[0].filename == __file__  # through grad_cam: shown at its caller
    with pytest.raises(ValueError, match="'mix' keeps its features last"):
        attribution.grad_cam(model, x, 1, layer="mix")


def test_a_convnext_blocks_activation_between_its_linears_reads_its_features_as_channels():
    """torchvision's ConvNeXt runs each block's two Linears and the GELU between them on a channels-last
    map: the GELU's channels are its last dim too, for activations and Grad-CAM alike."""
    torch.manual_seed(0)
    model, x = torchvision.models.convnext_tiny(num_classes=10).eval(), torch.rand(2, 3, 32, 32)
    gelu, block = "features.1.0.block.4", model.features[1][0].block
    assert models.layer_channels(model, gelu, 32) == 384  # 4 x the stem's 96, on its 8 x 8 map
    with torch.no_grad():
        expected = block[4](block[3](block[2](block[1](block[0](model.features[0](x))))))  # (2, 8, 8, 384)
    torch.testing.assert_close(models.capture(model, x, gelu)[gelu], expected.permute(0, 3, 1, 2))
    names = [f"features.1.0.block.{i}" for i in range(7)]
    last = [name for name in names if models.keeps_features_last(model, x, name)]
    assert last == [f"features.1.0.block.{i}" for i in (1, 2, 3, 4, 5)]  # not the conv, nor the permute back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 1x1 last stage's channels-last maps, which Grad-CAM passes over anyway
        assert not models.keeps_features_last(model, x, models.last_map_layer(model, x))
    with pytest.raises(ValueError, match=f"'{gelu}' keeps its features last"):
        attribution.grad_cam(model, x, 1, layer=gelu)


class _Mlp(nn.Module):
    """timm's Mlp: two Linears with an activation, dropout and norm between them, in a plain module (not an
    nn.Sequential), run by a block on its channels-last map."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(width, 12), nn.GELU(), nn.Dropout(0.1)
        self.norm, self.fc2 = nn.LayerNorm(12), nn.Linear(12, width)

    def forward(self, x):
        return self.fc2(self.norm(self.drop(self.act(self.fc1(x)))))


class _MixedNet(nn.Module):
    """A conv stem; a timm-style channels-last block; a Linear unflattened into a map; and one ReLU shared by
    an nn.Sequential after a Linear (a channels-last map) and, last, a conv map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.relu, self.mlp = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _Mlp(4)
        self.expand, self.unflat = nn.Linear(4 * 8 * 8, 6 * 8 * 8), nn.Unflatten(1, (6, 8, 8))
        self.act, self.proj = nn.ReLU(), nn.Sequential(nn.Linear(6, 5), self.relu)
        self.conv, self.head = nn.Conv2d(5, 5, 3, padding=1), nn.Linear(5, 10)

    def forward(self, x):
        x = self.relu(self.stem(x))  # (B, 4, H, W)
        x = x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.act(self.unflat(self.expand(x.flatten(1))))  # a map (B, 6, H, W) again
        x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # the shared ReLU on (B, H, W, 5)
        return self.head(self.relu(self.conv(x)).mean((2, 3)))  # its last call: on a conv map


def test_features_last_is_decided_from_the_forward_pass_not_the_modules_kinds():
    """A Linear's channels-last output and what is made from it (timm's Mlp: activation, dropout, norm) keep
    their features last; a Linear's output unflattened into a map does not; a shared module is read by its
    last call, as its output is, wherever it is registered."""
    model, x = _MixedNet().eval(), torch.rand(2, 3, 8, 8)
    last = [name for name, _ in model.named_modules() if name and models.keeps_features_last(model, x, name)]
    assert last == ["mlp", "mlp.fc1", "mlp.act", "mlp.drop", "mlp.norm", "mlp.fc2", "proj", "proj.0"]
    with torch.no_grad():
        hidden = model.mlp.act(model.mlp.fc1(model.relu(model.stem(x)).permute(0, 2, 3, 1)))  # (2, 8, 8, 12)
    acts = models.capture(model, x, ["mlp.act", "act", "relu"])
    torch.testing.assert_close(acts["mlp.act"], hidden.permute(0, 3, 1, 2))
    assert acts["act"].shape == (2, 6, 8, 8) and acts["relu"].shape == (2, 5, 8, 8)
    assert models.last_map_layer(model, x) == "relu"
    with pytest.raises(ValueError, match="'mlp.act' keeps its features last"):
        attribution.grad_cam(model, x, 1, layer="mlp.act")


class _SumNorm(nn.Module):
    """A norm on a residual sum of a Linear's channels-last output: plain tensor ops between the modules."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 10)

    def forward(self, x):
        h = self.fc(x.permute(0, 2, 3, 1))
        return self.head(self.norm(h + h.relu())[:, 1:].mean((1, 2)))


def test_features_last_is_followed_through_plain_tensor_ops():
    model, x = _SumNorm().eval(), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        h = model.fc(x.permute(0, 2, 3, 1))
        expected = model.norm(h + h.relu())
    torch.testing.assert_close(models.capture(model, x, "norm")["norm"], expected.permute(0, 3, 1, 2))


class _Columns(nn.Module):
    """Axial attention's way with a map: its columns as sequences (B * W, C, H), mixed by a Conv1d, put back
    by a permute, and summed with the map."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(8, 8, 1)
        self.conv, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        z = self.mix(y.permute(0, 3, 1, 2).reshape(b * w, c, h)).view(b, w, c, h).permute(0, 2, 3, 1)
        return self.head(self.conv(y + z).mean((2, 3)))


def test_a_permute_of_a_map_whose_channels_are_not_on_dim_1_is_not_read_as_channels_last():
    model, x = _Columns().eval(), torch.rand(2, 3, 6, 10)
    assert models.capture(model, x, "conv")["conv"].shape == (2, 8, 6, 10)
    assert models.last_map_layer(model, x) == "conv"


class _AttentionCNN(nn.Module):
    """A CNN with SAGAN's self-attention (its queries as tokens (B, N, C'), a batched product with the keys,
    a softmax module) and an ECA gate (the pooled channels turned into a sequence for a Conv1d and back)."""

    def __init__(self):
        super().__init__()
        self.stem, self.query, self.key = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
        self.softmax, self.eca, self.gate = nn.Softmax(-1), nn.Conv1d(1, 1, 3, padding=1), nn.Sigmoid()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        queries, keys = self.query(x).view(b, 2, -1).permute(0, 2, 1), self.key(x).view(b, 2, -1)
        attention = self.softmax(torch.bmm(queries, keys))
        x = x + torch.bmm(x.view(b, c, -1), attention.permute(0, 2, 1)).view(b, c, h, w)
        pooled = F.adaptive_avg_pool2d(x, 1).squeeze(-1).transpose(-1, -2)  # (B, 1, C)
        x = self.gate(self.eca(pooled).transpose(-1, -2).unsqueeze(-1)).expand_as(x) * x
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("build", [lambda: models.build_model(models.cnn_config("small")), _AttentionCNN,
                                   lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                                   lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10)])
def test_no_layer_of_a_cnn_is_read_as_channels_last(build):
    model = build().eval()
    # (every module but the empty nn.Sequential of a ShuffleNet's unit without a shortcut branch, which never runs)
    names = [name for name, m in model.named_modules()
             if name and not (isinstance(m, nn.Sequential) and not len(m))]
    recorder = models.Recorder(model, names)
    with torch.no_grad(), recorder.hooked() as run:
        run(torch.rand(2, 3, 32, 32))
    assert recorder.last == set()


def test_a_swin_stage_reads_its_channels_last_map_with_its_channels_on_dim_1():
    """torchvision's Swin permutes its stem's map to channels last and keeps it so through its stages, whose
    blocks end in a residual sum (no Linear last), and through the norm and patch merging between them."""
    model, x = torchvision.models.swin_t(num_classes=10).eval(), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        stage = model.features[1](model.features[0](x))  # (2, 8, 8, 96)
    torch.testing.assert_close(models.capture(model, x, "features.1")["features.1"], stage.permute(0, 3, 1, 2))
    shapes = {name: out.shape[1] for name, out in models.capture(
        model, x, ["features.1.0.norm1", "features.1.0.norm2", "features.2.norm", "features.2"]).items()}
    assert shapes == {"features.1.0.norm1": 96, "features.1.0.norm2": 96, "features.2.norm": 384, "features.2": 192}
    assert not models.keeps_features_last(model, x, "permute")  # back to (B, C, H, W)
    # every listed layer runs: not window attention's qkv and proj, whose weights it reads without calling them
    layers = models.list_layers(model)
    assert "features.1.0.attn.qkv" not in layers and "features.1.0.mlp.0" in layers
    assert set(models.capture(model, x, layers)) == set(layers)


def test_a_vits_tokens_read_their_features_as_channels():
    """A ViT's patches become tokens by a reshape and a permute, then a concatenation with its class token and
    a sum with its position embedding: every encoder layer's output is (B, D, N) as read."""
    model = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                                                 num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    names = ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1", "encoder.ln", "heads.head"]
    shapes = {name: tuple(out.shape) for name, out in models.capture(model, x, names).items()}
    assert list(shapes.values()) == [(2, 16, 17), (2, 16, 17), (2, 16, 17), (2, 10)]  # 16 patches and a class token
    with torch.no_grad():
        tokens = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], 1))
    # the same numbers: the layouts are followed on a pass of their own, which leaves attention's fused kernel on
    assert torch.equal(models.capture(model, x, "encoder")["encoder"], tokens.transpose(1, 2))
    # every listed layer runs: not attention's out_proj, whose weights the attention reads without calling it
    assert models.list_layers(model) == ["conv_proj"] + [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in (0, 1)
                                                         for j in (0, 1, 3)] + ["heads.head"]
    assert set(models.capture(model, x, models.list_layers(model))) == set(models.list_layers(model))


def test_layouts_follow_in_place_moves_and_leave_a_getters_tensor_as_it_was():
    fc = nn.Linear(3, 5)
    with torch.no_grad(), models._Layouts(fc) as layouts:
        h = fc(torch.rand(2, 4, 6, 3)).clone()  # (2, 4, 6, 5): features on dim 3; a base, not a view
        h.unsqueeze_(1)
        assert layouts.features_dim(h) == 4
        h.transpose_(1, 4)
        assert layouts.features_dim(h) == 1
        view = h[:, :, :2]
        assert view._base is h and layouts.features_dim(view) == 1 and layouts.features_dim(view._base) == 1
        assert layouts.features_dim(h.mT) == 1 and layouts.features_dim(h.movedim(1, -1)) == 4
        assert layouts.features_dim(h.sum(1, keepdim=True)) is None  # a features dim of size 1 tells nothing
        assert layouts.features_dim(h.movedim(1, -1).squeeze(3) @ torch.rand(5)) is None  # a product with a vector


def test_a_linear_layers_single_feature_is_its_channel():
    score = nn.Linear(5, 1)  # one score per token
    with torch.no_grad(), models._Layouts(score) as layouts:
        assert layouts.features_dim(score(torch.rand(2, 7, 5))) == 2


class _SharedLast(nn.Module):
    """One ReLU on a conv map first, then, last, on a Linear's channels-last map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 10)

    def forward(self, x):
        return self.head(self.relu(self.fc(self.relu(self.stem(x)).permute(0, 2, 3, 1))).mean((1, 2)))


def test_grad_cams_default_passes_over_a_module_whose_last_call_keeps_its_features_last():
    """Read by its last call, the shared ReLU keeps its features last: Grad-CAM would refuse it by name, so its
    default is the stem, not the ReLU's earlier call on the stem's map."""
    model, x = _SharedLast().eval(), torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"default layer is 'stem'.* the later maps \('fc', 'relu'\) keep their features"):
        assert models.keeps_features_last(model, x, "relu") and models.last_map_layer(model, x) == "stem"
        assert attribution.grad_cam(model, x, 1).shape == (2, 8, 8)
    with warnings.catch_warnings():  # a CNN's default is its last map: no warning
        warnings.simplefilter("error")
        models.last_map_layer(cnn(32), torch.rand(1, 3, 32, 32))


def test_following_the_layouts_keeps_no_output_of_the_pass_alive():
    """Following the layouts keeps a pass's outputs no longer than the model does: the first Linear's output is
    freed by the time the last Linear runs (the layout pass's peak memory is the model's own)."""
    model, refs, alive = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval(), [], []
    model[0].register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))
    model[2].register_forward_hook(lambda m, args, out: alive.append(refs[-1]() is not None))
    with torch.no_grad(), models._Layouts(model) as layouts:
        model(torch.rand(1, 4, 4, 8))
        assert layouts.last_call[model[1]]  # followed all the same: the GELU's features are last
    assert alive == [False]


def test_a_neuron_on_tokens_is_refused_with_a_pointer_to_channel():
    model, x = _ChannelsLastNet().eval(), torch.rand(2, 3, 8, 8)
    for call in (lambda: fv.activations(model, x, [fv.Neuron("tokens", 2)]),
                 lambda: fv.render(model, [fv.Neuron("tokens", 2)], steps=1, size=8, progress=False)):
        with pytest.raises(ValueError, match=r"gives tokens .*Channel\('tokens', 2\)"):
            call()
    assert fv.activations(model, x, [fv.Neuron("mix", 2)]).shape == (2, 1)  # a map's neuron still works


class _StemLast(nn.Module):
    """A fully convolutional classifier whose head, a 1x1 convolution, is registered before its stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.stem = nn.Conv2d(16, 10, 1), nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x))).mean((2, 3))


def test_a_model_whose_first_registered_conv_is_not_its_stem_gets_an_error_naming_channels():
    model = _StemLast().eval()  # input_channels reads 16 from `head`, registered first
    with pytest.raises(ValueError, match="if 16 are not its channels"):
        fv.render(model, [0], steps=1, size=16, progress=False)
    model.image_channels = 3  # what the error points to
    assert fv.render(model, [0], steps=1, size=16, progress=False).images.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images have 16 channel\(s\), the model takes 3"):
        models.check_input(model, torch.rand(2, 16, 16, 16))
    del model.image_channels
    model.config = {"in_channels": 3}  # as our models record it
    assert fv.render(model, [0], steps=1, size=16, progress=False).images.shape == (1, 3, 16, 16)


def test_a_model_without_convolutions_is_told_to_record_its_channels():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 10)).eval()
    with pytest.raises(ValueError, match=r"records none and has no nn.Conv2d; set model.image_channels = C"):
        fv.render(mlp, [0], steps=1, size=8, progress=False)
    mlp.image_channels = 2
    assert fv.render(mlp, [0], steps=1, size=8, progress=False).images.shape == (1, 2, 8, 8)
    for bad in (0, 2.0, True, "2"):
        mlp.image_channels = bad
        with pytest.raises(ValueError, match=rf"Sequential's image_channels \(its input images' channels\) must be "
                                             rf"an int >= 1, got {bad!r}"):
            models.input_channels(mlp)


class _CifarResNet(nn.Module):
    """The widespread CIFAR ResNet layout whose _make_layer counts widths in self.in_channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.in_channels = 8
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = self._make_layer(16)
        self.fc = nn.Linear(16, 10)

    def _make_layer(self, width):
        layer = nn.Sequential(nn.Conv2d(self.in_channels, width, 3, padding=1), nn.ReLU())
        self.in_channels = width  # 16 once built: not the input's channels
        return layer

    def forward(self, x):
        return self.fc(self.layer1(torch.relu(self.conv1(x))).mean((2, 3)))


def test_a_width_counter_called_in_channels_is_not_read_as_the_inputs_channels():
    model = _CifarResNet().eval()
    assert models.input_channels(model) == 3
    assert fv.render(model, [0], steps=1, size=16, progress=False).images.shape == (1, 3, 16, 16)
    assert models.check_input(model, torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_a_vae_on_another_device_than_the_model_is_refused_before_rendering():
    latent = fv.parameterization("latent", vae=vae().to("meta"))
    with pytest.raises(ValueError, match="the VAE is on meta and the model on cpu"):
        fv.render(cnn(32), [0], param=latent, steps=1, progress=False)


@pytest.mark.parametrize("size", [8, 32])
def test_a_jitter_of_a_whole_side_is_refused_naming_its_fraction(size):
    """A shift of the whole side has no reflection (an index of -1): refused on the first call, every time."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    with pytest.raises(ValueError, match=r"jitter\(1.0\) shifts by up to"):
        fv.render(model, [0], transforms=fv.jitter(1.0), steps=4, size=size, progress=False)
    almost = fv.render(model, [0], transforms=fv.jitter((size - 1.5) / size), steps=4, size=size, progress=False)
    assert almost.images.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_data_statistics_take_images_on_a_gpu():
    """What render()'s Fourier parameterizations and the metrics are made from, from images on the GPU."""
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cov = fv.color_covariance(x)
    torch.testing.assert_close(fv.color_covariance(x.cuda()).cpu(), cov)
    torch.testing.assert_close(fv.magnitude_spectrum(x.cuda(), cov).cpu(), fv.magnitude_spectrum(x, cov), atol=1e-5, rtol=1e-4)
    hard = data.load_data("synthetic-hard", n_train=200, n_test=20)
    detector = metrics.PlantedDetector(hard.train_x)
    assert torch.equal(detector(hard.test_x.cuda()), detector(hard.test_x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_vae_reconstructs_and_scores_images_from_the_cpu():
    """As interpolate does: the dataset's uint8 images stay on the CPU, the VAE moves them."""
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    net = vae()
    gpu = copy.deepcopy(net).cuda()
    on_gpu = gpu.reconstruct(images)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), net.reconstruct(images), atol=1e-2)  # TF32 convolutions
    bpd = gpu.elbo(images, generator=torch.Generator("cuda").manual_seed(0))["bpd"]
    assert bpd.is_cuda and bpd.isfinite().all()
    with torch.no_grad():  # a CPU generator serves it too, with the CPU's draws (VAE.ipynb's samples)
        for how in ("sample", "sample_aggregate"):
            cpu, gpu_drawn = (getattr(m, how)(3, torch.Generator().manual_seed(0)) for m in (net, gpu))
            assert torch.allclose(gpu_drawn.cpu(), cpu, atol=1e-2), how
    assert gpu.elbo(images, generator=torch.Generator().manual_seed(0))["bpd"].isfinite().all()


def test_float64_casts_happen_on_the_cpu():
    """mps has no float64: a tensor that may be on the model's device is cast through models.exact (which moves
    it to the CPU there) or after .cpu(), in every module of the lab. No mps device here: this reads the code."""
    for module in (attribution, atlas, data, fv, metrics, models, training, utils):
        tree = ast.parse(Path(module.__file__).read_text())
        exact_body = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "exact"
                      for n in ast.walk(f)}
        for node in ast.walk(tree):
            to_float64 = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr == "double" or node.func.attr == "to" and any(
                    isinstance(a, ast.Attribute) and a.attr in ("float64", "double") for a in node.args))
            if to_float64:  # x.double(), x.to(torch.float64)
                on = node.func.value
                cpu = isinstance(on, ast.Call) and isinstance(on.func, ast.Attribute) and on.func.attr == "cpu"
                assert cpu or id(node) in exact_body, f"{module.__name__}:{node.lineno} casts to float64 on its device"


@pytest.mark.parametrize("kind", ["fourier", "maco"])
def test_a_pool_of_fourier_draws_keeps_fewer_images_than_it_was_built_for(kind):
    """A pool is built for all its draws and keeps the best: its colour mixing cannot assume the count it was
    built for (at 9 x 9, 4 draws have 324 pixels and the one kept 81, which 4 do not divide)."""
    options = dict(magnitude=_magnitude(3, 9)) if kind == "maco" else {}
    result = fv.render(cnn(9), [0], param=fv.parameterization(kind, pool=4, **options), steps=2, progress=False)
    assert result.images.shape == (1, 3, 9, 9) and result.images.isfinite().all()


class _LinearProbe(nn.Module):
    """A frozen backbone run under torch.no_grad, and a linear head on its features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(f)


def test_where_a_neuron_computed_without_gradients_looks_is_an_error_that_says_why():
    model, x = _LinearProbe().eval(), torch.rand(2, 3, 32, 32)
    assert models.capture(model, x, "backbone.1")["backbone.1"].shape == (2, 8, 30, 30)  # it can be read
    with pytest.raises(ValueError, match="layer 'backbone.1' is computed without gradients .* cannot be measured"):
        fv.looks_at(model, fv.Neuron("backbone.1", 0, 3, 3), x)


def test_images_too_small_for_the_model_are_named_by_every_entry_point():
    """As inception_v3 refuses 32 px images: capture and the attributions said only torch's "Output size is too
    small", where render and exemplars already named the images' size."""
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.MaxPool2d(8), nn.Flatten(), nn.Linear(4, 10)).eval()
    x = torch.rand(2, 3, 8, 8)
    for call in (lambda: models.capture(model, x, "0"), lambda: attribution.saliency(model, x, 1),
                 lambda: attribution.grad_cam(model, x, 1, layer="0"), lambda: fv.exemplars(model, x, 1)):
        with pytest.raises(ValueError, match=r"Sequential fails on a 3-channel 8x8 image .* Output size is too small"):
            call()
    # the device's own errors stand as they are: no input size would mend them
    class OutOfMemory(nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        models.capture(nn.Sequential(nn.Conv2d(3, 4, 3), OutOfMemory()), torch.rand(2, 3, 32, 32), "0")


class _Offset(nn.Module):
    """A plain tensor attribute, which model.to() leaves where it was made (here: the meta device)."""

    def __init__(self):
        super().__init__()
        self.offset = torch.zeros(1, device="meta")

    def forward(self, x):
        return x + self.offset


class _OutOfMemoryOnLarge(nn.Module):
    def forward(self, x):
        if x.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x


def test_a_tensor_left_on_another_device_and_a_device_error_are_not_called_an_image_size_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Offset(), nn.Flatten()).eval()
    with pytest.raises(RuntimeError, match="expected device") as caught:
        models.capture(model, torch.rand(2, 3, 32, 32), "0")
    assert not isinstance(caught.value, ValueError)  # not "fails on a 3-channel 32x32 image ... give size="
    # cell_centres' larger noise pass: an out-of-memory stands, not an even stretch in silence
    oom = nn.Sequential(_OutOfMemoryOnLarge(), nn.Conv2d(3, 4, 3, padding=1)).eval()
    with pytest.raises(torch.OutOfMemoryError):
        models.cell_centres(oom, "1", torch.rand(1, 3, 32, 32))
