"""Feature visualization: parameterizations, transforms, targets, render(), exemplars, metrics.

Unit tests use untrained models; the planted-feature and transfer tests use a small classifier, an
independent one and a small VAE trained once on the synthetic dataset (module fixtures).
"""
import contextlib
import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import featureviz as fv
import metrics
import models
import training

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


def cnn(channels=3, seed=0):
    torch.manual_seed(seed)
    return models.build_model(models.cnn_config("small", in_channels=channels, image_size=32)).eval()


def vae_with_stats(channels=3, seed=0):
    """An untrained small VAE whose latent statistics are set by hand (a known covariance)."""
    torch.manual_seed(seed)
    vae = models.build_model(models.vae_config("small", in_channels=channels)).eval()
    d = vae.latent_dim
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed)) / d ** 0.5
    with torch.no_grad():
        vae.latent_mean.copy_(torch.linspace(-1, 1, d))
        vae.latent_cov.copy_(a @ a.T + 0.1 * torch.eye(d))
        vae.latent_lo.copy_(vae.latent_mean - 2)
        vae.latent_hi.copy_(vae.latent_mean + 2)
    return vae


def snapshot(model):
    """Everything render must leave as it found: modes, requires_grad, grads, strides, values."""
    return dict(
        modes=[m.training for m in model.modules()],
        flags=[p.requires_grad for p in model.parameters()],
        grads=[p.grad for p in model.parameters()],
        strides=[p.stride() for p in model.parameters()],
        state={k: v.clone() for k, v in model.state_dict().items()},
        hooks=sum(len(getattr(m, h)) for m in model.modules() for h in HOOKS),
    )


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["hooks"] == 0
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert all(g is None for g in after["grads"])
    assert after["strides"] == before["strides"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())


# ----------------------------------------------------------------------------- parameterizations

