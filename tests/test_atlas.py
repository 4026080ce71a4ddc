"""The atlas: page structure (every channel has its card, every link and image resolves), resuming and
stale keys, the selectivity and head-contribution numbers, and a real headless browser."""
import collections
import copy
import dataclasses
import os
import re
import shlex
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
import torch.nn.functional as F
from matplotlib.colors import to_hex
from torch import nn

import atlas
import data
import featureviz as fv
import metrics
import models
import training
import utils

STEPS = 4
TECHNIQUES = atlas.ATLAS_TECHNIQUES


@pytest.fixture(scope="module")
def tiny():
    d = data.load_data("synthetic", n_train=400, n_test=120, seed=1)
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()
    vae = models.build_model(models.vae_config("small")).eval()
    return model, d, vae


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    model, d, vae = tiny
    out = tmp_path_factory.mktemp("atlas")
    index = atlas.build_atlas(model, d, vae, TECHNIQUES, out, steps=STEPS, progress=False)
    return out, index


class Links(HTMLParser):
    """Every href and img src of a page, the ids of its channel cards and of any element."""

    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.cards, self.ids = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag in ("img", "link"):
            self.srcs.append(a.get("src") or a.get("href"))
        if tag == "div" and a.get("class") == "card":
            self.cards.append(a["id"])


def parse(path):
    p = Links()
    p.feed(path.read_text())
    return p


def links_resolve(out):
    """Every link and image of every page of the atlas in `out` is a file of the folder (an element of it)."""
    for page in out.glob("*.html"):
        links = parse(page)
        for ref in links.hrefs + links.srcs:
            target = urlparse(ref)
            assert not target.scheme and not target.netloc, f"{page.name} links outside the folder: {ref}"
            path = out / (target.path or page.name)  # "#c3": a card on this page
            assert path.is_file(), f"{page.name} links to a missing {ref}"
            if target.fragment:
                assert target.fragment in parse(path).ids, ref


def test_every_channel_of_every_block_has_its_card_and_every_link_resolves(tiny, built):
    model, d, _ = tiny
    out, index = built
    assert index == out / "index.html"
    layers = models.block_layers(model, 32)
    pages = [index] + [out / f"layer-{atlas.safe(layer)}.html" for layer in layers] + \
            [out / f"class-{c}.html" for c in range(len(d.classes))] + [out / atlas.ACTIVATION_FILE]
    for layer in layers:
        cards = parse(out / f"layer-{atlas.safe(layer)}.html").cards
        assert cards == [f"c{c}" for c in range(models.layer_channels(model, layer, 32))]
    assert sorted(pages) == sorted(out.glob("*.html"))  # no page of another build
    links_resolve(out)
    linked = {urlparse(h).path for h in parse(index).hrefs}
    assert {p.name for p in pages[1:]} <= linked  # the index reaches every layer and class page


def test_class_pages_list_the_channels_that_add_most_to_the_logit(tiny, built):
    model, d, _ = tiny
    out, _ = built
    last = models.block_layers(model, 32)[-1]
    contrib = atlas.head_contributions(model, d.test_x, d.test_y, len(d.classes))[1]
    best = contrib[3].argsort(descending=True)[:atlas.CONTRIBUTORS].tolist()
    cards = [h for h in parse(out / "class-3.html").hrefs if "#c" in h]
    assert cards == [f"layer-{atlas.safe(last)}.html#c{j}" for j in best]


def test_head_contributions_are_head_weight_times_the_class_mean_of_its_inputs(tiny):
    model, d, _ = tiny
    logits, contrib = atlas.head_contributions(model, d.test_x, d.test_y, len(d.classes))
    assert torch.allclose(logits, fv.activations(model, d.test_x, [fv.Class(k) for k in range(10)]), atol=1e-4)
    feats = metrics.features(model, d.test_x)  # what our CNN's head reads
    scale = model.config["logit_scale"]  # logit units: our CNN's logits are its head's output x this
    expected = torch.stack([scale * model.head.weight[k].detach() * feats[d.test_y == k].mean(0) for k in range(10)])
    assert torch.allclose(contrib, expected, atol=1e-4)
    assert model.head.bias is None
    for k in range(10):  # the contributions add up to the class's mean logit
        assert contrib[k].sum().item() == pytest.approx(logits[d.test_y == k, k].mean().item(), abs=1e-4)
    conv_head = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 32), torch.nn.Flatten())
    assert atlas.head_contributions(conv_head, d.test_x, d.test_y, 10)[1] is None
    assert atlas.head_contributions(UnusedLastLinear(), d.test_x, d.test_y, 10)[1] is None


class HeadRegisteredFirst(torch.nn.Module):
    """A squeeze-and-excitation gate, an nn.Linear registered after the head, which runs last."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 10)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.gate = torch.nn.Linear(4, 4)

    def forward(self, x):
        m = self.conv(x)
        gated = m * torch.sigmoid(self.gate(m.mean((2, 3))))[:, :, None, None]
        return self.fc(gated.mean((2, 3)))


def test_the_head_is_the_last_layer_to_run_not_the_last_registered():
    torch.manual_seed(0)
    model, x, y = HeadRegisteredFirst(), torch.rand(30, 3, 32, 32), torch.arange(30) % 10
    logits, contrib = atlas.head_contributions(model, x, y, 10)
    assert contrib.shape == (10, 4)  # the head's (10, 4), not the gate's (4, 4)
    for k in range(10):
        assert contrib[k].sum() + model.fc.bias[k].detach() == pytest.approx(logits[y == k, k].mean().item(), abs=1e-5)
    twice = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    head = torch.nn.Linear(4, 4)
    twice.append(head).append(head)  # one head run twice a pass: no one input per image (was an IndexError)
    assert atlas.head_contributions(twice, x, y % 4, 4)[1] is None
    pooled = PooledWithUnusedLinear()
    assert atlas.head_reads(pooled, "net.1", x[:4])  # its head, not the nn.Linear registered after it


class PooledWithUnusedLinear(torch.nn.Module):
    """A head reading its map's channels, and an nn.Linear registered after it that never runs."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
        self.unused = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.net(x)


