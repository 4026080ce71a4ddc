"""The atlas: a static site of every channel of a trained classifier, browsable offline; and the activation
atlas of one layer (`activation_atlas`, at the end), one picture of what the layer tells apart across the data.

    python atlas.py --dataset cifar10-jpeg      # the notebooks' checkpoints -> outputs/atlas/index.html
    index = atlas.build_atlas(model, d, vae)     # from Python; returns the path of index.html

- index.html: every layer (its channel count and a strip of its most class-selective channels) and
  every class;
- one page per layer: every channel as a card with its visualization under two techniques, its top
  and bottom test images with their activations, and its mean activation per class as a bar chart;
- one page per class: its visualizations, its top test images, the classes it is confused with, and
  the channels of the last block that add most to its logit, each linking to its card;
- the activation atlas of the model's last spatial layer on the test images (`activation_atlas`): its cells in
  their places on the grid, framed in their most common class's colour, each linking to the cell's card (its
  classes and its first test images).

Plain HTML and CSS with PNG images: no server, no network, no JavaScript; it opens from the file
system and can be shared as a folder. Each layer is one render of all its channels and one pass over
the test set. Every finished layer is recorded in atlas.json under a key of the model, the VAE, their
device, the data and the settings: an interrupted build resumes at the next layer, and a build under another key
starts afresh beside the old atlas (`staging`), which it replaces when whole, so stale pages are never reused and
an atlas is never lost to a rebuild that stops; the layers are not in the key, so adding one renders only it.
"""
import argparse
import hashlib
import html
import json
import math
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.colors import to_hex
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import data
import featureviz as fv
import metrics
import models
import training
import utils

ATLAS_DIR = Path("outputs") / "atlas"
ATLAS_TECHNIQUES = ("maco", "whitened")  # the best by the quality table, and the more natural latent technique
TOP, BOTTOM = 8, 4                     # exemplars per card
STRIP = 8                              # most selective channels per layer on the index
CONTRIBUTORS = 8                       # channels listed per class
VERSION = 1                            # of the pages: a new version never reuses older pages
CLASSES = "classes"                    # the manifest's entry for the class pages
ACTIVATION = "~activation atlas"       # the manifest's entry for the activation atlas's page (no layer's name)
ACTIVATION_FILE = "activation-atlas.html"
ACTIVATION_IMAGES = "~activation"      # img/~activation: its renders (no layer's folder: `safe` names have no "~")
ACTIVATION_SAMPLES = 4000              # test images, one activation vector each, as in Visualization.ipynb
ACTIVATION_MIN_SAMPLES = 20            # fewer make no map (its page says so)
SWAPPING = "swapping in"               # the manifest's only entry while a rebuild's files move in
MANIFEST = "atlas.json"
NAV = re.compile(r"<nav>.*?</nav>", re.S)  # the bar of links atop a layer's, a class's or the activation atlas's page
SOURCE = re.compile(r'<img src="([^"]+)"')  # an image a page shows
TESTS = "~test"  # img/~test: the test images the pages show (no layer's folder: `safe` names have no "~")
TEMPORARY = re.compile(r"\..*\.[0-9a-f]{12}\.tmp")  # a file being written (data.atomic_write), or a killed one


# ----------------------------------------------------------------------------- the build

def build_atlas(model, d, vae=None, techniques=ATLAS_TECHNIQUES, out=ATLAS_DIR, layers=None, steps=256,
                progress=True):
    """Build (or resume) the atlas of `model` on the data `d` into the folder `out`; returns index.html's path.

    techniques: technique names (featureviz.TECHNIQUE_NAMES), shown side by side; the latent ones need `vae`.
    layers: the layers whose channels get pages (default: every block's last spatial layer,
      models.block_layers). Either may be one name.
    """
    data.check_count("steps", steps, 1)
    if d.channels not in (1, 3):  # a PNG of 2 or 4 would take the last for transparency
        raise ValueError(f"the atlas's pages show gray or colour images; {d.name} has {d.channels} channels")
    out = Path(out).expanduser()
    saved = saved_manifest(out)
    techniques = list(dict.fromkeys(models.as_names(techniques, "techniques")))  # each once
    layers = list(dict.fromkeys(models.as_names(models.block_layers(model, d.size) if layers is None else layers)))
    if not layers or not techniques:
        raise ValueError(f"layers and techniques must not be empty, got layers={layers!r}, techniques={techniques!r}")
    for name in layers:
        models.get_layer(model, name)  # an unknown name fails here, naming the valid ones
    _check_files_apart(layers)
    metrics.check_outputs(model, d)  # the class pages read one per class
    cov = fv.color_covariance(d.train_x[:10000])
    magnitude = fv.magnitude_spectrum(d.train_x[:10000], cov)
    hows = {name: fv.get_technique(name, vae, cov, magnitude) for name in techniques}
    # the training images' statistics too: the Fourier techniques render with them; and the code of the
    # techniques, the layers' reading and the pages, which an edit (under autoreload) changes without a new VERSION
    # not the layers: each has its own entry, so that adding a layer renders only it
    key = fingerprint(VERSION, model, vae, techniques, steps, d.name, d.classes, d.test_x, d.test_y,
                      cov, magnitude, _code(), class_hexes(len(d.classes)))

    if saved is None or saved["key"] != key:  # a build that cannot work for its model fails before it touches a file
        for how in hows.values():  # one step of one channel and one class per technique
            how(model, [fv.Channel(layers[0], 0), fv.Class(len(d.classes) - 1)], steps=1, size=d.size, progress=False)
    beside = staging(out)
    saved = _settled(out, saved, beside, key)
    # a whole atlas of other settings stays as it is while this one is built beside it, where it can be
    rebuild = saved is not None and saved["key"] not in (key, None) and beside is not None
    where = beside if rebuild else out
    site = Site(where, d, techniques, f"atlas of {type(model).__name__} on {d.name}")
    last_layer = models.last_spatial_layer(model, d.size)  # the layer whose channels the class pages may list
    done = _reused(site, _resume(where, key), layers, last_layer)
    _save_manifest(where, key, done)  # before any other file: a build interrupted at once resumes too
    site.write("atlas.css", CSS)
    _link(site, layers, done)  # a half-built atlas opens at its finished pages, and links no other
    site.remove_unfinished(layers, done)
    # the bar counts rendered images, so that its time estimate weighs a wide layer as such (the activation atlas:
    # its cells, at most grid x grid, in the first technique)
    sizes = {unit: len(d.classes) if unit == CLASSES else models.layer_channels(model, unit, d.size)
             for unit in layers + [CLASSES]}
    cells = activation_grid(min(ACTIVATION_SAMPLES, len(d.test_y)))[0] ** 2
    images = {unit: n * len(hows) for unit, n in sizes.items()} | {ACTIVATION: cells}
    with tqdm(total=sum(images.values()), initial=sum(images[u] for u in done), desc="atlas", unit=" images",
              disable=not progress) as bar:
        for unit in images:
            if unit in done:
                continue
            bar.set_postfix_str(unit)
            if unit == CLASSES:
                done[unit] = _class_pages(model, d, hows, steps, site, last_layer, last_layer in layers, bar)
            elif unit == ACTIVATION:
                done[unit] = _activation_page(model, d, last_layer, hows[techniques[0]], steps, site)
                bar.update(images[unit])
            else:
                done[unit] = _layer_page(model, d, unit, sizes[unit], hows, steps, site, bar)
            _save_manifest(where, key, done)
            _link(site, layers, done)
    if rebuild:
        _swap(where, out, key)
    elif beside is not None and beside.is_dir() and all(_written_by_atlas(p.name) for p in beside.iterdir()):
        shutil.rmtree(beside)  # a rebuild of other settings, given up (or emptied by a swap stopped at its end)
    return out / "index.html"


