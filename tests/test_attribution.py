"""Attribution maps on tiny models whose evidence sits at known pixels / regions."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import attribution
import models

A = (0, 5, 7)    # (channel, row, col) of the pixel that drives class 0
B = (2, 20, 11)  # the pixel that drives class 1


class PixelModel(nn.Module):
    """Logits that depend only on pixels A and B, nonlinearly: class 0 up with A, class 1 down with B."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x):  # (B, C, H, W) -> (B, 3)
        a, b = x[:, A[0], A[1], A[2]], x[:, B[0], B[1], B[2]]
        logit0 = self.frozen * torch.tanh(3 * a)   # increasing in a
        logit1 = -self.scale * (b + 2 * b ** 2)     # decreasing in b (b >= 0)
        logit2 = 4 * a * b                          # an interaction
        return torch.stack([logit0, logit1, logit2], 1)


class RegionModel(nn.Module):
    """Class 0 = mean redness, class 1 = mean blueness, read from an 8x8 feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1  # channel 0 sees red
            self.conv.weight[1, 2] = 1  # channel 1 sees blue
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(4)  # (B, 2, 8, 8)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x):
        f = self.pool(self.act(self.conv(x)))  # (B, 2, 8, 8)
        return self.head(f.mean((2, 3)))


def pixel_images(n=2):
    x = torch.zeros(n, 3, 32, 32)
    x[:, A[0], A[1], A[2]] = torch.linspace(0.3, 0.9, n)
    x[:, B[0], B[1], B[2]] = torch.linspace(0.8, 0.4, n)
    return x


def region_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    x[:, 0, :8, :8] = 1.0     # red patch top-left
    x[:, 2, 24:, 24:] = 1.0   # blue patch bottom-right
    return x


def assert_untouched(model, modes, flags):
    for m in model.modules():
        for name in ("_forward_hooks", "_backward_hooks", "_forward_pre_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            assert len(getattr(m, name)) == 0, f"{name} left on {type(m).__name__}"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # gradients were taken for the images only


def snapshot(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_saliency_is_nonzero_exactly_at_the_known_pixels():
    model, x = PixelModel(), pixel_images()
    sal = attribution.saliency(model, x, torch.tensor([0, 1]))
    assert sal.shape == (2, 32, 32) and (sal >= 0).all()
    for i, (_, r, c) in enumerate([A, B]):
        nz = sal[i].nonzero().tolist()
        assert nz == [[r, c]]
    both = attribution.saliency(model, x, 2)  # interaction: both pixels
    assert {tuple(p) for p in both[0].nonzero().tolist()} == {A[1:], B[1:]}


def test_integrated_gradients_sign_and_completeness():
    model, x = PixelModel(), pixel_images()
    for target, (px, sign) in [(0, (A, 1)), (1, (B, -1))]:
        ig = attribution.integrated_gradients(model, x, target, steps=32)
        assert ig.shape == x.shape
        assert (torch.sign(ig[:, px[0], px[1], px[2]]) == sign).all()
        mask = torch.ones_like(ig, dtype=torch.bool)
        mask[:, px[0], px[1], px[2]] = False
        assert ig[mask].abs().max() == 0
    # completeness on the interaction logit, against f(x) - f(0) and an independent Riemann sum
    ig = attribution.integrated_gradients(model, x, 2, steps=32)
    with torch.no_grad():
        delta = model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]
    torch.testing.assert_close(ig.flatten(1).sum(1), delta, atol=1e-4, rtol=1e-4)
    alphas = (torch.arange(500) + 0.5) / 500  # midpoint rule
    path = (alphas.view(-1, 1, 1, 1, 1) * x).reshape(-1, *x.shape[1:]).requires_grad_()
    grads, = torch.autograd.grad(model(path)[:, 2].sum(), path)
    reference = grads.view(len(alphas), *x.shape).mean(0) * x
    torch.testing.assert_close(ig, reference, atol=1e-4, rtol=1e-3)


def test_integrated_gradients_of_a_margin_are_the_difference_and_add_up_to_its_change(recwarn):
    """against=: the attributions of the target's logit less another class's, summing to the margin's change,
    and a warning when too few steps leave that sum off, as for one logit."""
    model, x = PixelModel(), pixel_images()
    margin = attribution.integrated_gradients(model, x, 2, steps=32, against=[0, 1], internal_batch_size=1)
    one, other = (attribution.integrated_gradients(model, x, c, steps=32) for c in (2, torch.tensor([0, 1])))
    torch.testing.assert_close(margin, one - other)
    with torch.no_grad():
        out, black = model(x), model(torch.zeros_like(x))
        change = out[:, 2] - out[[0, 1], [0, 1]] - (black[:, 2] - black[[0, 1], [0, 1]])
    torch.testing.assert_close(margin.flatten(1).sum(1), change, atol=1e-4, rtol=1e-4)
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"integrated gradients in 1 steps are off the logit's change"):
        attribution.integrated_gradients(model, x, 2, steps=1, against=0)
    with pytest.raises(ValueError, match=r"^against must be class indices in 0\.\.2; got 7"):
        attribution.integrated_gradients(model, x, 2, against=7)


def test_a_margin_near_0_between_two_logits_that_change_alike_is_held_to_their_changes(recwarn):
    """A mistake's margin (said less true) can change by almost nothing along the path where both logits change by
    a lot: its sum, the difference of two integrals each as complete as its logit's, is held to the two changes,
    not to the margin's own (as measured on CIFAR-10: 0.74 and 0.74, the margin 0.003, its sum 0.033 in 64 steps)."""
    ends = torch.tensor([[[1.1034, 0.6282]], [[0.3633, -0.1086]]], dtype=torch.float64)  # (image, baseline) x 1 x 2
    margin = (1.1034 - 0.6282) - (0.3633 + 0.1086)

    def check(total, rival=True):
        f = margin if rival else 1.1034 - 0.3633
        attribution._check_complete(torch.full((1, 1, 1, 1), f + total, dtype=torch.float64),
                                    ends if rival else ends * torch.tensor([1.0, 0.0]), 64, torch.float32)
    check(0.029)  # 2% of the two changes: within
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"in 64 steps are off the logit's change f\(image\) - f\(baseline\) by up to "
                                         r"10% of the two logits' changes together"):
        check(0.148)  # 10% of them
    check(0.029, rival=False)  # one logit, as before: 4% of its change
    assert not recwarn.list
    with pytest.warns(UserWarning, match="by up to 7% of it, over 5%"):
        check(0.05, rival=False)