class UnusedLastLinear(torch.nn.Module):
    """A conv classifier with an nn.Linear registered last that its forward never runs."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 32), torch.nn.Flatten())
        self.projection = torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.net(x)


def test_selectivity_is_high_for_a_one_class_channel_and_low_for_an_even_one():
    means = torch.zeros(10, 4)
    means[4, 0] = 2.0       # fires for one class only: 10x its mean over the classes
    means[:, 1] = 0.7       # fires alike for every class
    means[4, 3] = 1e-4      # barely fires, for one class: its mean is taken as 1% of the layer's 2.0
    sel = atlas.selectivity(means)  # channel 2 never fires
    assert sel.tolist() == pytest.approx([10.0, 1.0, 0.0, 0.005])
    means[:, 2] = -1.0      # negative for every class but one: the negatives count as 0
    means[7, 2] = 0.5
    assert atlas.selectivity(means)[2].item() == pytest.approx(10.0)


def test_the_progress_bar_counts_images_and_the_pages_load_them_lazily(tiny, tmp_path, capsys):
    """A unit of 256 channels takes ten times one of 24: the bar counts images, so its estimate weighs them."""
    model, d, vae = tiny
    layers = models.block_layers(model, 32)[-2:]
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS)
    total = len(TECHNIQUES) * (sum(models.layer_channels(model, layer) for layer in layers) + len(d.classes)) + \
        atlas.activation_grid(len(d.test_y))[0] ** 2  # the activation atlas's cells, at most
    assert f"{total}/{total}" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    page = (tmp_path / f"layer-{atlas.safe(layers[0])}.html").read_text()
    tags = re.findall(r"<img [^>]*>", page)
    assert tags and all('loading="lazy"' in tag for tag in tags)


def test_file_names_are_ones_windows_takes_too():
    assert [atlas.safe(n) for n in ("aux", "Con.1", "lpt9", "auxiliary", "block.aux", "com10", "a/b:c")] == [
        "aux_", "Con_.1", "lpt9_", "auxiliary", "block.aux", "com10", "a_b_c"]


def test_a_finished_build_is_reused_and_an_interrupted_one_resumes(tiny, tmp_path, monkeypatch):
    model, d, vae = tiny
    layers = models.block_layers(model, 32)[-2:]
    calls = []
    real_layer, real_classes, real_map = atlas._layer_page, atlas._class_pages, atlas._activation_page
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: calls.append(a[2]) or real_layer(*a))
    maps = []  # activation atlases built
    monkeypatch.setattr(atlas, "_activation_page", lambda *a: maps.append(a[2]) or real_map(*a))

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas, "_class_pages", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    assert calls == layers
    index = (tmp_path / "index.html").read_text()  # the finished layers open from the index, the rest are named
    assert all(f'href="layer-{atlas.safe(layer)}.html"' in index for layer in layers)
    assert all((tmp_path / f"layer-{atlas.safe(layer)}.html").exists() for layer in layers)
    assert '<h2 id="all-classes">Classes</h2><p>not built yet</p>' in index and "Test accuracy" not in index
    page = (tmp_path / f"layer-{atlas.safe(layers[0])}.html").read_text()  # its bar links to what is built
    assert f'href="layer-{atlas.safe(layers[1])}.html"' in page and '<span title="not built yet">classes' in page
    monkeypatch.setattr(atlas, "_class_pages", real_classes)
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    assert calls == layers and maps == [layers[-1]]  # the finished layers were kept, the classes and the map ran
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    assert calls == layers and len(maps) == 1
    other_map = tmp_path / "img" / atlas.ACTIVATION_IMAGES / "999.png"  # a cell of a map before this one
    other_map.write_bytes(b"")
    (tmp_path / atlas.ACTIVATION_FILE).unlink()  # deleted by hand: built again, its old renders gone first
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    assert calls == layers and len(maps) == 2 and not other_map.exists()
    links_resolve(tmp_path)
    stale, mine = tmp_path / "img" / "stale.png", tmp_path / "atlas.zip"
    left = tmp_path / ".class-0.html.0123456789ab.tmp"
    for f in (stale, left, mine):  # a page of other settings, a killed build's temporary file, the user's file
        f.write_bytes(b"")
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS + 1, progress=False)  # other settings
    assert calls == layers * 2 and not stale.exists() and not left.exists()  # started afresh
    assert mine.exists()  # what the atlas did not write is left alone
    code = atlas._code()
    # the pages' own code and that of the modules which render, read the layers (block_layers) and predict
    for module in (fv, atlas, models, metrics, training, data):
        assert Path(module.__file__).read_text() in code, module.__name__
    monkeypatch.setattr(atlas, "_code", lambda: code + "# a technique's or a page's settings edited")  # autoreload
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS + 1, progress=False)
    assert calls == layers * 3  # stale pages are never reused
    retrained, vae_retrained = copy.deepcopy(model), copy.deepcopy(vae)  # the same settings, other weights
    with torch.no_grad():
        retrained.head.weight.add_(1e-3)
        next(vae_retrained.parameters()).add_(1e-3)
    atlas.build_atlas(retrained, d, vae, TECHNIQUES, tmp_path, layers, STEPS + 1, progress=False)
    assert calls == layers * 4
    atlas.build_atlas(retrained, d, vae_retrained, TECHNIQUES, tmp_path, layers, STEPS + 1, progress=False)
    assert calls == layers * 5


def test_adding_a_layer_renders_only_it_and_a_layer_left_out_is_removed(tiny, tmp_path, monkeypatch):
    model, d, vae = tiny
    first, last = models.block_layers(model, 32)[0], models.block_layers(model, 32)[-1]  # last: the head reads it
    calls = []
    real_layer, real_classes = atlas._layer_page, atlas._class_pages
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: calls.append(a[2]) or real_layer(*a))
    monkeypatch.setattr(atlas, "_class_pages", lambda *a: calls.append(atlas.CLASSES) or real_classes(*a))

    def build(layers):
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS, progress=False)
        links_resolve(tmp_path)
        return (tmp_path / "class-3.html").read_text(), (tmp_path / "index.html").read_text()

    page, _ = build([first])
    assert calls == [first, atlas.CLASSES] and "#c" not in page
    page, _ = build([first, last])  # the class pages now list the channels of the new page: built again
    assert calls == [first, atlas.CLASSES, last, atlas.CLASSES] and f"layer-{atlas.safe(last)}.html#c" in page
    assert f'href="layer-{atlas.safe(last)}.html"' in (tmp_path / f"layer-{atlas.safe(first)}.html").read_text()
    page, index = build([last])
    assert len(calls) == 4 and f"layer-{atlas.safe(last)}.html#c" in page  # nothing rendered
    gone = [tmp_path / f"layer-{atlas.safe(first)}.html", tmp_path / "img" / atlas.safe(first)]
    assert not any(p.exists() for p in gone) and first not in index
    assert first not in (tmp_path / f"layer-{atlas.safe(last)}.html").read_text()  # nor in the bar of links
    build([last, first])
    assert calls[4:] == [first]
    (tmp_path / f"layer-{atlas.safe(first)}.html").unlink()  # deleted by hand: built again, not an error
    build([last, first])
    assert calls[5:] == [first]

    def interrupted(*a):
        raise KeyboardInterrupt

    (tmp_path / f"layer-{atlas.safe(last)}.html").unlink()  # the page the class pages link: they go too
    monkeypatch.setattr(atlas, "_layer_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, [last, first], STEPS, progress=False)
    links_resolve(tmp_path)
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: calls.append(a[2]) or real_layer(*a))
    build([last, first])
    assert calls[6:] == [last, atlas.CLASSES]
    monkeypatch.setattr(atlas, "_class_pages", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the class pages listed the last layer's channels: to be built again
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, [first], STEPS, progress=False)
    links_resolve(tmp_path)  # the old class pages linked the removed layer's cards
    assert not list(tmp_path.glob("class-*.html")) and '<h2 id="all-classes">Classes</h2><p>not built yet</p>' in (
        tmp_path / "index.html").read_text()


def test_the_key_names_the_device_its_pages_were_rendered_on(tiny, monkeypatch):
    model, _, vae = tiny
    on_cpu = atlas.fingerprint(model, vae)
    assert atlas.fingerprint(model, vae) == on_cpu
    monkeypatch.setattr(models, "device_of", lambda m: torch.device("cuda", 0))  # random numbers drawn otherwise
    on_gpu = atlas.fingerprint(model, vae)
    monkeypatch.setattr(models, "device_of", lambda m: torch.device("cuda", 1))
    assert on_gpu != on_cpu and atlas.fingerprint(model, vae) == on_gpu  # the same pages on any GPU of a kind


def test_a_rebuild_that_fails_for_its_model_leaves_the_finished_atlas_as_it_was(tiny, tmp_path):
    model, d, vae = tiny
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    gray_vae = models.build_model(models.vae_config("small", in_channels=1)).eval()  # draws 1-channel images
    with pytest.raises(ValueError, match="the VAE makes 1-channel 32x32 images and the model takes 3-channel"):
        atlas.build_atlas(model, d, gray_vae, ("pixel", "whitened"), tmp_path, ["block3.act2"], STEPS,
                          progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("cut", ["emptying", "moving"])
@pytest.mark.parametrize("again", [STEPS + 1, STEPS], ids=["its-settings", "the-old-settings"])
def test_a_swap_cut_short_is_finished_under_its_settings_and_built_afresh_under_others(tiny, tmp_path, monkeypatch,
                                                                                       again, cut):
    model, d, vae = tiny
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    calls, real_unlink, real_replace = [], os.unlink, Path.replace

    def unlink(path, *a, **k):  # the old atlas's files, as the swap empties the folder
        if not os.path.basename(path).startswith("."):  # not the temporary file of a manifest
            calls.append(path)
            if cut == "emptying" and len(calls) == 3:
                raise KeyboardInterrupt
        real_unlink(path, *a, **k)

    def replace(path, target):  # the new atlas's files, as they move in
        calls.append(path)
        if cut == "moving" and len(calls) > 3 and path.name != atlas.MANIFEST:
            raise KeyboardInterrupt
        return real_replace(path, target)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):  # other settings: built beside it, then swapped in, and interrupted
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS + 1, progress=False)
    monkeypatch.undo()
    assert atlas.saved_manifest(tmp_path)["key"] is None
    pages = []
    real_layer = atlas._layer_page
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: pages.append(a[2]) or real_layer(*a))
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], again, progress=False)
    # its own settings: the swap finished, nothing rendered; the half-emptied atlas's: built again
    assert pages == ([] if again == STEPS + 1 else ["block3.act2"])
    assert not atlas.staging(tmp_path).exists() and atlas.saved_manifest(tmp_path)["key"] is not None
    links_resolve(tmp_path)
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], again, progress=False)
    assert len(pages) == (again == STEPS) * 1  # whole: reused


def test_a_swap_cut_short_and_given_up_is_never_resumed(tiny, tmp_path, monkeypatch):
    """Its images moved into the folder, which another build then empties: were it resumed later, its pages
    (still beside the folder) would link images that are gone."""
    model, d, vae = tiny
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    real_replace, real_layer = Path.replace, atlas._layer_page

    def replace(path, target):  # the swap stops with img/ moved in, and no page
        real_replace(path.parent / "img", Path(target).parent / "img")
        raise KeyboardInterrupt

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS + 1, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(atlas, "_layer_page", interrupted)
    with pytest.raises(KeyboardInterrupt):  # a third setting: the folder is emptied, its img/ with it
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS + 2, progress=False)
    assert not atlas.staging(tmp_path).exists()
    pages = []
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: pages.append(a[2]) or real_layer(*a))
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS + 1, progress=False)
    assert pages == ["block3.act2"]  # rendered again, not taken from the half-moved atlas
    links_resolve(tmp_path)


def test_a_rebuild_is_built_beside_the_atlas_which_stays_whole_until_the_new_one_is(tiny, tmp_path, monkeypatch):
    model, d, vae = tiny
    layers = models.block_layers(model, 32)[-2:]
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    old = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls, real_layer = [], atlas._layer_page

    def second_interrupted(*a):
        calls.append(a[2])
        if a[2] == layers[1]:
            raise KeyboardInterrupt
        return real_layer(*a)

    new = atlas.staging(tmp_path)
    new.mkdir()
    (new / ".atlas.json.0123456789ab.tmp").write_text("")  # the first write of a killed rebuild: no other file
    monkeypatch.setattr(atlas, "_layer_page", second_interrupted)
    with pytest.raises(KeyboardInterrupt):  # other settings, stopped in their second layer
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == old
    assert new.parent == tmp_path.parent and (new / f"layer-{atlas.safe(layers[0])}.html").is_file()
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: calls.append(a[2]) or real_layer(*a))
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert calls == [layers[0], layers[1], layers[1]]  # resumed beside the old atlas, then swapped in
    assert not new.exists() and (tmp_path / "notes.txt").read_text() == "mine"
    links_resolve(tmp_path)
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert len(calls) == 3  # the new atlas, recorded under its own settings, is reused
    monkeypatch.setattr(atlas, "_layer_page", second_interrupted)
    with pytest.raises(KeyboardInterrupt):  # a rebuild given up: the next build under the folder's settings
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS, progress=False)
    assert new.exists()
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert len(calls) == 5 and not new.exists()  # reused the atlas there, and removed the one beside it
    new.mkdir()  # emptied by a swap stopped before its last step, removing it
    (new / "notes.txt").write_text("mine")
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert new.exists()  # a file of the user's: left alone
    (new / "notes.txt").unlink()
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert len(calls) == 5 and not new.exists()
    new.mkdir()  # given up once it had written its activation atlas's page: the atlas's file, removed as well
    (new / atlas.ACTIVATION_FILE).write_text("")
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS + 1, progress=False)
    assert len(calls) == 5 and not new.exists()
    # no folder beside it where a new one cannot go (a parent not writable, a mount point): emptied first, as before
    assert atlas.staging(tmp_path / "new") is None
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    assert atlas.staging(tmp_path) is None
    with pytest.raises(KeyboardInterrupt):
        atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, layers, STEPS, progress=False)
    assert not new.exists() and not (tmp_path / f"layer-{atlas.safe(layers[1])}.html").exists()


def test_a_build_interrupted_in_its_first_layer_resumes_and_credits_no_channels_without_a_page(tiny, tmp_path,
                                                                                                 monkeypatch):
    model, d, vae = tiny
    layers = ["block2.act2"]  # as wide as block3.act2, the layer the head reads, which gets no page here
    real_layer = atlas._layer_page

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas, "_layer_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    monkeypatch.setattr(atlas, "_layer_page", real_layer)
    atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, layers, STEPS, progress=False)
    page = (tmp_path / "class-3.html").read_text()
    assert "which this atlas has no page for" in page and "#c" not in page


def test_class_names_are_escaped_wherever_a_page_shows_them(tmp_path):
    """An image folder's class names are the user's: quotes and markup are shown, not parsed."""
    names = ['a"b', "<i>x"]
    site = atlas.Site(tmp_path, SimpleNamespace(classes=names, test_x=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
                      ["maco"])
    shown = site.bars(torch.tensor([1.0, 2.0])) + site.page(names[1], "") + site.figure("x.png", names[0])
    assert "<i>" not in shown and 'a"b' not in shown
    assert 'title="a&quot;b: ' in shown and "&lt;i&gt;x" in shown


def test_classes_without_test_images_and_three_classes_read_right(tmp_path):
    d = SimpleNamespace(classes=["cat", "dog", "bird"], test_x=torch.zeros(3, 3, 32, 32, dtype=torch.uint8),
                        test_y=torch.tensor([0, 2, 2]))
    site = atlas.Site(tmp_path, d, ["maco"])
    means = atlas.class_means(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 2]), 3)  # no dog
    assert means[1].isnan().all()
    assert atlas.selectivity(means).tolist() == pytest.approx([1.5, 0.0])  # over cat and bird alone
    bars = site.bars(means[:, 0])
    assert "nan" not in bars and "dog: no test images" in bars and "height:48px;margin-top:0px" in bars
    assert 'aria-label="cat 1.000, dog none, bird 3.000"' in bars  # every value, read out
    style = "--w:22px;--g:3px"
    assert bars.startswith(f'<div class="chart"><div class="bars" style="{style}" role="img"') and bars.endswith(
        "</div></div>")
    assert f'<div class="barlabels" style="{style}" aria-hidden' in bars

    for k in (10, 23, 100, 140, 149, 200, 590):  # a hundred classes' bars fit the card as ten do, each as wide as
        w, gap = atlas.bar_layout(k)           # it can be; past 148, closer together (they overflowed at 3 px)
        assert k * w + (k - 1) * gap <= 590 < k * (w + 1) + (k - 1) * gap or w == 22
        assert gap == 3 or k > 148 and k * w + (k - 1) * (gap + 1) > 590
    assert atlas.bar_layout(10) == atlas.bar_layout(23) == (22, 3) and atlas.bar_layout(100) == (2, 3)
    signed = site.bars(torch.tensor([-2.0, 1.0, 0.0]))  # a signed map (the whitening conv's): both ways from 0
    assert '<div class="bar neg" style="height:32px;margin-top:16px" title="cat: -2.000">' in signed  # down from 0
    assert '<div class="bar" style="height:16px;margin-top:0px" title="dog: 1.000">' in signed  # up to it
    assert '<div class="bar" style="height:0px;margin-top:16px" title="bird: 0.000">' in signed
    uneven = site.bars(torch.tensor([0.7, 0.26, -0.3]))  # rounded once: every bar meets the line at 34 px
    assert "height:12px;margin-top:22px" in uneven and "height:14px;margin-top:34px" in uneven
    dead = site.bars(torch.zeros(3))  # a channel that never fires: its bars stand on the foot, not hang from the top
    assert dead.count("height:0px;margin-top:48px") == 3
    cm = torch.tensor([[50, 3, 1], [4, 40, 2], [0, 5, 45]])
    body = site.class_body(0, torch.tensor([0]), torch.tensor([1.0]), cm, "block3.act2", "but not one to one")
    assert "The head reads the channels of block3.act2, but not one to one." in body
    assert 'alt="test image 0, a cat"' in body and 'alt="maco visualization of cat"' in body
    confused = body[body.index("Most confused with"):]
    assert 'href="class-1.html"' in confused and 'href="class-2.html"' in confused
    assert 'href="class-0.html"' not in confused  # never a class with itself
    cm = torch.tensor([[50, 3, 0], [4, 40, 2], [0, 5, 45]])
    confused = site.class_body(0, torch.tensor([0]), torch.tensor([1.0]), cm, "block3.act2", "x")
    assert 'href="class-2.html"' not in confused  # never confused either way: no confusion to list
    alone = site.class_body(0, torch.tensor([0]), torch.tensor([1.0]), torch.eye(3), "block3.act2", "x")
    assert "<table>" not in alone and "No other class, either way" in alone
    contrib = 2.0 * means  # (classes, channels): the dog's row NaN, as head_contributions gives it
    dog = site.class_body(1, torch.tensor([0]), torch.tensor([1.0]), cm, "block3.act2", contrib[1])
    assert "nan" not in dog and "No test images of this class" in dog and "ch 0" not in dog
    assert "ch 0: +6.00" in site.class_body(2, torch.tensor([0]), torch.tensor([1.0]), cm, "block3.act2", contrib[2])


class Parsed(HTMLParser):
    """The tags of a page, the text it shows, and each image's alt beside its figure's caption."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.alts = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.alts.append(dict(attrs).get("alt"))

    def handle_data(self, text):
        self.text.append(text)


