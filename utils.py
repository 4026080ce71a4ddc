"""Plotting helpers only: image grids, learning curves, confusion matrix, filters, feature maps, heatmaps.

Images are tensors (or arrays) of shape (N, C, H, W), C = 1 or 3, floats in [0, 1] or uint8 in 0..255;
1-channel images are shown in gray. Every function returns the Figure; `save=path` also writes it
(atomically). No backend is forced here, so notebooks keep their inline backend. The figure stays open, as
the notebook shows it at the cell's end: a script that draws many closes each (`plt.close(fig)`).
"""
import argparse
import csv
import functools
import math
import numbers
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.colors import PowerNorm
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
import torch.nn.functional as F

from attribution import to_heatmap
from data import atomic_write, check_count, check_labels, to_float
from metrics import check_confusion

# ----------------------------------------------------------------------------- helpers


def _numpy_images(images, name="images"):
    """(N, C, H, W) tensor/array (or a list of (C, H, W) ones), float [0, 1] or uint8 -> float array
    (N, H, W, 3) or (N, H, W) if gray; a clear error, naming the argument, for any other shape."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(im) for im in images])
    given = torch.as_tensor(images).detach().cpu()
    x = given[None] if given.dim() == 3 else given
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        hint = (" (channels last? pass images.permute(0, 3, 1, 2))" if given.dim() == 4 and given.shape[-1] in (1, 3)
                else " (one image channels last? pass image.permute(2, 0, 1))" if given.dim() == 3 and given.shape[-1] in (1, 3)
                else " (gray images (N, H, W)? pass images[:, None])" if given.dim() == 3 else "")
        raise ValueError(f"{name} must be (N, C, H, W) or one (C, H, W), with C = 1 or 3; got shape "
                         f"{tuple(given.shape)}{hint}")
    x = to_float(x, name)
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def _clean(ax):
    """No ticks or frame, but keep the axis labels visible (row labels live in ylabel)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _imshow(ax, img, **kwargs):
    """Show one (H, W, 3) or gray (H, W) image in [0, 1]."""
    gray = img.ndim == 2
    kwargs = dict(cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest") | kwargs
    ax.imshow(img, **kwargs)
    _clean(ax)


def _grid(n, ncols, size=1.4, extra_height=0.0):
    """A figure with a grid of at least n axes (squeezed to 2D), ncols wide."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + extra_height) * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def _name(label, classes):
    """Class name of an int label (or the label itself as text), broken into lines of at most 14 characters
    so that a long one ('American Staffordshire terrier') does not run into its neighbours' titles."""
    if not isinstance(label, str):
        label = int(label)
        if classes is not None and not 0 <= label < len(classes):
            raise ValueError(f"label {label} is not a class index in 0..{len(classes) - 1} ({len(classes)} classes)")
        label = classes[label] if classes is not None else str(label)
    return _wrap(label, 14)


def _wrap(label, width):
    """A label as text in lines of at most `width` characters, the lines it has kept."""
    return "\n".join(textwrap.fill(line, width) for line in str(label).splitlines())


MOST_COLUMNS = 32  # images side by side in one row: 33 would make a figure over 50 inches wide
MOST_IMAGES = 512  # images in one grid: 10,000 would make a figure 1,400 inches tall


def _check_columns(name, n, beside=0):
    """An error, naming the argument, for a row of n images and `beside` others (the visualization beside its
    exemplars) wider than MOST_COLUMNS, which no screen shows (and past 400 matplotlib cannot draw)."""
    most = MOST_COLUMNS - beside
    if n > most:
        where = " beside the rest" if beside else ""
        raise ValueError(f"{name} has {n} images side by side; at most {most} fit a row{where}: pass the first "
                         f"{most}, or plot them in parts")


def figure_file(text):
    """An argparse type: the path of a figure in a format matplotlib writes, named by its suffix (none: png),
    checked before a benchmark's run rather than at its end."""
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(text).suffix[1:].lower() not in ("", *formats):  # as savefig reads it
        raise argparse.ArgumentTypeError(f"{text!r} is no figure format matplotlib writes; end it in one of "
                                         f"{', '.join('.' + f for f in sorted(formats))}")
    return text


def _finish(fig, save):
    """Lay out the figure and, if `save` is a path, write it atomically (data.atomic_write)."""
    fig.tight_layout()
    if save is not None:
        path = Path(save).expanduser()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png", bbox_inches="tight"))
    return fig


def _symmetric(x, eps=1e-12):
    """Scale an array by its largest |value| to [-1, 1], 0 kept at 0 (a zero array stays zeros)."""
    x = np.asarray(x, dtype=np.float64)
    return x / max(np.abs(x).max(), eps)


def _no_figure_on_error(plot):
    """A plot that raises closes the figures it opened: half-drawn, they would pile up in a script and
    show under the traceback in a notebook."""
    @functools.wraps(plot)
    def wrapped(*args, **kwargs):
        before = set(plt.get_fignums())
        try:
            return plot(*args, **kwargs)
        except BaseException:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
            raise
    return wrapped


# ----------------------------------------------------------------------------- plots
# Each is wrapped in _no_figure_on_error.


@_no_figure_on_error
def show_images(images, labels=None, classes=None, ncols=10, title=None, save=None):
    """A grid of images, each titled with its class name when labels are given."""
    check_count("ncols", ncols, 1)
    _check_columns("ncols", ncols)
    x = _numpy_images(images)
    if len(x) > MOST_IMAGES:
        raise ValueError(f"images has {len(x)} images; at most {MOST_IMAGES} fit one figure: pass the first "
                         f"{MOST_IMAGES}, or plot them in parts")
    if labels is not None and len(labels) != len(x):
        gray = (" (a (3, H, W) tensor is one colour image: pass 3 gray ones as images[:, None])"
                if len(x) == 1 and len(labels) == 3 else "")
        raise ValueError(f"labels must give one label per image: {len(x)} images, {len(labels)} labels{gray}")
    names = labels is not None and [isinstance(label, str) for label in labels]
    if names and any(names) and not all(names):
        raise ValueError("labels must be all names or all class indices, not both")
    if names and not any(names):
        labels = check_labels(labels, len(x))  # integers, one per image (_name names one out of range)
    fig, axes = _grid(len(x), ncols, extra_height=0.2 if labels is not None else 0)
    for i, ax in enumerate(axes.flat[: len(x)]):
        _imshow(ax, x[i])
        if labels is not None:
            ax.set_title(_name(labels[i], classes), fontsize=9)
    if title:
        fig.suptitle(title)
    return _finish(fig, save)


TITLES = dict(loss="loss", acc="accuracy", bpd="negative ELBO (bits/dim)", nll="reconstruction NLL (nats per image)",
              kl="KL (nats per image)")


@_no_figure_on_error
def plot_curves(rows, metrics=("loss", "acc"), save=None):
    """One panel per metric (a name or several; default loss and accuracy), train vs val per epoch, from
    metric rows (dicts, strings allowed) or a CSV path."""
    if isinstance(rows, (str, Path)):
        with open(rows, newline="") as f:
            rows = list(csv.DictReader(f))

    def column(key):
        return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not rows or "epoch" not in rows[0]:
        raise ValueError("rows must be one metric row (a dict with an 'epoch' key) per epoch, or the CSV a fit "
                         f"wrote; got {'no rows' if not rows else 'columns ' + ', '.join(map(str, rows[0]))}")
    recorded = sorted({k.split("_", 1)[1] for k in rows[0] if k.startswith(("train_", "val_"))})
    unknown = [m for m in metrics if m not in recorded]
    if unknown:
        raise ValueError(f"no train_ or val_ column for metric(s) {unknown}; these rows record "
                         f"{', '.join(recorded)}")
    epochs = column("epoch")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split in ("train", "val"):
            if f"{split}_{metric}" in rows[0]:
                ax.plot(epochs, column(f"{split}_{metric}"), marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no tick at 0.98 for a run of one epoch
        ax.set_title(TITLES.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend()
    return _finish(fig, save)


@_no_figure_on_error
def plot_confusion(cm, classes=None, normalize=True, save=None):
    """Confusion matrix (rows true, cols predicted); colour is the row fraction if normalize, text the counts
    (up to 30 classes; a matrix of fractions is written to two decimals), the class names (default: the
    indices) on the axes (every n-th past 100 classes)."""
    classes = [str(i) for i in range(len(cm))] if classes is None else classes
    counts = np.asarray(check_confusion(cm, classes).detach().cpu(), dtype=np.float64)  # (K, K)
    rows = counts.sum(1, keepdims=True)
    shown = counts / np.where(rows > 0, rows, 1) if normalize else counts  # a matrix of fractions too
    k = len(classes)
    cell = min(0.6, 30 / k)  # inches: past 50 classes the matrix stays 30 inches wide (60 for 100 at 0.6)
    fig, ax = plt.subplots(figsize=(cell * k + 2.5, cell * k + 1.5))
    # a square-root scale: a confusion of 10% (a well-trained model's largest) shows as a third of the colour range,
    # where a linear one left every cell off the diagonal near white
    im = ax.imshow(shown, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1 if normalize else max(shown.max(), 1)))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label=f"{'fraction of true class' if normalize else 'count'} (square-root scale)")
    every = math.ceil(k / 100)  # past 100 classes, every n-th name, so that names stay 0.3 inch apart
    ticks, names = range(0, k, every), list(classes)[::every]
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    digits = 0 if np.all(counts == np.round(counts)) else 2
    for i in range(k if k <= 30 else 0):  # beyond 30 classes the counts would not fit their cells
        for j in range(k):
            ax.text(j, i, f"{counts[i, j]:.{digits}f}", ha="center", va="center", fontsize=8,
                    color="white" if im.norm(shown[i, j]) > 0.6 else "black")  # white text on dark cells
    return _finish(fig, save)


@_no_figure_on_error
def plot_misclassified(images, true, pred, classes=None, n=16, save=None):
    """The first n images whose prediction is wrong, titled 'True: cat / Pred: dog' (by index where classes
    is None). true and pred: one class index per image (pred: the predicted classes, logits.argmax(1), not the
    logits)."""
    check_count("n", n, 1)
    k = None if classes is None else len(classes)
    true, pred = (check_labels(y, len(images), k, name) for y, name in ((true, "true"), (pred, "pred")))
    wrong = (true != pred).nonzero().flatten()[:n]
    if len(wrong) == 0:
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
        return _finish(fig, save)
    x = _numpy_images(torch.as_tensor(images)[wrong])
    fig, axes = _grid(len(x), 8, size=1.5, extra_height=0.4)
    for ax, img, i in zip(axes.flat, x, wrong.tolist()):
        _imshow(ax, img)
        ax.set_title(f"True: {_name(true[i], classes)}\nPred: {_name(pred[i], classes)}", fontsize=8)
    return _finish(fig, save)


@_no_figure_on_error
def plot_filters(weight, save=None, ncols=16):
    """Conv filters (O, I, kh, kw): RGB when I == 3, else the first input channel in gray (the title says so past
    one); each scaled by its largest |weight| shown around mid-gray (0), so that a flat filter shows as flat and a
    colour-opponent one as the colours it adds (brighter) and takes away (darker). ncols: filters per row."""
    check_count("ncols", ncols, 1)
    w = torch.as_tensor(weight).detach().cpu().float().numpy()
    if w.ndim != 4:
        raise ValueError(f"weight must be convolution filters (O, I, kh, kw), such as a Conv2d's weight; got shape "
                         f"{tuple(w.shape)}")
    inputs = w.shape[1]
    w = w if inputs == 3 else w[:, :1]
    fig, axes = _grid(len(w), ncols, size=0.8)
    for ax, f in zip(axes.flat, w):
        f = 0.5 + 0.5 * _symmetric(f)
        _imshow(ax, f.transpose(1, 2, 0) if f.shape[0] == 3 else f[0])  # (kh, kw, 3) or (kh, kw)
    if inputs not in (1, 3):
        fig.suptitle(f"input channel 0 of {inputs}", fontsize=10)
    return _finish(fig, save)


@_no_figure_on_error
def plot_feature_maps(feature_maps, max_channels=8, image=None, save=None, most_active=True):
    """One row per layer of (C, H, W) maps of one image: the most active (highest mean, or the first)
    max_channels channels, each in its own colour range, which its title gives, [lowest, highest] (a faint or
    nearly flat channel looks as contrasted as a strong one: its range says which it is)."""
    check_count("max_channels", max_channels, 1)
    _check_columns("max_channels", max_channels, image is not None)
    if not feature_maps:
        raise ValueError("feature_maps must name at least one layer: {layer name: its (C, H, W) map}, as "
                         "models.capture returns")
    ncols = max_channels + (image is not None)
    fig, axes = plt.subplots(len(feature_maps), ncols, figsize=(1.3 * ncols, 1.4 * len(feature_maps)), squeeze=False)
    for row, (name, fmap) in zip(axes, feature_maps.items()):
        fmap = torch.as_tensor(fmap).detach().cpu().float()
        fmap = fmap[0] if fmap.dim() == 4 else fmap  # (C, H, W)
        if fmap.dim() != 3:
            raise ValueError(f"layer {name!r} gives {tuple(fmap.shape)}, not a (C, H, W) feature map: leave out layers "
                             f"without a spatial output (the head, a linear layer)")
        k = min(max_channels, len(fmap))
        channels = fmap.mean((1, 2)).argsort(descending=True)[:k] if most_active else torch.arange(k)
        cells = row[1:] if image is not None else row
        for ax in row:
            ax.set_visible(False)
        for ax, c in zip(cells, channels.tolist()):
            ax.set_visible(True)
            ax.imshow(fmap[c].numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {c} [{fmap[c].min().item():.2g}, {fmap[c].max().item():.2g}]", fontsize=8)
            _clean(ax)
        cells[0].set_ylabel(_wrap(name, 16), fontsize=9)  # upright, a long name wrapped: the maps keep their width
    if image is not None:
        axes[0, 0].set_visible(True)
        _imshow(axes[0, 0], _numpy_images(image, "image")[0])
        axes[0, 0].set_title("input", fontsize=8)
    return _finish(fig, save)


@_no_figure_on_error
def plot_heatmaps(images, maps, titles=None, row_labels=None, signed=None, save=None, outliers=1.0):
    """The images on top, then one row per method with its map (normalized per image) overlaid: (B, h, w), or
    (B, C, h, w) attributions, reduced to one map per image as attribution.to_heatmap does. An unsigned map runs
    from its lowest value (blue) to its highest (red); a signed method (to_heatmap(..., signed=True)) is shown
    around 0: red positive, blue negative, white 0, its row label says so. The top `outliers` percent of each
    map's values (of |value| if signed) saturate, so that one extreme pixel cannot wash out the rest (captum's
    visualize_image_attr clips too, where the values that hold the top 2% of the map's total mass begin: for a
    peaky map that is fewer pixels); 0 scales by the extreme. A flat map is left off, its image marked.

    maps: one method's maps (named "map"), or {method name: maps}. titles: one per image. row_labels: one per
    method (the top row is 'input'), or one more to name the top row too; default the method names. signed:
    True or False for every method, or the names of the signed ones; default those whose maps have a negative
    value. A map smaller than its image is stretched evenly over it (bilinear, as pytorch-grad-cam draws it),
    which misplaces a layer's cells where its map does not span the image evenly: grad_cam's default
    (upsample="centres") gives image-sized maps with each cell where it looks."""
    x = _numpy_images(images)
    _check_columns("images", len(x))
    if not len(x):
        raise ValueError("images must hold at least one image; got none")
    ok = not isinstance(outliers, bool) and isinstance(outliers, numbers.Real) and 0 <= outliers < 50
    if not ok:
        raise ValueError(f"outliers must be a percentage from 0 to under 50 (the share of each map's values that "
                         f"saturate); got {outliers!r}")
    if isinstance(maps, (list, tuple)):
        raise ValueError("maps must be one method's maps (B, h, w) or {method name: maps}; got a "
                         f"{type(maps).__name__} of {len(maps)}: name them in a dict")
    maps = maps if isinstance(maps, dict) else {"map": maps}
    signed = _signed_methods(signed, list(maps))
    labels = _row_labels(row_labels, list(maps))
    if titles is not None and len(titles) != len(x):
        raise ValueError(f"titles must have one per image ({len(x)}); got {len(titles)}")
    # signed maps around 0 (min-max scaling would put their zero at an arbitrary colour); attributions (B, C, h, w)
    # are read as signed before their channels are summed, which would drop the sign
    around_zero = {name: bool((torch.as_tensor(m) < 0).any()) if signed is None else name in signed
                   for name, m in maps.items()}
    heat = {name: _heatmap(name, m, x, around_zero[name]) for name, m in maps.items()}
    fig, axes = plt.subplots(1 + len(maps), len(x), figsize=(1.6 * len(x), 1.6 * (1 + len(maps))), squeeze=False)
    for j, img in enumerate(x):
        _imshow(axes[0, j], img)
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=9)
    for row, (name, m) in zip(axes[1:], heat.items()):
        for ax, img, mj in zip(row, x, m.numpy()):
            _imshow(ax, img)
            shown = _overlay(mj, around_zero[name], outliers)
            if shown is None:
                ax.set_xlabel("flat map", fontsize=8)
                continue
            ax.imshow(shown, cmap="RdBu_r" if around_zero[name] else "jet", alpha=0.5,
                      vmin=-1 if around_zero[name] else 0, vmax=1, interpolation="bilinear")
    for ax, label, method in zip(axes[:, 0], labels, [None, *maps]):
        ax.set_ylabel(f"{label}\n(red +, blue −)" if around_zero.get(method) else label, fontsize=9)
    return _finish(fig, save)


def _signed_methods(signed, methods):
    """The set of methods that plot_heatmaps shows signed, from its `signed` (None: to be read from the maps)."""
    if signed is None:
        return None
    if isinstance(signed, bool):
        return set(methods) if signed else set()
    names = {signed} if isinstance(signed, str) else set(signed)  # one method's name, or several
    if not names <= set(methods):
        raise ValueError(f"signed must be True, False or names among the methods {', '.join(map(str, methods))}; "
                         f"got {sorted(map(str, names))}")
    return names


def _row_labels(row_labels, methods):
    """['input', *labels of the methods]: row_labels names the methods, or the top row and the methods."""
    if row_labels is None:
        return ["input", *methods]
    if len(row_labels) == len(methods):
        return ["input", *row_labels]
    if len(row_labels) == len(methods) + 1:
        return list(row_labels)
    raise ValueError(f"row_labels must name the {len(methods)} method(s) ({', '.join(map(str, methods))}), or the "
                     f"top row and them ({len(methods) + 1}); got {len(row_labels)}")


def _overlay(m, signed, outliers):
    """One map (h, w) scaled for its overlay: around 0 to [-1, 1] if signed, else from its lowest value to [0, 1],
    the top `outliers` percent saturated, but never scaled by less than 1% of its extreme: a sparse map (a few
    peaks over float noise) keeps its peaks and its noise stays dark. None for a flat map (a constant, up to float
    rounding), which has nothing to show."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = m.min(), m.max()
    if hi - lo <= 1e-6 * max(abs(lo), abs(hi)):
        return None
    size = np.abs(m) if signed else m - lo
    top = max(np.percentile(size, 100 - outliers, method="lower"), 0.01 * size.max())  # lower: a value of the map
    return np.clip(m / top, -1, 1) if signed else np.clip(size / top, 0, 1)


def _heatmap(name, maps, x, signed):
    """One method's maps as (N, H, W) at the size of the images x (N, H, W[, 3]), as to_heatmap(maps, signed)
    reduces them."""
    given = torch.as_tensor(maps).detach().cpu().float()
    m = to_heatmap(given, signed) if given.dim() == 4 else (given[None] if given.dim() == 2 else given)  # (N, h, w)
    if m.dim() != 3 or len(m) != len(x):
        raise ValueError(f"maps of {name!r} must be one per image ({len(x)}): (B, h, w), or attributions (B, C, h, w); "
                         f"got shape {tuple(given.shape)}")
    bad = (~torch.isfinite(m)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"maps of {name!r} hold NaN or inf for image(s) {bad}: a plot would draw them blank (the "
                         f"model's logits or gradients overflowed?)")
    if m.shape[-2:] != x.shape[1:3]:
        m = F.interpolate(m[:, None], size=x.shape[1:3], mode="bilinear")[:, 0]
    return m


@_no_figure_on_error
def comparison_grid(rows, col_labels=None, max_cols=16, save=None):
    """A grid of images: one row per entry of `rows` (label -> (N, C, H, W)), labels left and on top (broken into
    lines of 20 and 14 characters, as many as fit a row's height and a column's width). Past
    max_cols columns (100 classes, say) the grid wraps: the rows again for each further max_cols columns (a
    row with fewer images is left blank there)."""
    check_count("max_cols", max_cols, 1)
    if not rows:
        raise ValueError("rows must name at least one row: {label: its images (N, C, H, W)}")
    # one (C, H, W) image: one column
    shown = {label: _numpy_images(images, f"rows[{label!r}]") for label, images in rows.items()}
    ncols = max(len(x) for x in shown.values())
    if col_labels is not None and len(col_labels) > ncols:
        raise ValueError(f"col_labels must have at most one label per column ({ncols}); got {len(col_labels)}")
    width, bands = min(ncols, max_cols), math.ceil(ncols / max_cols)
    fig, axes = plt.subplots(len(rows) * bands, width, figsize=(1.4 * width, 1.5 * len(rows) * bands), squeeze=False)
    labels = list(col_labels or [])
    for band in range(bands):
        block, first = axes[band * len(rows):(band + 1) * len(rows)], band * width  # its rows; its first column
        for row, (label, x) in zip(block, shown.items()):
            for j, ax in enumerate(row, first):
                if j < len(x):
                    _imshow(ax, x[j])
                else:
                    ax.set_visible(False)
            row[0].set_ylabel(_wrap(label, 20), fontsize=9)  # lines a row high (1.5 inches)
        for column, label in zip(block.T, labels[first:first + width]):  # on its first image, whichever row has it
            next(ax for ax in column if ax.get_visible()).set_title(_wrap(label, 14), fontsize=9)
    return _finish(fig, save)


@_no_figure_on_error
def plot_activation_atlas(atlas, classes=None, save=None):
    """An activation atlas (atlas.activation_atlas) as one picture: each rendered cell at its place on the grid,
    framed in the colour of its samples' most common class (the legend names them), the cells left out blank."""
    x = _numpy_images(atlas.images, "atlas.images")
    x = np.repeat(x[..., None], 3, -1) if x.ndim == 3 else x  # gray renders in colour frames
    _, h, w, _ = x.shape
    pad = max(1, h // 16)  # the frame: 2 px at 32
    tall, wide = h + 2 * pad, w + 2 * pad
    canvas = np.ones((atlas.grid * tall, atlas.grid * wide, 3))
    colours = class_colours(len(classes) if classes is not None else int(atlas.classes.max()) + 1)
    for image, row, col, label in zip(x, atlas.rows.tolist(), atlas.cols.tolist(), atlas.classes.tolist()):
        canvas[row * tall:(row + 1) * tall, col * wide:(col + 1) * wide] = colours(label)[:3]
        canvas[row * tall + pad:row * tall + pad + h, col * wide + pad:col * wide + pad + w] = image
    fig, ax = plt.subplots(figsize=(0.6 * atlas.grid + 2.5, 0.6 * atlas.grid))
    _imshow(ax, canvas)
    ax.legend(handles=[Patch(color=colours(c), label=_name(c, classes)) for c in sorted(set(atlas.classes.tolist()))],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(f"activation atlas of {atlas.layer}: {len(x)} cells, {int(atlas.counts.sum())} samples", fontsize=10)
    return _finish(fig, save)


def class_colours(count):
    """A colour map of `count` classes, one colour each: tab10's, tab20's, or past 20 as many hues around the wheel."""
    return plt.get_cmap("tab10" if count <= 10 else "tab20" if count <= 20 else "hsv", None if count <= 20 else count)


@_no_figure_on_error
def plot_spectrum(eigenvalues, title="latent covariance spectrum", save=None):
    """Sorted eigenvalues on a log scale, with the cumulative share of variance. Eigenvalues at or below 0 (a
    direction of no variance, or float rounding below one) have no place on a log scale: they are left off,
    and the legend counts them."""
    ev = torch.as_tensor(eigenvalues).detach().cpu().double().sort(descending=True).values.clamp_min(0).numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    n = np.arange(1, len(ev) + 1)
    a.semilogy(n[ev > 0], ev[ev > 0], marker=".", label=f"{(ev <= 0).sum()} at 0 left off" if (ev <= 0).any() else None)
    a.axhline(1.0, color="gray", ls="--", lw=1, label="N(0, I) prior: 1")
    a.set_xlabel("component")
    a.set_ylabel("variance (eigenvalue)")
    a.set_title(title)
    a.legend(fontsize=8)
    if ev.sum() > 0:
        b.plot(n, np.cumsum(ev) / ev.sum())
    else:  # no variance at all (codes of identical images): no shares to plot
        b.text(0.5, 0.5, "no variance", ha="center", va="center", transform=b.transAxes)
    b.set_xlabel("components")
    b.set_title("cumulative share of variance")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _finish(fig, save)


@_no_figure_on_error
def plot_unit(image, exemplars, values=None, title=None, mark=None, save=None):
    """A visualization (C, H, W) beside the dataset images that excite the same unit (with activations). mark:
    (y, x) in pixels, where the unit looks (a neuron's, featureviz.looks_at), ringed on every image, the
    visualization's too (rendered at the exemplars' size, as visualize_unit does by default)."""
    ex, shown = _numpy_images(exemplars, "exemplars"), _numpy_images(image, "image")[0]
    _check_columns("exemplars", len(ex), 1)  # and the visualization
    if values is not None and len(values) != len(ex):
        raise ValueError(f"values must give one activation per exemplar ({len(ex)}); got {len(values)}")
    if mark is not None and shown.shape[:2] != ex.shape[1:3]:
        raise ValueError(f"mark is a pixel of the exemplars ({ex.shape[1]}x{ex.shape[2]}), which the visualization "
                         f"({shown.shape[0]}x{shown.shape[1]}) does not share: render it at the exemplars' size")
    fig, axes = plt.subplots(1, len(ex) + 1, figsize=(1.5 * (len(ex) + 1), 2.0), squeeze=False)
    _imshow(axes[0, 0], shown)
    axes[0, 0].set_title("visualization", fontsize=9)
    for k, (ax, img) in enumerate(zip(axes[0, 1:], ex)):
        _imshow(ax, img)
        if values is not None:
            ax.set_title(f"{float(values[k]):.2f}", fontsize=9)
    if mark is not None:
        for ax in axes[0]:
            ax.autoscale(False)  # the axes keep the image's extent
            ax.plot(mark[1], mark[0], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="red",
                    markeredgewidth=1.5)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, save)