def test_integrated_gradients_custom_baseline():
    model, x = PixelModel(), pixel_images()
    ig = attribution.integrated_gradients(model, x, 1, baseline=0.5, steps=16, internal_batch_size=8)
    with torch.no_grad():
        delta = model(x)[:, 1] - model(torch.full_like(x, 0.5))[:, 1]
    torch.testing.assert_close(ig.flatten(1).sum(1), delta, atol=1e-4, rtol=1e-4)


def test_integrated_gradients_baseline_is_read_as_images():
    model, x = PixelModel(), pixel_images()
    grey = attribution.integrated_gradients(model, x, 1, baseline=torch.full((3, 32, 32), 0.5), steps=8)
    as_uint8 = attribution.integrated_gradients(model, x, 1, baseline=torch.full((3, 32, 32), 128, dtype=torch.uint8),
                                                steps=8)
    torch.testing.assert_close(as_uint8, grey, atol=2e-3, rtol=0.02)  # 128/255, not 128
    with pytest.raises(ValueError, match=r"baseline must be .*got floats in \[200, 200\]"):
        attribution.integrated_gradients(model, x, 1, baseline=torch.full((3, 32, 32), 200.0))
    black = attribution.integrated_gradients(model, x, 1, steps=8)
    torch.testing.assert_close(attribution.integrated_gradients(model, x, 1, baseline=0, steps=8), black)  # int 0 too


def test_grad_cam_peaks_in_the_known_region():
    model, x = RegionModel(), region_images()
    red = attribution.grad_cam(model, x, 0, layer="act")
    blue = attribution.grad_cam(model, x, torch.tensor([1, 1]), layer=model.pool)
    assert red.shape == blue.shape == (2, 32, 32) and (red >= 0).all() and (blue >= 0).all()
    for cam, (rows, cols) in [(red, (slice(0, 8), slice(0, 8))), (blue, (slice(24, 32), slice(24, 32)))]:
        for m in cam:
            r, c = divmod(int(m.argmax()), 32)
            assert rows.start <= r < rows.stop and cols.start <= c < cols.stop
            assert m[rows, cols].mean() > 4 * m.mean()  # the patch is 1/16 of the image