def test_hostile_names_and_lost_images_in_a_whole_build(tiny, tmp_path, monkeypatch):
    """An image folder's class names are the user's, shown and never parsed on every page; a page whose images
    were deleted (a copy that lost img/) is built again, not reused with broken images."""
    model, d, _ = tiny
    hostile = copy.copy(d)
    hostile.classes = ['a"b', "<i>x", "R&D", *d.classes[3:]]
    layer = models.block_layers(model, 32)[-1]
    calls, real_layer = [], atlas._layer_page
    monkeypatch.setattr(atlas, "_layer_page", lambda *a: calls.append(a[2]) or real_layer(*a))
    atlas.build_atlas(model, hostile, None, ("maco",), tmp_path, layer, steps=1, progress=False)
    links_resolve(tmp_path)
    for page in tmp_path.glob("*.html"):
        parsed = Parsed()
        parsed.feed(page.read_text())
        assert "i" not in parsed.tags, page.name  # <i>x is text, not markup
        assert parsed.tags.count("h1") == 1 and all(parsed.alts), page.name  # one title; every image said
    index = (tmp_path / "index.html").read_text()
    assert "&lt;i&gt;x" in index and "R&amp;D" in index and f"<title>atlas of CNN on {d.name}</title>" in index
    first = (tmp_path / "class-1.html").read_text()
    assert f"<title>class 1: &lt;i&gt;x · atlas of CNN on {d.name}</title>" in first
    assert 'href="index.html#all-classes"' in first and '<h2 id="all-classes">' in index  # every class, from any page
    layer_page = (tmp_path / f"layer-{atlas.safe(layer)}.html").read_text()
    assert '<h2>channel 0</h2>' in layer_page and 'alt="maco visualization of channel 0"' in layer_page
    shutil.rmtree(tmp_path / "img" / atlas.TESTS)
    atlas.build_atlas(model, hostile, None, ("maco",), tmp_path, layer, steps=1, progress=False)
    assert calls == [layer, layer]  # its page showed deleted test images: built again
    links_resolve(tmp_path)
    atlas.build_atlas(model, hostile, None, ("maco",), tmp_path, layer, steps=1, progress=False)
    assert calls == [layer, layer]  # whole: reused


