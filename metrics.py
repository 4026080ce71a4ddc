"""How good is it: the classifier's analysis (confusion matrix, per-class report, hardest pairs) and the
quality metrics and table of feature visualizations.

Every metric is tested where it must fail (tests/test_metrics.py), by more than the seed-to-seed spread:
on both naturalness metrics, real images score better than every known-bad input (unregularized pixel
ascent, shuffled pixels, uniform noise, real images of another class); on class evidence, every one of them
but pixel ascent's activation (it excites its class beyond any real image) scores worse than real images;
on two-choice, every one scores worse than the unit's exemplars (on the classes; noise and shuffled pixels on
the channels too).
"""
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import data
import featureviz as fv
import models
import training

# ----------------------------------------------------------------------------- classifier analysis

def confusion_matrix(y_true, y_pred, num_classes):
    """(K, K) counts, rows = true class, columns = predicted class."""
    if y_true is None or y_pred is None:  # a notebook's predictions reset by a training cell that stopped
        raise ValueError(f"y_true and y_pred must be (N,) class indices of the same images; got "
                         f"{'None' if y_true is None else 'labels'} and {'None' if y_pred is None else 'labels'}")
    y_true, y_pred = torch.as_tensor(y_true).cpu(), torch.as_tensor(y_pred).cpu()
    if y_true.dim() != 1 or y_pred.shape != y_true.shape:
        raise ValueError(f"y_true and y_pred must be (N,) class indices of the same images; got shapes "
                         f"{tuple(y_true.shape)} and {tuple(y_pred.shape)}")
    data.check_count("num_classes", num_classes, 1)
    y_true, y_pred = (data.check_labels(y, len(y), num_classes, name) for name, y in (("y_true", y_true),
                                                                                       ("y_pred", y_pred)))
    idx = y_true * num_classes + y_pred  # int64: uint8 labels would wrap around
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_report(cm, classes):
    """Per-class precision, recall and support from a confusion matrix. A class never predicted has
    precision 0, and one without true examples (support 0) recall 0 (sklearn's zero_division=0)."""
    cm = check_confusion(cm, classes, counts=True).cpu().double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp_min(1)
    recall = tp / cm.sum(1).clamp_min(1)
    return [dict(cls=c, precision=p.item(), recall=r.item(), support=int(s))
            for c, p, r, s in zip(classes, precision, recall, cm.sum(1))]


