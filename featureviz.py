"""Feature visualization: parameterizations, transforms, targets, regularizers, render(), exemplars.

Activation maximization for any model and image size: every target (class, channel, neuron,
direction, or a weighted sum of them across layers) of one call renders in ONE batch, one forward pass
per step, each image reading only its own target. The image size comes from the model (models.input_size)
or from size=.

    r = render(model, [Class(k) for k in range(10)], param=parameterization("fourier", color_cov=cov))
    r.images    # (10, C, H, W) in [0, 1]
    r.activation, r.history  # (10,), (steps, 10)
    r = render(model, [Channel("block2.act2", 7)], regularizers=[TV(2.0)], size=32)
    r = visualize_unit(model, "block2.act2", 7, technique="hybrid", vae=vae, color_cov=cov)

Sections: data statistics, parameterizations, transforms, targets, regularizers, render, real-image
activations and exemplars, techniques (techniques(): name -> Technique). How good the images are: metrics.py.
"""
import collections.abc
import functools
import inspect
import math
import numbers
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields as fields_of, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import data
import models


# ----------------------------------------------------------------------------- data statistics

STATISTICS_VALUES = 2 ** 25  # values in a batch of the data statistics below: 10,000 images at 32 px in one


def _batches(images):
    """Checked images (data.check_batch), as floats a batch of at most STATISTICS_VALUES values at a time: a set of
    large images (10,000 at 224 px: 6 GB in float32, more in the sums' float64) in bounded memory."""
    for x in images.split(max(1, STATISTICS_VALUES // images[0].numel())):
        yield data.to_float(x)


def color_covariance(images):
    """(C, C) covariance of the pixel colours of a set of images (uint8 or float), summed in float64."""
    images = data.check_batch(images)
    n = images[:, 0].numel()  # pixels

    def pixels():  # (C, B*H*W) a batch
        return (models.exact(x.transpose(0, 1).flatten(1)) for x in _batches(images))
    mean = sum(x.sum(1, keepdim=True) for x in pixels()) / n
    return (sum((x - mean) @ (x - mean).T for x in pixels()) / (n - 1)).float()


def spectrum(images):
    """(H, W//2+1) mean magnitude of the rfft2 of the (mean-removed) images: the data's own 1/f."""
    x = data.to_float(data.check_batch(images))
    x = x - x.mean((0, 2, 3), keepdim=True)
    return torch.fft.rfft2(x, norm="ortho").abs().mean((0, 1))


def magnitude_spectrum(images, color_cov=None):
    """(C, H, W//2+1) mean magnitude of the rfft2 of the images less 0.5, in the decorrelated colour space
    that FourierParam and MaCoParam use (color_sqrt(color_cov)): the data's own spectrum per channel, which
    MaCo keeps fixed. Its DC term [:, 0, 0] is the images' mean distance from mid-gray (times sqrt(H W)), so
    MaCo's images can be brighter, darker or more tinted in proportion to the data's, relative to the
    contrast."""
    images = data.check_batch(images)
    color = color_sqrt(color_cov, images.size(1))
    return sum(torch.fft.rfft2(_decorrelate(color, x - 0.5), norm="ortho").abs().sum(0)
               for x in _batches(images)) / len(images)


def _decorrelate(color, x):
    """x (N, C, H, W) in the decorrelated colour space of the (C, C) colour transform `color`, inverted on the CPU
    in float64 (a (C, C) matrix: no device has less to do, and mps has no float64)."""
    return torch.einsum("dc,nchw->ndhw", torch.linalg.pinv(models.exact(color).cpu()).to(x), x)


def _to_image(mixing, x):
    """Images in [0, 1] from decorrelated x (N, C, H, W): colours correlated by `mixing` (_mixing), then a
    sigmoid. They come out channels_last (the memory format our models run in on a CPU): the colours mix as
    one product over the pixels, k at a time (as many as `mixing` holds and divide the pixels), whose
    backward takes the model's channels_last gradient as it comes. (A bmm over (C, H*W) planes, as before,
    was as fast forward, but its backward on that gradient took about 0.2 ms of a 4-5 ms CPU render step of
    10 images, against 0.1 ms for a (N*H*W, C) x (C, C) product and its copies.)"""
    n, c, h, w = x.shape
    k = math.gcd(n * h * w, len(mixing) // c)  # the leading k x k blocks of `mixing` are k copies too
    mixed = x.permute(0, 2, 3, 1).reshape(-1, k * c) @ mixing[:k * c, :k * c]  # (N*H*W / k, k*C)
    return torch.sigmoid(mixed).view(n, h, w, c).permute(0, 3, 1, 2)


def _cached(maxsize=16):
    """functools.lru_cache for a function that makes small constant tensors once per device (and size): they
    are made outside inference mode, whatever the first caller's, since an inference tensor cached by a call
    under torch.inference_mode could never be saved for the backward of a later render."""
    def wrap(fn):
        return functools.lru_cache(maxsize=maxsize)(torch.inference_mode(False)(fn))
    return wrap


def _irfft2(spec, size):
    """The real images (..., H, W) (ortho) of size (H, W) of one-sided spectra (..., H, W//2+1) that need not be
    the spectra of real images. A real image's is Hermitian in its first column, and in its last for an even
    width: the bins at -ky and ky are conjugates, the DC and Nyquist bins real. A Fourier parameterization's are
    not, and what irfft2 makes of that is the backend's to choose (pytorch/pytorch#154496): a CPU's takes their
    Hermitian part; cuFFT's is undefined. So on any other device the inverse is taken in two steps that make
    the same images: along the height, then along the width, the columns' imaginary parts cleared between
    them (_hermitian_irfft2). On a CPU irfft2 already does it; the two steps would add 0.03-0.08x of a bare step."""
    if spec.device.type == "cpu":
        return torch.fft.irfft2(spec, s=size, norm="ortho")
    return _hermitian_irfft2(spec, size)


def _hermitian_irfft2(spec, size):
    """irfft2 to size (H, W) of the Hermitian part of spectra (..., H, W//2+1), on any backend: after the inverse
    transform along the height, the first column (and the last for an even width) holds each row's DC (and
    Nyquist) bin, which must be real; the imaginary part cleared there is the anti-Hermitian part's."""
    h, w = size
    parts = torch.view_as_real(torch.fft.ifft(spec, n=h, dim=-2, norm="ortho"))  # (..., H, W//2+1, 2)
    parts = parts * _real_where_self_conjugate(w, parts.device, parts.dtype)
    return torch.fft.irfft(torch.view_as_complex(parts), n=w, dim=-1, norm="ortho")


@_cached()
def _real_where_self_conjugate(width, device, dtype):
    """(width//2+1, 2) factors of the (real, imaginary) parts of a one-sided spectrum's columns: 0 for the
    imaginary parts of the self-conjugate columns, 1 elsewhere. Made once per device, before any CUDA graph
    is captured (render's eager warm-up steps make it): no host-to-device copy in a step."""
    keep = torch.ones(width // 2 + 1, 2, dtype=dtype)
    keep[list(_own_mirrors(width)), 1] = 0
    return keep.to(device)


def _own_mirrors(n):
    """The indices of the frequencies, along an axis of n pixels, that are their own mirror image (k = -k mod n):
    0 and, for an even n, n/2. Of a real image's one-sided spectrum (..., H, W//2+1), these columns (of n = W)
    stand for themselves alone, not also for their mirror image, and these rows (of n = H) mirror onto
    themselves."""
    return (0, n // 2) if n % 2 == 0 else (0,)


def _register_color(module, color):
    """Give a Fourier parameterization its (C, C) colour transform `color` (saved in its state_dict) and
    _to_image's `mixing`, made from it (not saved): made anew when load_state_dict loads another `color`."""
    module.register_buffer("color", color)
    module.register_buffer("mixing", _mixing(color), persistent=False)
    module.register_load_state_dict_post_hook(_remix)


def _remix(module, incompatible_keys):
    module.mixing = _mixing(module.color)


def _mixing(color):
    """(4C, 4C): 4 copies of color.T (C, C) on the diagonal (one for one channel), with which _to_image mixes
    the colours of 4 pixels a row (fewer where 4 do not divide the pixels). The same numbers, in a shape a
    CPU's BLAS runs faster: (N*H*W, 3) x (3, 3) is a long, thin product, and 4 pixels a row took its forward
    and backward from about 250 to 90 us on 10 images of 32 x 32 (15 to 2.2 ms on 512). Made from the
    colour transform as it is built or loaded (_register_color)."""
    return torch.block_diag(*[color.T] * (4 if len(color) > 1 else 1))


def _sqrt_psd(cov):
    """Symmetric square root of a positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh(models.exact(cov))
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _logit(x, eps=1e-3):
    return torch.logit(x.clamp(eps, 1 - eps))


# ----------------------------------------------------------------------------- parameterizations
# Each is an nn.Module built as Cls(n, channels, size, ...), size a side or (height, width) (models.image_shape),
# whose forward() returns (n, channels, height, width) images in [0, 1] (the Fourier ones channels_last:
# `_to_image`; .reshape, not .view, or .contiguous()).
# render() builds them from a Recipe (`parameterization(kind, **options)`).

class PixelParam(nn.Module):
    """Free pixels through a sigmoid."""

    def __init__(self, n, channels, size, sd=0.01, generator=None, init=None):
        super().__init__()
        x = sd * torch.randn(n, channels, *models.image_shape(size), generator=generator)
        if init is not None:
            x = _logit(data.to_float(init, "init").cpu())
        self.logits = nn.Parameter(x)  # (N, C, H, W)

    def forward(self):
        return torch.sigmoid(self.logits)


def fourier_scale(size, decay=1.0, spectrum=None):
    """(H, W//2+1) per-frequency scale for images of size (H, W) (or a side: models.image_shape): 1/f^decay (f
    floored at 1/max(H, W), the lowest frequency) or a measured spectrum, RMS 1."""
    h, w = models.image_shape(size)
    if spectrum is None:
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        scale = (fy ** 2 + fx ** 2).sqrt().clamp_min(1 / max(h, w)) ** -decay
    else:
        if tuple(spectrum.shape) != (h, w // 2 + 1):
            raise ValueError(f"spectrum must be ({h}, {w // 2 + 1}) for {h}x{w} images, as "
                             f"spectrum(images) of such images returns; got {tuple(spectrum.shape)}")
        scale = spectrum.float().cpu()  # made on the CPU, whatever the spectrum's device; the module moves it
        if not (torch.isfinite(scale).all() and scale.min() >= 0 and scale.max() > 0):
            raise ValueError("spectrum must be finite, >= 0 and not all 0, as spectrum(images) returns for images "
                             "that are not each one flat colour")
        scale = scale.clamp_min(scale.max() * 1e-3)
    return scale / scale.pow(2).mean().sqrt()


def color_sqrt(color_cov, channels):
    """(C, C) colour transform: symmetric sqrt of the covariance, spectral norm 1 (identity if None)."""
    if color_cov is None:
        return torch.eye(channels)
    color_cov = torch.as_tensor(color_cov).cpu()  # as fourier_scale: the module moves its buffers
    if color_cov.shape != (channels, channels) or not torch.isfinite(color_cov).all():
        raise ValueError(f"color_cov must be a finite ({channels}, {channels}) covariance, as color_covariance(images) "
                         f"returns; got shape {tuple(color_cov.shape)}"
                         f"{'' if torch.isfinite(color_cov).all() else ' with NaN or inf'}")
    if channels == 1:
        return torch.eye(1)  # one channel has no colours to correlate
    root = _sqrt_psd(color_cov)
    norm = torch.linalg.matrix_norm(root, 2)
    if not norm > 0:
        raise ValueError("color_cov is all zero (images with no colour variation, such as one flat gray): there "
                         "are no colours to decorrelate; pass color_cov=None, or the covariance of real images")
    return (root / norm).float()


class FourierParam(nn.Module):
    """Real-FFT coefficients scaled per frequency (whitened steps), colour-decorrelated, sigmoid.

    shared: every image's coefficients are its own plus one set common to the whole batch (`common`, starting at 0),
    which the gradients of all the images move: the images keep one layout (Lucid's aligned interpolation).
    """
    shifts_in_spectrum = True  # forward(shift=...) takes a Shift's phase ramps (render() hands them over)

    def __init__(self, n, channels, size, color_cov=None, decay=1.0, spectrum=None, sd=0.01, generator=None,
                 init=None, shared=False):
        super().__init__()
        self.size = h, w = models.image_shape(size)
        self.register_buffer("scale", fourier_scale(self.size, decay, spectrum))  # (H, W//2+1)
        _register_color(self, color_sqrt(color_cov, channels))
        shape = (n, channels, h, w // 2 + 1, 2)
        self.coeffs = nn.Parameter(sd * torch.randn(shape, generator=generator))
        self.common = nn.Parameter(torch.zeros(1, *shape[1:])) if shared else None  # the same draws as without
        if init is not None:
            self.set_images(init)

    def forward(self, shift=None):
        """The images; shift: (N, 1, H, W//2+1) phase ramps (Shift.phase) that translate them, or None."""
        factor = self.scale if shift is None else _polar(self.scale, shift)  # scale x exp(i shift)
        coeffs = self.coeffs if self.common is None else self.coeffs + self.common
        spec = torch.view_as_complex(coeffs) * factor                       # (N, C, H, W//2+1)
        return _to_image(self.mixing, _irfft2(spec, self.size))  # from (N, C, H, W)

    @torch.no_grad()
    def set_images(self, images):
        """Set the coefficients so that forward() returns `images` (N, C, H, W) in [0, 1] (the common ones to 0)."""
        x = _logit(data.to_float(images, "init").to(self.coeffs.device))
        x = _decorrelate(self.color, x)
        spec = torch.fft.rfft2(x, norm="ortho") / self.scale
        self.coeffs.copy_(torch.view_as_real(spec))
        if self.common is not None:
            self.common.zero_()


def _rms(magnitude, size):
    """RMS over (C, H, W) of the image of size (H, W) whose ortho rfft2 has this magnitude, for any phases
    (Parseval): every column but the first (and, for an even width, the last) stands for itself and its
    conjugate."""
    h, w = size
    weight = torch.full((magnitude.shape[-1],), 2.0)
    weight[list(_own_mirrors(w))] = 1.0
    return ((magnitude ** 2 * weight).sum() / (magnitude.shape[0] * h * w)).sqrt()


def _one_sided(magnitude, size):
    """The magnitude (..., H, W//2+1) of images of size (H, W) with each mirror pair (-ky, ky) of the
    self-conjugate columns held once: at ky (the upper half) twice over, at -ky 0, the real bins as they are.
    The inverse keeps a column's Hermitian part, (X(ky) + conj X(-ky)) / 2: from two free phases that is
    m |cos((a + b) / 2)|, anywhere in [0, m] (half the power on average, along the height only); from these, m
    with ky's phase, as a real image has it."""
    h, w = size
    out = magnitude.clone()
    columns = list(_own_mirrors(w))
    out[..., 1:(h + 1) // 2, columns] *= 2
    out[..., h // 2 + 1:, columns] = 0
    return out


def _real_bins(size):
    """(H, W//2+1) bool: the bins of the rfft2 of a real image of size (H, W) that are real, their own
    conjugates: the DC term and, for an even side, the Nyquist ones (the rows and columns of _own_mirrors)."""
    h, w = size
    real = torch.zeros(h, w // 2 + 1, dtype=torch.bool)
    real[[[r] for r in _own_mirrors(h)], list(_own_mirrors(w))] = True
    return real


def _polar(magnitude, phase):
    """torch.polar(magnitude, phase) in plain real ops, where no gradient is needed (the shift's phase factor).
    Which is faster depends on the machine: on Fourier's (10, 1, 32, 17) shift ramps 34-42 against 48-51 us
    for torch.polar on one CPU, 73-84 against 25-34 us on another (each timed alone)."""
    return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))


class _Polar(torch.autograd.Function):
    """_polar(magnitude, phase) for a constant magnitude, with the phase's gradient in closed form,
    d(m e^(i phase)) / d phase = i m e^(i phase): a one-line backward, where autograd through torch.polar
    cost about 0.3 ms forward and backward on a CPU render step of maco's 10 images."""

    @staticmethod
    def forward(ctx, magnitude, phase):
        spec = _polar(magnitude, phase)
        ctx.save_for_backward(spec)
        return spec

    @staticmethod
    def backward(ctx, grad):
        spec, = ctx.saved_tensors
        return None, (spec.conj() * grad).imag


class MaCoParam(nn.Module):
    """MaCo (Fel et al. 2023): only the Fourier phase is optimized; the magnitude spectrum stays the
    data's own (magnitude_spectrum(train images)), so every image has natural-image frequency content.
    The magnitude is scaled once so that every image's RMS about its mean is `contrast`, whatever its phases
    (Parseval: no per-image standardization needed; up to the few real bins, whose phase sets their share), and
    the mirror pairs of the first column (and of the last, at even sizes) are held once (_one_sided), so that
    each bin, these too, keeps its magnitude. The DC term's phase sets the image's mean, between plus and minus
    the data's mean distance from mid-gray (magnitude_spectrum), scaled as the rest of the spectrum. Then the
    colours are correlated as in FourierParam, and a sigmoid."""

    shifts_in_spectrum = True  # as FourierParam

    def __init__(self, n, channels, size, magnitude=None, color_cov=None, contrast=1.0, generator=None, init=None):
        super().__init__()
        self.size = h, w = models.image_shape(size)
        shape = (channels, h, w // 2 + 1)
        if magnitude is None:
            raise ValueError("MaCo needs the data's magnitude spectrum: parameterization('maco', "
                             "magnitude=magnitude_spectrum(train_images, color_cov), color_cov=color_cov)")
        magnitude = torch.as_tensor(magnitude).float().cpu()
        if tuple(magnitude.shape) != shape:
            raise ValueError(f"magnitude must be {shape} for {channels}-channel {h}x{w} images, as "
                             f"magnitude_spectrum(images) returns; got {tuple(magnitude.shape)}")
        varying = magnitude.clone()
        varying[:, 0, 0] = 0  # the DC term is the images' mean: `contrast` is their RMS about it
        spread = _rms(varying, self.size)
        if not ((magnitude >= 0).all() and spread > 1e-6 * magnitude.max()):  # NaN and inf fail one or the other
            raise ValueError("magnitude must be finite, >= 0 and not all 0 beyond its DC term [:, 0, 0], as "
                             "magnitude_spectrum(images) returns for images that are not each one flat colour")
        self.register_buffer("magnitude", _one_sided(magnitude * (contrast / spread), self.size))  # (C, H, W//2+1)
        _register_color(self, color_sqrt(color_cov, channels))
        phase = (2 * torch.rand((n, *shape), generator=generator) - 1) * math.pi
        self.phase = nn.Parameter(phase)                                # (N, C, H, W//2+1)
        if init is not None:
            self.set_images(init)

    def forward(self, shift=None):
        """The images; shift: (N, 1, H, W//2+1) phase ramps (Shift.phase) that translate them, or None."""
        spec = _Polar.apply(self.magnitude, self.phase if shift is None else self.phase + shift)
        x = _irfft2(spec, self.size)  # (N, C, H, W), RMS about its mean: contrast
        return _to_image(self.mixing, x)

    @torch.no_grad()
    def set_images(self, images):
        """Set the phases to those of `images` (N, C, H, W) in [0, 1] (their magnitude is not kept; their mean
        is, as far as the DC term reaches)."""
        x = _logit(data.to_float(images, "init").to(self.phase.device))
        spec = torch.fft.rfft2(_decorrelate(self.color, x), norm="ortho")
        self.phase.copy_(spec.angle())
        # a real bin, m cos phase (the DC term: the images' mean), takes the images' value as far as m reaches;
        # its phase is kept off 0 and pi, where the gradient of cos vanishes and Adam could not move it
        real = _real_bins(self.size)
        ratio = spec.real[..., real] / self.magnitude[:, real].clamp_min(1e-12)
        self.phase[..., real] = ratio.clamp(-0.999, 0.999).acos()


def _check_vae_fits(vae, channels, size):
    """The latent techniques draw the VAE's images: it must make the model's channels and size."""
    if vae is None:
        raise ValueError("a latent parameterization needs a VAE: parameterization('latent', vae=vae) with a trained "
                         "models.VAE")
    h, w = models.image_shape(size)
    if (vae.config["in_channels"], vae.image_size, vae.image_size) != (channels, h, w):
        raise ValueError(f"the VAE makes {vae.config['in_channels']}-channel {vae.image_size}x{vae.image_size} "
                         f"images and the model takes {channels}-channel {h}x{w} ones: the latent techniques need a "
                         f"VAE trained on images of the model's size and channels (or use 'pixel' or 'fourier')")


def _encode(vae, init):
    """Encoder means (N, D) of init images, in float32 (as the latent parameterizations keep z)."""
    with torch.no_grad():
        return vae.encode(data.to_float(init, "init"))[0].float()  # encode moves them to the VAE's device


class LatentParam(nn.Module):
    """z through the VAE decoder; z projected back into [latent_lo, latent_hi] after every step. z and the
    latent statistics are float32 whatever the VAE's dtype (a half VAE decodes z cast to its own)."""

    def __init__(self, n, channels, size, vae=None, sd=1.0, generator=None, init=None):
        super().__init__()
        _check_vae_fits(vae, channels, size)
        object.__setattr__(self, "vae", vae)  # not a submodule: its weights are not ours to optimize
        self.dtype = models.dtype_of(vae)
        mean, std = vae.latent_mean.float(), vae.latent_cov.diagonal().sqrt().float()
        z = mean + sd * std * torch.randn(n, vae.latent_dim, generator=generator).to(mean.device)
        if init is not None:
            z = _encode(vae, init)
        self.register_buffer("lo", vae.latent_lo.clone().float())
        self.register_buffer("hi", vae.latent_hi.clone().float())
        self.z = nn.Parameter(torch.maximum(torch.minimum(z, self.hi), self.lo))  # (N, D)

    def forward(self):  # float32 images from a half VAE too: the transforms take them (rfft2 takes no bfloat16)
        return self.vae.decode(self.z.to(self.dtype)).float()

    def penalty(self):
        """(N,) ||z||^2 / D: the N(0, I) prior's negative log density, times 2 / D, up to a constant (a pull
        towards 0)."""
        return self.z.pow(2).mean(1)

    @torch.no_grad()
    def project(self):
        self.z.copy_(torch.maximum(torch.minimum(self.z, self.hi), self.lo))


class WhitenedLatentParam(nn.Module):
    """z = latent_mean + L u, with L L^T = latent_cov: steps in u are whitened for the data's latents; u projected
    back so that z stays in [latent_lo, latent_hi] after every step. u and the statistics are float32, as in
    LatentParam."""

    def __init__(self, n, channels, size, vae=None, sd=1.0, jitter=1e-4, generator=None, init=None):
        super().__init__()
        _check_vae_fits(vae, channels, size)
        object.__setattr__(self, "vae", vae)  # not a submodule (see LatentParam)
        self.dtype = models.dtype_of(vae)
        self.register_buffer("mean", vae.latent_mean.clone().float())
        self.register_buffer("chol", vae.latent_cholesky(jitter).float())  # (D, D) lower triangular
        self.register_buffer("lo", vae.latent_lo.clone().float())
        self.register_buffer("hi", vae.latent_hi.clone().float())
        u = sd * torch.randn(n, vae.latent_dim, generator=generator).to(self.mean.device)
        if init is not None:
            z = _encode(vae, init)
            u = torch.linalg.solve_triangular(self.chol, (z - self.mean).T, upper=False).T
        self.u = nn.Parameter(u)  # (N, D)
        self.project()  # the start inside the box too, as LatentParam's: the first step's penalty is of a z drawn

    def latent(self):
        """(N, D) z before clipping."""
        return self.mean + self.u @ self.chol.T

    def forward(self):
        z = self.latent()
        return self.vae.decode(torch.maximum(torch.minimum(z, self.hi), self.lo).to(self.dtype)).float()

    def penalty(self):
        """(N,) ||u||^2 / D: the squared Mahalanobis distance of z from the mean of the data's latents, under the
        Gaussian fitted to them, over D (a pull towards latent_mean, where `latent`'s pulls towards 0)."""
        return self.u.pow(2).mean(1)

    @torch.no_grad()
    def project(self):
        """u moved to the z it decodes, z clipped into [lo, hi] (after every step, as LatentParam's): a
        coordinate past a bound, where its gradient is 0, would otherwise drift on unchecked, to be walked back
        before it could move again, and the penalty would measure a z never drawn."""
        clipped = torch.maximum(torch.minimum(self.latent(), self.hi), self.lo)
        self.u.copy_(torch.linalg.solve_triangular(self.chol, (clipped - self.mean).T, upper=False).T)


PARAMS = dict(pixel=PixelParam, fourier=FourierParam, maco=MaCoParam, latent=LatentParam,
              whitened=WhitenedLatentParam)
_BUILT_BY_RENDER = ("n", "channels", "size", "generator")  # what render() passes, not an option


@dataclass(frozen=True)
class Recipe:
    """A parameterization before render() knows how many images of what size: its class and options."""
    cls: type
    options: dict
    pool: int = 0  # > 0: start each image from the best of this many random draws for its target

    def __call__(self, n, channels, size, generator=None, per_target=1):
        """The module for n images, per_target of them for each target in a row (images_per_target x restarts)."""
        init = self.options.get("init")
        if not isinstance(init, torch.Tensor):  # no init (or one of another type, which the class names)
            return self.cls(n, channels, size, generator=generator, **self.options)
        targets, image = n // per_target, (channels, *models.image_shape(size))
        if init.dim() != 4 or tuple(init.shape[1:]) != image or len(init) not in (1, targets, n):
            raise ValueError(f"init images must be {(n, *image)}, {(targets, *image)} "
                             f"(one per target) or {(1, *image)} (one for all) at the model's size; "
                             f"got {tuple(init.shape)}")
        # one image for all, or each target's for its images_per_target x restarts images
        init = init.expand(n, -1, -1, -1) if len(init) == 1 else init.repeat_interleave(n // len(init), 0)
        return self.cls(n, channels, size, generator=generator, **{**self.options, "init": init})

    def starting_from(self, images):
        """The same recipe, its images initialized to `images` (N, C, H, W) instead of random draws."""
        return Recipe(self.cls, {**self.options, "init": images})

    def with_options(self, **options):
        """The same recipe with these options added or changed, checked as parameterization() checks them:
        `TECHNIQUES["fourier"].settings["param"].with_options(shared=True)`."""
        kind = next((name for name, cls in PARAMS.items() if cls is self.cls), None)
        if kind is None:
            raise TypeError(f"with_options takes a recipe of parameterization(...), of {', '.join(PARAMS)}; this one "
                            f"builds {self.cls.__name__}")
        return parameterization(kind, self.pool, **{**self.options, **options})


def parameterization(kind, pool=0, **options):
    """A recipe for render(param=...): 'pixel', 'fourier', 'maco', 'latent' or 'whitened' with its own
    options (fourier: color_cov, decay, spectrum, sd; maco: magnitude, color_cov, contrast; latent and
    whitened: vae, sd; whitened: jitter, added to the latent covariance before its Cholesky factor; every
    kind: init images, one for all targets, one per target or one per image; fourier: shared=True, one part of
    the spectrum common to every image, FourierParam's).

    pool: draw this many random initializations and start each image from the best ones for its target
    (one forward pass; useful for the latent parameterizations, whose draws differ).
    """
    if kind not in PARAMS:
        raise ValueError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMS)}")
    valid = [p for p in inspect.signature(PARAMS[kind]).parameters if p not in _BUILT_BY_RENDER]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for parameterization {kind!r}; valid: {', '.join(valid)}, pool")
    if "vae" in valid and options.get("vae") is None:
        raise ValueError(f"parameterization {kind!r} needs a VAE: parameterization({kind!r}, vae=vae) with a trained "
                         f"models.VAE")
    if kind == "maco" and options.get("magnitude") is None:
        raise ValueError("parameterization 'maco' needs the data's magnitude spectrum: parameterization('maco', "
                         "magnitude=magnitude_spectrum(train_images, color_cov), color_cov=color_cov)")
    data.check_count("pool", pool, 0)
    if pool and options.get("init") is not None:
        raise ValueError("pool draws random starts and init gives the starts: pass one of them, not both")
    if pool and options.get("shared") is True:  # any other value is refused by name below
        raise ValueError("pool keeps each image's best draws, and shared=True adds one part common to them all: "
                         "pass one of them, not both")
    _check_options(options)
    return Recipe(PARAMS[kind], options, pool)


def _check_options(options):
    """The options that need no image size, checked when the recipe is made (a two-stage technique then
    fails before its first stage, not after it): the VAE, the colour covariance and the numbers."""
    if "vae" in options and not isinstance(options["vae"], models.VAE):
        raise TypeError(f"vae must be a models.VAE (trained, as VAE.ipynb makes), got {type(options['vae']).__name__}")
    cov = options.get("color_cov")
    if cov is not None:
        cov = torch.as_tensor(cov)
        color_sqrt(cov, len(cov) if cov.dim() else 0)  # square and finite; its channels are checked by render()
    if not isinstance(options.get("shared", False), bool):
        raise TypeError(f"shared must be True or False, got {options['shared']!r}")
    for name, low, inclusive in (("decay", 0, True), ("sd", 0, True), ("contrast", 0, False), ("jitter", 0, True)):
        if name in options:
            data.check_real(name, options[name], low, inclusive)


# ----------------------------------------------------------------------------- transforms
# Each transform is t(x, gen) -> x on a batch (N, C, H, W), drawing one random value per image. Amounts
# are fractions of the image side (of each side its own), so one transform serves 28, 32 and 64 px alike, and
# images that are not square.

def jitter(fraction):
    """Shift each image by its own integer offset of up to fraction x its shorter side (at least 1 px),
    reflecting at the border; same size."""
    data.check_real("jitter's fraction (of the image side)", fraction, 0)

    def t(x, gen):
        px = max(1, round(fraction * min(x.shape[-2:])))
        if px >= min(x.shape[-2:]):
            raise ValueError(f"jitter({fraction}) shifts by up to {px} px, not less than the image's shorter side "
                             f"{min(x.shape[-2:])}: the fraction must be well below 1 (LIGHT is jitter(1 / 32))")
        dy, dx = torch.randint(-px, px + 1, (2, len(x)), generator=gen, device=x.device)
        return data.shift(x, dy, dx)
    return t


class Shift:
    """Per image, a random sub-pixel shift of up to `fraction` x each side along it, circular (what
    leaves one edge comes back at the other) and band-limited: a phase ramp on the spectrum of the images'
    logits, so they stay in (0, 1). The Fourier parameterizations make their images from such a spectrum:
    render() hands them the ramp (param(shift=...)), and the shift costs them no resampling and no FFT of
    their own; on any other images it costs an rfft2 and an irfft2 (saturated pixels clipped at the
    logit of 0.001)."""

    def __init__(self, fraction):
        data.check_real("Shift's fraction (of the image side)", fraction, 0)
        self.fraction = fraction

    def phase(self, n, h, w, gen, device):
        """(n, 1, h, w//2+1) phase ramps, in radians, of n random shifts of an h x w image."""
        fy, fx = _ramp_axes(h, w, self.fraction, device)                                   # (h, 1), (1, w//2+1)
        u = torch.empty(2, n, 1, 1, 1, device=device).uniform_(-1, 1, generator=gen)  # (2, n, 1, 1, 1)
        return torch.addcmul(u[0] * fy, u[1], fx)

    def __call__(self, x, gen):
        h, w = x.shape[-2:]
        phase = self.phase(len(x), h, w, gen, x.device)
        spec = torch.fft.rfft2(_logit(x)) * _polar(torch.ones_like(phase), phase)
        return torch.sigmoid(torch.fft.irfft2(spec, s=(h, w)))


@_cached()
def _ramp_axes(h, w, fraction, device):
    """The phase ramp of the largest shift along each axis, -2 pi f d: (h, 1) and (1, w//2+1), made once.
    A Nyquist frequency (even sides) keeps its phase: a real image cannot move it by a fraction of a pixel."""
    fy, fx = torch.fft.fftfreq(h), torch.fft.rfftfreq(w)
    if h % 2 == 0:  # by index: at 82 px fftfreq's -0.5 is -0.5 + 2**-25 (a float32 product), no equality finds it
        fy[h // 2] = 0.0
    if w % 2 == 0:
        fx[-1] = 0.0
    return ((fy * (-2 * math.pi * fraction * h))[:, None].to(device),
            (fx * (-2 * math.pi * fraction * w))[None, :].to(device))


def resample(shift=0.0, scale=(1.0, 1.0), degrees=0.0):
    """Per image, a random shift of up to `shift` x each side along it, a zoom in `scale` and a rotation in
    [-degrees, degrees], applied as ONE bilinear resampling that reflects at the border; same size. The rotation
    is rigid in pixels on images that are not square too (the grid's coordinates span 2 along either side)."""
    data.check_real("resample's shift (a fraction of the image side)", shift, 0)
    data.check_real("degrees", degrees, 0)
    try:
        lo, hi = scale
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a range (low, high) of zoom factors, such as (0.9, 1.1); "
                         f"got {scale!r}") from None
    data.check_real("scale's low", lo, 0, inclusive=False)
    data.check_real("scale's high", hi, lo)
    radians, span = math.radians(degrees), 2 * shift  # grid coordinates span 2 per side
    ranges = ((lo, hi - lo), (-radians, 2 * radians), (-span, 2 * span), (-span, 2 * span))  # (low, width)

    def t(x, gen):
        low, width = _constant(ranges, x.device, x.dtype).unbind(1)                # (4,) each
        u = torch.rand(4, len(x), generator=gen, device=x.device)                  # uniform in [0, 1)
        s, a, tx, ty = torch.addcmul(low[:, None], width[:, None], u)              # (N,) zoom, angle, shifts
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        h, w = x.shape[-2:]
        across, down = (-sin, sin) if h == w else (-sin * (h / w), sin * (w / h))  # pixels of either side alike
        theta = torch.stack([cos, across, tx, down, cos, ty], 1).view(-1, 2, 3)
        grid = affine_grid(theta, h, w)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return t


@_cached(64)
def _constant(values, device, dtype):
    """A small constant tensor, made once per device: no host-to-device copy in a step (or a CUDA graph)."""
    return torch.tensor(values, device=device, dtype=dtype)


def affine_grid(theta, h, w):
    """F.affine_grid(theta, (N, C, h, w), align_corners=False) for theta (N, 2, 3), as one matmul of the
    rows of theta with the cached pixel-centre coordinates, viewed (not copied) as (N, h, w, 2): on a
    CPU render step about 35 us faster than a batched matmul, and 90 us faster than F.affine_grid."""
    coords = theta.reshape(-1, 3) @ _pixel_grid(h, w, theta.device, theta.dtype)  # (2N, h*w): x', y' per image
    return coords.view(len(theta), 2, h, w).permute(0, 2, 3, 1)


@_cached()
def _pixel_grid(h, w, device, dtype):
    """(3, h*w) homogeneous coordinates (x, y, 1) of the pixel centres, in F.affine_grid's order."""
    grid = F.affine_grid(torch.eye(2, 3, dtype=dtype, device=device)[None], [1, 1, h, w], align_corners=False)
    return torch.cat([grid.view(h * w, 2), torch.ones(h * w, 1, dtype=dtype, device=device)], 1).T.contiguous()


def scale(lo, hi):
    """Random zoom in [lo, hi] per image; same size."""
    return resample(scale=(lo, hi))


def rotate(degrees):
    """Random rotation in [-degrees, degrees] per image; same size."""
    return resample(degrees=degrees)


def compose(*ts):
    """Apply transforms left to right."""
    def t(x, gen):
        for f in ts:
            x = f(x, gen)
        return x
    return t


# at 32 px: shifts of up to 1.5 px, zoom 0.9-1.1, rotation up to 10 degrees, in one resampling (on the
# synthetic set, 6 seeds: transfer 0.59 against 0.54 for 2 px, 0.50 for 3 px, 0.52 for the former pad, jitter, affine, jitter, crop chain)
AFFINE = resample(shift=1.5 / 32, scale=(0.9, 1.1), degrees=10)
# render()'s default: sub-pixel shifts of up to 1.5 px at 32 px, inside the spectrum of fourier and maco. On
# CIFAR-10 (4 seeds, maco before it kept the DC term) as natural as AFFINE or more for them (naturalness 2.01
# against 2.17, maco 1.25 against 1.22, each SD 0.03-0.07), at the same path check, at a fraction of its cost;
# pixel+reg keeps AFFINE (README)
STANDARD = Shift(1.5 / 32)
LIGHT = jitter(1 / 32)  # 1 px at 32 px


# ----------------------------------------------------------------------------- targets
# A target names what to maximize. Targets of one kind and layer evaluate together: `columns`
# compiles them once into a function act (B, ...) -> (B, T_g), so a step has no loop over targets, and
# `own` into act (B, ...) -> (B,), row b's activation of the b-th target alone (a render step's: each
# image's own target, without the others' columns and a pick among them).

def _mean_spatial(a):
    return a.flatten(2).mean(2) if a.dim() > 2 else a  # (B, C)


def _plain_indices(t):
    """A target's indices as Python ints where given as NumPy or 0-d tensor integers (Channel(layer, a.argmax())),
    so that targets stay hashable and compare equal; any other value is left for check() to name."""
    for f in fields_of(t):
        object.__setattr__(t, f.name, _as_index(getattr(t, f.name)))  # frozen dataclasses


class _Sums:
    """Targets add, subtract and scale into a Sum, as Lucent's objectives do: Channel("block2.act2", 3) +
    0.5 * Channel("block3.act2", 1) - Class(5)."""

    def __add__(self, other):
        return Sum(((1.0, self), (1.0, other)))

    def __radd__(self, other):
        if _is_int(other) and other == 0:  # sum(targets) starts from 0
            return self
        return Sum(((1.0, other), (1.0, self)))

    def __sub__(self, other):
        return Sum(((1.0, self), (-1.0, other)))

    def __rsub__(self, other):
        return Sum(((1.0, other), (-1.0, self)))

    def __neg__(self):
        return Sum(((-1.0, self),))

    def __mul__(self, weight):
        return Sum(((weight, self),))

    __rmul__ = __mul__

    def __truediv__(self, divisor):
        if _weight(divisor) == 0:
            raise ZeroDivisionError(f"{self} divided by 0: a target's weight in a Sum must be finite")
        return Sum(((1.0 / _weight(divisor), self),))


@dataclass(frozen=True)
class Class(_Sums):
    """Class logit (or log-softmax) of the model's output."""
    idx: int
    log_prob: bool = False
    layer = None  # the model output

    __post_init__ = _plain_indices

    def __str__(self):  # for titles; repr() stays the constructor call
        return f"class {self.idx}{' log-probability' if self.log_prob else ''}"

    @property
    def group(self):  # what the classes compiled together share: logits or log-probabilities
        return self.log_prob

    def check(self, shape):
        _check_int(self, "idx", self.idx)
        if not isinstance(self.log_prob, bool):
            raise TypeError(f"Class log_prob must be True or False, got {self.log_prob!r}")
        if not 0 <= self.idx < shape[0]:
            raise ValueError(f"class {self.idx} out of range: the model has {shape[0]} classes")

    @staticmethod
    def columns(targets, shape, device):
        idx, scores = torch.tensor([t.idx for t in targets], device=device), Class._scores(targets)
        return lambda out: scores(out)[:, idx]

    @staticmethod
    def own(targets, shape, device):
        idx, scores = torch.tensor([[t.idx] for t in targets], device=device), Class._scores(targets)  # (B, 1)
        return lambda out: scores(out).gather(1, idx)[:, 0]

    @staticmethod
    def _scores(targets):
        """out -> what a group of class targets reads: the logits, or their log-softmax."""
        return (lambda out: out.log_softmax(1)) if targets[0].log_prob else (lambda out: out)


def _is_int(value):
    """An integer (a Python or NumPy int, not a bool, a float or a tuple)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(t, name, value):
    """A clear error for a target's index or position that is not an int (a float, a tuple, ...)."""
    if not _is_int(value):
        signature = ", ".join(f.name for f in fields_of(t))
        raise TypeError(f"{type(t).__name__} {name} must be an int, got {value!r} ({type(t).__name__}({signature}))")


def _check_channel(t, shape):
    _check_int(t, "channel", t.channel)
    if not 0 <= t.channel < shape[0]:
        raise ValueError(f"channel {t.channel} out of range: layer {t.layer!r} has {shape[0]} channels")


@dataclass(frozen=True)
class Channel(_Sums):
    """Mean activation of one channel of a named layer."""
    layer: str
    channel: int

    __post_init__ = _plain_indices

    def __str__(self):
        return f"{self.layer} channel {self.channel}"

    def check(self, shape):
        _check_channel(self, shape)

    @staticmethod
    def columns(targets, shape, device):
        idx = torch.tensor([t.channel for t in targets], device=device)
        return lambda a: _mean_spatial(a)[:, idx]

    @staticmethod
    def own(targets, shape, device):
        idx = torch.tensor([[t.channel] for t in targets], device=device)  # (B, 1)
        return lambda a: _mean_spatial(a).gather(1, idx)[:, 0]


@dataclass(frozen=True)
class Neuron(_Sums):
    """One channel at one spatial position (default: the center) of a named layer: y (the row) first, as the
    map is indexed, where Lucent's neuron(layer, n, x, y) takes x first."""
    layer: str
    channel: int
    y: int = None
    x: int = None

    __post_init__ = _plain_indices

    def __str__(self):
        at = "the center" if self.y is None and self.x is None else f"y={self.y}, x={self.x}"
        return f"{self.layer} channel {self.channel} at {at}"

    def position(self, shape):
        h, w = shape[1:] if len(shape) == 3 else (1, 1)
        return (h // 2 if self.y is None else self.y), (w // 2 if self.x is None else self.x)

    def check(self, shape):
        if len(shape) == 2:
            raise ValueError(f"a Neuron sits at a position of a map (C, H, W); layer {self.layer!r} gives tokens "
                             f"{tuple(shape)} (features, tokens): use Channel({self.layer!r}, {self.channel}), "
                             f"their mean over the tokens")
        _check_channel(self, shape)
        for name, value in (("y", self.y), ("x", self.x)):
            if value is not None:  # None: the centre
                _check_int(self, name, value)
        h, w = shape[1:] if len(shape) == 3 else (1, 1)
        y, x = self.position(shape)
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"neuron position (y={y}, x={x}) out of range: layer {self.layer!r} is "
                             f"{h}x{w} (y in 0..{h - 1}, x in 0..{w - 1})")

    @staticmethod
    def columns(targets, shape, device):
        c, y, x = Neuron._where(targets, shape, device)
        return lambda a: a[:, c, y, x] if a.dim() == 4 else a[:, c]

    @staticmethod
    def own(targets, shape, device):
        rows, (c, y, x) = torch.arange(len(targets), device=device), Neuron._where(targets, shape, device)
        return lambda a: a[rows, c, y, x] if a.dim() == 4 else a[rows, c]

    @staticmethod
    def _where(targets, shape, device):
        """(channels, ys, xs) of the targets, each (T,)."""
        return torch.tensor([(t.channel, *t.position(shape)) for t in targets], device=device).T


@dataclass(frozen=True, eq=False)
class Direction(_Sums):
    """Dot product of a layer's activation with a vector. A vector (C,) weighs the channels' means over positions
    (Lucid's `direction`); one of the layer's whole shape (C, H, W) weighs each position's channels, averaged over
    the positions, as an image's own map does (feature inversion: `inversion_targets`). Layer None: the logits, a
    weighted sum of classes. cossim_pow > 0 multiplies the product by the cosine of the two (the vector and the
    mean activation, or the whole map), floored at 0.1, to that power: it asks for the vector's pattern, not only
    for more of it (Lucid's floor and power; Lucid takes the cosine at each position, and Lucent's `direction` is
    that cosine alone)."""
    layer: str
    vector: torch.Tensor
    cossim_pow: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "cossim_pow", _cossim_pow(self.cossim_pow))  # frozen

    def __str__(self):
        where = "the logits" if self.layer is None else self.layer
        whole = isinstance(self.vector, torch.Tensor) and self.vector.dim() > 1
        cosine = f", cosine^{self.cossim_pow:g}" if self.cossim_pow else ""
        return f"a {'map' if whole else 'direction'} in {where}{cosine}"

    @property
    def group(self):  # what the directions compiled together share: their vectors' shape, (C,) or a whole map's
        return self.vector.dim() if isinstance(self.vector, torch.Tensor) else None

    def check(self, shape):
        each, many, where = (("class", "classes", "the model's output") if self.layer is None else
                             ("channel", "channels", f"layer {self.layer!r}"))
        whole = f" or its whole shape {shape}" if len(shape) > 1 else ""
        if not isinstance(self.vector, torch.Tensor) or not torch.isfinite(self.vector).all():
            raise ValueError(f"direction vector must be a finite tensor ({shape[0]},){whole}, one weight per {each} of "
                             f"{where}; got {self.vector!r:.60}")
        if self.vector.shape not in ((shape[0],), shape):
            raise ValueError(f"direction has shape {tuple(self.vector.shape)}; {where} has {shape[0]} {many}: give "
                             f"one weight per {each}, ({shape[0]},){whole}")
        if not self.vector.any():
            raise ValueError(f"direction vector is 0 everywhere: every image's product with it is 0, which no image "
                             f"could raise (a map of {where} that is all 0: a dead layer for that image?)")

    @staticmethod
    def columns(targets, shape, device):
        v, norms, cossim_pow, along = Direction._compiled(targets, shape, device)  # (T, D), (T,)

        def read(a):  # (B, T)
            u = along(a)
            dots = u @ v.T
            return dots if cossim_pow is None else _cossim_weighted(dots, u.norm(dim=1)[:, None] * norms, cossim_pow)
        return read

    @staticmethod
    def own(targets, shape, device):
        v, norms, cossim_pow, along = Direction._compiled(targets, shape, device)  # (B, D): each image's own

        def read(a):  # (B,)
            u = along(a)
            dots = (u * v).sum(1)
            return dots if cossim_pow is None else _cossim_weighted(dots, u.norm(dim=1) * norms, cossim_pow)
        return read

    @staticmethod
    def _compiled(targets, shape, device):
        """(vectors (T, D), their norms (T,), their cossim_pow (T,) or None where all are 0, a -> (B, D) what they
        are compared with): the mean over positions, or the whole map, the vectors then scaled by 1 / positions
        so that the product is the mean over positions of each one's (the vectors of a group are all of one
        shape)."""
        v = torch.stack([t.vector.detach().to(device, torch.float32).flatten() for t in targets])  # a constant
        cossim_pow = torch.tensor([t.cossim_pow for t in targets], device=device)
        whole = targets[0].vector.dim() > 1
        if whole:
            v = v / math.prod(shape[1:])
        along = (lambda a: a.flatten(1).float()) if whole else (lambda a: _mean_spatial(a).float())  # any dtype
        return v, v.norm(dim=1), (cossim_pow if cossim_pow.any() else None), along


def _plain_number(value):
    """A Python number from a NumPy or 0-d tensor one; anything else as it is, for its caller to check."""
    return value.item() if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0 else value


def _cossim_pow(value):
    """A Direction's cossim_pow as a float: a finite number >= 0 (a NumPy one or a 0-d tensor too)."""
    value = _plain_number(value)
    data.check_real("Direction cossim_pow", value, 0)
    return float(value)


def _cossim_weighted(dot, norms, cossim_pow):
    """dot x max(0.1, cosine)^cossim_pow, the cosine dot / norms (0 where a norm is 0)."""
    return dot * (dot / norms.clamp_min(1e-30)).clamp_min(0.1) ** cossim_pow


@dataclass(frozen=True)
class Sum(_Sums):
    """A weighted sum of targets of any kinds and layers, ((weight, target), ...), as `+`, `-`, `*` and `/` make it:
    Channel("block2.act2", 3) + 0.5 * Channel("block3.act2", 1) - Class(5) (Lucent's objectives added; within
    one layer a Direction weighs its channels in one product). A Sum within a Sum is written out into its terms."""
    terms: tuple

    def __post_init__(self):
        if not isinstance(self.terms, (list, tuple)) or not self.terms:  # a generator, once read, would be gone
            raise TypeError(f"Sum takes a non-empty tuple of (weight, target) pairs; got {self.terms!r:.60}")
        flat = []
        for pair in self.terms:
            weight, target = _check_term(pair)
            flat += [(weight * w, t) for w, t in target.terms] if isinstance(target, Sum) else [(weight, target)]
        object.__setattr__(self, "terms", tuple(flat))

    def __str__(self):
        text = " ".join(f"{'-' if w < 0 else '+'} {'' if abs(w) == 1 else f'{abs(w):g} x '}{t}" for w, t in self.terms)
        return text[2:] if text.startswith("+") else text


def _check_term(pair):
    """(weight, target) of a Sum, checked: a finite real weight and a target (not a class index, which `+ 5`
    would leave in doubt)."""
    try:
        weight, target = pair
    except (TypeError, ValueError):
        raise TypeError(f"a Sum's terms are (weight, target) pairs; got {pair!r:.60}") from None
    weight = _weight(weight)
    if not isinstance(target, TARGETS):
        raise TypeError(f"only targets add up: a Class, Channel, Neuron, Direction or Sum, got {target!r:.60}"
                        f"{' (a class index: write Class(k))' if _is_int(_as_index(target)) else ''}")
    return weight, target


def _weight(value):
    """A Sum's weight as a float: a finite real number (a NumPy one or a 0-d tensor too); an error otherwise."""
    value = _plain_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"a target's weight in a Sum must be a finite number, got {value!r:.60}")
    return float(value)


TARGETS = (Class, Channel, Neuron, Direction, Sum)


def _is_one(value):
    """One target or index (a Class, ..., an int, a 0-d tensor or array; anything not a collection, which
    as_targets then names), not a list, range, generator, dict view, array or tensor of them."""
    if isinstance(value, (str, bytes, dict, set, frozenset)):
        return True  # no ordered collection of targets: a "layer:n" string, or a bad target (a dict: its keys)
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, (torch.Tensor, np.ndarray)):
        return False  # np.ndim would take a generator or a view for one object, and convert a list
    return isinstance(value, TARGETS) or np.ndim(value) == 0


def _as_index(value):
    """A Python int from a NumPy or 0-d tensor integer (an element of an index array or tensor); anything
    else as it is, for its caller to check."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if _is_int(value) or (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
                          and value.dtype != torch.bool):
        return int(value)
    return value


def as_targets(targets):
    """A list of targets from one target, a list, class indices (ints or integer tensors) or channels written as
    Lucent writes them ("block2.act2:3")."""
    if isinstance(targets, (set, frozenset)):
        raise TypeError("targets must be in an order, not a set: the images, and the random draws each starts "
                        "from, follow it; give a list (sorted(...))")
    if _is_one(targets):
        targets = [targets]
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"targets must be a class index, a Class/Channel/Neuron/Direction/Sum, or a list of them; "
                        f"got {targets!r}")
    out = []
    for t in map(_as_index, targets):
        if isinstance(t, str):
            t = _channel_named(t)
        if isinstance(t, bool) or not isinstance(t, TARGETS + (int,)):
            raise TypeError(f"a target must be a class index (int), Class, Channel, Neuron, Direction or Sum, or a "
                            f"channel as 'layer:n'; got {t!r}")
        out.append(Class(t) if isinstance(t, int) else t)
    if not out:
        raise ValueError("no targets given: give a class index, a Class/Channel/Neuron/Direction/Sum, or a non-empty "
                         "list of them")
    return out


def _channel_named(text):
    """Channel(layer, n) from Lucent's string "layer:n"."""
    layer, colon, n = text.rpartition(":")
    if not (colon and layer and n.isdecimal()):
        raise TypeError(f"a target given as a string is a channel, 'layer:n' as Lucent writes it ('block2.act2:3'), "
                        f"and a class its class index (Class(3) or 3); got {text!r}")
    return Channel(layer, int(n))


class Objective:
    """Targets compiled into one function acts -> (B, T), built once per model and target list (and, by
    own(), into one that gives each image its own target's activation alone). A Sum's terms are read as targets
    of their own, whose columns are weighed (`weight`) and summed into the Sum's (`mix`)."""

    def __init__(self, model, targets, extra_layers=(), input_shape=None):
        """input_shape: (C, H, W) of one image, default the model's own (models.input_size)."""
        self.targets, self.device, terms = targets, models.device_of(model), _terms_of(targets)
        self.owner = torch.tensor([j for j, _, _ in terms], device=self.device)  # each term's target
        self.weight = torch.tensor([w for _, w, _ in terms], device=self.device, dtype=torch.float32)
        # the terms' columns summed into the targets' where a target is a Sum (else they are the targets')
        self.mix = _summing(self.owner, len(targets)) if any(isinstance(t, Sum) for t in targets) else None
        self.layers = {t.layer for _, _, t in terms} | set(extra_layers)  # None: the model output
        self.recorder = models.Recorder(model, self.layers)
        if input_shape is None:
            input_shape = (models.input_channels(model), *models.input_size(model))
        self.shape_of = self.shapes(model, input_shape)
        for _, _, t in terms:
            t.check(self.shape_of[t.layer])
        parts = self._compiled([t for _, _, t in terms], "columns")
        self.parts = [(layer, fn) for layer, _, fn in parts]  # (layer, act -> (B, T_g)) per group
        self.inverse = torch.argsort(torch.cat([idx for _, idx, _ in parts]))  # column j of the output = term j

    def _compiled(self, targets, how):
        """[(layer, indices, fn)]: the targets of each kind, layer and `group` (what a kind's targets compiled
        together share: a Class's log_prob, a Direction's vector shape), in order of first appearance, compiled
        together by their kind's `how`, 'columns' or 'own'."""
        groups = {}
        for i, t in enumerate(targets):
            groups.setdefault((type(t), t.layer, getattr(t, "group", None)), []).append(i)
        parts = []
        for idx in groups.values():
            first = targets[idx[0]]
            fn = getattr(type(first), how)([targets[i] for i in idx], self.shape_of[first.layer], self.device)
            parts.append((first.layer, torch.tensor(idx, device=self.device), fn))
        return parts

    @contextmanager
    def hooked(self, layout=None):
        """Yield run(x) -> acts {layer: activation, None: output if needed}; hooks removed on exit. A
        layer's activation is its output as models.Recorder defines it (last call, safe from in-place ops).
        layout: x -> x in the memory format the model runs in (what models.frozen() yields), applied first."""
        with self.recorder.hooked() as run:
            yield run if layout is None else (lambda x: run(layout(x)))

    @torch.no_grad()
    def shapes(self, model, input_shape):
        """Per-sample activation shape of every needed layer, from one dry run on a (C, H, W) input (which
        also teaches the recorder how the model runs)."""
        x = torch.zeros(1, *input_shape, device=self.device)
        with self.hooked() as run:  # its first pass names images the model refuses (models.probing)
            acts = run(x)
        return {name: tuple(acts[name].shape[1:]) for name in self.layers}

    def __call__(self, acts):
        out = self._columns(acts)
        return out if self.mix is None else self.mix(out * self.weight)  # (B, T)

    def _columns(self, acts):
        """(B, terms): each term's activation (the targets', where none is a Sum)."""
        cols = [f(acts[layer]).float() for layer, f in self.parts]  # T_g columns per group (a half model's too)
        return cols[0] if len(cols) == 1 else torch.cat(cols, 1)[:, self.inverse]  # one group: in order already

    def own(self, groups):
        """f(acts) -> (N,): image n's activation of target groups[n] alone, the same as
        self(acts)[arange(N), groups] without the other targets' columns (on a CPU render step of 10
        classes about 1% of the step less, near the lockstep's run-to-run spread). Where a target is a Sum,
        each image's terms are picked from all the terms' columns (a column costs less than an image's map
        copied for each of its terms) and summed."""
        if self.mix is None:
            return self._own([self.targets[g] for g in groups.tolist()])
        image, term = (self.owner[None, :] == groups[:, None]).nonzero().T  # (N x its terms): an image's in a row
        weight, total = self.weight[term], _summing(image, len(groups))
        return lambda acts: total(self._columns(acts)[image, term] * weight)

    def _own(self, targets):
        """f(acts) -> (N,): image n's activation of targets[n] alone (no Sums)."""
        parts = self._compiled(targets, "own")  # rows: its images
        if len(parts) == 1:  # every image's target of one kind and layer: no rows to pick
            layer, _, fn = parts[0]
            return lambda acts: fn(acts[layer]).float()
        inverse = torch.argsort(torch.cat([rows for _, rows, _ in parts]))
        return lambda acts: torch.cat([fn(acts[layer][rows]).float() for layer, rows, fn in parts])[inverse]


def _terms_of(targets):
    """[(target index, weight, plain target)]: every term of the targets in their order, a Sum's each (one
    term of weight 1 for any other target)."""
    return [(j, w, t) for j, target in enumerate(targets)
            for w, t in (target.terms if isinstance(target, Sum) else ((1.0, target),))]


def _summing(owner, count):
    """f(values (..., E)) -> (..., count): each owner's values summed, value e being owner[e]'s (owner sorted).
    They are laid out in a zero-padded (count, most) grid and summed along it, not added into place: the same
    sums on every run of a GPU (its atomic adds come in any order), and an inf stays in its own owner's sum."""
    slot = torch.arange(len(owner), device=owner.device) - torch.searchsorted(owner, owner)  # within its owner
    most = int(torch.bincount(owner, minlength=count).max())
    where = owner * most + slot
    return lambda v: v.new_zeros(*v.shape[:-1], count * most).index_copy_(v.dim() - 1, where, v).unflatten(
        -1, (count, most)).sum(-1)


# ----------------------------------------------------------------------------- regularizers
# The penalties map images (N, C, H, W) to a per-image penalty (N,). render(regularizers=[...]) takes
# weighted terms: term(images, acts, param, groups, values) -> weight x penalty, (N,), added to the loss
# (values: each image's activation of its target; groups: (N,) its target's index, whose images Diversity
# pushes apart). The
# penalties of the images alone also have their gradient in closed form (_*_grad(x, scale) = scale x
# d penalty_n / d x_n, the scale folded into the last op): render adds those gradients without building a
# graph through the penalty. They are written in few, mostly in-place ops: on a CPU render step every
# pass over the images counts.

def l2_penalty(x):
    """Mean squared distance of the pixels from gray."""
    return (x - 0.5).pow(2).flatten(1).mean(1)


def _l2_grad(x, scale):
    return (x - 0.5).mul_(2 * scale / x[0].numel())


def tv_penalty(x):
    """Total variation: mean absolute difference of neighbouring pixels."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def _tv_grad(x, scale):
    grad = torch.zeros_like(x)
    for dim in (-2, -1):  # each pair of neighbours pulls its two pixels together
        n = x.size(dim) - 1
        sign = (x.narrow(dim, 1, n) - x.narrow(dim, 0, n)).sign_()
        pairs = x[0].numel() // x.size(dim) * n  # neighbour pairs along dim in one image
        grad.narrow(dim, 0, n).sub_(sign, alpha=scale / pairs)
        grad.narrow(dim, 1, n).add_(sign, alpha=scale / pairs)
    return grad


def blurred(x):
    """3x3 binomial blur per channel, reflect padding (as two 1-D passes of [1, 2, 1] / 4)."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    p = (p[..., :-2] + p[..., 2:]).add_(p[..., 1:-1], alpha=2)                   # along the width, x 4
    return (p[..., :-2, :] + p[..., 2:, :]).add_(p[..., 1:-1, :], alpha=2).div_(16)  # along the height


def blur_penalty(x):
    """Mean squared distance to a (constant) blurred copy: pulls each image toward smoothness."""
    with torch.no_grad():  # the copy is a constant target: no graph for it
        target = blurred(x)
    return (x - target).pow(2).flatten(1).mean(1)


def _blur_grad(x, scale):
    return (x - blurred(x)).mul_(2 * scale / x[0].numel())


def diversity_penalty(act, groups):
    """Mean cosine similarity of each image's Gram matrix of act (N, C, H, W) to those of the other images
    of its group, the others held fixed: its gradient moves only image i, away from the rest. So each
    image is pushed by its own term alone, which Diversity weights by its own activation, and a weak image
    is not pushed around by its strong siblings' terms."""
    if act.dim() != 4:
        raise ValueError(f"the Diversity layer must have a spatial output (N, C, H, W); it gives "
                         f"{tuple(act.shape)}: pick a conv layer (models.list_layers)")
    f = act.flatten(2).float()                                    # (N, C, HW); a half model's Gram overflows
    gram = F.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1)  # (N, C*C)
    sim = gram @ gram.detach().T                                  # (N, N), row i moves image i only
    same = (groups[:, None] == groups[None]) & ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    return (sim * same).sum(1) / same.sum(1).clamp_min(1)


LAST_WIDE = "the model's last map larger than 1x1"  # Diversity's default layer, resolved by render()


@dataclass(frozen=True)
class Term:
    """A weighted regularizer; subclasses say what it penalizes."""
    weight: float
    layer = None  # the layer whose activation the term reads (render hooks it); None: none

    def __post_init__(self):
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            why = " (a negative one would reward what it penalizes)" if isinstance(w, numbers.Real) and w < 0 else ""
            raise ValueError(f"{type(self).__name__} weight must be a finite number >= 0{why}, got {w!r}")


class ImageTerm(Term):
    """A term on the images alone, whose gradient has a closed form: render() adds gradient(images) to
    the images' gradient instead of differentiating the penalty (no graph, fewer ops per step)."""
    penalty = grad = None  # set by each subclass: penalty(x) -> (N,) and grad(x, scale) -> scale x its gradient

    def __call__(self, images, acts, param, groups, values):
        return self.weight * type(self).penalty(images)

    def gradient(self, images):
        """d(weight x penalty_n) / d images_n, (N, C, H, W)."""
        return type(self).grad(images, self.weight)


class L2(ImageTerm):
    """Pixels pulled toward gray (l2_penalty)."""
    penalty, grad = l2_penalty, _l2_grad


class TV(ImageTerm):
    """Total variation (tv_penalty)."""
    penalty, grad = tv_penalty, _tv_grad


class Blur(ImageTerm):
    """Distance to a blurred copy (blur_penalty)."""
    penalty, grad = blur_penalty, _blur_grad


class Prior(Term):
    """A latent parameterization's prior: its penalty(), a squared distance over D: ||z||^2 / D under the VAE's
    N(0, I) prior for `latent`, the Mahalanobis one from the data's latents for `whitened` (one weight means
    other pulls for the two)."""

    def __call__(self, images, acts, param, groups, values):
        return self.weight * param.penalty()


# the default from benchmarks/bench_diversity.py on CIFAR-10 (fourier, 6 images per unit, 3 seeds; README):
# the weight at which images of a class are more diverse than real ones, a channel's images more diverse
# than its top exemplars, and each class image still excites its class more than the best real image
DIVERSITY_WEIGHT = 1.5


@dataclass(frozen=True)
class Diversity(Term):
    """Images of one target pushed apart: the similarity of their Gram matrices at `layer`, in units of
    each image's own activation (detached). So one weight means the same for a class logit, a channel
    mean or a neuron, whatever their scale: at weight w, full similarity costs w x the activation. For a
    Class(log_prob=True) target that unit is |log p|, which shrinks as the class grows certain: use the
    logit (the default) with Diversity. `layer` is by default the model's last map larger than 1x1
    (`models.last_wide_layer`)."""
    weight: float = DIVERSITY_WEIGHT
    layer: str = LAST_WIDE

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"Diversity's layer must be a layer name such as 'block2.act2' (by default the model's "
                             f"last map larger than 1x1), got {self.layer!r}")

    def __call__(self, images, acts, param, groups, values):
        return self.weight * values.detach().abs() * diversity_penalty(acts[self.layer], groups)


def _terms(regularizers):
    """A list of terms from one term, several of them (a list, a tuple, any iterable), or None; an error for
    anything else."""
    if regularizers is None:
        return []
    try:
        terms = [regularizers] if isinstance(regularizers, Term) else list(regularizers)
    except TypeError:  # a number, the class of a term: named below
        terms = [regularizers]
    for t in terms:
        if not isinstance(t, Term):
            raise TypeError(f"regularizers must be a term or a list of terms (L2, TV, Blur, Prior, Diversity), "
                            f"e.g. [L2(1.0), TV(2.0)]; got {t!r}")
    return terms


def _resolve(regularizers, model, size):
    """The regularizer terms with Diversity's default layer named."""
    return [replace(t, layer=models.last_wide_layer(model, size)) if t.layer == LAST_WIDE else t
            for t in _terms(regularizers)]


# ----------------------------------------------------------------------------- render

@dataclass
class Render:
    images: torch.Tensor      # (N, C, H, W) in [0, 1], N = T * images_per_target, grouped by target
    activation: torch.Tensor  # (N,) final activation of each image's target, untransformed image
    history: torch.Tensor     # (steps, N) activation at each step (on the transformed image)
    targets: list = field(default_factory=list)  # the T targets; image i renders targets[target_index[i]]

    @property
    def target_index(self):
        """(N,) index into targets of each image."""
        return torch.arange(len(self.targets)).repeat_interleave(len(self.images) // len(self.targets))


@contextmanager
def _deterministic_convolutions():
    """cuDNN's deterministic algorithms for the duration, the flag restored on exit. On a GPU its default
    may pick, for a small batch, an algorithm that sums in a different order from run to run, and an
    ascent magnifies the last bit of that into other images from the same seed (10 classes, 256 steps
    on an H200: images 0.5-0.8 apart; with this, identical, and no slower)."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before


def cosine(lr):
    """A learning rate falling from lr to 0 along a half cosine: render(lr=cosine(0.3))."""
    data.check_real("cosine's lr (its starting value)", lr, 0, inclusive=False)
    return lambda t: lr * 0.5 * (1 + math.cos(math.pi * t))  # t: fraction of the steps done


CUDA_GRAPHS = True  # on a GPU, replay each step from a captured CUDA graph (False: always eager)


@torch.inference_mode(False)  # an ascent needs gradients, even when called under no_grad or inference_mode
@torch.enable_grad()
def render(model, targets, param="fourier", steps=256, lr=0.05, transforms=STANDARD, regularizers=(),
           images_per_target=1, restarts=1, size=None, seed=0, progress=True):
    """Maximize every target's activation, all images in one batch; returns a Render.

    param: 'pixel' or 'fourier'; a recipe with options, `parameterization(kind, ...)`, which 'maco',
      'latent' and 'whitened' need (the data's spectrum, a VAE); or a built parameterization module, which
      render() optimizes in place (a second render goes on from the first's images; seed then seeds only
      the transforms).
    lr: Adam's learning rate, or a schedule f(fraction of steps done) -> lr such as cosine(0.3).
    transforms: t(x, gen) -> x applied to the images at each step (a Shift, as the default, goes inside the
      spectrum of a fourier or maco parameterization); None optimizes the raw images. On a GPU the steps replay
      one captured CUDA graph: a transform or term of one's own draws its randomness from gen, as tensors (a
      Python branch is taken once, at the capture; featureviz.CUDA_GRAPHS = False runs every step eagerly).
    regularizers: weighted terms added to the loss, one or a list: TV(2.0), [L2(1.0), TV(2.0)], [Diversity()].
    restarts: optimize this many candidates per image and keep the one with the highest activation (a Fourier
      parameterization with shared=True shares its common part among them too).
    size: the side of square images, or their (height, width), if the model does not record it
      (models.input_size).
    seed: seeds the initialization and the transforms; the same seed gives the same images for the same
      targets in the same order (the draws follow the order: a target alone starts otherwise than in a batch).
    """
    targets = as_targets(targets)
    _check_settings(steps, lr, transforms, images_per_target, restarts, seed)
    seed = int(seed)  # a NumPy int too
    device, size = models.device_of(model), _image_size(model, param, size)
    groups = torch.arange(len(targets), device=device).repeat_interleave(images_per_target * restarts)  # targets
    terms = _resolve(regularizers, model, size)
    _check_diversity(terms, images_per_target)
    # an enclosing autocast would run the model in its dtype and read the parameterization, updated in place, from
    # the copy it cast at the first step: the images would barely move
    no_autocast = torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else \
        nullcontext()  # a device without autocast (meta) has none to turn off
    prepared = _prepared(model, targets, param, transforms, terms, groups, size, seed)
    with no_autocast, _own_random_numbers(device, seed), prepared as (param, step, gen, score):
        # on the device: no host sync per step; NaN: a step not taken (a stopped render's)
        history = torch.full((steps, len(groups)), math.nan, device=device)
        try:
            _optimize(step, param, gen, lr, history, progress)
        except KeyboardInterrupt as stop:  # Ctrl-C: the images so far go with it
            try:
                stop.render = _result(param, score, history, restarts, targets)
            except Exception:  # stopped mid-capture on a GPU, say: none to give, and the stop goes on up as it is
                stop.render = None
            else:
                stop.add_note("render() stopped: the images so far are in this exception's .render (in a "
                              "notebook, sys.last_value.render), with NaN in its history for the steps not taken")
            raise
        r = _result(param, score, history, restarts, targets)
    _warn_non_finite(r)
    return r


def _result(param, score, history, restarts, targets):
    """The Render of the parameterization's images as they are: the best of each target's restarts."""
    with torch.no_grad():
        images = param().contiguous()  # as the user expects them (a Fourier one's are channels_last)
        final = score(images)
    keep = _best_of_restarts(final, restarts).cpu()
    return Render(images.detach().float().cpu()[keep], final.cpu()[keep], history.cpu()[:, keep], targets)  # float32


@contextmanager
def _own_random_numbers(device, seed):
    """The global random numbers that a model draws in eval mode (MC dropout, a noisy layer), on the CPU and on
    the model's accelerator (CUDA, mps, ...), drawn from the render's seed and handed back after: the caller's
    stream is left where it was, and such a model's render repeats by its seed as any other's."""
    # the CPU's generator is forked whatever the devices; an accelerator's, the model's own (meta draws none, and
    # fork_rng given device_type "meta" would fork nothing, not even the CPU's)
    devices = [] if device.type in ("cpu", "meta") else [
        device.index if device.index is not None else torch.accelerator.current_device_index()]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.default_generator.manual_seed(seed)
        module = torch.get_device_module(device.type) if devices else None
        for index in devices:
            if hasattr(module, "default_generators"):  # the model's device, not the current one (cuda, xpu)
                module.default_generators[index].manual_seed(seed)
            else:  # mps: one device
                module.manual_seed(seed)
        yield


def _check_diversity(terms, images_per_target):
    """Diversity pushes apart the images of one target: an error where a target has one (only the candidates of
    that image, its restarts, would be pushed apart, and one of them comes back; with several images, every
    candidate is pushed from the other images' and from its rivals)."""
    if images_per_target == 1 and any(isinstance(t, Diversity) for t in terms):
        raise ValueError("Diversity pushes apart the images of one target: it needs images_per_target >= 2, got 1")


def _warn_non_finite(r):
    """A warning naming the targets whose image or activation became NaN or inf, and the first step it did (a
    plot draws such an image blank, and nothing else would say why)."""
    bad = ~(r.images.flatten(1).isfinite().all(1) & r.activation.isfinite() & r.history.isfinite().all(0))
    if bad.any():
        steps = (~r.history.isfinite()).any(1).nonzero().flatten()  # the steps whose activations are not numbers
        when = f" from step {steps[0].item()}" if len(steps) else ""
        names = sorted({str(r.targets[t]) for t in r.target_index[bad].tolist()})
        data.warn(f"the render of {', '.join(names)} became NaN or inf{when}, which a plot draws blank (a float16 "
                  f"model's overflow, or too large an lr?)")


@contextmanager
def _prepared(model, targets, param, transforms, terms, groups, size, seed):
    """What render() optimizes, set up and checked, for the duration (model frozen, objective hooked):
    yields (the parameterization module, step() -> (N,) activations with the gradients left in the module,
    the transforms' generator, score(images) -> (N,) each image's activation of its own target).
    groups: (N,) the target of each image, target-major with as many per target (as render() orders them:
    a pool's best draws come in that order); terms: the regularizers as _resolve returns them."""
    device, channels = models.device_of(model), models.input_channels(model)
    with models.frozen(model, _vae_on(param, device)) as layout, _deterministic_convolutions():
        objective = Objective(model, targets, [t.layer for t in terms if t.layer], (channels, *size))
        with objective.hooked(layout) as run:
            param = _build(param, len(groups), channels, size, len(groups) // len(targets), objective, run, seed)
            param = param.to(device)
            first = _check_param(param, (len(groups), channels, *size), terms)
            _check_transforms(transforms, first)
            gen = torch.Generator(device=device).manual_seed(seed)
            own = objective.own(groups)
            step = _step(param, own, run, transforms, terms, groups, gen)
            yield param, step, gen, lambda images: own(run(images))


def _check_settings(steps, lr, transforms, images_per_target, restarts, seed):
    """A clear error, naming the argument, for a render() setting of the wrong kind or out of range."""
    for name, value, low in [("steps", steps, 0), ("images_per_target", images_per_target, 1), ("restarts", restarts, 1)]:
        data.check_count(name, value, low)
    if lr is cosine:
        raise TypeError("lr=cosine makes a schedule: call it with its starting value, e.g. lr=cosine(0.3)")
    if not callable(lr):
        data.check_real("lr", lr, 0, inclusive=False,
                        hint=" (or a schedule f(fraction of steps done) such as cosine(0.3))")
    if not _is_int(seed) or not 0 <= seed < 2 ** 64:  # torch's generators take 64 bits (a negative one wraps)
        raise ValueError(f"seed must be an int in 0..{2 ** 64 - 1}, got {seed!r}")
    if transforms is not None and not callable(transforms):
        raise TypeError(f"transforms must be a transform t(x, gen) (STANDARD, AFFINE, LIGHT, jitter(...), "
                        f"resample(...), compose(...)) or None; got {transforms!r}")
    if transforms in (jitter, resample, scale, rotate, compose, Shift):
        raise TypeError(f"transforms={transforms.__name__} makes a transform: call it with its amounts, e.g. "
                        f"{transforms.__name__}(...), or pass STANDARD, AFFINE or LIGHT")


def _best_of_restarts(final, restarts):
    """(N / restarts,) indices of the images to keep: images come in runs of `restarts` candidates for
    the same image (target-major), and each run keeps its candidate with the highest final activation."""
    starts = torch.arange(0, len(final), restarts, device=final.device)
    return final.nan_to_num(nan=-math.inf).view(-1, restarts).argmax(1) + starts  # argmax would take a NaN


def _image_size(model, param, size):
    """(height, width) of the images to render: `size`, else the model's own, else a built parameterization's."""
    if size is None and isinstance(param, nn.Module):
        try:
            return models.input_size(model)
        except ValueError:
            with torch.no_grad():
                size = tuple(param().shape[-2:])
    return models.input_size(model, size)


def _vae_of(param):
    """The VAE a latent parameterization (module or recipe) decodes with, else None."""
    return getattr(param, "vae", None) or getattr(param, "options", {}).get("vae")


def _vae_on(param, device):
    """The VAE the parameterization decodes with (None if none), checked to be on the model's device."""
    vae = _vae_of(param)
    if vae is not None and models.device_of(vae) != device:
        raise ValueError(f"the VAE is on {models.device_of(vae)} and the model on {device}: move one to the "
                         f"other's device (vae.to(...)), as the latent techniques decode on the model's")
    return vae


def _build(param, n, channels, size, per_target, objective, run, seed):
    """The parameterization module for n images: as given, or built from a name or a Recipe."""
    if isinstance(param, nn.Module):
        return param
    recipe = _as_recipe(param)
    gen = torch.Generator().manual_seed(seed)
    if not recipe.pool:
        return recipe(n, channels, size, gen, per_target).to(objective.device)
    pool = recipe(max(recipe.pool, per_target), channels, size, gen).to(objective.device)
    return _best_draws(pool, per_target, objective, run)


def _as_recipe(param):
    """The Recipe of a parameterization name or Recipe; an error for anything else."""
    recipe = parameterization(param) if isinstance(param, str) else param
    if not isinstance(recipe, Recipe):
        raise TypeError(f"param must be a parameterization name ({', '.join(PARAMS)}), a Recipe from "
                        f"parameterization(...), or an nn.Module; got {param!r}")
    return recipe


@torch.no_grad()
def _best_draws(pool, per_target, objective, run):
    """Keep, for every target, the per_target draws of the pool it scores highest (target-major)."""
    scores = objective(run(pool()))                             # (pool, T)
    pick = scores.topk(per_target, dim=0).indices.T.flatten()  # (N,)
    for name, p in list(pool.named_parameters()):
        pool._parameters[name] = nn.Parameter(p[pick].clone())
    return pool


def _check_param(param, shape, terms):
    """The parameterization's first images, checked: their shape, and a prior where a Prior term needs one."""
    with torch.no_grad():
        x = param()
    got = tuple(x.shape)
    if got != shape:
        raise ValueError(f"parameterization makes images {got}; need {shape}, {shape[0]} being every target's "
                         f"images (targets x images_per_target x restarts): a module built for another render "
                         f"makes another number; pass a name or fv.parameterization(...), built for each render")
    if any(isinstance(t, Prior) for t in terms) and not hasattr(param, "penalty"):
        raise ValueError("the Prior regularizer needs a parameterization with a prior ('latent' or 'whitened')")
    return x


@torch.no_grad()
def _check_transforms(transforms, x):
    """One trial call of the transforms on the first images x (with a generator of its own): they must take
    (x, gen) and return a batch of images. A Shift, ours, may never run on the images (it goes inside a
    Fourier spectrum)."""
    if transforms is None or isinstance(transforms, Shift):
        return
    try:
        out = transforms(x, torch.Generator(device=x.device).manual_seed(0))
    except TypeError as e:
        raise TypeError(f"transforms must be a transform t(x, gen) -> x of images (N, C, H, W) and a torch.Generator "
                        f"(STANDARD, AFFINE, jitter(...), compose(...)); calling it failed: {e}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or len(out) != len(x):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"transforms must return the images (N, C, H, W) it is given, {tuple(x.shape)}; got {got}")


def _step(param, own, run, transforms, terms, groups, gen):
    """step() -> (N,) activations: one forward and backward pass of every image, gradients left in
    param (the caller zeroes them and steps the optimizer). own: acts -> (N,) each image's activation of
    its own target (Objective.own)."""
    on_images = [t for t in terms if isinstance(t, ImageTerm)]
    others = [t for t in terms if not isinstance(t, ImageTerm)]
    # a Shift goes inside a Fourier parameterization's spectrum, unless an image term needs the unshifted images
    inside = isinstance(transforms, Shift) and getattr(param, "shifts_in_spectrum", False) and not on_images

    def step():
        if inside:
            x = param(transforms.phase(len(groups), *param.size, gen, groups.device))  # shifted
            acts = run(x)
        else:
            x = param()                                              # (N, C, H, W)
            # the image terms' gradient first, while x is fresh in the caches (_image_terms_gradient)
            grad = _image_terms_gradient(on_images, x) if on_images else None
            acts = run(x if transforms is None else transforms(x, gen))
        _check_differentiable(acts)
        values = own(acts)                                           # (N,) each image's own target
        loss = -values.sum()
        for term in others:
            loss = loss + term(x, acts, param, groups, values).sum()
        if not on_images:
            loss.backward()
        else:  # the image terms' gradient enters at x directly, without a graph through them
            torch.autograd.backward([loss, x], [None, grad])
        return values.detach()
    return step


def _check_differentiable(acts):
    """An error naming a layer (None: the model's output) that the images' gradient cannot reach, as its forward
    made it without gradients (torch.no_grad around a backbone, a reentrant checkpoint): its targets' images
    would never change. The model's weights are frozen, so anything made from the images requires grad."""
    cut = [name for name, a in acts.items() if not a.requires_grad]
    if cut:
        what = "the model's output" if cut[0] is None else f"layer {cut[0]!r}"
        raise ValueError(f"{what} is computed without gradients in the model's forward (torch.no_grad, or a "
                         f"reentrant checkpoint) or the transforms (a detach): no image can be optimized for it; pick "
                         f"a layer outside that part, or take the no_grad out")


@torch.no_grad()
def _image_terms_gradient(terms, x):
    """The summed closed-form gradient of image terms at the images x, (N, C, H, W), summed in place.
    A step takes it right after making x: after the model's pass, which pushes x out of the caches, it
    made a CPU step of 10 images 1.5% longer (pixel+reg)."""
    return functools.reduce(torch.Tensor.add_, (t.gradient(x) for t in terms))


def _optimize(step, param, gen, lr, history, progress):
    """Adam steps of step(), one per row of history, which receives its activations (N,).

    On a GPU the steps after a short eager warm-up replay one captured CUDA graph: a step there is
    otherwise bound by the launch of its many small kernels.
    """
    steps, schedule = len(history), _schedule(lr)
    device = models.device_of(param)
    graphed = CUDA_GRAPHS and device.type == "cuda" and steps > _WARMUP
    # fused: the whole update in one kernel (on a CPU about half the time of the default's seven ops)
    # a captured Adam reads its lr from a float32 tensor (a NumPy float or an int lr would make it float64 or int64)
    opt = torch.optim.Adam(param.parameters(), lr=torch.tensor(float(schedule(0.0)), dtype=torch.float32, device=device)
                           if graphed else schedule(0.0), capturable=graphed, fused=True)
    project = getattr(param, "project", lambda: None)
    warm = _WARMUP if graphed else steps
    # the streams, synchronizations and capture below are the model's GPU's, whichever is the current one
    on_its_gpu = torch.cuda.device(device) if graphed else nullcontext()
    with on_its_gpu, tqdm(total=steps, desc="render", disable=not progress, leave=False) as bar:  # closed on errors
        with _side_stream(graphed):  # CUDA graph rule: the eager warm-up before a capture runs on a side stream
            for i in range(min(warm, steps)):
                _set_lr(opt, schedule(i / steps))
                history[i] = _eager_step(step, opt, project)
                bar.update()
        replay = _capture(step, opt, project, gen) if graphed else None
        for i in range(warm, steps):
            _set_lr(opt, schedule(i / steps))
            history[i] = replay() if replay is not None else _eager_step(step, opt, project)
            bar.update()
    if replay is not None:  # the gradients live in the graph's memory pool: a module of the caller's kept it alive
        opt.zero_grad(set_to_none=True)


def _schedule(lr):
    """f(t) -> the learning rate at the fraction t of the steps done: lr's schedule, each value checked (a
    negative one would turn the ascent into a descent), or the constant lr."""
    if not callable(lr):
        return lambda t: lr

    def checked(t):
        value = lr(t)
        data.check_real(f"the lr schedule's value at t={t:.3g} (the fraction of steps done)", value, 0)
        return value
    return checked


def _set_lr(opt, value):
    group = opt.param_groups[0]
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)  # in place: a captured graph reads this tensor
    else:
        group["lr"] = value


def _eager_step(step, opt, project):
    opt.zero_grad(set_to_none=True)
    values = step()
    opt.step()
    project()
    return values


@contextmanager
def _side_stream(enabled):
    if not enabled:
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            yield
    finally:  # on an error too: later work on the default stream waits for what the side stream began
        torch.cuda.current_stream().wait_stream(side)


_WARMUP = 3  # eager steps before a CUDA graph is captured: Adam's state and cuFFT plans exist by then


def _capture(step, opt, project, gen):
    """Capture one step (forward, backward, Adam, projection) as a CUDA graph; returns replay() -> values.
    If capture fails (an op that cannot be captured), warns and returns None: the steps stay eager."""
    graph = torch.cuda.CUDAGraph()
    try:
        graph.register_generator_state(gen)  # the transforms' draws advance on every replay
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)  # the graph allocates the gradients; each replay rewrites them
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):  # on the current GPU, the model's (torch's default
            # capture stream is one per process, made on whichever GPU captured first)
            values = step()
            opt.step()
            project()
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
        data.warn(f"render: could not capture a CUDA graph ({e}); running the steps eagerly")
        return None
    return lambda: (graph.replay(), values)[1]


# ----------------------------------------------------------------------------- real images

@torch.no_grad()
def activations(model, images, targets, batch_size=500):
    """(N_images, T) each target's activation on real images (uint8 or float in [0, 1])."""
    targets = as_targets(targets)
    models.check_input(model, images)
    data.check_count("batch_size", batch_size, 1)
    device = models.device_of(model)
    with models.frozen(model) as layout:
        objective = Objective(model, targets, input_shape=tuple(images.shape[1:]))
        with objective.hooked(layout) as run:
            out = [objective(run(data.to_float(x.to(device))))
                   for x in images.split(batch_size)]
    return torch.cat(out).cpu()


def inversion_targets(model, images, layer, cossim_pow=1.0):
    """One Direction target per image, its map at `layer` (C, H, W): rendered, they give what the layer keeps of
    each image (feature inversion; the deeper the layer, the less of the image and the more of what it is).
    cossim_pow: the power of the cosine with the map that weighs the product (Lucid's; 0: the product alone,
    which more of everything the map holds raises, the image's pattern exaggerated, as a caricature)."""
    cossim_pow = _cossim_pow(cossim_pow)  # checked before the model runs
    maps = models.capture(model, images, layer)[layer].float()  # (N, C, H, W); checks the images and the layer
    return [Direction(layer, m, cossim_pow) for m in maps]


@dataclass
class Exemplars:
    top: torch.Tensor             # (k,) indices of the most exciting images, best first; (k, T) for T targets
    top_values: torch.Tensor      # their activations
    bottom: torch.Tensor          # indices of the least exciting images, lowest first
    bottom_values: torch.Tensor


def exemplars(model, images, target, k=8, batch_size=500):
    """Top-k and bottom-k images of a dataset for a target (or a list of targets), in one pass (k: at most
    the number of images)."""
    data.check_count("k", k, 1)
    single = _is_one(target)
    a = activations(model, images, target, batch_size)  # (N, T)
    k = min(k, len(a))
    # stable sorts: equal activations (a ReLU's zeros) in the images' order, the same on every device
    top, bottom = a.argsort(dim=0, descending=True, stable=True)[:k], a.argsort(dim=0, stable=True)[:k]
    pick = (lambda t: t[:, 0]) if single else (lambda t: t)
    return Exemplars(pick(top), pick(a.gather(0, top)), pick(bottom), pick(a.gather(0, bottom)))


def looks_at(model, target, images):
    """Where a Neuron target looks in images like these: its cell's centre (y, x) in pixels, as
    models.cell_centres measures it, to be marked on its exemplars (whole images: the neuron sees a part). None for
    any other target (a class or a channel, "layer:n" too, reads the whole image), a Sum's too unless its terms are
    neurons of one layer at one place."""
    target = _as_index(target)  # a NumPy or 0-d tensor class index too
    if isinstance(target, str):
        target = _channel_named(target)  # Lucent's "layer:n"
    if isinstance(target, bool) or not isinstance(target, (*TARGETS, numbers.Integral)):  # (images, target) swapped
        raise TypeError(f"target must be a Class, Channel, Neuron, Direction or Sum, or a class index "
                        f"(looks_at(model, target, images)); got {type(target).__name__}")
    images = models.check_input(model, images)
    neurons = [t for _, t in target.terms] if isinstance(target, Sum) else [target]
    if not all(isinstance(t, Neuron) for t in neurons) or len({t.layer for t in neurons}) > 1:
        return None
    layer = neurons[0].layer
    shape = models.capture(model, images[:1], layer)[layer].shape[1:]
    for t in neurons:
        t.check(shape)
    places = {t.position(shape) for t in neurons}  # the centre, given or by default, is one place
    if len(shape) != 3 or len(places) > 1:  # a linear layer's unit reads the whole image too
        return None
    rows, cols = models.cell_centres(model, layer, images)
    (y, x), = places
    return rows[y].item(), cols[x].item()


# ----------------------------------------------------------------------------- techniques

def render_in_stages(model, targets, first, second, steps=256, **common):
    """Two renders in a row: half the steps with the `first` settings, the rest with `second`, whose
    parameterization (a name or a Recipe) starts from the first stage's images. `common` goes to both, except
    restarts: the first stage keeps the best of its candidates, and the second refines those. A Prior
    term goes only to a stage whose parameterization has a prior (the latent one of 'hybrid')."""
    data.check_count("steps", steps, 0)  # as given, before it is halved
    targets = as_targets(targets)  # a generator, read once, serves both stages
    first, second = _priors_where_they_apply([{**first, **common}, {**second, **common, "restarts": 1}])
    if isinstance(second.get("param"), nn.Module):  # before the first stage runs
        raise TypeError("the second stage's param must be a parameterization name or Recipe, not a built module: "
                        "it starts from the first stage's images")
    one, two = [_check_stage(name, stage) for name, stage in (("first", first), ("second", second))]
    # the second stage starts from the first's images, and its history goes on from theirs: as many, of their size
    fits = dict(images_per_target=one["images_per_target"] == two["images_per_target"],
                size=None in (one["size"], two["size"]) or one["size"] == two["size"])  # None: the model's
    for key in (k for k, ok in fits.items() if not ok):
        raise ValueError(f"the two stages' {key} differ, {one[key]} and {two[key]}: the second starts from the "
                         f"first's images, so give it once, in common")
    with _whole_history(None, steps - steps // 2):
        a = render(model, targets, steps=steps // 2, **first)
    second["param"] = _as_recipe(second.get("param", "fourier")).starting_from(a.images)  # render()'s default
    with _whole_history(a.history, 0):
        b = render(model, targets, steps=steps - steps // 2, **second)
    return Render(b.images, b.activation, torch.cat([a.history, b.history]), a.targets)


@contextmanager
def _whole_history(before, after):
    """A stage stopped by Ctrl-C carries the images so far with the two stages' history: the first stage's
    (`before`, None for none) ahead of its own, NaN for the `after` steps of the second stage not taken."""
    try:
        yield
    except KeyboardInterrupt as stop:
        r = getattr(stop, "render", None)
        if r is not None:
            parts = [r.history, torch.full((after, r.history.shape[1]), math.nan)]
            stop.render = replace(r, history=torch.cat(parts if before is None else [before, *parts]))
        raise


def _check_stage(name, stage):
    """A stage's render() settings, checked before either runs (a typo or a bad value in the second stage would
    otherwise fail only after the first had spent its steps), with render()'s defaults for those not given."""
    defaults = {k: p.default for k, p in inspect.signature(render).parameters.items() if p.default is not p.empty}
    unknown = sorted(set(stage) - set(defaults) | ({"steps"} & set(stage)))
    if unknown:
        raise TypeError(f"the {name} stage's settings {unknown} are not a stage's render() arguments: it takes "
                        f"{', '.join(k for k in defaults if k != 'steps')} (steps are the two stages' together)")
    s = {**defaults, **stage}
    _check_settings(s["steps"], s["lr"], s["transforms"], s["images_per_target"], s["restarts"], s["seed"])
    if not isinstance(s["param"], nn.Module):
        _as_recipe(s["param"])
    if s["size"] is not None:  # 32 and (32, 32) are one size
        s["size"] = models.image_shape(s["size"], f"the {name} stage's size")
    _check_diversity(_terms(s["regularizers"]), s["images_per_target"])
    return s


def _priors_where_they_apply(stages):
    """The stages' render() arguments with Prior terms left out of a stage without a prior, if another has
    one (if none has, render() says that a Prior needs one)."""
    has_prior = [hasattr(_param_class(stage.get("param", "fourier")), "penalty") for stage in stages]
    if not any(has_prior):
        return stages
    return [stage if has else {**stage, "regularizers": [t for t in _terms(stage.get("regularizers"))
                                                         if not isinstance(t, Prior)]}
            for stage, has in zip(stages, has_prior)]


def _param_class(param):
    """The class of a parameterization given as a module, a Recipe or a name (None for an unknown name)."""
    if isinstance(param, nn.Module):
        return type(param)
    return param.cls if isinstance(param, Recipe) else PARAMS.get(param)


@dataclass(frozen=True)
class Technique:
    """A named way to render: render() settings, and for a two-stage technique those of its second stage."""
    settings: dict
    refine: dict = None  # the second stage (render_in_stages), or None

    def __call__(self, model, targets, steps=256, **common):
        """Render the targets; `common` (seed, images_per_target, size, progress, ...) overrides the settings."""
        if self.refine is None:
            return render(model, targets, steps=steps, **{**self.settings, **common})
        return render_in_stages(model, targets, self.settings, self.refine, steps, **common)


TECHNIQUE_NAMES = ("pixel", "pixel+reg", "fourier", "maco", "latent", "whitened", "hybrid")
LATENT_TECHNIQUES = ("latent", "whitened", "hybrid")  # these need a VAE


def techniques(vae=None, color_cov=None, magnitude=None):
    """name -> Technique for the techniques the given statistics and models allow: maco needs the data's
    magnitude spectrum (magnitude_spectrum(train images, color_cov)), the latent ones the VAE."""
    # at 32 px a steeper spectrum than 1/f (decay 1.5) gives smoother images that transfer better
    fourier = parameterization("fourier", color_cov=color_cov, decay=1.5)
    out = {
        "pixel": Technique(dict(param="pixel", transforms=None)),
        # L2 and total variation: on CIFAR-10 (4 seeds) more natural than with the blur penalty added
        # (naturalness 11.37 against 12.99), as good on the other metrics, one penalty fewer a step (README)
        "pixel+reg": Technique(dict(param="pixel", transforms=AFFINE, regularizers=[L2(1.0), TV(4.0)])),
        "fourier": Technique(dict(param=fourier)),
    }
    if magnitude is not None:
        out["maco"] = Technique(dict(param=parameterization("maco", magnitude=magnitude, color_cov=color_cov)))
    if vae is not None:
        search = dict(transforms=LIGHT, lr=cosine(0.3), restarts=4)  # restarts from the best of 256 draws
        out["latent"] = Technique(dict(param=parameterization("latent", vae=vae, pool=256), **search))
        out["whitened"] = Technique(dict(param=parameterization("whitened", vae=vae, pool=256), **search))
        # the whitened latent finds a natural image of the class, the Fourier space then sharpens it
        out["hybrid"] = Technique(out["whitened"].settings,
                                  refine=dict(param=parameterization("fourier", color_cov=color_cov), lr=cosine(0.02)))
    return Techniques(out)


class Techniques(dict):
    """name -> Technique, as techniques() returns it: a name it lacks gets an error that says why."""

    def __missing__(self, name):
        if name not in TECHNIQUE_NAMES:
            raise KeyError(f"unknown technique {name!r}; choose one of {', '.join(TECHNIQUE_NAMES)}")
        if name in LATENT_TECHNIQUES:
            raise KeyError(f"technique {name!r} draws through a VAE: pass vae=... (a trained models.VAE; it draws "
                           f"32x32 images, so the notebooks leave it out, with the latent techniques, at another size)")
        raise KeyError("technique 'maco' keeps the data's magnitude spectrum: pass magnitude=magnitude_spectrum("
                       "train_images, color_cov), or a Technique from techniques(vae, color_cov, magnitude)")


def get_technique(name, vae=None, color_cov=None, magnitude=None):
    """The Technique called `name`, with a clear error (a ValueError, the one techniques() gives as a KeyError)
    for an unknown name, a missing VAE or spectrum."""
    try:
        return techniques(vae, color_cov, magnitude)[name]
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def visualize_unit(model, layer, channel=0, neuron=None, technique="fourier", vae=None, color_cov=None,
                   magnitude=None, **common):
    """Render one unit: a class if layer == 'head', a neuron if a (y, x) position is given, else a channel.

    `channel` may be a list (all render in one batch); `technique` is a name or a Technique; `common`
    (steps, seed, progress, ...) goes to it.
    """
    if isinstance(technique, Technique) and any(x is not None for x in (vae, color_cov, magnitude)):
        raise ValueError("vae, color_cov and magnitude build a technique given by name; a Technique has its own "
                         "(featureviz.techniques(vae, color_cov, magnitude) builds them with yours)")
    how = technique if isinstance(technique, Technique) else get_technique(technique, vae, color_cov, magnitude)
    channels = [_as_index(c) for c in ([channel] if _is_one(channel) else channel)]
    if layer in ("head", None):
        if neuron is not None:
            raise ValueError(f"neuron={neuron!r} needs a spatial layer; layer {layer!r} means a class (its logit)")
        targets = [Class(c) for c in channels]
    elif neuron is not None:
        if not (isinstance(neuron, (tuple, list)) and len(neuron) == 2):
            raise ValueError(f"neuron must be a (y, x) position in layer {layer!r}, got {neuron!r}")
        targets = [Neuron(layer, c, *neuron) for c in channels]
    else:
        targets = [Channel(layer, c) for c in channels]
    return how(model, targets, **common)
