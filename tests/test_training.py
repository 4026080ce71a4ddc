import contextlib
import dataclasses
import itertools
import math
import os
from types import SimpleNamespace

try:
    import fcntl
except ImportError:  # Windows, whose fsync itself refuses a read-only handle
    fcntl = None

import numpy as np
import pytest
import torch
from torch import nn

import data
import models
import training
import utils

TINY = dict(epochs=3, batch_size=200)


@pytest.fixture(scope="module")
def tiny_data():
    return data.load_data("synthetic", n_train=1200, n_test=300, seed=1)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    model, ckpt = training.train_classifier(tiny_data, path / "cnn.pt", preset="small", hyp=TINY,
                                            csv_path=path / "metrics.csv", progress=False)
    return model, ckpt, path


def test_csv_has_one_row_per_epoch(trained):
    _, ckpt, path = trained
    rows = training.read_csv(path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    assert all(0 <= r["val_acc"] <= 1 and r["seconds"] > 0 and math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["val_acc"] > 0.5  # it learned
    assert not list(path.glob(".*.tmp"))


def test_the_csv_lr_is_the_rate_of_each_epochs_last_step(trained, tiny_data):
    """The lr column: the non-BatchNorm group's rate at the epoch's last step (warm-up, then the linear decay)."""
    _, _, path = trained
    hyp = training.hyperparameters(training.CNN_HYP, TINY)
    base = training.make_optimizer(models.build_model(models.cnn_config("small")), hyp).param_groups[1]["lr"]
    per_epoch = len(tiny_data.train_y) // hyp["batch_size"]
    total = per_epoch * hyp["epochs"]
    expected = [base * training.lr_factor((e + 1) * per_epoch - 1, total, hyp["warmup"]) for e in range(hyp["epochs"])]
    assert [r["lr"] for r in training.read_csv(path / "metrics.csv")] == pytest.approx(expected, rel=1e-6)


def test_the_optimizer_decouples_lr_and_weight_decay_and_speeds_up_the_batchnorm_parameters():
    model = models.build_model(models.cnn_config("small"))
    hyp = training.CNN_HYP
    bn, other = training.make_optimizer(model, hyp).param_groups
    in_bn = {id(p) for m in model.modules() if isinstance(m, models.BatchNorm) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert bn["params"] and {id(p) for p in bn["params"]} == {id(p) for p in trainable} & in_bn
    assert other["params"] and {id(p) for p in other["params"]} == {id(p) for p in trainable} - in_bn
    assert bn["lr"] / other["lr"] == pytest.approx(hyp["bias_scaler"])
    # SGD's decay is lr x weight_decay: the same for both groups, whatever their lr
    assert bn["lr"] * bn["weight_decay"] == pytest.approx(other["lr"] * other["weight_decay"])
    assert all(g["nesterov"] and g["momentum"] == hyp["momentum"] and g["base_lr"] == g["lr"] for g in (bn, other))


def test_the_lookahead_pulls_the_weights_onto_their_ema():
    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    lookahead = training.Lookahead(lin)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    lookahead.update(lin, 0.25)  # the EMA keeps a quarter of its old value; the weights take the EMA
    assert torch.allclose(lin.weight, 0.25 * w0 + 0.75) and torch.equal(lookahead.ema["weight"], lin.weight)
    ema = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.fill_(-2.0)
    lookahead.update(lin, 1.0)  # decay 1, the run's last step: the weights go back to the EMA, which stays
    assert torch.equal(lin.weight, ema) and torch.equal(lookahead.ema["weight"], ema)


def test_classifier_records_the_size_of_its_training_data(trained, tiny_data):
    model, ckpt, _ = trained
    assert model.config["image_size"] == ckpt["config"]["image_size"] == tiny_data.size == 32
    assert models.input_size(model) == (32, 32)


def test_best_checkpoint_is_the_best_epoch(trained, tiny_data):
    model, ckpt, path = trained
    rows = training.read_csv(path / "metrics.csv")
    best = max(reversed(rows), key=lambda r: r["val_acc"])  # of tied epochs, the later
    assert ckpt["epoch"] == best["epoch"] and ckpt["complete"]
    assert ckpt["val_acc"] == pytest.approx(best["val_acc"])
    # the stored weights really give that validation accuracy
    assert training.evaluate(model, tiny_data.val_x, tiny_data.val_y)["acc"] == pytest.approx(best["val_acc"])


def test_a_run_whose_first_epoch_validates_best_ends_with_that_epochs_weights(tiny_data, tmp_path, monkeypatch):
    """Returned and saved: the weights the best epoch validated, not the last epoch's under its number."""
    scores, states, real = iter([0.9, 0.6, 0.7]), [], training.evaluate

    def scored(model, *a, **k):
        states.append({name: v.detach().clone() for name, v in model.state_dict().items()})
        return dict(real(model, *a, **k), acc=next(scores))
    monkeypatch.setattr(training, "evaluate", scored)
    model, ckpt = training.train_classifier(tiny_data, tmp_path / "cnn.pt", preset="small", hyp=TINY,
                                            progress=False)
    assert ckpt["epoch"] == 1 and ckpt["val_acc"] == 0.9 and len(states) == 3
    assert not all(torch.equal(states[0][name], states[2][name]) for name in states[0])  # the epochs differ
    for weights in (model.state_dict(), training.load_checkpoint(tmp_path / "cnn.pt")[0].state_dict()):
        assert all(torch.equal(weights[name].cpu(), states[0][name].cpu()) for name in states[0])


def test_checkpoint_round_trip(trained, tiny_data, tmp_path, monkeypatch):
    model, _, _ = trained
    synced, fsync, replace = [], training.os.fsync, training.os.replace
    def sync(fd):  # on a handle that may write, as Windows' fsync needs (a read-only one fails there, as it is)
        if fcntl is not None:  # POSIX: the handle's access mode
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        synced.append(os.fstat(fd).st_size)
        fsync(fd)
    monkeypatch.setattr(training.os, "fsync", sync)
    monkeypatch.setattr(data.os, "replace", lambda a, b: synced.append("renamed") or replace(a, b))
    training.save_checkpoint(tmp_path / "c.pt", model, note="x")
    assert len(synced) == 2 and synced[0] > 1000 and synced[1] == "renamed"  # the whole file on disk, then named
    loaded, ckpt = training.load_checkpoint(tmp_path / "c.pt")
    assert ckpt["note"] == "x" and ckpt["config"] == model.config and not loaded.training
    x = tiny_data.test_x[:16].float().div(255).to(next(model.parameters()).device)  # cuda where trained there
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_missing_and_corrupt_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train the model first \(or fix the path\)$"):
        training.load_checkpoint(tmp_path / "none.pt")
    # another preset's, trained on another device's defaults, is named; a stopped run's or another data's is not
    for name in ("classifier_x[1]_airbench.pt", "classifier_x[1]_small.partial.pt", "classifier_y_small.pt",
                 "classifier_x[1]_v2_small.pt"):  # another data's, whose name goes on
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"first \(beside it: classifier_x\[1\]_airbench\.pt\)$"):
        training.load_checkpoint(tmp_path / "classifier_x[1]_compact.pt", hint="run Classifier.ipynb first")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        training.load_checkpoint(tmp_path / "bad.pt")


def test_same_settings_reload_instead_of_retraining(trained, tiny_data, monkeypatch):
    model, _, path = trained
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("retrained"))
    again, _ = training.train_classifier(tiny_data, path / "cnn.pt", preset="small", hyp=TINY)
    assert torch.equal(again.head.weight, model.head.weight)
    calls = []
    monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1))
    for kwargs in [dict(hyp={**TINY, "epochs": 4}), dict(hyp=TINY, retrain=True), dict(hyp=TINY, seed=5)]:
        training.train_classifier(tiny_data, path / "cnn.pt", preset="small", **kwargs)  # the fake fit writes nothing
        assert len(calls) == 1, kwargs  # each of these trains, beside the checkpoint of the same settings otherwise
        calls.clear()


