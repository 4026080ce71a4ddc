"""Execute the notebooks headless in smoke mode; check they are committed without outputs."""
import json
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["Classifier.ipynb", "VAE.ipynb", "Visualization.ipynb"]  # in dependency order
# the settings a user may have exported for Jupyter: the smoke run takes its own (DATA_DIR stays the user's)
SETTINGS = ("PRESET", "VAE_PRESET", "EPOCHS", "VAE_EPOCHS", "BATCH", "STEPS", "SEEDS", "SEED")


def _committed(name):
    """The notebook as the last commit holds it (a run in Jupyter saves its outputs into the working copy, which
    is the user's to keep); the working copy outside a git checkout."""
    try:
        return subprocess.run(["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / name).read_text()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_parameters_first(name):
    nb = json.loads(_committed(name))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"clear the outputs of {name}"
    first = "".join(code[0]["source"])
    assert "SMOKE" in first and "DATA_DIR" in first and "training.setting(" in first  # read from the environment
    ids = [c.get("id") for c in nb["cells"]]  # nbformat 4.5 wants one on every cell: a cell pasted in without one
    assert None not in ids and len(set(ids)) == len(ids), f"give every cell of {name} an id of its own"
    nbformat.validate(nbformat.from_dict(nb))  # ids of the allowed form, and the rest of the schema
    kinds = [c["cell_type"] for c in nb["cells"]]  # each section's text above its code, none split from it
    assert ("markdown", "markdown") not in zip(kinds, kinds[1:]), f"two texts in a row in {name}: a section lost " \
                                                                   f"its code"


# Appended to a training notebook's smoke run: its training cell re-run after PRESET or SEED changed, the data
# cell not (a user poking at settings). The trainer is replaced by one that records its call.
RERUN_TRAINING = """
cell, train, before = {cell!r}, training.{trainer}, (PRESET, SEED)
calls = []
trained = {result}, ckpt  # as they are now: the cell sets its own to None before the call
training.{trainer} = lambda d, path, **kw: (calls.append((path, kw["preset"])), trained)[1]
try:
    PRESET = {preset!r}
    exec(cell)  # the checkpoint is named after the preset it holds
    assert calls == [(Path("checkpoints", "smoke") / f"{prefix}_{{d.name}}_{preset}.pt", {preset!r})], calls
    PRESET, SEED = before[0], SEED + 1
    try:
        exec(cell)  # the data are of the old SEED's split
    except ValueError as e:
        assert "re-run the data cell" in str(e), e
    else:
        raise AssertionError("trained on the split of another SEED")
    assert len(calls) == 1, calls
finally:
    training.{trainer}, (PRESET, SEED) = train, before
"""
TRAINING = {"Classifier.ipynb": dict(trainer="train_classifier", result="model", preset="compact", prefix="classifier"),
            "VAE.ipynb": dict(trainer="train_vae", result="vae", preset="default", prefix="vae")}

# Appended to Classifier's smoke run, first: its analysis cells read what they say they read. The matrix counted
# by hand (rows true, columns predicted), of the predictions with TTA, which the accuracy it prints is of; the
# attributions explain the plain predictions of the images they show, and the mistakes are the plain model's.
CLASSIFIER_WIRING = """
import torch
counted = torch.zeros(len(d.classes), len(d.classes), dtype=torch.long)
for t, p in zip(d.test_y.tolist(), pred.tolist()):
    counted[t, p] += 1
assert torch.equal(torch.as_tensor(cm).long(), counted), "the confusion matrix is not rows true, columns predicted"
assert torch.equal(pred, training.predict(model, d.test_x, tta_level=2).argmax(1).cpu())
assert torch.equal(images.cpu(), d.test_x[:N_ATTR].float().div(255))
plain = training.predict(model, images).argmax(1)  # what is drawn: the maps of these images, these targets, steps
assert torch.equal(maps["saliency"].cpu(), attribution.saliency(model, images, plain).cpu())
assert torch.equal(maps["Grad-CAM"].cpu(), attribution.grad_cam(model, images, plain,
                                                                layer=labels[1].split("\\n")[1]).cpu())
ig = attribution.integrated_gradients(model, images, plain, steps=int(labels[2].split("\\n")[1].split()[0]))
assert torch.equal(maps["integrated gradients"].cpu(), attribution.to_heatmap(ig, signed=True).cpu())
# the mistakes explained: images the plain model gets wrong, the said class's maps, the true one's, their margin
assert len(wrong) > 0 and (training.predict(model, d.test_x[wrong]).argmax(1).cpu() != d.test_y[wrong]).all()
said_now = training.predict(model, mistaken).argmax(1)
assert torch.equal(explained["said"].cpu(), attribution.grad_cam(model, mistaken, said_now).cpu())
assert torch.equal(explained["true"].cpu(), attribution.grad_cam(model, mistaken, d.test_y[wrong]).cpu())
ig = attribution.integrated_gradients(model, mistaken, said_now, steps=IG_STEPS) - attribution.integrated_gradients(
    model, mistaken, d.test_y[wrong], steps=IG_STEPS)
assert torch.allclose(explained["margin"].cpu(), attribution.to_heatmap(ig, signed=True).cpu(), atol=1e-5)
"""

# Appended to Visualization's smoke run: the explorer renders when its button is pressed, once, not as the
# widgets move (a layer with fewer channels clamps the channel slider, a second change), with its steps and seed,
# and shows it once. Re-run with LAYER = None, as show_unit takes it, it starts at the classes.
PRESS_RENDER = """
cell, drawn, show, was = {cell!r}, [], show_unit, (LAYER, CHANNEL)
show_unit = lambda *args, **kwargs: drawn.append((args, kwargs)) or "its figure"  # as show_unit returns its figure
try:
    channel_box.value = channel_box.max
    layer_box.value = "head"
    technique_box.value = next(name for name in TECHNIQUES if name != TECHNIQUE)  # the box's, not the cell's
    steps_box.value, seed_box.value = UNIT_STEPS + 1, UNIT_SEED + 7
    assert drawn == [], drawn
    ui.manual_button.click()
    called = ("head", len(d.classes) - 1, technique_box.value), dict(steps=UNIT_STEPS + 1, seed=UNIT_SEED + 7)
    assert drawn == [called], drawn
    assert ui.result is None, "the figure, handed to the widget, is displayed a second time under the one drawn"
    LAYER, CHANNEL = None, d.classes[2]
    exec(cell)
    assert (layer_box.value, channel_box.value, channel_box.max) == ("head", 2, len(d.classes) - 1)
finally:
    show_unit = show
    LAYER, CHANNEL = was
"""


# And the unit cell's function on a neuron off the centre: every image rings where that neuron looks, and the
# title names it; on a class, the title names the class.
NEURON_RING = """
rows, cols = models.cell_centres(model, "block3.act2", d.test_x)
fig = show_unit("block3.act2", 0, "pixel", (2, 0))
rings = [(line.get_xdata()[0], line.get_ydata()[0]) for ax in fig.axes for line in ax.lines]
assert rings == [(cols[0].item(), rows[2].item())] * len(fig.axes), rings
assert "block3.act2 channel 0 at y=2, x=0" in fig._suptitle.get_text(), fig._suptitle.get_text()
fig = show_unit("head", d.classes[3], "pixel")  # a class by its name, as by its index
assert fig._suptitle.get_text().startswith(f"{d.classes[3]}: pixel reaches") and "(logit)" in fig._suptitle.get_text()
try:
    show_unit("head", "no such class", "pixel")
except ValueError as e:
    assert f"'no such class' is not a class of {d.name}; its classes are {d.classes[0]!r}" in str(e), e
else:
    raise AssertionError("an unknown class name rendered")
assert not any(ax.lines for ax in fig.axes), "a class reads the whole image: no ring"
"""


# And its atlas cell re-run with ATLAS off: the command it prints builds from the smoke run's own settings.
PRINTED_COMMAND = """
import contextlib, io, shlex
printed, was = io.StringIO(), ATLAS
ATLAS = False
try:
    with contextlib.redirect_stdout(printed):
        exec({cell!r})
finally:
    ATLAS = was
args = atlas.arguments("atlas", shlex.split(printed.getvalue().split("\\n")[1].strip())[2:])
assert (args.preset, args.vae_preset, args.steps, args.seed, args.checkpoints, args.techniques) == (
    PRESET, VAE_PRESET, STEPS, SEED, str(CKPT_DIR), ATLAS_TECHNIQUES), (printed.getvalue(), args)
# and from them the atlas reads the very checkpoints the notebooks wrote (their file names, one place each)
import torch
loaded = atlas.notebook_models(args.dataset, args.data_dir, args.preset, args.vae_preset, ["whitened"], args.seed,
                               args.checkpoints)
for mine, theirs in ((loaded[0], model), (loaded[2], vae)):
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
"""


# And its channel grid cell re-run, twice: a cell gives the same renders and exemplars every time it runs.
RERUN_CHANNELS = """
import torch
cell, in_the_run = {cell!r}, top.clone()  # the grid's exemplars as the notebook's own run found them
exec(cell)
first = r.images.clone(), top.clone()
exec(cell)
assert torch.equal(r.images, first[0]) and torch.equal(top, first[1]) and torch.equal(top, in_the_run)
# at the head the units are classes: the columns name them
exec(cell.replace('CHANNEL_LAYER = "block1.act2"', 'CHANNEL_LAYER = "head"'))
assert labels == d.classes[:len(channels)], labels
"""


# And its inversion cell draws the renders of its test images' own maps, layer by layer, under the images.
INVERSION = """
import torch
assert torch.equal(inverted["test image"], d.test_x[INVERT]) and list(inverted)[1:] == list(INVERT_LAYERS)
for layer in INVERT_LAYERS:
    inverting = featureviz.inversion_targets(model, d.test_x[INVERT], layer)
    assert torch.equal(inverted[layer], TECHNIQUES[TECHNIQUE](model, inverting, steps=STEPS, seed=SEED).images), layer
"""


# And its walk between two units, again in fourier with a shared spectrum: the same targets, the same images as a
# render of its own with fourier's recipe and shared=True.
ALIGNED = """
import torch
assert aligned.targets == walk.targets and len(aligned.targets) == len(MIXES)
recipe = featureviz.parameterization("fourier", color_cov=color_cov, decay=1.5, shared=True)
assert torch.equal(aligned.images, featureviz.render(model, walk.targets, param=recipe, steps=STEPS, seed=SEED).images)
"""


# And its activation atlas renders the cells of its samples' layout, each its cell's average.
ACTIVATION_ATLAS = """
import torch
samples = atlas.layer_samples(model, d.test_x[:ATLAS_SAMPLES], ATLAS_LAYER, SEED)
cell, rows, cols = atlas.atlas_layout(samples, GRID, MIN_COUNT, SEED)
places = list(zip(rows.tolist(), cols.tolist()))  # the layout's kept cells; the atlas's, less any of dead units
for row, col, direction in zip(layer_atlas.rows.tolist(), layer_atlas.cols.tolist(), layer_atlas.directions):
    k = places.index((row, col))
    assert torch.allclose(direction.vector, samples[cell == k].mean(0), atol=1e-5), (row, col)
# the cell shown beside its images: the fullest's render and its first test images
fullest = int(layer_atlas.counts.argmax())
assert ZOOM == fullest and torch.equal(zoomed, d.test_x[:ATLAS_SAMPLES][layer_atlas.members[fullest][:10]])
again = TECHNIQUES[TECHNIQUE](model, layer_atlas.directions, steps=STEPS, seed=SEED).images
assert torch.equal(layer_atlas.images, again)
"""


# And its load cell stopped midway (the independent classifier's training interrupted): no cell goes on with the
# models of before; each asks for the load cell again.
STOPPED_LOAD = """
cell, train, kept = {cell!r}, training.train_classifier, (model, ckpt, vae, other, TECHNIQUES)

def stopped(*args, **kwargs):
    raise KeyboardInterrupt

training.train_classifier = stopped
try:
    try:
        exec(cell)
    except KeyboardInterrupt:
        pass
    assert ckpt is None and other is None and TECHNIQUES is None, "the stopped load left models behind"
    try:
        show_unit("block3.act2", 0, "pixel")
    except RuntimeError as e:
        assert "re-run the load cell" in str(e), e
    else:
        raise AssertionError("rendered with the models of before the stopped load")
finally:
    training.train_classifier = train
    model, ckpt, vae, other, TECHNIQUES = kept
"""


def _smoke_checks(name, nb):
    """The cells appended to notebook `name` after its own (above), made from its cells."""
    if name in TRAINING:
        cell = next(c.source for c in nb.cells if f"training.{TRAINING[name]['trainer']}(" in c.source)
        wiring = CLASSIFIER_WIRING if name == "Classifier.ipynb" else ""  # before the re-run resets pred and cm
        return wiring + RERUN_TRAINING.format(cell=cell, **TRAINING[name])
    cell = next(c.source for c in nb.cells if "atlas.command(" in c.source)
    channels = next(c.source for c in nb.cells if "CHANNEL_LAYER =" in c.source)
    load = next(c.source for c in nb.cells if "other_ckpt =" in c.source)
    explorer = next(c.source for c in nb.cells if "widgets.interactive(" in c.source)
    return (PRESS_RENDER.format(cell=explorer) + NEURON_RING + PRINTED_COMMAND.format(cell=cell)
            + RERUN_CHANNELS.format(cell=channels) + ALIGNED + INVERSION + ACTIVATION_ATLAS
            + STOPPED_LOAD.format(cell=load))


def test_notebooks_run_in_smoke_mode(monkeypatch):
    """All three in one test, in order: each reads the checkpoints of those before it (also under pytest -n)."""
    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(SMOKE="1", DATASET="synthetic", RETRAIN="1", MPLBACKEND="Agg", ATLAS="1").items():
        monkeypatch.setenv(key, value)
    full_runs = {p: p.stat().st_mtime_ns for p in (ROOT / "checkpoints").glob("*.pt")}  # a user's, if any
    start = time.time()
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / name, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(_smoke_checks(name, nb)))
        client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute()
        except CellExecutionError as e:  # the first failing cell, with its traceback
            pytest.fail(f"{name} failed:\n{e}")
        out = ROOT / "outputs" / "smoke" / name  # beside the smoke run's figures, apart from a full run's
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors}"
    index = ROOT / "outputs" / "smoke" / "atlas" / "index.html"  # Visualization's last cell (ATLAS=1)
    assert index.stat().st_mtime >= start  # written by this run: a build always writes its index last
    smoke = ROOT / "checkpoints" / "smoke"  # beside a full run's, never over them
    assert all((smoke / f"{kind}_synthetic{preset}.pt").stat().st_mtime >= start for kind, preset in (
        ("classifier", "_small"), ("vae", "_small"), ("independent", "")))  # written by this run (RETRAIN=1)
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "checkpoints").glob("*.pt")} == full_runs


