"""Neural networks: the CNN family and the convolutional VAE. Modules only, no I/O.

Every model takes images in [0, 1] of shape (B, C, H, W); the classifier normalizes inside. The CNN is
fully convolutional (any size; its config records the size it was trained at), the VAE is 32x32.
Build any model from its config dict with `build_model(config)`, so a checkpoint can rebuild it.
The helpers at the end work for any nn.Module: layers by name, captured activations, input shape,
and `evaluating`, the one way this project runs a model without changing it.
"""
import copy
import itertools
import math
import numbers
import sys
import weakref
from collections.abc import Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from data import check_batch, check_count, check_real, plain, to_float, warn

# ----------------------------------------------------------------------------- classifier

CNN_PRESETS = {  # widths: channels of block1..block3
    # port of airbench94 (Keller Jordan): ~94% on CIFAR-10 in ~10 epochs
    "airbench": dict(widths=(64, 256, 256)),
    # the same recipe at half width, 3.5x faster on a CPU: ~94.5% on Fashion-MNIST in 10 epochs, 14 min on 2 cores
    "compact": dict(widths=(32, 128, 128)),
    # same architecture, narrow: for smoke runs and tests
    "small": dict(widths=(16, 32, 32)),
}


def cnn_config(preset="airbench", in_channels=3, num_classes=10, mean=None, std=None, image_size=None,
               **overrides):
    """Config dict for a CNN of the named preset; mean/std are the per-channel input statistics and
    image_size the side of the training images (the network takes any size; this records its own)."""
    if preset not in CNN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(CNN_PRESETS)}")
    if not _positive_int(in_channels):  # before the default statistics are made for that many channels
        raise ValueError(f"in_channels must be {_CONFIG_RULES['in_channels'][0]}, got {in_channels!r}")
    config = dict(
        kind="cnn",
        preset=preset,
        in_channels=plain(in_channels),   # 1 (Fashion-MNIST) or 3
        num_classes=plain(num_classes),
        whiten_kernel=2,           # patch size of the frozen whitening conv
        bn_momentum=0.6,           # airbench convention: weight of the old running stat
        logit_scale=1 / 9,         # logits are divided by 9 (temperature)
        mean=[float(m) for m in mean] if mean is not None else [0.5] * in_channels,  # a tensor's or array's too
        std=[float(s) for s in std] if std is not None else [0.25] * in_channels,
        image_size=plain(image_size),     # side of the training images, e.g. 32 (None: not recorded)
    )
    config.update(CNN_PRESETS[preset])
    return _overridden(config, overrides)


def _overridden(config, overrides):
    """The config with the overrides applied (NumPy numbers as Python's: data.plain); an error for a key it
    does not have or a value a model cannot be built or trained with."""
    valid = [key for key in config if key != "kind"]  # a cnn_config is a CNN's, a vae_config a VAE's
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for a {config['kind']}; valid: {', '.join(valid)}")
    config.update({key: plain(value) for key, value in overrides.items()})
    widths = config["widths"]
    if not isinstance(widths, (list, tuple)) or len(widths) != 3 or not all(_positive_int(w) for w in widths):
        raise ValueError(f"widths must give the channels of 3 stages (3 ints >= 1), got {widths!r}")
    for key, (what, ok) in _CONFIG_RULES.items():
        if key in config and not ok(config[key]):
            raise ValueError(f"{key} must be {what}, got {config[key]!r}")
    for key in ("mean", "std"):
        if key in config and (len(config[key]) != config["in_channels"] or not all(map(_real, config[key]))):
            raise ValueError(f"{key} must give one number per input channel ({config['in_channels']}), got "
                             f"{config[key]!r}")
    if "std" in config and min(config["std"]) <= 0:  # a channel constant over the data: divided by 0
        raise ValueError(f"std must be > 0 for every channel, got {config['std']!r}")
    config["widths"] = list(widths)
    return config


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_CONFIG_RULES = dict(  # what a config value must be: (in words, test); the keys a config has are checked
    in_channels=("an int >= 1", _positive_int),
    num_classes=("an int >= 1", _positive_int),
    image_size=("None or an int >= 1 (pixels)", lambda v: v is None or _positive_int(v)),
    mixtures=("an int >= 1 (logistics per pixel)", _positive_int),
    latent_dim=("an int >= 1", _positive_int),
    whiten_kernel=("an int >= 1 (pixels)", _positive_int),
    bn_momentum=("a number in [0, 1) (the old running statistics' weight)", lambda v: _real(v) and 0 <= v < 1),
    logit_scale=("a number > 0", lambda v: _real(v) and v > 0),
    min_log_scale=("a finite number", _real),
)


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers, so the model sees [0, 1] images."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (_unit(x) - self.mean) / self.std