def hardest_pairs(cm, classes, k=5):
    """The k most frequent (true, predicted) confusions, as (true name, predicted name, count); fewer when
    fewer pairs were ever confused (a pair never confused is no confusion)."""
    data.check_count("k", k, 0)
    off = check_confusion(cm, classes, counts=True).clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n = len(classes)
    return [(classes[i // n], classes[i % n], int(c)) for c, i in zip(counts.tolist(), flat.tolist()) if c > 0]


def check_confusion(cm, classes, counts=False):
    """cm as a (K, K) tensor for the K class names, or an error that names both; `counts`: of whole counts >= 0,
    as confusion_matrix returns (a matrix of fractions would give each class a support of 0 or 1)."""
    if cm is None:  # a notebook's, reset with its model: the cell that computes it has not run since
        raise ValueError("cm is None, not a confusion matrix: compute it (metrics.confusion_matrix of the labels "
                         "and the predictions) after the model it is of")
    cm = torch.as_tensor(cm)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"cm must be (K, K) for the K = {len(classes)} class names; got shape {tuple(cm.shape)}")
    if counts and not (cm.dtype != torch.bool and (cm >= 0).all() and (cm == cm.round()).all()):
        raise ValueError("cm must hold counts, whole numbers >= 0, as metrics.confusion_matrix returns; not a "
                         "matrix of fractions")
    return cm


# ----------------------------------------------------------------------------- what a model sees

@torch.no_grad()
def features(model, images, batch_size=500):
    """(N, D) penultimate features of images, model left as found: the model's features(x) method where it
    returns (N, D) (our CNN's: what its head reads), else what the last nn.Linear to run in the forward pass reads
    (a torchvision ResNet's pooled features; for VGG or MobileNet, their classifier's last hidden layer)."""
    models.check_input(model, images)
    data.check_count("batch_size", batch_size, 1)
    with models.frozen(model) as layout:
        out = [_penultimate(model, layout(_as_input(model, x))) for x in images.split(batch_size)]
    return torch.cat(out).float().cpu()


def _as_input(model, images):
    """Images as the model takes them: float in [0, 1] on its device, in its dtype (a bfloat16 model its own)."""
    return data.to_float(images).to(models.device_of(model), models.dtype_of(model))


def _penultimate(model, x):
    """(B, D) features of one batch: model.features(x) if 2-D, else the input of the last nn.Linear to run. A
    `features` submodule is not such a method: it is a part of the model (a VGG's convolutions; in some
    models its flattened maps, which a classifier with hidden layers reads, not the head)."""
    method = getattr(model, "features", None)
    f = model.features(x) if callable(method) and not isinstance(method, nn.Module) else None
    if torch.is_tensor(f) and f.dim() == 2:
        return f
    head, read = models.last_to_run(model, x, nn.Linear)
    if head is None:  # (a last 1x1 convolution need not be a head: a ResNet's whose fc is nn.Identity())
        raise ValueError(f"cannot tell the features of {type(model).__name__}: no nn.Linear head runs in it, and it "
                         f"has no features(x) method (not a submodule) that returns (N, D) features; for a fully "
                         f"convolutional classifier (SqueezeNet), wrap it in a module with such a method")
    return read.flatten(1)


@torch.no_grad()
def block_activations(model, images, reduce, layers=None, batch_size=500):
    """[(N, ...)] per layer (one name or several; default: each block's, models.block_layers),
    reduce(activation (B, C, H, W)) of the images."""
    models.check_input(model, images)
    data.check_count("batch_size", batch_size, 1)
    layers = models.block_layers(model, tuple(images.shape[-2:])) if layers is None else models.as_names(layers)
    device = models.device_of(model)
    out = []
    with models.capturing(model, layers) as read:
        for x in images.split(batch_size):  # each batch reduced at once: no whole set's maps held in memory
            maps = read(data.to_float(x.to(device)))
            for name, a in maps.items():
                if a.dim() != 4:
                    raise ValueError(f"layer {name!r} gives {tuple(a.shape)}, not a map (B, C, H, W): give layers "
                                     f"with a spatial output (models.block_layers)")
            out.append({name: reduce(a.float()).cpu() for name, a in maps.items()})  # a bfloat16 model's in float32
    return [torch.cat([o[name] for o in out]) for name in layers]


def spatial_statistics(a):
    """(B, 2C) per channel, the mean and the standard deviation of an activation (B, C, H, W) over the image
    (unbiased; 0 over a 1 x 1 map, as in a ResNet's last block at 32 px, where one value has no spread)."""
    mean = a.mean((2, 3))
    return torch.cat([mean, a.std((2, 3)) if a[0, 0].numel() > 1 else torch.zeros_like(mean)], 1)


def pooled(a):
    """(B, C) the spatial mean of an activation (B, C, H, W)."""
    return a.mean((2, 3))


# ----------------------------------------------------------------------------- class evidence

def normalized_activation(vis_act, real_acts):
    """Activation of each visualization / max over real images; real_acts (M, N) aligned with vis_act (N,).
    NaN for a unit that no real image activates (max <= 0): no ratio to it means anything."""
    if vis_act.dim() != 1 or real_acts.dim() != 2 or real_acts.shape[1] != len(vis_act) or not len(real_acts):
        raise ValueError(f"normalized_activation needs vis_act (N,) and real_acts (M, N) with M >= 1; got shapes "
                         f"{tuple(vis_act.shape)} and {tuple(real_acts.shape)}")
    best = real_acts.max(0).values
    return vis_act / best.where(best > 0, torch.nan)


@torch.no_grad()
def transferability(other_model, images, labels):
    """Top-1 accuracy of an independently trained classifier on the class visualizations."""
    n = len(models.check_input(models.check_model(other_model, "other_model"), images))
    data.check_labels(labels, n)  # before the pass over the images; their range after it
    with models.frozen(other_model) as layout:
        logits = other_model(layout(_as_input(other_model, images)))
    models.check_logits(other_model, logits)
    labels = data.check_labels(labels, n, logits.shape[1])  # one beyond the classes would count as a miss
    return (logits.argmax(1).cpu() == labels).float().mean().item()


# ----------------------------------------------------------------------------- naturalness

def _knn_distance(queries, refs, k):
    """(Q,) mean Euclidean distance from each query to its k nearest references."""
    return torch.cdist(queries, refs).topk(min(k, len(refs)), largest=False).values.mean(1)


def knn_ratio(f_vis, vis_labels, f_train, train_y, f_held, heldout_y, k=5):
    """Mean kNN distance of each visualization to its class's training points, relative to the same for
    held-out real points of that class (1.0: as close as a real image; higher: farther). NaN when no
    visualization's class has both training and held-out points."""
    data.check_count("k", k, 1)
    vis_labels, train_y, heldout_y = (data.check_labels(y, len(f), name=name) for y, f, name in (
        (vis_labels, f_vis, "vis_labels"), (train_y, f_train, "train_y"), (heldout_y, f_held, "heldout_y")))
    ratios = []
    for c in vis_labels.unique().tolist():
        refs, held = f_train[train_y == c], f_held[heldout_y == c]
        if not len(refs) or not len(held):  # no real images of this class to compare with
            continue
        real = _knn_distance(held, refs, k).mean()
        # 0 up to cdist's rounding (its matrix products, for more than 25 points, leave about 1e-3 of a distance)
        if not real > 1e-2 * (refs - refs.mean(0)).norm(dim=1).mean():
            raise ValueError(f"the held-out points of class {c} lie on training points (kNN distance 0): held-out "
                             f"images must not be training images, and the features must not be the same for "
                             f"every image (a constant feature map)")
        ratios.append(_knn_distance(f_vis[vis_labels == c], refs, k) / real)
    return torch.cat(ratios).mean().item() if ratios else float("nan")


class Statistics:
    """The spatial statistics of every block of an independent model, standardized on real training
    images: each dimension z-scored, each block scaled to weigh the same in a distance."""

    def __init__(self, other, train_x):
        if len(models.check_input(other, train_x, "train_x")) < 2:
            raise ValueError(f"train_x must hold at least 2 images to standardize on; got {len(train_x)}")
        self.other, self.layers = other, models.block_layers(other, tuple(train_x.shape[-2:]))
        self.shape = tuple(train_x.shape[-2:])  # statistics of maps of another size are of other numbers
        ref = block_activations(other, train_x, spatial_statistics, self.layers)
        sds = [s.std(0) for s in ref]
        for layer, sd in zip(self.layers, sds):
            if not sd.any():  # z-scores would be 0/0
                raise ValueError(f"block {layer!r} of {type(other).__name__} gives the same statistics for every "
                                 f"training image (a dead block): it cannot tell images apart; train the model")
        self.mean = [s.mean(0) for s in ref]
        # a floor against 0/0 for a dead dimension, though one near it still weighs up to 100x: on CIFAR-10 the
        # notebook's independent classifier has none below it (its least varied, the whitening layer's, 1.4%)
        self.sd = [sd.clamp_min(1e-2 * sd.mean()) for sd in sds]
        self.train = self._standardize(ref)

    def __call__(self, images):
        """(N, D) the standardized statistics of images of the training images' size."""
        _check_size(images, self.shape)
        return self._standardize(block_activations(self.other, images, spatial_statistics, self.layers))

    def _standardize(self, stats):
        return torch.cat([(s - m) / sd / s.shape[1] ** 0.5 for s, m, sd in zip(stats, self.mean, self.sd)], 1)


def naturalness(other, vis, vis_labels, train_x, train_y, heldout_x, heldout_y, k=5):
    """kNN distance of each visualization to its class's training images in the spatial statistics of
    every block of the independent model `other`, relative to held-out real images of the class (1.0: as
    natural as a real image of the class; higher: less natural)."""
    for name, x, y_name, y in (("vis", vis, "vis_labels", vis_labels), ("train_x", train_x, "train_y", train_y),
                               ("heldout_x", heldout_x, "heldout_y", heldout_y)):  # before the pass over train_x
        data.check_labels(y, len(models.check_input(other, x, name)), name=y_name)
    for name, x in (("vis", vis), ("heldout_x", heldout_x)):
        _check_size(x, tuple(train_x.shape[-2:]), name)
    stats = Statistics(other, train_x)
    return knn_ratio(stats(vis), vis_labels, stats.train, train_y, stats(heldout_x), heldout_y, k)


def _check_size(images, shape, name="images"):
    """An error for images of another size than the reference images' `shape` (H, W)."""
    if tuple(images.shape[-2:]) != shape:
        raise ValueError(f"{name} are {'x'.join(map(str, images.shape[-2:]))}, the reference images "
                         f"{'x'.join(map(str, shape))}: their statistics would not compare; render at size="
                         f"{shape[0] if shape[0] == shape[1] else shape}")


def diversity(feature_model, images, groups):
    """Mean pairwise feature distance between images of the same group (target), averaged over groups."""
    n = len(models.check_input(models.check_model(feature_model, "feature_model"), images))
    data.check_labels(groups, n, name="groups")  # before the pass over the images
    return feature_diversity(features(feature_model, images), groups)


def feature_diversity(f, groups):
    """diversity() on features already computed, (N, D)."""
    groups = data.check_labels(groups, len(f), name="groups")  # one group (a target's index) per image
    means = []
    for g in groups.unique():
        fg = f[groups == g]
        if len(fg) > 1:
            d = torch.cdist(fg, fg, compute_mode="donot_use_mm_for_euclid_dist")  # copies 0 apart, of any number
            means.append(d.sum() / (len(fg) * (len(fg) - 1)))
    return torch.stack(means).mean().item() if means else float("nan")  # nan: no group has two images


def recovered(correlations, labels):
    """The share of images whose best-correlated template is their own class's; an image that correlates
    with none (NaN: a constant image) recovers nothing, not class 0."""
    return ((correlations.argmax(1) == labels) & correlations.isfinite().all(1)).float().mean().item()


def template_recovery(images, templates):
    """(T, K) Pearson correlation between each visualization and each class template; NaN for a constant
    image, which correlates with nothing."""
    data.check_batch(images)
    a = data.to_float(images).flatten(1).cpu().double()  # on the CPU first: mps has no float64
    b = data.to_float(templates, "templates").flatten(1).cpu().double()
    if images.shape[1:] != templates.shape[1:]:
        raise ValueError(f"templates must have the images' shape {tuple(images.shape[1:])}; got "
                         f"{tuple(templates.shape[1:])}")
    a, b = a - a.mean(1, keepdim=True), F.normalize(b - b.mean(1, keepdim=True), dim=1)
    norm = a.norm(dim=1, keepdim=True)
    return (a / norm.where(norm > 0, torch.nan) @ b.T).float()


class PlantedDetector:
    """Finds the classes of the harder synthetic set (data.HARD_FEATURES) wherever the feature is and
    however large: per class, the peak amplitude over positions and three scales of the image's Gabor
    response, on the class's colour axis, at its orientation and wavelength; z-scored on real training
    images. detector(images) -> (N,) the class whose feature stands out most, or -1 (no class) where none stands
    above its mean on the training images (a blank or flat image, which would otherwise name one class every
    time, right for 1 in 10): compare it with labels, never index class names with it. Fixed by the set's
    definition, not tuned on visualizations."""

    SCALES = (data.HARD_SCALE[0], 1.0, data.HARD_SCALE[1])  # the set's smallest, natural and largest scale

    def __init__(self, train_x):
        self.size = train_x.shape[-1]
        p = 2 * self.size  # zero-padded: the filter does not wrap around the border
        fy, fx = torch.fft.fftfreq(p)[:, None], torch.fft.fftfreq(p)[None, :]
        bumps, axes = [], []
        for axis, stripes, wavelength in data.HARD_FEATURES:
            for s in self.SCALES:
                lam = data.hard_wavelength((axis, stripes, wavelength), self.size, s)
                f0y, f0x = (0.0, 1 / lam) if stripes == "vertical" else (1 / lam, 0.0)
                sigma_f = 1 / (2 * math.pi * data.HARD_ENVELOPE * lam)  # the patch's envelope, in frequency
                bumps.append(torch.exp(-((fy - f0y) ** 2 + (fx - f0x) ** 2) / (2 * sigma_f ** 2)))
                axes.append(F.normalize(torch.tensor(data.COLOUR_AXES[axis]), dim=0))
        self.bumps, self.axes = torch.stack(bumps), torch.stack(axes)  # (F, P, P) one-sided, (F, 3)
        s = self.scores(train_x)
        self.mean, self.sd = s.mean(0), s.std(0)

    @torch.no_grad()
    def scores(self, images, batch_size=250):
        """(N, K) per class, the peak Gabor amplitude of each image (over positions and scales), on the CPU."""
        out, n = [], self.size
        if data.check_batch(images).shape[-2:] != (n, n):
            raise ValueError(f"images must be {n}x{n}, the side of the training images the detector was made "
                             f"for; got shape {tuple(images.shape)}")
        for x in data.to_float(images).cpu().split(batch_size):
            x = F.pad(x - x.mean((2, 3), keepdim=True), (0, n, 0, n))
            proj = torch.einsum("nchw,fc->nfhw", torch.fft.fft2(x), self.axes.to(torch.complex64))
            amp = torch.fft.ifft2(proj * self.bumps).abs()[..., :n, :n]  # (B, F, n, n)
            out.append(amp.flatten(2).max(2).values.view(len(x), -1, len(self.SCALES)).max(2).values)
        return torch.cat(out)

    def __call__(self, images):
        best = ((self.scores(images) - self.mean) / self.sd).max(1)
        return torch.where(best.values > 0, best.indices, -1)


# ----------------------------------------------------------------------------- processing path and two-choice

PATH_THRESHOLD = 0.5  # flagged: at some block, less like the unit's top natural images than the median random image


def path_percentiles(a_vis, a_top, a_random):
    """(N, L) per image and block: the percentile, among random natural images, of its similarity to
    the unit's top natural images (after Geirhos et al. 2024, "Don't trust your eyes"); NaN at a block where
    the top images' mean is the random images' (no direction to compare along).

    a_vis [(N, C_l)], a_top [(R, C_l)], a_random [(M, C_l)]: per block, pooled activations of the images,
    of the unit's top natural images and of random natural images. Similarity: the cosine between an
    image's activations and the mean of the top images', both centred on the random images' mean.
    """
    if not len(a_vis) == len(a_top) == len(a_random):
        raise ValueError(f"a_vis, a_top and a_random must give one entry per block each; got {len(a_vis)}, "
                         f"{len(a_top)} and {len(a_random)}")
    out = []
    for v, t, r in zip(a_vis, a_top, a_random):
        centre = r.mean(0)
        gap = t.mean(0) - centre
        direction = F.normalize(gap, dim=0)
        sim_v, sim_r = (F.normalize(a - centre, dim=1) @ direction for a in (v, r))
        share = (sim_v[:, None] > sim_r[None]).float().mean(1)
        # no direction where the gap is rounding next to the random images' spread (or both are 0: a dead block)
        aimless = gap.norm() <= 1e-5 * (r - centre).norm(dim=1).mean()
        out.append(torch.full_like(share, torch.nan) if aimless else share)
    return torch.stack(out, 1)


def least_similar(lowest):
    """The block that is most often an image's least similar, from lowest (N, L): True where a block is one of
    an image's least similar; an image with several gives each its share, so that a tie (percentiles move in
    steps, and a bad image is often at 0 at several blocks) does not go to the first block. None where no
    block is any image's (none has a direction to compare along)."""
    lowest = lowest.float()
    shares = (lowest / lowest.sum(1, keepdim=True).clamp_min(1)).sum(0)
    return shares.argmax().item() if shares.any() else None


def two_choice(f_refs, f_top, f_bottom):
    """Share of query pairs (f_top[j], f_bottom[j]) in which the top image is the more similar to the
    references f_refs (R, D) (cosine, averaged over the references; a tie counts half): 0.5 is chance."""
    if not len(f_refs) or not len(f_top) or f_top.shape != f_bottom.shape:
        raise ValueError(f"two_choice needs references and as many top as bottom images; got shapes "
                         f"{tuple(f_refs.shape)}, {tuple(f_top.shape)} and {tuple(f_bottom.shape)}")
    refs = F.normalize(f_refs, dim=1)
    s_top, s_bottom = ((F.normalize(f, dim=1) @ refs.T).mean(1) for f in (f_top, f_bottom))
    return ((s_top > s_bottom).float() + 0.5 * (s_top == s_bottom).float()).mean().item()  # a tie is no choice


def channel_sample(model, per_block=2, seed=0, size=None):
    """A fixed sample of channels: per_block of each block's last spatial layer (models.block_layers),
    drawn with `seed`, as Channel targets."""
    data.check_count("per_block", per_block, 1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in models.block_layers(model, size):
        n = models.layer_channels(model, layer, size)
        out += [fv.Channel(layer, c) for c in sorted(torch.randperm(n, generator=gen)[:per_block].tolist())]
    return out


# ----------------------------------------------------------------------------- the quality table

R = 10  # per unit: its 10 top test images set the path's direction, the next 10 are the two-choice queries
        # (beside its 10 weakest), the next 10 are the "dataset exemplars" row
PATH, QUERIES, EXEMPLARS = slice(0, R), slice(R, 2 * R), slice(2 * R, 3 * R)  # of a unit's top test images


def check_outputs(model, d, name="the model"):
    """An error unless the model has one output per class of the data d, naming both counts."""
    outputs = training.predict(model, d.test_x[:1]).shape[1]
    if outputs != len(d.classes):
        raise ValueError(f"{name} has {outputs} outputs but {d.name} has {len(d.classes)} classes: use a "
                         f"classifier of these classes, with the data it was trained on")


class Reference:
    """Everything a row of the quality table is compared with, computed once: the classes and the channel
    sample of `model`, their top and weakest test images, the test set through both models, and the
    spatial statistics of real training and held-out images under the independent model `other`."""

    def __init__(self, model, other, d, channels, n_ref=10000, n_random=200):
        if len(d.test_y) < 4 * R:  # a unit's top 3R and weakest R test images must not overlap
            raise ValueError(f"the quality table needs at least {4 * R} test images (each unit's top {3 * R} and "
                             f"weakest {R}); {d.name} has {len(d.test_y)}")
        check_outputs(model, d)
        check_outputs(other, d, "the independent classifier (other)")
        self.model, self.other, self.classes = model, other, list(range(len(d.classes)))
        self.units = [fv.Class(c) for c in self.classes] + list(channels)
        keep = torch.randperm(len(d.train_y), generator=torch.Generator().manual_seed(0))[:n_ref]
        self.stats = Statistics(other, d.train_x[keep])
        self.train_y, self.held, self.held_y = d.train_y[keep], self.stats(d.val_x), d.val_y
        self.test_x, self.test_y, self.templates = d.test_x, d.test_y, d.templates
        self.detector = PlantedDetector(d.train_x[:2000]) if d.name == "synthetic-hard" else None
        self.real = fv.activations(model, d.test_x, self.units)  # (N_test, U)
        # strongest first; stable, as exemplars' order: a channel's many equal (zero) images in the test set's order
        order = self.real.argsort(dim=0, descending=True, stable=True).T  # (U, N_test)
        self.top, self.bottom = order[:, :3 * R], order[:, -R:]
        self.f_test = features(other, d.test_x)
        self.layers = models.block_layers(model, d.size)
        self.a_test = block_activations(model, d.test_x, pooled, self.layers)
        self.random = torch.randperm(len(d.test_y), generator=torch.Generator().manual_seed(1))[:n_random]

    def score(self, images, channel_images=None):
        """The metrics of one image per class (in class order) and, optionally, one per channel of the
        sample, as a dict; diversity needs several images per class: diversity()."""
        images, labels, n = data.to_float(images), torch.arange(len(self.classes)), len(self.classes)
        units = labels  # unit index: the classes first, then the channels
        if channel_images is not None:
            images = torch.cat([images, data.to_float(channel_images)])
            units = torch.arange(len(images))
        acts = fv.activations(self.model, images[:n], self.classes).diagonal()
        f = features(self.other, images)
        row = dict(act=normalized_activation(acts, self.real[:, :n]).nanmean().item(),  # NaN: a class no image excites
                   transfer=transferability(self.other, images[:n], labels),
                   naturalness=knn_ratio(self.stats(images[:n]), labels, self.stats.train, self.train_y,
                                         self.held, self.held_y),
                   two_choice=self._two_choice(f[:n], units[:n]))
        if channel_images is not None:
            row["two_choice_channels"] = self._two_choice(f[n:], units[n:])
        row["path_flagged"], row["least_similar"] = self.path_check(images, units)
        if self.templates is not None:  # the synthetic set: its fixed templates
            row["planted"] = recovered(template_recovery(images[:n], self.templates), labels)
        if self.detector is not None:   # the harder synthetic set: its features found wherever they are
            row["planted"] = (self.detector(images[:n]) == labels).float().mean().item()
        return row

    def rows(self, targets):
        """Each target's index among the units."""
        return [self.units.index(u) for u in targets]

    def compared(self, targets):
        """(T, 3R + n_random) per target: the test images its images are compared with: the path's direction,
        the two-choice queries (its top 2R and weakest R) and the path check's random images."""
        rows = self.rows(targets)
        return torch.cat([self.top[rows, PATH], self.top[rows, QUERIES], self.bottom[rows],
                          self.random.expand(len(rows), -1)], 1)

    def _two_choice(self, f, units):
        """Mean over units of two_choice with the unit's images as references, its next R top test images
        against its R weakest as queries."""
        return sum(two_choice(f[units == u], self.f_test[self.top[u, QUERIES]], self.f_test[self.bottom[u]])
                   for u in units.unique().tolist()) / len(units.unique())

    def path_check(self, images, units):
        """(the share of images the path check flags, the block that is most often the least similar);
        units: (N,) each image's unit, an index into self.units."""
        a = block_activations(self.model, images, pooled, self.layers)
        p = torch.cat([path_percentiles([x[units == u] for x in a], [x[self.top[u, PATH]] for x in self.a_test],
                                        [x[self.random] for x in self.a_test]) for u in units.unique().tolist()])
        low = p.nan_to_num(math.inf).min(1, keepdim=True).values  # a block without a direction flags nothing
        block = least_similar(p == low)
        return (low < PATH_THRESHOLD).float().mean().item(), None if block is None else self.layers[block]


def _pick(d, targets, seed, avoid, shift=0):
    """One random test image per target: of the target's class (+ shift) for a Class, any for another; drawn
    evenly among those that are not one of avoid[i], the test images target i's row is compared with (where
    the whole pool is among them, among the whole pool)."""
    gen, k = torch.Generator().manual_seed(seed), len(d.classes)
    idx = []
    for t, skip in zip(targets, avoid):
        pool = (d.test_y == (t.idx + shift) % k).nonzero()[:, 0] if isinstance(t, fv.Class) else torch.arange(len(d.test_y))
        if not len(pool):
            raise ValueError(f"the real-image rows need a test image of class {(t.idx + shift) % k} "
                             f"({d.classes[(t.idx + shift) % k]}); {d.name} has none")
        kept = pool[~torch.isin(pool, skip)]
        pool = kept if len(kept) else pool
        idx.append(pool[torch.randint(len(pool), (1,), generator=gen)])
    return d.test_x[torch.cat(idx)]


def _shuffled(images, seed):
    """Each image with its pixel positions shuffled (its colours kept), by its own permutation."""
    gen, (n, c, h, w) = torch.Generator().manual_seed(seed), images.shape
    perm = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(n)])  # (N, HW)
    return images.flatten(2).gather(2, perm[:, None].expand(n, c, h * w)).view(n, c, h, w)


def baselines(d, ref):
    """name -> fn(targets, seed) -> images for the rows every table shows beside the techniques: real test
    images and the dataset exemplars (which should score well), and the known-bad inputs uniform noise,
    shuffled pixels and real images of another class (which must score badly on what they miss)."""
    shape = d.test_x.shape[1:]
    return {
        "real test images": lambda t, seed: _pick(d, t, seed, ref.compared(t)),
        "dataset exemplars": lambda t, seed: d.test_x[ref.top[ref.rows(t), EXEMPLARS][:, seed % R]],
        "uniform noise": lambda t, seed: torch.rand(len(t), *shape, generator=torch.Generator().manual_seed(seed)),
        "shuffled pixels": lambda t, seed: _shuffled(_pick(d, t, seed, ref.compared(t)), seed),
        "another class": lambda t, seed: (_pick(d, t, seed, ref.compared(t), shift=1) if isinstance(t[0], fv.Class)
                                          else None),
    }


def quality_table(model, other, d, techniques, seeds=4, steps=256, n_ref=10000, channels=None, progress=True):
    """Score the baselines and every technique on the classes and a fixed sample of channels
    (channel_sample(model) unless given; "layer:n" strings too), each seed apart: every metric is its mean over
    the seeds, with its standard deviation under name + "_sd", and "seconds" the time per seed (its class and
    channel renders and their scoring; NaN for the baselines). Returns (rows, grid): metric dicts, and seed-0 class
    images.

    techniques: name -> Technique (as featureviz.techniques() returns), or name -> fn(targets, seed)
    returning images (or None for channel targets it cannot render), for renderers of other libraries.
    """
    _check_techniques(techniques)
    models.check_model(other, "other")
    for name, value, low in (("seeds", seeds, 1), ("steps", steps, 0), ("n_ref", n_ref, 1)):
        data.check_count(name, value, low)
    if seeds > R:
        data.warn(f"seeds={seeds}: the dataset exemplars row has {R} images per unit (its top test images "
                  f"{2 * R + 1}-{3 * R}), so its seeds past {R} take them again and its spread is not of new draws")
    channels = channel_sample(model, size=d.size) if channels is None else _as_channels(channels)
    if not all(isinstance(c, (fv.Channel, fv.Neuron, fv.Direction)) for c in channels):  # an int would be a class
        raise TypeError(f"channels must be Channel, Neuron or Direction targets (as channel_sample(model) returns); "
                        f"got {[type(c).__name__ for c in channels]}")
    ref = Reference(model, other, d, channels, n_ref)
    classes, rows, grid = ref.units[:len(d.classes)], [], {}
    makers = {**baselines(d, ref), **{name: _renderer(how, model, steps, d.size) for name, how in techniques.items()}}
    for name, make in tqdm(makers.items(), desc="quality table", disable=not progress):
        start, per_seed, images = time.perf_counter(), [], []
        for seed in range(seeds):
            images.append(_one_each(name, make(classes, seed), classes))
            per_seed.append(ref.score(images[-1], _one_each(name, make(channels, seed), channels) if channels else None))
        seconds = (time.perf_counter() - start) / seeds if name in techniques else float("nan")
        blocks = Counter(r["least_similar"] for r in per_seed)
        row = dict(technique=name, seconds=seconds, least_similar=blocks.most_common(1)[0][0])
        for k in per_seed[0]:
            if k != "least_similar":
                values = torch.tensor([r[k] for r in per_seed])
                row[k], row[k + "_sd"] = values.mean().item(), values.std().item() if seeds > 1 else float("nan")
        row["diversity"] = diversity(other, torch.cat(images), torch.arange(len(classes)).repeat(seeds))
        rows.append(row)
        grid[name] = images[0]
    return rows, grid


RANKED_BY = ("naturalness", "path_flagged")


def _off_real(row, key):
    """How far a row is from real images on a ranked metric, lower is better, and its spread over the seeds
    (0 where the row has none): the share the path check flags as it is; naturalness as its distance from a
    real image's 1.0 either way (|log|), since images closer to the training images than held-out real ones are
    copied from them, not more natural, its spread SD / value (to first order)."""
    value, sd = row[key], row.get(key + "_sd", math.nan)
    sd = 0.0 if math.isnan(sd) else sd  # one seed: no spread, only equal values tie
    if key != "naturalness":
        return value, sd
    return (abs(math.log(value)), sd / value) if value > 0 else (math.inf, 0.0)  # 0: on k training images at once


def rank_techniques(rows, names):
    """The rows of the named techniques, best first: by the sum of their ranks on naturalness and on
    the path check (_off_real: lower is better on both), among the techniques whose class evidence holds
    (normalized activation > 1 and transfer >= 0.9) and whose scores are numbers (not NaN); values within the
    seed spread of each other tie (_tied_ranks), and equal sums go to the more natural (then by name), so the
    order of the rows does not matter. names: technique names, or one name."""
    names = models.as_names(names, "names")  # one name is not its substrings ('pixel' in 'pixel+reg')
    candidates = [r for r in rows if r["technique"] in names and r["act"] > 1.0 and r["transfer"] >= 0.9
                  and all(math.isfinite(r[key]) for key in RANKED_BY)]
    sums = [sum(ranks) for ranks in zip(*(_tied_ranks([_off_real(r, key) for r in candidates]) for key in RANKED_BY))]
    ranks = {r["technique"]: total for r, total in zip(candidates, sums)}
    return sorted(candidates, key=lambda r: (ranks[r["technique"]], _off_real(r, "naturalness")[0], r["technique"]))


def _tied_ranks(scores):
    """0-based ranks of (value, spread) pairs, lowest value first. In value order, neighbours within their
    spreads together (sqrt(sd1^2 + sd2^2), as for independent rows) join one group, whose members share its
    average rank: a difference inside the spread decides no place, and no group ranks before one of lower
    values. Without spreads, equal values tie."""
    groups = []
    for i in sorted(range(len(scores)), key=lambda i: scores[i][0]):
        if groups and _within(scores[groups[-1][-1]], scores[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    ranks, start = [0.0] * len(scores), 0
    for group in groups:
        for i in group:
            ranks[i] = start + (len(group) - 1) / 2
        start += len(group)
    return ranks


def _within(a, b):
    """Whether two (value, spread) pairs lie within their spreads together (inf == inf: equal)."""
    return a[0] == b[0] or abs(a[0] - b[0]) <= math.hypot(a[1], b[1])


def _as_channels(channels):
    """The quality table's channel targets as a list (from a generator too): "layer:n" strings as Channels, Lucent's
    way of writing them; [] for none."""
    channels = [channels] if isinstance(channels, str) else list(channels)
    try:
        return [fv.as_targets(c)[0] if isinstance(c, str) else c for c in channels]
    except TypeError as e:  # a string that is no "layer:n"
        raise TypeError(f"channels: {e}") from None


def _check_techniques(techniques):
    """Before any work: techniques must map names to Techniques or renderers fn(targets, seed)."""
    if not isinstance(techniques, dict):
        raise TypeError(f"techniques must map names to techniques, as featureviz.techniques() returns; got "
                        f"{type(techniques).__name__}")
    for name, how in techniques.items():
        if not callable(how):
            hint = f" (featureviz.techniques(...)[{how!r}] is that technique)" if isinstance(how, str) else ""
            raise TypeError(f"techniques[{name!r}] must be a Technique or a renderer fn(targets, seed) -> images; "
                            f"got {how!r}{hint}")


def _one_each(name, images, targets):
    """A renderer's images (or None: none for these targets), checked to be one per target, as the table
    scores them (a Technique with images_per_target=2 gives two)."""
    if images is not None and len(images) != len(targets):
        raise ValueError(f"{name!r} gave {len(images)} images for {len(targets)} targets: the quality table scores "
                         f"one image per target (images_per_target=1)")
    return images


def _renderer(how, model, steps, size):
    """fn(targets, seed) -> images of a Technique (an outside renderer's fn is already one)."""
    if not isinstance(how, fv.Technique):
        return how
    return lambda targets, seed: how(model, targets, steps=steps, seed=seed, size=size, progress=False).images


COLUMNS = dict(technique="technique", seconds="s / seed", act="normalized activation", transfer="transfer top-1",
               naturalness="naturalness", path_flagged="path flagged", least_similar="least similar block",
               two_choice="two-choice classes", two_choice_channels="two-choice channels", diversity="diversity",
               planted="planted recovery")


def format_table(rows):
    """Markdown table of quality_table rows: mean ± SD over the seeds; "-" where a row has no value."""
    if not rows:
        raise ValueError("rows is empty: no row to tabulate (rank_techniques keeps only the techniques that reach "
                         "their units, act > 1, and that another model reads, transfer >= 0.9)")
    keys = [k for k in COLUMNS if k in rows[0]]
    lines = ["| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _cell(row, key):
    value, sd = row.get(key, float("nan")), row.get(key + "_sd", float("nan"))
    if isinstance(value, str):
        return value
    return "-" if value is None or value != value else f"{value:.2f}" + ("" if sd != sd else f" ± {sd:.2f}")
