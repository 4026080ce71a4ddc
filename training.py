"""Training and evaluation loops, checkpoints, CSV metrics, seeding and device choice.

The classifier recipe is a port of airbench94 (Keller Jordan): Nesterov SGD with decoupled
hyperparameters, warm-up then linear decay, label smoothing, lookahead (EMA) of the weights,
flip + translate augmentation, and flip + translate test-time augmentation (TTA).
"""
import argparse
import csv
import math
import numbers
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data import Loader, atomic_write, check_count, check_labels, plain, to_float, warn, writable_dir
from models import (BatchNorm, build_model, check_input, check_logits, cnn_config, config_of, device_of, dtype_of,
                    evaluating, exact, first_image, frozen, vae_config, CNN_PRESETS, VAE_PRESETS)

CNN_HYP = dict(
    epochs=10,               # airbench94 trains 9.9 epochs
    batch_size=1024,
    lr=11.5,                 # per 1024 examples, decoupled from momentum
    momentum=0.85,           # Nesterov
    weight_decay=0.0153,     # per 1024 examples, decoupled from the lr
    bias_scaler=64.0,        # lr multiplier for BatchNorm biases
    label_smoothing=0.2,
    whiten_bias_epochs=3,    # the whitening conv's bias trains for this many epochs, then freezes
    warmup=0.23,             # fraction of steps with a linear lr warm-up (from 0.2x), then decay to 0.07x
    translate=2,             # augmentation: random translate (px at 32 px; at_size: in proportion) and flip
    ema_every=5,             # lookahead: pull weights towards their EMA every this many steps
)  # validation picks the best epoch without TTA; predict(..., tta_level=2) applies it to the test set

VAE_HYP = dict(
    epochs=30,
    batch_size=128,
    lr=2e-3,                 # Adam, cosine decay to 10%
    kl_warmup_epochs=3,      # KL weight rises linearly from 0 to 1 over these epochs (at most half the run)
    free_bits=0.0,           # nats per latent dim below which the KL is not penalized
    grad_clip=200.0,         # max gradient norm
    flip=True,               # augmentation: horizontal flip only (the likelihood is per pixel)
)


# The notebooks' defaults per kind of device: on 2 CPU cores all three notebooks finish on CIFAR-10
# in under 45 minutes; a GPU gets the full-width classifier and a VAE large enough to keep it busy.
# Settings given in the environment always win.
DEVICE_DEFAULTS = dict(
    cpu=dict(preset="compact", vae_preset="default", vae_epochs=15, atlas=False),
    gpu=dict(preset="airbench", vae_preset="wide", vae_epochs=30, atlas=True),
)


# ----------------------------------------------------------------------------- plumbing

CPU_BF16 = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's checks for bfloat16 units


def bf16_training(device):
    """Whether our models (the classifier, the VAE's convolutions) train in bfloat16 autocast on this device: on
    a CUDA GPU with bfloat16 units (Ampere and later), and on a CPU with bfloat16 instructions, AMX (recent Intel
    Xeons: a `compact` step 2.3-2.8x faster) or AVX512-BF16 (AMD EPYCs since Zen 4: 1.7-2.1x); elsewhere in
    float32, where bfloat16 is emulated and slower. Evaluation is float32 everywhere, without autocast (on a CUDA
    GPU, cuDNN's convolutions may round their products to TF32, PyTorch's default)."""
    if device.type == "cuda":
        with torch.cuda.device(device) if device.index is not None else nullcontext():  # that GPU's, not the current
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in CPU_BF16)


def training_precision(device):
    """(autocast, name): the autocast context a training step runs in on this device (bfloat16 where
    bf16_training says so, else none), and the precision's name as a checkpoint records it."""
    bf16 = bf16_training(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), "bf16" if bf16 else "fp32"


MAX_SEED = 2 ** 32 - 2  # the notebooks' SEED: NumPy takes seeds below 2 ** 32, and Visualization.ipynb uses SEED + 1


def seed_everything(seed):
    """Seed torch, numpy and random."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed (SEED) must be an int in 0..{2 ** 32 - 1}, numpy's range; got {seed!r}")
    random.seed(int(seed))  # a NumPy int too
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def keeping_random_state():
    """The global random states (Python's, NumPy's, torch's on the CPU, every CUDA device and MPS) restored on
    exit: training seeds them for its own run, and a new model's weights draw from them; what runs after
    either draws as it would have without it."""
    py, npy = random.getstate(), np.random.get_state()
    mps = torch.mps.get_rng_state() if _has_mps() else None
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if mps is not None:
            torch.mps.set_rng_state(mps)


def _has_mps():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def get_device(device=None):
    """The device to use: the argument (an error if this machine lacks it), else cuda, then mps, then cpu."""
    if device is not None:
        device = as_device(device)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.type == "cuda" and (device.index or 0) >= gpus) or (device.type == "mps" and not _has_mps()):
            raise ValueError(f"device {str(device)!r} is not available on this machine; give 'cpu', or None for the "
                             f"best one here ({get_device()})")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _has_mps():
        return torch.device("mps")
    return torch.device("cpu")


def as_device(device):
    """A torch.device from a name or a device, whether this machine has it or not; an error naming `device`."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device; got {device!r}") from None


