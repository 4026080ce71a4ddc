"""Attribution maps for a classifier: saliency, Grad-CAM, integrated gradients (thin over captum).

Every function takes images (B, C, H, W), uint8 in [0, 255] or float in [0, 1], and targets as an int or B of them
(a list, an array or an integer tensor), runs the model in eval mode (and in its own dtype, for a half or bfloat16
model), leaves the model (mode, requires_grad, hooks) as found, and returns float32 maps.
"""
import itertools
import numbers
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradCam, Saliency

import models
from data import check_count, to_float, warn

@contextmanager
def _untouched(model):
    """models.evaluating with gradients enabled (captum differentiates with respect to the input)."""
    with models.evaluating(model), torch.enable_grad():
        yield


def _prepare(images, targets, model):
    """A detached float copy of the images (B, C, H, W) on the model's device, and the targets (B,),
    checked against the images' number and the model's channels and outputs."""
    models.check_input(model, images)
    device = models.device_of(model)
    # in the model's dtype (a half or bfloat16 model takes its own); captum warns unless inputs require grad
    x = to_float(images).detach().to(device, models.dtype_of(model)).clone(memory_format=torch.contiguous_format)
    x.requires_grad_()  # contiguous: a model that views its feature maps fails on channels_last images
    return x, _classes(targets, x, model)


def _classes(targets, x, model, name="targets"):
    """The targets (B,) for the prepared images x: a class index or one per image, checked against the model's
    outputs (an error calls them `name`)."""
    try:
        t = torch.as_tensor(targets, device=x.device)
    except (TypeError, ValueError, RuntimeError):  # None, a class name, ...
        t = None
    integer = t is not None and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)  # True: none
    if not integer or t.dim() > 1 or (t.dim() == 1 and len(t) != len(x)):
        raise ValueError(f"{name} must be a class index (int) or {len(x)} of them (one per image); got {targets!r}")
    t = t.long()  # (a NumPy uint32 array's tensor has no comparisons)
    with _untouched(model), torch.no_grad(), models.probing(model, x[:1]):  # images too small: said so
        logits = model(x[:1])
    models.check_logits(model, logits)
    k = logits.shape[1]
    flat = t.flatten()
    bad = ((flat < 0) | (flat >= k)).nonzero().flatten().tolist()
    if bad:  # the first few of them, not every target of a large batch
        shown = [f"{flat[i].item()} (image {i})" if t.dim() else str(t.item()) for i in bad[:5]]
        raise ValueError(f"{name} must be class indices in 0..{k - 1}; got {', '.join(shown)}"
                         f"{', ...' if len(bad) > 5 else ''}")
    return t.expand(len(x)).contiguous() if t.dim() == 0 else t


def _batches(method, x, t, batch_size, **options):
    """captum's method.attribute(images, target=..., **options), one batch of batch_size images at a time: a test
    set's maps in the memory of one batch's graph."""
    for xs, ts in zip(x.split(batch_size), t.split(batch_size)):
        yield method.attribute(xs.detach().requires_grad_(), target=ts, **options).detach()


@torch.inference_mode(False)  # gradients, even when called under no_grad or inference_mode
def saliency(model, images, targets, batch_size=256):
    """|d logit_target / d pixel|, max over channels: (B, H, W), non-negative; batch_size images at a time."""
    check_count("batch_size", batch_size, 1)
    x, t = _prepare(images, targets, model)
    with _untouched(model):
        maps = torch.cat([a.amax(1) for a in _batches(Saliency(model), x, t, int(batch_size), abs=True)])
    return _finite("saliency", maps.float())


UPSAMPLING = ("centres", "bilinear", None)


