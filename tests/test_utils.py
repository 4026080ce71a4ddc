"""Plotting helpers: figure structure, titles, gray/uint8 handling, atomic saving."""
import csv
from collections import OrderedDict
from pathlib import Path
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import utils  # noqa: E402

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROWS = [  # as csv.DictReader gives them: strings
    dict(epoch="1", train_loss="2.1", train_acc="0.25", val_loss="1.9", val_acc="0.31"),
    dict(epoch="2", train_loss="1.5", train_acc="0.45", val_loss="1.4", val_acc="0.5"),
    dict(epoch="3", train_loss="1.1", train_acc="0.61", val_loss="1.2", val_acc="0.58"),
]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def images(n=4, c=3, seed=0):
    return torch.rand(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def titles(fig):
    return [ax.get_title() for ax in image_axes(fig)]


def test_show_images_titles_and_grid():
    fig = utils.show_images(images(12), labels=torch.arange(12) % 10, classes=CLASSES, ncols=5, title="train")
    assert isinstance(fig, Figure)
    assert len(image_axes(fig)) == 12 and len(fig.axes) == 15  # 3 rows of 5, 3 hidden
    assert titles(fig) == [CLASSES[i % 10] for i in range(12)]
    assert fig._suptitle.get_text() == "train"
    np.testing.assert_allclose(image_axes(fig)[0].images[0].get_array(), images(12)[0].permute(1, 2, 0).numpy())


def test_gray_and_uint8_images():
    x = (images(3, c=1) * 255).to(torch.uint8)  # (N, 1, H, W) uint8
    fig = utils.show_images(x)
    im = image_axes(fig)[0].images[0]
    assert im.get_array().shape == (8, 8) and im.get_cmap().name == "gray"
    assert im.get_clim() == (0, 1)
    np.testing.assert_allclose(im.get_array(), x[0, 0].numpy() / 255, rtol=1e-6)
    fig = utils.show_images(x.numpy())  # arrays work too
    assert len(image_axes(fig)) == 3


def test_plot_curves_reads_string_rows_and_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for fig in (utils.plot_curves(rows), utils.plot_curves(path), utils.plot_curves(str(path))):
        loss_ax, acc_ax = fig.axes
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert set(lines) == {"train", "val"}
            for split, line in lines.items():
                np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
                np.testing.assert_allclose(line.get_ydata(), [float(r[f"{split}_{metric}"]) for r in ROWS])


def test_plot_confusion_labels_and_counts():
    cm = torch.tensor([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    fig = utils.plot_confusion(cm, CLASSES[:3])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES[:3]
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES[:3]
    assert [t.get_text() for t in ax.texts] == [str(v) for v in cm.flatten().tolist()]
    # each count in its cell: row i (true class) at y = i, column j (predicted) at x = j
    assert [t.get_position() for t in ax.texts] == [(j, i) for i in range(3) for j in range(3)]
    np.testing.assert_allclose(ax.images[0].get_array(), (cm / cm.sum(1, keepdim=True)).numpy())  # rows normalized
    # on a square-root scale: a 10% confusion a third of the way up the colours, not a tenth
    assert ax.images[0].norm(0.1) == pytest.approx(0.1 ** 0.5) and ax.images[0].norm(1.0) == pytest.approx(1.0)
    assert [t.get_color() for t in ax.texts[:3]] == ["white", "black", "black"]  # 5/6 on dark, 1/6 and 0 on light
    fig = utils.plot_confusion(cm.numpy(), CLASSES[:3], normalize=False)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), cm.numpy())


def test_without_class_names_the_indices_name_the_classes_and_long_names_break():
    cm = torch.tensor([[5, 1], [2, 7]])
    ax = utils.plot_confusion(cm).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    fig = utils.plot_misclassified(images(2), torch.tensor([3, 1]), torch.tensor([5, 1]))
    assert titles(fig) == ["True: 3\nPred: 5"]
    fig = utils.show_images(images(2), labels=[0, 1], classes=["American Staffordshire terrier", "cat"])
    assert titles(fig) == ["American\nStaffordshire\nterrier", "cat"]  # no line over 14 characters


def test_a_row_of_more_images_than_fit_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^exemplars has 32 images side by side; at most 31 fit a row beside the "
                                         r"rest: pass the first 31"):
        utils.plot_unit(images(1)[0], images(32))
    with pytest.raises(ValueError, match=r"^images has 33 images side by side; at most 32 fit a row: pass the first"):
        utils.plot_heatmaps(images(33), torch.rand(33, 8, 8))
    with pytest.raises(ValueError, match=r"^max_channels has 64 images side by side"):
        utils.plot_feature_maps({"block1": torch.rand(64, 8, 8)}, max_channels=64)
    with pytest.raises(ValueError, match=r"^max_channels has 32 images side by side; at most 31"):  # and the input
        utils.plot_feature_maps({"block1": torch.rand(64, 8, 8)}, max_channels=32, image=images(1)[0])
    assert len(image_axes(utils.plot_unit(images(1)[0], images(31)))) == 32  # a full row is drawn
    assert len(image_axes(utils.plot_heatmaps(images(32), torch.rand(32, 8, 8)))) == 64