def _randn(shape, generator, like):
    """Standard normal numbers of this shape on like's device and dtype, drawn on the generator's device: a CPU
    generator serves a VAE on a GPU (its numbers are the CPU's), a GPU one draws there."""
    device = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _unit(x):
    """uint8 images (as the datasets hold them) as float in [0, 1]; float images as they are."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1 and only the bias trained (airbench)."""

    def __init__(self, channels, momentum=0.6, eps=1e-12):
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    """3x3 'same' conv without bias, initialized partly as identity (dirac) like airbench."""

    def __init__(self, cin, cout, kernel_size=3, padding="same", bias=False):
        super().__init__(cin, cout, kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        nn.init.dirac_(w[: min(w.size(0), w.size(1))])


class ConvBlock(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU; halves the resolution."""

    def __init__(self, cin, cout, bn_momentum):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = BatchNorm(cout, bn_momentum)
        self.act1 = nn.GELU()
        self.conv2 = Conv(cout, cout)
        self.bn2 = BatchNorm(cout, bn_momentum)
        self.act2 = nn.GELU()

    def forward(self, x):
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class GlobalMaxPool(nn.Module):
    """The max over positions, (B, C, 1, 1): nn.AdaptiveMaxPool2d(1)'s values, whose backward CUDA has no
    deterministic kernel for (torch.use_deterministic_algorithms(True) refused every step); amax's has one."""

    def forward(self, x):
        return x.amax((2, 3), keepdim=True)


class CNN(nn.Module):
    """airbench94-style classifier: frozen patch-whitening conv, three conv blocks, max pool, linear."""

    def __init__(self, config):
        super().__init__()
        c, k, w = config["in_channels"], config["whiten_kernel"], config["widths"]
        self.config = copy.deepcopy(config)  # a config edited after the build must not rewrite the model's
        self.normalize = Normalize(config["mean"], config["std"])
        self.whiten = Conv(c, 2 * c * k * k, k, padding=0, bias=True)  # (B, 2ck^2, 31, 31)
        self.whiten.weight.requires_grad = False
        self.whiten_act = nn.GELU()
        self.block1 = ConvBlock(2 * c * k * k, w[0], config["bn_momentum"])  # (B, w0, 15, 15)
        self.block2 = ConvBlock(w[0], w[1], config["bn_momentum"])  # (B, w1, 7, 7)
        self.block3 = ConvBlock(w[1], w[2], config["bn_momentum"])  # (B, w2, 3, 3)
        self.pool = GlobalMaxPool()
        self.head = nn.Linear(w[2], config["num_classes"], bias=False)
        self.logit_scale = config["logit_scale"]

    def features(self, x):
        """Penultimate features (B, w2): what the linear head sees."""
        x = self.whiten_act(self.whiten(self.normalize(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.pool(x).flatten(1)

    def forward(self, x):
        return self.head(self.features(x)) * self.logit_scale  # (B, num_classes)

    @torch.no_grad()
    def init_whiten(self, images, eps=5e-4):
        """Set the whitening filters to the scaled eigenvectors of the patch covariance of `images`."""
        check_input(self, images)  # gray images for an RGB model would broadcast into three equal channels
        x = self.normalize(to_float(images).to(self.whiten.weight.device))
        c, k = x.size(1), self.config["whiten_kernel"]
        patches = x.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H', W', k, k)
        patches = exact(patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k))
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0), eigvecs.T.flip(0)
        filters = (eigvecs / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None]).view(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())


# ----------------------------------------------------------------------------- VAE

VAE_PRESETS = {  # widths: encoder channels at 16, 8, 4 px (the decoder mirrors them); z is flat, latent_dim long
    "default": dict(widths=(32, 64, 128), latent_dim=128),  # sized for minutes per epoch on a CPU
    "small": dict(widths=(16, 32, 32), latent_dim=32),
    "wide": dict(widths=(64, 128, 256), latent_dim=256),    # 4x the parameters of default: for a GPU
}


MIXTURES = 1  # components of the decoder's per-pixel logistic mixture (5 measured no better on CIFAR-10)


def vae_config(preset="default", in_channels=3, **overrides):
    """Config dict for a VAE of the named preset."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    config = dict(
        kind="vae",
        preset=preset,
        in_channels=plain(in_channels),
        min_log_scale=-7.0,     # floor of the discretized logistic's log scale
        mixtures=MIXTURES,      # logistic components per pixel; their channels are linearly coupled
    )
    config.update(VAE_PRESETS[preset])
    return _overridden(config, overrides)


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


def discretized_logistic_nll(x, mean, log_scale):
    """-log P(x) per pixel under a logistic discretized to 256 levels; x, mean in [-1, 1]. The lowest
    and the highest level take the logistic's tails (their bin edge at -inf or +inf). Where a bin's mass
    underflows (1e-5), an inner level takes the density at its centre and an end level its tail's exact
    log mass, as in PixelCNN++."""
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    upper, lower = inv_s * (centered + 1 / 255), inv_s * (centered - 1 / 255)
    plus = torch.where(x > 0.999, math.inf, upper)
    minus = torch.where(x < -0.999, -math.inf, lower)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * centered
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid) - math.log(127.5)
    log_tail = torch.where(x > 0.999, F.logsigmoid(-lower), F.logsigmoid(upper))  # log P(255), log P(0)
    underflow = torch.where(x.abs() > 0.999, log_tail, log_pdf_mid)
    return -torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), underflow)


def mixture_logistic_nll(x, logits, means, log_scales, coeffs):
    """-log P(x) per pixel under a mixture of discretized logistics whose channels are coupled
    linearly, as in PixelCNN++: in component k, channel j has mean means[k, j] + sum over i < j of
    coeffs[k, pair(i, j)] * x_i, so P(x) = sum_k pi_k P_k(x_0) P_k(x_1 | x_0) P_k(x_2 | x_0, x_1) ...
    is a distribution over the 256^C joint values of a pixel (each factor sums to one).

    x (B, C, H, W) in [-1, 1]; logits (B, K, H, W); means, log_scales (B, K, C, H, W);
    coeffs (B, K, C(C-1)/2, H, W) in pair order (0, 1), (0, 2), (1, 2), ...; returns (B, H, W)."""
    x = x.unsqueeze(1)                                   # (B, 1, C, H, W)
    coupled = coupled_means(means, coeffs, x)            # (B, K, C, H, W)
    log_p = -discretized_logistic_nll(x, coupled, log_scales).sum(2) + F.log_softmax(logits, dim=1)
    return -torch.logsumexp(log_p, dim=1)


def coupled_means(means, coeffs, x):
    """Channel means of each component given the channels before them: means[:, :, j] + the
    coefficient-weighted x[:, :, i] for i < j (x broadcasts over the components)."""
    channels, out, pair = means.shape[2], [], 0
    for j in range(channels):
        mean = means[:, :, j]
        for i in range(j):
            mean = mean + coeffs[:, :, pair] * x[:, :, i]
            pair += 1
        out.append(mean)
    return torch.stack(out, dim=2)


class VAE(nn.Module):
    """Convolutional VAE with a flat latent and a decoder that gives each pixel a mixture of
    discretized logistics with coupled colour channels (a true likelihood: bits/dim are a bound)."""

    image_size = 32  # fixed by the architecture: three stride-2 stages down to a flat 4x4 grid

    def __init__(self, config):
        super().__init__()
        c, (w1, w2, w3), d = config["in_channels"], config["widths"], config["latent_dim"]
        self.config, self.latent_dim = copy.deepcopy(config), d
        if "mixtures" not in config:
            raise ValueError("this VAE config (or checkpoint) predates the decoder's logistic mixture: retrain "
                             "it (VAE.ipynb with RETRAIN=1, or training.train_vae(..., retrain=True))")
        k = config["mixtures"]
        self.split = (k, k * c, k * c, k * (c * (c - 1) // 2))  # logits, means, log scales, coupling
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w1, 4, 2, 1), ResBlock(w1), nn.SiLU(),   # (B, w1, 16, 16)
            nn.Conv2d(w1, w2, 4, 2, 1), ResBlock(w2), nn.SiLU(),  # (B, w2, 8, 8)
            nn.Conv2d(w2, w3, 4, 2, 1), ResBlock(w3), nn.SiLU(),  # (B, w3, 4, 4)
            nn.Flatten(),
            nn.Linear(w3 * 16, 2 * d),
        )
        self.decoder = nn.Sequential(
            nn.Linear(d, w3 * 16), nn.Unflatten(1, (w3, 4, 4)),
            ResBlock(w3), nn.SiLU(), nn.ConvTranspose2d(w3, w2, 4, 2, 1),  # (B, w2, 8, 8)
            ResBlock(w2), nn.SiLU(), nn.ConvTranspose2d(w2, w1, 4, 2, 1),  # (B, w1, 16, 16)
            ResBlock(w1), nn.SiLU(), nn.ConvTranspose2d(w1, sum(self.split), 4, 2, 1),  # (B, ., 32, 32)
        )
        # statistics of the encoder means over the training set (filled in after training), at first the prior's
        for name, value in self.prior_statistics().items():
            self.register_buffer(name, value)

    def prior_statistics(self):
        """The latent statistics of the prior N(0, I): mean, covariance and the range -3 to 3 in each dimension (in
        place of the 0.5th and 99.5th percentiles), what a VAE holds until its training run completes."""
        d = self.latent_dim
        return dict(latent_mean=torch.zeros(d), latent_cov=torch.eye(d), latent_lo=torch.full((d,), -3.0),
                    latent_hi=torch.full((d,), 3.0))

    def encode(self, x):
        """Posterior q(z|x) of images (uint8, or float in [0, 1]): (mean, logvar), each (B, latent_dim). The range is
        not checked here, as every training step comes through (reconstruct and interpolate check theirs): floats in
        0-255 would give codes of nothing."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the VAE takes {self.image_size}x{self.image_size} images (its architecture is fixed); "
                             f"got {tuple(x.shape)}: the classifier takes any size, the VAE does not")
        dtype = self.latent_mean.dtype  # the model's: under autocast too, the KL and the prior are taken in it
        x = _unit(x.to(self.latent_mean.device)).to(dtype)  # images on another device (the CPU) too
        mu, logvar = self.encoder(x * 2 - 1).to(dtype).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)

    def decode_params(self, z):
        """The mixture's parameters in [-1, 1] pixel space, as mixture_logistic_nll takes them:
        logits (B, K, H, W); means, log_scales (B, K, C, H, W); coeffs (B, K, C(C-1)/2, H, W)."""
        # the likelihood in the model's dtype, not autocast's: its differences of two CDFs a level apart need it
        out = self.decoder(z).to(self.latent_mean.dtype)
        b, (k, c), hw = len(z), (self.split[0], self.config["in_channels"]), out.shape[-2:]
        logits, means, log_scales, coeffs = out.split(self.split, dim=1)
        return (logits, torch.tanh(means).view(b, k, c, *hw),
                log_scales.clamp_min(self.config["min_log_scale"]).view(b, k, c, *hw),
                torch.tanh(coeffs).view(b, k, -1, *hw))

    def decode(self, z):
        """The decoder's mean image in [0, 1] (differentiable in z): each component's channel means,
        coupled through the component's own means, averaged with the mixture weights. A channel's mean is
        clamped to the pixel range [-1, 1] before it feeds the next channel, as a pixel drawn past an end
        lands in its end bin (a saturated red of mean 1.3 is 1: green and blue are coupled to that)."""
        logits, means, _, coeffs = self.decode_params(z)
        mean = torch.zeros_like(means)
        for _ in range(means.shape[2]):  # channel j's mean needs the means of the channels before it
            mean = coupled_means(means, coeffs, mean).clamp(-1, 1)
        weights = torch.softmax(logits, dim=1).unsqueeze(2)
        return ((weights * mean).sum(1).clamp(-1, 1) + 1) / 2

    def forward(self, x):
        return self.reconstruct(x)

    def reconstruct(self, x):
        """Decode the posterior mean of images x (B, C, H, W), uint8 or float in [0, 1]."""
        return self.decode(self.encode(to_float(check_input(self, x, "x")))[0])

    def interpolate(self, a, b, steps=8):
        """Mean images at `steps` evenly spaced points on the line from the posterior mean of image a to
        that of image b (each (C, H, W), uint8 or float in [0, 1]): (steps, C, H, W), a's reconstruction
        first and b's last."""
        if a.ndim != 3 or a.shape != b.shape:
            raise ValueError(f"interpolate takes two images of one shape (C, H, W); got {tuple(a.shape)} and "
                             f"{tuple(b.shape)} (for images[i] of a batch, pass images[i], not images[i:i + 1])")
        check_count("steps", steps, 2)  # both ends included
        ends = check_input(self, torch.stack([to_float(a, "a"), to_float(b, "b")]), "a and b")
        z = self.encode(ends)[0]  # encode moves them to the VAE's device
        t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype)[:, None]
        return self.decode(torch.lerp(z[0], z[1], t))

    def sample(self, n, generator=None, temperature=1.0):
        """Mean images of n draws of z from the N(0, I) prior, its standard deviation scaled by temperature."""
        check_count("n", n, 1)
        check_real("temperature", temperature, 0)
        z = _randn((n, self.latent_dim), generator, self.latent_mean) * temperature
        return self.decode(z)

    def latent_cholesky(self, jitter=1e-4):
        """Lower-triangular L with L L^T = covariance of the encoder means (+ jitter x its mean variance)."""
        check_real("jitter", jitter, 0)
        cov = exact(self.latent_cov)
        if not cov.isfinite().all():
            raise ValueError("the VAE's latent covariance is not finite (NaN or inf: measured on a model whose codes "
                             "overflowed, or a damaged checkpoint), so the latent cannot be whitened; measure it "
                             "again (training.latent_statistics)")
        if not cov.diagonal().mean() > 0:
            raise ValueError("the VAE's latent covariance is zero: every training image it was measured on has "
                             "the same code (identical images?), so the latent cannot be whitened; measure it on "
                             "varied images (training.latent_statistics)")
        eye = torch.eye(self.latent_dim, dtype=cov.dtype, device=cov.device)
        try:
            chol = torch.linalg.cholesky(cov + jitter * cov.diagonal().mean() * eye)
        except torch.linalg.LinAlgError:  # singular: at jitter 0, or one too small for float64's rounding
            raise ValueError(f"the VAE's latent covariance is singular (directions of no variance) and cannot be "
                             f"whitened with jitter={jitter!r}: pass a larger jitter (the default is 1e-4)") from None
        return chol.to(self.latent_cov)  # its device too

    @torch.no_grad()
    def latent_summary(self):
        """How correlated the latent is: covariance eigenvalues (descending), participation ratio
        (effective number of dimensions), dims with variance > 0.01, mean |correlation| between dims."""
        cov = exact(self.latent_cov)
        eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
        std = cov.diagonal().sqrt()
        corr = cov / (std[:, None] * std[None, :]).clamp_min(1e-12)
        off = ~torch.eye(len(cov), dtype=torch.bool, device=cov.device)
        ratio = (eig.sum() ** 2 / (eig ** 2).sum()).item() if eig.sum() > 0 else 0.0  # no variance: no dimension
        return dict(eigenvalues=eig.cpu(), participation_ratio=ratio,
                    active_dims=int((cov.diagonal() > 0.01).sum()), mean_abs_corr=corr[off].abs().mean().item())

    def sample_aggregate(self, n, generator=None):
        """Mean images of n draws of z from the Gaussian fitted to the encoder means (where real images' codes lie:
        the aggregate posterior without each posterior's own spread)."""
        check_count("n", n, 1)
        eps = _randn((n, self.latent_dim), generator, self.latent_mean)
        return self.decode(self.latent_mean + eps @ self.latent_cholesky().T)

    def elbo(self, x, kl_weight=1.0, free_bits=0.0, generator=None):
        """Loss terms per image, in nats summed over pixels (and in bits/dim for the negative ELBO), of images x
        (B, C, H, W), uint8 or float in [0, 1] (checked: images in [-1, 1] or 0-255 would give a number of
        nothing). The bits/dim are a one-sample estimate of the negative ELBO (one z drawn per image). Floats off
        the 1/255 grid are encoded as given and scored as rounded to it: the bound is of the rounded image."""
        return self.loss_terms(to_float(check_input(self, x, "x")), kl_weight, free_bits, generator)

    def loss_terms(self, x, kl_weight=1.0, free_bits=0.0, generator=None):
        """elbo's terms of images as encode takes them, unchecked: the training step's, which cannot afford to
        read its batch's range (a GPU would wait for it each step)."""
        x = _unit(x.to(self.latent_mean.device))  # images on another device (the CPU) too
        mu, logvar = self.encode(x)
        eps = _randn(mu.shape, generator, mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        target = (torch.round(x * 255) / 255) * 2 - 1
        nll = mixture_logistic_nll(target, *self.decode_params(z)).flatten(1).sum(1)  # (B,)
        kl_dims = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # (B, D)
        kl = kl_dims.sum(1)
        kl_train = kl_dims.mean(0).clamp_min(free_bits).sum() if free_bits > 0 else kl.mean()
        dims = x[0].numel()
        return dict(
            loss=nll.mean() + kl_weight * kl_train,  # what training minimizes
            nll=nll, kl=kl,
            bpd=(nll + kl) / (dims * math.log(2)),  # negative ELBO in bits/dim, per image
        )


# ----------------------------------------------------------------------------- common

def build_model(config):
    """Rebuild a model from its config dict (as stored in a checkpoint)."""
    kinds = {"cnn": CNN, "vae": VAE}
    if config.get("kind") not in kinds:
        raise ValueError(f"config kind must be one of {sorted(kinds)}, got {config.get('kind')!r}")
    return kinds[config["kind"]](config)


# the activation modules that count as layers (nn.Hardtanh covers nn.ReLU6); not the gates nn.Sigmoid and
# nn.Hardsigmoid, which in a squeeze-and-excitation block output a (B, C, 1, 1) scale, not a feature map
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
               nn.Hardtanh, nn.Softplus, nn.Tanh)