@torch.inference_mode(False)
def grad_cam(model, images, targets, layer=None, upsample="centres", batch_size=256):
    """Grad-CAM at `layer` (a name or a module; default the model's last layer with a map larger than 1x1,
    `models.last_map_layer`), relu'd: (B, H, W), upsampled to the input linearly between its cells' centres in the
    image (`models.cell_centres`), not stretched evenly over it. upsample="bilinear" stretches it evenly, as
    pytorch-grad-cam draws it (bilinear, align_corners=False); None returns the layer's own (B, h, w) map.
    batch_size images at a time."""
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(map(repr, UPSAMPLING))}; got {upsample!r}")
    check_count("batch_size", batch_size, 1)
    x, t = _prepare(images, targets, model)
    chosen = layer is None
    if chosen:
        layer = models.last_map_layer(model, x)
    name = layer if isinstance(layer, str) else _name_of(model, layer)
    shape = models.capture(model, x[:1].detach(), [name])[name].shape
    if len(shape) != 4:
        raise ValueError(f"Grad-CAM needs a layer with a spatial output (B, C, H, W); {name!r} gives "
                         f"{tuple(shape)}: pick a conv layer (models.list_layers)")
    if models.keeps_features_last(model, x[:1].detach(), name):  # captum reads the module's own output
        raise ValueError(f"Grad-CAM needs a layer whose output has its channels on dim 1; {name!r} keeps its "
                         f"features last (an nn.Linear's output, or one made from it): pick a conv layer "
                         f"(models.list_layers)")
    if shape[-2] * shape[-1] == 1:
        why = ("no layer of the model has a larger one" if chosen
               else "pick a layer with a larger map, or leave layer out (models.last_map_layer)")
        warn(f"Grad-CAM at {name!r}, whose map is 1x1 for {x.shape[-2]}x{x.shape[-1]} images, is flat "
             f"(every pixel gets the same weight): {why}")
    layer = models.get_layer(model, name)
    with _untouched(model):
        cam = torch.cat(list(_batches(LayerGradCam(models.inner(model), layer), x, t, int(batch_size),
                                      relu_attributions=True)))
    cam = cam[:, 0].float()  # (B, h, w)
    if upsample == "bilinear":
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    elif upsample == "centres":
        rows, cols = models.cell_centres(model, name, x)
        place = [_linear_weights(c, side).to(cam.device) for c, side in zip((rows, cols), x.shape[-2:])]
        cam = torch.einsum("yi,bij,xj->byx", place[0], cam, place[1])  # each cell at its centre
    return _finite("Grad-CAM", cam.clamp_min(0).float())  # (B, H, W), or (B, h, w) not upsampled


def _linear_weights(centres, size):
    """(size, n) weights that read a signal given at n increasing centres (pixels) at each pixel 0..size-1:
    linear between the two nearest centres, the end value beyond them (as bilinear resizing does at edges)."""
    n = len(centres)
    if n == 1:
        return torch.ones(size, 1)
    pos = torch.arange(size, dtype=centres.dtype).clamp(centres[0], centres[-1])
    i = (torch.searchsorted(centres, pos, right=True) - 1).clamp(0, n - 2)
    t = (pos - centres[i]) / (centres[i + 1] - centres[i])
    weights = torch.zeros(size, n, dtype=centres.dtype)
    weights[torch.arange(size), i] = 1 - t
    weights[torch.arange(size), i + 1] += t
    return weights.float()


def _name_of(model, layer):
    """The name of a module of the model; an error for a module that is not one of its own."""
    name = next((n for n, m in model.named_modules() if m is layer), None)
    if name is None:
        raise ValueError(f"layer must be a layer name or a module of {type(model).__name__}; this "
                         f"{type(layer).__name__} is not one of its modules (models.list_layers(model) names them)")
    return name


@torch.inference_mode(False)
def integrated_gradients(model, images, targets, baseline=None, steps=32, internal_batch_size=64, against=None):
    """Integrated gradients from `baseline` (default black) to the images: signed, (B, C, H, W). Their sum over
    an image's pixels is f(image) - f(baseline) in the limit of many steps: a warning says when `steps` leave it
    off by more than COMPLETENESS for some image, and another when a model in a low precision (bfloat16) leaves
    it off within its rounding, which no steps mend. against: classes (one, or one per image) whose logit f is
    less: the attributions of the margin, the targets' logit less theirs (the two attributions' difference, on
    one path), checked against the margin's change as one logit's would be."""
    check_count("steps", steps, 1)
    check_count("internal_batch_size", internal_batch_size, 1)
    steps, internal_batch_size = int(steps), int(internal_batch_size)  # a NumPy int is no size to Tensor.split
    x, t = _prepare(images, targets, model)
    rivals = None if against is None else _classes(against, x, model, "against")  # the images copied once
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        baseline = float(baseline)  # 0 is black, as 0.0 is
    shapes = (f"a scalar, one value per channel (C,), an image (C, H, W) or one per image (B, C, H, W) for "
              f"images {tuple(x.shape)}")
    try:
        b = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"baseline must be None (black) or {shapes}; got {baseline!r}") from None
    b = to_float(b, "baseline").to(x.device, x.dtype)
    try:
        b = (b.view(-1, 1, 1) if b.dim() == 1 else b).expand_as(x).contiguous()  # 1-D: one value per channel
    except RuntimeError:
        raise ValueError(f"baseline must be {shapes}; got shape {tuple(b.shape)}") from None
    ig, attr, ends = IntegratedGradients(model), [], []

    def logits(v, ts, cs):  # (B, 2): the targets' logit and the rivals' (0 without), whose difference is f
        out = model(v).float()
        rival = torch.zeros(len(v), device=out.device) if cs is None else out.gather(1, cs[:, None])[:, 0]
        return torch.stack([out.gather(1, ts[:, None])[:, 0], rival], 1)

    def attributions(xs, bs, ts):
        return ig.attribute(xs, baselines=bs, target=ts, n_steps=steps, internal_batch_size=internal_batch_size)
    with _untouched(model):
        # internal_batch_size images at a time: captum puts every image of a call in each of its batches
        rival_batches = itertools.repeat(None) if rivals is None else rivals.split(internal_batch_size)
        for xs, bs, ts, cs in zip(*(v.split(internal_batch_size) for v in (x, b, t)), rival_batches):
            attr.append((attributions(xs, bs, ts) - (0 if cs is None else attributions(xs, bs, cs))).detach())
            with torch.no_grad():  # at the image and the baseline
                ends.append(torch.stack([logits(v, ts, cs) for v in (xs, bs)]))
    attr, ends = torch.cat(attr), models.exact(torch.cat(ends, 1))  # mps has no float64
    _check_complete(models.exact(attr), ends, steps, models.dtype_of(model))
    return _finite("integrated gradients", attr.float())