def synchronize(device):
    """Wait for the work queued on the device (a GPU, its own one of several, mps or another accelerator); on a
    CPU, nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type != "cpu":  # xpu and the others torch.accelerator knows
        torch.accelerator.synchronize(device)


FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def setting(name, default, low=None, choices=None, high=None):
    """The environment variable `name` as the type of `default` (bool, int, float or str), or `default` where
    it is unset or empty; an error naming the variable and what it takes. low, high: the least and the
    greatest number allowed; choices: the strings allowed."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if isinstance(default, bool):
        if text.lower() not in FLAGS:
            raise ValueError(f"{name}={text!r}: give 1 or 0 (or true/false, yes/no, on/off)")
        return FLAGS[text.lower()]
    if isinstance(default, (int, float)):
        kind = "an integer" if isinstance(default, int) else "a number"
        try:
            value = type(default)(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: give {kind}") from None
        if not _within(value, low, high):
            raise ValueError(f"{name}={text!r}: give {kind} {_bounds(low, high)}")
        return value
    if choices is not None and text not in choices:
        raise ValueError(f"{name}={text!r}: give one of {', '.join(choices)}")
    return text


def _within(value, low, high):
    return (low is None or value >= low) and (high is None or value <= high)  # NaN is not


def _bounds(low, high):
    return f"in {low}..{high}" if None not in (low, high) else f">= {low}" if high is None else f"<= {high}"


def at_least(low):
    """An argparse type: an int >= low (a count on a command line: steps, seeds, rounds)."""
    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return int(text)
    return parse


def positive(text):
    """An argparse type: a finite number > 0 (a learning rate, epochs that may end midway)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def from_environment(parser, args, settings):
    """Fill in each (attribute, variable, default, checks) of `settings` that no flag gave (None) with the
    environment variable, as `setting` reads it (checks: its low, high or choices); a bad variable is the
    parser's error, which names the flag that overrides it, so a flag overrides a bad variable too. A flag's
    number is held to the same low and high."""
    for key, variable, default, checks in settings:
        flag = "--" + key.replace("_", "-")
        if getattr(args, key) is None:
            try:
                setattr(args, key, setting(variable, default, **checks))
            except ValueError as e:
                parser.error(f"{e} (or give {flag})")
        elif not _within(getattr(args, key), checks.get("low"), checks.get("high")):
            parser.error(f"argument {flag}: give a number {_bounds(checks.get('low'), checks.get('high'))}, "
                         f"got {getattr(args, key)}")


def device_defaults(device=None):
    """The notebooks' default presets, VAE epochs and atlas flag for a device (DEVICE_DEFAULTS)."""
    kind = (get_device() if device is None else as_device(device)).type  # a named one need not be here
    return DEVICE_DEFAULTS["cpu" if kind == "cpu" else "gpu"]


class Forecast:
    """Prints a run's expected duration from the pace of its first steps after a warm-up step, and again
    after its first epoch, validation included (the first steps of a run on a CPU are the slowest)."""

    def __init__(self, total, desc, device, steps=10, per_epoch=None):
        self.total, self.desc, self.device, self.start = total, desc, device, None
        self.epochs_said = steps < 1  # no forecast at all
        # the paced steps lie in the first epoch: a pace across a validation would count it twice
        self.steps = min(steps, total - 1, (total if per_epoch is None else per_epoch) - 1)

    def epoch(self, seconds, steps):
        """Call after each epoch with its seconds (validation included) and the steps done so far."""
        if self.epochs_said or steps >= self.total:
            return
        self.epochs_said = True
        tqdm.write(f"{self.desc}: the first epoch took {_duration(seconds)} with its validation, so about "
                   f"{_duration(seconds * self.total / steps)} in all")

    def update(self, step):
        """Call after each step with the number of steps done."""
        if self.steps < 1 or step not in (1, 1 + self.steps):
            return
        synchronize(self.device)  # the steps' work done, not only queued
        if step == 1:
            self.start = time.perf_counter()
            return
        pace = (time.perf_counter() - self.start) / self.steps
        tqdm.write(f"{self.desc}: {pace:.3g} s per step over steps 2-{step}, so about "
                   f"{_duration(pace * self.total)} for all {self.total} steps, plus validation each epoch")


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def write_csv(rows, path):
    """Write a list of dicts as CSV, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def read_csv(path):
    """Rows of a metrics CSV as dicts of floats."""
    with open(path, newline="") as f:
        return _floats(csv.DictReader(f))


def _floats(rows):
    """Rows of metrics as dicts of floats, as read_csv gives them."""
    return [{k: float(v) for k, v in row.items()} for row in rows]


def _match_csv(path, history):
    """Write a reused checkpoint's history as the CSV where the file is missing or holds other epochs (a run
    stopped between its CSV and its checkpoint, or one first trained without a csv_path)."""
    try:
        if read_csv(path) == _floats(history):
            return
    except (OSError, ValueError, TypeError, csv.Error):  # missing or unreadable (a short row: float(None)): anew
        pass
    try:
        write_csv(history, path)
    except OSError as e:  # a read-only copy of the checkpoints: the model loads all the same
        warn(f"the training history of the reused checkpoint could not be written to {path} ({e}); the "
             f"checkpoint holds it (its 'history')")


def save_checkpoint(path, model, **info):
    """Save the state_dict with the config that rebuilds the model, plus any info (metrics...)."""
    ckpt = dict(config=model.config, state_dict=model.state_dict(), **info)
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), sync=True)


def load_checkpoint(path, device=None, hint="train the model first (or fix the path)", partial=False):
    """Rebuild a model from a finished checkpoint, or with partial=True from the best epoch so far of a run that
    did not finish (the `.partial.pt` file a stopped run leaves; a VAE's holds the prior's latent statistics);
    returns (model in eval mode, checkpoint dict). The global random states are left as they were (the new
    model's initial weights draw from them)."""
    path = Path(path)
    if not path.exists():  # those of other presets beside it: a model trained on another device's defaults
        prefix = path.stem.rsplit("_", 1)[0]
        others = [f"{prefix}_{preset}.pt" for preset in {**CNN_PRESETS, **VAE_PRESETS}
                  if (path.parent / f"{prefix}_{preset}.pt").is_file()]
        raise FileNotFoundError(f"no checkpoint at {path}: {hint}" +
                                (f" (beside it: {', '.join(others)})" if others else ""))
    device = get_device(device)  # a bad device is the caller's error, not the checkpoint's
    try:  # on the CPU: a device out of memory is no fault of the file's
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        with keeping_random_state():
            model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is corrupt or incompatible ({e}); delete it and retrain") from e
    if ckpt.get("complete") is False and not partial:
        raise RuntimeError(f"checkpoint {path} is from a run that did not finish (best epoch so far: "
                           f"{ckpt.get('epoch')}); {hint}, and let it run to the end "
                           f"(training.load_checkpoint(path, partial=True) loads that epoch)")
    return model.to(device).eval(), ckpt


def load_trained(path, data, seed, device=None, hint="train the model first (or fix the path)"):
    """load_checkpoint, and an error unless the checkpoint was trained on this data (its name and images,
    so its train/val split too) with this seed: a notebook that reads another's checkpoint must not get
    a model of another split, or of images since changed under the same name."""
    model, ckpt = load_checkpoint(path, device, hint)
    check_trained_on(ckpt, data, seed, hint, f"checkpoint {path}")
    return model, ckpt


def check_trained_on(ckpt, data, seed, hint="re-run the training cell after the data cell", name="the model"):
    """An error naming what differs unless the checkpoint dict `ckpt` was trained on this data with this seed
    (trained_on): a notebook whose data cell was re-run with another DATASET, and not its training cell, would
    score the earlier model on the new images, under their class names."""
    if ckpt is None:  # the notebooks' after a stopped training cell
        raise RuntimeError(f"{name} has no checkpoint: its training or loading did not finish; {hint}")
    differ = [f"{key} {ckpt.get(key)!r}, not {value!r}" if key != "data" else "other images (or another split)"
              for key, value in trained_on(data, seed).items() if ckpt.get(key) != value]
    if differ:
        raise RuntimeError(f"{name} was trained on {', '.join(differ)}: {hint}")


def trained_on(data, seed):
    """What a checkpoint records of the data and seed it was trained with; the data's fingerprint too, as
    an image folder's name stays when its images change."""
    return dict(dataset=data.name, seed=plain(seed), data=data.fingerprint())


def reusable(path, **expected):
    """True if a complete checkpoint at path was trained with exactly these settings."""
    return changed_settings(path, **expected) == []


def changed_settings(path, **expected):
    """The settings a complete checkpoint at path was trained with that differ from these, one line each
    ([] if none); None if there is no complete checkpoint there."""
    if not Path(path).is_file():  # a folder is named by the training that follows
        return None
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # retrained, and replaced when the run completes: say so before the time is spent
        warn(f"checkpoint {path} cannot be read ({type(e).__name__}; training.load_checkpoint says more): a model "
             f"is trained anew and replaces it when the run completes")
        return None
    if ckpt.get("complete") is False:  # as load_checkpoint: a checkpoint saved by hand has no such key
        return None
    return [line for key, wanted in expected.items() for line in _changes(key, ckpt.get(key), wanted)]


def _changes(key, saved, wanted):
    """'name: saved in the checkpoint, wanted now' for a setting, or for each entry of a dict of them (config,
    hyp) that differs; of the hyperparameters, one since removed (tta_level, which nothing read) is left out:
    it changed nothing, so it must not force a retrain."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = wanted if key == "hyp" else {**saved, **wanted}
        return [f"{key}[{k!r}]: {_shown(saved, k)} in the checkpoint, {_shown(wanted, k)} now"
                for k in keys if k not in saved or k not in wanted or not _same(saved[k], wanted[k])]
    return [] if _same(saved, wanted) else [f"{key}: {saved!r} in the checkpoint, {wanted!r} now"]


def _same(saved, wanted):
    """Whether a setting is unchanged: floats within a relative 1e-6 of each other, as the data's channel
    statistics summed on another machine's CPU (AVX2, AVX-512) differ in their last bits, which must not force a
    retrain."""
    if isinstance(saved, (list, tuple)) and isinstance(wanted, (list, tuple)):
        return len(saved) == len(wanted) and all(map(_same, saved, wanted))
    if any(isinstance(v, float) for v in (saved, wanted)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (saved, wanted)):
        return math.isclose(saved, wanted, rel_tol=1e-6)
    return saved == wanted


def _shown(settings, key):
    return repr(settings[key]) if key in settings else "absent"


def partial_path(path):
    """Where a run in progress writes a file: beside the finished one, which it replaces on completion."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _extra(extra, key):
    """fit's `extra` as a dict, refused where it would set an entry the checkpoint records itself (the best
    epoch's metric `key` among them)."""
    extra = dict(extra or {})
    taken = sorted(set(extra) & {"config", "state_dict", "epoch", "history", "complete", "hyp", "precision", key})
    if taken:
        raise ValueError(f"extra must not set {taken}: the checkpoint records them itself")
    return extra


def check_paths(ckpt_path, csv_path):
    """A folder given as the checkpoint's or the CSV's path, named before training (else found only when the
    finished run is saved)."""
    for name, path in (("ckpt_path", ckpt_path), ("csv_path", csv_path)):
        if path and Path(path).is_dir():
            raise IsADirectoryError(f"{name} {path} is a folder: give the path of the file to write")


class BestKeeper:
    """Per-epoch bookkeeping of both training loops: the metrics CSV and the best epoch's weights, in
    memory and in files beside the finished ones (`partial_path`); `restore` loads the best weights
    back into the model, and `finish` replaces the finished checkpoint and CSV with this run's."""

    def __init__(self, model, key, higher, ckpt_path=None, csv_path=None, **info):
        check_paths(ckpt_path, csv_path)
        self.model, self.key, self.sign = model, key, 1 if higher else -1
        self.ckpt_path, self.csv_path, self.info = ckpt_path, csv_path, info
        self.rows, self.best, self.state = [], None, None
        if ckpt_path and partial_path(ckpt_path).exists():  # said before the first epoch ends, not after
            warn(f"{partial_path(ckpt_path)} holds the best epoch of a run that stopped; this run replaces it "
                 f"when its first epoch ends: copy it first to keep it")

    def update(self, row):
        """Record one epoch's metrics; keep the weights if the epoch is the best so far. Any metric that is not
        a number stops the run: NaN in the key would stay the best, as no later epoch compares greater, and NaN
        weights after the epoch's last step give a NaN validation loss beside a finite accuracy (class 0)."""
        bad = next((k for k, v in row.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"{bad} became {row[bad]} in epoch {row['epoch']}; training stopped. "
                                     f"{self.left()} Try a lower lr.")
        self.rows.append(row)
        if self.best is None or self.sign * row[self.key] >= self.sign * self.best[self.key]:  # a tie: the later
            self.best = row
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.ckpt_path:
                self._save(partial_path(self.ckpt_path), complete=False)
        if self.csv_path:
            write_csv(self.rows, partial_path(self.csv_path))

    def left(self):
        """What a run stopped now leaves, in words (_kept)."""
        return _kept(self.ckpt_path, self.best is not None)

    def restore(self):
        """Load the best epoch's weights into the model, in eval mode."""
        self.model.load_state_dict(self.state)
        self.model.eval()

    def finish(self):
        """Save the CSV and then the model as the finished checkpoint over the old ones; drop the partial files.
        The checkpoint goes last: interrupted in between, the old checkpoint stays, and a re-run with the new
        settings trains again and rewrites both (the other order left the new checkpoint beside the old CSV for
        good); one with the old settings reuses the old checkpoint, whose own history the notebooks plot."""
        for path, write in [(self.csv_path, lambda p: write_csv(self.rows, p)),
                            (self.ckpt_path, lambda p: self._save(p, complete=True))]:
            if path:
                write(path)
                partial_path(path).unlink(missing_ok=True)

    def _save(self, path, complete):
        save_checkpoint(path, self.model, epoch=self.best["epoch"], **{self.key: self.best[self.key]},
                        history=self.rows, complete=complete, **self.info)


def _number(ok):
    return lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) and ok(v)


def _integer(ok):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and ok(v)


HYP_RULES = dict(  # what each hyperparameter must be: (in words, test)
    epochs=("a number > 0 (finite)", _number(lambda v: 0 < v < math.inf)),
    batch_size=("an int >= 1", _integer(lambda v: v >= 1)),
    lr=("a number > 0 (finite)", _number(lambda v: 0 < v < math.inf)),
    momentum=("a number in (0, 1) (Nesterov)", _number(lambda v: 0 < v < 1)),
    weight_decay=("a number >= 0 (finite)", _number(lambda v: 0 <= v < math.inf)),
    bias_scaler=("a number > 0 (finite)", _number(lambda v: 0 < v < math.inf)),
    label_smoothing=("a number in [0, 1)", _number(lambda v: 0 <= v < 1)),
    whiten_bias_epochs=("a number >= 0", _number(lambda v: v >= 0)),
    warmup=("a number in [0, 1]", _number(lambda v: 0 <= v <= 1)),
    translate=("an int from 0 to 31 (pixels at 32 px, in proportion at another size)", _integer(lambda v: 0 <= v < 32)),
    ema_every=("an int >= 1 (steps)", _integer(lambda v: v >= 1)),
    kl_warmup_epochs=("a number >= 0 (finite)", _number(lambda v: 0 <= v < math.inf)),
    free_bits=("a number >= 0 (finite)", _number(lambda v: 0 <= v < math.inf)),
    grad_clip=("a number > 0 (inf: no clipping)", _number(lambda v: v > 0)),
    flip=("True or False", lambda v: isinstance(v, bool)),
)


def hyperparameters(defaults, hyp):
    """defaults updated with hyp; an error naming the bad key or value and what is valid."""
    hyp = dict(hyp or {})
    unknown = sorted(set(hyp) - set(defaults))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; valid: {', '.join(defaults)}")
    hyp = {**defaults, **hyp}
    for key, value in hyp.items():
        what, ok = HYP_RULES[key]
        if not ok(value):
            raise ValueError(f"{key} must be {what}, got {value!r}")
    return {key: plain(value) for key, value in hyp.items()}  # a checkpoint stores them


def _train_or_load(fit_fn, data, ckpt_path, config, hyp, retrain, seed, device, csv_path, progress):
    """Load a complete checkpoint trained with exactly these settings, else build the model of `config`, fit
    it and load it; either way the global random states are left as they were (keeping_random_state)."""
    if ckpt_path is None:
        raise ValueError("ckpt_path is required: the checkpoint to reuse, or to write when training")
    ckpt_path, csv_path = Path(ckpt_path).expanduser(), csv_path and Path(csv_path).expanduser()
    settings = trained_on(data, seed)
    with keeping_random_state():
        changed = None if retrain else changed_settings(ckpt_path, config=config, hyp=hyp, **settings)
        if changed == []:
            model, ckpt = load_checkpoint(ckpt_path, device)
            if csv_path:
                _match_csv(csv_path, ckpt["history"])
            return model, ckpt
        if changed:  # a setting that is not in the file's name, or a default that differs on this device
            print(f"{ckpt_path} was trained with other settings, so a model is trained anew and replaces it when "
                  f"the run completes (interrupt now and set them back to keep it): " + "; ".join(changed))
        for path in filter(None, (ckpt_path, csv_path)):  # now, not when the first epoch is saved
            writable_dir(path.parent, f"{path.name}'s folder", f"give {path.name} a path in")
        seed_everything(seed)
        fit_fn(build_model(config), data, hyp, device, seed, ckpt_path, csv_path, progress, extra=settings)
        return load_checkpoint(ckpt_path, device)


# ----------------------------------------------------------------------------- classifier

@torch.no_grad()
def _dry_run(model, images):
    """The model run on the first of the training images before anything of it is changed: an image too small
    for its pooling (under 9 px for our CNN) fails here, named, not at the first step."""
    with evaluating(model):
        try:
            model(first_image(model, images))
        except RuntimeError as e:
            c, h, w = images.shape[1:]
            k = config_of(model).get("whiten_kernel")
            if k is None or min(h, w) >= 7 + k:  # not ours, or not too small: the model's own error stands
                raise
            raise ValueError(f"the model cannot take the data's {c}-channel {h}x{w} images ({e}): this CNN needs "
                             f"images of at least {7 + k}x{7 + k} (a {k}x{k} conv, then three 2x poolings)") from e


def lr_factor(step, total, warmup):
    """airbench schedule: linear 0.2 -> 1 over the warm-up, then linear 1 -> 0.07."""
    warm = int(total * warmup)
    if step < warm:
        return 0.2 + 0.8 * step / warm
    return 1.0 - 0.93 * (step - warm) / max(1, total - warm)


def make_optimizer(model, hyp):
    """Nesterov SGD with airbench's decoupled lr / weight decay, BN biases at a higher lr."""
    kilostep = 1024 * (1 + 1 / (1 - hyp["momentum"]))
    lr = hyp["lr"] / kilostep
    wd = hyp["weight_decay"] * hyp["batch_size"] / kilostep
    bn = {id(p) for m in model.modules() if isinstance(m, BatchNorm) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    bn_params = [p for p in params if id(p) in bn]
    other = [p for p in params if id(p) not in bn]
    lr_bn = lr * hyp["bias_scaler"]
    groups = [dict(params=bn_params, lr=lr_bn, weight_decay=wd / lr_bn),
              dict(params=other, lr=lr, weight_decay=wd / lr)]
    opt = torch.optim.SGD(groups, momentum=hyp["momentum"], nesterov=True)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def at_size(pixels, size):
    """A pixel amount set for 32 px images (a translation, a TTA shift), in proportion at another size: the same
    at 28 px, twice at 64 px; at least 1 where it is not 0."""
    return max(1, round(pixels * size / 32)) if pixels else 0


def drops_last(n, batch_size):
    """Whether an epoch of n images leaves out its last, partial batch: only when that is under 10% of the set
    (a batch of a few images jolts the batch statistics) or a single image (which BatchNorm cannot train on);
    a larger one would leave that share unseen each epoch (2,047 images in batches of 1,024: half). A set
    smaller than one batch is one batch."""
    return n >= batch_size and n % batch_size < max(0.1 * n, 2)


@torch.no_grad()
def predict(model, images, tta_level=0, batch_size=1000):
    """Logits for images (uint8 or float in [0, 1]), with optional TTA: tta_level 0 none, 1 the mirror
    image too, 2 also two 1-px shifts (airbench94's; in proportion at another size than 32 px, at_size)."""
    check_input(model, images)
    check_count("batch_size", batch_size, 1)
    if isinstance(tta_level, bool) or tta_level not in (0, 1, 2):
        raise ValueError(f"tta_level must be 0 (none), 1 (mirror) or 2 (mirror and shifts), got {tta_level!r}")
    device = device_of(model)

    out = []
    with frozen(model) as layout:  # the memory format the model runs fastest in, where it can take another

        def logits_of(x):
            out = model(layout(x))
            check_logits(model, out)  # a dict or a tuple is named, not met as an AttributeError further on
            return out

        def flip_avg(x):
            return logits_of(x) if tta_level == 0 else 0.5 * (logits_of(x) + logits_of(x.flip(3)))

        for x in images.split(batch_size):
            x = to_float(x.to(device)).to(dtype_of(model))  # in the model's dtype (half, bfloat16)
            logits = flip_avg(x)
            if tta_level >= 2:
                h, w = x.shape[2:]
                s = at_size(1, min(h, w))
                p = F.pad(x, (s, s, s, s), mode="reflect")
                shifted = [flip_avg(p[:, :, :h, :w]), flip_avg(p[:, :, 2 * s:, 2 * s:])]
                logits = 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
            out.append(logits.float())
    return torch.cat(out)


def evaluate(model, images, labels, tta_level=0):
    """Cross-entropy loss and accuracy on a labelled set."""
    classes = config_of(model).get("num_classes")  # ours say it: checked before the pass
    labels = check_labels(labels, len(check_input(model, images)), classes)
    logits = predict(model, images, tta_level)
    labels = check_labels(labels, len(images), logits.shape[1]).to(logits.device)  # any model's; int64
    return dict(loss=F.cross_entropy(logits, labels).item(),
                acc=(logits.argmax(1) == labels).float().mean().item())


class Lookahead:
    """EMA of all float state; every few steps the weights are pulled onto it (airbench)."""

    def __init__(self, model):
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, decay):
        for (k, ema), v in zip(self.ema.items(), model.state_dict().values()):
            if v.dtype.is_floating_point:
                ema.lerp_(v, 1 - decay)
                v.copy_(ema)


def total_steps(batches, epochs):
    """The steps of `epochs` (a fraction too) over `batches` an epoch: rounded up, but not past a float's
    error (100 batches x 1.1 epochs is 110 steps, where the product is 110.00000000000001)."""
    return max(1, math.ceil(round(batches * epochs, 9)))  # at least one step, however few epochs


def epochs_done(step, batches):
    """The epochs done after `step` steps of `batches` each, as the CSV's epoch column and the learning curves give
    them: a whole number at an epoch's end, the fraction for a last epoch cut short (2.5), rounded down to three
    decimals in integers, and at least 0.001 past the whole epochs, so that it never reads as whole."""
    whole, rest = divmod(step, batches)
    return whole if not rest else whole + max(rest * 1000 // batches, 1) / 1000


def run_epochs(model, loader, total, train_step, end_epoch, keeper, desc, progress=True):
    """The loop both fits share: `total` steps in epochs over `loader`, a progress bar and a duration
    forecast; train_step(step, x, y) runs one step and returns its sums {name: tensor} (kept on the
    device, no host sync per step); end_epoch(epoch, sums, seen) returns the epoch's metrics row
    (validation included), which goes to `keeper` with the epochs done (epochs_done) and its seconds. A run
    stopped by an error or an interrupt leaves the model in eval mode, as a finished run, with the best epoch's
    weights so far (before the first epoch ends, with the weights the stop found)."""
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress)
    forecast = Forecast(total, desc, device_of(model), steps=10 if progress else 0, per_epoch=len(loader))
    try:
        for epoch in range(math.ceil(total / len(loader))):
            start = time.perf_counter()
            model.train()
            sums, seen = {}, 0
            for x, y in loader:
                for k, v in train_step(step, x, y).items():
                    sums[k] = sums.get(k, 0) + v
                seen += len(y)
                step += 1
                forecast.update(step)
                bar.update()
                if step >= total:
                    break
            row = end_epoch(epoch, sums, seen)
            done = epochs_done(step, len(loader))
            keeper.update(dict(epoch=done, **row, seconds=time.perf_counter() - start))
            forecast.epoch(time.perf_counter() - start, step)
            bar.set_postfix(epoch=done, **{keeper.key: f"{row[keeper.key]:.4f}"})
    except BaseException as e:
        if keeper.state is not None:  # not the weights of a diverged or half-done epoch
            keeper.restore()
        else:
            model.eval()
        if isinstance(e, KeyboardInterrupt):  # the other stops say it in their message
            e.add_note(f"Training stopped. {keeper.left()}")
        raise
    finally:
        bar.close()


def _sum_dtype(device):
    """The dtype an epoch's loss is summed in, on the device: float64, float32 on mps (which has no float64;
    a copy to the CPU would wait for the device at every step)."""
    return torch.float32 if device.type == "mps" else torch.float64


def fit(model, data, hyp=None, device=None, seed=0, ckpt_path=None, csv_path=None,
        progress=True, extra=None):
    """Train a CNN on data.train, validate on data.val each epoch, keep the best checkpoint. Its frozen
    whitening layer is first set from the first 5,000 training images (`CNN.init_whiten`), as airbench94
    sets it.

    Returns the per-epoch metrics rows; the model ends with the best epoch's weights.
    `extra` is stored in the checkpoint (e.g. the dataset name).
    """
    hyp, extra = hyperparameters(CNN_HYP, hyp), _extra(extra, "val_acc")
    check_input(model, data.train_x[:1], "data.train_x")  # these first: before anything of the model is changed
    classes = config_of(model).get("num_classes")
    if classes is not None and classes != len(data.classes):
        raise ValueError(f"the model has {classes} outputs and the data {len(data.classes)} classes: build it "
                         f"with num_classes={len(data.classes)} (models.cnn_config)")
    _dry_run(model, data.train_x)
    device = get_device(device)
    check_paths(ckpt_path, csv_path)  # before the model is changed
    drop = drops_last(len(data.train_y), hyp["batch_size"])
    loader = Loader(data.train_x, data.train_y, hyp["batch_size"], shuffle=True, augment=True,
                    translate=min(at_size(hyp["translate"], data.size), data.size - 1), drop_last=drop,  # < the side
                    device=device, seed=seed, channels_last=True)
    seed_everything(seed)
    model.init_whiten(data.train_x[:5000])  # draws no random numbers
    autocast, precision = training_precision(device)
    model.to(device)
    # batches come channels-last on every device; on CUDA cuDNN follows the input's layout, so only the CPU and mps
    # need the weights so too (the GPU timings in the README were measured so)
    if device.type != "cuda":
        model.to(memory_format=torch.channels_last)
    total = total_steps(len(loader), hyp["epochs"])
    # the weight decay per image (the loss is a sum), of the batches there are: the whole set, if smaller
    # the weights decay for the images a step sees: a kept partial batch makes the mean batch smaller
    opt = make_optimizer(model, dict(hyp, batch_size=hyp["batch_size"] if drop else len(data.train_y) / len(loader)))
    # airbench's 0.95 a step, taken ema_every steps at a time, ramped up over the run
    ema_decay = 0.95 ** hyp["ema_every"] * (torch.arange(total + 1) / total) ** 3
    lookahead = Lookahead(model)
    keeper = BestKeeper(model, "val_acc", True, ckpt_path, csv_path, hyp=hyp, precision=precision,
                        **extra)

    def train_step(step, x, y):
        model.whiten.bias.requires_grad_(step < len(loader) * hyp["whiten_bias_epochs"])
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, hyp["warmup"])
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=hyp["label_smoothing"], reduction="sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % hyp["ema_every"] == 0:
            lookahead.update(model, ema_decay[step + 1].item())
        if step + 1 == total and total >= hyp["ema_every"]:  # a run too short to update the EMA keeps its weights
            lookahead.update(model, 1.0)
        return dict(loss=loss.detach().to(_sum_dtype(device)), correct=(out.argmax(1) == y).sum())

    def end_epoch(epoch, sums, seen):
        _check_finite(sums["loss"], epoch, keeper, f"Try a lower lr (now {hyp['lr']}).")
        val = evaluate(model, data.val_x, data.val_y)
        return dict(train_loss=float(sums["loss"]) / seen, train_acc=int(sums["correct"]) / seen,
                    val_loss=val["loss"], val_acc=val["acc"], lr=opt.param_groups[1]["lr"])

    try:
        run_epochs(model, loader, total, train_step, end_epoch, keeper, "training", progress)
    finally:
        model.whiten.bias.requires_grad_(True)
    keeper.restore()  # first: a run refused as unlearned is left as a stopped one is, at its best epoch
    _check_learned(keeper.best["val_acc"], data.val_y, len(data.classes), hyp["lr"], ckpt_path)
    keeper.finish()
    return keeper.rows