def test_bad_layer_name_lists_valid_layers():
    model = RegionModel()
    with pytest.raises(ValueError, match=r"valid layers:.*conv.*act.*head"):
        attribution.grad_cam(model, region_images(), 0, layer="nope")


def test_grad_cam_refuses_a_module_of_another_model():
    with pytest.raises(ValueError, match=r"not one of its modules \(models.list_layers"):
        attribution.grad_cam(RegionModel(), region_images(), 0, layer=RegionModel().act)


@pytest.mark.parametrize("train", [True, False])
def test_model_left_as_found(train):
    model, x = PixelModel(), pixel_images()
    region, xr = RegionModel(), region_images()
    model.train(train)
    region.train(train)
    region.head.weight.requires_grad_(False)
    before, before_r = snapshot(model), snapshot(region)
    x0 = x.clone()
    attribution.saliency(model, x, 0)
    assert_untouched(model, *before)
    attribution.integrated_gradients(model, x, 1, steps=4)
    assert_untouched(model, *before)
    attribution.grad_cam(region, xr, 0, layer="act")
    assert_untouched(region, *before_r)
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None


class FailsInBackwardPass(nn.Module):
    """Raises only in a pass that records gradients: captum's, after it has put its hooks on."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.register_forward_hook(lambda *args: None)  # a hook that a failed pass leaves, which is removed
            raise RuntimeError("fails in the gradient pass")
        return x


@pytest.mark.parametrize("method", ["saliency", "grad_cam", "integrated_gradients"])
def test_model_left_as_found_when_captum_fails(method):
    region = RegionModel().train()
    region.pool = nn.Sequential(FailsInBackwardPass(), region.pool)
    region.head.weight.requires_grad_(False)
    before = snapshot(region)
    kwargs = dict(layer="act") if method == "grad_cam" else {}
    with pytest.raises(RuntimeError, match="fails in the gradient pass"):
        getattr(attribution, method)(region, region_images(), 0, **kwargs)
    assert_untouched(region, *before)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_attributions_need_no_gradients_switched_on(context):
    model, x, region, xr = PixelModel(), pixel_images(), RegionModel(), region_images()
    calls = [lambda: attribution.saliency(model, x, 0), lambda: attribution.integrated_gradients(model, x, 1, steps=4),
             lambda: attribution.grad_cam(region, xr, 0, layer="act")]
    expected = [call() for call in calls]
    with context():
        for call, ref in zip(calls, expected):
            assert torch.equal(call(), ref)


def test_to_heatmap():
    attr = torch.tensor([[1.0, -2.0], [-3.0, 0.5]]).view(1, 2, 1, 2)  # (B, C, H, W)
    torch.testing.assert_close(attribution.to_heatmap(attr), torch.tensor([[[4.0, 2.5]]]))
    torch.testing.assert_close(attribution.to_heatmap(attr, signed=True), torch.tensor([[[-2.0, -1.5]]]))
    assert attribution.to_heatmap(attr.bfloat16()).dtype == torch.float32  # float32 maps, as every function gives


@pytest.mark.parametrize("channels", [3, 1])
def test_real_small_cnn_shapes(channels):
    model = models.build_model(models.cnn_config("small", in_channels=channels)).train()
    before, stats = snapshot(model), model.block1.bn1.running_mean.clone()
    x = torch.rand(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 7])
    assert attribution.saliency(model, x, t).shape == (2, 32, 32)
    cam = attribution.grad_cam(model, x, t)
    assert cam.shape == (2, 32, 32) and (cam >= 0).all()
    assert attribution.grad_cam(model, x, 1, layer="block1.act2").shape == (2, 32, 32)
    ig = attribution.integrated_gradients(model, x, t, steps=4)
    assert ig.shape == x.shape and not ig.requires_grad
    assert attribution.to_heatmap(ig).shape == (2, 32, 32)
    assert_untouched(model, *before)
    assert torch.equal(model.block1.bn1.running_mean, stats)  # ran in eval mode: BN stats unchanged


def test_to_heatmap_refuses_one_image_attributions():
    ig = attribution.integrated_gradients(RegionModel(), region_images(), 0, steps=4)
    with pytest.raises(ValueError, match=r"attr must be attributions \(B, C, H, W\).*attr\[None\]"):
        attribution.to_heatmap(ig[0])  # (C, H, W) would pass for C maps of one channel each
    assert attribution.to_heatmap(ig[:1]).shape == (1, 32, 32)


@pytest.mark.parametrize("fn", [attribution.saliency, attribution.grad_cam, attribution.integrated_gradients])
def test_images_must_be_a_batch_of_the_models_channels(fn):
    gray = models.build_model(models.cnn_config("small", in_channels=1, image_size=28))
    rgb = models.build_model(models.cnn_config("small"))
    with pytest.raises(ValueError, match=r"batch \(B, C, H, W\).*got shape \(1, 28, 28\).*images\[None\]"):
        fn(gray, torch.rand(1, 28, 28), 3)  # one image: the model broadcast it into a wrong (1, 28) map
    with pytest.raises(ValueError, match=r"images have 1 channel\(s\), the model takes 3"):
        fn(rgb, torch.rand(2, 1, 32, 32), 3)  # the input normalization broadcast gray to RGB
    with pytest.raises(ValueError, match=r"at least one image; got shape \(0, 3, 32, 32\)"):
        fn(rgb, torch.rand(0, 3, 32, 32), 3)
    assert fn(gray, torch.rand(1, 1, 28, 28), 3).shape[-2:] == (28, 28)


@pytest.mark.parametrize("targets", [None, "cat", True, 2.0, [[0, 1]], [0, 1, 2]])
def test_targets_must_be_class_indices(targets):
    with pytest.raises(ValueError, match=r"targets must be a class index \(int\) or 2 of them"):
        attribution.saliency(PixelModel(), pixel_images(2), targets)


def test_integrated_gradients_baseline_per_channel():
    model, x = PixelModel(), pixel_images()
    per_channel = attribution.integrated_gradients(model, x, 2, baseline=[0.2, 0.5, 0.7], steps=8)
    image = torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(per_channel, attribution.integrated_gradients(model, x, 2, baseline=image, steps=8))
    with pytest.raises(ValueError, match=r"baseline must be a scalar, one value per channel.*got shape \(5,\)"):
        attribution.integrated_gradients(model, x, 2, baseline=torch.full((5,), 0.5))


class _HeadFirst(nn.Module):
    """A fully convolutional classifier whose head, a 1x1 convolution, is registered before its stem."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 10, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x))).mean((2, 3))