def test_the_printed_command_builds_the_atlas_the_notebook_would():
    line = atlas.command("cifar10-jpeg", "compact", "default", "/tmp/my data", 24, Path("outputs/smoke/atlas"), 3,
                         Path("checkpoints/smoke"), ["maco"])
    args = atlas.arguments("atlas", shlex.split(line)[2:])  # as the shell splits it
    # --seed: the notebooks' SEED, their train/val split
    assert (args.dataset, args.preset, args.vae_preset, args.data_dir, args.steps, args.out, args.seed,
            args.checkpoints, args.techniques) == ("cifar10-jpeg", "compact", "default", "/tmp/my data", 24,
                                                   "outputs/smoke/atlas", 3, "checkpoints/smoke", ["maco"])


def test_the_command_line_defaults_to_the_notebooks_settings_and_names_bad_flags(monkeypatch, capsys):
    for key, value in dict(DATASET="synthetic", PRESET="small", VAE_PRESET="wide", STEPS="32", SEED="2").items():
        monkeypatch.setenv(key, value)
    args = atlas.arguments("atlas", [])
    assert (args.dataset, args.preset, args.vae_preset, args.steps, args.seed) == ("synthetic", "small", "wide", 32, 2)
    assert atlas.arguments("atlas", ["--preset", "compact"]).preset == "compact"  # a flag beats the environment
    for argv, named in [(["--preset", "airbnch"], "--preset"), (["--vae-preset", "wdie"], "--vae-preset"),
                        (["--techniques", "maco,whitend"], "--techniques"), (["--steps", "0"], "--steps"),
                        (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32 - 1)], "--seed")]:  # SEED + 1 overflows
        with pytest.raises(SystemExit):
            atlas.arguments("atlas", argv)
        assert named in capsys.readouterr().err, argv
    monkeypatch.setenv("PRESET", "huge")
    assert atlas.arguments("atlas", ["--preset", "small"]).preset == "small"  # a flag overrides a bad variable
    with pytest.raises(SystemExit):
        atlas.arguments("atlas", [])
    assert "PRESET='huge': give one of" in capsys.readouterr().err
    monkeypatch.setenv("PRESET", "small")
    monkeypatch.setenv("STEPS", "0")
    with pytest.raises(SystemExit):
        atlas.arguments("atlas", [])
    assert "STEPS" in capsys.readouterr().err  # the variable named, not a flag that was never given


