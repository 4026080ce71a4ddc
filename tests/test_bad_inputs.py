"""Bad inputs and faults: each gets a clear error, and nothing good is lost or silently wrong."""
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

import data
import models
import training

TINY = dict(epochs=2, batch_size=200)


@pytest.fixture(scope="module")
def tiny_data():
    return data.load_data("synthetic", n_train=1200, n_test=300, seed=1)


@pytest.fixture()
def finished(tiny_data, tmp_path):
    """A finished classifier checkpoint and CSV, and their bytes."""
    ckpt, csv = tmp_path / "cnn.pt", tmp_path / "cnn.csv"
    training.train_classifier(tiny_data, ckpt, preset="small", hyp=TINY, csv_path=csv, progress=False)
    return ckpt, csv, ckpt.read_bytes(), csv.read_bytes()


# ----------------------------------------------------------------------------- checkpoints

def test_unfinished_checkpoint_is_refused_with_what_to_rerun(tiny_data, tmp_path):
    model = models.build_model(models.cnn_config("small"))
    training.save_checkpoint(tmp_path / "c.pt", model, epoch=1, complete=False)
    with pytest.raises(RuntimeError, match="did not finish.*run Classifier.ipynb"):
        training.load_checkpoint(tmp_path / "c.pt", hint="run Classifier.ipynb first")


def _interrupt_after_first_epoch(monkeypatch, module_fn):
    calls = []
    real = getattr(training, module_fn)

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, module_fn, flaky)


def test_killed_retraining_keeps_the_finished_classifier(finished, tiny_data, monkeypatch):
    ckpt, csv, ckpt_bytes, csv_bytes = finished
    _interrupt_after_first_epoch(monkeypatch, "evaluate")
    with pytest.raises(KeyboardInterrupt):
        training.train_classifier(tiny_data, ckpt, preset="small", hyp={**TINY, "epochs": 3}, retrain=True,
                                  csv_path=csv, progress=False)
    assert ckpt.read_bytes() == ckpt_bytes and csv.read_bytes() == csv_bytes
    model, loaded = training.load_checkpoint(ckpt)
    assert loaded["complete"] and loaded["hyp"]["epochs"] == 2


def test_killed_retraining_keeps_the_finished_vae(tiny_data, tmp_path, monkeypatch):
    ckpt, csv = tmp_path / "vae.pt", tmp_path / "vae.csv"
    hyp = dict(epochs=1, batch_size=100)
    training.train_vae(tiny_data, ckpt, preset="small", hyp=hyp, csv_path=csv, progress=False)
    before = ckpt.read_bytes(), csv.read_bytes()
    _interrupt_after_first_epoch(monkeypatch, "evaluate_vae")
    with pytest.raises(KeyboardInterrupt):
        training.train_vae(tiny_data, ckpt, preset="small", hyp={**hyp, "epochs": 2}, retrain=True, csv_path=csv,
                           progress=False)
    assert (ckpt.read_bytes(), csv.read_bytes()) == before
    assert training.load_checkpoint(ckpt)[1]["complete"]


def test_a_finished_run_replaces_the_files_and_drops_the_partial_ones(finished, tiny_data):
    ckpt, csv, ckpt_bytes, _ = finished
    training.train_classifier(tiny_data, ckpt, preset="small", hyp={**TINY, "epochs": 1}, csv_path=csv,
                              progress=False)
    assert ckpt.read_bytes() != ckpt_bytes and len(training.read_csv(csv)) == 1
    assert not training.partial_path(ckpt).exists() and not training.partial_path(csv).exists()


def test_a_run_interrupted_while_it_saves_is_trained_again_and_leaves_its_csv_beside_its_checkpoint(
        finished, tiny_data, monkeypatch):
    ckpt, csv, _, _ = finished
    real = training.write_csv

    def interrupted(rows, path):
        if path == csv:  # the finished CSV, not the partial one
            raise KeyboardInterrupt
        real(rows, path)

    monkeypatch.setattr(training, "write_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train_classifier(tiny_data, ckpt, preset="small", hyp={**TINY, "epochs": 1}, csv_path=csv,
                                  progress=False)
    monkeypatch.setattr(training, "write_csv", real)
    with pytest.warns(UserWarning, match="holds the best epoch of a run that stopped"):  # the interrupted one's
        _, saved = training.train_classifier(tiny_data, ckpt, preset="small", hyp={**TINY, "epochs": 1},
                                             csv_path=csv, progress=False)
    assert len(training.read_csv(csv)) == len(saved["history"]) == 1


def test_a_reused_checkpoint_puts_its_own_history_in_the_csv(finished, tiny_data):
    """The CSV beside a reused checkpoint is the checkpoint's: missing (a first run without csv_path) or of
    other epochs (a run stopped after writing its CSV, before its checkpoint), it is written anew."""
    ckpt, csv, _, csv_bytes = finished
    reuse = lambda: training.train_classifier(tiny_data, ckpt, preset="small", hyp=TINY, csv_path=csv, progress=False)
    inode = csv.stat().st_ino
    reuse()
    assert csv.stat().st_ino == inode  # the same epochs: left alone (a write replaces the file)
    for stale in (None, b"epoch,val_acc\n1,0.5\n", b"epoch,val_acc\n1\n"):  # missing, other epochs, a short row
        csv.unlink() if stale is None else csv.write_bytes(stale)
        _, saved = reuse()
        assert training.read_csv(csv) == [{k: float(v) for k, v in r.items()} for r in saved["history"]]
    assert csv.read_bytes() == csv_bytes


def test_training_and_loading_leave_the_global_random_state_as_they_found_it(tiny_data, tmp_path):
    import random

    import numpy as np

    def draws():
        return torch.rand(1).item(), np.random.rand(), random.random()

    loads = lambda: training.load_trained(tmp_path / "c.pt", tiny_data, 3)  # noqa: E731 (as Visualization.ipynb)
    trains_then_loads = lambda: training.train_classifier(  # noqa: E731
        tiny_data, tmp_path / "c.pt", preset="small", hyp=TINY, seed=3, progress=False)
    with training.keeping_random_state():  # the seeds below stay in this test
        training.seed_everything(42)
        expected = draws()
        for run in (trains_then_loads, trains_then_loads, loads):
            training.seed_everything(42)
            run()
            assert draws() == expected


def test_a_checkpoint_of_another_seed_or_data_is_refused_where_the_notebooks_load_it(finished, tiny_data):
    ckpt = finished[0]
    model, _ = training.load_trained(ckpt, tiny_data, 0, hint="run Classifier.ipynb first")
    with pytest.raises(RuntimeError, match=r"trained on seed 0, not 1: run Classifier.ipynb first"):
        training.load_trained(ckpt, tiny_data, 1, hint="run Classifier.ipynb first")
    other = data.load_data("synthetic", n_train=1200, n_test=300, seed=2)  # same name, other images
    with pytest.raises(RuntimeError, match=r"trained on other images \(or another split\)"):
        training.load_trained(ckpt, other, 0)