def list_layers(model):
    """Names of the layers a user can target: convolutions, activations, and the head. Not the linear layers
    that never run as modules, as attention reads their weights (_unrun). Listed in registration order, with
    the layers a model runs only in training (googlenet's aux classifiers), which a target refuses."""
    kinds = (nn.Conv2d, nn.Linear, *ACTIVATIONS)
    unrun = {layer for m in model.modules() for layer in _unrun(m)}
    return [name for name, m in model.named_modules() if name and isinstance(m, kinds) and m not in unrun]


def _unrun(module):
    """The linear layers of an attention module that reads their weights without calling them: an
    nn.MultiheadAttention's out_proj, a torchvision Swin's window attention's qkv and proj."""
    if isinstance(module, nn.MultiheadAttention):
        return [module.out_proj]
    swin = sys.modules.get("torchvision.models.swin_transformer")  # not imported: no Swin model exists
    if swin is not None and isinstance(module, swin.ShiftedWindowAttention):  # V2 too
        return [module.qkv, module.proj]
    return []


def get_layer(model, name):
    """The submodule called `name`; a clear error listing the valid names otherwise."""
    if not isinstance(name, str):  # nn.Sequential's layer 1 is named "1"
        raise TypeError(f"a layer name must be a str, got {name!r} ({type(name).__name__}); valid layers: "
                        f"{', '.join(list_layers(model))}")
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise ValueError(f"unknown layer {name!r}; valid layers: {', '.join(list_layers(model))}")
    return modules[name]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@contextmanager