def test_plot_misclassified_titles():
    true, pred = torch.tensor([3, 1, 5, 2, 0]), torch.tensor([5, 1, 3, 2, 8])
    fig = utils.plot_misclassified(images(5), true, pred, CLASSES, n=2)
    assert titles(fig) == ["True: cat\nPred: dog", "True: dog\nPred: cat"]
    for ax, i in zip(image_axes(fig), (0, 2)):  # each title over its own image
        np.testing.assert_allclose(ax.images[0].get_array(), images(5)[i].permute(1, 2, 0).numpy())
    fig = utils.plot_misclassified(images(5), true, pred, CLASSES)
    assert len(image_axes(fig)) == 3 and "True: plane\nPred: ship" in titles(fig)
    fig = utils.plot_misclassified(images(2), true[:2] * 0, pred[:2] * 0, CLASSES)  # none wrong
    assert isinstance(fig, Figure) and not image_axes(fig)
    with pytest.raises(ValueError, match=r"pred must be \(5,\) integer class indices, one per image; got "
                                         r"torch.float32 of shape \(5, 10\)"):
        utils.plot_misclassified(images(5), true, torch.randn(5, 10), CLASSES)  # the logits, not the classes
    with pytest.raises(ValueError, match=r"true must be \(4,\) integer class indices"):
        utils.plot_misclassified(images(4), true, pred[:4], CLASSES)  # more labels than images
    with pytest.raises(ValueError, match=r"pred must be class indices in 0..9 .*from 3 to 10"):
        utils.plot_misclassified(images(5), true, pred + 2, CLASSES)


def test_plot_filters_rgb_and_gray():
    fig = utils.plot_filters(torch.randn(6, 3, 3, 3))
    arrays = [ax.images[0].get_array() for ax in image_axes(fig)]
    assert len(arrays) == 6 and all(a.shape == (3, 3, 3) for a in arrays)
    assert all(np.isclose(np.abs(a - 0.5).max(), 0.5) for a in arrays)  # each filter's largest |weight| at 0 or 1
    flat, opponent = torch.full((3, 2, 2), 0.3), torch.tensor([1.0, -1.0, 0.0])[:, None, None].expand(3, 2, 2)
    shown = [ax.images[0].get_array() for ax in image_axes(utils.plot_filters(torch.stack([flat, -flat, opponent])))]
    assert np.allclose(shown[0], 1.0) and np.allclose(shown[1], 0.0)  # brightness up, down: flat (min-max: noise)
    assert np.allclose(shown[2], np.broadcast_to([1.0, 0.0, 0.5], (2, 2, 3)))  # red up, green down, blue untouched
    with pytest.raises(ValueError, match=r"weight must be convolution filters \(O, I, kh, kw\).*got shape \(4, 2\)"):
        utils.plot_filters(torch.nn.Linear(2, 4).weight)
    fig = utils.plot_filters(torch.nn.Conv2d(2, 4, 5).weight)  # parameter with grad, 2 input channels
    ims = [ax.images[0] for ax in image_axes(fig)]
    assert len(ims) == 4 and all(im.get_array().shape == (5, 5) and im.get_cmap().name == "gray" for im in ims)