def test_a_checkpoint_of_other_settings_names_them_before_it_is_replaced(trained, tiny_data, monkeypatch, capsys):
    _, ckpt, path = trained
    fits = []
    monkeypatch.setattr(training, "fit", lambda *a, **k: fits.append(1))  # trains nothing: the checkpoint stays
    training.train_classifier(tiny_data, path / "cnn.pt", preset="small", hyp={**TINY, "epochs": 4}, seed=5)
    said = capsys.readouterr().out
    assert "was trained with other settings, so a model is trained anew" in said
    assert f"hyp['epochs']: {ckpt['hyp']['epochs']!r} in the checkpoint, 4 now" in said
    assert f"seed: {ckpt['seed']!r} in the checkpoint, 5 now" in said and "hyp['lr']" not in said  # only what changed
    assert training.changed_settings(path / "cnn.pt", config={**ckpt["config"], "new": 1}, hyp=ckpt["hyp"]) == [
        "config['new']: absent in the checkpoint, 1 now"]  # a setting the checkpoint never had
    for kwargs, trained in ((dict(), 1), (dict(retrain=True), 2)):  # reused, or retrained as asked: nothing to explain
        training.train_classifier(tiny_data, path / "cnn.pt", preset="small", hyp=TINY, **kwargs)
        assert "other settings" not in capsys.readouterr().out and len(fits) == trained


def test_interrupted_run_leaves_whole_files_and_is_not_reused(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = training.evaluate

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt) as stop:
        training.train_classifier(tiny_data, tmp_path / "cnn.pt", preset="small", hyp=TINY,
                                  csv_path=tmp_path / "m.csv", progress=False)
    assert stop.value.__notes__ == [f"Training stopped. Any finished checkpoint at {tmp_path / 'cnn.pt'} is "
                                    f"untouched; the best epoch so far is in {tmp_path / 'cnn.partial.pt'} "
                                    f"(training.load_checkpoint(path, partial=True) loads it)."]  # said, under Ctrl-C
    assert not (tmp_path / "cnn.pt").exists() and not (tmp_path / "m.csv").exists()  # nothing finished yet
    assert len(training.read_csv(tmp_path / "m.partial.csv")) == 1
    ckpt = torch.load(tmp_path / "cnn.partial.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["complete"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert not training.reusable(tmp_path / "cnn.partial.pt", config=ckpt["config"], hyp=ckpt["hyp"])
    with pytest.raises(RuntimeError, match=r"did not finish .*load_checkpoint\(path, partial=True\) loads that epoch"):
        training.load_checkpoint(tmp_path / "cnn.partial.pt")
    model, loaded = training.load_checkpoint(tmp_path / "cnn.partial.pt", partial=True)  # the first epoch's
    assert loaded["epoch"] == 1 and not model.training
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"cnn.partial.pt holds the best epoch of a run that stopped; this run "
                                         r"replaces it when its first epoch ends: copy it first"):
        calls[:] = [1]  # the next run, stopped in its first validation
        with pytest.raises(KeyboardInterrupt):
            training.train_classifier(tiny_data, tmp_path / "cnn.pt", preset="small", hyp=TINY, retrain=True,
                                      progress=False)