def evaluating(*modules):
    """Run modules in eval mode with frozen weights; on exit their train/eval modes and requires_grad
    flags are restored and every hook registered meanwhile (by us or a library) is removed."""
    modules = [m for m in modules if m is not None]
    subs = [s for m in modules for s in m.modules()]
    modes = [s.training for s in subs]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    hooks = [(s, name, set(getattr(s, name))) for s in subs for name in _HOOK_DICTS if hasattr(s, name)]
    try:
        for m in modules:
            m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for s, mode in zip(subs, modes):
            s.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for s, name, before in hooks:
            d = getattr(s, name)
            for key in set(d) - before:
                del d[key]


@contextmanager
def frozen(model, *others):
    """evaluating(model, *others), and on the CPU our own models' 4-D weights channels_last for the
    duration (faster convolutions there), restored to their own memory format on exit. Yields layout(x),
    which gives the model's inputs the format it runs in: channels_last for ours on the CPU; for any other
    model the one it was written for, as a model that views a feature map (x.view(len(x), -1), as many
    do) fails on channels_last tensors."""
    ours = [m for m in (model, *others) if isinstance(inner(m), _CHANNELS_LAST)]
    params = [p for m in ours for p in m.parameters() if p.dim() == 4 and p.device.type == "cpu"]
    datas = [p.data for p in params]
    fast = isinstance(inner(model), _CHANNELS_LAST) and device_of(model).type == "cpu"
    memory_format = torch.channels_last if fast else torch.contiguous_format
    with evaluating(model, *others):
        try:
            for p in params:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            yield lambda x: x.contiguous(memory_format=memory_format)
        finally:
            for p, saved in zip(params, datas):
                p.data = saved


_CHANNELS_LAST = (CNN, VAE)  # written for either memory format


def exact(t):
    """t in float64, for exact sums and statistics: moved to the CPU where its device has no float64 (mps)."""
    return (t.cpu() if t.device.type == "mps" else t).double()


def check_model(model, name="model"):
    """The model, or an error naming the argument when it is no nn.Module (a notebook's None, left by a training
    or loading cell that stopped)."""
    if not isinstance(model, nn.Module):
        hint = ": the cell that trains or loads it did not finish; re-run it" if model is None else ""
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def device_of(model):
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    t = next(check_model(model).parameters(), None)
    t = next(model.buffers(), None) if t is None else t
    return torch.device("cpu") if t is None else t.device


def dtype_of(model):
    """The floating dtype the model computes in (of its first floating parameter or buffer); float32 if none."""
    return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), torch.float32)


def config_of(model):
    """The model's config dict, as ours record one; {} for a model without one, or whose `config` is something
    else (a library's own config object, which is read for nothing)."""
    config = getattr(inner(model), "config", None)
    return config if isinstance(config, Mapping) else {}


def input_channels(model):
    """Number of channels the model's input has: what it records (_recorded_channels), else its first
    registered nn.Conv2d's."""
    recorded = _recorded_channels(model)
    if recorded is not None:
        return recorded
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"cannot tell how many input channels {type(model).__name__} takes: it records none and "
                         f"has no nn.Conv2d; set model.image_channels = C, the channels of its input images")
    return conv.in_channels


def _recorded_channels(model):
    """The input channels the model records, `model.config['in_channels']` (ours) or `model.image_channels`
    (what a user may set, beside `model.image_size`; not `model.in_channels`, which many CIFAR ResNets use as
    the width counter of their _make_layer); None if neither."""
    config = config_of(model)
    source, recorded = (("config['in_channels']", config["in_channels"]) if "in_channels" in config
                        else ("image_channels", getattr(inner(model), "image_channels", None)))
    if recorded is not None and (isinstance(recorded, bool) or not isinstance(recorded, numbers.Integral)
                                 or recorded < 1):
        raise ValueError(f"{type(model).__name__}'s {source} (its input images' channels) must be an int >= 1, "
                         f"got {recorded!r}")
    return recorded


def check_input(model, images, name="images"):
    """The images, checked as a batch the model takes (data.check_batch): of the channels it records
    (_recorded_channels; any for a model that records none, whose first nn.Conv2d need not be its stem)."""
    return check_batch(images, _recorded_channels(check_model(model)), name)


def input_size(model, size=None):
    """(height, width) of the images the model takes: `size` if given, else what the model records
    (`model.image_size` or `model.config['image_size']`); either a side (square images) or a pair (height, width)
    (image_shape). An error asking for size= otherwise."""
    if size is not None:
        return image_shape(size)
    recorded = getattr(inner(model), "image_size", None) or config_of(model).get("image_size")
    if recorded is None:
        raise ValueError(f"cannot tell the image size {type(model).__name__} takes (it records none): pass "
                         f"size=..., the side in pixels of its square input images (e.g. size=32 for CIFAR-10) "
                         f"or their (height, width)")
    return image_shape(recorded, f"{type(model).__name__}'s recorded image_size")