def test_plot_feature_maps_rows_and_labels():
    fmap1 = torch.zeros(10, 6, 6)
    fmap1[[7, 2]] = torch.tensor([2.0, 1.0]).view(2, 1, 1)  # channel 7 most active, then 2
    maps = OrderedDict([("block1.act2", fmap1), ("block3.act2", torch.rand(1, 4, 3, 3))])
    fig = utils.plot_feature_maps(maps, max_channels=8, image=images(1)[0])
    assert len(image_axes(fig)) == 1 + 8 + 4
    axes = np.array(fig.axes).reshape(2, 9)
    assert axes[0, 0].get_title() == "input"
    assert [axes[0, 1].get_ylabel(), axes[1, 1].get_ylabel()] == ["block1.act2", "block3.act2"]
    assert [axes[0, 1].get_title(), axes[0, 2].get_title()] == ["ch 7 [2, 2]", "ch 2 [1, 1]"]  # own colour range
    ramp = torch.linspace(2.08, 2.1, 36).view(1, 6, 6)  # nearly flat: its range says so, where a top alone did not
    flat = utils.plot_feature_maps({"x": ramp}, max_channels=1)
    assert flat.axes[0].get_title() == "ch 0 [2.1, 2.1]"
    assert flat.axes[0].images[0].get_clim() == pytest.approx((2.08, 2.1))
    fig = utils.plot_feature_maps(maps, max_channels=3, most_active=False)
    assert len(image_axes(fig)) == 6 and fig.axes[0].get_title() == "ch 0 [0, 0]"
    with pytest.raises(ValueError, match="max_channels must be an int >= 1, got 0"):
        utils.plot_feature_maps(maps, max_channels=0, image=images(1)[0])
    with pytest.raises(ValueError, match="feature_maps must name at least one layer"):
        utils.plot_feature_maps({})


def test_plot_heatmaps_overlays_normalized_maps():
    m = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = m * torch.tensor([1.0, 10.0, 0.1])[:, None, None] + torch.tensor([5.0, 0.0, 3.0])[:, None, None]
    # (B, H, W): three maps, not in [0, 1], each image in its own range
    fig = utils.plot_heatmaps(images(3), m, titles=CLASSES[:3], outliers=0)  # scaled by the extremes
    assert len(image_axes(fig)) == 6 and titles(fig)[:3] == CLASSES[:3]
    for j in range(3):  # one scale for all would leave images 0 and 2 each in a narrow band
        overlay = image_axes(fig)[3 + j].images[1].get_array()
        assert overlay.min() == 0 and np.isclose(overlay.max(), 1)
        np.testing.assert_allclose(overlay, (m[j] - m[j].min()) / (m[j].max() - m[j].min()), atol=1e-5)  # its own
    fig = utils.plot_heatmaps(images(2, c=1), {"saliency": m[:2], "grad-cam": torch.rand(2, 2, 2)})
    axes = np.array(fig.axes).reshape(3, 2)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["input", "saliency", "grad-cam"]
    assert all(len(ax.images) == 2 for ax in axes[1:].flat)
    assert axes[2, 0].images[1].get_array().shape == (8, 8)  # upsampled to the image size
    assert all(ax.images[1].get_extent() == ax.images[0].get_extent() for ax in axes[1:].flat)  # over its image
    attributions = torch.randn(2, 3, 8, 8)  # (B, C, h, w), as integrated gradients gives them
    fig = utils.plot_heatmaps(images(2), attributions, signed=False, outliers=0)
    shown = np.array(fig.axes).reshape(2, 2)[1, 0].images[1].get_array()
    summed = attributions[0].abs().sum(0).numpy()  # channels summed as magnitudes, then scaled to [0, 1]
    assert np.allclose(shown, (summed - summed.min()) / (summed.max() - summed.min()), atol=1e-6)
    for signed in (None, True):  # signed (said, or read from the negative values): the channels' signed sum
        fig = utils.plot_heatmaps(images(2), attributions, signed=signed, outliers=0)
        overlay = np.array(fig.axes).reshape(2, 2)[1, 0].images[1]
        summed = attributions[0].sum(0).numpy()
        assert overlay.get_cmap().name == "RdBu_r" and np.allclose(overlay.get_array(), summed / np.abs(summed).max())