def test_a_model_whose_first_convolution_is_not_its_stem():
    assert attribution.saliency(_HeadFirst(), torch.rand(2, 3, 16, 16), 1).shape == (2, 16, 16)


def _small_cnn():
    torch.manual_seed(0)
    return models.build_model(models.cnn_config("small")).eval()


def test_saliency_and_grad_cam_match_their_definitions_by_hand():
    model, layer = _small_cnn(), "block2.act2"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 4, 9])
    xg = x.clone().requires_grad_()
    model(xg)[torch.arange(3), t].sum().backward()
    assert torch.allclose(attribution.saliency(model, x, t), xg.grad.abs().amax(1), atol=1e-6)  # max over channels
    acts = {}
    hook = models.get_layer(model, layer).register_forward_hook(lambda m, i, out: acts.update(a=out))
    try:
        out = model(x)
    finally:
        hook.remove()
    a = acts["a"]
    grads, = torch.autograd.grad(out[torch.arange(3), t].sum(), a)
    cam = (grads.mean((2, 3), keepdim=True) * a).sum(1).relu()  # (B, 7, 7)
    want = placed(cam.detach(), *models.cell_centres(model, layer, x))  # each cell at its centre: tested below
    assert torch.allclose(attribution.grad_cam(model, x, t, layer=layer), want, atol=1e-5)


def placed(cam, rows, cols, size=32):
    """Maps (B, h, w) read at every pixel of a size x size image linearly between their cells' centres (rows,
    cols), the end cells' values beyond them: one axis after the other, by np.interp."""
    grid = np.arange(size)
    down = np.array([[np.interp(grid, rows, column) for column in m.T] for m in cam.double().numpy()])  # (B, w, H)
    return torch.tensor(np.array([[np.interp(grid, cols, row) for row in m.T] for m in down])).float()