def image_shape(size, name="size"):
    """(height, width) in pixels of an image size given as one side (square images) or a pair (height, width),
    a tuple or list (a torch.Size too); an error naming `name` for anything else (a set has no order)."""
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    h = w = None
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        h, w = pair
    if not all(_positive_int(v) for v in (h, w)):
        raise ValueError(f"{name} must be an int >= 1 (the side of square images, in pixels) or a pair (height, "
                         f"width) of them, got {size!r}")
    return int(h), int(w)


class _Stop(Exception):
    """Raised by the last hook a pass needs: the rest of the network is not computed."""


def check_logits(model, output):
    """An error naming what the model returned when its output is not a tensor of logits."""
    if not torch.is_tensor(output):
        raise TypeError(f"{type(model).__name__} returns a {type(output).__name__}, not a tensor of "
                        f"logits (B, classes): wrap it in a module whose forward returns them")
    if output.dim() != 2:
        raise ValueError(f"{type(model).__name__} returns a tensor of shape {tuple(output.shape)}, not logits "
                         f"(B, classes): wrap it in a module whose forward returns them")


# ops whose output has its channels on dim 1 (and "pool" in a name); ops that move dims, whose features' new place
# a probe tells (`__get__`: properties such as .mT); ops that regroup dims; matrix products; ops that mix dims
# beyond telling. An in-place op (transpose_) goes by its twin's name.
_CHANNELS_FIRST = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                   "batch_norm", "group_norm", "instance_norm", "local_response_norm", "interpolate",
                   "pixel_shuffle", "pixel_unshuffle"}
_MOVES = {"permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "__get__"}
_RESHAPES = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_MATMULS = {"matmul", "__matmul__", "bmm", "baddbmm"}
_UNKNOWN = {"einsum", "tensordot", "broadcast_tensors"}
_FROM_FIRST = _MOVES | _RESHAPES | _MATMULS  # where the output's features come from the first argument's


def _reshaped(f, before, after):
    """Where a reshape from shape `before` to `after` puts the features dim f: kept with the dims up to it, or,
    for the last, with the last dim or as the merge of the last dims (timm's patch merging); None otherwise."""
    if f == len(before) - 1:
        return len(after) - 1 if after[-1] == before[-1] or after[:-1] == before[:len(after) - 1] else None
    return f if after[:f + 1] == before[:f + 1] else None


class _Layouts(TorchFunctionMode):
    """Which module calls of one forward pass output their features on the last dim, followed op by op through
    the pass: `with _Layouts(model) as layouts:` run it, and layouts.last_call[module] says whether the module's
    latest call did (a module shared by two kinds of path is read right in each).

    Each tensor's features dim is tracked where an op tells it: dim 1 out of a convolution, a batch or group
    norm, a pooling or a resize; the last dim out of a linear layer (tokens (B, N, D), a ConvNeXt block's
    channels-last map (B, H, W, C)) or a product with a weight matrix; where a permute or transpose moves it
    (a ViT's patches turned into tokens, Swin's map into channels last, found by running the op on a probe);
    kept by a reshape (`_reshaped`: Swin's windows); and, for any other op, that of its first input with as
    many dims that has one (an activation, norm, dropout, residual sum, slice, concatenation). Elsewhere (a
    batched product such as attention's, an einsum, a dim of size 1 but a linear layer's) it is unknown, the
    images' to begin with, and read on dim 1. Tensors are known by id and a weak reference: nothing is kept
    alive for it. Every op goes through Python meanwhile, which turns off fused kernels such as multi-head
    attention's: run it on a pass of its own (`Recorder` runs one on one image)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.last_call, self.handles = model, {}, []
        self.dims = {}  # id -> (weak reference, features dim) of the tensors whose features dim is known

    def __enter__(self):
        # prepended: recorded before any other hook on the module reads it
        self.handles = [m.register_forward_hook(self._record, prepend=True) for m in self.model.modules()]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.dims.clear()
        return super().__exit__(*exc)

    def features_dim(self, t):
        """t's features dim (>= 0), None where unknown."""
        ref, dim = self.dims.get(id(t), (None, None))
        return dim if ref is not None and ref() is t else None

    def _record(self, module, args, out):
        if torch.is_tensor(out):
            self.last_call[module] = out.dim() > 2 and self.features_dim(out) == out.dim() - 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args and torch.is_tensor(args[0]) else None
        before = (None, None) if x is None else (self.features_dim(x), x.shape)  # an in-place op changes x
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # a tensor known already and not changed in place (a getter's, such as ._base) stays as it is
            if torch.is_tensor(t) and (t is x or self.features_dim(t) is None):
                try:
                    dim = self._features_dim(func, args, kwargs, before, t)
                except (RuntimeError, TypeError, ValueError, IndexError):  # a probe the op does not take
                    dim = None
                if dim is None:
                    self.dims.pop(id(t), None)
                else:
                    self.dims[id(t)] = (weakref.ref(t), dim)
        return out

    def _features_dim(self, func, args, kwargs, before, out):
        """The features dim of func's output `out`, None where unknown; before: (features dim, shape) of its
        first argument before the op."""
        name = getattr(func, "__name__", "")
        if not name.startswith("_"):
            name = name.removesuffix("_")  # an in-place op (transpose_) moves dims as its twin does
        if name == "linear":
            return out.dim() - 1  # even a single feature: the layer's own
        dim = self._passed_dim(name, func, args, kwargs, before, out)
        # a dim of size 1 (a gate's one channel) tells nothing
        return dim if dim is not None and 0 <= dim < out.dim() and out.shape[dim] > 1 else None

    def _passed_dim(self, name, func, args, kwargs, before, out):
        """_features_dim for an op other than a linear layer, before the size-1 check."""
        f, shape = before
        if name in _CHANNELS_FIRST or "pool" in name:
            return 1
        if name in _UNKNOWN or f is None and name in _FROM_FIRST:
            return None
        if name in _MATMULS:  # x @ W, as a hand-made linear layer; not a batched product (attention's)
            return out.dim() - 1 if f == len(shape) - 1 and args[1].dim() == 2 else None
        if name in _MOVES:  # run on a probe whose dims have sizes 2, 3, ...: the features' is f + 2
            moved = func(torch.empty(tuple(range(2, len(shape) + 2)), device="meta"), *args[1:], **kwargs)
            return moved.shape.index(f + 2) if torch.is_tensor(moved) and f + 2 in moved.shape else None
        if name in _RESHAPES:
            return _reshaped(f, shape, out.shape)
        inputs = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t) and t.dim() == out.dim()]
        return next((d for d in map(self.features_dim, inputs) if d is not None), None)


def _channels_first(output, last):
    """A layer's output with its channels on dim 1, as everywhere else: one whose features are last
    (`_Layouts`) has its tokens (B, N, D) or channels-last map (B, H, W, C), as in ViTs and ConvNeXt,
    moved there."""
    return output.movedim(-1, 1) if last and output.dim() > 2 else output