def test_signed_maps_are_shown_around_zero():
    m = torch.linspace(-1, 3, 64).view(1, 8, 8)  # integrated gradients' signed sum: zero must stay zero
    overlay = image_axes(utils.plot_heatmaps(images(1), m, outliers=0))[1].images[1]
    assert overlay.get_cmap().name == "RdBu_r" and overlay.get_clim() == (-1, 1)
    assert np.allclose(overlay.get_array(), m[0].numpy() / 3)  # was min-max scaled: -1 showed as "no heat"
    # said, not guessed: a signed method whose maps happen to be positive, or one with a stray negative value
    maps = {"ig": torch.linspace(1, 3, 64).view(1, 8, 8), "saliency": m}
    shown = [ax.images[1] for ax in image_axes(utils.plot_heatmaps(images(1), maps, signed="ig", outliers=0))[1:]]
    assert [im.get_cmap().name for im in shown] == ["RdBu_r", "jet"]
    assert np.allclose(shown[0].get_array(), maps["ig"][0].numpy() / 3)  # its smallest value is no blue
    assert np.allclose(shown[1].get_array(), (m[0].numpy() + 1) / 4)
    with pytest.raises(ValueError, match=r"signed must be True, False or names among the methods ig, saliency; "
                                         r"got \['IG'\]"):
        utils.plot_heatmaps(images(1), maps, signed=["IG"])
    for signed, cmaps in ((True, ["RdBu_r", "RdBu_r"]), (False, ["jet", "jet"]), (["ig", "saliency"], ["RdBu_r"] * 2)):
        fig = utils.plot_heatmaps(images(1), maps, signed=signed)
        assert [ax.images[1].get_cmap().name for ax in image_axes(fig)[1:]] == cmaps
    one = utils.plot_heatmaps(images(1), maps["ig"], signed="map")  # one method's maps: named "map"
    assert image_axes(one)[1].images[1].get_cmap().name == "RdBu_r"
    with pytest.raises(ValueError, match=r"maps must be one method's maps \(B, h, w\) or \{method name: maps\}; "
                                         r"got a list of 2"):
        utils.plot_heatmaps(images(1), [m, m])


def test_feature_maps_of_a_layer_without_space_are_refused_by_name():
    with pytest.raises(ValueError, match=r"layer 'head' gives \(1, 10\), not a \(C, H, W\) feature map"):
        utils.plot_feature_maps({"block1.act2": torch.rand(1, 4, 3, 3), "head": torch.rand(1, 10)})


def test_save_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    utils.show_images(images(1), save="~/figs/one.png")
    assert (tmp_path / "figs" / "one.png").is_file() and not (tmp_path / "~").exists()


def test_comparison_grid_labels():
    rows = OrderedDict([("pixel", images(3)), ("fourier", images(3, c=1)), ("latent", images(2))])
    fig = utils.comparison_grid(rows, col_labels=CLASSES[:3])
    assert len(image_axes(fig)) == 8
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == list(rows)
    assert [ax.get_title() for ax in axes[0]] == CLASSES[:3]
    assert axes[1, 0].images[0].get_cmap().name == "gray"
    fig = utils.comparison_grid({"one image": images(1)[0], "two": images(2)})
    assert len(fig.axes) == 2 * 2  # one (C, H, W) image is one column, not C = 3 of them
    fig = utils.comparison_grid({"one image": images(1)[0], "three": images(3)}, col_labels=CLASSES[:3])
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_visible() for ax in axes[0]] == [True, False, False]
    assert [axes[0, 0].get_title(), axes[1, 1].get_title(), axes[1, 2].get_title()] == CLASSES[:3]  # none lost
    with pytest.raises(ValueError, match=r"col_labels must have at most one label per column \(3\); got 4"):
        utils.comparison_grid({"three": images(3)}, col_labels=CLASSES[:4])
    fig = utils.comparison_grid({"airplane, diversity weight 1.5": images(1)}, col_labels=["American Staffordshire"])
    assert fig.axes[0].get_ylabel() == "airplane, diversity\nweight 1.5"  # ran into the next row's label
    assert fig.axes[0].get_title() == "American\nStaffordshire"
    fig = utils.comparison_grid({"0 cat\n-> 1 ship": images(1), 7: images(1)})  # its own lines kept; not text
    assert [ax.get_ylabel() for ax in fig.axes] == ["0 cat\n-> 1 ship", "7"]


def test_comparison_grid_wraps_past_max_cols():
    x, names = images(10), [f"class {i}" for i in range(10)]  # ten classes, four columns a band
    fig = utils.comparison_grid({"top image": x, "one": x[:1]}, col_labels=names, max_cols=4)
    axes = np.array(fig.axes).reshape(6, 4)  # 3 bands of the 2 rows
    assert [ax.get_title() for ax in axes[[0, 2, 4]].flat if ax.get_title()] == names  # each column labelled once
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["top image", "one"] * 3
    assert [ax.get_visible() for ax in axes[4]] == [True, True, False, False]  # columns 8 and 9
    assert sum(ax.get_visible() for ax in axes[[1, 3, 5]].flat) == 1  # the one image, in the first band
    np.testing.assert_allclose(axes[4, 1].images[0].get_array(), x[9].permute(1, 2, 0).numpy(), atol=1e-6)
    assert len(utils.comparison_grid({"a": x}).axes) == 10  # within max_cols: one band, as before
    with pytest.raises(ValueError, match="max_cols must be an int >= 1, got 0"):
        utils.comparison_grid({"a": x}, max_cols=0)