def test_a_notebooks_model_is_checked_against_data_loaded_after_it(finished, tiny_data):
    """Classifier.ipynb's and VAE.ipynb's evaluation cells: the data cell re-run with another DATASET, and not
    the training cell, would have the earlier model scored on the new images under their class names."""
    _, ckpt = training.load_trained(finished[0], tiny_data, 0)
    training.check_trained_on(ckpt, tiny_data, 0)  # the data it was trained on: fine
    hard = data.load_data("synthetic-hard", n_train=1200, n_test=300, seed=0)  # same shapes and classes
    with pytest.raises(RuntimeError, match=r"the model was trained on dataset 'synthetic', not 'synthetic-hard', "
                                           r"other images \(or another split\): re-run the training cell after"):
        training.check_trained_on(ckpt, hard, 0)
    with pytest.raises(RuntimeError, match=r"the model has no checkpoint: its training or loading did not finish; "
                                           r"re-run"):
        training.check_trained_on(None, tiny_data, 0)  # the notebooks' after a stopped training cell


def test_diverging_classifier_is_not_saved_as_finished(finished, tiny_data, monkeypatch):
    ckpt, csv, ckpt_bytes, csv_bytes = finished
    # in float32 on the CPU: there this lr keeps the loss finite at chance level; bfloat16 (a GPU's, or a CPU's
    # with bf16 units) reaches NaN first, which the test below covers
    monkeypatch.setattr(training, "bf16_training", lambda device: False)
    with pytest.raises(RuntimeError, match="chance level.*lower lr"):
        training.train_classifier(tiny_data, ckpt, preset="small", hyp={**TINY, "lr": 1e6}, retrain=True,
                                  csv_path=csv, progress=False, device="cpu")
    assert ckpt.read_bytes() == ckpt_bytes and csv.read_bytes() == csv_bytes