class ValidConv(nn.Module):
    """Class 0 = redness, class 1 = blueness, read from a 6x6 map of 32 px images that ends short of their far
    edges: a 9x9 convolution without padding (24x24, centred on pixels 4..27) then 4x4 average pools, so the
    cells see pixels 4k..4k+11, centred on 4k + 5.5 (5.5 .. 25.5), where an even stretch puts 2.2 .. 28.8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 9, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1 / 81
            self.conv.weight[1, 2] = 1 / 81
        self.pool = nn.AvgPool2d(4)

    def forward(self, x):
        return self.pool(self.conv(x)).mean((2, 3))


def test_grad_cam_draws_each_cell_at_the_centre_of_what_it_sees():
    model, x = ValidConv(), region_images()
    centres = 4 * torch.arange(6.0) + 5.5
    rows, cols = models.cell_centres(model, "pool", x)
    assert torch.allclose(rows, centres.double(), atol=1e-6) and torch.allclose(cols, rows)
    with torch.no_grad():  # class 1 is channel 1's mean over 36 cells: Grad-CAM weighs it 1/36, channel 0 by 0
        cam = model.pool(model.conv(x))[:, 1] / 36  # (B, 6, 6), not negative
    got = attribution.grad_cam(model, x, 1, layer="pool")
    assert torch.allclose(got, placed(cam, centres, centres), atol=1e-6)
    stretched = nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert not torch.allclose(got, stretched, atol=1e-3)  # Grad-CAM as usually drawn: up to 3.3 px off
    blue = got[:, 24:, 24:].mean() / got.mean()  # the blue patch's corner: read by the last cells only
    assert blue > stretched[:, 24:, 24:].mean() / stretched.mean()
    # as pytorch-grad-cam draws it, stretched evenly; or the layer's own map
    assert torch.allclose(attribution.grad_cam(model, x, 1, layer="pool", upsample="bilinear"), stretched, atol=1e-6)
    assert torch.allclose(attribution.grad_cam(model, x, 1, layer="pool", upsample=None), cam, atol=1e-6)
    with pytest.raises(ValueError, match="upsample must be one of 'centres', 'bilinear', None; got 'nearest'"):
        attribution.grad_cam(model, x, 1, layer="pool", upsample="nearest")


def test_cell_centres_of_known_geometries():
    model = _small_cnn()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # a 2x2 convolution without padding, then 2x2 pools that drop an odd last row: by hand, rows and columns at
    # these centres, measured from the gradient, which one random 2x2 kernel may tip by up to half a pixel
    for layer, want, atol in [("whiten", torch.arange(31) + 0.5, 0.5), ("block1.act2", 2 * torch.arange(15) + 1.0, 0.3),
                              ("block2.act2", 4 * torch.arange(7) + 2.0, 0.3),
                              ("block3.act2", 8 * torch.arange(3) + 4.0, 0.3)]:
        for got in models.cell_centres(model, layer, x):
            assert torch.allclose(got, want.double(), atol=atol), (layer, got)
    import torchvision
    resnet = torchvision.models.resnet18(num_classes=10).eval()  # a stem of stride 4 centred on pixel 0, then 2
    for got in models.cell_centres(resnet, "layer2.1.relu", x):
        assert torch.allclose(got, 8 * torch.arange(4).double(), atol=0.5), got
    even = (torch.arange(8) + 0.5).double() * 4 - 0.5
    sized = nn.Sequential(nn.AdaptiveAvgPool2d(16), nn.Conv2d(3, 2, 3, padding=1), nn.AvgPool2d(2))
    for got in models.cell_centres(sized, "2", x):  # a map of 8x8 cells whatever the image: the even stretch
        assert torch.allclose(got, even), got


def test_cell_centres_of_a_stride_that_does_not_divide_the_margin_twice():
    """A 14 px patch convolution and a 2x2 pool: stride 28, centres 13.5 + 28 i. The 64 px margins add 4 cells,
    which alone would say stride 32: the measured spacing refuses it, and the even stretch is right here."""
    patches = nn.Sequential(nn.Conv2d(3, 4, 14, stride=14), nn.AvgPool2d(2))
    for got in models.cell_centres(patches, "1", torch.rand(1, 3, 224, 224)):
        assert torch.allclose(got, 13.5 + 28 * torch.arange(8).double()), got


class _Gated(nn.Module):
    """4x4 average pools scaled by a gate read from the whole image, as a squeeze-and-excitation block's: the
    gradient of any row spreads a little over every pixel."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)

    def forward(self, x):
        return self.pool(x) * (1 + x.mean((1, 2, 3), keepdim=True))


def test_cell_centres_look_past_a_gate_that_reads_the_whole_image():
    for got in models.cell_centres(_Gated(), "pool", torch.rand(1, 3, 32, 32)):  # not pulled to the middle
        assert torch.allclose(got, 4 * torch.arange(8).double() + 1.5, atol=1e-3), got


