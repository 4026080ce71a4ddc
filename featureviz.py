"""Feature visualization: parameterizations, transforms, targets, render(), exemplars, quality metrics.

Activation maximization natively at 32x32: every target (class, channel, neuron, direction) of one
call renders in ONE batch, one forward pass per step, each image reading only its own target.

    r = render(model, [Class(k) for k in range(10)], param="fourier", color_cov=color_covariance(x))
    r.images    # (10, C, 32, 32) in [0, 1]
    r.activation, r.history  # (10,), (steps, 10)
    r = visualize_unit(model, "block2.act2", 7, technique="hybrid", vae=vae, color_cov=cov)

Sections: data statistics, parameterizations, transforms, targets, regularizers, render, real-image
activations and exemplars, quality metrics, techniques (TECHNIQUES: name -> render settings).
"""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import data
import models

SIZE = 32  # every model here takes (B, C, 32, 32)


# ----------------------------------------------------------------------------- data statistics

def color_covariance(images):
    """(C, C) covariance of the pixel colours of a set of images (uint8 or float)."""
    x = data.to_float(images).transpose(0, 1).flatten(1).double()  # (C, N*H*W)
    x = x - x.mean(1, keepdim=True)
    return (x @ x.T / (x.size(1) - 1)).float()


def spectrum(images):
    """(H, W//2+1) mean magnitude of the rfft2 of the (mean-removed) images: the data's own 1/f."""
    x = data.to_float(images)
    x = x - x.mean((0, 2, 3), keepdim=True)
    return torch.fft.rfft2(x, norm="ortho").abs().mean((0, 1))