def test_bad_arguments_name_what_is_wrong(tiny, tmp_path, monkeypatch, capsys):
    model, d, vae = tiny
    for key in ("DATASET", "PRESET", "VAE_PRESET", "STEPS", "SEED"):  # only --out can be wrong
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="unknown technique 'sharp'"):
        atlas.build_atlas(model, d, vae, ("maco", "sharp"), tmp_path, steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="draws through a VAE"):
        atlas.build_atlas(model, d, None, TECHNIQUES, tmp_path, steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="unknown layer 'block9'"):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, ["block9"], STEPS, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, steps=0, progress=False)
    named = torch.nn.Sequential(collections.OrderedDict(classes=torch.nn.Conv2d(3, 4, 3), pool=torch.nn.Flatten()))
    with pytest.raises(ValueError, match=r"layer 'classes' and the class pages would write their images to the same"):
        atlas.build_atlas(named, d, vae, TECHNIQUES, tmp_path, ["classes"], STEPS, progress=False)
    four = copy.copy(d)  # its PNGs would take the fourth channel for transparency
    four.train_x = torch.cat([d.train_x, d.train_x[:, :1]], 1)
    with pytest.raises(ValueError, match="the atlas's pages show gray or colour images; .* has 4 channels"):
        atlas.build_atlas(model, four, vae, TECHNIQUES, tmp_path, steps=STEPS, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything is written
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files in it"):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, steps=STEPS, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # a folder that is not an atlas is left alone
    for manifest in ('{"frames": [], "key": null}', '{"key": "', "\xff"):  # another program's atlas.json, broken
        (tmp_path / atlas.MANIFEST).write_text(manifest, encoding="latin-1")
        with pytest.raises(ValueError, match="other files in it"):
            atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, steps=STEPS, progress=False)
        assert (tmp_path / "notes.txt").read_text() == "mine"  # was emptied for a manifest of other keys
        with pytest.raises(SystemExit):  # the command line says so before it loads anything
            atlas.arguments("atlas", ["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert "argument --out" in err and "other files in it" in err


def test_a_model_with_other_outputs_than_the_classes_is_refused_first(tiny, tmp_path):
    model, d, vae = tiny
    for k in (1, 11):
        other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(k))
        other(torch.zeros(1, 3, 32, 32))
        with pytest.raises(ValueError, match=f"the model has {k} outputs but synthetic has 10 classes"):
            atlas.build_atlas(other, d, vae, TECHNIQUES, tmp_path, steps=STEPS, progress=False)
    assert not any(tmp_path.iterdir())


def test_layers_whose_files_differ_in_case_only_are_refused(tiny, tmp_path):
    _, d, vae = tiny
    model = torch.nn.Sequential(collections.OrderedDict(SE=torch.nn.Conv2d(3, 4, 3), se=torch.nn.Conv2d(4, 10, 3),
                                                        pool=torch.nn.AdaptiveAvgPool2d(1), flat=torch.nn.Flatten()))
    with pytest.raises(ValueError, match=r"layer 'se' and layer 'SE' would write their images to the same folder"):
        atlas.build_atlas(model, d, vae, TECHNIQUES, tmp_path, ["SE", "se"], STEPS, progress=False)


def test_a_technique_or_layer_named_twice_is_shown_once(tiny, tmp_path):
    model, d, _ = tiny
    last = models.block_layers(model, 32)[-1]
    atlas.build_atlas(model, d, None, ("maco", "maco"), tmp_path, [last, last], STEPS, progress=False)
    page = (tmp_path / f"layer-{atlas.safe(last)}.html").read_text()
    assert page.count("/maco-0.png") == 1 and page.count('<div class="card"') == models.layer_channels(model, last, 32)
    assert (tmp_path / "index.html").read_text().count(f'href="layer-{atlas.safe(last)}.html"') == 1


def test_the_cards_show_the_channels_own_exemplars(tiny, built):
    model, d, _ = tiny
    out, _ = built
    layer = models.block_layers(model, 32)[-1]
    ex = fv.exemplars(model, d.test_x, fv.Channel(layer, 5), k=atlas.TOP)
    page = (out / f"layer-{atlas.safe(layer)}.html").read_text()
    card = page[page.index('id="c5"'):page.index('id="c6"')]
    shown = [int(s.split(".png")[0]) for s in card.split(f"img/{atlas.TESTS}/")[1:]]
    assert shown[:atlas.TOP] == ex.top.tolist()
    assert shown[atlas.TOP:] == fv.exemplars(model, d.test_x, fv.Channel(layer, 5), k=atlas.BOTTOM).bottom.tolist()
    # its bars: channel 5's own mean activation per class (the exact value on hover)
    acts = fv.activations(model, d.test_x, [fv.Channel(layer, 5)])[:, 0]
    means = [acts[d.test_y == k].mean().item() for k in range(len(d.classes))]
    assert [float(v) for v in re.findall(r'class="bar(?: neg)?"[^>]*title="[^"]*: (-?[0-9.]+)"', card)] == pytest.approx(
        means, abs=1e-3)


def test_the_index_shows_each_layers_most_selective_channels_first(tiny, built):
    model, d, _ = tiny
    out, _ = built
    links = parse(out / "index.html").hrefs
    for layer in models.block_layers(model, 32):
        n = models.layer_channels(model, layer, 32)
        acts = fv.activations(model, d.test_x, [fv.Channel(layer, c) for c in range(n)])
        best = atlas.selectivity(atlas.class_means(acts, d.test_y, len(d.classes))).argsort(descending=True)
        page = f"layer-{atlas.safe(layer)}.html#c"
        assert [h for h in links if h.startswith(page)] == [f"{page}{c}" for c in best[:atlas.STRIP].tolist()]


def test_class_pages_list_the_confusions_both_ways(tiny, built):
    model, d, _ = tiny
    out, _ = built
    cm = metrics.confusion_matrix(d.test_y, fv.activations(model, d.test_x, list(range(10))).argmax(1), 10)
    for c in range(10):
        page = (out / f"class-{c}.html").read_text()
        table = page[page.index("Most confused with"):]
        rows = [(int(j), int(a), int(b)) for j, a, b in
                re.findall(r'<tr><td><a href="class-(\d+).html">[^<]*</a></td><td>(\d+)</td><td>(\d+)</td></tr>', table)]
        both = cm[c] + cm[:, c]
        expected = [j for j in both.argsort(descending=True).tolist() if j != c and both[j] > 0][:3]
        assert rows == [(j, int(cm[c, j]), int(cm[j, c])) for j in expected], c


def test_the_activation_atlas_page_places_each_cell_and_lists_its_images(tiny, built):
    """The site's activation atlas of the last layer: each kept cell of the layout at its row and column, framed in
    its most common class's colour, linking to its card, which lists the first of the cell's test images."""
    model, d, _ = tiny
    out, index = built
    layer, n = models.last_spatial_layer(model, 32), len(d.test_y)
    grid, min_count = atlas.activation_grid(n)
    assert (grid, min_count) == (2, 8)  # 120 test images
    cell, rows, cols = atlas.atlas_layout(atlas.layer_samples(model, d.test_x, layer), grid, min_count)
    page = (out / atlas.ACTIVATION_FILE).read_text()
    placed = re.findall(r'<a href="#cell(\d+)" style="grid-row:(\d+);grid-column:(\d+);border-color:(#\w+)" '
                        r'title="cell \d+: (\d+) images, \d+% ([^"]+)"><img src="([^"]+)"', page)
    assert len(placed) == len(rows) > 1
    colour = utils.class_colours(10)
    for k, (number, row, col, hex_, count, name, src) in enumerate(placed):
        members = (cell == k).nonzero()[:, 0]
        common = torch.bincount(d.test_y[members], minlength=10).argmax().item()
        assert (int(number), int(row) - 1, int(col) - 1, int(count)) == (k, rows[k], cols[k], len(members))
        assert (name, hex_, src) == (d.classes[common], to_hex(colour(common)), atlas.Site.cell_file(k))
        card = page[page.index(f'id="cell{k}"'):]
        card = card[:card.index("</div></div>")]
        shown = [int(i) for i in re.findall(r'src="img/~test/(\d+).png"', card)]
        assert shown == members[:atlas.TOP].tolist()
    assert f'href="{atlas.ACTIVATION_FILE}"' in index.read_text()
    assert f'href="{atlas.ACTIVATION_FILE}"' in (out / f"layer-{atlas.safe(layer)}.html").read_text()  # its bar


def test_an_atlas_of_too_few_test_images_says_so_instead_of_a_map(tiny, tmp_path):
    model, d, vae = tiny
    few = dataclasses.replace(d, test_x=d.test_x[:12], test_y=d.test_y[:12])
    atlas.build_atlas(model, few, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    assert "needs at least 20 test images; synthetic has 12" in (tmp_path / atlas.ACTIVATION_FILE).read_text()
    assert "no map (its page says why)" in (tmp_path / "index.html").read_text()
    links_resolve(tmp_path)


def test_a_layer_without_a_map_leaves_the_rest_of_the_atlas_standing(tiny, tmp_path):
    """A dead last layer (every image's vector the same) has no t-SNE layout: its page says so, and the build ends
    as a whole atlas."""
    model, d, vae = tiny
    dead = copy.deepcopy(model)
    with torch.no_grad():
        for p in dead.block3.parameters():
            p.zero_()
    atlas.build_atlas(dead, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    page = (tmp_path / atlas.ACTIVATION_FILE).read_text()
    assert "No activation atlas of block3.act2: the vectors are all the same" in page
    assert (tmp_path / "class-0.html").is_file() and "no map" in (tmp_path / "index.html").read_text()
    links_resolve(tmp_path)


def test_the_activation_atlas_maps_the_first_test_images_alone(tiny, tmp_path, monkeypatch):
    model, d, vae = tiny
    monkeypatch.setattr(atlas, "ACTIVATION_SAMPLES", 60)
    mapped, real = [], atlas.activation_atlas
    monkeypatch.setattr(atlas, "activation_atlas",
                        lambda m, x, y, *a, **k: mapped.append((x, y)) or real(m, x, y, *a, **k))
    atlas.build_atlas(model, d, vae, ("pixel",), tmp_path, ["block3.act2"], STEPS, progress=False)
    assert len(mapped) == 1 and torch.equal(mapped[0][0], d.test_x[:60]) and torch.equal(mapped[0][1], d.test_y[:60])
    page = (tmp_path / atlas.ACTIVATION_FILE).read_text()
    shown = [int(i) for i in re.findall(r'src="img/~test/(\d+).png"', page)]
    assert "Each of the first 60 test images" in page and shown and max(shown) < 60
    assert " of the first 60 test images" in (tmp_path / "index.html").read_text()


# ----------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the Debian package) driven by Playwright; under CI=true a missing one fails."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        reason = "needs Playwright (pip) and Chromium (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _loaded(page, errors):
    """The page finished loading, every image on it has pixels (the lazy ones below the fold loaded first, as
    scrolling to them would), and nothing went wrong."""
    page.wait_for_load_state("load")
    page.eval_on_selector_all("img", "imgs => imgs.forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !i.complete || i.naturalWidth === 0)"
                                               ".map(i => i.getAttribute('src'))")
    assert broken == [], f"images that did not load on {page.url}: {broken[:5]}"
    assert page.eval_on_selector_all("img", "imgs => imgs.length") > 0
    assert errors == [], f"errors on {page.url}: {errors[:5]}"


def test_the_chart_of_a_thousand_classes_scrolls_in_its_card(browser, tmp_path):
    """An ImageNet model's 1,000 classes: bars of 1 px, wider than the 590 px card, scroll within it (they used
    to shrink to under a pixel, many drawn as none)."""
    classes = [f"class {i}" for i in range(1000)]
    d = SimpleNamespace(classes=classes, test_x=torch.zeros(1, 3, 32, 32, dtype=torch.uint8), test_y=torch.zeros(1))
    site = atlas.Site(tmp_path, d, ["maco"])
    page = browser.new_page()
    page.set_content(f"<style>{atlas.CSS}</style><div class='card'>{site.bars(torch.rand(1000))}</div>")
    scroll, width, bars = page.eval_on_selector(
        ".chart", "c => [c.scrollWidth, c.clientWidth, Array.from(c.querySelectorAll('.bar'))"
                  ".filter(b => b.getBoundingClientRect().width >= 1).length]")
    assert scroll >= 1000 > 600 > width and bars == 1000, (scroll, width, bars)
    page.close()


def test_the_atlas_opens_offline_in_a_browser(built, browser, tmp_path):
    out, index = built
    page = browser.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
    home = index.resolve().as_uri()
    page.goto(home)
    _loaded(page, errors)
    page.click("h3 a")                    # index -> the first layer
    _loaded(page, errors)
    assert "layer-" in page.url
    page.click("nav[aria-label=channels] a >> nth=3")  # layer -> its channel 3
    assert page.url.endswith("#c3") and page.is_visible("#c3")
    _loaded(page, errors)                 # the images the jump brought into view, before the page is left
    page.goto(home)
    _loaded(page, errors)                 # leaving it while its images load would abort them
    page.click(".strip a >> nth=0")       # index -> a selective channel's card
    _loaded(page, errors)
    card = urlparse(page.url).fragment
    assert card.startswith("c") and page.is_visible(f"#{card}")
    page.goto(home)
    _loaded(page, errors)
    page.click('a[href="class-0.html"]')  # index -> a class
    _loaded(page, errors)
    assert page.title().startswith("class 0: ") and page.eval_on_selector_all(
        "img", "imgs => imgs.every(i => i.alt && i.alt !== i.closest('figure').innerText)")
    page.click('nav a:has-text("classes")')  # a class -> the list of every class
    assert page.url.endswith("index.html#all-classes") and page.is_visible("#all-classes")
    _loaded(page, errors)
    page.click(f'a[href="{atlas.ACTIVATION_FILE}"]')  # index -> the activation atlas
    _loaded(page, errors)
    cell = page.eval_on_selector(".map a", "a => a.getBoundingClientRect().toJSON()")
    assert cell["width"] == cell["height"] == 70  # a render and its frame: its grid square
    page.click(".map a >> nth=1")  # -> the card of its cell 1
    assert page.url.endswith("#cell1") and page.is_visible("#cell1")
    _loaded(page, errors)
    page.screenshot(path=str(tmp_path / "activation.png"))
    page.goto((out / f"layer-{atlas.safe('block3.act2')}.html").resolve().as_uri())
    _loaded(page, errors)
    shot = Path(os.environ.get("ATLAS_SCREENSHOT", tmp_path / "layer.png"))
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_one_name_a_home_folder_and_the_training_statistics(tiny, tmp_path, monkeypatch):
    model, d, vae = tiny
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    kw = dict(layers="block1.act2", steps=1, progress=False)  # one technique, one layer: names, not letters
    index = atlas.build_atlas(model, d, None, "maco", "~/atl", **kw)
    assert index == tmp_path / "atl" / "index.html" and not (tmp_path / "~").exists()
    first = (tmp_path / "atl" / atlas.MANIFEST).read_text()
    other = data.load_data("synthetic", n_train=400, n_test=120, seed=1)
    other.train_x = other.train_x.flip(2)  # the same test set, other training images: other colour statistics
    atlas.build_atlas(model, other, None, "maco", "~/atl", **kw)
    assert (tmp_path / "atl" / atlas.MANIFEST).read_text() != first  # rebuilt, not resumed
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="out must be a folder for the atlas"):
        atlas.build_atlas(model, d, None, "maco", tmp_path / "file", **kw)


def test_head_reads_only_a_head_on_the_layers_pooled_channels(tiny):
    """A hidden linear layer as wide as the last conv, between them, is not the conv's channels: its class
    pages would have listed hidden units as the layer's channels."""
    model, d, _ = tiny
    last = models.last_spatial_layer(model, 32)
    assert atlas.head_reads(model, last, d.test_x[:8])  # ours: a max-pool, then the head
    torch.manual_seed(0)
    pooled = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten())
    direct = torch.nn.Sequential(*pooled, torch.nn.Linear(16, 10)).eval()
    hidden = torch.nn.Sequential(*pooled, torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    assert atlas.head_reads(direct, "1", d.test_x[:8])
    assert not atlas.head_reads(hidden, "1", d.test_x[:8])
    half = copy.deepcopy(direct).to(torch.bfloat16)  # its average pool rounds to bfloat16: not another head
    assert atlas.head_reads(half, "1", d.test_x[:8]) and not atlas.head_reads(hidden.to(torch.bfloat16), "1", d.test_x[:8])
    assert not atlas.head_reads(UnusedLastLinear(), "net.0", d.test_x[:8])  # its nn.Linear never runs: was an IndexError
    dense = DenseNetHead().eval()  # its last layer, a batch norm, is pooled after a functional ReLU
    assert models.last_spatial_layer(dense, 32) == "features" and atlas.head_reads(dense, "features", d.test_x[:8])


class DenseNetHead(nn.Module):
    """torchvision's DenseNet's ending: F.relu(features(x)), pooled, then the classifier; no layer is that ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):  # in place, as torchvision's: the map the layer made is overwritten
        return self.classifier(F.adaptive_avg_pool2d(F.relu(self.features(x), inplace=True), 1).flatten(1))


# ----------------------------------------------------------------------------- the activation atlas

def test_layer_samples_are_one_position_of_each_images_map_drawn_by_the_seed(tiny):
    model, d, _ = tiny
    x = d.test_x[:20]
    maps = models.capture(model, x, "block2.act2")["block2.act2"].float().flatten(2)  # (20, C, positions)
    s = atlas.layer_samples(model, x, "block2.act2", seed=0)
    assert s.shape == maps.shape[:2]
    # each row is one of its own image's positions, and not the mean over them
    assert ((maps - s[:, :, None]).abs().amax(1).amin(1) < 1e-5).all()
    assert torch.equal(s, atlas.layer_samples(model, x, "block2.act2", seed=0))
    # the same positions in batches of 7 (the model's numbers up to their rounding in batches of another size)
    assert torch.allclose(s, atlas.layer_samples(model, x, "block2.act2", seed=0, batch_size=7), atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        atlas.layer_samples(model, x, "block2.act2", batch_size=0)
    assert not torch.equal(s, atlas.layer_samples(model, x, "block2.act2", seed=1))


def test_the_layout_keeps_apart_what_differs_and_drops_sparse_cells():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 40  # three far-apart clusters of 8-D points, 30 each, and 2 points on their own
    points = torch.cat([c + torch.randn(30, 8, generator=g) for c in centres] + [torch.full((2, 8), -60.0)])
    cluster = torch.arange(3).repeat_interleave(30)
    cell, rows, cols = atlas.atlas_layout(points, grid=4, min_count=3)
    assert len(cell) == 92 and len(rows) == len(cols) and ((rows >= 0) & (rows < 4) & (cols >= 0) & (cols < 4)).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) == len(rows)  # one number per kept cell
    counts = torch.bincount(cell[cell >= 0], minlength=len(rows))
    assert (counts >= 3).all() and (cell[-2:] == -1).all()  # the pair: too few for a cell of its own
    for k in range(len(rows)):
        assert len(cluster[cell[:90] == k].unique()) <= 1, k  # no cell holds two clusters
    shuffled = cell[:90][torch.randperm(90, generator=g)]  # the check above fails for a layout that mixes them
    assert any(len(cluster[shuffled == k].unique()) > 1 for k in range(len(rows)))
    with pytest.raises(ValueError, match=r"needs \(N, C\) vectors, N at least 2 x min_count = 200; got \(92, 8\)"):
        atlas.atlas_layout(points, min_count=100)
    with pytest.raises(ValueError, match="grid must be an int >= 1, got 0"):
        atlas.atlas_layout(points, grid=0)


class _Layout:
    """scikit-learn's TSNE, giving a layout set in advance."""
    xy = None

    def __init__(self, *args, **kwargs):
        pass

    def fit_transform(self, x):
        return self.xy.numpy()


def test_the_layout_cuts_the_first_coordinate_into_rows_and_the_second_into_columns(monkeypatch):
    import sklearn.manifold
    # 3 points at the top left, 3 at the bottom left, 4 at the right of the middle row, 1 alone: a 3 x 3 grid
    _Layout.xy = torch.tensor([[0.0, 0.0], [0.1, 0.2], [0.2, 0.1], [2.9, 0.0], [3.0, 0.3], [2.8, 0.2],
                               [1.5, 2.9], [1.4, 3.0], [1.6, 2.8], [1.5, 2.95], [1.5, 1.5]], dtype=torch.float64)
    monkeypatch.setattr(sklearn.manifold, "TSNE", _Layout)
    cell, rows, cols = atlas.atlas_layout(torch.randn(11, 4), grid=3, min_count=2)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [0, 2, 0]  # in reading order: (0, 0), (1, 2), (2, 0)
    assert cell.tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1, 1, -1]  # the one in the middle cell: too few


def test_a_cell_of_dead_units_is_left_out_of_the_atlas(tiny, monkeypatch):
    import sklearn.manifold
    model, d, _ = tiny
    channels = models.layer_channels(model, "block3.act2")
    vectors = torch.cat([torch.zeros(10, channels), torch.rand(10, channels) + 0.1])  # a dead cell, a live one
    monkeypatch.setattr(atlas, "layer_samples", lambda *args: vectors)
    _Layout.xy = torch.tensor([[0.0, 0.0]] * 10 + [[3.0, 3.0]] * 10, dtype=torch.float64)
    monkeypatch.setattr(sklearn.manifold, "TSNE", _Layout)
    a = atlas.activation_atlas(model, d.test_x[:20], d.test_y[:20], "block3.act2", fv.render, grid=2, min_count=5,
                               steps=1, progress=False)
    assert (a.rows.tolist(), a.cols.tolist(), a.counts.tolist(), len(a.images)) == ([1], [1], [10], 1)
    assert torch.allclose(a.directions[0].vector, vectors[10:].mean(0))
    assert [m.tolist() for m in a.members] == [list(range(10, 20))]  # the live cell's images
    vectors = vectors[:13]  # the dead cell, and 3 live vectors too few for a cell of their own
    _Layout.xy = _Layout.xy[:13]
    with pytest.raises(ValueError, match="every cell's average is 0 at block3.act2 .*: nothing to render"):
        atlas.activation_atlas(model, d.test_x[:13], d.test_y[:13], "block3.act2", fv.render, grid=2, min_count=5,
                               steps=1, progress=False)


def test_an_activation_atlas_names_what_is_wrong_before_the_slow_work(tiny, monkeypatch):
    model, d, _ = tiny
    x, y = d.test_x[:40], d.test_y[:40]
    for kwargs, kind, match in [
            (dict(technique="maco"), TypeError, "technique must be a Technique or featureviz.render"),
            (dict(images_per_target=2), ValueError, "one image per cell; got images_per_target=2"),
            (dict(grid=0), ValueError, "grid must be an int >= 1, got 0"),
            (dict(min_count=0), ValueError, "min_count must be an int >= 1, got 0"),
            (dict(seed=-1), ValueError, r"seed must be an int >= 0, got -1"),
            (dict(seed=2 ** 32), ValueError, r"seed must be an int in 0..4294967295, got 4294967296"),
            (dict(labels=y - 1), ValueError, "labels must be class indices >= 0; got -1")]:
        args = dict(labels=y, technique=fv.render) | kwargs
        monkeypatch.setattr(atlas, "layer_samples", None)  # nothing is sampled before the error
        with pytest.raises(kind, match=match):
            atlas.activation_atlas(model, x, args.pop("labels"), "block3.act2", args.pop("technique"), **args)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="no cell of the 10 x 10 grid holds min_count = 5 of the 12 vectors"):
        atlas.atlas_layout(torch.randn(12, 4), grid=10, min_count=5)
    with pytest.raises(ValueError, match="the vectors are all the same"):
        atlas.atlas_layout(torch.ones(20, 4), grid=2, min_count=2)