def test_our_models_are_evaluated_channels_last_on_a_cpu_and_left_as_found():
    """predict, capture and the VAE's evaluation run our models channels-last on a CPU (faster than the
    standard format there), with their weights back in their own format after, and the same outputs."""
    cnn = models.build_model(models.cnn_config("small"))
    vae = models.build_model(models.vae_config("small"))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = cnn.eval()(x)
        maps = models.Recorder(cnn, ["block1.act2"])
        with maps.hooked() as run:
            expected = run(x)["block1.act2"]
    cnn.train()
    flags = [p.requires_grad for m in (cnn, vae) for p in m.parameters()]
    layouts = []
    for conv in (cnn.whiten, vae.encoder[0]):  # the first convolutions: their inputs are the layout's
        conv.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    torch.testing.assert_close(training.predict(cnn, x), plain, atol=1e-5, rtol=1e-5)
    maps = models.capture(cnn, x, "block1.act2")["block1.act2"]
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    assert maps.is_contiguous()  # channels-last inside, the standard format out
    training.evaluate_vae(vae, x)
    training.latent_statistics(vae, x)
    assert len(layouts) >= 4 and all(layouts), layouts
    assert all(p.is_contiguous() for m in (cnn, vae) for p in m.parameters())
    assert cnn.training and vae.training and [p.requires_grad for m in (cnn, vae) for p in m.parameters()] == flags
    with torch.inference_mode():  # a caller's inference mode: the weights swapped in and back are not kept
        training.predict(cnn, x)
        models.capture(cnn, x, "block1.act2")
    assert not any(p.is_inference() for p in cnn.parameters())