@pytest.mark.parametrize("kind", ["pixel", "fourier", "maco", "latent", "whitened"])
@pytest.mark.parametrize("channels", [1, 3])
def test_param_images_in_range_and_gradients_reach_parameters(kind, channels):
    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])[:channels, :channels]  # the images' own
    options = dict(vae=vae_with_stats(channels)) if kind in ("latent", "whitened") else {}
    if kind == "fourier":
        options = dict(color_cov=cov)
    if kind == "maco":
        options = dict(color_cov=cov, magnitude=torch.rand(channels, 32, 17, generator=gen) + 0.1)
    p = fv.parameterization(kind, **options)(5, channels, 32, gen)
    x = p()
    assert x.shape == (5, channels, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    (x * torch.linspace(0, 1, 32)).sum().backward()
    params = list(p.parameters())
    assert len(params) == 1  # the VAE's weights are not optimized
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def _interior(spec, size):
    """The rfft2 bins of a real image of size (h, w) that are not real: all but the DC bin and, for an even side,
    the Nyquist ones (flattened)."""
    return spec[..., ~fv._real_bins(size)]


@pytest.mark.parametrize("size", [16, 15, (12, 17), (15, 8), (15, 9)])
def test_maco_keeps_the_data_magnitude_and_optimizes_only_the_phase(size):
    """Every bin keeps the data's magnitude, those of the first column (and the last, for an even width) too,
    whose mirror pairs (-ky, ky) a one-sided spectrum holds twice: two free phases there left anywhere from
    none to all of a pair's magnitude, half the power along the height on average. Square or not."""
    gen = torch.Generator().manual_seed(0)
    h, w = models.image_shape(size)
    magnitude = torch.rand(3, h, w // 2 + 1, generator=gen) + 0.1
    magnitude = (magnitude + magnitude.flip(1).roll(1, 1)) / 2  # |X(-ky)| = |X(ky)|, as for real images
    p = fv.MaCoParam(2, 3, size, magnitude=magnitude, generator=gen)  # no color_cov: the identity
    assert p().shape == (2, 3, h, w)
    assert [name for name, _ in p.named_parameters()] == ["phase"]
    x = torch.logit(p().detach().double())
    rms = (x - x.mean((2, 3), keepdim=True)).pow(2).mean((1, 2, 3)).sqrt()  # the contrast, whatever the phases
    assert torch.allclose(rms, torch.ones(2, dtype=torch.double), rtol=0.01 if h % 2 == 0 or w % 2 == 0 else 1e-6), rms
    opt = torch.optim.Adam(p.parameters(), lr=0.1)
    for _ in range(5):  # after some steps of any objective, the magnitude is still the data's
        opt.zero_grad()
        (p() * torch.linspace(0, 1, w)).sum().backward()
        opt.step()
    got = _interior(torch.fft.rfft2(torch.logit(p().detach().double()), norm="ortho").abs(), (h, w))
    ratio = got / _interior(magnitude, (h, w)).double()  # one scale for all (the contrast)
    assert torch.allclose(ratio, ratio.flatten().mean(), rtol=1e-3)
    images = torch.rand(2, 3, h, w, generator=gen) * 0.8 + 0.1
    p.set_images(images)  # their phases, the data's magnitude
    want = _interior(torch.fft.rfft2(torch.logit(images.double()), norm="ortho"), (h, w))
    got = _interior(torch.fft.rfft2(torch.logit(p().detach().double()), norm="ortho"), (h, w))
    assert (torch.angle(got / want)).abs().max() < 1e-3


def test_maco_polar_matches_torch_polar_and_its_gradient():
    """MaCo's closed-form phase gradient is the one autograd gives torch.polar, through the inverse FFT, also
    at the bins a real image's spectrum has real (the inverse reads only their cosines)."""
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.rand(3, 8, 5, generator=gen) + 0.1
    phase = ((2 * torch.rand(2, 3, 8, 5, generator=gen) - 1) * torch.pi).requires_grad_()
    weight = torch.randn(2, 3, 8, 8, generator=gen)
    grads = []
    for polar in (fv._Polar.apply, lambda m, p: torch.polar(m.expand_as(p), p)):
        spec = polar(magnitude, phase)
        (fv._irfft2(spec, (8, 8)) * weight).sum().backward()
        grads.append((spec.detach(), phase.grad))
        phase.grad = None
    (ours, g_ours), (want, g_want) = grads
    assert torch.allclose(ours, want, atol=1e-6)
    real = fv._real_bins((8, 8))  # the DC term and the three Nyquist bins
    assert real.sum() == 4 and real[0, 0] and real[4, 4]
    for size, bins in (((12, 17), [(0, 0), (6, 0)]), ((15, 8), [(0, 0), (0, 4)]), ((15, 9), [(0, 0)]),
                       ((6, 10), [(0, 0), (0, 5), (3, 0), (3, 5)])):  # a Nyquist row for an even height, column width
        assert fv._real_bins(size).nonzero().tolist() == [list(b) for b in bins]
    assert torch.allclose(g_ours, g_want, atol=1e-5) and g_want[..., real].abs().min() > 0


def _hermitian_reference(spec, size):
    """The real images of size (H, W) of the Hermitian part of one-sided spectra (..., H, W//2+1): the whole
    spectrum written out, each bin of the self-conjugate columns (the first; the last for an even width) averaged
    with its mirror's conjugate, then a complex inverse FFT, whose imaginary part is then nothing."""
    h, w = size
    mirror = (-torch.arange(h)) % h  # row -ky of each row ky
    full = torch.zeros(*spec.shape[:-1], w, dtype=spec.dtype)
    full[..., : spec.shape[-1]] = spec
    for k in range(spec.shape[-1], w):  # the columns rfft2 leaves out: conjugates of mirrored ones
        full[..., k] = spec[..., mirror, w - k].conj()
    for k in (0, w // 2) if w % 2 == 0 else (0,):
        full[..., k] = (spec[..., k] + spec[..., mirror, k].conj()) / 2
    x = torch.fft.ifft2(full, norm="ortho")
    assert x.imag.abs().max() < 1e-12 * max(h, w)
    return x.real


@pytest.mark.parametrize("size", [(8, 8), (9, 9), (8, 9), (9, 6)])
def test_the_inverse_fft_of_a_spectrum_that_is_not_hermitian_takes_its_hermitian_part(size, monkeypatch):
    """A Fourier parameterization's spectra are not Hermitian where a real image's are: a CPU's irfft2 takes
    their Hermitian part, and _hermitian_irfft2 (used on other devices, whose irfft2 may not) does the same,
    handing on to its inverse along the width only bins that are real where they must be. Square or not."""
    (h, w), gen = size, torch.Generator().manual_seed(sum(size))
    spec = torch.randn(2, 3, h, w // 2 + 1, dtype=torch.complex128, generator=gen)
    weight = torch.randn(h, w, dtype=torch.float64, generator=gen)
    handed = []
    irfft = torch.fft.irfft
    monkeypatch.setattr(torch.fft, "irfft", lambda y, **kw: handed.append(y.detach()) or irfft(y, **kw))
    got = []
    for inverse in (lambda s: _hermitian_reference(s, size),
                    lambda s: torch.fft.irfft2(s, s=size, norm="ortho"),
                    lambda s: fv._hermitian_irfft2(s, size)):
        leaf = spec.clone().requires_grad_()
        x = inverse(leaf)
        (x * weight).sum().backward()
        got.append((x.detach(), leaf.grad))
    (want, g_want), *others = got
    for x, g in others:  # the images and their gradient, in every bin
        assert torch.allclose(x, want, atol=1e-12) and torch.allclose(g, g_want, atol=1e-12)
    ends = [0, w // 2] if w % 2 == 0 else [0]
    assert handed and handed[0][..., ends].imag.abs().max() == 0 and handed[0][..., 1].imag.abs().max() > 0


def test_the_inverse_fft_takes_two_steps_off_the_cpu_only(monkeypatch):
    """On a CPU _irfft2 is irfft2 (which takes the Hermitian part there); on any other device the two steps."""
    calls = []
    monkeypatch.setattr(fv, "_hermitian_irfft2", lambda spec, size: calls.append(spec.device.type) or spec.real)
    cpu = torch.randn(1, 1, 8, 5, dtype=torch.complex64)
    assert torch.equal(fv._irfft2(cpu, (8, 8)), torch.fft.irfft2(cpu, s=(8, 8), norm="ortho")) and calls == []
    fv._irfft2(torch.empty(1, 1, 8, 5, dtype=torch.complex64, device="meta"), (8, 8))
    assert calls == ["meta"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cls", [fv.FourierParam, fv.MaCoParam])
def test_fourier_images_on_a_gpu_are_the_cpu_ones(cls):
    """The same parameters make the same images and gradients on a GPU as on the CPU, shifted or not,
    though their spectra are not Hermitian (cuFFT's irfft2 of such spectra is undefined)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=gen)
    cov = fv.color_covariance(images)
    options = dict(magnitude=fv.magnitude_spectrum(images, cov)) if cls is fv.MaCoParam else dict(sd=0.5)
    param = cls(4, 3, 32, color_cov=cov, generator=gen, **options)
    shift = fv.STANDARD.phase(4, 32, 32, gen, "cpu")
    weight = torch.randn(4, 3, 32, 32, generator=gen)
    for ramp in (None, shift):
        got = []
        for device in ("cpu", "cuda"):
            p = copy.deepcopy(param).to(device)
            x = p() if ramp is None else p(ramp.to(device))
            (x * weight.to(device)).sum().backward()
            got.append((x.detach().cpu(), next(p.parameters()).grad.cpu()))
        (x_cpu, g_cpu), (x_gpu, g_gpu) = got
        assert torch.allclose(x_cpu, x_gpu, atol=1e-5)
        assert torch.allclose(g_cpu, g_gpu, atol=1e-4 * g_cpu.abs().max())


def test_magnitude_spectrum_finds_the_data_frequency():
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    wave = 0.5 + 0.4 * torch.cos(2 * torch.pi * (3 * x + 2 * y) / 16)  # 3 cycles across, 2 down
    images = wave.expand(4, 3, 16, 16) + 0.02 * torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m = fv.magnitude_spectrum(images.clamp(0, 1))
    assert m.shape == (3, 16, 9)
    assert all(divmod(m[c].argmax().item(), 9) == (2, 3) for c in range(3))


def test_magnitude_spectrum_is_measured_in_the_decorrelated_colours():
    """Images whose colours mix three waves by the colour transform: each decorrelated channel holds its own."""
    cov = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]])
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    waves = [(1, 0), (0, 3), (2, 5)]  # (down, across) cycles of decorrelated channel 0, 1, 2
    phases = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 * torch.pi
    z = torch.stack([torch.cos(2 * torch.pi * (a * y + b * x) / 16 + phases[:, c]) for c, (a, b) in enumerate(waves)], 1)
    images = 0.5 + 0.1 * torch.einsum("cd,ndhw->nchw", fv.color_sqrt(cov, 3), z)  # 4 images, the waves shifted
    m = fv.magnitude_spectrum(images, cov)
    for c, (a, b) in enumerate(waves):
        others = [m[c, a2, b2].item() for a2, b2 in waves if (a2, b2) != (a, b)]
        assert max(others) < 1e-3 * m[c, a, b].item(), (c, others, m[c, a, b])


def test_the_colour_transform_is_the_covariance_root_with_spectral_norm_one():
    cov = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]]) * 0.05
    root = fv.color_sqrt(cov, 3)
    assert torch.linalg.matrix_norm(root, 2).item() == pytest.approx(1.0, abs=1e-5)
    scaled = root @ root.T
    assert torch.allclose(scaled / scaled[0, 0], cov / cov[0, 0], atol=1e-5)  # its square is the covariance's shape


@pytest.mark.parametrize("size", [16, 15])
def test_maco_contrast_is_exact_for_a_real_images_phases(size):
    """Parseval: with the magnitude and the phases of one real image, the image's RMS about its mean is the
    contrast asked, whatever its mean (the DC term, here far from 0, is not part of it)."""
    offsets = torch.tensor([-1.0, 0.5, 0.0])[:, None, None]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) + offsets
    magnitude = torch.fft.rfft2(x, norm="ortho").abs()[0]
    p = fv.MaCoParam(1, 3, size, magnitude=magnitude, contrast=0.7)
    p.set_images(torch.sigmoid(x))
    got = torch.logit(p().detach().double())
    rms = (got - got.mean((2, 3), keepdim=True)).pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(0.7, rel=1e-3)


def test_maco_set_images_keeps_their_mean_as_far_as_the_dc_term_reaches_and_can_move_it():
    """A real image's DC phase is 0 or pi, where cos has no gradient: set_images kept that, so an image's mean
    jumped to +-reach and one at phase 0 could never move. It now keeps the mean itself, within reach."""
    gen = torch.Generator().manual_seed(0)
    magnitude = fv.magnitude_spectrum(torch.rand(8, 1, 16, 16, generator=gen))
    p = fv.MaCoParam(3, 1, 16, magnitude=magnitude)
    reach = p.magnitude[0, 0, 0].item() / 16  # the largest mean, in the logits
    means = torch.tensor([0.3 * reach, -0.5 * reach, 5 * reach])  # within reach either way, and far beyond
    images = torch.sigmoid(means[:, None, None, None] + 0.5 * torch.randn(3, 1, 16, 16, generator=gen))
    p.set_images(images)
    got = torch.logit(p().detach().double()).mean((1, 2, 3))
    want = torch.logit(images.double().clamp(1e-3, 1 - 1e-3)).mean((1, 2, 3))
    torch.testing.assert_close(got[:2], want[:2], atol=1e-4, rtol=1e-3)
    assert 0.99 * reach < got[2].item() < reach
    p().mean().backward()
    assert (p.phase.grad[:, 0, 0, 0].abs() > 0).all()  # every DC term can move


def test_magnitude_spectrum_keeps_how_far_the_images_means_are_from_mid_gray():
    """The DC term is the mean over images of |mean - 0.5| times the side: the data's spread of brightness."""
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2
    images[::2] += 0.7  # three bright images (mean 0.8), three dark ones (mean 0.1)
    m = fv.magnitude_spectrum(images)
    want = (images.mean((1, 2, 3)) - 0.5).abs().mean() * 16
    assert m[0, 0, 0].item() == pytest.approx(want.item(), rel=1e-5)


def test_maco_draws_as_dark_as_its_data():
    """Dark data (Fashion-MNIST's black background): through the DC term's phase, MaCo's images can be as dark
    on average as the DC term reaches (the data's mean distance from mid-gray, scaled with the spectrum).
    With the DC term dropped, as before, they stayed at mid-gray on average whatever the objective."""
    gen = torch.Generator().manual_seed(0)
    dark = torch.zeros(64, 1, 16, 16)
    dark[:, :, 4:12, 5:11] = 0.5 + 0.5 * torch.rand(64, 1, 8, 6, generator=gen)  # a bright object on black
    magnitude = fv.magnitude_spectrum(dark)
    p = fv.MaCoParam(4, 1, 16, magnitude=magnitude, generator=gen)
    opt = torch.optim.Adam(p.parameters(), lr=0.1)
    for _ in range(50):  # the darkest images the fixed magnitude allows
        opt.zero_grad()
        p().mean().backward()
        opt.step()
    got = p().detach()
    mean_logit = torch.logit(got.double()).mean((1, 2, 3))
    reach = p.magnitude[0, 0, 0].item() / 16  # the DC term's largest mean, in the images' logits
    assert reach > 0.5
    torch.testing.assert_close(mean_logit, torch.full_like(mean_logit, -reach), rtol=0.02, atol=0.0)
    assert got.mean().item() < 0.4, got.mean()


def test_maco_technique_needs_the_magnitude():
    with pytest.raises(ValueError, match="magnitude spectrum"):
        fv.parameterization("maco")
    with pytest.raises(ValueError, match="magnitude_spectrum"):
        fv.get_technique("maco")
    with pytest.raises(ValueError, match=r"magnitude must be \(3, 32, 17\)"):
        fv.render(cnn(), [0], param=fv.parameterization("maco", magnitude=torch.ones(3, 16, 9)), steps=1,
                  progress=False)
    assert "maco" not in fv.techniques() and "maco" in fv.techniques(magnitude=torch.ones(3, 32, 17))


def test_parameterization_errors():
    with pytest.raises(ValueError, match="needs a VAE"):
        fv.parameterization("latent")
    with pytest.raises(ValueError, match="needs a VAE"):
        fv.parameterization("whitened")
    with pytest.raises(ValueError, match="unknown parameterization"):
        fv.parameterization("wavelet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['decay'\] for parameterization 'pixel'; valid: sd, init"):
        fv.parameterization("pixel", decay=1.5)
    with pytest.raises(ValueError, match="pool must be an int >= 0"):
        fv.parameterization("pixel", pool=-1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pools'\].*; valid: sd, init, pool$"):
        fv.parameterization("pixel", pools=8)  # pool is render's option, not the class's, and valid too


def test_color_covariance_matches_torch_cov():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    ref = torch.cov(x.float().div(255).transpose(0, 1).flatten(1))
    assert torch.allclose(fv.color_covariance(x), ref, atol=1e-6)
    assert torch.allclose(fv.color_covariance(x.float() / 255), ref, atol=1e-6)


def test_the_data_statistics_of_a_large_set_are_summed_a_batch_at_a_time(monkeypatch):
    """Large images are never all in float at once: 4 at a time here, with the statistics of the whole set."""
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = fv.color_covariance(x), fv.magnitude_spectrum(x, torch.eye(3) * 0.05)
    seen, to_float = [], fv.data.to_float
    monkeypatch.setattr(fv, "STATISTICS_VALUES", 4 * 3 * 8 * 8)
    monkeypatch.setattr(fv.data, "to_float", lambda images, *a: seen.append(len(images)) or to_float(images, *a))
    torch.testing.assert_close(fv.color_covariance(x), whole[0], rtol=1e-6, atol=0)
    assert seen == [4, 4, 2] * 2  # a pass for the mean, one for the products
    seen.clear()
    torch.testing.assert_close(fv.magnitude_spectrum(x, torch.eye(3) * 0.05), whole[1], rtol=1e-5, atol=0)
    assert seen == [4, 4, 2]


def test_colour_mixing_in_blocks_of_pixels_is_the_plain_product():
    # _to_image mixes up to 4 pixels a row with a block-diagonal matrix: the same numbers as the (C, C)
    # product, whether 4, 2 or 1 of them divide the pixels
    gen = torch.Generator().manual_seed(0)
    for channels, n, side in [(3, 10, 32), (3, 3, 7), (2, 2, 5), (1, 2, 28)]:
        color = torch.randn(channels, channels, generator=gen)
        x = torch.randn(n, channels, side, side, generator=gen)
        mixing = fv._mixing(color)
        assert mixing.shape == ((4 if channels > 1 else 1) * channels,) * 2
        ref = torch.sigmoid(torch.einsum("dc,nchw->ndhw", color, x))
        assert torch.allclose(fv._to_image(mixing, x), ref, atol=1e-6)


def test_fourier_color_transform_is_a_square_root_of_the_covariance():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [0.3, 0.6, 0.4]])
    cov = a @ a.T
    p = fv.FourierParam(64, 3, 32, color_cov=cov, sd=0.3, generator=torch.Generator().manual_seed(0))
    m = p.color
    ratio = (m @ m.T) / cov
    assert torch.allclose(ratio, ratio[0, 0].expand(3, 3), rtol=1e-4)
    # and the colours it makes are correlated like the data: the pre-sigmoid image's colour covariance
    y = torch.logit(p().detach()).transpose(0, 1).flatten(1)  # (C, N*H*W)
    corr = torch.corrcoef(y)
    ref = cov / cov.diagonal().sqrt()[:, None] / cov.diagonal().sqrt()[None]
    assert torch.allclose(corr, ref, atol=0.03)


def test_fourier_scale_is_one_over_frequency():
    for decay in (1.0, 2.0):
        s = fv.fourier_scale(32, decay)  # (32, 17); entry [0, k] is frequency k/32
        assert s.shape == (32, 17)
        assert torch.isclose(s[0, 1] / s[0, 4], torch.tensor(4.0 ** decay), rtol=1e-5)
        assert torch.isclose(s[0, 0], s[0, 1])  # floored at 1/size
        assert torch.isclose(s[4, 3], s[0, 5]) and torch.isclose(s[-1, 0], s[0, 1])  # radial: |(4, 3)| = 5; -1 is 1
    # a cosine of 3 cycles across, in every row: the measured spectrum is its one frequency, (0, 3)
    wave = 0.5 + 0.4 * torch.cos(2 * math.pi * 3 * torch.arange(32) / 32).expand(2, 3, 32, 32)
    measured = fv.spectrum(wave)
    assert measured.shape == (32, 17) and measured.argmax().item() == 3 and measured.max() > 1000 * measured[0, 4]
    # a measured spectrum is taken as it is, floored at 1e-3 of its peak, RMS 1
    given = torch.ones(32, 17)
    given[5, 5], given[7, 2] = 1e-6, 0.5
    scale = fv.fourier_scale(32, spectrum=given)
    assert torch.isclose(scale.pow(2).mean(), torch.tensor(1.0))
    assert scale[5, 5] / scale[0, 0] == pytest.approx(1e-3) and scale[7, 2] / scale[0, 0] == pytest.approx(0.5)
    assert torch.allclose(scale.flatten()[[1, 40, 200]], scale[0, 0].expand(3))  # the rest flat, not 1/f


def test_fourier_scale_of_an_image_that_is_not_square_follows_each_side():
    """At 24x40 entry [0, k] is frequency k/40 across the width, [k, 0] k/24 down the height, and the floor is
    the lowest frequency, 1/40."""
    s = fv.fourier_scale((24, 40))
    assert s.shape == (24, 21)
    assert torch.isclose(s[0, 1] / s[1, 0], torch.tensor(40 / 24), rtol=1e-5)
    assert torch.isclose(s[0, 0], s[0, 1])  # floored at 1/40
    assert torch.isclose(s[3, 5], s[0, 1] / (3 ** 2 * (40 / 24) ** 2 + 5 ** 2) ** 0.5, rtol=1e-5)  # radial
    with pytest.raises(ValueError, match=r"spectrum must be \(24, 21\) for 24x40 images.*got \(40, 13\)"):
        fv.fourier_scale((24, 40), spectrum=fv.spectrum(torch.rand(2, 3, 40, 24)))


@pytest.mark.parametrize("size", [32, (24, 17), (15, 8)])
def test_fourier_and_pixel_params_start_from_given_images(size):
    images = torch.rand(3, 3, *models.image_shape(size)) * 0.9 + 0.05
    cov = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
    for kind in ("fourier", "pixel"):
        options = dict(color_cov=cov) if kind == "fourier" else {}
        p = fv.parameterization(kind, init=images, **options)(3, 3, size)
        assert torch.allclose(p(), images, atol=1e-4)
    with pytest.raises(ValueError, match=r"init images must be \(3, 3, 32, 33\), .*got \(3, 3, 32, 32\)"):
        fv.parameterization("fourier", init=torch.rand(3, 3, 32, 32))(3, 3, (32, 33))


def test_a_shared_fourier_spectrum_is_one_part_common_to_every_image():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    own, shared = (fv.FourierParam(4, 3, 32, shared=s, generator=gen()) for s in (False, True))
    assert torch.equal(own(), shared()) and own.common is None  # the same draws, the common part at 0
    weights = torch.rand(4, 3, 32, 32)
    (shared() * weights).sum().backward()
    assert shared.common.grad.abs().sum() > 0  # every image's gradient moves the one common part: their sum
    torch.testing.assert_close(shared.common.grad, shared.coeffs.grad.sum(0, keepdim=True))
    with torch.no_grad():
        shared.common.add_(1.0)
    images = torch.rand(4, 3, 32, 32) * 0.9 + 0.05
    shared.set_images(images)  # its own parts hold the images, the common one goes back to 0
    assert torch.allclose(shared(), images, atol=1e-4) and not shared.common.any()
    with pytest.raises(TypeError, match="shared must be True or False, got 1"):
        fv.parameterization("fourier", shared=1)
    with pytest.raises(ValueError, match="pool keeps each image's best draws, and shared=True"):
        fv.parameterization("fourier", shared=True, pool=8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shared'\] for parameterization 'maco'"):
        fv.parameterization("maco", shared=True)
    fourier = fv.techniques(color_cov=torch.eye(3))["fourier"].settings["param"]  # a technique's recipe, shared
    recipe = fourier.with_options(shared=True)
    assert recipe.cls is fv.FourierParam and recipe.options == {**fourier.options, "shared": True} and recipe.pool == 0
    assert recipe(2, 3, 32).common is not None and fourier(2, 3, 32).common is None  # the technique's own unchanged
    with pytest.raises(ValueError, match="pool keeps each image's best draws"):  # checked as parameterization() does
        fv.parameterization("fourier", pool=4).with_options(shared=True)
    with pytest.raises(TypeError, match="with_options takes a recipe of parameterization.*builds Identity"):
        fv.Recipe(torch.nn.Identity, {}).with_options(shared=True)


def _neighbour_correlation(images):
    x = images.flatten(1) - images.flatten(1).mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return (x[:-1] * x[1:]).sum(1)


@pytest.mark.parametrize("layer, a, b", [("block1.act2", 2, 9), ("block2.act2", 3, 20), ("block3.act2", 5, 17)])
def test_an_interpolation_with_a_shared_spectrum_keeps_one_layout_and_still_walks(trained, layer, a, b):
    """Measured at 48 steps: neighbouring frames correlate 0.04-0.46 on their own, 0.75-0.93 sharing, at a higher
    mean activation (3.9 against 2.8 in block1.act2); each end still excites its own channel two or more times as
    much as the other end does."""
    model, ends = trained["model"], [fv.Channel(layer, a), fv.Channel(layer, b)]
    frames = [(1 - t) * ends[0] + t * ends[1] for t in (0, 0.25, 0.5, 0.75, 1)]
    own, shared = (fv.render(model, frames, param=fv.parameterization("fourier", shared=s), steps=48, progress=False)
                   for s in (False, True))
    assert _neighbour_correlation(shared.images).min() > _neighbour_correlation(own.images).max() + 0.3
    assert (shared.history[-1] > shared.history[0]).all() and shared.activation.mean() > 0.9 * own.activation.mean()
    at_the_ends = fv.activations(model, shared.images[[0, -1]], ends)  # still a walk: each end is its channel's
    assert at_the_ends[0, 0] > at_the_ends[1, 0] and at_the_ends[1, 1] > at_the_ends[0, 1]


def test_whitened_latent_maps_zero_to_mean_and_has_the_latent_covariance():
    vae = vae_with_stats()
    p = fv.WhitenedLatentParam(20000, 3, 32, vae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p.u.normal_(generator=torch.Generator().manual_seed(1))
        z = p.latent()
        assert torch.allclose(torch.cov(z.T), vae.latent_cov, atol=0.05)
        assert p.penalty().mean().item() == pytest.approx(1.0, abs=0.01)  # u ~ N(0, I): its mean square
        p.u.zero_()
        assert torch.allclose(p.latent(), vae.latent_mean.expand(20000, -1), atol=1e-6)
        assert torch.equal(p.penalty(), torch.zeros(20000))  # the data's mean latent: no prior cost


def test_latent_param_stays_in_range():
    vae = vae_with_stats()
    p = fv.LatentParam(4, 3, 32, vae, generator=torch.Generator().manual_seed(0))
    assert ((p.z >= vae.latent_lo) & (p.z <= vae.latent_hi)).all()
    with torch.no_grad():
        p.z.add_(100.0)
    p.project()
    assert torch.equal(p.z.detach(), vae.latent_hi.expand(4, -1))
    torch.testing.assert_close(p.penalty(), vae.latent_hi.pow(2).mean().expand(4))  # ||z||^2 / D



def test_the_whitened_latent_decodes_inside_the_range():
    vae = vae_with_stats()
    p = fv.WhitenedLatentParam(2, 3, 32, vae, generator=torch.Generator().manual_seed(0))
    outside = torch.stack([p.hi + 5, p.lo - 5])  # z above the range in every dimension, and below it
    with torch.no_grad():
        p.u.copy_(torch.linalg.solve_triangular(p.chol, (outside - p.mean).T, upper=False).T)
    torch.testing.assert_close(p.latent(), outside)
    decoded = []
    vae.decode = lambda z: decoded.append(z) or torch.zeros(len(z), 3, 32, 32)
    p()
    assert torch.equal(decoded[0], torch.stack([p.hi, p.lo]))  # decoded at the bounds


def test_the_whitened_latent_starts_inside_the_range():
    vae = vae_with_stats()
    with torch.no_grad():  # a tight box: an sd-1 start in u falls outside it in most coordinates
        vae.latent_lo.copy_(vae.latent_mean - 0.1)
        vae.latent_hi.copy_(vae.latent_mean + 0.1)
    tol = 1e-4
    for init in (None, torch.rand(2, 3, 32, 32)):
        p = fv.WhitenedLatentParam(2, 3, 32, vae, generator=torch.Generator().manual_seed(0), init=init)
        z = p.latent().detach()
        assert ((z >= p.lo - tol) & (z <= p.hi + tol)).all()  # the penalty's first z is one decoded
        assert (((z - p.lo).abs() < tol) | ((z - p.hi).abs() < tol)).any()  # it was outside: moved onto a bound


def _decoding(vae):
    """The codes vae decodes from now on, in order (each step's, and the final pass's)."""
    decoded, decode = [], vae.decode
    vae.decode = lambda z: decoded.append(z.detach().clone()) or decode(z)
    return decoded


def test_render_projects_the_latent_back_into_range_after_every_step():
    vae = vae_with_stats()
    p = fv.LatentParam(2, 3, 32, vae, generator=torch.Generator().manual_seed(0))
    decoded = _decoding(vae)
    fv.render(cnn(), [3, 5], param=p, steps=5, lr=5.0, transforms=None, progress=False)  # steps far past the range
    assert len(decoded) >= 5 and all(((z >= p.lo) & (z <= p.hi)).all() for z in decoded)  # each step decodes in range
    z = p.z.detach()
    assert ((z == p.lo) | (z == p.hi)).any()  # pushed out, and back onto a bound


def test_render_projects_the_whitened_latent_back_into_range_after_every_step():
    vae = vae_with_stats()
    p = fv.WhitenedLatentParam(2, 3, 32, vae, generator=torch.Generator().manual_seed(0))
    decoded = _decoding(vae)
    fv.render(cnn(), [3, 5], param=p, steps=5, lr=5.0, transforms=None, progress=False)  # steps far past the range
    z, tol = p.latent().detach(), 1e-4 * (p.hi - p.lo)
    assert ((z >= p.lo - tol) & (z <= p.hi + tol)).all()  # u drifted on past the bounds before
    assert (((z - p.lo).abs() < tol) | ((z - p.hi).abs() < tol)).any()  # pushed out, and back onto a bound
    assert len(decoded) >= 5 and all(((z >= p.lo - tol) & (z <= p.hi + tol)).all() for z in decoded)


def test_the_lr_and_its_schedule_set_each_steps_size():
    model, kw = cnn(), dict(param="pixel", transforms=None, seed=1, progress=False)
    two = fv.render(model, [3], steps=2, lr=0.05, **kw).images
    # the schedule is read at each step's fraction of the run: 0, 0.25 at 0.05; 0.5, 0.75 at 0, which moves nothing
    assert torch.equal(fv.render(model, [3], steps=4, lr=lambda t: 0.05 if t < 0.5 else 0.0, **kw).images, two)
    assert (fv.render(model, [3], steps=2, lr=0.5, **kw).images - two).abs().max() > 1e-3


# ----------------------------------------------------------------------------- transforms

TRANSFORMS = dict(jitter=fv.jitter(2 / 32), scale=fv.scale(0.8, 1.2), rotate=fv.rotate(20),
                  resample=fv.resample(0.1, (0.9, 1.1), 10), shift=fv.Shift(2 / 32), standard=fv.STANDARD,
                  light=fv.LIGHT)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("side", [28, 32, 64])
def test_transforms_keep_size_are_seeded_and_differ_per_image(name, side):
    t = TRANSFORMS[name]
    x = torch.rand(1, 3, side, side).expand(16, -1, -1, -1)  # 16 copies of one image
    a = t(x, torch.Generator().manual_seed(0))
    b = t(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, t(x, torch.Generator().manual_seed(1)))
    distinct = {tuple(img.flatten()[:64].tolist()) for img in a}
    assert len(distinct) > 1


def test_resample_without_amounts_is_the_identity():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(fv.resample()(x, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_resample_grid_is_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for h, w in [(28, 28), (24, 40)]:
        expected = torch.nn.functional.affine_grid(theta, [5, 1, h, w], align_corners=False)
        assert torch.allclose(fv.affine_grid(theta, h, w), expected, atol=1e-5)


@pytest.mark.parametrize("side", [28, 32, 64])
def test_resample_shifts_in_proportion_to_the_side(side):
    x = torch.arange(float(side)).view(1, 1, 1, side).expand(64, 1, side, side)  # value = column
    y = fv.resample(shift=3 / 32)(x, torch.Generator().manual_seed(0))
    d = (y[:, 0, side // 2, side // 2] - side // 2).abs()  # how far the centre pixel moved, in px
    assert d.max() <= 3 / 32 * side + 1e-3
    assert d.max() > 0.8 * 3 / 32 * side  # 64 draws reach most of the range


def test_resample_zoom_is_the_drawn_factor():
    """A fixed zoom of 2 samples the central half of the image: theta = I / 2."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(4, 2, 3) / 2, [4, 3, 32, 32], align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    assert torch.allclose(fv.resample(scale=(2.0, 2.0))(x, torch.Generator().manual_seed(0)), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(24, 40), (40, 24)])
def test_resample_rotates_rigidly_in_pixels_on_an_image_that_is_not_square(size):
    """Each output pixel samples the point its rotation moves it to: as far from the centre as it is, whatever
    the side it lies along (a rotation in the grid's coordinates, which span 2 along either side, would
    stretch one side against the other)."""
    (h, w), gen = size, torch.Generator().manual_seed(0)
    rows = torch.arange(float(h)).view(1, 1, h, 1).expand(64, 1, h, w)
    cols = torch.arange(float(w)).view(1, 1, 1, w).expand(64, 1, h, w)
    y = fv.resample(degrees=40)(torch.cat([rows, cols], 1), gen)  # one draw for both maps of an image
    cy, cx = (h - 1) / 2, (w - 1) / 2
    for py, px in ((h // 2, w // 2 + 5), (h // 2 + 5, w // 2), (h // 2 - 4, w // 2 + 3)):  # within 7 px of the centre
        sampled = torch.stack([y[:, 0, py, px] - cy, y[:, 1, py, px] - cx], 1)  # (64, 2) the point it sampled
        assert torch.allclose(sampled.norm(dim=1), torch.tensor(math.hypot(py - cy, px - cx)).expand(64), atol=1e-3)
    assert (y[:, 0, h // 2, w // 2 + 5] - y[:, 0, h // 2, w // 2]).abs().max() > 2  # it rotated (the test can fail)


def test_resample_rotates_within_the_degrees_both_ways():
    side, r = 64, 10
    x = torch.arange(float(side)).view(1, 1, side, 1).expand(256, 1, side, side)  # value = row
    y = fv.resample(degrees=30)(x, torch.Generator().manual_seed(0))
    c = (side - 1) / 2  # the centre of the image, in pixel coordinates
    # the pixel r px right of the centre samples the point rotated from it: its row moves by r sin(angle)
    row = (y[:, 0, side // 2, side // 2 + r] + y[:, 0, side // 2 - 1, side // 2 + r]) / 2
    angle = torch.rad2deg(torch.asin((row - c) / (r + 0.5)))
    assert angle.abs().max() <= 30.5
    assert angle.max() > 25 and angle.min() < -25  # 256 draws reach both ends of the range


def test_jitter_of_an_image_that_is_not_square_is_in_proportion_to_its_shorter_side():
    x = torch.arange(40.0).view(1, 1, 1, 40).expand(64, 1, 24, 40)
    shift = fv.jitter(4 / 32)(x, torch.Generator().manual_seed(0))[:, 0, 0, 20] - 20
    assert shift.abs().max() == 3  # 4/32 of 24, not of 40 (5)


@pytest.mark.parametrize("side", [32, 64])
def test_jitter_is_an_integer_shift_in_proportion_to_the_side(side):
    x = torch.arange(float(side)).view(1, 1, 1, side).expand(32, 3, side, side)
    y = fv.jitter(2 / 32)(x, torch.Generator().manual_seed(0))
    px = 2 * side // 32
    shift = y[:, 0, 0, side // 2] - side // 2  # interior columns move rigidly
    inner = slice(px + 1, side - px - 1)
    assert torch.equal(y[:, :, :, inner], x[:, :, :, inner] + shift[:, None, None, None])
    assert shift.abs().max() == px


@pytest.mark.parametrize("side", [28, 32, 64])
def test_shift_moves_each_image_by_its_drawn_subpixel_amount(side):
    """The logits of a cosine along the width come back as the same cosine, moved by up to 2/32 of the side."""
    k, px = 2, 2 / 32 * side
    cols = torch.arange(float(side))
    x = torch.sigmoid(torch.cos(2 * math.pi * k * cols / side)).expand(64, 1, side, side)
    y = fv.Shift(2 / 32)(x, torch.Generator().manual_seed(0))
    coeff = torch.fft.rfft(torch.logit(y[:, 0, side // 2]), dim=-1)[:, k]  # (64,) the cosine's coefficient
    moved = -torch.angle(coeff) * side / (2 * math.pi * k)                  # its shift, in px
    assert torch.allclose(coeff.abs(), torch.full((64,), side / 2), rtol=1e-3)  # the same cosine
    assert moved.abs().max() <= px + 1e-3
    assert moved.abs().max() > 0.8 * px and (moved > 0).any() and (moved < 0).any()


@pytest.mark.parametrize("size", [(24, 17), (17, 24)])
def test_shift_moves_an_image_that_is_not_square_by_a_fraction_of_each_side(size):
    """A cosine along the width moves by up to 2/32 of the width; one down the height, of the height."""
    (h, w), k, gen = size, 2, torch.Generator().manual_seed(0)
    for axis, side in ((-1, w), (-2, h)):
        wave = torch.sigmoid(torch.cos(2 * math.pi * k * torch.arange(float(side)) / side))
        x = (wave.view(1, 1, 1, w) if axis == -1 else wave.view(1, 1, h, 1)).expand(64, 1, h, w)
        y = fv.Shift(2 / 32)(x, gen)[:, 0]
        line = y[:, 0, :] if axis == -1 else y[:, :, 0]  # (64, side): along the axis
        coeff = torch.fft.rfft(torch.logit(line), dim=-1)[:, k]
        moved = -torch.angle(coeff) * side / (2 * math.pi * k)  # in px
        assert torch.allclose(coeff.abs(), torch.full((64,), side / 2), rtol=1e-3)
        assert moved.abs().max() <= 2 / 32 * side + 1e-3 and moved.abs().max() > 0.8 * 2 / 32 * side


@pytest.mark.parametrize("size", [(9, 8), (8, 9)])
def test_a_shift_keeps_the_nyquist_stripes_of_an_even_side_beside_an_odd_one(size):
    """Stripes at the width's Nyquist frequency stay put when the width is even, whatever the height."""
    (h, w), gen = size, torch.Generator().manual_seed(0)
    x = torch.sigmoid(torch.tensor([1.0, -1.0]).repeat((w + 1) // 2)[:w]).expand(8, 1, h, w)  # along the width
    y = fv.Shift(2 / 32)(x, gen)
    assert torch.allclose(y, x, atol=1e-5) if w % 2 == 0 else not torch.allclose(y, x, atol=1e-2)


@pytest.mark.parametrize("side", [32, 82, 33])
def test_a_shift_keeps_the_nyquist_stripes_where_a_side_has_them(side):
    """A pattern at the Nyquist frequency cannot move by a fraction of a pixel: it comes back as it was, at any
    even side (at 82 px fftfreq's -0.5 is off by 2**-25, which an equality test missed); an odd side has none."""
    stripes = torch.sigmoid(torch.tensor([1.0, -1.0]).repeat((side + 1) // 2)[:side])  # along the height
    x = stripes[:, None].expand(8, 1, side, side)
    y = fv.Shift(2 / 32)(x, torch.Generator().manual_seed(0))
    if side % 2 == 0:
        assert torch.allclose(y, x, atol=1e-5)
    else:
        assert not torch.allclose(y, x, atol=1e-2)  # the nearest frequencies move (the test can fail)


@pytest.mark.parametrize("size", [(32, 32), (24, 17)])
@pytest.mark.parametrize("cls", [fv.FourierParam, fv.MaCoParam])
def test_shift_inside_a_fourier_parameterization_is_the_shift_of_its_images(cls, size):
    (h, w), gen = size, torch.Generator().manual_seed(0)
    extra = dict(magnitude=torch.rand(3, h, w // 2 + 1, generator=gen)) if cls is fv.MaCoParam else dict(sd=0.3)
    p, t = cls(6, 3, size, generator=gen, **extra), fv.Shift(1.5 / 32)
    with torch.no_grad():
        outside = t(p(), torch.Generator().manual_seed(1))
        inside = p(t.phase(6, h, w, torch.Generator().manual_seed(1), torch.device("cpu")))
        assert not torch.allclose(outside, p(), atol=1e-2)
    assert torch.allclose(inside, outside, atol=1e-5)


def test_render_shifts_a_fourier_spectrum_as_it_would_shift_the_images(monkeypatch):
    """render() applies a Shift inside the Fourier spectrum (never shifting the images themselves); composed,
    the same shift runs on the images, with the same result."""
    model = cnn()
    outside = fv.render(model, [0, 1], steps=4, transforms=fv.compose(fv.Shift(2 / 32)), progress=False)
    with monkeypatch.context() as m:
        m.setattr(fv.Shift, "__call__", lambda self, x, gen: pytest.fail("the images were shifted, not the spectrum"))
        inside = fv.render(model, [0, 1], steps=4, transforms=fv.Shift(2 / 32), progress=False)
    still = fv.render(model, [0, 1], steps=4, transforms=None, progress=False)
    assert torch.allclose(inside.images, outside.images, atol=1e-4)
    assert not torch.allclose(inside.images, still.images, atol=1e-3)


# ----------------------------------------------------------------------------- targets

def test_activations_match_a_direct_forward():
    model = cnn()
    before = snapshot(model)
    x = torch.rand(7, 3, 32, 32)
    v, w = torch.randn(32), torch.tensor([0, 0, 0, 1.0, 0, -1.0, 0, 0, 0, 0])  # w: class 3 against class 5
    targets = [fv.Class(3), fv.Channel("block1.act2", 5), fv.Class(7), fv.Neuron("block1.act2", 2, 4, 9),
               fv.Class(3, log_prob=True), fv.Neuron("block2.act2", 1), fv.Direction("block3.act2", v),
               fv.Channel("block1.act2", 0), fv.Direction(None, w),  # interleaved kinds and layers; the logits
               fv.Channel("block1.act2", 5) + 0.5 * fv.Neuron("block2.act2", 1) - fv.Class(3, log_prob=True),  # Sums
               fv.Direction("block3.act2", v) / 2 - fv.Class(7)]
    got = fv.activations(model, x, targets, batch_size=3)
    with torch.no_grad():
        h = model.whiten_act(model.whiten(model.normalize(x)))
        b1 = model.block1(h)
        b2 = model.block2(b1)
        b3 = model.block3(b2)
        out = model(x)
    ref = torch.stack([out[:, 3], b1[:, 5].mean((1, 2)), out[:, 7], b1[:, 2, 4, 9], out.log_softmax(1)[:, 3],
                       b2[:, 1, 3, 3], b3.mean((2, 3)) @ v, b1[:, 0].mean((1, 2)), out[:, 3] - out[:, 5],
                       b1[:, 5].mean((1, 2)) + 0.5 * b2[:, 1, 3, 3] - out.log_softmax(1)[:, 3],
                       b3.mean((2, 3)) @ v / 2 - out[:, 7]], 1)
    assert got.shape == (7, 11)
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.allclose(fv.activations(model, (x * 255).round().to(torch.uint8), targets),
                          fv.activations(model, (x * 255).round() / 255, targets), atol=1e-5)
    assert_untouched(model, before)


def test_targets_add_subtract_and_scale_into_a_sum_of_any_layers():
    a, b, c = fv.Channel("block2.act2", 3), fv.Neuron("block3.act2", 1, 0, 2), fv.Class(5)
    s = a + 0.5 * b - c
    assert s.terms == ((1.0, a), (0.5, b), (-1.0, c)) and s == fv.Sum(((1, a), (0.5, b), (-1, c)))
    assert str(s) == "block2.act2 channel 3 + 0.5 x block3.act2 channel 1 at y=0, x=2 - class 5"
    assert (2 * (a - b)).terms == ((2.0, a), (-2.0, b)) and (-s).terms == ((-1.0, a), (-0.5, b), (1.0, c))
    assert sum([a, b]) == a + b and hash(s) == hash(a + 0.5 * b - c) and fv.Sum([(1, a)]) == 1 * a
    for half in (a * np.float32(0.5), np.float32(0.5) * a, torch.tensor(0.5) * a, a / 2, a / np.int64(2)):
        assert half.terms == ((0.5, a),)
    for bad, error, match in ((lambda: a + 5, TypeError, r"only targets add up: .* got 5 \(a class index: write Class"),
                              (lambda: 5 - a, TypeError, r"only targets add up: .* got 5 \(a class index"),
                              (lambda: a / 0, ZeroDivisionError, r"block2.act2 channel 3 divided by 0"),
                              (lambda: fv.Sum((1.0, a) for _ in range(2)), TypeError, "non-empty tuple"),
                              (lambda: a * a, TypeError, r"weight in a Sum must be a finite number, got Channel"),
                              (lambda: a * float("nan"), TypeError, "weight in a Sum must be a finite number, got nan"),
                              (lambda: a * True, TypeError, "finite number, got True"),
                              (lambda: fv.Sum(()), TypeError, "non-empty tuple of \\(weight, target\\) pairs"),
                              (lambda: fv.Sum((a,)), TypeError, "terms are \\(weight, target\\) pairs")):
        with pytest.raises(error, match=match):
            bad()
    model = cnn()
    with pytest.raises(ValueError, match="channel 40 out of range: layer 'block2.act2' has 32 channels"):
        fv.render(model, [a + fv.Channel("block2.act2", 40)], steps=1, progress=False)
    # a Sum of one term of weight 1 renders as its target; a Sum's activation climbs as its own
    one, alone = (fv.render(model, [t, c], steps=6, progress=False) for t in (1 * a, a))
    assert torch.equal(one.images, alone.images) and torch.equal(one.history, alone.history)
    ends = fv.render(model, [(1 - t) * a + t * c for t in (0, 1)], steps=6, progress=False)  # an interpolation's ends
    assert torch.equal(ends.images, alone.images)
    r = fv.render(model, [s, a], steps=24, progress=False)
    assert (r.history[-4:].mean(0) > r.history[:4].mean(0)).all(), r.history
    assert torch.allclose(r.activation, fv.activations(model, r.images, [s, a]).diagonal(), atol=1e-4)
    images = torch.rand(2, 3, 32, 32)
    assert fv.looks_at(model, s, images) is None  # a Sum reads its terms' places
    place = fv.looks_at(model, b, images)  # ... unless they are one: neurons of one place
    assert place is not None and fv.looks_at(model, b - 2 * fv.Neuron(b.layer, 7, b.y, b.x), images) == place
    centre = fv.looks_at(model, fv.Neuron(b.layer, 2), images)  # (1, 1) of its 3x3 map, given or by default
    assert fv.looks_at(model, fv.Neuron(b.layer, 2) + fv.Neuron(b.layer, 5, 1, 1), images) == centre != place
    assert fv.looks_at(model, fv.Neuron(b.layer, 2) + fv.Neuron("block2.act2", 2), images) is None  # two layers


def test_a_term_that_is_not_finite_stays_in_its_own_sum():
    """A float16 model's logit that overflows makes its Sum inf, and only its Sum: a weight of 0 for the other
    targets' columns (a matrix product) would have made every target NaN."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[4].bias[0] = float("inf")
    got = fv.activations(model, torch.rand(5, 3, 8, 8), [fv.Class(1), fv.Class(0) - fv.Class(2), fv.Class(2)])
    assert got[:, [0, 2]].isfinite().all() and (got[:, 1] == float("inf")).all()


def test_a_direction_with_a_graph_is_a_constant_that_render_leaves_alone():
    model = cnn()
    probe = torch.nn.Linear(32, 2)
    direction = fv.Direction("block3.act2", torch.nn.functional.normalize(probe.weight[1], dim=0))  # it has a graph
    r = fv.render(model, direction, param="pixel", transforms=None, steps=3, progress=False)
    assert r.images.shape == (1, 3, 32, 32) and probe.weight.grad is None  # no gradient reached the probe


@pytest.mark.parametrize("mixed", [True, False, "sums", "directions"])
def test_each_images_own_target_is_its_column_of_all_the_targets(mixed):
    """Objective.own, render()'s step objective, picks what the full (B, T) columns give each image, for
    every kind, interleaved kinds and layers (a map's and the (B, C) head's), Sums of them among them, and several
    images per target (value and gradient)."""
    model = cnn()
    targets = [fv.Class(3), fv.Channel("block1.act2", 5), fv.Neuron("block1.act2", 2, 4, 9),
               fv.Class(3, log_prob=True), fv.Neuron("block2.act2", 1), fv.Direction("block3.act2", torch.randn(32)),
               fv.Channel("block1.act2", 0), fv.Class(7), fv.Neuron("head", 4)] if mixed else [
               fv.Class(c) for c in (4, 1, 8)]
    if mixed == "sums":  # terms that share a kind and layer with each other and with plain targets; one of one term
        targets += [fv.Channel("block1.act2", 5) - 2 * fv.Channel("block1.act2", 1) + fv.Class(7), -fv.Class(4),
                    0.5 * fv.Neuron("block2.act2", 1) + fv.Direction("block3.act2", torch.randn(32))]
    if mixed == "directions":  # of a vector and of a whole map, with and without their cosine, in one layer
        targets = [fv.Direction("block2.act2", torch.randn(32)), fv.Direction("block2.act2", torch.randn(32, 7, 7), 2),
                   fv.Class(1), fv.Direction("block2.act2", torch.randn(32, 7, 7)),
                   fv.Direction("block2.act2", torch.randn(32), 1.5)]
    groups = torch.arange(len(targets)).repeat_interleave(2).flip(0)  # two images each, not in target order
    objective = fv.Objective(model, targets)
    x = torch.rand(len(groups), 3, 32, 32, requires_grad=True)
    with objective.hooked() as run:
        got = objective.own(groups)(run(x))
        (grad,) = torch.autograd.grad(got.sum(), x)
        ref = objective(run(x))[torch.arange(len(groups)), groups]
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert got.shape == (len(groups),)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_a_direction_of_a_whole_map_weighs_each_position_and_its_cosine_weighs_the_pattern():
    model = cnn()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b2 = models.capture(model, x, "block2.act2")["block2.act2"]  # (6, 32, 7, 7)
    v, m = torch.randn(32), b2[0] - b2.mean(0)  # m: image 0's map against the batch's, a cosine above 0.1 for it only
    dots = (b2 * m).sum((1, 2, 3)) / 49
    cos = torch.nn.functional.cosine_similarity(b2.flatten(1), m.flatten()[None], dim=1)
    cos_v = torch.nn.functional.cosine_similarity(b2.mean((2, 3)), v[None], dim=1)
    everywhere = v[:, None, None].expand(32, 7, 7)
    got = fv.activations(model, x, [fv.Direction("block2.act2", v), fv.Direction("block2.act2", everywhere),
                                    fv.Direction("block2.act2", m), fv.Direction("block2.act2", m, 2),
                                    fv.Direction("block2.act2", v, 1)])
    assert torch.allclose(got[:, 0], b2.mean((2, 3)) @ v, atol=1e-5)
    assert torch.allclose(got[:, 1], got[:, 0], atol=1e-5)  # the same vector at every position: the mean's
    assert torch.allclose(got[:, 2], dots, atol=1e-5)
    assert cos.min() < 0.1 < cos.max()  # some floored
    assert torch.allclose(got[:, 3], dots * cos.clamp_min(0.1) ** 2, atol=1e-5)
    assert torch.allclose(got[:, 4], got[:, 0] * cos_v.clamp_min(0.1), atol=1e-5)
    # a Sum of whole maps and cosines reads each term as it is alone
    total = fv.activations(model, x, fv.Direction("block2.act2", m, 2) - 0.5 * fv.Direction("block2.act2", v, 1))
    assert torch.allclose(total[:, 0], got[:, 3] - 0.5 * got[:, 4], atol=1e-5)
    # a map or an image of 0 (a dead layer): a product of 0, whose gradient is 0, not NaN
    dot, norms = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    value = fv._cossim_weighted(dot, norms, torch.full((3,), 2.0))
    value.sum().backward()
    assert (value == 0).all() and dot.grad.isfinite().all() and norms.grad.isfinite().all()
    # the cosine weighs the pattern, not the size: a map twice as strong gains twice the product, not more
    two = fv.activations(model, x, [fv.Direction("block2.act2", b2[0]), fv.Direction("block2.act2", b2[0], 1)])
    assert torch.allclose(two[0, 1], two[0, 0], rtol=1e-4)  # its own map: cosine 1
    assert (two[1:, 1] < two[1:, 0]).all()  # another image's: a cosine below 1


def _smooth_images(n, seed):
    """n images of low-frequency colour noise (32x32): what a small random conv layer keeps most of."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=32, mode="bicubic",
                                           align_corners=False).clamp(0, 1)


def test_a_directions_cossim_pow_is_a_number_at_least_0_and_its_name_says_what_it_is():
    assert fv.Direction("b", torch.ones(3), np.float32(2)).cossim_pow == 2.0
    assert fv.Direction("b", torch.ones(3), torch.tensor(0.5)).cossim_pow == 0.5
    for bad in (-1, math.inf, math.nan, "1", True, torch.ones(2)):
        with pytest.raises(ValueError, match="Direction cossim_pow must be a finite number >= 0, got"):
            fv.Direction("b", torch.ones(3), bad)
    with pytest.raises(ValueError, match="cossim_pow must be a finite number >= 0, got -1"):  # before the model runs
        fv.inversion_targets(None, torch.rand(2, 3, 32, 32), "block1.act2", -1)
    assert str(fv.Direction("b", torch.ones(3))) == "a direction in b"
    assert str(fv.Direction(None, torch.ones(3), 2)) == "a direction in the logits, cosine^2"
    assert str(fv.Direction("b", torch.ones(3, 2, 2), 1.5)) == "a map in b, cosine^1.5"


def test_rendering_an_images_map_inverts_it_its_cosine_more_faithfully_and_its_mean_alone_does_not():
    """inversion_targets: the render of each image's map at a shallow layer looks like that image, and like no
    other of the batch, the more so the more its cosine with the map weighs; the map's mean over positions (a
    Direction of its channels) keeps no layout to find."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU()).eval()
    images = _smooth_images(4, 1)
    like = {}
    for cossim_pow in (0.0, 4.0):
        targets = fv.inversion_targets(model, images, "1", cossim_pow)
        assert [t.vector.shape for t in targets] == [(24, 32, 32)] * 4 and targets[0].cossim_pow == cossim_pow
        r = fv.render(model, targets, param="pixel", transforms=None, steps=150, size=32, progress=False)
        like[cossim_pow] = corr = metrics.template_recovery(r.images, images)
        assert metrics.recovered(corr, torch.arange(4)) == 1.0 and corr.diagonal().min() > 0.2, corr
        means = [fv.Direction("1", t.vector.mean((1, 2)), cossim_pow) for t in targets]
        r = fv.render(model, means, param="pixel", transforms=None, steps=150, size=32, progress=False)
        assert metrics.template_recovery(r.images, images).diagonal().abs().max() < 0.25  # (0.08 at most)
    assert like[4.0].diagonal().min() > 0.55 and like[0.0].diagonal().max() < 0.45  # (0.74 at least, 0.34 at most)
    assert like[4.0].diagonal().mean() > like[0.0].diagonal().mean() + 0.2


def test_exemplars_are_the_true_top_and_bottom_k():
    model = cnn()
    x = torch.rand(50, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = fv.Channel("block2.act2", 4)
    a = fv.activations(model, x, [target])[:, 0]
    order = a.argsort(descending=True)
    ex = fv.exemplars(model, x, target, k=5, batch_size=16)
    assert torch.equal(ex.top, order[:5])
    assert torch.equal(ex.bottom, order.flip(0)[:5])
    assert torch.allclose(ex.top_values, a[order[:5]])
    targets = [target, fv.Class(3), fv.Neuron("block1.act2", 2, 4, 5)]
    many = fv.exemplars(model, x, targets, k=4, batch_size=16)  # one pass for several targets
    assert many.top.shape == (4, 3) and torch.equal(many.top[:, 0], order[:4])
    for j, t in enumerate(targets):
        assert torch.equal(many.bottom[:, j], fv.exemplars(model, x, t, k=4).bottom)


def test_exemplars_of_equal_activations_come_in_the_images_order(monkeypatch):
    a = torch.tensor([[0.0], [2.0], [0.0], [2.0], [0.0], [1.0]])  # a ReLU's ties: topk's order is undefined
    monkeypatch.setattr(fv, "activations", lambda *args: a)
    ex = fv.exemplars(cnn(), torch.zeros(6, 3, 32, 32), fv.Class(0), k=3)
    assert ex.top.tolist() == [1, 3, 5] and ex.bottom.tolist() == [0, 2, 4]
    assert ex.top_values.tolist() == [2.0, 2.0, 1.0] and ex.bottom_values.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("target, match", [
    (fv.Channel("block9.act2", 0), "unknown layer 'block9.act2'; valid layers: whiten, "),
    (fv.Channel("block1.act2", 16), "layer 'block1.act2' has 16 channels"),
    (fv.Neuron("block2.act2", 0, 7, 0), "is 7x7"),
    (fv.Neuron("block2.act2", 40), "has 32 channels"),
    (fv.Class(10), "has 10 classes"),
    (fv.Direction("block1.act2", torch.ones(5)), "has 16 channels"),
    (fv.Direction(None, torch.ones(16)), r"direction has shape \(16,\); the model's output has 10 classes: give one "
                                         r"weight per class, \(10,\)$"),
    (fv.Direction("block1.act2", torch.ones(16, 3, 3)), r"give one weight per channel, \(16,\) or its whole shape "
                                                       r"\(16, 15, 15\)"),
    (fv.Direction("block1.act2", torch.zeros(16, 15, 15)), "direction vector is 0 everywhere"),
])
def test_render_rejects_bad_targets_clearly_and_leaves_no_hooks(target, match):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fv.render(model, [fv.Class(0), target], steps=2, progress=False)
    assert_untouched(model, before)


def test_latent_render_without_vae_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a VAE"):
        fv.render(cnn(), [0], param="whitened", steps=2, progress=False)
    with pytest.raises(ValueError, match="draws through a VAE"):
        fv.visualize_unit(cnn(), "head", 0, technique="hybrid", steps=2)


# ----------------------------------------------------------------------------- render

def test_render_is_deterministic_for_a_seed():
    model = cnn()
    kw = dict(steps=12, progress=False, images_per_target=2, regularizers=[fv.Diversity(0.5), fv.TV(0.1)])
    a = fv.render(model, [0, 1], seed=3, **kw)
    b = fv.render(model, [0, 1], seed=3, **kw)
    c = fv.render(model, [0, 1], seed=4, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.history, b.history)
    assert not torch.equal(a.images, c.images)


def test_diversity_weight_means_the_same_on_any_activation_scale():
    """Diversity is in units of each image's activation: for activations 100x larger (a logit against a
    channel mean) the term is 100x larger too, so one weight keeps the same balance against them."""
    term = fv.Diversity(3.0, layer="block3.act2")
    acts = {"block3.act2": torch.rand(4, 8, 5, 5, generator=torch.Generator().manual_seed(0))}
    groups, values = torch.tensor([0, 0, 1, 1]), torch.tensor([0.5, -2.0, 1.0, 3.0])
    small, large = term(None, acts, None, groups, values), term(None, acts, None, groups, 100 * values)
    assert torch.allclose(large, 100 * small) and (small > 0).all()
    assert torch.allclose(small, 3.0 * values.abs() * fv.diversity_penalty(acts["block3.act2"], groups))
    model, kw = cnn(), dict(param="pixel", steps=8, progress=False, images_per_target=3)
    with_term = fv.render(model, [0, 1], regularizers=[fv.Diversity(3.0)], **kw)
    without = fv.render(model, [0, 1], regularizers=[fv.Diversity(0.0)], **kw)
    assert (with_term.images - without.images).abs().max() > 1e-3  # the term acts inside render


def test_render_leaves_the_model_as_found():
    model = cnn()
    model.train()
    model.block2.eval()  # a mixed state must come back exactly
    model.head.weight.requires_grad_(False)
    before = snapshot(model)
    assert before["flags"].count(False) >= 3  # BN weights and the whitening conv are frozen on purpose
    r = fv.render(model, [fv.Class(1), fv.Channel("block1.act2", 0)], steps=3, progress=False)
    assert_untouched(model, before)
    model.eval()  # the activations it reports are the eval-mode model's, not the train-mode one it was given
    torch.testing.assert_close(r.activation, fv.activations(model, r.images, r.targets).diagonal())


def _stop_at_the_second_step():
    """A transform that stops its render (Ctrl-C) at the second step: its third call, the first checking it."""
    calls = []

    def transform(x, gen):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return x
    return transform


def test_render_cleans_up_when_interrupted_mid_run():
    model = cnn()
    model.train()
    model.block2.eval()  # a mixed state must come back exactly, after a stop too
    before, flag = snapshot(model), torch.backends.cudnn.deterministic
    with pytest.raises(KeyboardInterrupt) as stopped:
        fv.render(model, [fv.Class(0), fv.Channel("block1.act2", 0)], transforms=_stop_at_the_second_step(),
                  steps=10, progress=False)
    assert_untouched(model, before)
    assert torch.backends.cudnn.deterministic == flag  # set for the render, restored on the stop
    # the images so far go with the stop: one step taken, the rest NaN in the history
    r = stopped.value.render
    assert "the images so far are in this exception's .render" in stopped.value.__notes__[0]
    assert r.images.shape == (2, 3, 32, 32) and r.history.shape == (10, 2)
    assert r.history[:1].isfinite().all() and r.history[1:].isnan().all()
    model.eval()  # its activations are the eval-mode model's, as a finished render's
    torch.testing.assert_close(r.activation, fv.activations(model, r.images, r.targets).diagonal())


def test_a_stopped_two_stage_render_carries_both_stages_history():
    """Stopped in its second stage: the first stage's 3 steps, the second's 1, then NaN (its history was the
    stage's own alone)."""
    with pytest.raises(KeyboardInterrupt) as stopped:
        fv.render_in_stages(cnn(), [0, 1], dict(param="pixel"), dict(param="fourier",
                            transforms=_stop_at_the_second_step()), steps=6, progress=False)
    history = stopped.value.render.history
    assert history.shape == (6, 2) and history[:4].isfinite().all() and history[4:].isnan().all()
    with pytest.raises(KeyboardInterrupt) as stopped:  # in its first: NaN for the whole second stage too
        fv.render_in_stages(cnn(), [0, 1], dict(param="pixel", transforms=_stop_at_the_second_step()),
                            dict(param="fourier"), steps=6, progress=False)
    history = stopped.value.render.history
    assert history.shape == (6, 2) and history[:1].isfinite().all() and history[1:].isnan().all()


def test_a_stop_whose_images_cannot_be_read_goes_up_as_a_stop(monkeypatch):
    """(As one mid-capture on a GPU would): not as the error of reading them, chained onto it."""
    def unreadable(*args):
        raise RuntimeError("the images cannot be read")
    monkeypatch.setattr(fv, "_result", unreadable)
    with pytest.raises(KeyboardInterrupt) as stopped:
        fv.render(cnn(), [0], transforms=_stop_at_the_second_step(), steps=5, progress=False)
    assert stopped.value.render is None and not getattr(stopped.value, "__notes__", [])


def test_render_output_shapes_and_ranges():
    model = cnn()
    r = fv.render(model, [fv.Class(2), fv.Channel("block2.act2", 1), fv.Neuron("block1.conv1", 0)],
                  steps=5, images_per_target=2, restarts=2, progress=False)
    assert r.images.shape == (6, 3, 32, 32) and r.images.min() >= 0 and r.images.max() <= 1
    assert r.images.is_contiguous()  # a Fourier parameterization makes them channels_last; users view them flat
    assert r.activation.shape == (6,) and r.history.shape == (5, 6)
    assert r.target_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(r.activation, fv.activations(model, r.images, r.targets)[torch.arange(6), r.target_index],
                          atol=1e-4)


def test_restarts_keep_the_best_candidate():
    model = cnn()
    targets = [fv.Class(0), fv.Channel("block2.act2", 3)]
    every = fv.render(model, targets, steps=6, images_per_target=3, progress=False)  # same candidates
    best = fv.render(model, targets, steps=6, restarts=3, progress=False)
    idx = every.activation.view(2, 3).argmax(1) + torch.tensor([0, 3])
    assert torch.equal(best.images, every.images[idx])
    assert torch.equal(best.activation, every.activation[idx])


def test_one_channel_model_renders():
    model, target = cnn(channels=1), fv.Channel("block1.act2", 0)
    r = fv.render(model, [target], steps=20, progress=False)
    assert r.images.shape == (1, 1, 32, 32)
    grey = fv.activations(model, torch.full((1, 1, 32, 32), 0.5), [target])[0, 0]  # 0 (a ReLU's)
    assert r.history[-1, 0] > r.history[0, 0] + 0.25 and r.activation[0] > grey + 0.25  # 0.57, 0.001 unoptimized


@pytest.mark.parametrize("target", [fv.Class(4), fv.Channel("block2.act2", 3)])
def test_activation_rises_over_steps(trained, target):
    r = fv.render(trained["model"], [target], steps=64, progress=False)
    assert r.history[-1] > r.history[0] + 0.25
    assert r.activation > fv.activations(trained["model"], torch.full((1, 3, 32, 32), 0.5), [target])


def test_batched_targets_render_like_each_alone():
    model = cnn()
    targets = [fv.Channel("block2.act2", c) for c in (0, 5, 9)]
    gen = torch.Generator().manual_seed(0)
    batched = fv.FourierParam(3, 3, 32, generator=gen)
    alone = []
    for i, t in enumerate(targets):
        p = fv.FourierParam(1, 3, 32)
        with torch.no_grad():
            p.coeffs.copy_(batched.coeffs[i:i + 1])
        alone.append(fv.render(model, [t], param=p, steps=30, transforms=None, progress=False))
    r = fv.render(model, targets, param=batched, steps=30, transforms=None, progress=False)
    for i, a in enumerate(alone):
        assert torch.allclose(r.images[i], a.images[0], atol=2e-3)
        assert torch.allclose(r.activation[i], a.activation[0], rtol=1e-2)
    acts = fv.activations(model, r.images, targets)  # (image, target)
    assert (acts.argmax(0) == torch.arange(3)).all()  # each image excites its own target most


def test_early_stop_skips_the_rest_of_the_network():
    model = cnn()
    calls = []
    h = model.block3.register_forward_pre_hook(lambda m, i: calls.append(len(i[0])))
    try:
        fv.render(model, [fv.Channel("block1.act2", 0)], steps=4, progress=False)
        # only in the dry runs of a probe image: one follows the layouts, one learns how the model runs
        assert calls == [1, 1]
        calls.clear()
        fv.render(model, [fv.Class(0)], steps=4, progress=False)
        assert len(calls) >= 4
    finally:
        h.remove()


def test_two_stage_render_and_init_pool():
    model, vae = cnn(), vae_with_stats()
    before = snapshot(vae)
    first = dict(param=fv.parameterization("whitened", vae=vae, pool=16), restarts=2)
    r = fv.render_in_stages(model, [0, 1], first, dict(param=fv.parameterization("fourier"), lr=0.01), steps=6,
                            progress=False)
    assert r.images.shape == (2, 3, 32, 32) and r.history.shape == (6, 2)
    assert_untouched(vae, before)
    # the same two stages by hand: whitened latent (with restarts and the init pool), then Fourier from its images
    a = fv.render(model, [0, 1], steps=3, progress=False, **first)
    p = fv.parameterization("fourier", init=a.images)(2, 3, 32, torch.Generator().manual_seed(0))
    b = fv.render(model, [0, 1], param=p, steps=3, lr=0.01, progress=False)
    assert torch.allclose(r.images, b.images) and torch.equal(r.history, torch.cat([a.history, b.history]))
    assert not torch.allclose(r.images, a.images, atol=1e-3)  # the refinement changed the images


def test_a_built_parameterization_goes_on_from_its_images_call_after_call():
    """Images along the way, as Lucent's thresholds save them: a built parameterization rendered a few steps at
    a time holds the images each call returned, and the next call climbs on from them."""
    model = cnn()
    p = fv.FourierParam(2, 3, 32, generator=torch.Generator().manual_seed(0))
    first = fv.render(model, [0, 1], param=p, steps=8, progress=False)
    with torch.no_grad():
        assert torch.allclose(p(), first.images)
    second = fv.render(model, [0, 1], param=p, steps=8, progress=False)
    assert (second.activation > first.activation).all() and (second.history[0] > first.history[0]).all()


def test_init_pool_starts_each_target_from_its_best_draw():
    model, vae = cnn(), vae_with_stats()
    targets = [fv.Class(0), fv.Class(1), fv.Channel("block1.act2", 2)]
    r = fv.render(model, targets, param=fv.parameterization("latent", vae=vae, pool=32), steps=0, seed=5,
                  progress=False)
    pool = fv.LatentParam(32, 3, 32, vae, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        best = fv.activations(model, pool(), targets).max(0).values
    assert torch.allclose(r.activation, best, atol=1e-5)


def test_a_pool_gives_each_target_its_own_best_draws_when_it_keeps_several():
    model, vae = cnn(), vae_with_stats()
    targets = [fv.Class(0), fv.Class(1), fv.Channel("block1.act2", 2)]
    r = fv.render(model, targets, param=fv.parameterization("latent", vae=vae, pool=32), images_per_target=2,
                  steps=0, seed=5, progress=False)
    pool = fv.LatentParam(32, 3, 32, vae, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        best = fv.activations(model, pool(), targets).topk(2, 0).values.T  # (targets, 2): each its own two
    assert torch.allclose(r.activation.view(3, 2), best, atol=1e-5)


def test_diversity_and_the_prior_pull_the_way_they_are_named():
    """Both are added to the loss, apart from the objective: a flipped sign would pull a target's images
    together, or z away from the prior, and still change the images."""
    model, vae = cnn(), vae_with_stats()
    spread = []
    for weight in (0.0, 3.0):
        r = fv.render(model, [0, 1], param="pixel", images_per_target=3, regularizers=[fv.Diversity(weight)],
                      steps=8, progress=False)
        act = models.capture(model, r.images, ["block3.act2"])["block3.act2"]
        spread.append(fv.diversity_penalty(act, torch.arange(2).repeat_interleave(3)).mean())
    assert spread[1] < spread[0]  # the images of a class less alike with the term
    penalty = []
    for weight in (0.0, 5.0):
        p = fv.LatentParam(2, 3, 32, vae, generator=torch.Generator().manual_seed(0))
        fv.render(model, [0, 1], param=p, regularizers=[fv.Prior(weight)], steps=8, progress=False)
        penalty.append(p.penalty().detach())
    assert (penalty[1] < penalty[0]).all()  # z nearer the prior's mode with it


def test_render_accepts_a_built_parameterization_and_checks_its_size():
    model = cnn()
    r = fv.render(model, [0, 1], param=fv.PixelParam(2, 3, 32), steps=2, progress=False)
    assert r.images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"parameterization makes images \(3, 3, 32, 32\); need \(2, 3, 32, 32\), 2 "
                                         r"being every target's images \(targets x images_per_target x restarts\)"):
        fv.render(model, [0, 1], param=fv.PixelParam(3, 3, 32), steps=2, progress=False)


def test_targets_take_numpy_and_tensor_indices_as_ints():
    """Channel(layer, acts.argmax()) as Channel(layer, 3): equal, hashable, and rendered alike."""
    a = torch.zeros(8)
    a[3] = 1
    assert fv.Channel("block2.act2", a.argmax()) == fv.Channel("block2.act2", 3)
    assert {fv.Class(np.int64(2)), fv.Class(torch.tensor(2))} == {fv.Class(2)}
    assert fv.Neuron("block1.act2", torch.tensor(1), np.int32(2), torch.tensor(0)) == fv.Neuron("block1.act2", 1, 2, 0)
    assert type(fv.Neuron("block1.act2", torch.tensor(1)).channel) is int
    with pytest.raises(TypeError, match="Channel channel must be an int, got tensor"):  # a float tensor stays refused
        fv.render(cnn(), fv.Channel("block2.act2", torch.tensor(1.0)), steps=1, progress=False)
    with pytest.raises(ValueError, match="no targets given: give a class index, a Class/Channel/Neuron/Direction"):
        fv.render(cnn(), [], steps=1, progress=False)


def test_regularizers_by_hand():
    x = torch.zeros(2, 1, 4, 4)
    x[1, 0, :, 2:] = 1.0  # a vertical edge
    assert torch.allclose(fv.l2_penalty(x), torch.tensor([0.25, 0.25]))
    assert torch.allclose(fv.tv_penalty(x), torch.tensor([0.0, 4 / 12]))  # 4 jumps among 12 pairs
    assert fv.blur_penalty(x)[0] == 0 and fv.blur_penalty(x)[1] > 0
    act = torch.rand(4, 3, 5, 5)
    act[1] = act[0] * 2  # same Gram matrix up to scale
    groups = torch.tensor([0, 0, 1, 2])
    d = fv.diversity_penalty(act, groups)
    assert torch.allclose(d[:2], torch.ones(2)) and torch.equal(d[2:], torch.zeros(2))


def test_diversity_penalty_moves_each_image_by_its_own_term_only():
    """The penalty of image 0 moves image 0 only: its siblings get no gradient from it."""
    act = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    fv.diversity_penalty(act, torch.tensor([0, 0, 0]))[0].backward()
    assert act.grad[0].abs().sum() > 0
    assert torch.equal(act.grad[1:], torch.zeros_like(act.grad[1:]))


@pytest.mark.parametrize("term", [fv.L2(1.5), fv.TV(2.0), fv.Blur(4.0)], ids=["L2", "TV", "Blur"])
def test_image_terms_closed_form_gradient_equals_autograd(term):
    x = torch.rand(3, 2, 7, 9, requires_grad=True)  # not square: the axes cannot be swapped unnoticed
    term(x, None, None, None, None).sum().backward()
    assert torch.allclose(term.gradient(x.detach()), x.grad, atol=1e-7)
    assert x.grad.abs().sum() > 0


def test_render_with_image_terms_follows_their_penalties():
    """render() adds the closed-form gradients; differentiating the same penalties gives the same images."""
    class Autograd(fv.Term):  # TV(2) + Blur(4) + L2(1), differentiated by autograd
        def __call__(self, images, acts, param, groups, values):
            return 2 * fv.tv_penalty(images) + 4 * fv.blur_penalty(images) + fv.l2_penalty(images)
    model, kw = cnn(), dict(param="pixel", steps=6, progress=False)
    a = fv.render(model, [0, 1], regularizers=[fv.TV(2.0), fv.Blur(4.0), fv.L2(1.0)], **kw)
    b = fv.render(model, [0, 1], regularizers=[Autograd(1.0)], **kw)
    c = fv.render(model, [0, 1], **kw)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert (a.images - c.images).abs().max() > 1e-3  # the terms do change the images


def test_render_needs_no_gradients_switched_on_and_takes_numpy_integers():
    model = cnn()
    ref = fv.render(model, [2, 5], steps=3, seed=3, progress=False)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.equal(fv.render(model, [2, 5], steps=3, seed=3, progress=False).images, ref.images)
    r = fv.render(model, np.array([2, 5]), steps=3, seed=np.int64(3), size=np.int64(32), progress=False)
    assert torch.equal(r.images, ref.images) and r.targets == [fv.Class(2), fv.Class(5)]
    assert fv.render(model, np.int64(2), steps=1, progress=False).targets == [fv.Class(2)]


@pytest.mark.parametrize("kind", ["fourier", "maco"])
def test_a_loaded_colour_transform_mixes_the_colours(kind):
    """load_state_dict of another parameterization's state gives its images: `mixing`, made from `color` and not
    saved, is made again from the loaded one."""
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) ** 2
    cov = fv.color_covariance(images) + 0.01 * torch.eye(3)
    make = {"fourier": lambda c: fv.FourierParam(2, 3, 32, color_cov=c),
            "maco": lambda c: fv.MaCoParam(2, 3, 32, magnitude=fv.magnitude_spectrum(images, c), color_cov=c)}[kind]
    a, b = make(cov), make(None)
    assert not torch.allclose(a(), b())
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mixing, a.mixing) and torch.allclose(b(), a(), atol=1e-6)
    if kind == "fourier":  # set_images (which reads `color`) and forward (`mixing`) agree; maco keeps its magnitude
        b.set_images(images[:2])
        assert torch.allclose(b(), images[:2].clamp(1e-3, 1 - 1e-3), atol=2e-3)


def test_constants_cached_under_inference_mode_serve_a_later_backward():
    """The small constant tensors made once per device are made outside inference mode: a first call under
    torch.inference_mode must not cache a tensor that a later backward cannot save (sizes no other test uses)."""
    with torch.inference_mode():
        fv.affine_grid(torch.eye(2, 3)[None], 23, 23)
        fv._hermitian_irfft2(torch.ones(1, 1, 23, 12, dtype=torch.complex64), (23, 23))
    theta = torch.eye(2, 3)[None].requires_grad_()
    fv.affine_grid(theta, 23, 23).sum().backward()
    assert theta.grad is not None
    spec = torch.ones(1, 1, 23, 12, dtype=torch.complex64, requires_grad=True)
    fv._hermitian_irfft2(spec, (23, 23)).sum().backward()
    assert spec.grad is not None


def test_fourier_refuses_a_spectrum_of_another_size():
    with pytest.raises(ValueError, match=r"spectrum must be \(64, 33\) for 64x64 images.*got \(32, 17\)"):
        fv.fourier_scale(64, spectrum=fv.spectrum(torch.rand(4, 3, 32, 32)))


def test_hybrid_keeps_the_best_restart_then_refines_it():
    model, vae = cnn(), vae_with_stats()
    hybrid = fv.techniques(vae)["hybrid"]
    r = hybrid(model, [0, 1], steps=4, restarts=3, images_per_target=2, progress=False)
    assert r.images.shape == (4, 3, 32, 32) and r.history.shape == (4, 4)
    first = fv.render(model, [0, 1], steps=2, **{**hybrid.settings, "restarts": 3, "images_per_target": 2,
                                                 "progress": False})
    torch.testing.assert_close(r.history[:2], first.history)  # the first stage's best of three
    assert not torch.allclose(r.images, first.images, atol=1e-3)  # which the second stage refined


def test_visualize_unit_builds_the_right_target():
    model = cnn()
    kw = dict(steps=2, progress=False)
    assert fv.visualize_unit(model, "head", 3, **kw).targets == [fv.Class(3)]
    assert fv.visualize_unit(model, "block1.act2", 2, technique="pixel", **kw).targets == [
        fv.Channel("block1.act2", 2)]
    assert fv.visualize_unit(model, "block1.act2", [0, 1], neuron=(3, 4), **kw).targets == [
        fv.Neuron("block1.act2", 0, 3, 4), fv.Neuron("block1.act2", 1, 3, 4)]
    with pytest.raises(ValueError, match="unknown technique"):
        fv.visualize_unit(model, "head", 0, technique="deepdream")
    with pytest.raises(ValueError, match=r"neuron=\(1, 1\) needs a spatial layer; layer 'head' means a class"):
        fv.visualize_unit(model, "head", 0, neuron=(1, 1), **kw)
    assert [str(t) for t in (fv.Class(3), fv.Channel("block1.act2", 2), fv.Neuron("block1.act2", 0, 3, 4),
                             fv.Neuron("block1.act2", 0), fv.Direction("block1.act2", torch.ones(16)),
                             fv.Direction(None, torch.ones(10)))] == [
        "class 3", "block1.act2 channel 2", "block1.act2 channel 0 at y=3, x=4", "block1.act2 channel 0 at the center",
        "a direction in block1.act2", "a direction in the logits"]
    for channels in (torch.arange(2), np.arange(2)):  # index tensors and arrays, as for class targets
        assert fv.visualize_unit(model, "block1.act2", channels, **kw).targets == [
            fv.Channel("block1.act2", 0), fv.Channel("block1.act2", 1)]
    magnitude = fv.magnitude_spectrum(torch.rand(8, 3, 32, 32))
    assert fv.visualize_unit(model, "block1.act2", 1, technique="maco", magnitude=magnitude, **kw).images.shape == (
        1, 3, 32, 32)


# ----------------------------------------------------------------------------- planted features

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small classifier, an independent one (other seed and width) and a small VAE on synthetic data.

    Trained on the CPU, whose random streams are the same on every machine, and then moved to the
    default device: a GPU's streams draw other models (a VAE trained there recovered 8 of 10 templates
    where the CPU's seeds 0-3 recover 9 or 10), and these tests are about rendering, not training."""
    ckpt = tmp_path_factory.mktemp("featureviz")
    d = data.load_data("synthetic", n_train=5000, n_test=1000)
    kw = dict(preset="small", progress=False, device="cpu")
    model, _ = training.train_classifier(d, ckpt / "a.pt", hyp=dict(epochs=3, batch_size=256), seed=0, **kw)
    other, _ = training.train_classifier(d, ckpt / "b.pt", hyp=dict(epochs=2, batch_size=256), seed=1,
                                         widths=(24, 48, 48), **kw)
    vae, _ = training.train_vae(d, ckpt / "vae.pt", preset="small", seed=0, progress=False, device="cpu",
                                hyp=dict(epochs=6, batch_size=64, lr=3e-3, kl_warmup_epochs=1))
    device = training.get_device()
    return dict(data=d, model=model.to(device), other=other.to(device), vae=vae.to(device),
                cov=fv.color_covariance(d.train_x))


def test_class_visualizations_recover_the_planted_templates(trained):
    d = trained["data"]
    r = fv.get_technique("whitened", vae=trained["vae"])(trained["model"], list(range(10)), progress=False)
    corr = metrics.template_recovery(r.images, d.templates)  # (10 visualizations, 10 templates)
    own = corr.diagonal()
    best_other = (corr - 10 * torch.eye(10)).max(1).values
    assert (own > best_other).sum() >= 9, corr


def test_decorrelated_fourier_transfers_better_than_raw_pixels(trained):
    top1 = {}
    for name in ("pixel", "fourier"):
        how = fv.get_technique(name, color_cov=trained["cov"])
        r = how(trained["model"], list(range(10)), images_per_target=3, progress=False)
        top1[name] = metrics.transferability(trained["other"], r.images, r.target_index)
    assert top1["fourier"] >= top1["pixel"] + 0.2, top1


def test_pixel_reg_penalties_each_do_their_part(trained):
    """pixel+reg's images vary less from pixel to pixel than plain pixel ascent's, and each of its terms
    (L2, total variation) lowers its own penalty: rendered without it, the images score higher on it."""
    model, classes, how = trained["model"], list(range(10)), fv.get_technique("pixel+reg")
    terms = how.settings["regularizers"]
    r = how(model, classes, progress=False)
    images = r.images
    pixel = fv.get_technique("pixel")(model, classes, progress=False).images
    assert fv.tv_penalty(images).mean() < 0.5 * fv.tv_penalty(pixel).mean()
    # and they still climb their class, from the grey a heavier penalty would leave (2.8 against 0.05 on average)
    grey = fv.activations(model, torch.full((1, 3, 32, 32), 0.5), classes)[0].to(r.activation.device)
    assert (r.activation > grey).all() and r.activation.mean() > grey.mean() + 1, (r.activation, grey)
    for term in terms:
        without = how(model, classes, regularizers=[t for t in terms if t is not term], progress=False).images
        assert type(term).penalty(images).mean() < type(term).penalty(without).mean(), term


def test_quality_table_scores_every_technique_and_the_baselines(trained):
    d = trained["data"]
    calls = []

    def outside(targets, seed):  # an outside renderer: real test images of each class; no channels
        calls.append(seed)
        if not isinstance(targets[0], fv.Class):
            return None
        return d.test_x[torch.stack([(d.test_y == t.idx).nonzero()[seed, 0] for t in targets])]
    channels = [fv.Channel("block2.act2", 0), fv.Channel("block3.act2", 5)]
    rows, grid = metrics.quality_table(trained["model"], trained["other"], d, {"pixel": fv.get_technique("pixel"),
                                       "outside": outside, "same": lambda targets, seed: outside(targets, 0)},
                                       seeds=2, steps=4, progress=False, n_ref=2000, channels=channels)
    names = [r["technique"] for r in rows]
    assert names == ["real test images", "dataset exemplars", "uniform noise", "shuffled pixels", "another class",
                     "pixel", "outside", "same"] and calls == [0, 0, 1, 1] + [0] * 4  # classes, channels by seed
    assert grid["pixel"].shape == (10, 3, 32, 32)
    assert torch.equal(grid["outside"], outside([fv.Class(k) for k in range(10)], 0))
    by = dict(zip(names, rows))
    real, noise = by["outside"], by["uniform noise"]
    assert real["planted"] >= 0.9 and real["transfer"] >= 0.8  # real images: planted feature, transferable
    assert 0.5 < real["naturalness"] < 2 < noise["naturalness"]
    # act by hand: each image's logit over its class's top logit on the test set, the mean over classes and seeds
    classes = [fv.Class(k) for k in range(10)]
    top = fv.activations(trained["model"], d.test_x, classes).max(0).values
    act = [(fv.activations(trained["model"], outside(classes, seed), classes).diagonal() / top).mean()
           for seed in (0, 1)]
    assert real["act"] == pytest.approx(sum(act).item() / 2, rel=1e-5)
    assert by["dataset exemplars"]["act"] > real["act"] > noise["act"]  # a class's top images excite it most
    assert "two_choice_channels" not in real and "two_choice_channels" in by["pixel"]
    # diversity: of each class's images over the seeds; one image whatever the seed has none
    assert by["same"]["diversity"] < 1e-3 < 0.1 * real["diversity"] and by["real test images"]["diversity"] > 1e-3
    table = metrics.format_table(rows)
    assert "| planted recovery |" in table and table.count("\n") == len(rows) + 1
    assert f"{real['transfer']:.2f} ± {real['transfer_sd']:.2f}" in table
    rows, _ = metrics.quality_table(trained["model"], trained["other"], d, {}, seeds=1, progress=False, n_ref=500,
                                    channels=[])  # the classes alone
    assert len(rows) == 5 and all("two_choice_channels" not in r for r in rows)
    few = dataclasses.replace(d, test_x=d.test_x[:39], test_y=d.test_y[:39])  # top and weakest would overlap
    with pytest.raises(ValueError, match="needs at least 40 test images .* has 39"):
        metrics.quality_table(trained["model"], trained["other"], few, {}, seeds=1, progress=False, channels=[])




def test_several_targets_as_an_array_or_tensor_and_numpy_weights():
    model = cnn()
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    many = fv.exemplars(model, x, torch.arange(3), k=2)  # three classes, as render() takes them
    assert many.top.shape == (2, 3) and torch.equal(many.top[:, 1], fv.exemplars(model, x, 1, k=2).top)
    r = fv.visualize_unit(model, "block1.act2", np.arange(2), steps=1, progress=False)
    assert r.targets == [fv.Channel("block1.act2", 0), fv.Channel("block1.act2", 1)]
    assert fv.TV(np.float32(2.0)).weight == 2.0 and fv.Diversity(np.int64(1)).weight == 1  # a sweep's weights
    # a generator or a dict's values: several targets, as regularizers= takes a generator (each was taken for one
    # target and refused)
    assert fv.exemplars(model, x, (c for c in range(3)), k=2).top.shape == (2, 3)
    assert fv.as_targets({0: 2, 1: 0}.values()) == [fv.Class(2), fv.Class(0)]
    r = fv.visualize_unit(model, "block1.act2", (c for c in range(2)), steps=1, progress=False)
    assert r.targets == [fv.Channel("block1.act2", 0), fv.Channel("block1.act2", 1)]
    two = fv.Technique(dict(param="pixel"), refine=dict(param="pixel"))  # two stages, one generator of targets
    assert two(model, (c for c in range(2)), steps=2, progress=False).targets == [fv.Class(0), fv.Class(1)]
    with pytest.raises(TypeError, match="a target must be a class index"):
        fv.as_targets({0: 1})  # a dict is no list of targets (its keys would be)
    # Lucent's "layer:n", a channel (the last colon: a layer's name may hold one)
    assert fv.as_targets("block2.act2:3") == [fv.Channel("block2.act2", 3)]
    assert fv.as_targets(["a:b:12", 4]) == [fv.Channel("a:b", 12), fv.Class(4)]
    assert fv.render(model, "block1.act2:1", steps=1, progress=False).targets == [fv.Channel("block1.act2", 1)]
    for text in ("block2.act2", "block2.act2:", ":3", "block2.act2:-1", "block2.act2:1.5", "block2.act2: 3"):
        with pytest.raises(TypeError, match=f"a target given as a string is a channel, 'layer:n' as Lucent writes it "
                                            f".*; got '{text}'"):
            fv.as_targets(["block1.act2:0", text])
    with pytest.raises(TypeError, match="not a set: .* give a list"):  # its order changes from run to run
        fv.as_targets({fv.Channel("block1.act2", 0), fv.Channel("block1.act2", 1)})
    with pytest.raises(ValueError, match=r"TV weight must be a finite number >= 0, got True"):
        fv.TV(True)


class _GpuLike(torch.Tensor):
    """An index tensor that NumPy cannot read, as one on a GPU."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_class_indices_as_a_list_of_gpu_tensors():
    indices = [torch.tensor(k).as_subclass(_GpuLike) for k in (3, 1)]
    assert fv.as_targets(indices) == [fv.Class(3), fv.Class(1)]
    if torch.cuda.is_available():
        on_gpu = [torch.tensor(k, device="cuda") for k in (3, 1)]
        assert fv.as_targets(on_gpu) == [fv.Class(3), fv.Class(1)]


def test_transforms_and_regularizers_given_the_wrong_way():
    model, kw = cnn(), dict(steps=1, progress=False)
    with pytest.raises(TypeError, match=r"transforms must be a transform t\(x, gen\).*calling it failed"):
        fv.render(model, [0], transforms=lambda x: x, **kw)
    with pytest.raises(TypeError, match=r"transforms must return the images .*\(1, 3, 32, 32\); got tuple"):
        fv.render(model, [0], transforms=lambda x, gen: (x, gen), **kw)  # as a torchvision v2 transform does
    one = fv.render(model, [0], param="pixel", transforms=None, regularizers=fv.TV(1.0), seed=1, **kw)
    listed = fv.render(model, [0], param="pixel", transforms=None, regularizers=[fv.TV(1.0)], seed=1, **kw)
    assert torch.equal(one.images, listed.images)
    with pytest.raises(ValueError, match=r"init images must be \(1, 3, 32, 32\).*at the model's size; got \(1, 3, 28, 28\)"):
        fv.render(model, [0], param=fv.parameterization("fourier", init=torch.rand(1, 3, 28, 28)), **kw)


def test_stages_take_names_and_a_prior_goes_to_the_latent_stage_only():
    model, vae = cnn(), vae_with_stats()
    r = fv.render_in_stages(model, [0], dict(param="pixel"), dict(param="fourier"), steps=2, progress=False)
    assert r.images.shape == (1, 3, 32, 32) and r.history.shape == (2, 1)
    odd = fv.render_in_stages(model, [0], dict(param="pixel"), dict(param="fourier"), steps=5, progress=False)
    assert odd.history.shape == (5, 1)  # 2 steps, then 3: none lost to the halving
    default = fv.render_in_stages(model, [0], dict(param="pixel"), dict(lr=0.05), steps=2, progress=False)
    assert torch.equal(default.images, r.images)  # a second stage without a param: render()'s, fourier
    hybrid = fv.techniques(vae)["hybrid"]
    kw = dict(steps=2, seed=4, progress=False)
    with_prior = hybrid(model, [0], regularizers=[fv.Prior(5.0)], **kw)
    assert not torch.equal(with_prior.images, hybrid(model, [0], **kw).images)  # the prior acted in stage one
    with pytest.raises(ValueError, match=r"the Prior regularizer needs a parameterization with a prior"):
        fv.render_in_stages(model, [0], dict(param="pixel"), dict(param="fourier"), regularizers=[fv.Prior(1.0)],
                            steps=2, progress=False)  # no stage has a prior


def test_a_bfloat16_vae_draws_the_latent_techniques_images_as_a_float32_one_does():
    model, vae = cnn(), vae_with_stats()
    with torch.no_grad():  # untrained, its images barely depend on z; with weights x2, two seeds' are 0.06 apart
        for p in vae.parameters():
            p.mul_(2)
    for name in ("latent", "whitened", "hybrid"):
        ref = fv.techniques(vae)[name](model, [0, 1], steps=3, seed=1, progress=False)
        low = fv.techniques(copy.deepcopy(vae).to(torch.bfloat16))[name](model, [0, 1], steps=3, seed=1, progress=False)
        assert low.images.dtype == torch.float32, name  # render() returns float32 images, whatever made them
        other = fv.techniques(vae)[name](model, [0, 1], steps=3, seed=2, progress=False)  # another start
        # bfloat16's rounding is far below the images' own dependence on their latent: 0.001 on average before a
        # step; after 3, 0.001 for `latent` and up to 0.008 (0.12x another start's) for the whitened ones, whose
        # latent statistics the VAE holds in bfloat16 too, and whose first Adam steps (about lr along the sign of
        # each gradient) go the other way where the rounded statistics turn a gradient's sign (on an Intel CPU
        # with bfloat16 instructions; under 0.1x on an AMD one)
        assert (low.images - ref.images).abs().mean() < 0.25 * (other.images - ref.images).abs().mean(), name
    low = copy.deepcopy(vae).to(torch.bfloat16)
    for kind in ("latent", "whitened"):  # the shift and the resampling take its images too (rfft2 takes no bfloat16)
        for transforms in (fv.STANDARD, fv.AFFINE):
            r = fv.render(model, [0], param=fv.parameterization(kind, vae=low), transforms=transforms, steps=2,
                          progress=False)
            assert r.images.isfinite().all(), (kind, transforms)


def test_one_init_image_for_all_and_single_values_named():
    model = cnn()
    image = torch.rand(1, 3, 32, 32)
    r = fv.render(model, [0, 1], param=fv.parameterization("fourier", init=image), steps=0, progress=False)
    assert torch.allclose(r.images, image.expand(2, 3, 32, 32), atol=2e-3)  # one image starts every target
    vae = vae_with_stats()
    for kind, options in [("pixel", {}), ("maco", dict(magnitude=torch.ones(3, 32, 17))), ("latent", dict(vae=vae)),
                          ("whitened", dict(vae=vae))]:  # every kind, as parameterization() says
        r = fv.render(model, [0, 1], param=fv.parameterization(kind, init=image, **options), steps=0, progress=False)
        assert r.images.shape == (2, 3, 32, 32) and torch.equal(r.images[0], r.images[1]), kind
    with torch.no_grad():  # and it is that image: itself, or the VAE's reading of it (its mean latent, in range)
        z = torch.maximum(torch.minimum(vae.encode(image)[0], vae.latent_hi), vae.latent_lo)
        decoded = vae.decode(z)[0]
    # (an untrained VAE's images differ by only ~4e-3 from one z to another: the latent kinds are held closer)
    for kind, options, expected, atol in [("pixel", {}, image[0], 2e-3), ("latent", dict(vae=vae), decoded, 1e-5),
                                          ("whitened", dict(vae=vae), decoded, 1e-5)]:
        r = fv.render(model, [0, 1], param=fv.parameterization(kind, init=image, **options), steps=0, progress=False)
        assert torch.allclose(r.images[0], expected, atol=atol), kind
    with pytest.raises(TypeError, match=r"Channel channel must be an int, got None"):
        fv.visualize_unit(model, "block1.act2", None, steps=1, progress=False)
    x = torch.rand(10, 3, 32, 32)
    assert torch.equal(fv.exemplars(model, x, np.array(3), k=2).top, fv.exemplars(model, x, 3, k=2).top)
    with pytest.raises(TypeError, match=r"the second stage's param must be a parameterization name or Recipe"):
        fv.render_in_stages(model, [0], dict(param="pixel"), dict(param=fv.PixelParam(1, 3, 32)), steps=2)
    built = fv.PixelParam(1, 3, 32)
    before = built.logits.detach().clone()
    with pytest.raises(TypeError, match=r"the second stage's param must be .*, not a built module"):
        fv.techniques(vae)["hybrid"](model, [0], param=built, steps=2, progress=False)  # in `common`: both stages
    assert torch.equal(built.logits, before)  # refused before the first stage optimized it
    with pytest.raises(ValueError, match="pool draws random starts and init gives the starts: pass one of them"):
        fv.parameterization("whitened", vae=vae, pool=256, init=image)
    two = torch.rand(2, 3, 32, 32)  # one per target, for each target's images and restarts (target-major)
    r = fv.render(model, [0, 1], param=fv.parameterization("pixel", init=two), images_per_target=3, steps=0,
                  progress=False)
    assert torch.allclose(r.images, two.repeat_interleave(3, 0), atol=2e-3)
    r = fv.render(model, [0, 1], param=fv.parameterization("pixel", init=two), restarts=2, steps=0, progress=False)
    assert torch.allclose(r.images, two, atol=2e-3)  # was refused: (4, 3, 32, 32) or one image only
    with pytest.raises(ValueError, match=r"init images must be \(6, 3, 32, 32\), \(2, 3, 32, 32\) \(one per target\)"):
        fv.render(model, [0, 1], param=fv.parameterization("pixel", init=torch.rand(3, 3, 32, 32)), images_per_target=3,
                  steps=0, progress=False)


def test_diversity_compares_a_half_models_maps_without_overflow():
    act = torch.full((2, 4, 8, 8), 100.0, dtype=torch.float16)  # Gram entries of 640,000: beyond float16
    act[1, 0] = 1.0
    penalty = fv.diversity_penalty(act, torch.tensor([0, 0]))
    assert penalty.isfinite().all() and (penalty > 0.5).all()
    in_float32 = fv.diversity_penalty(act.float(), torch.tensor([0, 0]))
    torch.testing.assert_close(penalty.float(), in_float32, rtol=1e-2, atol=0)


def test_the_cosine_schedule_falls_from_its_start_to_0_along_a_half_cosine_and_reaches_adam(monkeypatch):
    schedule = fv.cosine(0.3)
    assert [schedule(t) for t in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([0.3, 0.3 * (1 + 0.5 ** 0.5) / 2, 0.15, 0.0])
    seen = []
    set_lr = fv._set_lr
    monkeypatch.setattr(fv, "_set_lr", lambda opt, lr: (seen.append(float(lr)), set_lr(opt, lr)))
    model = models.build_model(models.cnn_config("small")).eval()
    fv.render(model, [0], "pixel", steps=4, lr=schedule, transforms=None, size=32, progress=False)
    assert seen == pytest.approx([schedule(i / 4) for i in range(4)])  # each step's, at the fraction done


def test_a_neuron_looks_at_its_cells_centre_and_other_targets_at_no_one_place():
    model = models.build_model(models.cnn_config("small")).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows, cols = models.cell_centres(model, "block3.act2", images)
    assert fv.looks_at(model, fv.Neuron("block3.act2", 5, 2, 0), images) == (rows[2].item(), cols[0].item())
    assert fv.looks_at(model, fv.Neuron("block3.act2", 5), images) == (rows[1].item(), cols[1].item())  # the centre
    assert abs(rows[2].item() - 20) < 0.3 and abs(cols[0].item() - 4) < 0.3  # by hand: rows and columns 4, 12, 20
    for target in (fv.Channel("block3.act2", 5), fv.Class(3), 3, fv.Neuron("head", 4)):  # a unit of no map too
        assert fv.looks_at(model, target, images) is None
    with pytest.raises(ValueError, match=r"neuron position \(y=3, x=0\) out of range: layer 'block3.act2' is 3x3"):
        fv.looks_at(model, fv.Neuron("block3.act2", 5, 3, 0), images)


def test_a_second_stage_is_checked_before_the_first_runs():
    model, calls = cnn(), []
    model.register_forward_hook(lambda *a: calls.append(1))
    for second, error, match in ((dict(param="fourir"), ValueError, "fourir"),
                                 (dict(param="fourier", lr=-1), ValueError, "lr must be a finite number > 0"),
                                 (dict(param="fourier", step=3), TypeError, r"the second stage's settings \['step'\]"),
                                 (dict(param="fourier", images_per_target=2), ValueError,  # failed at the end
                                  "the two stages' images_per_target differ, 1 and 2: the second starts from"),
                                 (dict(param="fourier", size=24), ValueError,
                                  r"the two stages' size differ, \(32, 32\) and \(24, 24\)"),
                                 (dict(param="fourier", size=(32, 0)), ValueError,
                                  r"^the second stage's size must be an int >= 1")):
        with pytest.raises(error, match=match):
            first = dict(param="pixel", **({"size": 32} if "size" in second else {}))
            fv.render_in_stages(model, [0], first, second, steps=4, progress=False)
    assert calls == []  # the first stage spent nothing
    # a size given to one stage alone is the model's for the other: it renders
    r = fv.render_in_stages(model, [0], dict(param="pixel"), dict(param="fourier", size=32), steps=2, progress=False)
    assert r.images.shape == (1, 3, 32, 32)
    # a side and its (height, width) are one size; the model takes any
    r = fv.render_in_stages(model, [0], dict(param="pixel", size=24), dict(param="fourier", size=(24, 24)), steps=2,
                            progress=False)
    assert r.images.shape == (1, 3, 24, 24)


def test_a_render_that_becomes_nan_says_so_and_restarts_never_keep_a_nan():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[4].weight.fill_(float("inf"))  # a logit that overflows
    with pytest.warns(UserWarning, match=r"the render of class 0 became NaN or inf from step 0, which a plot draws"):
        fv.render(model, [0], param="pixel", steps=2, size=8, progress=False)
    final = torch.tensor([1.0, float("nan"), 0.5, 2.0, float("nan"), -1.0])
    assert fv._best_of_restarts(final, 2).tolist() == [0, 3, 5]  # torch's argmax takes a NaN as the largest


def test_a_render_inside_autocast_is_the_render_outside_it():
    """Autocast would run the model in bfloat16 and read the parameterization, updated in place, from its first
    cast copy; a render turns it off for its duration."""
    model = cnn()
    plain = fv.render(model, [0, 1], param="fourier", steps=4, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fv.render(model, [0, 1], param="fourier", steps=4, progress=False)
    assert torch.equal(inside.images, plain.images) and torch.equal(inside.history, plain.history)


class _AlwaysDropout(torch.nn.Module):
    """MC dropout: on in eval mode too, drawing from the global random numbers."""

    def forward(self, x):
        return torch.nn.functional.dropout(x, 0.5, training=True)


def test_a_model_that_draws_random_numbers_renders_by_its_seed_and_leaves_the_callers_stream():
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _AlwaysDropout(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    state = torch.get_rng_state()
    first = fv.render(model, [0, 1], param="pixel", steps=3, size=16, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream where it was
    torch.manual_seed(123)  # moved: the render's draws are its seed's, not the caller's
    again = fv.render(model, [0, 1], param="pixel", steps=3, size=16, progress=False)
    assert torch.equal(first.images, again.images) and torch.equal(first.history, again.history)


def test_a_render_on_another_accelerator_seeds_and_hands_back_its_stream(monkeypatch):
    """mps and xpu as CUDA (neither is here: their calls recorded); meta, which draws none, as the CPU."""
    state = torch.get_rng_state()
    with fv._own_random_numbers(torch.device("meta"), 7):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)  # fork_rng's device_type "meta" forked not even the CPU's
    calls = []

    @contextlib.contextmanager
    def fork(devices, device_type=None):
        calls.append(("fork", list(devices), device_type))
        yield
    monkeypatch.setattr(torch.random, "fork_rng", fork)
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: calls.append(("seed", seed)))
    with fv._own_random_numbers(torch.device("mps", 0), 7):  # a model's parameters are on mps:0
        pass
    assert calls == [("fork", [0], "mps"), ("seed", 7)]
    calls.clear()
    generators = [SimpleNamespace(manual_seed=lambda seed, i=i: calls.append(("seed", i, seed))) for i in range(2)]
    monkeypatch.setattr(torch.xpu, "default_generators", generators, raising=False)
    with fv._own_random_numbers(torch.device("xpu", 1), 7):  # the model's device of two, not the current one
        pass
    assert calls == [("fork", [1], "xpu"), ("seed", 1, 7)]


def test_the_colour_transform_is_inverted_on_the_cpu_in_float64(monkeypatch):
    """As mps would need (no float64 there); the images keep their own dtype and device."""
    seen, pinv = [], torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda a: seen.append((a.device.type, a.dtype)) or pinv(a))
    cov = fv.color_covariance(torch.rand(20, 3, 8, 8))
    spectrum = fv.magnitude_spectrum(torch.rand(20, 3, 8, 8), cov)
    assert seen and set(seen) == {("cpu", torch.float64)} and spectrum.dtype == torch.float32