def test_each_cell_of_an_activation_atlas_renders_its_own_average(tiny):
    model, d, _ = tiny
    x, y = d.test_x, d.test_y
    a = atlas.activation_atlas(model, x, y, "block3.act2", fv.render, grid=3, min_count=4, param="pixel",
                               transforms=None, steps=150, progress=False)
    samples = atlas.layer_samples(model, x, "block3.act2")
    cell, rows, cols = atlas.atlas_layout(samples, 3, 4)
    assert torch.equal(a.rows, rows) and torch.equal(a.cols, cols) and a.images.shape == (len(rows), 3, 32, 32)
    for k in range(len(rows)):
        mine = cell == k
        tally = collections.Counter(y[mine].tolist())
        most = max(tally.values())  # the class of the cell: one of its most common (a tie: any of them)
        assert a.counts[k] == mine.sum() and tally[a.classes[k].item()] == most
        assert abs(a.purity[k] - most / mine.sum()) < 1e-6
        assert torch.allclose(a.directions[k].vector, samples[mine].mean(0), atol=1e-5)
        assert torch.equal(a.members[k], mine.nonzero()[:, 0])
        assert a.directions[k].cossim_pow == atlas.ATLAS_COSSIM_POW
    # each cell's direction is raised most by its own render (what the render maximized) of all the atlas's
    values = fv.activations(model, a.images, a.directions)  # (renders, cells)
    assert len(rows) >= 3 and torch.equal(values.argmax(0), torch.arange(len(rows))), values