def test_lr_schedule_warms_up_then_decays():
    f = [training.lr_factor(s, 100, 0.23) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and max(f) == pytest.approx(1.0) and f.index(1.0) == 23
    assert f[-1] == pytest.approx(1 - 0.93 * 76 / 77)
    assert all(a <= b for a, b in zip(f[:23], f[1:24])) and all(a >= b for a, b in zip(f[23:], f[24:]))


def test_tta_averages_flipped_and_shifted_views():
    model = models.build_model(models.cnn_config("small")).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        flip = 0.5 * (model(x) + model(x.flip(3)))
    assert torch.allclose(training.predict(model, x, 0), plain, atol=1e-6)
    assert torch.allclose(training.predict(model, x, 1), flip, atol=1e-6)
    with torch.no_grad():  # airbench94's level 2: half the mirrored views, a quarter each for two 1-px shifts
        p = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [0.5 * (model(s) + model(s.flip(3))) for s in (p[:, :, :32, :32], p[:, :, 2:, 2:])]
        want = 0.5 * flip + 0.25 * (shifted[0] + shifted[1])
    assert torch.allclose(training.predict(model, x, 2), want, atol=1e-6)
    assert not torch.allclose(want, flip, atol=1e-4)
    uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(training.predict(model, uint8), training.predict(model, uint8.float() / 255))


def test_tta_shifts_and_the_translation_are_in_proportion_to_the_size(tiny_data, monkeypatch):
    model = models.build_model(models.cnn_config("small", image_size=64)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # twice airbench94's 1-px shifts at twice its 32 px
        p = nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
        views = [0.5 * (model(v) + model(v.flip(3))) for v in (x, p[:, :, :64, :64], p[:, :, 4:, 4:])]
    torch.testing.assert_close(training.predict(model, x, 2), 0.5 * views[0] + 0.25 * (views[1] + views[2]))
    assert [training.at_size(2, side) for side in (28, 32, 64, 16, 8)] == [2, 2, 4, 1, 1]
    assert training.at_size(0, 64) == 0  # no translation stays none
    class Loaded(Exception):
        """The loader fit builds, with its settings."""

    def loader(*args, **kwargs):
        raise Loaded(kwargs["translate"], kwargs["drop_last"])

    monkeypatch.setattr(training, "Loader", loader)
    twice = lambda x: x.repeat_interleave(2, 2).repeat_interleave(2, 3)  # noqa: E731
    big = dataclasses.replace(tiny_data, train_x=twice(tiny_data.train_x), val_x=twice(tiny_data.val_x),
                              test_x=twice(tiny_data.test_x))
    with pytest.raises(Loaded) as loaded:  # 1,080 images in batches of 700: the last 380 kept
        training.fit(models.build_model(models.cnn_config("small", image_size=64)), big, dict(TINY, batch_size=700),
                     progress=False)
    assert loaded.value.args == (4, False)  # 2 px at 32 px


def test_the_weights_decay_for_the_mean_batch_when_the_last_partial_one_is_kept(tiny_data, monkeypatch):
    class Built(Exception):
        """The optimizer fit builds, with the batch size its weight decay is for."""

    def optimizer(model, hyp):
        raise Built(hyp["batch_size"])

    monkeypatch.setattr(training, "make_optimizer", optimizer)
    for batch, decayed_for in ((700, 540), (200, 200), (5000, 1080)):  # 1,080 images: two steps of 540 on average
        with pytest.raises(Built) as built:
            training.fit(models.build_model(models.cnn_config("small")), tiny_data, dict(TINY, batch_size=batch),
                         progress=False)
        assert built.value.args == (decayed_for,), batch


def test_an_epoch_leaves_out_only_a_small_last_batch():
    assert training.drops_last(45000, 1024)      # 968 images: 2%, CIFAR-10's
    assert not training.drops_last(2047, 1024)   # 1,023 images: half the set unseen each epoch before
    assert not training.drops_last(100, 256)     # one batch of all the images
    assert not training.drops_last(1, 256)
    assert training.drops_last(2048, 1024)       # no partial batch to leave out
    assert training.drops_last(3, 2)             # a batch of one image, which BatchNorm cannot train on


def test_device_choice_defaults_and_override():
    assert training.get_device("cpu") == torch.device("cpu")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert training.get_device().type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    with pytest.raises(ValueError, match="device must be .* got 'gpu'"):
        training.get_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available on this machine"):
            training.get_device("cuda")
    with pytest.raises(ValueError, match="'cuda:99' is not available on this machine"):
        training.get_device("cuda:99")
    with pytest.raises(ValueError, match="device must be .* got 'gpu'"):
        training.device_defaults("gpu")


def test_a_bad_device_is_not_blamed_on_a_good_checkpoint(trained):
    path = trained[2] / "cnn.pt"
    with pytest.raises(ValueError, match="device must be"):
        training.load_checkpoint(path, device="gpu")
    training.load_checkpoint(path, device="cpu")  # the checkpoint itself is fine


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_fashion_mnist_short_run_beats_85_percent(tmp_path):
    d = data.load_data("fashion-mnist", root=tmp_path / "data")
    model, ckpt = training.train_classifier(d, tmp_path / "fm.pt", preset="small",
                                            hyp=dict(epochs=1, batch_size=512), progress=False)
    acc = training.evaluate(model, d.test_x, d.test_y)["acc"]
    assert acc > 0.85, acc


def test_fit_autocasts_to_bfloat16_only_where_the_device_has_it(tiny_data, monkeypatch, tmp_path):
    """Training steps run in bfloat16 where `bf16_training` says so, in float32 elsewhere; validation runs in
    float32 either way; the checkpoint records which; both learn."""
    assert not training.bf16_training(torch.device("mps"))
    for units in (False, True):  # a GPU with bfloat16 units (Ampere and later), or one that emulates them
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: units)
        assert training.bf16_training(torch.device("cuda")) == units
    current = [0]  # an Ampere GPU 0 and an older GPU 1: the chosen one's units count, not the current one's

    @contextlib.contextmanager
    def on(device):
        current.append(torch.device(device).index)
        yield
        current.pop()
    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: current[-1] == 0)
    assert [training.bf16_training(torch.device(f"cuda:{i}")) for i in (1, 0)] == [False, True]
    for amx, avx512_bf16 in itertools.product((False, True), repeat=2):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert training.bf16_training(torch.device("cpu")) == (amx or avx512_bf16), (amx, avx512_bf16)
    monkeypatch.undo()
    autocasts = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()  # not a GPU older than Ampere
    for bf16 in (False, True) if autocasts else (False,):
        monkeypatch.setattr(training, "bf16_training", lambda device: bf16)
        torch.manual_seed(0)
        model = models.build_model(models.cnn_config("small", image_size=32))
        seen = set()
        model.block1.conv1.register_forward_hook(lambda module, args, out: seen.add((module.training, out.dtype)))
        rows = training.fit(model, tiny_data, hyp=TINY, ckpt_path=tmp_path / f"{bf16}.pt", progress=False)
        assert seen == {(True, torch.bfloat16 if bf16 else torch.float32), (False, torch.float32)}, bf16
        assert torch.load(tmp_path / f"{bf16}.pt", weights_only=True)["precision"] == ("bf16" if bf16 else "fp32")
        assert rows[-1]["val_acc"] > 0.5, (bf16, rows[-1])


def test_the_checkpoint_records_the_training_precision(trained):
    _, ckpt, _ = trained
    assert ckpt["precision"] == ("bf16" if training.bf16_training(training.get_device()) else "fp32")


def test_device_defaults_fit_the_device():
    cpu, gpu = training.device_defaults("cpu"), training.device_defaults("cuda")
    assert cpu["preset"] == "compact" and gpu["preset"] == "airbench"
    assert models.VAE_PRESETS[gpu["vae_preset"]]["latent_dim"] > models.VAE_PRESETS[cpu["vae_preset"]]["latent_dim"]
    assert gpu["vae_epochs"] > cpu["vae_epochs"]
    assert training.device_defaults("mps") == gpu and gpu["atlas"] and not cpu["atlas"]  # README: mps is a GPU too
    for d in (cpu, gpu):
        models.cnn_config(d["preset"])  # the names exist
        models.vae_config(d["vae_preset"])