def _sqrt_psd(cov):
    """Symmetric square root of a positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh(cov.double())
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _logit(x, eps=1e-3):
    return torch.logit(x.clamp(eps, 1 - eps))


# ----------------------------------------------------------------------------- parameterizations

class PixelParam(nn.Module):
    """Free pixels through a sigmoid."""

    def __init__(self, n, channels=3, size=SIZE, sd=0.01, generator=None, init=None):
        super().__init__()
        x = sd * torch.randn(n, channels, size, size, generator=generator)
        self.logits = nn.Parameter(x if init is None else _logit(init.float().cpu()))  # (N, C, H, W)

    def forward(self):
        return torch.sigmoid(self.logits)


def fourier_scale(size=SIZE, decay=1.0, spectrum=None):
    """(H, W//2+1) per-frequency scale: 1/f^decay (f floored at 1/size) or a measured spectrum, RMS 1."""
    if spectrum is None:
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        scale = (fy ** 2 + fx ** 2).sqrt().clamp_min(1 / size) ** -decay
    else:
        scale = spectrum.float().cpu().clamp_min(spectrum.max() * 1e-3)
    return scale / scale.pow(2).mean().sqrt()


def color_sqrt(color_cov, channels):
    """(C, C) colour transform: symmetric sqrt of the covariance, spectral norm 1 (identity if None)."""
    if color_cov is None or channels == 1:
        return torch.eye(channels)
    color_cov = torch.as_tensor(color_cov)
    if color_cov.shape != (channels, channels) or not torch.isfinite(color_cov).all():
        raise ValueError(f"color_cov must be a finite ({channels}, {channels}) covariance, as color_covariance(images) "
                         f"returns; got shape {tuple(color_cov.shape)}"
                         f"{'' if torch.isfinite(color_cov).all() else ' with NaN or inf'}")
    root = _sqrt_psd(color_cov)
    return (root / torch.linalg.matrix_norm(root, 2)).float()


class FourierParam(nn.Module):
    """Real-FFT coefficients scaled per frequency (whitened steps), colour-decorrelated, sigmoid."""

    def __init__(self, n, channels=3, size=SIZE, color_cov=None, decay=1.0, spectrum=None, sd=0.01,
                 generator=None, init=None):
        super().__init__()
        self.size = size
        self.register_buffer("scale", fourier_scale(size, decay, spectrum))  # (H, W//2+1)
        self.register_buffer("color", color_sqrt(color_cov, channels))       # (C, C)
        shape = (n, channels, size, size // 2 + 1, 2)
        self.coeffs = nn.Parameter(sd * torch.randn(shape, generator=generator))
        if init is not None:
            self.set_images(init)

    def forward(self):
        spec = torch.view_as_complex(self.coeffs) * self.scale              # (N, C, H, W//2+1)
        x = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")  # (N, C, H, W)
        return torch.sigmoid(torch.einsum("dc,nchw->ndhw", self.color, x))

    @torch.no_grad()
    def set_images(self, images):
        """Set the coefficients so that forward() returns `images` (N, C, H, W) in [0, 1]."""
        x = _logit(data.to_float(images).to(self.coeffs.device))
        x = torch.einsum("dc,nchw->ndhw", torch.linalg.pinv(self.color), x)
        spec = torch.fft.rfft2(x, norm="ortho") / self.scale
        self.coeffs.copy_(torch.view_as_real(spec))


class LatentParam(nn.Module):
    """z through the VAE decoder; z projected back into [latent_lo, latent_hi] after every step."""

    def __init__(self, vae, n, sd=1.0, generator=None, init=None):
        super().__init__()
        object.__setattr__(self, "vae", vae)  # not a submodule: its weights are not ours to optimize
        mean, std = vae.latent_mean, vae.latent_cov.diagonal().sqrt()
        z = mean + sd * std * torch.randn(n, vae.latent_dim, generator=generator).to(mean.device)
        if init is not None:
            with torch.no_grad():
                z = vae.encode(init.float().to(mean.device))[0]
        self.register_buffer("lo", vae.latent_lo.clone())
        self.register_buffer("hi", vae.latent_hi.clone())
        self.z = nn.Parameter(torch.maximum(torch.minimum(z, self.hi), self.lo))  # (N, D)

    def forward(self):
        return self.vae.decode(self.z)

    def penalty(self):
        """(N,) ||z||^2 / D: the prior's negative log density, up to constants."""
        return self.z.pow(2).mean(1)

    @torch.no_grad()
    def project(self):
        self.z.copy_(torch.maximum(torch.minimum(self.z, self.hi), self.lo))


class WhitenedLatentParam(nn.Module):
    """z = latent_mean + L u, with L L^T = latent_cov: steps in u are whitened for the data's latents."""

    def __init__(self, vae, n, sd=1.0, jitter=1e-4, generator=None, init=None):
        super().__init__()
        object.__setattr__(self, "vae", vae)  # not a submodule (see LatentParam)
        self.register_buffer("mean", vae.latent_mean.clone())
        self.register_buffer("chol", vae.latent_cholesky(jitter))  # (D, D) lower triangular
        self.register_buffer("lo", vae.latent_lo.clone())
        self.register_buffer("hi", vae.latent_hi.clone())
        u = sd * torch.randn(n, vae.latent_dim, generator=generator).to(self.mean.device)
        if init is not None:
            with torch.no_grad():
                z = vae.encode(init.float().to(self.mean.device))[0]
                u = torch.linalg.solve_triangular(self.chol, (z - self.mean).T, upper=False).T
        self.u = nn.Parameter(u)  # (N, D)

    def latent(self):
        """(N, D) z before clipping."""
        return self.mean + self.u @ self.chol.T

    def forward(self):
        z = self.latent()
        return self.vae.decode(torch.maximum(torch.minimum(z, self.hi), self.lo))

    def penalty(self):
        """(N,) ||u||^2 / D: the squared Mahalanobis distance of z from the data's latents."""
        return self.u.pow(2).mean(1)


PARAMS = dict(pixel=PixelParam, fourier=FourierParam, latent=LatentParam, whitened=WhitenedLatentParam)


def make_param(kind, n, channels=3, vae=None, color_cov=None, generator=None, init=None, **kwargs):
    """A parameterization of n images by name: 'pixel', 'fourier', 'latent' or 'whitened'."""
    if kind not in PARAMS:
        raise ValueError(f"unknown parameterization {kind!r}; choose one of {', '.join(PARAMS)}")
    init = None if init is None else data.to_float(init, "init")
    if kind in ("latent", "whitened"):
        if vae is None:
            raise ValueError(f"parameterization {kind!r} needs a VAE: pass vae=... (a trained models.VAE)")
        if vae.config["in_channels"] != channels:
            raise ValueError(f"the VAE makes {vae.config['in_channels']}-channel images, the model "
                             f"takes {channels}")
        return PARAMS[kind](vae, n, generator=generator, init=init, **kwargs)
    if kind == "fourier":
        kwargs["color_cov"] = color_cov
    return PARAMS[kind](n, channels, generator=generator, init=init, **kwargs)


# ----------------------------------------------------------------------------- transforms
# Each transform is t(x, gen) -> x on a batch (N, C, H, W), drawing one random value per image.

def pad(px, mode="reflect"):
    """Pad every side by px."""
    return lambda x, gen: F.pad(x, (px, px, px, px), mode=mode)


def jitter(px):
    """Shift each image by its own integer offset in [-px, px]^2 (reflect at the border); same size."""
    def t(x, gen):
        dy, dx = torch.randint(-px, px + 1, (2, len(x)), generator=gen, device=x.device)
        return data.shift(x, dy, dx)
    return t


def affine(scale=(1.0, 1.0), degrees=0.0):
    """Random zoom in [lo, hi] and rotation in [-degrees, degrees] per image: one grid_sample."""
    lo, hi = scale

    def t(x, gen):
        b = x.size(0)
        u = torch.rand(2, b, generator=gen, device=x.device)
        s = lo + (hi - lo) * u[0]                       # (N,) zoom factor
        a = math.radians(degrees) * (2 * u[1] - 1)      # (N,) angle
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        zero = torch.zeros_like(s)
        theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(b, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return t


def scale(lo, hi):
    """Random zoom in [lo, hi] per image; same size."""
    return affine(scale=(lo, hi))


def rotate(degrees):
    """Random rotation in [-degrees, degrees] per image; same size."""
    return affine(degrees=degrees)


def crop(size=SIZE):
    """Center crop to size x size, or resize up to it if the images are smaller."""
    def t(x, gen):
        h, w = x.shape[-2:]
        if h < size or w < size:
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        return x[..., top:top + size, left:left + size]
    return t


def compose(*ts):
    """Apply transforms left to right."""
    def t(x, gen):
        for f in ts:
            x = f(x, gen)
        return x
    return t


STANDARD = compose(pad(2), jitter(2), affine((0.9, 1.1), 10), jitter(1), crop(SIZE))
LIGHT = compose(pad(1), jitter(1), crop(SIZE))


# ----------------------------------------------------------------------------- targets
# A target names what to maximize. Targets of one kind and layer evaluate together: `columns`
# compiles them once into a function act (B, ...) -> (B, T_g), so a step has no loop over targets.

def _mean_spatial(a):
    return a.flatten(2).mean(2) if a.dim() > 2 else a  # (B, C)


@dataclass(frozen=True)
class Class:
    """Class logit (or log-softmax) of the model's output."""
    idx: int
    log_prob: bool = False
    layer = None  # the model output

    def check(self, shape):
        if not 0 <= self.idx < shape[0]:
            raise ValueError(f"class {self.idx} out of range: the model has {shape[0]} classes")

    @staticmethod
    def columns(targets, shape, device):
        idx = torch.tensor([t.idx for t in targets], device=device)
        log = targets[0].log_prob
        return lambda out: (out.log_softmax(1) if log else out)[:, idx]


def _check_channel(t, shape):
    if not 0 <= t.channel < shape[0]:
        raise ValueError(f"channel {t.channel} out of range: layer {t.layer!r} has {shape[0]} channels")


@dataclass(frozen=True)
class Channel:
    """Mean activation of one channel of a named layer."""
    layer: str
    channel: int

    def check(self, shape):
        _check_channel(self, shape)

    @staticmethod
    def columns(targets, shape, device):
        idx = torch.tensor([t.channel for t in targets], device=device)
        return lambda a: _mean_spatial(a)[:, idx]


@dataclass(frozen=True)
class Neuron:
    """One channel at one spatial position (default: the center) of a named layer."""
    layer: str
    channel: int
    y: int = None
    x: int = None

    def position(self, shape):
        h, w = shape[1:] if len(shape) == 3 else (1, 1)
        return (h // 2 if self.y is None else self.y), (w // 2 if self.x is None else self.x)

    def check(self, shape):
        _check_channel(self, shape)
        h, w = shape[1:] if len(shape) == 3 else (1, 1)
        y, x = self.position(shape)
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"neuron position (y={y}, x={x}) out of range: layer {self.layer!r} is "
                             f"{h}x{w} (y in 0..{h - 1}, x in 0..{w - 1})")

    @staticmethod
    def columns(targets, shape, device):
        c, y, x = torch.tensor([(t.channel, *t.position(shape)) for t in targets], device=device).T
        return lambda a: a[:, c, y, x] if a.dim() == 4 else a[:, c]


@dataclass(frozen=True, eq=False)
class Direction:
    """Dot product of a layer's mean spatial activation with a vector (C,)."""
    layer: str
    vector: torch.Tensor

    def check(self, shape):
        if self.vector.shape != (shape[0],):
            raise ValueError(f"direction has shape {tuple(self.vector.shape)}; layer {self.layer!r} "
                             f"has {shape[0]} channels")

    @staticmethod
    def columns(targets, shape, device):
        v = torch.stack([t.vector.float() for t in targets]).to(device)  # (T_g, C)
        return lambda a: _mean_spatial(a) @ v.T


TARGETS = (Class, Channel, Neuron, Direction)


def as_targets(targets):
    """A list of targets from one target, a list, or class indices (ints or integer tensors)."""
    if isinstance(targets, TARGETS + (int,)) or (isinstance(targets, torch.Tensor) and targets.dim() == 0):
        targets = [targets]
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"targets must be a class index, a Class/Channel/Neuron/Direction, or a list of them; "
                        f"got {targets!r}")
    out = []
    for t in targets:
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, TARGETS + (int,)):
            raise TypeError(f"a target must be a class index (int), Class, Channel, Neuron or Direction; got {t!r}")
        out.append(Class(t) if isinstance(t, int) else t)
    if not out:
        raise ValueError("no targets given")
    return out


class _Stop(Exception):
    """Raised by the last hook a pass needs: the rest of the network is not computed."""


class Objective:
    """Targets compiled into one function acts -> (B, T), built once per model and target list."""

    def __init__(self, model, targets, extra_layers=(), channels=None):
        self.layers = {t.layer for t in targets} | set(extra_layers)  # None: the model output
        self.modules = {name: models.get_layer(model, name) for name in self.layers - {None}}
        self.device = _device(model)
        shapes = self.shapes(model, channels or in_channels(model))
        for t in targets:
            t.check(shapes[t.layer])
        groups = {}  # (kind, layer, options) -> indices of its targets
        for i, t in enumerate(targets):
            groups.setdefault((type(t), t.layer, getattr(t, "log_prob", None)), []).append(i)
        self.parts = []  # (layer, act -> (B, T_g)) per group
        for idx in groups.values():
            first = targets[idx[0]]
            fn = type(first).columns([targets[i] for i in idx], shapes[first.layer], self.device)
            self.parts.append((first.layer, fn))
        order = torch.tensor([i for idx in groups.values() for i in idx])
        self.inverse = torch.argsort(order).to(self.device)  # column j of the output = target j

    @contextmanager
    def hooked(self, model):
        """Yield run(x) -> acts {layer: activation, None: output if needed}; hooks removed on exit."""
        acts, full = {}, None in self.layers

        def hook(name):
            def save(module, inputs, out):
                acts[name] = out
                if not full and len(acts) == len(self.modules):
                    raise _Stop
            return save

        def run(x):
            acts.clear()
            try:
                acts[None] = model(x)
            except _Stop:
                pass
            return acts

        handles = [m.register_forward_hook(hook(name)) for name, m in self.modules.items()]
        try:
            yield run
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def shapes(self, model, channels):
        """Per-sample activation shape of every needed layer, from one dry run."""
        with self.hooked(model) as run:
            acts = run(torch.zeros(1, channels, SIZE, SIZE, device=_device(model)))
        return {name: tuple(a.shape[1:]) for name, a in acts.items()}

    def __call__(self, acts):
        cols = [f(acts[layer]) for layer, f in self.parts]  # T_g columns per group
        return torch.cat(cols, 1)[:, self.inverse]           # (B, T)


def in_channels(model):
    """Number of input channels the model takes."""
    config = getattr(model, "config", None) or {}
    if "in_channels" in config:
        return config["in_channels"]
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def _device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- regularizers
# Each maps images (N, C, H, W) to a per-image penalty (N,).

def l2_penalty(x):
    """Mean squared distance of the pixels from gray."""
    return (x - 0.5).pow(2).flatten(1).mean(1)


def tv_penalty(x):
    """Total variation: mean absolute difference of neighbouring pixels."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def blurred(x):
    """3x3 binomial blur per channel, reflect padding."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    k = (k[:, None] * k[None, :] / 16).expand(x.size(1), 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.size(1))


def blur_penalty(x):
    """Mean squared distance to a (constant) blurred copy: pulls each image toward smoothness."""
    return (x - blurred(x).detach()).pow(2).flatten(1).mean(1)


REGULARIZERS = dict(l2=l2_penalty, tv=tv_penalty, blur=blur_penalty)


def diversity_penalty(act, groups):
    """Mean cosine similarity of the Gram matrices of act (N, C, H, W) to the other images of the group."""
    if act.dim() != 4:
        raise ValueError(f"diversity_layer must have a spatial output (N, C, H, W); it gives {tuple(act.shape)}: "
                         f"pick a conv layer (models.list_layers)")
    f = act.flatten(2)                                            # (N, C, HW)
    gram = F.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1)  # (N, C*C)
    sim = gram @ gram.T                                           # (N, N)
    same = (groups[:, None] == groups[None]) & ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    return (sim * same).sum(1) / same.sum(1).clamp_min(1)


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
def frozen(*modules):
    """Eval mode and no weight gradients for the duration; modes, requires_grad, memory format restored.

    On the CPU the 4-D weights go channels_last (faster convolutions there), then back.
    """
    modules = [m for m in modules if m is not None]
    subs = [s for m in modules for s in m.modules()]
    modes = [s.training for s in subs]
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    datas = [p.data for p in params]
    try:
        for m in modules:
            m.eval()
        for p in params:
            p.requires_grad_(False)
            if p.dim() == 4 and p.device.type == "cpu":
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for s, mode in zip(subs, modes):
            s.training = mode
        for p, flag, saved in zip(params, flags, datas):
            p.data = saved
            p.requires_grad_(flag)


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def render(model, targets, param="fourier", steps=256, lr=0.05, transforms=STANDARD, images_per_target=1,
           restarts=1, init_pool=0, decay_lr=False, l2=0.0, tv=0.0, blur=0.0, diversity=0.0,
           diversity_layer="block2.act2", penalty=0.0, seed=0, vae=None, color_cov=None,
           param_kwargs=None, refine=None, progress=True):
    """Maximize every target's activation, all images in one batch; returns a Render.

    param: 'pixel', 'fourier', 'latent', 'whitened', a parameterization module, or 'first>second':
      half the steps in the first, then the second initialized from its images (`refine`: settings
      that change for the second stage, e.g. dict(lr=0.02)).
    transforms: t(x, gen) -> x applied to the images at each step; None optimizes the raw images.
    restarts: optimize this many candidates per image and keep the one with the highest activation.
    init_pool: draw this many random initializations and start each image from the best ones for
      its target (one forward pass; useful for the latent parameterizations, whose draws differ).
    decay_lr: cosine decay of the learning rate to 0 (else constant).
    l2, tv, blur, diversity, penalty: regularizer weights (penalty: the latent parameterization's prior).
    seed: seeds the initialization and the transforms; the same seed gives the same images.
    """
    targets = as_targets(targets)
    for name, value, low in [("steps", steps, 0), ("images_per_target", images_per_target, 1), ("restarts", restarts, 1)]:
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    kw = dict(lr=lr, transforms=transforms, images_per_target=images_per_target, restarts=restarts,
              init_pool=init_pool, decay_lr=decay_lr, l2=l2, tv=tv, blur=blur, diversity=diversity,
              diversity_layer=diversity_layer, penalty=penalty, seed=seed, vae=vae, color_cov=color_cov,
              param_kwargs=param_kwargs, progress=progress)
    if isinstance(param, str) and ">" in param:
        return _render_staged(model, targets, param, steps, kw, refine)
    device, channels = _device(model), in_channels(model)
    per_target = images_per_target * restarts
    n = len(targets) * per_target
    tidx = torch.arange(len(targets), device=device).repeat_interleave(per_target)  # (N,) target of each image
    rows = torch.arange(n, device=device)
    weights = dict(l2=l2, tv=tv, blur=blur)
    gen = torch.Generator(device=device).manual_seed(seed)
    history = torch.zeros(steps, n, device=device)  # on the device: no host sync per step
    with frozen(model, vae, getattr(param, "vae", None)):
        objective = Objective(model, targets, [diversity_layer] if diversity else [], channels)
        with objective.hooked(model) as run:
            if isinstance(param, str):
                param = _init_param(param, n, channels, per_target, init_pool, objective, run, kw)
            param = param.to(device)
            _check_param(param, (n, channels, SIZE, SIZE), penalty)
            opt = torch.optim.Adam(param.parameters(), lr=lr)
            project = getattr(param, "project", lambda: None)
            for step in tqdm(range(steps), desc="render", disable=not progress, leave=False):
                x = param()                                             # (N, C, H, W)
                xt = transforms(x, gen) if transforms is not None else x
                acts = run(_channels_last(xt))
                values = objective(acts)[rows, tidx]                    # (N,) each image's own target
                loss = -values
                for name, w in weights.items():
                    if w:
                        loss = loss + w * REGULARIZERS[name](x)
                if diversity:
                    loss = loss + diversity * diversity_penalty(acts[diversity_layer], tidx)
                if penalty:
                    loss = loss + penalty * param.penalty()
                if decay_lr:
                    opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                project()
                history[step] = values.detach()
            with torch.no_grad():
                images = param()
                final = objective(run(_channels_last(images)))[rows, tidx]
    keep = (final.view(-1, restarts).argmax(1) + torch.arange(0, n, restarts, device=device)).cpu()
    return Render(images.detach().cpu()[keep], final.cpu()[keep], history.cpu()[:, keep], targets)