# Appended to Visualization's run on 64 px images: no VAE (its architecture is for 32 px), so no latent technique.
WITHOUT_A_VAE = """
assert d.size == 64 and vae is None and list(TECHNIQUES) == ["pixel", "pixel+reg", "fourier", "maco"], list(TECHNIQUES)
assert ATLAS_TECHNIQUES == ["maco"]
"""


def _shapes_folder(root, size=64, train=40, test=12):
    """An image folder of four classes of coloured shapes on noise, size x size PNGs."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for split, n in (("train", train), ("test", test)):
        for k, name in enumerate(["disc", "bar", "ring", "checker"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.rand(size, size, 3, generator=gen) * 80
                cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=gen)
                r = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
                shape = [r < 12, (xx - cx).abs() < 5, (r > 9) & (r < 14), (yy // 8 + xx // 8) % 2 == 0][k]
                img[shape] += torch.tensor([[140.0, 0, 0], [0, 140, 0], [0, 0, 140], [120, 120, 120]][k])
                Image.fromarray(img.clamp(0, 255).byte().numpy()).save(folder / f"{i}.png")


def test_the_classifier_and_visualization_notebooks_run_on_64_px_images_without_a_vae(tmp_path, monkeypatch):
    """An image folder of another size than the VAE's: the classifier trains, the visualizations render with the
    techniques that need no VAE, and the atlas command names those."""
    _shapes_folder(tmp_path / "shapes64")
    for key, value in dict(SMOKE="1", DATASET=str(tmp_path / "shapes64"), DATA_DIR=str(tmp_path), RETRAIN="1",
                           MPLBACKEND="Agg", ATLAS="0").items():  # its decoded images cached in tmp_path
        monkeypatch.setenv(key, value)
    for name, check in (("Classifier.ipynb", ""), ("Visualization.ipynb", WITHOUT_A_VAE)):
        nb = nbformat.read(ROOT / name, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(check))
        try:
            client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
            client.execute()
        except CellExecutionError as e:
            pytest.fail(f"{name} failed on 64 px images:\n{e}")
    printed = "".join(o.get("text", "") for o in nb.cells[-2].outputs)  # the atlas cell's command
    assert printed.endswith("--techniques maco\n"), printed