def test_the_activation_atlas_picture_puts_each_cell_in_its_place_framed_in_its_class_colour():
    import utils
    images = torch.stack([torch.full((3, 32, 32), v) for v in (0.0, 0.5, 1.0)])
    shown = SimpleNamespace(layer="block3.act2", grid=3, rows=torch.tensor([0, 1, 2]), cols=torch.tensor([2, 0, 1]),
                            images=images, counts=torch.tensor([5, 6, 7]), classes=torch.tensor([1, 4, 1]),
                            purity=torch.ones(3))
    fig = utils.plot_activation_atlas(shown, classes=[f"c{i}" for i in range(5)])
    canvas = fig.axes[0].images[0].get_array()
    tab10 = utils.plt.get_cmap("tab10")
    for k, (row, col, label) in enumerate([(0, 2, 1), (1, 0, 4), (2, 1, 1)]):
        y, x = row * 36, col * 36  # 32 px and a 2 px frame
        assert (abs(canvas[y + 2:y + 34, x + 2:x + 34] - images[k, 0, 0, 0].item()) < 1e-6).all(), k
        assert abs(canvas[y, x] - tab10(label)[:3]).max() < 1e-6, k
    assert (canvas[0:36, 0:36] == 1).all()  # a cell left out: blank
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["c1", "c4"]
    utils.plt.close(fig)
    many = utils.class_colours(30)  # past 20 classes, a colour each
    assert len({tuple(many(c)) for c in range(30)}) == 30