CALLS = {
    "show_images": lambda save: utils.show_images(images(2), save=save),
    "plot_curves": lambda save: utils.plot_curves(ROWS, save=save),
    "plot_confusion": lambda save: utils.plot_confusion(np.eye(2), CLASSES[:2], save=save),
    "plot_misclassified": lambda save: utils.plot_misclassified(images(2), [0, 1], [1, 0], CLASSES, save=save),
    "plot_filters": lambda save: utils.plot_filters(torch.randn(2, 3, 3, 3), save=save),
    "plot_feature_maps": lambda save: utils.plot_feature_maps({"a": torch.rand(2, 4, 4)}, save=save),
    "plot_heatmaps": lambda save: utils.plot_heatmaps(images(2), torch.rand(2, 8, 8), save=save),
    "comparison_grid": lambda save: utils.comparison_grid({"a": images(2)}, save=save),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_save_writes_png_atomically(tmp_path, name):
    path = tmp_path / "new" / "dir" / f"{name}.png"
    fig = CALLS[name](path)
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 100
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    (tmp_path / "reference").touch()
    assert path.stat().st_mode == (tmp_path / "reference").stat().st_mode  # usual permissions, not 0600
    CALLS[name](str(path))  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_plot_curves_with_vae_metrics_and_spectrum(tmp_path):
    rows = [dict(epoch=e, train_bpd=5 - e, val_bpd=5.5 - e, train_kl=10 * e, val_kl=11 * e) for e in (1, 2, 3)]
    fig = utils.plot_curves(rows, metrics=("bpd", "kl"))
    axes = fig.axes
    assert len(axes) == 2 and "bits/dim" in axes[0].get_title()
    assert list(axes[0].lines[1].get_ydata()) == [4.5, 3.5, 2.5]
    assert list(axes[1].lines[0].get_ydata()) == [10, 20, 30]
    plt.close(fig)
    fig = utils.plot_spectrum(torch.tensor([1.0, 4.0, 2.0]), save=tmp_path / "s.png")
    assert list(fig.axes[0].lines[0].get_ydata()) == [4.0, 2.0, 1.0]
    one = utils.plot_curves(rows[:1], "bpd")
    assert all(float(t).is_integer() for t in one.axes[0].get_xticks())  # 1, no 0.98
    plt.close(one)
    assert fig.axes[1].lines[0].get_ydata()[-1] == pytest.approx(1.0)
    assert (tmp_path / "s.png").stat().st_size > 0
    plt.close(fig)
    collapsed = utils.plot_spectrum(torch.tensor([2.0, 0.5, -1e-9, 0.0]))  # float rounding below 0 and a dead one
    line = collapsed.axes[0].lines[0]
    assert list(line.get_ydata()) == [2.0, 0.5] and line.get_label() == "2 at 0 left off"  # no floor at 1e-12
    plt.close(collapsed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 / 0 in the shares warned, and drew NaN
        dead = utils.plot_spectrum(torch.zeros(4))
    assert not dead.axes[1].lines and dead.axes[1].texts[0].get_text() == "no variance"
    plt.close(dead)


def test_plot_unit_shows_visualization_and_exemplars(tmp_path):
    vis, exemplars = torch.rand(3, 32, 32), torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fig = utils.plot_unit(vis, exemplars, torch.tensor([3.0, 2.5, 2.0, 1.0]), title="unit", save=tmp_path / "u.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["visualization", "3.00", "2.50", "2.00", "1.00"] and len(fig.axes[0].images) == 1
    shown = [ax.images[0].get_array() for ax in fig.axes]  # the visualization, then the exemplars in order
    for array, image in zip(shown, [vis, *exemplars.float().div(255)]):
        np.testing.assert_allclose(array, image.permute(1, 2, 0).numpy(), rtol=1e-6)
    assert (tmp_path / "u.png").stat().st_size > 0
    assert all(not ax.lines for ax in fig.axes)  # nothing marked unless asked
    plt.close(fig)
    fig = utils.plot_unit(torch.rand(3, 32, 32), torch.rand(2, 3, 32, 32), mark=(4.5, 20.0))  # a neuron's centre
    for ax in fig.axes:
        (ring,) = ax.lines
        assert list(ring.get_xydata()[0]) == [20.0, 4.5] and ring.get_marker() == "o"  # (x, y) on the image
        assert ax.get_xlim() == (-0.5, 31.5) and ax.get_ylim() == (31.5, -0.5)  # the image's extent kept
    plt.close(fig)


def test_plot_curves_takes_one_metric_by_name():
    fig = utils.plot_curves(ROWS, metrics="loss")  # not the letters l, o, s, s
    assert [ax.get_title() for ax in fig.axes] == ["loss"]


def test_plot_heatmaps_row_labels_and_mismatched_inputs():
    x, maps = images(2), {"saliency": torch.rand(2, 8, 8), "grad-cam": torch.rand(2, 8, 8)}
    for labels in (["Saliency", "Grad-CAM"], ["image", "Saliency", "Grad-CAM"]):  # the methods, or the top row too
        axes = np.array(utils.plot_heatmaps(x, maps, row_labels=labels).axes).reshape(3, 2)
        assert [ax.get_ylabel() for ax in axes[:, 0]] == ([] if len(labels) == 3 else ["input"]) + labels
    with pytest.raises(ValueError, match=r"row_labels must name the 2 method\(s\) \(saliency, grad-cam\)"):
        utils.plot_heatmaps(x, maps, row_labels=["only one"])
    with pytest.raises(ValueError, match=r"titles must have one per image \(2\); got 1"):
        utils.plot_heatmaps(x, maps, titles=["a"])
    with pytest.raises(ValueError, match=r"maps of 'grad-cam' must be one per image \(2\).*got shape \(1, 8, 8\)"):
        utils.plot_heatmaps(x, {"saliency": torch.rand(2, 8, 8), "grad-cam": torch.rand(1, 8, 8)})
    fig = utils.plot_heatmaps(x[0], torch.rand(4, 4))  # one image and its map, upsampled to the image
    assert len(image_axes(fig)) == 2 and image_axes(fig)[1].images[1].get_array().shape == (8, 8)


@pytest.mark.parametrize("name", list(CALLS))
def test_a_plot_that_fails_leaves_no_figure_open(tmp_path, name):
    plt.figure()  # the user's own, which stays
    with pytest.raises(ValueError, match="Format 'xyz' is not supported"):  # raised by savefig: a figure was made
        CALLS[name](tmp_path / f"{name}.xyz")  # a format matplotlib cannot write, after the figure is drawn
    assert len(plt.get_fignums()) == 1 and not list(tmp_path.iterdir())


def test_a_confusion_matrix_of_many_classes_stays_a_readable_size():
    fig = utils.plot_confusion(torch.eye(100, dtype=torch.long), [f"c{i}" for i in range(100)])
    assert max(fig.get_size_inches()) < 35 and not fig.axes[0].texts  # was 62 inches and 10,000 labels


def test_the_names_of_many_classes_keep_apart():
    names = [f"c{i}" for i in range(250)]
    ax = utils.plot_confusion(torch.eye(250, dtype=torch.long), names).axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == names[::3] == [t.get_text() for t in ax.get_yticklabels()]  # 84 names, 0.36 inch apart


def test_a_save_that_fails_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def half_written(fig, path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise OSError("disk full")
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        utils.show_images(images(2), save=tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())  # neither the figure nor its temporary file


def test_wrong_images_labels_metrics_and_class_names_are_named():
    with pytest.raises(ValueError, match=r"C = 1 or 3; got shape \(4, 8, 8, 3\) \(channels last\? pass "):
        utils.show_images(images().permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 8, 8\)"):  # RGBA, which matplotlib would take
        utils.show_images(images(c=4))
    with pytest.raises(ValueError, match=r"got shape \(5, 8, 8\) \(gray images \(N, H, W\)\? pass images\[:, None\]\)"):
        utils.show_images(torch.rand(5, 8, 8))  # was "(1, 5, 8, 8)", a shape never passed
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 3\) \(one image channels last\? pass image.permute\(2, 0, 1\)\)"):
        utils.show_images(torch.rand(8, 8, 3))
    assert len(image_axes(utils.show_images(list(images(3))))) == 3  # a list of (C, H, W) images works
    with pytest.raises(ValueError, match="one label per image: 4 images, 2 labels$"):
        utils.show_images(images(), labels=[0, 1], classes=CLASSES)
    with pytest.raises(ValueError, match=r"1 images, 3 labels \(a \(3, H, W\) tensor is one colour image: pass 3 gray"):
        utils.show_images(torch.rand(3, 8, 8), labels=[0, 1, 2], classes=CLASSES)  # 3 gray images, squeezed
    # the argument named is the one passed
    with pytest.raises(ValueError, match=r"^exemplars must be \(N, C, H, W\).*got shape \(4, 8, 8, 3\)"):
        utils.plot_unit(images(1)[0], images().permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"^image must be .*in \[0, 1\]"):
        utils.plot_unit(images(1)[0] * 255, images())
    with pytest.raises(ValueError, match=r"^rows\['fourier'\] must be \(N, C, H, W\)"):
        utils.comparison_grid({"pixel": images(2), "fourier": torch.rand(2, 8, 8, 3)})
    with pytest.raises(ValueError, match=r"labels must be all names or all class indices, not both"):
        utils.show_images(images(2), labels=["cat", 1], classes=CLASSES)
    for labels in ([0.7], torch.randn(1, 10)):  # 0.7 was shown as class 0; the logits failed deep in torch
        with pytest.raises(ValueError, match=r"labels must be \(1,\) integer class indices"):
            utils.show_images(images(1), labels=labels, classes=CLASSES)
    for label in (10, -1):  # -1 would show the last class
        with pytest.raises(ValueError, match=rf"label {label} is not a class index in 0\.\.9"):
            utils.show_images(images(1), labels=[label], classes=CLASSES)
    with pytest.raises(ValueError, match=r"no train_ or val_ column for metric\(s\) \['los'\]; these rows record acc"):
        utils.plot_curves(ROWS, metrics=("los",))
    with pytest.raises(ValueError, match=r"cm must be \(K, K\) for the K = 5 class names; got shape \(10, 10\)"):
        utils.plot_confusion(torch.eye(10), CLASSES[:5])


def test_one_extreme_pixel_does_not_wash_out_a_heatmap():
    m = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    m[0, 0, 0] = 10.0  # one saturating pixel, as saliency maps of trained models have
    clipped, scaled = (np.asarray(image_axes(utils.plot_heatmaps(images(1), m, outliers=p))[1].images[1].get_array())
                       for p in (1.0, 0))
    assert np.median(clipped) > 0.3 and clipped.max() == 1  # the rest keeps its range
    assert np.median(scaled) < 0.01  # by the extreme alone, every other pixel shows as "no heat"
    signed = torch.linspace(-1, 1, 64).view(1, 8, 8).clone()
    signed[0, 7, 7] = 50.0
    shown = image_axes(utils.plot_heatmaps(images(1), signed, signed=True))[1].images[1].get_array()
    assert shown.min() < -0.9 and shown[0, 0] < -0.9 and shown[7, 7] == 1  # the negative evidence stays blue
    sparse = 1e-6 * torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1))
    sparse[0, 0, :5] = 1.0  # a few peaks over float noise, under 1% of the pixels
    picture = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # the map's own size
    shown = np.asarray(image_axes(utils.plot_heatmaps(picture, sparse, signed=True))[1].images[1].get_array())
    assert np.allclose(shown[0, :5], 1) and np.abs(shown[1:]).max() < 0.01  # the noise stays white


def test_flat_and_non_finite_maps_are_not_drawn_as_heat():
    maps = torch.stack([torch.full((8, 8), 5.0), 5 + 1e-7 * torch.rand(8, 8), torch.rand(8, 8)])
    cells = np.array(utils.plot_heatmaps(images(3), maps).axes).reshape(2, 3)[1]
    assert [len(ax.images) for ax in cells] == [1, 1, 2]  # no overlay on the flat ones (float noise included)
    assert [ax.get_xlabel() for ax in cells] == ["flat map", "flat map", ""]
    bad = torch.rand(3, 8, 8)
    bad[1, 0, 0], bad[2, 3, 3] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"maps of 'ig' hold NaN or inf for image\(s\) \[1, 2\]"):
        utils.plot_heatmaps(images(3), {"ig": bad})
    for outliers in (-1, 50, True, "2"):
        with pytest.raises(ValueError, match=rf"outliers must be a percentage from 0 to under 50.*got {outliers!r}"):
            utils.plot_heatmaps(images(3), maps, outliers=outliers)