def test_forecast_extrapolates_the_pace_of_the_first_steps(monkeypatch, capsys):
    clock = iter([100.0, 110.0])  # step 1 done at 100 s, step 11 at 110 s: 1 s per step
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    forecast = training.Forecast(total=600, desc="training", device=torch.device("cpu"))
    for step in range(1, 600):
        forecast.update(step)  # reads the clock at steps 1 and 11 only (a third read would fail)
    out = capsys.readouterr().out
    assert out.count("training:") == 1 and "about 10.0 min for all 600 steps" in out
    # and once more after the first epoch (60 of 600 steps), from its time with its validation
    for seconds, steps in ((90.0, 60), (80.0, 120)):
        forecast.epoch(seconds, steps)
    out = capsys.readouterr().out
    assert out.count("training:") == 1 and "the first epoch took 1.5 min with its validation, so about 15.0 min in all" in out
    forecast.epoch(5.0, 600)  # a one-epoch run says nothing after it
    assert capsys.readouterr().out == ""


def test_forecast_paces_steps_within_the_first_epoch(monkeypatch, capsys):
    clock = iter([100.0, 104.0])  # step 1 done at 100 s, step 5 at 104 s: 1 s per step, no validation between
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    forecast = training.Forecast(total=20, desc="training", device=torch.device("cpu"), per_epoch=5)
    for step in range(1, 6):
        forecast.update(step)  # a read at step 11, after two validations, would fail
    assert "over steps 2-5, so about 20 s for all 20 steps" in capsys.readouterr().out
    forecast.epoch(9.0, 5)  # and the first epoch's forecast, validation included
    assert "so about 36 s in all" in capsys.readouterr().out
    single = training.Forecast(total=20, desc="training", device=torch.device("cpu"), per_epoch=1)
    single.update(1)  # one step an epoch: no pace without a validation in it, only the epoch's forecast
    single.epoch(2.0, 1)
    assert capsys.readouterr().out.count("training:") == 1


def test_synchronize_waits_on_the_device_it_is_given(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device: waited.append(device))
    for device in ("cuda:1", "mps", "cpu", "xpu:0"):
        training.synchronize(torch.device(device))
    # the model's GPU, not the current one; a CPU has no queue
    assert waited == [torch.device("cuda:1"), "mps", torch.device("xpu:0")]


def test_forecast_is_silent_without_progress(monkeypatch, capsys):
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: pytest.fail("timed a silent run")))
    forecast = training.Forecast(total=600, desc="training", device=torch.device("cpu"), steps=0)
    for step in range(1, 20):
        forecast.update(step)
    forecast.epoch(10.0, 60)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("defaults, key, value, what", [
    (training.CNN_HYP, "lr", 0, r"a number > 0 \(finite\)"),           # was a ZeroDivisionError
    (training.CNN_HYP, "momentum", 1.0, r"a number in \(0, 1\) \(Nesterov\)"),
    (training.CNN_HYP, "momentum", 0, r"a number in \(0, 1\) \(Nesterov\)"),  # Nesterov SGD refuses 0, later
    (training.CNN_HYP, "ema_every", 0, r"an int >= 1 \(steps\)"),     # was an integer modulo by zero
    (training.CNN_HYP, "epochs", math.inf, r"a number > 0 \(finite\)"),  # was an OverflowError
    (training.CNN_HYP, "translate", 1.5, r"an int from 0 to 31 \(pixels at 32 px, in proportion at another size\)"),
    (training.VAE_HYP, "grad_clip", 0, r"a number > 0 \(inf: no clipping\)"),  # was accepted
    (training.VAE_HYP, "kl_warmup_epochs", -1, r"a number >= 0 \(finite\)"),  # was accepted
    (training.VAE_HYP, "kl_warmup_epochs", math.inf, r"a number >= 0 \(finite\)"),  # was an OverflowError
    (training.VAE_HYP, "flip", "no", "True or False"),
])
def test_a_bad_hyperparameter_is_named_with_what_is_valid(defaults, key, value, what):
    with pytest.raises(ValueError, match=rf"{key} must be {what}, got"):
        training.hyperparameters(defaults, {key: value})
    assert training.hyperparameters(defaults, {}) == defaults  # every default passes its own rule