class _OneSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)

    def forward(self, x):
        torch._assert(x.shape[-1] == 32, "32 px images only")
        return self.pool(x).mean((2, 3))


def test_cell_centres_of_a_model_for_one_image_size_are_the_even_stretch():
    rows, cols = models.cell_centres(_OneSize(), "pool", torch.rand(1, 3, 32, 32))
    assert torch.allclose(rows, (torch.arange(8) + 0.5).double() * 4 - 0.5) and torch.allclose(cols, rows)


def test_integrated_gradients_takes_its_steps():
    from captum.attr import IntegratedGradients
    model = _small_cnn()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 3])
    for steps in (3, 40):
        want = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=steps)
        assert torch.allclose(attribution.integrated_gradients(model, x, t, steps=steps), want, atol=1e-6), steps
    few, many = (attribution.integrated_gradients(model, x, t, steps=steps) for steps in (3, 40))
    assert not torch.allclose(few, many, atol=1e-4)
    with torch.no_grad():  # and more steps come nearer completeness: f(x) - f(0), computed without captum
        delta = model(x)[[0, 1], t] - model(torch.zeros_like(x))[[0, 1], t]
    assert (many.flatten(1).sum(1) - delta).abs().max() < (few.flatten(1).sum(1) - delta).abs().max()


def test_a_model_that_does_not_return_logits_is_named():
    squeezed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1), nn.Flatten(0))  # (B,): one number an image
    with pytest.raises(ValueError, match=r"Sequential returns a tensor of shape \(1,\), not logits \(B, classes\)"):
        attribution.saliency(squeezed, pixel_images(), 0)


def test_integrated_gradients_say_when_their_sum_misses_the_logits_change():
    model = _small_cnn()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match=r"integrated gradients in 4 steps are off the logit's change f\(image\) - "
                                         r"f\(baseline\) by up to \d+% of it, over 5%: pass more steps") as w:
        attribution.integrated_gradients(model, x, 1, steps=4)
    assert w[0].filename == __file__  # past inference_mode's wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribution.integrated_gradients(model, x, 1, steps=64)


def test_integrated_gradients_in_bfloat16_allow_for_its_rounding():
    """In bfloat16 the attributions' sum misses a small change of the logit by their rounding: here by up to 49%
    at 256 steps, 43% at 1024. More steps cannot help, so the warning says to pass a float32 model instead (it
    used to say nothing); 2 steps are still too few."""
    model = _small_cnn().to(torch.bfloat16)
    x, t = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(8)
    with pytest.warns(UserWarning, match=r"integrated gradients of a bfloat16 model are off the logit's change "
                                         r"f\(image\) - f\(baseline\) by up to \d+% of it, within its rounding, "
                                         r"which more steps cannot mend: .* pass model.float\(\)") as w:
        attribution.integrated_gradients(model, x, t, steps=256)
    assert len(w) == 1 and "pass more steps" not in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribution.integrated_gradients(copy.deepcopy(model).float(), x, t, steps=256)  # the model stays bf16
    with pytest.warns(UserWarning, match="integrated gradients in 2 steps are off"):
        attribution.integrated_gradients(model, x, t, steps=2)


def test_integrated_gradients_run_internal_batch_size_images_at_a_time():
    """captum puts every image of a call into each of its batches: more images than internal_batch_size went
    through the model at once, with a warning of captum's."""
    model, seen = _small_cnn(), []
    model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    x = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.arange(7) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked = attribution.integrated_gradients(model, x, t, steps=64, internal_batch_size=3)
    assert max(seen) <= 3
    torch.testing.assert_close(chunked, attribution.integrated_gradients(model, x, t, steps=64, internal_batch_size=64))


def test_cell_centres_of_a_layer_without_a_map_are_refused_by_name():
    flat = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 30 * 30, 10))
    with pytest.raises(ValueError, match=r"layer '1' gives \(1, 1800\), not a map \(B, C, H, W\)"):
        models.cell_centres(flat, "1", torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="cells must be an int >= 2, got 1"):  # one row: no spacing to measure
        models.cell_centres(flat, "0", torch.rand(1, 3, 32, 32), cells=1)