def _reused(site, done, layers, last_layer):
    """The finished units (done) that this build keeps: the layers asked for, the activation atlas, and the class
    pages if their list of contributing channels would link as before (to the page of the last layer, or to none);
    each only while its pages are there (one deleted by hand is built again)."""
    keep = {unit: summary for unit, summary in done.items() if unit in [*layers, ACTIVATION] and site.has_pages(unit)}
    lists = last_layer in layers  # whether the class pages are to list that layer's channels
    classes = done.get(CLASSES)  # kept if they list as they are to, and the page they link to is kept too
    if classes and classes["lists_channels"] == lists and (last_layer in keep or not lists) and \
            site.has_pages(CLASSES):
        keep[CLASSES] = classes
    return keep


def _link(site, layers, done):
    """Writes the index of the finished units, and the bar of links atop each of their pages anew (to the index,
    to every layer, to the classes, to the activation atlas), so that a page built before links to the units built
    after it."""
    site.write("index.html", _index(site, layers, done))
    pages = {page: None if unit == CLASSES else unit for unit in done for page in site.pages(unit)}
    for name, here in pages.items():
        text = (site.out / name).read_text(encoding="utf-8")
        linked = NAV.sub(lambda _: site.nav(layers, done, here), text, count=1)
        if linked != text:
            site.write(name, linked)


def _code():
    """The source of every module of ours the pages are made with: featureviz, where every technique's settings
    and steps are written, the modules that read the model's layers, predictions and the data, and this one,
    which writes the pages."""
    return "".join(Path(module.__file__).read_text() for module in (fv, models, metrics, training, data)) + \
        Path(__file__).read_text()


def fingerprint(*parts):
    """A short hash of models (their state and device), tensors and plain values: the atlas's cache key. The
    device counts: a GPU draws other random numbers and rounds otherwise, so its pages differ from the CPU's."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, nn.Module):
            h.update(models.device_of(part).type.encode())
            for name, t in part.state_dict().items():
                h.update(name.encode())
                h.update(_bytes(t))
        elif isinstance(part, torch.Tensor):
            h.update(_bytes(part))
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _bytes(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def saved_manifest(out):
    """The manifest of the atlas in the folder `out` ({key, done}), None for a new or empty folder; an error for
    a file, or a folder with other files in it (an atlas.json of another program's among them), which is
    never touched."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out must be a folder for the atlas; {out} is a file")
    if (out / MANIFEST).is_file():
        try:
            saved = json.loads((out / MANIFEST).read_text())
        except ValueError:  # not JSON, or not text
            saved = None
        if isinstance(saved, dict) and set(saved) == {"key", "done"}:
            return saved
    if out.exists() and any(not TEMPORARY.fullmatch(path.name) for path in out.iterdir()):  # a killed first write
        raise ValueError(f"out={str(out)!r} is a folder with other files in it (and no {MANIFEST} of an atlas): "
                         f"choose an empty or new folder for the atlas")
    return None


def _resume(out, key):
    """The finished units recorded under this key in the manifest of the folder `out`; a folder built under
    another key (or under none: emptied or swapped in part when a build stopped) is emptied first. Its manifest is
    kept but first records no key and nothing done, so that a build interrupted while emptying it, under either
    key, empties it again."""
    saved = saved_manifest(out)
    if saved is None:
        return {}
    if saved["key"] == key:
        return saved["done"]
    _save_manifest(out, None, {})
    _empty(out)
    return {}


def staging(out):
    """The folder, beside the atlas folder `out` and hidden, where a rebuild under other settings is built until it
    is whole; None where there can be none: out is new, its parent not writable, or out a mount point (no rename
    crosses filesystems). There, a rebuild empties the old atlas first."""
    out = Path(out).expanduser().resolve()
    if not out.is_dir() or not os.access(out.parent, os.W_OK) or out.stat().st_dev != out.parent.stat().st_dev:
        return None
    return out.with_name(f".{out.name}.next")


def _settled(out, saved, beside, key):
    """out's manifest `saved` once a swap cut short (out under no key, a whole atlas in `beside`) is settled:
    finished if that atlas is of this key, else removed, as part of it may be in out already."""
    staged = saved_manifest(beside) if beside and (beside / MANIFEST).is_file() else None
    if saved is None or saved["key"] is not None or staged is None:
        return saved
    if staged["key"] != key:
        shutil.rmtree(beside)
        return saved
    _swap(beside, out, key)
    return saved_manifest(out)


def _swap(new, out, key):
    """Puts the finished atlas in the folder `new`, built under `key`, in place of the one in `out` (a file of the
    user's there stays) and removes `new`. out's manifest first records no key, then, once out is emptied, that it
    takes new's files: a swap cut short (out under no key, new under `key`) is finished by the next build under
    that key, and any other build empties out and builds afresh. new's manifest, moved last, makes out whole."""
    if saved_manifest(out)["done"] != {SWAPPING: key}:  # not emptied yet, or not wholly: what out holds is old
        _save_manifest(out, None, {})
        _empty(out)
        _save_manifest(out, None, {SWAPPING: key})  # from here on, out holds only new's files
    for path in new.iterdir():
        if path.name != MANIFEST:
            path.replace(out / path.name)
    (new / MANIFEST).replace(out / MANIFEST)
    new.rmdir()