def test_numpy_settings_are_saved_as_numbers_a_checkpoint_loads_back(tmp_path):
    """A sweep's np.logspace lr or np.int64 batch size used to train a whole run into a checkpoint that
    torch.load(weights_only=True) refuses, called corrupt, and trained again on every re-run."""
    hyp = training.hyperparameters(training.CNN_HYP, dict(lr=np.float64(0.1), batch_size=np.int64(8)))
    assert type(hyp["lr"]) is float and type(hyp["batch_size"]) is int
    config = models.cnn_config("small", np.int64(3), np.int64(10), widths=(np.int64(8), 8, 8), image_size=np.int64(32),
                               bn_momentum=np.float32(0.5), mean=np.array([0.5, 0.4, 0.3]), std=torch.tensor([0.2] * 3))
    assert type(config["widths"][0]) is int and type(config["bn_momentum"]) is float
    assert all(type(config[key]) is int for key in ("in_channels", "num_classes", "image_size"))
    assert type(models.vae_config("small", np.int64(1))["in_channels"]) is int
    assert all(type(v) is float for v in config["mean"] + config["std"])
    training.seed_everything(np.int64(1))  # random.seed refuses NumPy ints
    torch.save(dict(hyp=hyp, config=config, seed=training.trained_on(_Named(), np.int64(1))["seed"]), tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["hyp"] == hyp


class _Named:
    name = "tiny"

    def fingerprint(self):
        return "f"


def test_limits_that_mean_something_pass():
    assert training.hyperparameters(training.VAE_HYP, dict(grad_clip=math.inf))["grad_clip"] == math.inf  # no clipping
    hyp = training.hyperparameters(training.CNN_HYP, dict(warmup=1.0, whiten_bias_epochs=math.inf))
    assert hyp["warmup"] == 1.0 and hyp["whiten_bias_epochs"] == math.inf


def test_a_checkpoint_saved_with_a_since_removed_setting_is_reused(trained, tmp_path):
    _, ckpt, path = trained
    old = torch.load(path / "cnn.pt", weights_only=True)
    old["hyp"] = {**old["hyp"], "tta_level": 2}  # as checkpoints saved before tta_level went
    torch.save(old, tmp_path / "old.pt")
    assert training.reusable(tmp_path / "old.pt", hyp=ckpt["hyp"])
    assert not training.reusable(tmp_path / "old.pt", hyp={**ckpt["hyp"], "lr": 1.0})  # a real change still counts


def test_paths_with_the_home_folder_are_expanded(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    training.train_classifier(tiny_data, "~/ck/cnn.pt", preset="small", hyp=dict(epochs=1, batch_size=200),
                              csv_path="~/ck/m.csv", progress=False)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["cnn.pt", "m.csv"] and not (tmp_path / "~").exists()


def test_predict_runs_a_bfloat16_model_in_its_dtype(trained, tiny_data):
    model = models.build_model(trained[1]["config"])
    model.load_state_dict(trained[0].state_dict())
    logits = training.predict(model.to(torch.bfloat16), tiny_data.test_x[:64])  # float32 images used to fail
    assert logits.dtype == torch.float32 and logits.shape == (64, 10)
    full = training.predict(trained[0], tiny_data.test_x[:64]).cpu()  # the float32 model's, to bfloat16's precision
    torch.testing.assert_close(logits.cpu(), full, rtol=0.05, atol=0.1 * full.abs().max().item())
    assert (logits.cpu().argmax(1) == full.argmax(1)).float().mean() >= 0.9


def test_notebook_settings_from_the_environment(monkeypatch):
    for text, flag in [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("false", False)]:
        monkeypatch.setenv("SMOKE", text)
        assert training.setting("SMOKE", False) is flag  # 'true' used to read as off
    monkeypatch.setenv("SMOKE", "maybe")
    with pytest.raises(ValueError, match=r"SMOKE='maybe': give 1 or 0"):
        training.setting("SMOKE", False)
    monkeypatch.setenv("DATASET", "")
    assert training.setting("DATASET", "cifar10") == "cifar10"  # empty: unset, not the current folder
    monkeypatch.setenv("EPOCHS", "2.5")
    assert training.setting("EPOCHS", 10.0) == 2.5
    monkeypatch.setenv("BATCH", "1e3")
    with pytest.raises(ValueError, match=r"BATCH='1e3': give an integer"):
        training.setting("BATCH", 1024, low=1)
    monkeypatch.setenv("SEEDS", "0")
    with pytest.raises(ValueError, match=r"SEEDS='0': give an integer >= 1"):
        training.setting("SEEDS", 4, low=1)
    monkeypatch.delenv("SEEDS")
    assert training.setting("SEEDS", 4, low=1) == 4
    monkeypatch.setenv("SEED", str(2 ** 32 - 1))  # numpy takes it, but Visualization.ipynb's SEED + 1 not
    with pytest.raises(ValueError, match=rf"SEED='4294967295': give an integer in 0..{2 ** 32 - 2}"):
        training.setting("SEED", 0, low=0, high=training.MAX_SEED)
    monkeypatch.setenv("SEED", str(training.MAX_SEED))
    assert training.setting("SEED", 0, low=0, high=training.MAX_SEED) == training.MAX_SEED
    with training.keeping_random_state():
        training.seed_everything(training.MAX_SEED + 1)  # the independent classifier's seed
    monkeypatch.setenv("PRESET", "Compact")
    with pytest.raises(ValueError, match=r"PRESET='Compact': give one of airbench, compact, small"):
        training.setting("PRESET", "compact", choices=models.CNN_PRESETS)  # used to fail a few cells later


def test_fit_sets_the_whitening_layer_from_the_training_images(tiny_data):
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32))
    expected = models.build_model(models.cnn_config("small", image_size=32))
    expected.init_whiten(tiny_data.train_x[:5000])
    assert not torch.allclose(model.whiten.weight, expected.whiten.weight)  # random until fit sets it
    training.fit(model, tiny_data, hyp=dict(epochs=1, batch_size=200), progress=False)
    assert torch.equal(model.whiten.weight.cpu().contiguous(), expected.whiten.weight)  # frozen from then on