@torch.no_grad()
def _init_param(kind, n, channels, per_target, pool, objective, run, kw):
    """Build a parameterization by name; with a pool, each target starts from its best random draws."""
    gen = torch.Generator().manual_seed(kw["seed"])
    pool = max(pool, per_target) if pool else 0
    param = make_param(kind, pool or n, channels, kw["vae"], kw["color_cov"], gen,
                       **(kw["param_kwargs"] or {})).to(objective.device)
    if pool:
        scores = objective(run(_channels_last(param())))           # (pool, T)
        pick = scores.topk(per_target, dim=0).indices.T.flatten()  # (N,) target-major
        for name, p in list(param.named_parameters()):
            param._parameters[name] = nn.Parameter(p[pick].clone())
    return param


def _check_param(param, shape, penalty):
    with torch.no_grad():
        got = tuple(param().shape)
    if got != shape:
        raise ValueError(f"parameterization makes images {got}; need {shape}")
    if penalty and not hasattr(param, "penalty"):
        raise ValueError(f"penalty={penalty} needs a parameterization with a prior (latent, whitened)")


def _render_staged(model, targets, kinds, steps, kw, refine):
    """'first>second': half the steps in the first parameterization, the rest in the second."""
    first, second = kinds.split(">")
    a = render(model, targets, first, steps // 2, **kw)
    kw = {**kw, "restarts": 1, "penalty": 0.0, "param_kwargs": None, **(refine or {})}
    gen = torch.Generator().manual_seed(kw["seed"])
    p = make_param(second, len(a.images), in_channels(model), kw["vae"], kw["color_cov"], gen,
                   init=a.images, **(kw["param_kwargs"] or {}))
    b = render(model, targets, p, steps - steps // 2, **kw)
    return Render(b.images, b.activation, torch.cat([a.history, b.history]), targets)


# ----------------------------------------------------------------------------- real images

@torch.no_grad()
def activations(model, images, targets, batch_size=500):
    """(N_images, T) each target's activation on real images (uint8 or float in [0, 1])."""
    targets = as_targets(targets)
    data.check_images(images)
    device = _device(model)
    with frozen(model):
        objective = Objective(model, targets)
        with objective.hooked(model) as run:
            out = [objective(run(_channels_last(data.to_float(x.to(device)))))
                   for x in images.split(batch_size)]
    return torch.cat(out).cpu()


@dataclass
class Exemplars:
    top: torch.Tensor             # (k,) indices of the most exciting images, best first; (k, T) for T targets
    top_values: torch.Tensor      # their activations
    bottom: torch.Tensor          # indices of the least exciting images, lowest first
    bottom_values: torch.Tensor


def exemplars(model, images, target, k=8, batch_size=500):
    """Top-k and bottom-k images of a dataset for a target (or a list of targets), in one pass."""
    single = not isinstance(target, (list, tuple, range))
    a = activations(model, images, [target] if single else target, batch_size)  # (N, T)
    k = min(k, len(a))
    top, bottom = a.topk(k, dim=0), a.topk(k, dim=0, largest=False)
    pick = (lambda t: t[:, 0]) if single else (lambda t: t)
    return Exemplars(pick(top.indices), pick(top.values), pick(bottom.indices), pick(bottom.values))


@torch.no_grad()
def features(model, images, batch_size=500):
    """(N, w) penultimate features (model.features) of images, model left as found."""
    data.check_images(images)
    device = _device(model)
    with frozen(model):
        out = [model.features(_channels_last(data.to_float(x.to(device)))) for x in images.split(batch_size)]
    return torch.cat(out).float().cpu()


# ----------------------------------------------------------------------------- quality metrics

def normalized_activation(vis_act, real_acts):
    """Activation of each visualization / max over real images; real_acts (M, N) aligned with vis_act (N,)."""
    return vis_act / real_acts.max(0).values


@torch.no_grad()
def transferability(other_model, images, labels):
    """Top-1 accuracy of an independently trained classifier on the class visualizations."""
    device = _device(other_model)
    with frozen(other_model):
        logits = other_model(_channels_last(data.to_float(images).to(device)))
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


def _knn_distance(queries, refs, k):
    """(Q,) mean Euclidean distance from each query to its k nearest references."""
    return torch.cdist(queries, refs).topk(min(k, len(refs)), largest=False).values.mean(1)


def plausibility(feature_model, vis, vis_labels, train_x, train_y, heldout_x, heldout_y, k=5):
    """Mean kNN feature distance of each visualization to its class's training images, relative to
    the same for held-out real images of that class (1.0 = as plausible as a real image)."""
    f_vis, f_train, f_held = (features(feature_model, x) for x in (vis, train_x, heldout_x))
    return _plausibility(f_vis, vis_labels, f_train, train_y, f_held, heldout_y, k)


def _plausibility(f_vis, vis_labels, f_train, train_y, f_held, heldout_y, k=5):
    """plausibility() on features already computed."""
    vis_labels, train_y, heldout_y = vis_labels.cpu(), train_y.cpu(), heldout_y.cpu()
    ratios = []
    for c in vis_labels.unique().tolist():
        refs, held = f_train[train_y == c], f_held[heldout_y == c]
        if not len(refs) or not len(held):  # no real images of this class to compare with
            continue
        real = _knn_distance(held, refs, k).mean()
        ratios.append(_knn_distance(f_vis[vis_labels == c], refs, k) / real)
    return torch.cat(ratios).mean().item() if ratios else float("nan")


def diversity(feature_model, images, groups):
    """Mean pairwise feature distance between images of the same group (target), averaged over groups."""
    return _diversity(features(feature_model, images), groups)


def _diversity(f, groups):
    """diversity() on features already computed."""
    groups = torch.as_tensor(groups).cpu()
    means = []
    for g in groups.unique():
        fg = f[groups == g]
        if len(fg) > 1:
            d = torch.cdist(fg, fg)
            means.append(d.sum() / (len(fg) * (len(fg) - 1)))
    return torch.stack(means).mean().item() if means else float("nan")  # nan: no group has two images


def template_recovery(images, templates):
    """(T, K) Pearson correlation between each visualization and each class template."""
    a = data.to_float(images).flatten(1).double()
    b = data.to_float(templates, "templates").flatten(1).double()
    a = F.normalize(a - a.mean(1, keepdim=True), dim=1)
    b = F.normalize(b - b.mean(1, keepdim=True), dim=1)
    return (a @ b.T).float()


def reference(other, train_x, train_y, heldout_x, heldout_y, templates=None):
    """What score() compares with, computed once: features of real training and held-out images under
    the independent classifier `other`, their labels, and the class templates (synthetic data)."""
    return dict(other=other, f_train=features(other, train_x), train_y=train_y, f_held=features(other, heldout_x),
                heldout_y=heldout_y, templates=templates)


def score(images, labels, acts, real_acts, ref):
    """All quality metrics of a set of class visualizations (labels = their classes) as a dict.

    acts: (N,) each visualization's activation; real_acts: (M, K) the activations of real images for
    all classes; ref: reference().
    """
    labels = torch.as_tensor(labels).cpu()
    other, templates, f = ref["other"], ref["templates"], features(ref["other"], images)
    row = dict(act=normalized_activation(acts.cpu(), real_acts.cpu()[:, labels]).mean().item(),
               transfer=transferability(other, images, labels),
               plausibility=_plausibility(f, labels, ref["f_train"], ref["train_y"], ref["f_held"], ref["heldout_y"]),
               diversity=_diversity(f, labels))
    if templates is not None:
        row["planted"] = (template_recovery(images, templates).argmax(1) == labels).float().mean().item()
    return row


def quality_table(model, other, d, techniques, seeds=4, steps=256, vae=None, color_cov=None, n_ref=10000,
                  progress=True):
    """Render the classes with each technique over several seeds and score them; also real test images.

    techniques: name -> render kwargs (as TECHNIQUES), or name -> fn(seed) returning (images, activations)
    for renderers of other libraries. Returns (rows, grid): metric dicts, and seed-0 images per technique.
    """
    classes = list(range(len(d.classes)))
    keep = torch.randperm(len(d.train_y), generator=torch.Generator().manual_seed(0))[:n_ref]
    ref = reference(other, d.train_x[keep], d.train_y[keep], d.val_x, d.val_y, d.templates)
    real = activations(model, d.test_x, classes)  # (N, K)
    x, y = d.test_x[:1000], d.test_y[:1000]
    rows = [dict(technique="real test images", seconds=float("nan"),
                 **score(x, y, real[torch.arange(len(y)), y], real, ref))]
    grid = {}
    for name, how in tqdm(techniques.items(), desc="techniques", disable=not progress):
        images, acts, start = [], [], time.perf_counter()
        for seed in range(seeds):
            if callable(how):
                im, a = how(seed)
            else:
                r = render(model, classes, steps=steps, seed=seed, vae=vae, color_cov=color_cov, progress=False,
                           **how)
                im, a = r.images, r.activation
            images.append(im)
            acts.append(a)
        seconds = (time.perf_counter() - start) / seeds
        labels = torch.tensor(classes).repeat(seeds)
        rows.append(dict(technique=name, seconds=seconds, **score(torch.cat(images), labels, torch.cat(acts),
                                                                  real, ref)))
        grid[name] = images[0]
    return rows, grid


def format_table(rows):
    """Markdown table of quality_table rows."""
    cols = dict(technique="technique", seconds="s / render", act="normalized activation",
                transfer="transfer top-1", plausibility="plausibility", diversity="diversity",
                planted="planted recovery")
    keys = [k for k in cols if k in rows[0]]
    fmt = lambda r, k: r[k] if k == "technique" else ("-" if r[k] != r[k] else f"{r[k]:.2f}")  # noqa: E731
    lines = ["| " + " | ".join(cols[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- techniques

TECHNIQUES = {
    "pixel": dict(param="pixel", transforms=None),
    "pixel+reg": dict(param="pixel", transforms=STANDARD, l2=1.0, tv=2.0, blur=4.0),
    # at 32 px a steeper spectrum than 1/f (decay 1.5) gives smoother images that transfer better
    "fourier": dict(param="fourier", transforms=STANDARD, param_kwargs=dict(decay=1.5)),
    "latent": dict(param="latent", transforms=LIGHT, lr=0.3, decay_lr=True, restarts=4, init_pool=256),
    "whitened": dict(param="whitened", transforms=LIGHT, lr=0.3, decay_lr=True, restarts=4, init_pool=256),
    # the whitened latent finds a natural image of the class, the Fourier space then sharpens it
    "hybrid": dict(param="whitened>fourier", transforms=LIGHT, lr=0.3, decay_lr=True, restarts=4,
                   init_pool=256, refine=dict(lr=0.02, transforms=STANDARD)),
}


def visualize_unit(model, layer, channel=0, neuron=None, technique="fourier", **kwargs):
    """Render one unit: a class if layer == 'head', a neuron if a (y, x) position is given, else a channel.

    `channel` may be a list (all render in one batch); kwargs override the technique's render settings.
    """
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; choose one of {', '.join(TECHNIQUES)}")
    channels = channel if isinstance(channel, (list, tuple, range)) else [channel]
    if layer in ("head", None):
        targets = [Class(c) for c in channels]
    elif neuron is not None:
        targets = [Neuron(layer, c, *neuron) for c in channels]
    else:
        targets = [Channel(layer, c) for c in channels]
    return render(model, targets, **{**TECHNIQUES[technique], **kwargs})