def _empty(out):
    """Removes what the atlas wrote in the folder `out`, but its manifest; a file of the user's (a zip of the
    atlas, notes) stays."""
    for path in out.iterdir():
        if not _written_by_atlas(path.name) or path.name == MANIFEST:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _written_by_atlas(name):
    """Whether a file or folder of the atlas's folder is one that build_atlas writes (or a temporary file of one
    that a killed build left)."""
    return (name in ("index.html", "atlas.css", "img", MANIFEST, ACTIVATION_FILE)
            or re.fullmatch(r"(layer|class)-.*\.html", name) or TEMPORARY.fullmatch(name)) is not None


def _save_manifest(out, key, done):
    data.atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(dict(key=key, done=done), indent=1)))


# ----------------------------------------------------------------------------- what the pages show

def selectivity(class_means):
    """(C,) per channel: its largest per-class mean activation over its mean over the classes, that mean
    taken as at least 1% of the layer's largest class mean, so that a channel that barely fires is not
    ranked first (negative means count as 0; a channel silent on every class scores 0; a class without
    images, a row of NaN, does not count)."""
    m = class_means[~class_means.isnan().any(1)].clamp_min(0)
    floor = (0.01 * m.max()).clamp_min(1e-8)
    return m.max(0).values / m.mean(0).clamp_min(floor)


def class_means(acts, labels, num_classes):
    """(K, T) the mean of each column of acts (N, T) over the images of each class (NaN for a class
    without images)."""
    return torch.stack([acts[labels == k].mean(0) for k in range(num_classes)])


def head_contributions(model, images, labels, num_classes):
    """(logits (N, K), contributions (K, F) or None) in one pass over the images: the contributions are
    the head weight x the mean of each head input over each class's images, in logit units (times our
    CNN's logit_scale), for a model whose last module to run is an nn.Linear on pooled channels (None for
    another kind of head)."""
    head = _head(model, images)
    if not isinstance(head, nn.Linear):
        return training.predict(model, images).cpu(), None
    with _head_inputs(head) as inputs:  # the module a compiled model wraps runs the hook (models.inner)
        logits = training.predict(models.inner(model), images).cpu()
    if sum(map(len, inputs)) != len(images):  # a head that runs more than once a pass: no one input per image
        return logits, None
    scale = models.config_of(model).get("logit_scale", 1)  # our CNN's logits are its head's output x this
    return logits, scale * head.weight.detach().float().cpu() * class_means(torch.cat(inputs), labels, num_classes)


@torch.no_grad()
def _head(model, images):
    """The last nn.Linear or nn.Conv2d to run on the first of the images: the model's head, in a classifier
    (None if neither runs)."""
    with models.evaluating(model):
        return models.last_to_run(model, models.first_image(model, images), (nn.Linear, nn.Conv2d))[0]


@contextmanager
def _head_inputs(head):
    """Collects the head's inputs, flattened to (B, F) in float32 on the CPU, in the list it yields while
    the block runs; the hook is removed on exit."""
    inputs = []
    hook = head.register_forward_pre_hook(lambda module, args: inputs.append(args[0].flatten(1).float().cpu()))
    try:
        yield inputs
    finally:
        hook.remove()


def head_reads(model, layer, images):
    """True if the model's head is an nn.Linear that reads the layer's channels one to one, each pooled
    over the map (by its mean or its max, after a ReLU or not), as checked on these images: not a hidden layer
    of the same width between them, whose units the class pages would take for the layer's channels."""
    head = _head(model, images)
    if not isinstance(head, nn.Linear):
        return False
    with _head_inputs(head) as inputs:  # capture runs without gradients
        maps = models.capture(model, images, [layer, None])[layer].float().cpu().flatten(2)  # None: run it all
    read = inputs[-1]
    rtol = max(1e-4, torch.finfo(models.dtype_of(model)).eps)  # a bfloat16 model's pooling: one unit in its last place
    # by its mean or its max, of the map or of its ReLU where the forward applies one that is no layer (DenseNet's)
    return any(read.shape == m.shape[:2] and torch.allclose(read, pool(m), rtol=rtol, atol=1e-5)
               for m in (maps, maps.clamp_min(0)) for pool in (lambda m: m.mean(2), lambda m: m.amax(2)))


def _layer_page(model, d, layer, n, hows, steps, site, bar):
    """Render every channel of the layer, its n (one render per technique, each counted on the progress bar),
    find the exemplars (one pass), write the layer's page; returns the summary the index needs."""
    targets = [fv.Channel(layer, c) for c in range(n)]
    acts = fv.activations(model, d.test_x, targets)  # (N, n)
    means = class_means(acts, d.test_y, len(d.classes))
    for name, how in hows.items():
        site.save_images(layer, name, how(model, targets, steps=steps, size=d.size, progress=False).images)
        bar.update(n)
    top, bottom = acts.topk(min(TOP, len(acts)), dim=0), acts.topk(min(BOTTOM, len(acts)), dim=0, largest=False)
    cards = [site.card(layer, c, top.indices[:, c], top.values[:, c], bottom.indices[:, c], bottom.values[:, c],
                       means[:, c]) for c in range(n)]
    sel = selectivity(means)
    nav = ('<nav aria-label="channels">channel: ' + " ".join(f'<a href="#c{c}">{c}</a>' for c in range(n)) +
           "</nav>")
    site.write(site.layer_file(layer), site.page(f"{layer}: {n} channels", f'{nav}<div class="cards">{"".join(cards)}</div>'))
    return dict(channels=n, selective=sel.argsort(descending=True)[:STRIP].tolist())


def _class_pages(model, d, hows, steps, site, last_layer, has_page, bar):
    """One page per class; the contributing channels are those of the model's last spatial layer, when the
    head reads them one to one and the atlas has a page for that layer (has_page)."""
    k = len(d.classes)
    targets = [fv.Class(c) for c in range(k)]
    logits, contrib = head_contributions(model, d.test_x, d.test_y, k)  # (N, K), (K, F)
    cm = metrics.confusion_matrix(d.test_y, logits.argmax(1), k)
    for name, how in hows.items():
        site.save_images(CLASSES, name, how(model, targets, steps=steps, size=d.size, progress=False).images)
        bar.update(k)
    unlisted = ("which this atlas has no page for" if not has_page else
                "but not one to one" if contrib is None or not head_reads(model, last_layer, d.test_x[:8]) else None)
    top = logits.topk(min(TOP, len(logits)), dim=0)
    for c in range(k):
        body = site.class_body(c, top.indices[:, c], top.values[:, c], cm, last_layer,
                               unlisted or contrib[c])
        site.write(f"class-{c}.html", site.page(f"class {c}: {d.classes[c]}", body))
    return dict(accuracy=(cm.diag().sum() / cm.sum()).item(), lists_channels=has_page)