def test_a_run_refused_as_unlearned_is_left_at_its_best_epoch_in_eval_mode(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "bf16_training", lambda device: False)  # finite at chance level, as above
    model = models.build_model(models.cnn_config("small"))
    with pytest.raises(RuntimeError, match="chance level"):
        training.fit(model, tiny_data, hyp={**TINY, "lr": 1e6}, device="cpu", ckpt_path=tmp_path / "c.pt",
                     progress=False)
    best = torch.load(training.partial_path(tmp_path / "c.pt"), weights_only=True)["state_dict"]
    assert not model.training and all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_the_chance_check_weighs_the_number_of_validation_images():
    balanced = lambda classes, n: torch.arange(classes).repeat(n // classes)
    training._check_learned(11 / 12, balanced(2, 12), 2, 0.1, None)    # guessing gets 11 of 12 right 0.3% of the time
    training._check_learned(0.115, balanced(10, 5000), 10, 0.1, None)  # 575 of 5000: far beyond guessing's 500 +- 21
    for acc, classes, n in [(9 / 12, 2, 12), (0.105, 10, 5000), (0.5, 2, 12)]:
        with pytest.raises(RuntimeError, match="chance level"):
            training._check_learned(acc, balanced(classes, n), classes, 0.1, None)
    skewed = torch.cat([torch.zeros(800), torch.arange(1, 5).repeat(50)]).long()  # 80% of one class
    with pytest.raises(RuntimeError, match=r"chance level \(80.0%, always naming the most frequent of 5 classes\)"):
        training._check_learned(0.81, skewed, 5, 0.1, None)  # was far beyond 1/5
    training._check_learned(0.9, skewed, 5, 0.1, None)
    # a set so small that guessing gets every image right 1% of the time or more: no score can tell, so a warning
    for classes, labels in [(3, balanced(3, 3)), (2, balanced(2, 4)), (10, torch.tensor([7]))]:
        with pytest.warns(UserWarning, match=f"validation set \\({len(labels)} images\\) is too small to tell"):
            training._check_learned(1.0, labels, classes, 0.1, None)
    with pytest.raises(RuntimeError, match="chance level"):  # 6 images of 3 classes: all right by chance 0.14%
        training._check_learned(0.2, balanced(3, 6), 3, 0.1, None)


def test_the_best_epoch_is_the_best_not_the_last_and_a_nan_metric_stops_the_run(tmp_path):
    model = models.build_model(models.cnn_config("small"))
    weight = model.head.weight
    keeper = training.BestKeeper(model, "val_acc", True, tmp_path / "m.pt")
    for epoch, acc in enumerate([0.5, 0.9, 0.7, 0.9, 0.6], 1):  # a tie keeps the later epoch, the more trained
        with torch.no_grad():
            weight.fill_(epoch)
        keeper.update(dict(epoch=epoch, val_acc=acc))
    keeper.restore()
    assert keeper.best["epoch"] == 4 and (weight == 4).all()
    keeper.finish()
    assert torch.load(tmp_path / "m.pt", weights_only=True)["epoch"] == 4
    vae_keeper = training.BestKeeper(model, "val_bpd", False)
    with pytest.raises(FloatingPointError, match=r"val_bpd became nan in epoch 1; training stopped. Nothing was saved"):
        vae_keeper.update(dict(epoch=1, val_bpd=float("nan")))  # was the best for good: nothing compares below it
    assert vae_keeper.best is None
    saving = training.BestKeeper(model, "val_bpd", False, tmp_path / "v.pt")  # a first epoch has no partial file
    with pytest.raises(FloatingPointError, match=r"v.pt is untouched; no epoch of this run was kept\. Try"):
        saving.update(dict(epoch=1, val_bpd=float("nan")))
    # NaN weights from an epoch's last step: the validation loss is NaN, the accuracy a finite guess of class 0
    with pytest.raises(FloatingPointError, match=r"val_loss became nan in epoch 6; training stopped"):
        keeper.update(dict(epoch=6, val_loss=float("nan"), val_acc=0.1))
    assert keeper.rows[-1]["epoch"] == 5 and keeper.best["epoch"] == 4


@pytest.mark.parametrize("stop", [FloatingPointError("loss became nan"), KeyboardInterrupt()])
def test_a_stopped_run_leaves_the_best_epochs_weights_in_eval_mode(stop):
    """An error or an interrupt in epoch 3 leaves the model as a finished run does: the best epoch's weights (the
    first's), not those of the epoch it stopped in, in eval mode; nothing kept yet, the weights stay as they are,
    in eval mode too."""
    model = torch.nn.Linear(2, 2)
    keeper = training.BestKeeper(model, "val_acc", True)

    def train_step(step, x, y):
        if step == 2:
            raise stop
        with torch.no_grad():
            model.weight.fill_(step + 1)  # epoch e's weights: all e
        return dict(loss=torch.tensor(0.0))

    def end_epoch(epoch, sums, seen):
        return dict(val_acc=[0.9, 0.5][epoch])
    with pytest.raises(type(stop)):
        training.run_epochs(model, [(None, torch.zeros(1))], 5, train_step, end_epoch, keeper, "test", progress=False)
    assert (model.weight == 1).all() and not model.training
    fresh = training.BestKeeper(model.train(), "val_acc", True)
    with pytest.raises(type(stop)):  # stopped in the first epoch: no best epoch to go back to
        training.run_epochs(model, [(None, torch.zeros(1))] * 3, 5, train_step, end_epoch, fresh, "test",
                            progress=False)
    assert (model.weight == 2).all() and not model.training


def test_nan_loss_stops_the_classifier(finished, tiny_data, monkeypatch):
    ckpt, csv, ckpt_bytes, _ = finished
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(training.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan in epoch 1.*untouched; no epoch of this run was kept"):
        training.train_classifier(tiny_data, ckpt, preset="small", hyp=TINY, retrain=True, csv_path=csv,
                                  progress=False)
    assert ckpt.read_bytes() == ckpt_bytes


# ----------------------------------------------------------------------------- image formats

import inspect  # noqa: E402

import attribution  # noqa: E402
import featureviz as fv  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402

FORMS = r"uint8 in \[0, 255\] or float in \[0, 1\]"


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cnn = models.build_model(models.cnn_config("small", image_size=32)).eval()
    vae = models.build_model(models.vae_config("small")).eval()
    return cnn, vae


Y = torch.arange(8) % 10
# every public function that takes images, called with the images `x` (all other arguments valid)
ENTRY_POINTS = {
    "training.predict": lambda x, cnn, vae: training.predict(cnn, x),
    "training.evaluate": lambda x, cnn, vae: training.evaluate(cnn, x, Y),
    "training.evaluate_vae": lambda x, cnn, vae: training.evaluate_vae(vae, x),
    "training.latent_statistics": lambda x, cnn, vae: training.latent_statistics(vae, x),
    "models.capture": lambda x, cnn, vae: models.capture(cnn, x, ["block1.act2"]),
    "models.last_map_layer": lambda x, cnn, vae: models.last_map_layer(cnn, x),
    "models.keeps_features_last": lambda x, cnn, vae: models.keeps_features_last(cnn, x, "block1.act2"),
    "models.cell_centres": lambda x, cnn, vae: list(models.cell_centres(cnn, "block1.act2", x)),
    "featureviz.looks_at": lambda x, cnn, vae: list(fv.looks_at(cnn, fv.Neuron("block1.act2", 0), x)),
    "models.first_image": lambda x, cnn, vae: models.first_image(cnn, x),
    "attribution.saliency": lambda x, cnn, vae: attribution.saliency(cnn, x, 0),
    "attribution.grad_cam": lambda x, cnn, vae: attribution.grad_cam(cnn, x, 0),
    "attribution.integrated_gradients": lambda x, cnn, vae: attribution.integrated_gradients(cnn, x, 0, steps=2),
    "featureviz.color_covariance": lambda x, cnn, vae: fv.color_covariance(x),
    "featureviz.spectrum": lambda x, cnn, vae: fv.spectrum(x),
    "featureviz.magnitude_spectrum": lambda x, cnn, vae: fv.magnitude_spectrum(x),
    "featureviz.parameterization": lambda x, cnn, vae: fv.parameterization("pixel", init=x)(len(x), 3, 32),
    "featureviz.FourierParam.set_images": lambda x, cnn, vae: _set(fv.FourierParam(len(x), 3, 32), x),
    "featureviz.activations": lambda x, cnn, vae: fv.activations(cnn, x, [0]),
    "featureviz.inversion_targets": lambda x, cnn, vae: torch.stack([t.vector for t in fv.inversion_targets(
        cnn, x, "block1.act2")]),
    "featureviz.exemplars": lambda x, cnn, vae: fv.exemplars(cnn, x, 0, k=2),
    "metrics.features": lambda x, cnn, vae: metrics.features(cnn, x),
    "metrics.block_activations": lambda x, cnn, vae: metrics.block_activations(cnn, x, metrics.pooled),
    "metrics.transferability": lambda x, cnn, vae: metrics.transferability(cnn, x, Y),
    # held-out images other than the training ones (on the same ones the ratio has no meaning, and says so)
    "metrics.naturalness": lambda x, cnn, vae: metrics.naturalness(cnn, x, Y, _good(), Y, 1 - _good(), Y),
    "metrics.diversity": lambda x, cnn, vae: metrics.diversity(cnn, x, Y % 2),
    "metrics.template_recovery": lambda x, cnn, vae: metrics.template_recovery(x, _good()),
    "utils.show_images": lambda x, cnn, vae: utils.show_images(x),
    "utils.plot_misclassified": lambda x, cnn, vae: utils.plot_misclassified(x, Y, (Y + 1) % 10, list("abcdefghij")),
    "utils.plot_heatmaps": lambda x, cnn, vae: utils.plot_heatmaps(x, {"m": _good()[:, 0]}),
    "utils.comparison_grid": lambda x, cnn, vae: utils.comparison_grid({"row": x}),
    "utils.plot_unit": lambda x, cnn, vae: utils.plot_unit(x[0], x),
    "utils.plot_feature_maps": lambda x, cnn, vae: utils.plot_feature_maps({"l": _good(4)[0, :, :8, :8]}, image=x[0]),
}
# public functions with an image-like argument that take something else: (name -> why)
NOT_IMAGES = {
    "metrics.quality_table": "takes a Data, whose images are uint8 by construction",
    "data.to_float": "the converter itself",
    "data.check_images": "the check itself",
    "data.check_batch": "the check itself",
    "models.check_input": "the check itself",
    "data.shift": "a differentiable gather on any dtype, used inside the loader and the transforms",
    "models.last_to_run": "runs the model on its own input, which its callers have converted",
    **{f"models.{n}": "takes pixels scaled to [-1, 1] inside the VAE's loss"
       for n in ("discretized_logistic_nll", "mixture_logistic_nll", "coupled_means")},
    **{f"featureviz.{n}": "runs on the rendered batch inside render()'s step loop, where a check would sync"
       for n in ("LIGHT", "STANDARD", "AFFINE", "blur_penalty", "blurred", "l2_penalty", "tv_penalty")},
}
IMAGE_ARGS = {"images", "image", "init", "x", "vis", "train_x", "heldout_x", "exemplars", "channel_images"}


def _good(n=8):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


BAD = {
    "float in 0-255": lambda x: x * 255,
    "negative floats": lambda x: x - 0.5,
    "NaN": lambda x: x * float("nan"),
    "int64 in 0-255": lambda x: (x * 255).long(),
    "a numpy array in 0-255": lambda x: (x * 255).numpy(),
}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_refuses_images_in_a_wrong_form(name, bad, nets):
    with pytest.raises((TypeError, ValueError), match=FORMS):
        ENTRY_POINTS[name](BAD[bad](_good()), *nets)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_takes_uint8_and_float_alike(name, nets):
    as_uint8 = (_good() * 255).round().to(torch.uint8)
    _assert_same(ENTRY_POINTS[name](as_uint8, *nets), ENTRY_POINTS[name](as_uint8.float() / 255, *nets))


def _set(param, x):
    """The parameterization with its images set to x: its module, whose images _assert_same compares."""
    param.set_images(x)
    return param


def _assert_same(a, b):
    """The same result from uint8 and float images: tensors, numbers, dicts and dataclasses of them, the
    images of a parameterization module, the pixels of a figure; an error for anything else."""
    import matplotlib.figure
    import matplotlib.pyplot as plt
    import numpy as np
    if isinstance(a, torch.nn.Module):
        with torch.no_grad():
            _assert_same(a(), b())
    elif isinstance(a, matplotlib.figure.Figure):
        a.canvas.draw(), b.canvas.draw()
        assert np.array_equal(np.asarray(a.canvas.buffer_rgba()), np.asarray(b.canvas.buffer_rgba()))
    elif isinstance(a, tuple) and isinstance(a[0], matplotlib.figure.Figure):  # (fig, axes)
        _assert_same(a[0], b[0])
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, equal_nan=True)
    elif isinstance(a, (bool, str)):
        assert a == b
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4, nan_ok=True)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, dict):
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, fv.Exemplars):
        _assert_same(vars(a), vars(b))
    else:
        raise TypeError(f"_assert_same cannot compare a {type(a).__name__}")
    plt.close("all")