def test_fit_follows_the_recipe_at_each_step(tiny_data, monkeypatch):
    """Label smoothing in the training loss, the whitening bias trained for its epochs only, and the
    last step pulled onto the weights' EMA (the lookahead's decay 1)."""
    smoothing, decays, bias_trains = [], [], []
    cross_entropy, update = nn.functional.cross_entropy, training.Lookahead.update
    monkeypatch.setattr(nn.functional, "cross_entropy", lambda *a, **kw: (
        kw.get("reduction") == "sum" and smoothing.append(kw.get("label_smoothing")), cross_entropy(*a, **kw))[1])
    monkeypatch.setattr(training.Lookahead, "update", lambda self, model, decay: (
        decays.append(decay), update(self, model, decay))[1])
    torch.manual_seed(0)
    model = models.build_model(models.cnn_config("small", image_size=32))

    def record(module, args):  # in training steps only, not validation
        if model.training:
            bias_trains.append(module.bias.requires_grad)

    model.whiten.register_forward_pre_hook(record)
    hyp = dict(epochs=2, batch_size=200, label_smoothing=0.3, whiten_bias_epochs=1, ema_every=3)
    training.fit(model, tiny_data, hyp=hyp, progress=False)
    per_epoch = len(tiny_data.train_y) // 200
    assert smoothing == [0.3] * 2 * per_epoch
    assert bias_trains == [True] * per_epoch + [False] * per_epoch
    assert len(decays) == 2 * per_epoch // 3 + 1 and decays[-1] == 1.0 and all(d < 1 for d in decays[:-1])
    total = 2 * per_epoch  # a pull every 3 steps decays as 3 steps of 0.95, ramped up by (step / total)^3
    expected = [0.95 ** 3 * (s / total) ** 3 for s in range(3, total + 1, 3)]
    assert decays[:-1] == pytest.approx(expected, rel=1e-5)