def test_a_signed_row_says_what_its_colours_mean():
    maps = {"saliency": torch.rand(2, 8, 8), "ig": torch.randn(2, 8, 8)}
    fig = utils.plot_heatmaps(images(2), maps, signed="ig", row_labels=["grad", "IG"])
    labels = [ax.get_ylabel() for ax in np.array(fig.axes).reshape(3, 2)[:, 0]]
    assert labels == ["input", "grad", "IG\n(red +, blue −)"]


def test_deeper_filters_and_long_layer_names_say_what_is_shown():
    w = torch.zeros(2, 64, 3, 3)
    w[:, 0] = torch.linspace(-0.01, 0.01, 9).view(3, 3)  # the shown channel is faint beside the others
    w[:, 1:] = 5.0
    fig = utils.plot_filters(w)
    shown = image_axes(fig)[0].images[0].get_array()
    assert fig._suptitle.get_text() == "input channel 0 of 64" and np.isclose(shown.min(), 0) and np.isclose(
        shown.max(), 1)  # scaled by what is shown, not by the channels left out
    assert utils.plot_filters(torch.rand(2, 3, 3, 3))._suptitle is None
    fig = utils.plot_filters(torch.rand(24, 3, 2, 2), ncols=12)  # the whitening's: filters above, negatives below
    assert np.array(fig.axes).shape == (24,) and fig.axes[12].get_position().y0 < fig.axes[11].get_position().y0
    name = "features.denseblock4.denselayer16.conv2"
    fig = utils.plot_feature_maps({name: torch.rand(4, 8, 8)}, max_channels=4, image=images(1)[0])
    label = fig.axes[1].get_ylabel()
    assert label.replace("\n", "") == name and max(map(len, label.splitlines())) <= 16