def activation_grid(samples):
    """(grid, min_count) of the site's activation atlas of this many samples: the notebook's 12 x 12 cells of at least
    8 for 4,000, a coarser grid for fewer (about 25 samples a cell or more, 2 x 2 at least), and a cell kept with a
    third of its share."""
    grid = min(12, max(2, math.isqrt(samples // 25)))
    return grid, max(1, min(8, samples // (3 * grid * grid)))


def _activation_page(model, d, layer, how, steps, site):
    """Render the activation atlas of `layer` on the first ACTIVATION_SAMPLES test images with the technique `how`,
    write its page; returns the summary the index needs."""
    n = min(ACTIVATION_SAMPLES, len(d.test_y))
    title = f"activation atlas of {layer}"
    if n < ACTIVATION_MIN_SAMPLES:
        return _no_map(site, title, layer, n, f"it needs at least {ACTIVATION_MIN_SAMPLES} test images; "
                                              f"{d.name} has {n}")
    grid, min_count = activation_grid(n)
    try:
        a = activation_atlas(model, d.test_x[:n], d.test_y[:n], layer, how, grid, min_count, steps=steps,
                             size=d.size, progress=False)
    except NoMap as e:  # a dead layer, say: the rest of the atlas stands, and the page says why
        return _no_map(site, title, layer, n, str(e))
    for k, image in enumerate(a.images):
        site.save_png(site.cell_file(k), image)
    site.write(ACTIVATION_FILE, site.page(title, site.activation_body(a, n, min_count)))
    return dict(layer=layer, cells=len(a.rows), samples=n, mapped=int(a.counts.sum()), purity=a.purity.mean().item())


def _no_map(site, title, layer, samples, reason):
    """The activation atlas's page when the layer has no map, saying why; returns its summary for the index."""
    site.write(ACTIVATION_FILE, site.page(title, f"<p>No activation atlas of {html.escape(layer)}: "
                                                 f"{html.escape(reason)}.</p>"))
    return dict(layer=layer, cells=0, samples=samples)


def _index(site, layers, done):
    """The index of the finished units; those still to build are named as such (the index is rewritten as each
    unit finishes, so that an atlas being built, or one whose build stopped, opens at what it has)."""
    rows = "".join(site.layer_entry(layer, done[layer]) if layer in done else
                   f"<h3>{html.escape(layer)}</h3><p>not built yet</p>" for layer in layers)
    classes, acc = (site.class_strip(), f"Test accuracy {done[CLASSES]['accuracy']:.1%} (without test-time "
                    f"augmentation). ") if CLASSES in done else ("<p>not built yet</p>", "")
    activation = site.activation_entry(done[ACTIVATION]) if ACTIVATION in done else "<p>not built yet</p>"
    body = (f"<p>{acc}Each channel's card shows its visualizations ({', '.join(site.techniques)}), its top {TOP} "
            f"and bottom {BOTTOM} test images with their activations, and its mean activation per class.</p>"
            f'<h2>Layers</h2>{rows}<h2 id="all-classes">Classes</h2>{classes}'
            f'<h2 id="activation">Activation atlas</h2>{activation}')
    return site.page(site.title, body, nav=False)


# ----------------------------------------------------------------------------- the files

def _check_files_apart(layers):
    """An error for two units (the layers, the class pages) whose images would share a folder (`safe` names,
    which a file system that ignores case, macOS's or Windows's, takes as one when they differ in case only)."""
    units = {safe(CLASSES).casefold(): "the class pages"}
    for name in layers:
        unit = f"layer {name!r}"
        other = units.setdefault(safe(name).casefold(), unit)
        if other != unit:
            raise ValueError(f"{unit} and {other} would write their images to the same folder img/{safe(name)}/ of "
                             f"the atlas: build an atlas of one of them at a time (another out)")


def safe(name):
    """A file name for a layer or technique name, which Windows too takes (a layer 'aux' or 'con.1' would name
    a device there: 'aux_', 'con_.1')."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return re.sub(r"(?i)^(con|prn|aux|nul|com[1-9]|lpt[1-9])(?=\.|$)", r"\1_", name)


BAR_HEIGHT = 48  # px: the chart of class means (.bars)
CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}a{color:#14c}h2{margin-top:1.4em}
img{image-rendering:pixelated;width:64px;height:64px;display:block}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:590px}
.card:target{border-color:#14c;box-shadow:0 0 6px #14c}.row{display:flex;gap:4px;align-items:flex-end;margin:4px 0}
figure{margin:0;text-align:center;font-size:11px}.label{width:52px;font-size:12px;color:#555}
.chart{overflow-x:auto}.bars{display:flex;gap:var(--g);align-items:flex-start;height:BAR_HEIGHTpx}
.bar,.barlabel{flex:none}.bar{width:var(--w);background:#5a8;min-height:1px;forced-color-adjust:none}
.bar.neg{background:#c66}.card h2{font-size:1em;margin:0}
.barlabels{display:flex;gap:var(--g)}.barlabel{width:var(--w);font-size:9px;overflow:hidden;text-align:center}.strip{display:flex;gap:6px;flex-wrap:wrap}
nav{margin:0 0 .8em;font-size:14px}nav b{color:#000}
table{border-collapse:collapse}.row .label{align-self:center}td,th{padding:2px 8px;text-align:left}
.map{display:grid;grid-template-columns:repeat(var(--n),70px);grid-template-rows:repeat(var(--n),70px);gap:2px}
.map a{border:3px solid;forced-color-adjust:none}.map a:hover,.map a:focus{outline:2px solid #000}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle;forced-color-adjust:none}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:13px;margin:8px 0}""".replace(
    "BAR_HEIGHT", str(BAR_HEIGHT))


def class_hexes(count):
    """Each class's colour as '#rrggbb', those of utils' plots (the activation atlas's frames)."""
    colour = utils.class_colours(count)
    return [to_hex(colour(k)) for k in range(count)]


def bar_layout(classes, card=590):
    """(width, gap) in pixels of one class's bar (and its label): 22 wide and 3 apart for up to 23 classes,
    narrower for more, then closer (from 149 classes), so that all fit the card's 590 px (up to 590 classes)."""
    gap = max(0, min(3, (card - classes) // max(1, classes - 1)))
    return max(1, min(22, (card + gap) // classes - gap)), gap


class Site:
    """Writes the atlas's files into one folder: pages, images, the stylesheet. title: the index's, which every
    page's ends with (what model on what data), so that two atlases open side by side are told apart."""

    def __init__(self, out, d, techniques, title="atlas"):
        self.out, self.d, self.techniques, self.title = Path(out), d, techniques, title

    def write(self, name, text):
        data.atomic_write(self.out / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def save_png(self, rel, image):
        """image (C, H, W) uint8 or float in [0, 1] -> out/rel."""
        x = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        array = x.permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        data.atomic_write(self.out / rel, lambda tmp: pil.save(tmp, format="PNG"))

    def save_images(self, unit, technique, images):
        for i, image in enumerate(images):
            self.save_png(self.vis_file(unit, technique, i), image)

    def vis_file(self, unit, technique, i):
        return f"img/{safe(unit)}/{safe(technique)}-{i}.png"

    @staticmethod
    def cell_file(k):
        """The render of the activation atlas's cell k."""
        return f"img/{ACTIVATION_IMAGES}/{k}.png"

    def test_image(self, i):
        """The path of test image i, written the first time a page shows it."""
        rel = f"img/{TESTS}/{i}.png"
        if not (self.out / rel).exists():
            self.save_png(rel, self.d.test_x[i])
        return rel

    def layer_file(self, layer):
        return f"layer-{safe(layer)}.html"

    def pages(self, unit):
        """The file names of a unit's pages: a layer's one, one per class for the class pages, the activation atlas's
        one."""
        if unit == ACTIVATION:
            return [ACTIVATION_FILE]
        return [f"class-{c}.html" for c in range(len(self.d.classes))] if unit == CLASSES else [self.layer_file(unit)]

    def has_pages(self, unit):
        """Whether every page of the unit is in the folder, with every image it shows (a page or an image folder
        deleted by hand is not)."""
        paths = [self.out / page for page in self.pages(unit)]
        return all(path.is_file() for path in paths) and all(
            (self.out / src).is_file() for path in paths for src in SOURCE.findall(path.read_text(encoding="utf-8")))

    def remove_unfinished(self, layers, done):
        """Removes the pages of every unit not done (of an earlier build: a layer left out, class pages listing
        another layer's channels, an activation atlas of another model) and the images of every layer but these
        (and the activation atlas's renders unless its page is done), so that no page links what is gone."""
        pages = {page for unit in done for page in self.pages(unit)}
        for path in [*self.out.glob("layer-*.html"), *self.out.glob("class-*.html"), *self.out.glob(ACTIVATION_FILE)]:
            if path.name not in pages:
                path.unlink()
        folders = {safe(unit) for unit in layers + [CLASSES]} | {TESTS}
        if ACTIVATION in done:  # else its renders go: another map's cells are other cells
            folders.add(ACTIVATION_IMAGES)
        for path in (self.out / "img").glob("*"):
            if path.is_dir() and path.name not in folders:
                shutil.rmtree(path)

    def page(self, title, body, nav=True):
        """A page of the atlas; nav: whether it has the bar of links atop (filled in by _link), not the index."""
        tab = title if title == self.title else f"{title} · {self.title}"
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(tab)}</title>'
                f'<link rel="stylesheet" href="atlas.css"></head><body>{"<nav></nav>" if nav else ""}'
                f'<h1>{html.escape(title)}</h1>{body}</body></html>\n')

    def nav(self, layers, done, here):
        """The bar of links atop a page: the index, each layer's page (the layer `here` in bold, one not built
        yet unlinked), the index's list of classes and the activation atlas."""
        def link(unit, href, label):
            if unit == here:
                return f'<b aria-current="page">{html.escape(label)}</b>'
            if unit not in done:
                return f'<span title="not built yet">{html.escape(label)}</span>'
            return f'<a href="{href}">{html.escape(label)}</a>'
        units = [link(layer, self.layer_file(layer), layer) for layer in layers]
        return (f'<nav><a href="index.html">&larr; atlas</a> | layers: {" ".join(units)} | '
                f'{link(CLASSES, "index.html#all-classes", "classes")} | '
                f'{link(ACTIVATION, ACTIVATION_FILE, "activation atlas")}</nav>')

    def figure(self, src, caption, href=None, alt=None):
        """An image with its caption; alt: what it shows, for a reader who cannot see it (default the caption)."""
        # lazy: a layer of 512 channels shows 7,000 images
        alt = html.escape(caption if alt is None else alt)
        img = f'<img src="{src}" alt="{alt}" loading="lazy" decoding="async" width="64" height="64">'
        link = f'<a href="{href}">{img}</a>' if href else img
        return f"<figure>{link}<figcaption>{html.escape(caption)}</figcaption></figure>"

    def exemplar_row(self, label, indices, values):
        return self.test_row(label, indices, [f"{v:.2f}" for v in values.tolist()])

    def test_row(self, label, indices, captions):
        """A row of test images, each with its caption."""
        figs = "".join(self.figure(self.test_image(i), caption, alt=f"test image {i}, a {self.d.classes[y]}")
                       for i, caption, y in zip(indices.tolist(), captions, self.d.test_y[indices].tolist()))
        return f'<div class="row"><span class="label">{label}</span>{figs}</div>'

    def bars(self, values):
        """Mean activation per class as CSS bars from a zero line: up where positive, down (and red) where negative,
        as long as its size (exact values on hover, and all of them read out to a screen reader)."""
        known = values.nan_to_num(0)
        up, down = known.clamp_min(0).max().item(), (-known).clamp_min(0).max().item()
        span = max(up + down, 1e-8)
        zero = round(BAR_HEIGHT * up / span) if up + down else BAR_HEIGHT  # px from the top; a dead channel: the foot
        bars = "".join(self._bar(name, v, zero, span) for name, v in zip(self.d.classes, values.tolist()))
        labels = "".join(f'<div class="barlabel">{html.escape(name[:4])}</div>' for name in self.d.classes)
        style = "--w:{}px;--g:{}px".format(*bar_layout(len(self.d.classes)))
        said = ", ".join(f"{name} {v:.3f}" if v == v else f"{name} none" for name, v in zip(self.d.classes,
                                                                                          values.tolist()))
        # in a chart that scrolls: past 590 classes, bars of 1 px are wider than the card
        return (f'<div class="chart"><div class="bars" style="{style}" role="img" aria-label="{html.escape(said)}">'
                f'{bars}</div><div class="barlabels" style="{style}" aria-hidden="true">{labels}</div></div>')

    @staticmethod
    def _bar(name, value, zero, span):
        """One class's bar, `zero` px from the chart's top and `span` the chart's range of values: red for a
        negative mean; empty for a class without test images (NaN)."""
        known = value == value
        size, title = (round(abs(value) / span * BAR_HEIGHT), f"{value:.3f}") if known else (0, "no test images")
        top, kind = (zero, "bar neg") if value < 0 else (zero - size, "bar")  # every bar meets the zero line
        return (f'<div class="{kind}" style="height:{size}px;margin-top:{top}px" '
                f'title="{html.escape(name)}: {title}"></div>')

    def card(self, layer, c, top, top_values, bottom, bottom_values, means):
        vis = "".join(self.figure(self.vis_file(layer, t, c), t, alt=f"{t} visualization of channel {c}")
                      for t in self.techniques)
        return (f'<div class="card" id="c{c}"><h2>channel {c}</h2><div class="row">{vis}</div>'
                f'{self.exemplar_row("top", top, top_values)}{self.exemplar_row("bottom", bottom, bottom_values)}'
                f'<div>mean activation per class</div>{self.bars(means)}</div>')

    def class_body(self, c, top, top_values, cm, last_layer, contrib):
        """A class's page below its title; contrib: the mean contribution to its logit of each channel of the
        last layer, or why they are not listed (a sentence's end)."""
        names = self.d.classes
        vis = "".join(self.figure(self.vis_file(CLASSES, t, c), t, alt=f"{t} visualization of {names[c]}")
                      for t in self.techniques)
        both = cm[c] + cm[:, c]  # confusions either way
        others = [j for j in both.argsort(descending=True).tolist() if j != c and both[j] > 0][:3]
        rows = "".join(f'<tr><td><a href="class-{j}.html">{html.escape(names[j])}</a></td><td>{int(cm[c, j])}</td>'
                       f'<td>{int(cm[j, c])}</td></tr>' for j in others)
        table = (f'<table><tr><th>class</th><th>{html.escape(names[c])} taken for it</th><th>it taken for '
                 f'{html.escape(names[c])}</th></tr>{rows}</table>' if others else
                 "<p>No other class, either way, on the test images.</p>")
        body = (f'<div class="row">{vis}</div><h2>Top test images (logit)</h2>{self.exemplar_row("top", top, top_values)}'
                f'<h2>Most confused with</h2>{table}')
        if isinstance(contrib, str):
            return body + f"<p>The head reads the channels of {html.escape(last_layer)}, {contrib}.</p>"
        if contrib.isnan().all():  # the class's mean over no test images
            return body + (f"<p>No test images of this class: no mean contribution of the channels of "
                           f"{html.escape(last_layer)} to its logit.</p>")
        top_ch = contrib.argsort(descending=True)[:CONTRIBUTORS].tolist()
        figs = "".join(self.figure(self.vis_file(last_layer, self.techniques[0], j), f"ch {j}: {contrib[j]:+.2f}",
                                   f"{self.layer_file(last_layer)}#c{j}", f"channel {j}, adding {contrib[j]:+.2f}")
                       for j in top_ch)
        return body + (f"<h2>Channels of {html.escape(last_layer)} that add most to its logit</h2>"
                       f"<p>head weight x the channel's value the head reads, averaged over the class's test "
                       f"images, in logit units</p><div class=\"strip\">{figs}</div>")

    def layer_entry(self, layer, summary):
        href = self.layer_file(layer)
        figs = "".join(self.figure(self.vis_file(layer, self.techniques[0], c), f"ch {c}", f"{href}#c{c}",
                                   f"channel {c} of {layer}") for c in summary["selective"])
        return (f'<h3><a href="{href}">{html.escape(layer)}</a> ({summary["channels"]} channels)</h3>'
                f'<div>most class-selective channels:</div><div class="strip">{figs}</div>')

    def class_strip(self):
        figs = "".join(self.figure(self.vis_file(CLASSES, self.techniques[0], c), name, f"class-{c}.html",
                                   f"class {name}") for c, name in enumerate(self.d.classes))
        return f'<div class="strip">{figs}</div>'

    def activation_entry(self, summary):
        """The index's paragraph on the activation atlas."""
        link = f'<a href="{ACTIVATION_FILE}">{html.escape(summary["layer"])}</a>'
        if not summary["cells"]:
            return f"<p>{link}: no map (its page says why).</p>"
        return (f"<p>What {link} tells apart across the test set: {summary['cells']} cells of {summary['mapped']} of "
                f"the first {summary['samples']} test images, its most common class {summary['purity']:.0%} of a cell "
                f"on average.</p>")

    def activation_body(self, a, samples, min_count):
        """The activation atlas's page below its title: its cells in their places on the grid, each framed in its
        most common class's colour and linking to its card below, a legend of those classes, and the cards."""
        names, hexes = self.d.classes, class_hexes(len(self.d.classes))
        cells = "".join(
            f'<a href="#cell{k}" style="grid-row:{r + 1};grid-column:{c + 1};border-color:{hexes[y]}" '
            f'title="cell {k}: {n} images, {p:.0%} {html.escape(names[y])}"><img src="{self.cell_file(k)}" '
            f'alt="cell {k}, mostly {html.escape(names[y])}" width="64" height="64"></a>'
            for k, (r, c, n, y, p) in enumerate(zip(a.rows.tolist(), a.cols.tolist(), a.counts.tolist(),
                                                    a.classes.tolist(), a.purity.tolist())))
        legend = "".join(f'<span><span class="swatch" style="background:{hexes[y]}"></span>'
                         f'{html.escape(names[y])}</span>' for y in sorted(set(a.classes.tolist())))
        intro = (f"<p>Each of the first {samples} test images gives its activation vector at one random position of "
                 f"the map of {html.escape(a.layer)}; t-SNE lays them out in 2-D, and the layout is cut into a "
                 f"{a.grid} x {a.grid} grid. Each cell that holds at least {min_count} of them shows the render of "
                 f"their average ({html.escape(self.techniques[0])}), framed in the colour of their images' most "
                 f"common class: {len(a.rows)} cells of {int(a.counts.sum())} vectors, the most common class "
                 f"{a.purity.mean():.0%} of a cell on average. Hover over a cell for its count and class; click it "
                 f"for its images.</p>")
        cards = "".join(self.cell_card(a, k) for k in range(len(a.rows)))
        return (f'{intro}<div class="map" style="--n:{a.grid}">{cells}</div><div class="legend">{legend}</div>'
                f'<h2>Cells</h2><div class="cards">{cards}</div>')

    def cell_card(self, a, k):
        """Cell k's card: its render, how many test images it averages and their most common classes, the first of
        them."""
        names, members = self.d.classes, a.members[k]
        tally = torch.bincount(self.d.test_y[members], minlength=len(names))
        common = [j for j in tally.argsort(descending=True, stable=True).tolist() if tally[j] > 0][:3]
        shares = ", ".join(f"{tally[j] / len(members):.0%} {html.escape(names[j])}" for j in common)
        render = self.figure(self.cell_file(k), self.techniques[0], alt=f"{self.techniques[0]} render of cell {k}")
        shown = members[:TOP]
        return (f'<div class="card" id="cell{k}"><h2>cell {k}: row {int(a.rows[k])}, column {int(a.cols[k])}</h2>'
                f'<div class="row">{render}</div><p>{len(members)} test images: {shares}</p>'
                f'{self.test_row("first", shown, [names[y] for y in self.d.test_y[shown].tolist()])}</div>')


# ----------------------------------------------------------------------------- the activation atlas
# Carter et al., "Activation Atlas" (Distill, 2019): an activation vector of each image, at one random position of a
# layer's map, laid out in 2-D by t-SNE; the layout cut into a grid, each cell's vectors averaged, and each average
# rendered, all in one batch, as a Direction weighed by its cosine: a map of what the layer tells apart across the
# data, and of where the classes lie on it.

class NoMap(ValueError):
    """The layer's vectors have no activation atlas (all the same, too spread for a cell, or every cell's average
    0): a fact of the model and the images, not a wrong argument."""


ATLAS_COSSIM_POW = 1.0  # the average's pattern, not its size alone (with 0, the strongest cells' colours saturate)


@dataclass
class ActivationAtlas:
    """The rendered cells of an activation atlas of `layer` on a grid x grid layout, cell k at row rows[k] and column
    cols[k]: its render images[k], the number of samples it averages counts[k], their most common label classes[k]
    and its share of them purity[k]; directions[k] the average it renders, members[k] the indices of the images
    whose samples it averages."""
    layer: str
    grid: int
    rows: torch.Tensor
    cols: torch.Tensor
    images: torch.Tensor
    counts: torch.Tensor
    classes: torch.Tensor
    purity: torch.Tensor
    directions: list
    members: list


def layer_samples(model, images, layer, seed=0, batch_size=500):
    """(N, C): each image's activation vector at `layer`, at one position of its map drawn at random (seeded; a
    layer without positions gives its whole output), batch_size images at a time."""
    _check_seed(seed)
    data.check_count("batch_size", batch_size, 1)
    images = models.check_input(model, images)
    # each image's place in [0, 1), drawn at once: the same positions whatever the batches
    where = torch.rand(len(images), generator=torch.Generator().manual_seed(seed)).split(int(batch_size))
    out = []
    with models.capturing(model, layer) as read:
        for batch, u in zip(images.split(int(batch_size)), where):
            a = read(batch)[layer].float().cpu()
            a = a.flatten(2) if a.dim() > 2 else a[:, :, None]  # (B, C, positions)
            out.append(a[torch.arange(len(a)), :, (u * a.shape[2]).long().clamp(max=a.shape[2] - 1)])
    return torch.cat(out)


def _check_seed(seed):
    """t-SNE's seed (scikit-learn's random_state) is an int in 0..2**32 - 1."""
    data.check_count("seed", seed, 0)
    if seed >= 2 ** 32:
        raise ValueError(f"seed must be an int in 0..{2 ** 32 - 1}, got {seed!r}")


def atlas_layout(vectors, grid=10, min_count=5, seed=0):
    """(cell of each vector (N,), its row and column on the grid (K,) each): the vectors' t-SNE layout, its 1st to
    99th percentiles in each coordinate (a few far-off points would squeeze the rest into a corner), cut into
    grid x grid cells, the first coordinate down the rows; the cells holding at least min_count vectors are kept,
    numbered in the grid's reading order (cell -1: a vector in none kept)."""
    from sklearn.manifold import TSNE  # only here: it takes a second to load, and only this needs it
    _check_layout(grid, min_count, seed)
    vectors = torch.as_tensor(vectors).detach().cpu().double()
    if vectors.dim() != 2 or len(vectors) < 2 * min_count:
        raise ValueError(f"an activation atlas needs (N, C) vectors, N at least 2 x min_count = {2 * min_count}; got "
                         f"{tuple(vectors.shape)}")
    if not vectors.isfinite().all() or not vectors.std(0).max() > 0:
        raise NoMap("the vectors are all the same (a dead layer, or the same image again?) or not finite: they "
                    "have no layout")
    perplexity = min(30.0, (len(vectors) - 1) / 3)  # scikit-learn's default, or as many neighbours as there are
    xy = torch.from_numpy(TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors.numpy()))
    lo, hi = xy.quantile(0.01, dim=0), xy.quantile(0.99, dim=0)
    where = ((xy.clamp(lo, hi) - lo) / (hi - lo).clamp_min(1e-12) * grid).long().clamp(0, grid - 1)
    cells, cell, counts = (where[:, 0] * grid + where[:, 1]).unique(return_inverse=True, return_counts=True)
    kept = counts >= min_count
    if not kept.any():
        raise NoMap(f"no cell of the {grid} x {grid} grid holds min_count = {min_count} of the {len(vectors)} "
                    f"vectors: lower grid or min_count, or give more images")
    renumber = torch.cumsum(kept, 0) - 1  # `unique` sorts the cells, so the kept ones are numbered in reading order
    cell = torch.where(kept[cell], renumber[cell], -1)
    return cell, cells[kept] // grid, cells[kept] % grid


def _check_layout(grid, min_count, seed):
    data.check_count("grid", grid, 1)
    data.check_count("min_count", min_count, 1)
    _check_seed(seed)


def activation_atlas(model, images, labels, layer, technique, grid=10, min_count=5, seed=0, **common):
    """Render an activation atlas of `layer` on these images (one sample each, `layer_samples`) and their labels
    (class indices): `technique` (a Technique or featureviz.render) renders every kept cell's average in one batch,
    one image each, `common` going to it (steps, progress, ...); a cell whose average is 0 everywhere (of a dead
    unit) is left out. Returns an ActivationAtlas."""
    if not callable(technique):
        raise TypeError(f"technique must be a Technique or featureviz.render, as featureviz.techniques() gives them "
                        f"(techniques(vae, color_cov, magnitude)['maco']); got {technique!r:.60}")
    if common.get("images_per_target", 1) != 1:
        raise ValueError(f"an activation atlas renders one image per cell; got images_per_target="
                         f"{common['images_per_target']!r}")
    _check_layout(grid, min_count, seed)  # before the pass over the images
    labels = data.check_labels(labels, len(models.check_input(model, images)))
    if len(labels) and labels.min() < 0:
        raise ValueError(f"labels must be class indices >= 0; got {labels.min().item()}")
    vectors = layer_samples(model, images, layer, seed)
    cell, rows, cols = atlas_layout(vectors, grid, min_count, seed)
    inside = cell >= 0
    counts = torch.bincount(cell[inside], minlength=len(rows))
    means = torch.zeros(len(rows), vectors.shape[1]).index_add_(0, cell[inside], vectors[inside]) / counts[:, None]
    tally = torch.zeros(len(rows), int(labels.max()) + 1).index_put_(
        (cell[inside], labels[inside]), torch.ones(int(inside.sum())), accumulate=True)  # (K, classes)
    share, classes = (tally / counts[:, None]).max(1)
    alive = means.any(1)
    if not alive.any():
        raise NoMap(f"every cell's average is 0 at {layer} (its units are dead on these images): nothing to render")
    directions = [fv.Direction(layer, m, ATLAS_COSSIM_POW) for m in means[alive]]
    members = [(cell == k).nonzero()[:, 0] for k in alive.nonzero()[:, 0].tolist()]
    r = technique(model, directions, seed=seed, **common)
    return ActivationAtlas(layer, grid, rows[alive], cols[alive], r.images, counts[alive], classes[alive],
                           share[alive], directions, members)


# ----------------------------------------------------------------------------- command line

def command(dataset, preset, vae_preset, data_dir="data", steps=256, out=ATLAS_DIR, seed=0, checkpoints="checkpoints",
            techniques=ATLAS_TECHNIQUES):
    """The command line that builds the atlas from the notebooks' checkpoints, each value quoted for the shell."""
    options = dict(dataset=dataset, preset=preset, vae_preset=vae_preset, data_dir=data_dir, steps=steps, out=out,
                   seed=seed, checkpoints=checkpoints, techniques=",".join(techniques))
    return "python atlas.py " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in options.items())


def notebook_models(dataset, data_dir, preset, vae_preset, techniques, seed=0, checkpoints="checkpoints"):
    """(classifier, data, VAE or None) from the checkpoints the notebooks wrote under `checkpoints` (a smoke
    run's: checkpoints/smoke); seed: the notebooks' SEED, which draws their train/val split (and the synthetic
    data)."""
    d = data.load_data(dataset, data_dir, seed=seed)
    device = training.get_device()
    hint = f"run the notebooks first (with DATASET={dataset}, PRESET={preset}, VAE_PRESET={vae_preset} and SEED={seed})"
    model, _ = training.load_trained(Path(checkpoints) / f"classifier_{d.name}_{preset}.pt", d, seed, device, hint)
    vae = None
    if any(t in fv.LATENT_TECHNIQUES for t in techniques):
        vae, _ = training.load_trained(Path(checkpoints) / f"vae_{d.name}_{vae_preset}.pt", d, seed, device, hint)
    return model, d, vae


def arguments(description, argv=None):
    """The command line of the atlas (and of its benchmark). A setting left out is the notebooks' from the
    environment (DATASET, PRESET, VAE_PRESET, STEPS, SEED; not SMOKE), else their default on this device."""
    defaults = training.device_defaults()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", help="the dataset the notebooks ran on (data.load_data; default: DATASET, else cifar10)")
    p.add_argument("--data-dir", default=None, help="default: DATA_DIR, else ./data")
    p.add_argument("--preset", choices=sorted(models.CNN_PRESETS), help="the classifier's preset (default: PRESET)")
    p.add_argument("--vae-preset", choices=sorted(models.VAE_PRESETS), help="the VAE's preset (default: VAE_PRESET)")
    p.add_argument("--techniques", default=",".join(ATLAS_TECHNIQUES),
                   help=f"comma-separated names of {', '.join(fv.TECHNIQUE_NAMES)}")
    p.add_argument("--steps", type=int, help="render steps (default: STEPS, else 256)")
    p.add_argument("--out", default=str(ATLAS_DIR))
    p.add_argument("--seed", type=int, help="the notebooks' SEED (their train/val split; default: SEED, else 0)")
    p.add_argument("--checkpoints", default="checkpoints", help="the notebooks' checkpoints (a smoke run's: "
                   "checkpoints/smoke)")
    args = p.parse_args(argv)
    from_environment = [("dataset", "DATASET", "cifar10", {}),
                        ("preset", "PRESET", defaults["preset"], dict(choices=models.CNN_PRESETS)),
                        ("vae_preset", "VAE_PRESET", defaults["vae_preset"], dict(choices=models.VAE_PRESETS)),
                        ("steps", "STEPS", 256, dict(low=1)), ("seed", "SEED", 0, dict(low=0, high=training.MAX_SEED))]
    training.from_environment(p, args, from_environment)
    args.techniques = args.techniques.split(",")
    unknown = [t for t in args.techniques if t not in fv.TECHNIQUE_NAMES]
    if unknown:
        p.error(f"argument --techniques: unknown {unknown}; choose from {', '.join(fv.TECHNIQUE_NAMES)}")
    try:
        saved_manifest(args.out)  # before the data and the checkpoints load
    except (OSError, ValueError) as e:
        p.error(f"argument --out: {e}")
    return args


def main(argv=None):
    args = arguments("Build the atlas of the notebooks' classifier (checkpoints/).", argv)
    model, d, vae = notebook_models(args.dataset, args.data_dir, args.preset, args.vae_preset, args.techniques,
                                    args.seed, args.checkpoints)
    index = build_atlas(model, d, vae, args.techniques, args.out, steps=args.steps)
    print(f"the atlas is built: open {index.resolve()} in a browser")


if __name__ == "__main__":
    main()