def test_fit_refuses_data_that_do_not_fit_the_model_before_changing_it(tiny_data):
    gray = models.build_model(models.cnn_config("small", in_channels=1))
    before = {k: v.clone() for k, v in gray.state_dict().items()}
    with pytest.raises(ValueError, match="data.train_x have 3 channel"):
        training.fit(gray, tiny_data, hyp=TINY, progress=False)
    assert all(torch.equal(before[k], v) for k, v in gray.state_dict().items())  # whitening not set
    small = dataclasses.replace(tiny_data, train_x=tiny_data.train_x[:, :, :8, :8], val_x=tiny_data.val_x[:, :, :8, :8])
    tiny_images = models.build_model(models.cnn_config("small", image_size=8))
    before = {k: v.clone() for k, v in tiny_images.state_dict().items()}
    with pytest.raises(ValueError, match="cannot take the data's 3-channel 8x8 images .* at least 9x9"):
        training.fit(tiny_images, small, hyp=TINY, progress=False)  # was torch's error at the first step
    assert all(torch.equal(before[k], v) for k, v in tiny_images.state_dict().items())
    nine = dataclasses.replace(tiny_data, train_x=tiny_data.train_x[:, :, :9, :9], val_x=tiny_data.val_x[:, :, :9, :9])
    wider = models.build_model(models.cnn_config("small", image_size=9, whiten_kernel=3))
    with pytest.raises(ValueError, match=r"cannot take the data's 3-channel 9x9 images .* at least 10x10 \(a 3x3 conv"):
        training.fit(wider, nine, hyp=TINY, progress=False)  # the minimum follows the whitening kernel
    model = models.build_model(models.cnn_config("small"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in ((dict(device="gpu"), "device must be .* got 'gpu'"), (dict(seed=-1), r"seed \(SEED\) must be"),
                         (dict(hyp={**TINY, "translate": 32}), r"translate must be an int from 0 to 31 \(pixels")):
        with pytest.raises(ValueError, match=message):
            training.fit(model, tiny_data, **{"hyp": TINY, **bad}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    five = models.build_model(models.cnn_config("small", num_classes=5))
    with pytest.raises(ValueError, match="5 outputs and the data 10 classes: build it with num_classes=10"):
        training.fit(five, tiny_data, hyp=TINY, progress=False)
    vae = models.build_model(models.vae_config("small", in_channels=1))
    with pytest.raises(ValueError, match="data.train_x have 3 channel"):
        training.fit_vae(vae, tiny_data, hyp=dict(epochs=1), progress=False)


def test_a_run_shorter_than_the_lookahead_period_keeps_what_it_learned(tiny_data, monkeypatch):
    """One step (a batch larger than the training set), where the lookahead pulls every 5: the final pull used to
    put back the starting weights, its average never updated. The weight decay is that of the one real batch."""
    monkeypatch.setattr(training, "_check_learned", lambda *args: None)  # one step need not learn
    real, batches = training.make_optimizer, []
    monkeypatch.setattr(training, "make_optimizer", lambda model, hyp: batches.append(hyp["batch_size"]) or
                        real(model, hyp))
    model = models.build_model(models.cnn_config("small"))
    start = model.head.weight.detach().clone()
    rows = training.fit(model, tiny_data, hyp=dict(epochs=1, batch_size=5000), device="cpu", progress=False)
    assert len(rows) == 1 and not torch.equal(model.head.weight, start)
    assert batches == [len(tiny_data.train_y)]  # not the 5,000 it was asked for: a decay 4.6x too strong


def test_fractional_epochs_take_the_steps_they_say():
    assert training.total_steps(100, 1.1) == 110  # 100 * 1.1 is 110.00000000000001 in floats
    assert training.total_steps(50, 0.14) == 7  # 7.000000000000001
    assert training.total_steps(10, 1e-11) == 1  # the rounding never leaves a run with no step
    assert training.total_steps(10, 1.15) == 12 and training.total_steps(3, 1) == 3 and training.total_steps(3, 0.1) == 1


def test_a_last_epoch_cut_short_is_recorded_and_plotted_at_its_fraction(tiny_data, tmp_path, monkeypatch):
    assert training.epochs_done(4, 2) == 2 and training.epochs_done(3, 2) == 1.5
    assert training.epochs_done(1999, 2000) == 0.999  # not rounded up to a whole epoch it did not finish
    assert training.epochs_done(1, 2000) == 0.001 and training.epochs_done(4001, 2000) == 2.001  # nor down to one
    assert training.epochs_done(201, 200) == 1.005  # 201 / 200 * 1000 is 1004.9999999999999 in floats
    loaders, real_loader = [], training.Loader
    monkeypatch.setattr(training, "Loader", lambda *a, **kw: loaders.append(real_loader(*a, **kw)) or loaders[-1])
    rows = training.fit(models.build_model(models.cnn_config("small")), tiny_data, hyp=dict(epochs=1.5, batch_size=200),
                        device="cpu", progress=False, csv_path=tmp_path / "m.csv")
    batches = len(loaders[0])
    cut = training.total_steps(batches, 1.5) / batches
    assert [r["epoch"] for r in rows] == [1, pytest.approx(cut, abs=1e-3)] and 1 < rows[1]["epoch"] <= cut
    assert [r["epoch"] for r in training.read_csv(tmp_path / "m.csv")] == [1, rows[1]["epoch"]]
    fig = utils.plot_curves(tmp_path / "m.csv")
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, rows[1]["epoch"]]  # where the run stopped, not at 2


def test_evaluate_is_the_plain_cross_entropy_and_accuracy_of_the_models_logits(trained, tiny_data):
    model = trained[0]
    x, y = tiny_data.val_x[:200], tiny_data.val_y[:200]
    with torch.no_grad():
        logits = model.eval()(x.float() / 255)
    got = training.evaluate(model, x, y)
    assert got["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y.long()).item(), rel=1e-4)
    assert got["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert 0.2 < got["acc"] < 1  # neither chance nor every image: a score that can tell


def test_fit_trains_on_the_training_images_alone_and_picks_on_the_validation_ones(tiny_data, monkeypatch):
    """The split's roles: a leak of validation or test images into training (or a pick on the test set) would
    only make the figures look better, and no other test would notice."""
    seen, scored, real_loader, real_evaluate = [], [], training.Loader, training.evaluate
    monkeypatch.setattr(training, "Loader", lambda x, y, *a, **kw: seen.append((x, y)) or real_loader(x, y, *a, **kw))
    monkeypatch.setattr(training, "evaluate", lambda m, x, y, *a, **kw: scored.append((x, y)) or
                        real_evaluate(m, x, y, *a, **kw))
    training.fit(models.build_model(models.cnn_config("small")), tiny_data, hyp=dict(epochs=2, batch_size=200),
                 device="cpu", progress=False)
    assert len(seen) == 1 and torch.equal(seen[0][0], tiny_data.train_x) and torch.equal(seen[0][1], tiny_data.train_y)
    assert len(scored) == 2 and all(torch.equal(x, tiny_data.val_x) and torch.equal(y, tiny_data.val_y)
                                    for x, y in scored)


def test_a_run_on_the_cpu_is_repeated_exactly_by_its_seed(tiny_data):
    def run(seed):
        torch.manual_seed(0)  # one start: only fit's seed differs
        model = models.build_model(models.cnn_config("small"))
        rows = training.fit(model, tiny_data, hyp=dict(epochs=2, batch_size=200), device="cpu", seed=seed,
                            progress=False)
        return model.state_dict(), [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    (first, rows), (again, rows_again), (_, other_rows) = run(0), run(0), run(1)
    assert rows == rows_again and all(torch.equal(v, again[k]) for k, v in first.items())
    assert rows != other_rows  # fit's seed matters (its batches, flips and crops): the test could fail


def test_channel_statistics_summed_in_another_order_reuse_the_checkpoint(trained, tiny_data):
    _, ckpt, path = trained
    config = dict(ckpt["config"])
    nudged = [float(np.nextafter(np.float32(m), np.float32(1))) for m in config["mean"]]  # a float32 bit
    assert nudged != config["mean"]
    assert training.changed_settings(path / "cnn.pt", config=dict(config, mean=nudged), hyp=ckpt["hyp"]) == []
    moved = [m + 1e-3 for m in config["mean"]]
    assert training.changed_settings(path / "cnn.pt", config=dict(config, mean=moved), hyp=ckpt["hyp"]) == [
        f"config['mean']: {config['mean']!r} in the checkpoint, {moved!r} now"]