def test_maps_that_are_not_finite_are_named_and_numpy_and_unsigned_numbers_are_taken():
    """A model whose logits overflow for an image (in float32 here, as a float16 model does sooner) gives maps
    that show nothing: each method names the image, as a plot would draw its map blank. And the counts and
    targets NumPy gives are taken."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()

    class Overflowing(nn.Module):  # its logits times e^(100 x the brightest pixel): inf for a pixel at 1.0
        def forward(self, x):
            return linear(x) * torch.exp(100 * x.amax((1, 2, 3)))[:, None]

    model = Overflowing().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    x[0, 0, 0, 0] = 1.0
    for method, call in [("saliency", lambda t: attribution.saliency(model, x, t)),
                         ("integrated gradients", lambda t: attribution.integrated_gradients(model, x, t, steps=8))]:
        with pytest.warns(UserWarning, match=rf"^{method} is NaN or inf for image\(s\) 0: the model's logits"):
            maps = call(1)
        assert not maps[0].isfinite().all() and maps[1].isfinite().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that does not overflow: no word
        assert attribution.saliency(linear, x, np.array([0, 2], dtype=np.uint32)).isfinite().all()  # was refused
    ig = attribution.integrated_gradients(linear, x, 0, steps=np.int64(8), internal_batch_size=np.int64(1))
    assert torch.allclose(ig, attribution.integrated_gradients(linear, x, 0, steps=8), atol=1e-6)  # a TypeError


def _correlation(a, b):
    """Pearson correlation of two maps per image, (B,); NaN where either map is flat."""
    a, b = (m.flatten(1) - m.flatten(1).mean(1, keepdim=True) for m in (a, b))
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("method", ["saliency", "grad_cam", "integrated_gradients"])
def test_the_maps_depend_on_the_weights(method):
    """Adebayo et al. 2018's model randomization check: a model of other weights gives other maps (measured: a
    mean correlation of 0.44 for saliency, 0.38 for Grad-CAM, 0.09 for integrated gradients), where a method
    that drew the image's own structure (its edges, say) whatever the weights would give the same."""
    x, t = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    maps = {"saliency": attribution.saliency, "grad_cam": attribution.grad_cam,
            "integrated_gradients": lambda m, x, t: attribution.to_heatmap(attribution.integrated_gradients(m, x, t),
                                                                           signed=True)}[method]
    first = _small_cnn()
    torch.manual_seed(1)
    other = models.build_model(models.cnn_config("small")).eval()
    assert _correlation(maps(first, x, t), maps(first, x, t)).nanmean() > 0.99  # the measure itself
    assert _correlation(maps(first, x, t), maps(other, x, t)).nanmean() < 0.6


def test_integrated_gradients_on_a_cnn_are_a_path_integral_by_hand():
    """Against an independent midpoint rule on a CNN (convolutions, pooling, batch norm), each image its own
    target: not against captum, which the wrapper calls."""
    model, t = _small_cnn(), torch.tensor([3, 7])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ig = attribution.integrated_gradients(model, x, t, steps=64)
    alphas = (torch.arange(256) + 0.5) / 256
    path = (alphas.view(-1, 1, 1, 1, 1) * x).reshape(-1, *x.shape[1:]).requires_grad_()  # alpha-major
    logits = model(path).view(len(alphas), len(x), -1)
    grads, = torch.autograd.grad(logits.gather(2, t.view(1, -1, 1).expand(len(alphas), -1, 1)).sum(), path)
    reference = grads.view(len(alphas), *x.shape).mean(0) * x
    # measured: within 8e-4 of the largest attribution (captum's 64 Gauss-Legendre steps against 256 midpoints)
    torch.testing.assert_close(ig, reference, atol=2e-3 * reference.abs().max().item(), rtol=0)


def test_saliency_and_grad_cam_take_batch_size_images_at_a_time(monkeypatch):
    model, x, t = _small_cnn(), torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.arange(5)
    whole = attribution.saliency(model, x, t), attribution.grad_cam(model, x, t)
    sizes, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda x: sizes.append(len(x)) or forward(x))
    torch.testing.assert_close(attribution.saliency(model, x, t, batch_size=2), whole[0], atol=1e-6, rtol=1e-5)
    assert sizes[-3:] == [2, 2, 1] and max(sizes) <= 2
    sizes.clear()
    torch.testing.assert_close(attribution.grad_cam(model, x, t, batch_size=2), whole[1], atol=1e-6, rtol=1e-5)
    assert 5 not in sizes and sizes.count(2) >= 2
    for method in (attribution.saliency, attribution.grad_cam):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
            method(model, x, t, batch_size=0)