def test_counts_sizes_and_empty_inputs_are_named():
    for ncols, message in ((0, "ncols must be an int >= 1, got 0"), (40, "ncols has 40 images side by side")):
        with pytest.raises(ValueError, match=message):
            utils.show_images(images(2), ncols=ncols)
    with pytest.raises(ValueError, match=r"images has 513 images; at most 512 fit one figure"):
        utils.show_images(torch.rand(513, 1, 2, 2))
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):  # was "no misclassified images"
        utils.plot_misclassified(images(2), [0, 1], [1, 0], n=0)
    with pytest.raises(ValueError, match=r"values must give one activation per exemplar \(3\); got 4"):
        utils.plot_unit(images(1)[0], images(3), values=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"mark is a pixel of the exemplars \(8x8\), which the visualization \(16x16"):
        utils.plot_unit(torch.rand(3, 16, 16), images(3), mark=(2, 2))
    with pytest.raises(ValueError, match=r"rows must be one metric row .*got no rows"):
        utils.plot_curves([])
    with pytest.raises(ValueError, match=r"rows must be one metric row .*got columns loss"):
        utils.plot_curves([{"loss": 1.0}])
    with pytest.raises(ValueError, match=r"rows must name at least one row"):
        utils.comparison_grid({})
    with pytest.raises(ValueError, match=r"images must hold at least one image"):
        utils.plot_heatmaps(images(0), torch.rand(0, 8, 8))
    with pytest.raises(ValueError, match=r"normalized images\? undo it: images \* std \+ mean"):
        utils.show_images(images(2) * 4.6 - 2.1)  # ImageNet-normalized: not "divide by 255"


def test_a_confusion_matrix_of_fractions_is_written_as_fractions():
    texts = [t.get_text() for t in utils.plot_confusion([[0.9, 0.1], [0.3, 0.7]], ["a", "b"]).axes[0].texts]
    assert texts == ["0.90", "0.10", "0.30", "0.70"]  # was "1 0 / 0 1"
    texts = [t.get_text() for t in utils.plot_confusion([[9, 1], [3, 7]], ["a", "b"]).axes[0].texts]
    assert texts == ["9", "1", "3", "7"]
    shown = utils.plot_confusion([[0.45, 0.05], [0.15, 0.35]], ["a", "b"]).axes[0].images[0].get_array()
    assert np.allclose(shown, [[0.9, 0.1], [0.3, 0.7]])  # fractions of all: coloured as fractions of the true class


def test_a_confusion_matrix_not_yet_computed_is_named():
    import metrics
    with pytest.raises(ValueError, match="cm is None, not a confusion matrix: compute it"):
        utils.plot_confusion(None, CLASSES)
    with pytest.raises(ValueError, match="cm is None"):
        metrics.per_class_report(None, CLASSES)