COMPLETENESS = 0.05  # the largest share of f(image) - f(baseline) that the attributions' sum may be off unwarned


def _check_complete(attr, ends, steps, dtype):
    """Warn where integrated gradients' sum (attr (B, C, H, W)) is off the change of f along the path (ends:
    (2, B, 2) the target's logit and the rival's, 0 without one, at the image and at the baseline; f their
    difference) by more than COMPLETENESS of it: the integral is taken in too few steps. A margin's sum is the
    difference of two integrals, each as far off as its own logit's change allows: it is held to COMPLETENESS of
    the two changes' sizes together, where the margin's own change may be near 0 (two logits that rise alike). A
    change smaller than 1% of the logits' size (or than 1e-3) counts as that much, as does, for a model in a low
    precision (dtype), one that its rounding of the logits and attributions (eps of their size) would be
    COMPLETENESS of: in bfloat16 the sum can miss a small change by tens of percent however many the steps,
    which a warning of its own says (pass a float32 model)."""
    f = ends[..., 0] - ends[..., 1]  # (2, B)
    delta, size = attr.sum((1, 2, 3)) - (f[0] - f[1]), ends.abs().sum((0, 2))
    rounding = torch.finfo(dtype).eps / COMPLETENESS * (size + attr.abs().sum((1, 2, 3)))
    change = (ends[0] - ends[1]).abs().sum(1).maximum(0.01 * size).clamp_min(1e-3)  # one logit's: |f's change|

    def worst(scale):  # the largest share of the change that the sum is off (not finite: _finite says so)
        return (delta.abs() / scale).nan_to_num(0.0, posinf=0.0).max().item()
    of = "of the two logits' changes together" if ends[..., 1].any() else "of it"  # a margin's, or one logit's
    off = worst(change.maximum(rounding))
    if off > COMPLETENESS:
        warn(f"integrated gradients in {steps} steps are off the logit's change f(image) - f(baseline) by "
             f"up to {off:.0%} {of}, over {COMPLETENESS:.0%}: pass more steps")
    elif torch.finfo(dtype).bits < 32 and worst(change) > COMPLETENESS:  # within the rounding: no steps mend it
        warn(f"integrated gradients of a {str(dtype).removeprefix('torch.')} model are off the logit's change "
             f"f(image) - f(baseline) by up to {worst(change):.0%} {of}, within its rounding, which more steps "
             f"cannot mend: for maps that add up to the change, pass model.float()")


def _finite(method, maps):
    """The maps (B, ...), with a warning naming the images whose map is not finite: a model whose logits or
    gradients overflow (a half one, say) gives maps that show nothing, and a plot draws them blank."""
    bad = (~maps.flatten(1).isfinite().all(1)).nonzero().flatten().tolist()
    if bad:
        warn(f"{method} is NaN or inf for image(s) {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}: "
             f"the model's logits or gradients overflow there (a float16 model? try float32)")
    return maps


def to_heatmap(attr, signed=False):
    """Reduce (B, C, H, W) attributions to (B, H, W): sum over channels of |attr|, or of attr if signed."""
    attr = attr.detach()
    if attr.dim() != 4:  # one image's (C, H, W) would pass for C maps
        raise ValueError(f"attr must be attributions (B, C, H, W), as integrated_gradients returns; got shape "
                         f"{tuple(attr.shape)} (one image's: pass attr[None]; saliency and grad_cam already give "
                         f"one map per image)")
    return (attr.sum(1) if signed else attr.abs().sum(1)).float()