def _features_last(model, modules, x):
    """The names of the modules ({name: module}) whose outputs keep their features last (`_Layouts`), from a
    pass of its own on one image x (1, C, H, W), in eval mode: followed in a pass that counts, the layouts
    would change its numbers (multi-head attention's fused kernel turned off)."""
    with torch.no_grad(), evaluating(model), _Layouts(model) as layouts:
        inner(model)(x)
    # (.get: an nn.DataParallel runs replicas of the modules)
    return {name for name, m in modules.items() if layouts.last_call.get(m)}


_WRAPPERS = {"OptimizedModule": "_orig_mod", "DataParallel": "module", "DistributedDataParallel": "module"}


def inner(model):
    """The module a wrapper runs (torch.compile's OptimizedModule, nn.DataParallel, DistributedDataParallel, one
    inside another too), else the model. Passes with hooks run it: compiled code keeps no hook added after it was
    traced (its guards skip a module's empty hook dict), and a hook's bookkeeping would make it compile again
    and again. Its settings are read from it (config, image_size, image_channels), which DataParallel does not
    pass on. Its layers are the same modules under either (the wrapper names them _orig_mod.*, module.*)."""
    while isinstance(getattr(model, _WRAPPERS.get(type(model).__name__, ""), None), nn.Module):
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


def check_one_replica(model):
    """An error for a model run as replicas on several GPUs (nn.DataParallel): its layers are read with forward
    hooks, which fire in each replica on its share of the batch, so an output would come back in pieces."""
    if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
        raise TypeError(f"the model is an nn.DataParallel over the GPUs {model.device_ids}, whose layers run as "
                        f"replicas on parts of each batch: pass model.module (its layers are named without "
                        f"'module.')")


class Recorder:
    """The outputs of named layers in a forward pass: `with Recorder(model, names).hooked() as run:`, then
    run(x) -> {name: output} (None among the names: the model's output too, under the key None).

    A layer's output is its module's output at its LAST call in a pass (a module that runs twice, such as
    the ReLU a torchvision BasicBlock reuses, gives the block's output, as captum's layer methods do),
    kept safe from in-place ops further on (ReLU(inplace=True), `out += identity`) that would overwrite
    it. The first pass runs the whole model and learns both: how often each module runs, and which
    outputs get overwritten (from then on copied as they are made, and that pass run again). Later passes
    stop after the last output they need, unless the model's output is one of them. An output whose features
    are last (tokens, a channels-last map) comes with them on dim 1, as learned on one image before the
    first pass (`_features_last`). The images are cast to the model's dtype (`dtype_of`), so a half or
    bfloat16 model takes float32 images.
    """

    def __init__(self, model, names):
        check_one_replica(model)
        self.model, self.dtype = model, dtype_of(model)
        self.modules = {name: get_layer(model, name) for name in names if name is not None}
        self.full = None in names
        # learned on the first pass; last: the names whose outputs keep their features last (`_features_last`)
        self.calls, self.copied, self.last = None, set(), set()

    @contextmanager
    def hooked(self):
        """Yield run(x) -> outputs; the hooks are removed on exit."""
        out, seen, versions, shapes = {}, dict.fromkeys(self.modules, 0), {}, {}

        def hook(name):
            def save(module, args, output):
                if not torch.is_tensor(output):
                    raise TypeError(f"layer {name!r} outputs a {type(output).__name__}, not a tensor: pick "
                                    f"another layer (models.list_layers)")
                seen[name] += 1
                if self.calls is None:  # the first pass: each call's shape, for _counted
                    shapes.setdefault(name, []).append(tuple(output.shape[1:]))
                if name in self.copied or output.is_inference():  # an inference tensor keeps no version
                    out[name], versions[name] = output.clone(), None
                else:
                    out[name], versions[name] = output, output._version
                if seen == self.calls and not self.full:
                    raise _Stop
            return save

        def run(x):
            if self.calls is None:  # the recorder's hooks fire in that pass too: cleared below
                # the first pass, of one image, learns the model: one that refuses the images (too small for its
                # pooling) says so
                with probing(self.model, x[:1]):
                    self.last = _features_last(self.model, self.modules, x[:1].to(self.dtype))
            out.clear()
            versions.clear()
            shapes.clear()
            seen.update(dict.fromkeys(self.modules, 0))
            try:
                out[None] = inner(self.model)(x.to(self.dtype))  # a half or bfloat16 model takes its own dtype
            except _Stop:
                pass
            if self.calls is None:
                self.calls = self._counted(seen, shapes)
                if self.full:
                    check_logits(self.model, out[None])
            stale = {name for name, v in versions.items() if v is not None and out[name]._version != v}
            if stale:  # overwritten by a later in-place op: copy them from now on, and run again
                self.copied |= stale
                return run(x)
            passed = {name: _channels_first(output, name in self.last) for name, output in out.items()}
            out.clear()  # nothing kept past the pass (kept, outputs would hold their autograd graph alive)
            return passed

        handles = [m.register_forward_hook(hook(name)) for name, m in self.modules.items()]
        try:
            yield run
        finally:
            for h in handles:
                h.remove()

    def _counted(self, seen, shapes):
        """The calls of each module in the first pass; an error for a module that did not run, and a warning
        for one whose calls output maps and vectors both (one ReLU module that a tutorial CNN applies after each
        of its layers, read at its last call, the linear layer's). Not for one that runs on maps of several
        shapes, as a torchvision Bottleneck's ReLU does, whose last call is its block's output, as captum reads
        it."""
        idle = [name for name, n in seen.items() if n == 0]
        if idle:
            raise ValueError(f"layer {idle[0]!r} does not run in {type(self.model).__name__}'s forward pass in eval "
                             f"mode (a layer some models run only in training, such as googlenet's aux classifiers)")
        for name, each in shapes.items():
            if len({len(shape) for shape in each}) > 1:
                warn(f"layer {name!r} is one module that runs {len(each)} times in a pass, on outputs of shapes "
                     f"{', '.join(map(str, each))}: its name reads the last call's, {each[-1]}; give each use its "
                     f"own module to read the others")
        return dict(seen)


def as_names(value, what="layers"):
    """A list of names from one name or several (each checked where it is looked up); an error naming `what`
    for a value that is neither."""
    try:
        return [value] if isinstance(value, str) else list(value)
    except TypeError:
        raise TypeError(f"{what} must be a name or a list of names; got {value!r}") from None


@torch.no_grad()
def capture(model, images, layers):
    """Outputs of the named layers (one name or several) for a batch of images (B, C, H, W) (uint8 or float in
    [0, 1]), as {name: tensor}, each a layer's output as `Recorder` defines it, in the standard memory
    format; the model is left as found (`frozen`, which runs ours channels-last on a CPU, where that is faster)."""
    with capturing(model, layers) as read:  # (read checks the images)
        return read(images)


@contextmanager
def capturing(model, layers):
    """Yields read(images) -> `capture(model, images, layers)`, for batch after batch: one Recorder reads them
    all, so that only its first pass learns the model and runs it whole (the later ones stop after the last
    layer asked for)."""
    layers = as_names(layers)
    with frozen(model) as layout, Recorder(model, layers).hooked() as run:
        @torch.no_grad()
        def read(images):
            out = run(layout(to_float(check_input(model, images).to(device_of(model)))))
            return {name: out[name].contiguous() for name in layers}
        yield read