# the entry points that take images as a batch for a model, or for its statistics: one image (C, H, W) or gray
# images for an RGB model would broadcast in the model's input normalization into wrong answers
PLOTS = ("utils.", "featureviz.parameterization", "featureviz.FourierParam", "metrics.template_recovery")
BATCHES = [name for name in ENTRY_POINTS if not name.startswith(PLOTS)]


@pytest.mark.parametrize("name", BATCHES)
def test_every_entry_point_that_takes_a_batch_refuses_one_image_and_gray_images(name, nets):
    with pytest.raises(ValueError, match=r"must be a batch \(B, C, H, W\).*pass \w+\[None\]"):
        ENTRY_POINTS[name](_good()[0], *nets)
    if name in ("featureviz.color_covariance", "featureviz.spectrum", "featureviz.magnitude_spectrum"):
        return  # statistics of any number of channels
    with pytest.raises(ValueError, match=r"have 1 channel\(s\), the model takes 3"):
        ENTRY_POINTS[name](_good()[:, :1], *nets)


def test_labels_are_class_indices_one_per_image(nets):
    cnn, _ = nets
    for labels, match in [(Y[:5], r"\(8,\) integer class indices"), (Y.float(), "integer class indices"),
                          (Y + 5, r"class indices in 0\.\.9 .*from 5 to 12")]:
        with pytest.raises(ValueError, match=match):
            training.evaluate(cnn, _good(), labels)
    with pytest.raises(ValueError, match="integer class indices"):  # 1.7 would be filed as class 1
        metrics.confusion_matrix(torch.tensor([0.0, 1.7]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        metrics.confusion_matrix(Y, Y, 10.0)
    # a notebook's predictions, reset by a training cell that stopped: named, not torch's "infer dtype"
    with pytest.raises(ValueError, match="y_true and y_pred must be .* got labels and None"):
        metrics.confusion_matrix(Y, None, 10)
    with pytest.raises(ValueError, match=r"pred must be \(8,\) integer class indices, one per image; got None"):
        utils.plot_misclassified(_good(), Y, None)
    for level in (3, -1, "flip", True):
        with pytest.raises(ValueError, match=r"tta_level must be 0 \(none\), 1 \(mirror\) or 2"):
            training.predict(cnn, _good(), tta_level=level)


def test_counts_and_shapes_of_the_helpers_are_named_before_any_work(nets, tiny_data):
    cnn, vae = nets
    for call, match in [
        (lambda: fv.activations(cnn, _good(), [0], batch_size=0), "batch_size must be an int >= 1, got 0"),
        (lambda: metrics.features(cnn, _good(), batch_size=2.5), "batch_size must be an int >= 1, got 2.5"),
        (lambda: attribution.integrated_gradients(cnn, _good(), 0, steps=0), "steps must be an int >= 1, got 0"),
        (lambda: attribution.integrated_gradients(cnn, _good(), 0, steps=2.5), "steps must be an int >= 1"),
        (lambda: data.Loader(tiny_data.train_x, tiny_data.train_y, batch_size=0), "batch_size must be an int >= 1"),
        (lambda: data.Loader(tiny_data.train_x, tiny_data.train_y[:5]), r"y must be \(\d+,\) integer class indices"),
        (lambda: metrics.diversity(cnn, _good(), [0, 0, 1]), "groups must be \\(8,\\) integer class indices"),
        (lambda: metrics.template_recovery(_good(), torch.rand(10, 1, 32, 32)), "templates must have the images'"),
        (lambda: metrics.hardest_pairs(torch.eye(10), list("abc")), r"cm must be \(K, K\) for the K = 3 class names"),
        (lambda: metrics.hardest_pairs(torch.eye(3), list("abc"), k=-1), "k must be an int >= 0, got -1"),
        (lambda: metrics.per_class_report(torch.eye(3), list("ab")), "for the K = 2 class names"),
        (lambda: metrics.channel_sample(cnn, per_block=-1), "per_block must be an int >= 1, got -1"),
        (lambda: training.predict(cnn, _good(), batch_size=0), "batch_size must be an int >= 1, got 0"),
        (lambda: training.evaluate_vae(vae, _good(), batch_size=0), "batch_size must be an int >= 1, got 0"),
        (lambda: training.latent_statistics(vae, _good(), batch_size=-2), "batch_size must be an int >= 1, got -2"),
        (lambda: attribution.integrated_gradients(cnn, _good(), 0, baseline="black"),
         r"baseline must be None \(black\) or a scalar.*got 'black'"),
        (lambda: training.seed_everything(2 ** 32), r"seed \(SEED\) must be an int in 0..4294967295"),
        (lambda: training.seed_everything(-1), r"seed \(SEED\) must be an int in 0..4294967295"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_an_argument_of_the_wrong_kind_is_named(nets):
    """Each of these ran deep into torch, or gave a wrong answer with no error."""
    cnn, _ = nets
    neuron, fourier = fv.Neuron("block3.act2", 0, 1, 1), fv.techniques()["fourier"]
    for call, error, match in [
        # a notebook's model left None by a stopped cell
        (lambda: fv.visualize_unit(None, "head", 0, steps=1), TypeError,
         "model must be a torch.nn.Module, got NoneType: the cell that trains or loads it did not finish"),
        (lambda: fv.exemplars(None, _good(), 0), TypeError, "model must be a torch.nn.Module, got NoneType"),
        (lambda: metrics.transferability(None, _good(), Y), TypeError, "other_model must be a torch.nn.Module"),
        (lambda: metrics.diversity("cnn", _good(), Y), TypeError, "feature_model must be a torch.nn.Module, got str"),
        # a render's targets, or class names, for labels
        (lambda: metrics.diversity(cnn, _good(), [fv.Class(0)] * 8), ValueError,
         r"groups must be \(8,\) integer class indices, one per image \(a render's: r.target_index\); "
         r"got list of Class"),
        (lambda: metrics.transferability(cnn, _good(), ["cat"] * 8), ValueError, "labels must be .* got list of str"),
        # a confusion matrix of fractions: every support 0 or 1, every pair count 0
        (lambda: metrics.per_class_report(torch.eye(3) / 2, list("abc")), ValueError, "cm must hold counts"),
        (lambda: metrics.hardest_pairs(torch.full((3, 3), 0.25), list("abc")), ValueError, "cm must hold counts"),
        # (images, target) in exemplars' order: was None, no ring
        (lambda: fv.looks_at(cnn, _good(), neuron), TypeError,
         "target must be a Class, Channel, Neuron, Direction or Sum"),
        (lambda: metrics.block_activations(cnn, _good(), metrics.pooled, ["head"]), ValueError,
         r"layer 'head' gives \(8, 10\), not a map"),
        # ignored: the Technique carries its own colour covariance
        (lambda: fv.visualize_unit(cnn, "head", 0, technique=fourier, color_cov=torch.eye(3)), ValueError,
         "vae, color_cov and magnitude build a technique given by name; a Technique has its own"),
        (lambda: metrics.format_table([]), ValueError, "rows is empty"),
        # renders at 64 px scored against 32 px images: the statistics of larger maps, a number that meant nothing
        (lambda: metrics.naturalness(cnn, torch.rand(8, 3, 64, 64), Y, _good(), Y, _good(), Y), ValueError,
         "vis are 64x64, the reference images 32x32: their statistics would not compare; render at size=32"),
        (lambda: metrics.Statistics(cnn, _good())(torch.rand(2, 3, 40, 40)), ValueError, "images are 40x40"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert metrics.per_class_report(torch.eye(3, dtype=torch.float64) * 4, list("abc"))[0]["support"] == 4  # floats


def test_naturalness_and_diversity_check_their_inputs_before_their_pass_over_the_images(nets, monkeypatch):
    cnn, _ = nets
    for name in ("block_activations", "features"):
        monkeypatch.setattr(metrics, name, lambda *a, **k: pytest.fail("a pass before the inputs were checked"))
    with pytest.raises(ValueError, match=r"vis must be a batch \(B, C, H, W\)"):
        metrics.naturalness(cnn, _good()[0], Y[:1], _good(), Y, _good(), Y)
    with pytest.raises(ValueError, match=r"heldout_x have 1 channel\(s\), the model takes 3"):
        metrics.naturalness(cnn, _good(), Y, _good(), Y, _good()[:, :1], Y)
    with pytest.raises(ValueError, match=r"vis_labels must be \(8,\) integer class indices"):
        metrics.naturalness(cnn, _good(), range(10), _good(), Y, _good(), Y)
    with pytest.raises(ValueError, match=r"heldout_y must be \(8,\) integer class indices"):
        metrics.naturalness(cnn, _good(), Y, _good(), Y, _good(), Y[:5])
    with pytest.raises(ValueError, match="groups must be \\(8,\\) integer class indices"):
        metrics.diversity(cnn, _good(), [0, 0, 1])


def test_the_quality_table_checks_its_arguments_before_scoring_anything(nets, tiny_data, monkeypatch):
    cnn, _ = nets
    monkeypatch.setattr(metrics, "Reference", lambda *a, **k: pytest.fail("scored before the arguments were checked"))
    techniques = fv.techniques()
    for kwargs, error, match in [
        (dict(seeds=0), ValueError, "seeds must be an int >= 1, got 0"),
        (dict(steps=-1), ValueError, "steps must be an int >= 0, got -1"),
        (dict(techniques=list(techniques)), TypeError, "techniques must map names to techniques"),
        (dict(techniques={"pixel": "pixel"}), TypeError, r"techniques\['pixel'\] must be a Technique .*got 'pixel'"),
        (dict(channels=[3, 7]), TypeError,
         r"channels must be Channel, Neuron or Direction targets .* \['int', 'int'\]"),
        (dict(channels=["block1.act2:0", 3]), TypeError,  # Lucent's "layer:n" is a Channel; an int is not
         r"channels must be Channel, Neuron or Direction targets .* \['Channel', 'int'\]"),
        (dict(channels="block1.act2"), TypeError,
         "channels: a target given as a string is a channel, .*; got 'block1.act2'"),
        (dict(other=None), TypeError, "other must be a torch.nn.Module, got NoneType"),
    ]:
        with pytest.raises(error, match=match):
            metrics.quality_table(cnn, kwargs.pop("other", cnn), tiny_data, **{"techniques": techniques, **kwargs})


def test_the_quality_table_refuses_a_classifier_of_other_classes_first(nets, tiny_data, monkeypatch):
    cnn, _ = nets
    monkeypatch.setattr(metrics, "Statistics", lambda *a, **k: pytest.fail("computed before the models were checked"))
    three = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    for model, other, who in [(three, cnn, "the model"), (cnn, three, r"the independent classifier \(other\)")]:
        with pytest.raises(ValueError, match=f"{who} has 3 outputs but synthetic has 10 classes"):
            metrics.quality_table(model, other, tiny_data, {}, channels=[], progress=False)


def test_the_quality_table_scores_one_image_per_target_or_names_the_renderer(nets, tiny_data):
    cnn, _ = nets
    two_each = lambda targets, seed: torch.rand(2 * len(targets), 3, 32, 32)  # as images_per_target=2 gives
    with pytest.raises(ValueError, match="'twice' gave 20 images for 10 targets: .* one image per target"):
        metrics.quality_table(cnn, cnn, tiny_data, {"twice": two_each}, seeds=1, n_ref=200, channels=[], progress=False)


def test_one_layer_name_is_a_list_of_one(nets):
    cnn, _ = nets
    for bad in (1, None):  # a name that is not a str: test_a_layer_named_by_an_int_asks_for_a_str
        with pytest.raises(TypeError, match="layers must be a name or a list of names; got"):
            models.capture(cnn, _good(), bad)
    one, listed = models.capture(cnn, _good(), "block1.act2"), models.capture(cnn, _good(), ["block1.act2"])
    assert list(one) == ["block1.act2"] and torch.equal(one["block1.act2"], listed["block1.act2"])
    stats = metrics.block_activations(cnn, _good(), metrics.pooled, layers="block1.act2")
    assert len(stats) == 1 and torch.equal(stats[0], metrics.pooled(listed["block1.act2"]))


def test_every_public_function_that_takes_images_is_checked():
    import data as data_module
    unlisted = []
    for module in (training, models, attribution, fv, metrics, utils, data_module):
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if fname.startswith("_") or fn.__module__ != module.__name__:
                continue
            name = f"{module.__name__}.{fname}"
            if IMAGE_ARGS & set(inspect.signature(fn).parameters) and name not in ENTRY_POINTS | NOT_IMAGES:
                unlisted.append(name)
    assert not unlisted, f"public functions that take images but are not checked here: {unlisted}"


def test_the_loader_takes_uint8_only():
    with pytest.raises(TypeError, match="uint8"):
        data.Loader(_good(), Y)


# ----------------------------------------------------------------------------- errors that say what to do

def test_data_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="DATA_DIR .* is a file"):
        data.load_data("cifar10", root=f)
    with pytest.raises(PermissionError, match="cannot be created.*set DATA_DIR"):
        data.load_data("cifar10", root=f / "sub")


def test_data_dir_that_is_not_writable(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real = data.os.access  # root may write anywhere, so the folder reads as unwritable through os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    with pytest.raises(PermissionError, match="not writable"):
        data.load_data("cifar10", root=ro)


def test_a_checkpoint_folder_that_is_not_writable_is_named_before_training(tiny_data, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real = data.os.access  # root may write anywhere, so the folder reads as unwritable through os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    with pytest.raises(PermissionError, match=r"cnn.pt's folder .*ro is not writable: give cnn.pt a path in a folder"):
        training.train_classifier(tiny_data, ro / "cnn.pt", preset="small", hyp=TINY, progress=False)
    with pytest.raises(PermissionError, match=r"cnn.csv's folder .*ro is not writable"):
        training.train_classifier(tiny_data, tmp_path / "cnn.pt", preset="small", hyp=TINY, csv_path=ro / "cnn.csv",
                                  progress=False)


def test_a_checkpoint_path_that_is_a_folder_is_named_before_training(tiny_data, tmp_path, monkeypatch):
    """Else the whole run went by and its last save failed, leaving only the unfinished checkpoint."""
    monkeypatch.setattr(training, "run_epochs", lambda *a, **k: pytest.fail("trained before the path was checked"))
    with pytest.raises(IsADirectoryError, match=r"ckpt_path .* is a folder: give the path of the file to write"):
        training.train_classifier(tiny_data, tmp_path, preset="small", hyp=TINY, progress=False)
    with pytest.raises(IsADirectoryError, match=r"csv_path .* is a folder"):
        training.train_vae(tiny_data, tmp_path / "vae.pt", preset="small", hyp=dict(epochs=1), csv_path=tmp_path,
                           progress=False)
    model = models.build_model(models.cnn_config("small", image_size=32))
    whiten = model.whiten.weight.detach().clone()
    with pytest.raises(ValueError, match=r"extra must not set \['epoch', 'hyp', 'val_acc'\]: the checkpoint records"):
        training.fit(model, tiny_data, TINY, ckpt_path=tmp_path / "cnn.pt",
                     extra=dict(val_acc=1.0, epoch=3, hyp={}, note=""))
    assert torch.equal(model.whiten.weight, whiten)  # refused before the whitening was set from the data
    with pytest.raises(ValueError, match=r"extra must not set \['precision', 'val_bpd'\]"):
        training.fit_vae(models.build_model(models.vae_config("small")), tiny_data, dict(epochs=1),
                         extra=dict(precision="fp32", val_bpd=1.0))
    # fit and fit_vae called directly: the folder is named before the model is changed
    with pytest.raises(IsADirectoryError, match=r"ckpt_path .* is a folder"):
        training.fit(model, tiny_data, TINY, ckpt_path=tmp_path)
    assert torch.equal(model.whiten.weight, whiten)
    vae = models.build_model(models.vae_config("small"))
    with torch.no_grad():
        vae.latent_mean.fill_(0.5)  # a trained VAE's statistics: reset to the prior's only once training starts
    with pytest.raises(IsADirectoryError, match=r"ckpt_path .* is a folder"):
        training.fit_vae(vae, tiny_data, dict(epochs=1), ckpt_path=tmp_path)
    small = dataclasses.replace(tiny_data, train_x=tiny_data.train_x[:, :, :28, :28])
    with pytest.raises(ValueError, match=r"the VAE takes 32x32 images"):
        training.fit_vae(vae, small, dict(epochs=1))
    assert (vae.latent_mean == 0.5).all()


def test_an_unreadable_checkpoint_is_retrained_with_a_warning(tmp_path):
    (tmp_path / "cnn.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"cnn.pt cannot be read .*: a model is trained anew and replaces it") as w:
        assert training.changed_settings(tmp_path / "cnn.pt", hyp=TINY) is None
    assert w[0].filename == __file__


def test_a_checkpoint_is_read_on_the_cpu_and_then_moved(finished, monkeypatch):
    """A device that fails to take the weights (out of memory) is not blamed on the file: here the meta
    device, onto which torch.load's tensors would not load into the model."""
    monkeypatch.setattr(training, "get_device", lambda device: torch.device("meta"))
    model, _ = training.load_checkpoint(finished[0])
    assert next(model.parameters()).device.type == "meta"


def test_a_reused_checkpoint_whose_csv_cannot_be_written_loads_with_a_warning(finished, tiny_data, monkeypatch):
    ckpt, csv, _, _ = finished
    csv.unlink()  # as in a read-only copy of the checkpoints without their CSVs

    def read_only(rows, path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(training, "write_csv", read_only)
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("retrained"))
    with pytest.warns(UserWarning, match=r"history of the reused checkpoint could not be written to .*cnn.csv") as w:
        model, ckpt_dict = training.train_classifier(tiny_data, ckpt, preset="small", hyp=TINY, csv_path=csv,
                                                     progress=False)
    assert w[0].filename == __file__
    assert ckpt_dict["history"] and not csv.exists()


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_fashion_mnist_reads_the_debian_files_in_place(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")  # a DATA_DIR that could hold nothing: it is never needed
    d = data.load_data("fashion-mnist", root=f)
    assert len(d.test_y) == 10000 and d.train_x.shape[1:] == (1, 32, 32)


def test_fashion_mnist_damaged_raw_files_say_to_delete_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (raw / f"{name}-ubyte").write_bytes(b"\x00\x00")  # half unpacked
    with pytest.raises(data.DatasetUnavailable, match="damaged.*delete"):
        data.load_data("fashion-mnist", root=tmp_path)


def test_truncated_cifar10_file_is_named(tmp_path):
    from test_data import _write_cifar
    _write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(data.DatasetUnavailable, match="data_batch_1 is corrupt or truncated.*delete it"):
        data.load_data("cifar10", root=tmp_path)


def test_labels_outside_the_classes_are_found_at_load_time(tmp_path, monkeypatch):
    x = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(20) % 11  # label 10 with 10 classes
    monkeypatch.setattr(data, "load_cifar10", lambda root: ((x, y), (x, y % 10), list("abcdefghij")))
    with pytest.raises(ValueError, match="training labels run from 0 to 10, outside 0..9"):
        data.load_data("cifar10", root=tmp_path)


def test_attribution_targets_out_of_range_and_a_layer_without_space(nets):
    cnn, _ = nets
    x = _good(2)
    for fn in (attribution.saliency, attribution.grad_cam, attribution.integrated_gradients):
        with pytest.raises(ValueError, match=r"class indices in 0..9; got 10$"):
            fn(cnn, x, 10)
        with pytest.raises(ValueError, match="one per image"):
            fn(cnn, x, torch.tensor([1, 2, 3]))
    many = _good(8)  # the bad ones by image, the first five of them: not every target of a large batch
    with pytest.raises(ValueError, match=r"0..9; got -1 \(image 1\), 12 \(image 2\), 10 \(image 3\), 10 \(image "
                                         r"4\), 10 \(image 5\), \.\.\.$"):
        attribution.saliency(cnn, many, [0, -1, 12, 10, 10, 10, 10, 3])
    with pytest.raises(ValueError, match="spatial output.*'head'"):
        attribution.grad_cam(cnn, x, 0, layer="head")
    small = torch.rand(2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"Grad-CAM at 'block3.act2', whose map is 1x1 for 16x16 images, is flat "
                                         r".*pick a layer with a larger map, or leave layer out"):
        flat = attribution.grad_cam(cnn, small, 0, layer="block3.act2")
    torch.testing.assert_close(flat.amax((1, 2)), flat.amin((1, 2)))  # each image's: one weight at every pixel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default layer at 16 px: block2.act2's 3x3 map, no warning
        default = attribution.grad_cam(cnn, small, 0)
    assert torch.equal(default, attribution.grad_cam(cnn, small, 0, layer="block2.act2"))
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    with pytest.warns(UserWarning, match=r"Grad-CAM at '1', whose map is 1x1 for 3x3 images, is flat \(every pixel "
                                         r"gets the same weight\): no layer of the model has a larger one") as w:
        attribution.grad_cam(tiny.eval(), torch.rand(2, 3, 3, 3), 0)
    assert w[0].filename == __file__


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(images_per_target=0), "images_per_target must be an int >= 1"),
    (dict(restarts=0), "restarts must be an int >= 1"),
    (dict(regularizers=[fv.Diversity(1.0, layer="head")], images_per_target=2),
     "Diversity layer must have a spatial output"),
    (dict(regularizers=[fv.Prior(1.0)]), "the Prior regularizer needs a parameterization with a prior"),
    (dict(param=fv.parameterization("fourier", color_cov=torch.eye(2))), r"color_cov must be a finite \(3, 3\) covariance"),
    (dict(param="wavelet"), "unknown parameterization 'wavelet'; choose one of pixel, fourier"),
    (dict(size=0), "size must be an int >= 1"),
    (dict(steps=True), "steps must be an int >= 0"),
    (dict(lr=0), r"lr must be a finite number > 0, got 0 \(or a schedule .* such as cosine\(0.3\)\)"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(lr="0.05"), "lr must be a finite number > 0"),
    (dict(seed="a"), r"seed must be an int in 0..18446744073709551615, got 'a'"),
    (dict(seed=-1), r"seed must be an int in 0..18446744073709551615, got -1"),  # torch would wrap it to 2**64 - 2
    (dict(seed=2 ** 64), r"seed must be an int in 0..18446744073709551615, got 18446744073709551616"),
    (dict(size=7), r"CNN fails on a 3-channel 7x7 image \(.*size=.*\): .*too small.*\. If 7x7 is not the size it "
                   r"takes, give size= \(a side, or \(height, width\)\); if 3 are not its channels .*set "
                   r"model.image_channels$"),
    (dict(size=(32, 0)), r"size must be an int >= 1 \(the side of square images, in pixels\) or a pair"),
])
def test_render_refuses_bad_settings_by_name(nets, kwargs, match):
    cnn, _ = nets
    with pytest.raises(ValueError, match=match):
        fv.render(cnn, [0], steps=kwargs.pop("steps", 2), progress=False, **kwargs)


def test_render_refuses_what_is_not_a_regularizer_or_a_parameterization(nets):
    cnn, _ = nets
    for bad in ([("tv", 2.0)], fv.TV, 2.0, [fv.TV]):  # a pair, the class of a term (not TV(2.0)), a number
        with pytest.raises(TypeError, match=r"regularizers must be a term or a list of terms \(L2, TV, Blur, Prior, "
                                            r"Diversity\)"):
            fv.render(cnn, [0], steps=1, regularizers=bad, progress=False)
    terms = (fv.L2(1.0), fv.TV(2.0))
    as_list, as_generator = (fv.render(cnn, [0], param="pixel", steps=2, regularizers=r, progress=False)
                             for r in (list(terms), (t for t in terms)))
    assert torch.equal(as_list.images, as_generator.images)  # any iterable of terms
    with pytest.raises(TypeError, match="param must be a parameterization name"):
        fv.render(cnn, [0], steps=1, param=3, progress=False)
    with pytest.raises(ValueError, match="TV weight must be a finite number"):
        fv.TV(float("nan"))
    with pytest.raises(ValueError, match=r"Diversity weight must be a finite number >= 0 .* got -1.5"):
        fv.Diversity(-1.5)  # would pull the images together
    with pytest.raises(ValueError, match="Diversity's layer must be a layer name such as 'block2.act2'"):
        fv.Diversity(layer=None)  # was a KeyError: None at the first step
    for maker in (fv.scale, fv.resample, fv.jitter):  # was "scale's low must be ... got tensor([[[[...": the images
        with pytest.raises(TypeError, match=f"transforms={maker.__name__} makes a transform: call it"):
            fv.render(cnn, [0], steps=1, transforms=maker, progress=False)
    with pytest.raises(ValueError, match="jitter must be a finite number >= 0"):  # was a Cholesky error
        fv.parameterization("whitened", vae=nets[1], jitter=-1)
    stages = dict(first=dict(param="pixel"), second=dict(param="fourier"))
    for steps in (2.0, True):  # as given, not halved: was "got 1.0", and True ran its first stage
        with pytest.raises(ValueError, match=f"steps must be an int >= 0, got {steps!r}"):
            fv.render_in_stages(cnn, [0], steps=steps, progress=False, **stages)
    with pytest.raises(TypeError, match=r"transforms must be a transform t\(x, gen\) .* got 'standard'"):
        fv.render(cnn, [0], steps=1, transforms="standard", progress=False)


def test_helpers_name_a_bad_argument(nets):
    cnn, _ = nets
    with pytest.raises(ValueError, match=r"cosine's lr \(its starting value\) must be a finite number > 0, got -1$"):
        fv.cosine(-1)  # no hint of a schedule: cosine() takes a number
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        fv.exemplars(cnn, torch.rand(4, 3, 32, 32), fv.Channel("block2.act2", 1), k=0)
    with pytest.raises(ValueError, match=r"neuron must be a \(y, x\) position in layer 'block2.act2', got \(1, 2, 3\)"):
        fv.visualize_unit(cnn, "block2.act2", 1, neuron=(1, 2, 3), steps=1, progress=False)
    for probe in (lambda: models.layer_channels(cnn, "block3.act2", size=6), lambda: models.last_spatial_layer(cnn, 6)):
        with pytest.raises(ValueError, match=r"CNN fails on a 3-channel 6x6 image \(.*\): .*If 6x6 is not the size "
                                             r"it takes"):
            probe()
    for small in (lambda: fv.exemplars(cnn, torch.rand(4, 3, 6, 6), fv.Channel("block2.act2", 1)),  # no size= to
                  lambda: fv.activations(cnn, torch.rand(4, 3, 6, 6), [0])):                        # blame: the images
        with pytest.raises(ValueError, match=r"6x6 image \(the images' size where images are given.*If 6x6 is not "
                                             r"the size"):
            small()
    with pytest.raises(TypeError, match=r"lr=cosine makes a schedule: call it .* lr=cosine\(0.3\)"):
        fv.render(cnn, [0], steps=1, lr=fv.cosine, progress=False)


@pytest.mark.parametrize("make, match", [
    # a zero zoom or a NaN shift crashed the process inside grid_sample's backward
    (lambda: fv.resample(scale=(0, 0)), "scale's low must be a finite number > 0, got 0"),
    (lambda: fv.resample(scale=0.9), r"scale must be a range \(low, high\) of zoom factors"),
    (lambda: fv.resample(scale=(1.1, 0.9)), "scale's high must be a finite number >= 1.1, got 0.9"),
    (lambda: fv.resample(shift=float("nan")), r"shift \(a fraction of the image side\) must be a finite number >= 0"),
    (lambda: fv.resample(degrees=float("inf")), "degrees must be a finite number >= 0"),
    (lambda: fv.jitter(-1), "jitter's fraction .* must be a finite number >= 0, got -1"),
    (lambda: fv.Shift("a"), "Shift's fraction .* must be a finite number >= 0, got 'a'"),
    (lambda: fv.parameterization("fourier", color_cov=torch.full((3, 3), float("nan"))), "with NaN"),
    (lambda: fv.parameterization("fourier", decay="a"), "decay must be a finite number >= 0, got 'a'"),
    (lambda: fv.parameterization("fourier", sd=-1), "sd must be a finite number >= 0"),
    (lambda: fv.parameterization("maco", magnitude=torch.ones(3, 32, 17), contrast=0), "contrast must be a finite"),
    (lambda: fv.MaCoParam(1, 3, 32, magnitude=fv.magnitude_spectrum(torch.full((4, 3, 32, 32), 0.3))),
     r"not all 0 beyond its DC term"),
    (lambda: fv.MaCoParam(1, 3, 32, magnitude=-torch.ones(3, 32, 17)), r"magnitude must be finite, >= 0"),
    # the statistics of flat gray images: all zero, which would make NaN images
    (lambda: fv.parameterization("fourier", color_cov=fv.color_covariance(torch.full((4, 3, 32, 32), 0.5))),
     r"color_cov is all zero"),
    (lambda: fv.FourierParam(1, 3, 32, spectrum=fv.spectrum(torch.full((4, 3, 32, 32), 0.5))),
     r"spectrum must be finite, >= 0 and not all 0"),
    (lambda: fv.MaCoParam(1, 3, 32, magnitude=torch.full((3, 32, 17), float("nan"))), r"magnitude must be finite"),
    # a second stage's options fail when the technique is made, not after its first stage
    (lambda: fv.techniques(models.build_model(models.vae_config("small")), color_cov=torch.eye(2, 3)),
     r"color_cov must be a finite \(2, 2\) covariance"),
])
def test_transforms_and_options_are_checked_when_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_resample_takes_its_zoom_range_as_any_pair():
    import numpy as np
    for scale in ((0.9, 1.1), [0.9, 1.1], np.array([0.9, 1.1])):
        out = fv.resample(scale=scale)(torch.rand(2, 3, 8, 8), torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_what_only_render_can_tell_is_named_before_the_first_step(nets):
    cnn, vae = nets
    with pytest.raises(TypeError, match="vae must be a models.VAE .* got CNN"):
        fv.get_technique("whitened", vae=cnn)
    with pytest.raises(TypeError, match="vae must be a models.VAE .* got Tensor"):
        fv.techniques(torch.eye(3))  # the colour covariance given where the VAE goes
    with pytest.raises(KeyError, match="unknown technique 'fouirer'; choose one of pixel, pixel\\+reg, fourier"):
        fv.techniques()["fouirer"]
    with pytest.raises(KeyError, match="technique 'whitened' draws through a VAE"):
        fv.techniques()["whitened"]
    with pytest.raises(ValueError, match="Diversity pushes apart the images of one target: it needs images_per_target"):
        fv.render(cnn, [1], steps=2, regularizers=[fv.Diversity()], progress=False)
    with pytest.raises(ValueError, match="it needs images_per_target >= 2, got 1"):  # candidates of one image
        fv.render(cnn, [1], steps=2, regularizers=[fv.Diversity()], restarts=2, progress=False)
    for vector, match in [([1.0] * 32, "direction vector must be a finite tensor"),
                          (torch.full((32,), float("nan")), "direction vector must be a finite tensor")]:
        with pytest.raises(ValueError, match=match):
            fv.render(cnn, fv.Direction("block1.act2", vector), steps=1, progress=False)


def test_an_lr_schedule_that_goes_negative_stops_the_render_there(nets):
    cnn, _ = nets
    with pytest.raises(ValueError, match=r"lr schedule's value at t=0.75 .* must be a finite number >= 0, got -0.125"):
        fv.render(cnn, [1], steps=4, lr=lambda t: 0.25 - 0.5 * t, progress=False)


def test_an_interrupted_render_closes_its_progress_bar(nets):
    from tqdm.auto import tqdm
    cnn, _ = nets
    before = len(tqdm._instances)

    def interrupted(x, gen):
        if not torch.is_inference_mode_enabled() and torch.is_grad_enabled():
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt) as info:  # kept, as a notebook keeps the last traceback
        fv.render(cnn, [1], steps=3, transforms=interrupted, progress=True)
    assert len(tqdm._instances) == before, info


@pytest.mark.parametrize("target, match", [
    (fv.Neuron("block2.act2", 3, (4, 4)), r"Neuron y must be an int, got \(4, 4\) \(Neuron\(layer, channel, y, x\)\)"),
    (fv.Neuron("block2.act2", 3, 4, 2.0), "Neuron x must be an int, got 2.0"),
    (fv.Channel("block2.act2", 3.0), r"Channel channel must be an int, got 3.0 \(Channel\(layer, channel\)\)"),
    (fv.Class(True), "Class idx must be an int, got True"),
    (fv.Class(2, log_prob="no"), "Class log_prob must be True or False, got 'no'"),
])
def test_a_target_index_that_is_not_an_int_is_named(nets, target, match):
    cnn, _ = nets
    with pytest.raises(TypeError, match=match):
        fv.render(cnn, target, steps=1, progress=False)


def test_targets_as_class_names_are_refused_and_integer_tensors_taken(nets):
    cnn, _ = nets
    for bad in ("cat", ["cat"], 1.5, torch.tensor(True)):  # a string is a channel, "layer:n"
        with pytest.raises(TypeError, match="class index"):
            fv.render(cnn, bad, steps=1, progress=False)
    a = fv.render(cnn, torch.tensor(3), steps=3, progress=False)
    b = fv.render(cnn, 3, steps=3, progress=False)
    assert a.targets == b.targets and torch.equal(a.images, b.images)


@pytest.mark.parametrize("hyp, match", [
    (dict(epochs=0), "epochs must be a number > 0"),
    (dict(epochs=-1), "epochs must be a number > 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(epoch=3), r"unknown hyperparameter\(s\) \['epoch'\]; valid: epochs"),
])
@pytest.mark.parametrize("train", [training.train_classifier, training.train_vae])
def test_training_refuses_bad_settings_by_name(tiny_data, tmp_path, hyp, match, train):
    with pytest.raises(ValueError, match=match):
        train(tiny_data, tmp_path / "m.pt", preset="small", hyp=hyp, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("train", [training.train_classifier, training.train_vae])
def test_training_needs_a_checkpoint_path(tiny_data, train):
    with pytest.raises(ValueError, match="ckpt_path is required"):
        train(tiny_data, None, preset="small", hyp=dict(epochs=1), progress=False)


def test_warnings_pass_over_every_module_of_the_lab():
    """data.warn shows a warning at the first frame outside these: a module left out would show its own."""
    root = Path(data.__file__).resolve().parent
    assert sorted(data._OURS) == sorted(p.resolve() for p in root.glob("*.py"))


def test_inputs_that_look_odd_but_are_valid_still_work(nets, tiny_data, monkeypatch):
    """Accepted as before the checks of the wrong kinds: a 0-d tensor class index, an upper-case figure suffix,
    a generator of channels (which the check of their kinds used to empty)."""
    cnn, _ = nets
    assert fv.looks_at(cnn, torch.tensor(3), _good()) is None  # a class reads the whole image
    assert fv.looks_at(cnn, "block1.act2:3", _good()) is None  # Lucent's way of writing a channel, which reads it too
    with pytest.raises(TypeError, match="a target given as a string is a channel, 'layer:n'"):
        fv.looks_at(cnn, "block1.act2", _good())
    assert utils.figure_file("grid.PNG") == "grid.PNG"
    given = []

    class Stop(Exception):
        pass

    def reference(model, other, d, channels, n_ref):
        given.append(channels)
        raise Stop
    monkeypatch.setattr(metrics, "Reference", reference)
    channels = [fv.Channel("block2.act2", 0), fv.Channel("block3.act2", 1)]
    with pytest.raises(Stop):
        metrics.quality_table(cnn, cnn, tiny_data, {}, channels=iter(channels), progress=False)
    assert given == [channels]