def _check_finite(loss, epoch, keeper, advice):
    """Stop a run whose epoch's summed training loss is NaN or inf, checked once an epoch (a check per step
    would wait for the device at every step); the weights go back to the best epoch's (run_epochs)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {float(loss)} in epoch {epoch + 1}; training stopped. "
                                 f"{keeper.left()} {advice}")


def _kept(ckpt_path, saved=True):
    """What a stopped run leaves: the finished checkpoint untouched, the best epoch beside it once one was saved."""
    if not ckpt_path:
        return "Nothing was saved."
    best = (f"the best epoch so far is in {partial_path(ckpt_path)} (training.load_checkpoint(path, partial=True) "
            f"loads it)" if saved else "no epoch of this run was kept")
    return f"Any finished checkpoint at {ckpt_path} is untouched; {best}."


def _check_learned(val_acc, val_y, num_classes, lr, ckpt_path):
    """Refuse to finish a run whose best validation accuracy guessing would reach: with a probability over
    1% (the binomial tail of the validation set's guesses, each right with the probability of always naming
    its most frequent class, 1 / num_classes for balanced classes)."""
    num_val = len(val_y)
    chance = torch.bincount(torch.as_tensor(val_y).long(), minlength=num_classes).max().item() / num_val
    if chance ** num_val >= 0.01:  # guessing would get them all right that often: no score can tell
        warn(f"the validation set ({num_val} images) is too small to tell learning from guessing (all "
             f"{num_val} right by chance {chance ** num_val:.0%} of the time): the run is not checked for it")
        return
    guesses = torch.distributions.Binomial(num_val, probs=torch.tensor(chance, dtype=torch.float64))
    reached = guesses.log_prob(torch.arange(round(val_acc * num_val), num_val + 1, dtype=torch.float64)).exp().sum()
    if reached >= 0.01:
        raise RuntimeError(
            f"the best validation accuracy, {val_acc:.1%}, is at chance level ({chance:.1%}, always naming the "
            f"most frequent of {num_classes} classes): the run diverged or did not learn, so it is not saved as "
            f"finished. {_kept(ckpt_path)} "
            f"Try a lower lr (now {lr}, e.g. {lr / 10:g}).")


def train_classifier(data, ckpt_path, preset="airbench", hyp=None, retrain=False, seed=0,
                     device=None, csv_path=None, progress=True, **config_overrides):
    """Load the checkpoint if it was trained with the same config and settings, else train one.

    Returns (model in eval mode, checkpoint dict).
    """
    mean, std = data.channel_stats()
    config = cnn_config(preset, data.channels, len(data.classes), mean, std, image_size=data.size,
                        **config_overrides)
    return _train_or_load(fit, data, ckpt_path, config, hyperparameters(CNN_HYP, hyp), retrain, seed, device,
                          csv_path, progress)


# ----------------------------------------------------------------------------- VAE

@torch.no_grad()
def evaluate_vae(vae, images, batch_size=500, seed=0):
    """Mean negative ELBO (bits/dim), reconstruction NLL and KL (nats per image) on a set."""
    check_input(vae, images)
    check_count("batch_size", batch_size, 1)
    device = device_of(vae)
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = dict(bpd=0.0, nll=0.0, kl=0.0)
    with frozen(vae) as layout:
        for x in images.split(batch_size):
            out = vae.loss_terms(layout(to_float(x.to(device))), generator=gen)  # checked above
            for k in sums:
                sums[k] += out[k].sum().item()
    return {k: v / len(images) for k, v in sums.items()}


def _check_covariance_images(n, name):
    """An error for fewer than 2 images, whose latent covariance (over n - 1) would be NaN."""
    if n < 2:
        raise ValueError(f"{name} has {n} image(s): the latent statistics (a covariance) need at least 2")


@torch.no_grad()
def latent_statistics(vae, images, batch_size=500):
    """Mean, covariance and 0.5/99.5 percentiles of the encoder means over a set of images."""
    device = vae.latent_mean.device
    check_input(vae, images)
    check_count("batch_size", batch_size, 1)
    _check_covariance_images(len(images), "images")
    with frozen(vae) as layout:
        mu = torch.cat([vae.encode(layout(to_float(x.to(device))))[0] for x in images.split(batch_size)])
    mu = exact(mu)
    mean = mu.mean(0)
    cov = (mu - mean).T @ (mu - mean) / (len(mu) - 1)
    lo, hi = torch.quantile(mu, torch.tensor([0.005, 0.995], dtype=mu.dtype, device=mu.device), dim=0)
    return dict(latent_mean=mean.float(), latent_cov=cov.float(), latent_lo=lo.float(), latent_hi=hi.float())


def fit_vae(vae, data, hyp=None, device=None, seed=0, ckpt_path=None, csv_path=None,
            progress=True, extra=None):
    """Train a VAE on data.train (negative ELBO), keep the best checkpoint by validation bits/dim.

    Its convolutions train in bfloat16 autocast where `bf16_training` says so, as the classifier does; the
    likelihood, the KL and validation are float32. Stops with a clear error at the end of an epoch whose loss
    became NaN/inf (checked once an epoch, as fit does); the best checkpoint so far is kept. Returns the
    per-epoch metrics rows; the model ends with the best epoch's weights and the latent statistics of the
    training set stored in its buffers (computed when the run completes: a stopped run's VAE keeps the prior's).
    """
    hyp, extra = hyperparameters(VAE_HYP, hyp), _extra(extra, "val_bpd")
    check_input(vae, data.train_x[:1], "data.train_x")  # before anything of the model is changed
    _dry_run(vae, data.train_x)  # images of another size than the VAE's, named
    _check_covariance_images(len(data.train_x), "data.train_x")  # before training, not after it
    device = get_device(device)  # a bad one named before the model is changed
    check_paths(ckpt_path, csv_path)
    for name, value in vae.prior_statistics().items():  # a model trained before: not its old statistics if stopped
        getattr(vae, name).copy_(value)
    seed_everything(seed)
    vae.to(device)
    loader = Loader(data.train_x, data.train_y, hyp["batch_size"], shuffle=True, augment=hyp["flip"],
                    translate=0, drop_last=drops_last(len(data.train_y), hyp["batch_size"]), device=device,
                    seed=seed)
    total = total_steps(len(loader), hyp["epochs"])
    # a run shorter than twice the warm-up spends its second half at the full KL, the bound it reports (a run of
    # one step, at weight 0, has no second half)
    warm = max(1, int(min(len(loader) * hyp["kl_warmup_epochs"], total / 2)))
    opt = torch.optim.Adam(vae.parameters(), lr=hyp["lr"])
    def lr_factor_at(step):  # cosine from 1 down to 0.1
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_at)
    gen = torch.Generator(device=device).manual_seed(seed)
    autocast, precision = training_precision(device)
    keeper = BestKeeper(vae, "val_bpd", False, ckpt_path, csv_path, hyp=hyp, precision=precision,
                        **extra)

    def kl_weight(step):  # rising to 1 over the warm-up; with no warm-up epochs, 1 from the first step
        return min(1.0, step / warm) if hyp["kl_warmup_epochs"] else 1.0

    def train_step(step, x, y):
        with autocast:  # the convolutions (bf16_training); the likelihood and KL in float32 (VAE.encode, decode_params)
            out = vae.loss_terms(x, kl_weight(step), hyp["free_bits"], generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), hyp["grad_clip"])
        opt.step()
        sched.step()
        return dict(loss=out["loss"].detach() * len(x), **{k: out[k].detach().sum() for k in ("bpd", "nll", "kl")})

    def end_epoch(epoch, sums, seen):
        _check_finite(sums["loss"], epoch, keeper, f"Try a lower lr (now {hyp['lr']}) or grad_clip "
                                                   f"(now {hyp['grad_clip']}).")
        val = evaluate_vae(vae, data.val_x, seed=seed)
        last = min((epoch + 1) * len(loader), total) - 1  # the epoch's last step: its KL weight and lr
        return dict(**{f"train_{k}": float(v) / seen for k, v in sums.items()},
                    val_bpd=val["bpd"], val_nll=val["nll"], val_kl=val["kl"],
                    kl_weight=kl_weight(last), lr=hyp["lr"] * lr_factor_at(last))

    run_epochs(vae, loader, total, train_step, end_epoch, keeper, "VAE training", progress)
    keeper.restore()
    for name, value in latent_statistics(vae, data.train_x).items():
        getattr(vae, name).copy_(value)
    keeper.finish()
    return keeper.rows


def train_vae(data, ckpt_path, preset="default", hyp=None, retrain=False, seed=0, device=None,
              csv_path=None, progress=True, **config_overrides):
    """Load the VAE checkpoint if trained with the same config and settings, else train one.

    Returns (vae in eval mode, checkpoint dict).
    """
    config = vae_config(preset, data.channels, **config_overrides)
    return _train_or_load(fit_vae, data, ckpt_path, config, hyperparameters(VAE_HYP, hyp), retrain, seed, device,
                          csv_path, progress)