def first_image(model, images):
    """The first of a batch of images (checked), as the model takes it: (1, C, H, W) float on its device."""
    # in the standard layout: a model that views its maps flat fails on a channels-last image
    return to_float(check_input(model, images)[:1]).to(device_of(model), dtype_of(model)).contiguous()


def last_to_run(model, x, kinds):
    """(module, its input) of the last module of these kinds to run in model(x): by call, not by registration
    order (a squeeze-and-excitation block's nn.Linear may be registered after the head); (None, None) if none
    runs. The caller sets the model's mode."""
    check_one_replica(model)
    last = {}
    handles = [m.register_forward_pre_hook(lambda module, args: last.update(module=module, input=args[0]))
               for m in model.modules() if isinstance(m, kinds)]
    try:
        inner(model)(x)
    finally:
        for h in handles:
            h.remove()
    return last.get("module"), last.get("input")


@torch.no_grad()
def keeps_features_last(model, images, name):
    """Whether the named layer makes its output for images like these (the first is run) with its features on
    the last dim (an nn.Linear's tokens or channels-last map, or an output made from one: `_Layouts`), which
    `capture` moves to dim 1."""
    x = first_image(model, images)
    return name in _features_last(model, {name: get_layer(model, name)}, x)


def _probe(model, size=None):
    """A zero image of the model's input shape on its device: (1, C, H, W); size as input_size takes it."""
    return torch.zeros(1, input_channels(model), *input_size(model, size), device=device_of(model),
                       dtype=dtype_of(model))


def device_error(e):
    """Whether an error is the device's own (out of memory, a device-side assert, cuDNN's or cuBLAS's status) or
    a tensor left on another device (a plain tensor attribute that model.to() does not move)."""
    return isinstance(e, (torch.OutOfMemoryError, torch.AcceleratorError)) or any(
        s in str(e) for s in ("same device", "expected device", "CUDNN_STATUS", "CUBLAS_STATUS"))


@contextmanager
def probing(model, probe):
    """Around a dry run of the model on a probe image (1, C, H, W): an error of the model's own (an image
    too small for its pooling, a size its linear layer does not fit) says which input it was given. The device's
    own errors (out of memory, a device-side assert, a tensor left on another device) stand as they are: no input
    would mend them."""
    try:
        yield
    except RuntimeError as e:
        if device_error(e):
            raise
        c, h, w = probe.shape[1:]
        raise ValueError(f"{type(model).__name__} fails on a {c}-channel {h}x{w} image (the images' size where "
                         f"images are given, else size= or the model's image_size): {e}. If {h}x{w} is not the size "
                         f"it takes, give size= (a side, or (height, width)); if {c} are not its channels "
                         f"(models.input_channels: what it records, else its first registered nn.Conv2d's), set "
                         f"model.image_channels") from e


def layer_channels(model, name, size=None):
    """Number of channels (or features) the named layer outputs."""
    return capture(model, _probe(model, size), [name])[name].shape[1]  # its first pass probes (Recorder)


def _spatial_outputs(model, x):
    """(name, shape, features last) of the layers with a spatial output for the probe image x (1, C, H, W):
    its shape (B, C, H, W), channels on dim 1, and whether the layer's last call made its output with them
    last (`_Layouts`), in the order the forward pass finishes them, each output named by the innermost module
    that made it. Blocks (modules holding layers) count too: one that hands on a layer's output unchanged goes
    by that layer's name (our block3 by block3.act2, a torchvision ResNet's layer4 by layer4.1.relu), one that
    makes its own (F.relu in its forward, as in many CIFAR ResNets) by its own name (layer4.1). An error if
    there is none."""
    listed = list_layers(model)
    candidates = [name for name, _ in model.named_modules()
                  if name in listed or any(layer.startswith(name + ".") for layer in listed)]
    # (id, version) -> the first module to output it; every call as (name, its maker, (id, version), shape), the
    # last three None for an output that is no map; the outputs, kept alive so that no id is reused
    made, calls, kept, tokens = {}, [], [], []

    def record(name, module, out):
        key = (id(out), out._version) if torch.is_tensor(out) else None
        kept.append(out)
        if key is not None and out.dim() == 3 and layouts.last_call.get(module, False):
            tokens.append((len(calls), name))  # a ViT's (B, N, D)
        if key is None or out.dim() != 4:
            calls.append((name, None, key, None))
            return
        last = layouts.last_call.get(module, False)  # this call's: its hook, prepended, has run
        calls.append((name, made.setdefault(key, name), key, tuple(_channels_first(out, last).shape)))

    # (not in inference mode, whose tensors keep no version)
    with evaluating(model), torch.no_grad(), torch.inference_mode(False), _Layouts(model) as layouts:
        for name in candidates:
            get_layer(model, name).register_forward_hook(
                lambda module, args, out, name=name: record(name, module, out))
        with probing(model, x):
            inner(model)(x)
    # as Recorder and captum read a module that runs twice: by its last call, so a map counts only where it is
    # its maker's last output (one ReLU module after conv1, conv2 and fc1 is fc1's, not a map)
    final = {name: key for name, _, key, _ in calls}
    maps = [i for i, (_, maker, key, _) in enumerate(calls) if maker is not None and final[maker] == key]
    if not maps:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial output (B, C, H, W) among "
                         f"{', '.join(listed)}")
    order = [(calls[i][1], calls[i][3]) for i in maps]  # (maker, shape)
    later = list(dict.fromkeys(name for i, name in tokens if i > maps[-1]))
    if later:
        warn(f"{type(model).__name__}'s layers after its last map ({order[-1][0]!r}) output tokens (B, N, D) "
             f"({_some(later)}), which the default layers (spatial ones) leave out: pass layers= to read "
             f"them")
    return [(name, shape, layouts.last_call.get(get_layer(model, name), False)) for name, shape in order]


def last_spatial_layer(model, size=None):
    """Name of the last layer (in the order the forward pass finishes them) whose output is (B, C, H, W)."""
    return _spatial_outputs(model, _probe(model, size))[-1][0]


def _larger_than_one(outputs):
    """Name of the last of these (name, shape, features last) outputs whose map is larger than 1x1, else of
    the last one."""
    return next((name for name, shape, _ in reversed(outputs) if shape[-2] * shape[-1] > 1), outputs[-1][0])


def last_wide_layer(model, size=None):
    """Name of the last spatial layer whose map is larger than 1x1 (the last spatial layer if none is):
    Diversity's default, as a Gram matrix of one position is only the pooled vector's outer product (the
    last map of a torchvision ResNet at 32 px is 1x1)."""
    return _larger_than_one(_spatial_outputs(model, _probe(model, size)))


def last_map_layer(model, images):
    """Name of the last layer whose output for these images (B, C, H, W) is a map larger than 1x1 (the last
    spatial layer if none is): Grad-CAM's default, as a 1x1 map, the last layer of a torchvision ResNet at 32
    px, would make a flat heatmap. Probed with the first image, so that a non-square input works too. A layer
    whose features are last (`keeps_features_last`) is passed over: Grad-CAM reads a layer's own output."""
    x = first_image(model, images)
    every = _spatial_outputs(model, x)
    outputs = [(name, shape, last) for name, shape, last in every if not last] or every
    chosen = _larger_than_one(outputs)
    # after its last entry (a block that hands on a layer's output goes by that layer's name too)
    after = every[max(i for i, (name, _, _) in enumerate(every) if name == chosen) + 1:]
    later = [name for name, shape, last in after if last and shape[-2] * shape[-1] > 1]
    if later:  # a Swin's stages, channels-last maps all: the default is its stem
        warn(f"Grad-CAM's default layer is {chosen!r}, the last map with its channels on dim 1: the later "
             f"maps ({_some(later)}) keep their features last, which Grad-CAM cannot read (captum reads a "
             f"layer's own output), so the heatmap is that early layer's")
    return chosen


def _some(names):
    """The first three names, quoted, and '...' for more: for a message."""
    return ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")


MARGIN = 64  # px of noise on each side of the image when cell_centres finds a map's geometry: a multiple of strides


@torch.inference_mode(False)
def cell_centres(model, layer, images, cells=4):
    """Where the rows and the columns of a layer's map (B, C, h, w) look in an image like the first of `images`:
    their centres in pixels (0 the first pixel's centre), as (rows (h,), columns (w,)) float64 tensors.

    A map does not always span its image evenly: a convolution without padding or a pooling that drops an odd
    last row leaves the last cells short of the far edge (our CNN's 3x3 map of 32 px images looks at rows 4,
    12 and 20, where an even stretch puts them at 4.8, 15.5 and 26.2). So the geometry is measured, on a noise
    image MARGIN px larger than the image on every side, run through the model up to the layer: the stride is
    how many cells the margin adds, and the offset the mean over a few (`cells`) rows (columns), spread evenly
    over the map, of where the gradient of the row's sum falls (its centre of mass; the margin keeps it from
    being cut off at the image's edges, and the mean cancels the pull to the middle that a gradient spread over
    the whole image, a squeeze-and-excitation gate's, gives rows on either side alike). A model that refuses the
    larger image, whose map does not grow by a whole number of cells with it (an adaptive pooling),
    whose measured spacing drifts from that stride by half a cell or more over the map (a stride that does not
    divide 2 x MARGIN, such as 28, whose margins add the cells 32's would), or whose rows no gradient reaches,
    gets the even stretch (bilinear resizing's)."""
    check_count("cells", cells, 2)  # two at least, to measure the spacing
    x = first_image(model, images)
    noise = torch.rand(1, x.shape[1], *(side + 2 * MARGIN for side in x.shape[-2:]),
                       generator=torch.Generator().manual_seed(0)).to(x)
    recorder = Recorder(model, [layer])  # its first pass (the image's) learns where to stop: before any head
    with torch.no_grad(), evaluating(model), recorder.hooked() as run:
        shape = run(x)[layer].shape
        if len(shape) != 4:
            raise ValueError(f"layer {layer!r} gives {tuple(shape)}, not a map (B, C, H, W): its cells have no place")
        try:
            grown = run(noise)[layer].shape[-2:]
        except (RuntimeError, ValueError, AssertionError) as e:  # a model for one input size only
            if device_error(e):
                raise
            grown = shape[-2:]
    centres = []
    for axis, (side, k, big) in enumerate(zip(x.shape[-2:], shape[-2:], grown)):
        half = (big - k) // 2  # the cells the margin adds on each side
        even = (torch.arange(k, dtype=torch.float64) + 0.5) * side / k - 0.5  # bilinear resizing's centres
        if big - k <= 0 or (big - k) % 2 or MARGIN % half:
            centres.append(even)
            continue
        stride = MARGIN // half
        picked = torch.linspace(0, k - 1, min(k, cells)).round().long().unique()
        where = _centres_of_mass(_gradient_mass(recorder, noise, axis, picked + half)) - MARGIN
        spacing = (where[-1] - where[0]) / (picked[-1] - picked[0]) if k > 1 else torch.tensor(float(stride))
        offset = (where - stride * picked).mean()
        fits = offset.isfinite() and abs(spacing - stride) * max(k - 1, 1) <= stride / 2  # drift: under half a cell
        centres.append(offset + stride * torch.arange(k, dtype=torch.float64) if fits else even)
    return tuple(centres)


def _centres_of_mass(profiles):
    """(n,) where each of n profiles (n, side) has its mass, in pixels."""
    return (profiles * torch.arange(profiles.shape[1], dtype=profiles.dtype)).sum(1) / profiles.sum(1)


def _gradient_mass(recorder, image, axis, index):
    """|d (the recorder's one layer's map summed over row (axis 0) or column (axis 1) i) / d image|, summed over
    the image's channels and the other axis: (len(index), the image's side) float64, one profile per i."""
    images = image.repeat(len(index), 1, 1, 1).requires_grad_()
    (layer,) = recorder.modules
    with torch.enable_grad(), evaluating(recorder.model), recorder.hooked() as run:
        a = run(images)[layer]
        if not a.requires_grad:
            raise ValueError(f"layer {layer!r} is computed without gradients (under torch.no_grad in the model's "
                             f"forward, a frozen backbone's): where its neurons look cannot be measured")
        pick = torch.zeros(len(index), a.shape[2 + axis], device=a.device, dtype=a.dtype)
        pick[torch.arange(len(index)), index] = 1
        pick = pick[:, None, :, None] if axis == 0 else pick[:, None, None, :]
        grad, = torch.autograd.grad((a * pick).sum(), images)
    return exact(grad.abs()).sum(1).sum(2 - axis).cpu()  # exact: mps has no float64


def block_layers(model, size=None):
    """Names of the last spatial layer of each top-level block (child module) of the model, in forward
    order: whiten, whiten_act, block1.act2, block2.act2, block3.act2 for our CNN; layer1.1.relu ... for
    a torchvision ResNet; every spatial layer of a flat nn.Sequential. Wrappers do not count as blocks:
    in nn.Sequential(Normalize(...), resnet) the blocks are the ResNet's (1.conv1, 1.relu, 1.layer1.1.relu ...),
    and in a torchvision VGG or DenseNet, whose spatial layers all sit in `features`, they are its children,
    then `features` itself for its output (made by a max-pool or a batch norm, which are not layers). Nor do
    containers of stages (_blocks): a RegNet's trunk_output is read as its stages, a SqueezeNet's features as
    its Fire modules."""
    outputs = [(name.split("."), shape[-2:]) for name, shape, _ in _spatial_outputs(model, _probe(model, size))]
    # the leading name parts every spatial layer shares (a wrapper's), a wrapper's own name included
    depth = len(list(itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*[n for n, _ in outputs]))))
    return _blocks(outputs, depth)


def _blocks(outputs, depth):
    """The last name of each block of [(name parts, map size)], a block being the modules that share the first
    depth + 1 parts. A block of blocks (some layer two levels below it) whose maps come in three sizes or more
    (1x1 ones aside, such as a squeeze-and-excitation gate's) is a container of stages, split into its own
    blocks: a block (our CNN's, a ResNet's layer2) changes the resolution once at most, from its input's to
    its own, and a stem of plain layers stays one block however often it does."""
    blocks = {}
    for parts, hw in outputs:
        blocks.setdefault(tuple(parts[:depth + 1]), []).append((parts, hw))
    names = []
    for members in blocks.values():
        sizes = {hw for _, hw in members if hw[0] * hw[1] > 1}
        if len(sizes) >= 3 and any(len(parts) > depth + 2 for parts, _ in members):
            names += _blocks(members, depth + 1)
        else:
            names.append(".".join(members[-1][0]))
    return names
