"""Feature visualization benchmark: the quality of every technique, and the speed of render() vs Lucent.

    python benchmarks/bench_featureviz.py                              # CIFAR-10 (JPEG copy in DATA_DIR)
    python benchmarks/bench_featureviz.py --dataset fashion-mnist      # quality table + grid PNG
    python benchmarks/bench_featureviz.py --dataset synthetic          # + planted-template recovery
    python benchmarks/bench_featureviz.py --speed                      # timings, ratios vs Lucent (small CNN)
    add --quick to the quality table for a smoke run (small models, few steps, a data subset); --steps 16 to --speed

    python benchmarks/bench_featureviz.py --notebook-models            # the notebooks' own checkpoints
    python benchmarks/bench_featureviz.py --notebook-models --techniques fourier,maco --transforms AFFINE,LIGHT
                                                                       # + each technique with other transforms

Quality: the classifier (airbench preset), an independent one (other seed, other widths) and a VAE
are trained once (or loaded) under checkpoints/bench/, or with --notebook-models the checkpoints the
three notebooks wrote under checkpoints/. Each technique renders the 10 classes and a fixed sample of
channels with --seeds seeds; the table (metrics.quality_table) keeps the real-image rows and the
known-bad inputs (uniform noise, shuffled pixels, another class; and unregularized pixel ascent) and
shows every metric as mean ± SD over the seeds. Then the margins: how much worse each known-bad input
scores than real images, against the seed-to-seed spread of that difference.
Lucent (pip install torch-lucent --no-deps; it needs kornia==0.4.1 and decorator) joins both tables
when importable: at 32 px in the quality table and in --speed (per-step time against a bare step).
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import featureviz as fv  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

try:
    from lucent.optvis import objectives as lucent_objectives
    from lucent.optvis import param as lucent_param
    from lucent.optvis import render as lucent_render
except Exception as e:  # not installed, or its kornia does not import
    lucent_render, LUCENT_ERROR = None, e


def names_in(choices):
    """An argparse type: comma-separated names, each one of `choices`, as a list."""
    def parse(text):
        names = text.split(",")
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown}; choose from {', '.join(choices)}")
        return names
    return parse


# each mode's defaults, for the options not given; an option given to a mode that does not read it is an error
QUALITY = dict(seeds=4, steps=256, preset="airbench", vae_preset="default", epochs=5, batch_size=1024, vae_epochs=20,
               vae_batch_size=training.VAE_HYP["batch_size"], vae_lr=training.VAE_HYP["lr"])
QUICK = dict(QUALITY, seeds=2, steps=16, preset="small", vae_preset="small", epochs=1, batch_size=256, vae_epochs=1)
SPEED = dict(steps=256, preset="small", rounds=5)
TRAINING = ("epochs", "batch_size", "vae_epochs", "vae_batch_size", "vae_lr")
UNREAD = {"--speed": ("dataset", "quick", "seeds", "vae_preset", "techniques", "transforms", "lucent_224", "png",
                      "ckpt_dir", *TRAINING),
          "--notebook-models": ("rounds", *TRAINING), "the quality table": ("rounds",)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", help="a dataset name or image-folder path (data.load_data; default: DATASET, "
                   "else cifar10-jpeg)")
    p.add_argument("--speed", action="store_true", help="time render() against Lucent instead")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small models, few steps (the defaults in brackets below)")
    p.add_argument("--seeds", type=training.at_least(2),
                   help="renders per technique, at least 2 for a spread (>= 4 for the table): default 4 (2)")
    p.add_argument("--steps", type=training.at_least(1), help="default 256 (16)")
    p.add_argument("--rounds", type=training.at_least(1),
                   help="--speed: interleaved rounds; ratios are taken within a round: default 5")
    p.add_argument("--preset", choices=sorted(models.CNN_PRESETS), default=None,
                   help="classifier preset (default airbench (small), small with --speed, whose CPU goal is the "
                        "small CNN's; with --notebook-models PRESET, else the device's)")
    p.add_argument("--vae-preset", choices=sorted(models.VAE_PRESETS), default=None,
                   help="VAE preset (default default (small); with --notebook-models VAE_PRESET, else the device's)")
    p.add_argument("--epochs", type=training.at_least(1), help="classifier epochs: default 5 (1)")
    p.add_argument("--batch-size", type=training.at_least(1), help="classifier batch size: default 1024 (256)")
    p.add_argument("--vae-epochs", type=training.at_least(1), help="default 20 (1)")
    p.add_argument("--vae-batch-size", type=training.at_least(1), help=f"default {QUALITY['vae_batch_size']}")
    p.add_argument("--vae-lr", type=training.positive, help=f"default {QUALITY['vae_lr']}")
    p.add_argument("--techniques", type=names_in(fv.TECHNIQUE_NAMES), default=None,
                   help="comma-separated names (default: all; without the latent ones for data of another size than "
                        "the VAE's 32 px)")
    p.add_argument("--transforms", type=names_in(tuple(TRANSFORMS)), default=None,
                   help=f"comma-separated names of {', '.join(TRANSFORMS)}: each technique also renders with its "
                        f"transforms swapped for each of them (a row 'technique/name'; hybrid: its second stage)")
    p.add_argument("--lucent-224", action="store_true", help="also render Lucent at 224 px (slow on CPU)")
    p.add_argument("--png", type=utils.figure_file, default=None,
                   help="comparison grid (default outputs/bench_featureviz_<dataset>[_quick|_notebook].png)")
    p.add_argument("--ckpt-dir", default=None, help="the models' folder (default checkpoints/bench; with "
                   "--notebook-models the notebooks', checkpoints/, or a smoke run's, checkpoints/smoke)")
    p.add_argument("--notebook-models", action="store_true",
                   help="use the notebooks' checkpoints, of their PRESET, VAE_PRESET and SEED")
    p.add_argument("--seed", type=int, help="with --notebook-models: the notebooks' SEED (their train/val split; "
                   "default: SEED, else 0)")
    args = p.parse_args()
    if args.quick and args.notebook_models:
        p.error("argument --quick: trains small models of its own on a slice of the data; --notebook-models loads "
                "the notebooks' (give one of the two)")
    if args.speed and args.notebook_models:
        p.error("argument --speed: times the small CNN's render step on random weights; --notebook-models loads "
                "the notebooks' models for the quality table (give one of the two)")
    if args.seed is not None and not args.notebook_models:
        p.error("argument --seed: the notebooks' SEED, for --notebook-models only")
    mode = "--speed" if args.speed else "--notebook-models" if args.notebook_models else "the quality table"
    for key in UNREAD[mode]:
        if getattr(args, key) not in (None, False):
            p.error(f"argument --{key.replace('_', '-')}: not used by {mode}")
    settings = [("dataset", "DATASET", "cifar10-jpeg", {})]
    if args.notebook_models:  # the notebooks' settings, read as they read them
        device = training.device_defaults()
        settings += [("preset", "PRESET", device["preset"], dict(choices=models.CNN_PRESETS)),
                     ("vae_preset", "VAE_PRESET", device["vae_preset"], dict(choices=models.VAE_PRESETS)),
                     ("seed", "SEED", 0, dict(low=0, high=training.MAX_SEED))]
    training.from_environment(p, args, settings)
    fill_defaults(args, SPEED if args.speed else QUICK if args.quick else QUALITY)
    args.seed = args.seed or 0
    return args


def fill_defaults(args, defaults):
    """Set each option of `defaults` that the command line did not give (None) to its default."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- models

def load_data(args):
    """The dataset (split by the notebooks' SEED with --notebook-models); --quick keeps a small slice of it."""
    d = data.load_data(args.dataset, seed=args.seed)
    if args.quick:
        n = 3000
        d = dataclasses.replace(d, train_x=d.train_x[:n], train_y=d.train_y[:n], val_x=d.val_x[:500],
                                val_y=d.val_y[:500], test_x=d.test_x[:500], test_y=d.test_y[:500])
    return d


def load_models(args, d, latent):
    """(classifier, independent classifier, VAE: None unless `latent` techniques are asked for), trained once
    and reused from checkpoints/bench/, or those the notebooks wrote (--notebook-models)."""
    if args.notebook_models:
        ckpt = Path(args.ckpt_dir or ROOT / "checkpoints")
        hint = (f"run the three notebooks first with DATASET={args.dataset}, PRESET={args.preset}, "
                f"VAE_PRESET={args.vae_preset} and SEED={args.seed}, or give this script theirs (--dataset...)")

        def load(name, seed):
            return training.load_trained(ckpt / name, d, seed, hint=hint)[0]
        vae = load(f"vae_{d.name}_{args.vae_preset}.pt", args.seed) if latent else None
        return (load(f"classifier_{d.name}_{args.preset}.pt", args.seed),
                load(f"independent_{d.name}.pt", args.seed + 1), vae)  # the independent one: the notebook's SEED + 1
    ckpt = Path(args.ckpt_dir or ROOT / "checkpoints" / "bench")
    tag = f"{d.name}{'_quick' if args.quick else ''}"
    widths = models.CNN_PRESETS[args.preset]["widths"]
    other_widths = [w * 3 // 4 if w > 32 else w * 3 // 2 for w in widths]  # an independent architecture
    hyp = dict(epochs=args.epochs, batch_size=args.batch_size)
    model, _ = training.train_classifier(d, ckpt / f"cnn_{args.preset}_{tag}.pt", args.preset, hyp, seed=0)
    other, _ = training.train_classifier(d, ckpt / f"cnn_other_{args.preset}_{tag}.pt", args.preset, hyp,
                                         seed=1, widths=other_widths)
    vae = None
    if latent:
        hyp = dict(epochs=args.vae_epochs, batch_size=args.vae_batch_size, lr=args.vae_lr)
        vae, _ = training.train_vae(d, ckpt / f"vae_{args.vae_preset}_{tag}.pt", args.vae_preset, hyp, seed=0)
    return model, other, vae


# ----------------------------------------------------------------------------- Lucent

LUCENT, LUCENT_FROZEN = "Lucent at 32 px", "Lucent at 32 px, weights frozen"


def lucent_usable(device):
    """Whether Lucent can render for a model on this device: it is importable, and puts its images on CUDA or
    the CPU (on mps they would meet the model on another device); else a note says why it is left out."""
    if lucent_render is None:
        return False
    if device.type not in ("cpu", "cuda"):
        print(f"(Lucent left out: it renders on CUDA or the CPU, and the model is on {device.type})")
        return False
    return True

def lucent_classes(model, classes, steps, size=None, seed=0, channels=3, frozen=False, side=32):
    """Lucent's render of several classes in one batch (summed objectives); images (T, C, side, side), shown to
    the model at `size` (None: Lucent's 224 px). Lucent, as it comes, leaves the weights' gradients on (each step
    computes them too); frozen=True turns them off, as render() does."""
    training.seed_everything(seed)  # Lucent draws from the global RNGs
    model = copy.deepcopy(model)    # Lucent leaves its hooks on the model
    model.requires_grad_(not frozen)
    if len(classes) == 1:
        obj = lucent_objectives.channel("head", classes[0])
    else:
        obj = functools.reduce(operator.add, [lucent_objectives.channel("head", k, batch=i)
                                              for i, k in enumerate(classes)])
    param_f = lambda: lucent_param.image(side, batch=len(classes), channels=channels,  # noqa: E731
                                         decorrelate=channels == 3)
    out = lucent_render.render_vis(model, obj, param_f, thresholds=(steps,), show_image=False,
                                   progress=False, preprocess=False, fixed_image_size=size)
    return torch.as_tensor(out[-1]).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------- quality

def quality(args):
    d = load_data(args)
    on_vae = d.size == models.VAE.image_size  # the latent techniques draw through a 32 px VAE
    args.techniques = args.techniques or [t for t in fv.TECHNIQUE_NAMES if on_vae or t not in fv.LATENT_TECHNIQUES]
    latent = [t for t in args.techniques if t in fv.LATENT_TECHNIQUES]
    if latent and not on_vae:
        sys.exit(f"--techniques: {', '.join(latent)} draw through the VAE, which makes {models.VAE.image_size} px "
                 f"images, and {d.name} is {d.size} px: leave them out")
    model, other, vae = load_models(args, d, bool(latent))  # no VAE for the others (none at 64 px)
    cov = fv.color_covariance(d.train_x)
    every = fv.techniques(vae, cov, fv.magnitude_spectrum(d.train_x[:10000], cov))
    techniques = {name: every[name] for name in args.techniques}
    if args.transforms:
        techniques.update(swapped(techniques, args.transforms))
    if lucent_usable(models.device_of(model)):
        for name, size in [(f"lucent@{d.size}", d.size)] + ([("lucent@224", None)] if args.lucent_224 else []):
            def lucent(targets, seed, size=size):  # classes only
                if not isinstance(targets[0], fv.Class):
                    return None
                return lucent_classes(model, [t.idx for t in targets], args.steps, size, seed, d.channels, side=d.size)
            techniques[name] = lucent
    elif lucent_render is None:
        print(f"(Lucent not importable: {LUCENT_ERROR}; pip install torch-lucent --no-deps kornia==0.4.1 "
              f"decorator to compare)\n")
    rows, grid = metrics.quality_table(model, other, d, techniques, seeds=args.seeds, steps=args.steps)
    for name, acc in [("classifier", training.evaluate(model, d.test_x, d.test_y)["acc"]),
                      ("independent classifier", training.evaluate(other, d.test_x, d.test_y)["acc"])]:
        print(f"{name}: test accuracy {acc:.4f}")
    channels = ", ".join(f"{t.layer}:{t.channel}" for t in metrics.channel_sample(model, size=d.size))
    print(f"\n{d.name}: {len(d.classes)} classes and the channels {channels}, x {args.seeds} seeds, {args.steps} steps"
          f"{' (quick)' if args.quick else ''}\n")
    print(metrics.format_table(rows))
    print_margins({r["technique"]: r for r in rows})
    ranked = metrics.rank_techniques(rows, fv.TECHNIQUE_NAMES)
    print("\nranked by naturalness + path check (the defaults follow it): " + ", ".join(
        f"{r['technique']} ({r['naturalness']:.2f}, {r['path_flagged']:.2f})" for r in ranked))
    save_grid(grid, model, d, args)


TRANSFORMS = dict(STANDARD=fv.STANDARD, AFFINE=fv.AFFINE, LIGHT=fv.LIGHT)


def swapped(techniques, names):
    """'technique/name' -> the technique with its transforms (a two-stage one: its second stage's) swapped
    for TRANSFORMS[name]."""
    def swap(t, n):
        stage = "settings" if t.refine is None else "refine"
        return dataclasses.replace(t, **{stage: {**getattr(t, stage), "transforms": TRANSFORMS[n]}})
    return {f"{name}/{n}": swap(t, n) for name, t in techniques.items() for n in names}


# metric -> (the real row it is compared with, True if a higher value is worse)
MARGINS = dict(naturalness=("real test images", True), path_flagged=("dataset exemplars", True),
               act=("real test images", False), transfer=("real test images", False),
               two_choice=("dataset exemplars", False))
KNOWN_BAD = ("pixel", "shuffled pixels", "uniform noise", "another class")


def print_margins(rows):
    """How much worse each known-bad row scores than the real row, mean ± the two rows' seed-to-seed SDs
    combined (sqrt(sd_bad^2 + sd_real^2), as for independent rows); a margin counts when it exceeds that."""
    print("\n| metric (vs) | " + " | ".join(b for b in KNOWN_BAD if b in rows) + " |")
    print("|---|" + "---|" * sum(b in rows for b in KNOWN_BAD))
    for metric, (real, higher_is_worse) in MARGINS.items():
        cells = []
        for bad in (b for b in KNOWN_BAD if b in rows):
            diff = (1 if higher_is_worse else -1) * (rows[bad][metric] - rows[real][metric])
            spread = (rows[bad][metric + "_sd"] ** 2 + rows[real][metric + "_sd"] ** 2) ** 0.5
            cells.append(f"{diff:+.2f} ± {spread:.2f}{'' if diff > spread else ' (no margin)'}")
        print(f"| {metric} (vs {real}) | " + " | ".join(cells) + " |")


def save_grid(grid, model, d, args):
    """Seed-0 visualizations of every technique, above the top test exemplar of each class."""
    top = fv.exemplars(model, d.test_x, list(range(len(d.classes))), k=1).top[0]  # (classes,)
    rows = {"top exemplar": d.test_x[top]}
    if d.templates is not None:
        rows["planted template"] = d.templates if d.channels == 3 else d.templates[:, :1]
    rows.update(grid)
    run = "_quick" if args.quick else "_notebook" if args.notebook_models else ""  # a full run's grid kept apart
    path = Path(args.png or ROOT / "outputs" / f"bench_featureviz_{d.name}{run}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.comparison_grid(rows, col_labels=[c[:12] for c in d.classes], save=path)
    print(f"\ngrid: {path}")


# ----------------------------------------------------------------------------- speed

def timed(fn):
    """(seconds that fn() takes, with the GPU's queued work included; what fn() returns)."""
    device = training.get_device()  # where the benchmark's models run
    training.synchronize(device)
    start = time.perf_counter()
    result = fn()
    training.synchronize(device)
    return time.perf_counter() - start, result


IMAGE_SPACE = ("pixel", "pixel+reg", "fourier", "maco")


def bare_step(model, classes, steps, bounded=True, recipe=None):
    """The floor a render step can reach: forward, backward and Adam on a batch of free images, one per
    class, with the model frozen as render() freezes it; no parameterization, transforms or bookkeeping.

    bounded: clamp the images to [0, 1] after each step, the range render()'s images keep. Left free,
    the pixels drift to about -15..18 within 256 steps, and the model's own forward and backward get
    slower on such inputs (5-10% on one 2-core machine, 3% on another): a slower floor that flatters
    every ratio.
    recipe: make the images instead with this Fourier parameterization (fv.parameterization('fourier' or
    'maco')), shifted at each step by the default Shift inside its spectrum: the same work as render()'s
    step of that technique, written by hand, so that what render() adds to it is its own bookkeeping.
    """
    with contextlib.ExitStack() as stack:
        step = bare_stepper(stack, model, classes, bounded, recipe)
        for _ in range(steps):
            step()


def bare_stepper(stack, model, classes, bounded=True, recipe=None):
    """step() taking one bare step (bare_step's), the model frozen in a context entered on `stack`."""
    device, n = models.device_of(model), len(classes)
    size, channels = models.input_size(model), models.input_channels(model)
    if recipe is None:
        x = torch.rand(n, channels, *size, device=device, requires_grad=True)
        params, images = [x], lambda: x
    else:
        param, gen = recipe(n, channels, size).to(device), torch.Generator(device=device).manual_seed(0)
        params, images = list(param.parameters()), lambda: param(fv.STANDARD.phase(n, *size, gen, device))
    idx = torch.arange(n, device=device)
    cls = torch.tensor(classes, device=device)
    opt = torch.optim.Adam(params, lr=0.05, fused=True)  # as render() steps
    layout = stack.enter_context(models.frozen(model))

    def step():
        opt.zero_grad(set_to_none=True)
        (-model(layout(images()))[idx, cls].sum()).backward()
        opt.step()
        if bounded and recipe is None:
            x.data.clamp_(0, 1)
    return step


def render_stepper(stack, model, technique, classes, steps):
    """step() taking render()'s next eager step of an image-space technique (one stage, a constant lr, no
    projection) on the classes (at most `steps`), set up by render()'s own fv._prepared (contexts entered
    on `stack`), on its own copy of the model, so that no other run's hooks fire in its passes. What
    render() does around its steps (setup, final pass) is left out: one or two steps' time per render."""
    model = copy.deepcopy(model)
    defaults = {name: p.default for name, p in inspect.signature(fv.render).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings = {**defaults, **technique.settings}  # what render() takes when called with the technique's settings
    size, groups = models.input_size(model), torch.arange(len(classes), device=models.device_of(model))
    terms = fv._resolve(settings["regularizers"], model, size)
    param, one, _, _ = stack.enter_context(fv._prepared(model, fv.as_targets(classes), settings["param"],
                                                        settings["transforms"], terms, groups, size, 0))
    opt = torch.optim.Adam(param.parameters(), lr=settings["lr"], fused=True)
    history, done = torch.zeros(steps, len(classes)), iter(range(steps))

    def step():
        fv._set_lr(opt, settings["lr"])
        history[next(done)] = fv._eager_step(one, opt, lambda: None)
    return step


def lockstep(model, cycles):
    """{run: [seconds of each of its steps]}: the bare step and render()'s steps of each image-space technique
    for 10 classes (fourier and maco also by hand), one step of each in turn, `cycles` times after a
    warm-up of 3, on a CPU: each step can be set against the bare step taken a few milliseconds before
    it, closer than whole rounds allow. A second bare step, last in each cycle, is the control: its
    ratio to the first says how much a run's place in the cycle alone moves it."""
    classes, how = list(range(10)), timing_techniques(models.input_size(model))
    with contextlib.ExitStack() as stack:
        runs = {BARE: bare_stepper(stack, copy.deepcopy(model), classes)}
        for name in IMAGE_SPACE:
            runs[name] = render_stepper(stack, model, how[name], classes, cycles + 3)
            if name in BY_HAND:
                runs[by_hand(name)] = bare_stepper(stack, copy.deepcopy(model), classes,
                                                   recipe=how[name].settings["param"])
        runs[BARE_AGAIN] = bare_stepper(stack, copy.deepcopy(model), classes)
        times = {name: [] for name in runs}
        for cycle in tqdm(range(cycles + 3), desc="lockstep", leave=False):
            for name, step in runs.items():
                start = time.perf_counter()
                step()
                if cycle >= 3:
                    times[name].append(time.perf_counter() - start)
    return times


BARE, DRIFT = "bare forward + backward + Adam", "the same, pixels left to drift"
BARE_AGAIN = "the bare step again, last in each cycle (the control)"
BY_HAND = ("fourier", "maco")  # timed also as the bare step through their images, without render()


def by_hand(name):
    return f"{name} by hand (its images, no render())"


def timing_techniques(size):
    """fv.techniques() with the statistics of random images: any statistics time the same."""
    images = torch.rand(64, 3, *models.image_shape(size), generator=torch.Generator().manual_seed(0))
    cov = fv.color_covariance(images)
    return fv.techniques(color_cov=cov, magnitude=fv.magnitude_spectrum(images, cov))


def per_step(args, model):
    """{run: [seconds per step in each round]} for 10 classes: the bare step, each image-space technique
    (fourier and maco also by hand), args.rounds interleaved rounds in this process."""
    classes, how = list(range(10)), timing_techniques(models.input_size(model))
    runs = {BARE: lambda: bare_step(model, classes, args.steps),
            DRIFT: lambda: bare_step(model, classes, args.steps, bounded=False)}
    for name in IMAGE_SPACE:  # each technique, then the same written by hand where timed so
        runs[name] = lambda t=how[name]: t(model, classes, steps=args.steps, progress=False)
        if name in BY_HAND:
            runs[by_hand(name)] = lambda r=how[name].settings["param"]: bare_step(model, classes, args.steps, recipe=r)
    if lucent_usable(models.device_of(model)):
        runs[LUCENT] = lambda: lucent_classes(model, classes, args.steps, 32)
        runs[LUCENT_FROZEN] = lambda: lucent_classes(model, classes, args.steps, 32, frozen=True)
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in tqdm(runs.items(), desc="round", leave=False):
            times[name].append(timed(fn)[0] / args.steps)
    return times


def speed(args):
    """Time per render step against the bare step (CPU goal: every image-space technique within 1.15x,
    Lucent at 32 px at least 2.5x slower than ours); on a GPU also the absolute goals of full renders.

    A shared machine's speed can drift by up to 40% within seconds, so each ratio is taken within a round
    (a run against the bare step timed just before it) and the table gives the median over rounds
    with the lowest and highest. The fastest round of each row against the bare step's fastest is
    printed too, the usual estimator where noise only slows runs down, though it may pair a fast moment
    of one row with a slower one of another. On a CPU, a lockstep follows (lockstep()): one step of
    each run in turn, each against the bare step a few milliseconds before it, the closest pairing.
    Fourier and maco are also timed by hand (their images in the bare step): render() against those says
    what its own bookkeeping costs, and those against the bare step what the parameterization costs.
    """
    torch.manual_seed(0)
    device = training.get_device()
    model = models.build_model(models.cnn_config(args.preset, image_size=32)).to(device).eval()  # weights do not matter
    times = per_step(args, model)
    ratio = {name: [t / b for t, b in zip(ts, times[BARE])] for name, ts in times.items()}
    fastest = {name: min(ts) / min(times[BARE]) for name, ts in times.items()}
    print(f"\n{args.preset} CNN, 10 classes, {args.steps} steps, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, device {device}\n")
    print("| run | ms per step (median) | / bare step in the same round: median (lowest-highest) | fastest round / "
          "bare's fastest |\n|---|---|---|---|")
    for name, ts in times.items():
        r = ratio[name]
        print(f"| {name} | {1000 * statistics.median(ts):.2f} | {statistics.median(r):.2f}x "
              f"({min(r):.2f}-{max(r):.2f}) | {fastest[name]:.2f}x |")
    for name in (LUCENT, LUCENT_FROZEN) if LUCENT in times else ():
        lucent = [a / b for a, b in zip(times[name], times["fourier"])]
        print(f"\n{name} / our fourier in the same round: median {statistics.median(lucent):.2f}x "
              f"({min(lucent):.2f}-{max(lucent):.2f}{'; goal >= 2.5x' if name == LUCENT else ''})")
    if LUCENT not in times:
        print(f"(Lucent not run: {LUCENT_ERROR if lucent_render is None else 'it renders on CUDA or the CPU only'})")
    for name in BY_HAND if device.type == "cpu" else ():  # on a GPU render() replays a CUDA graph, by hand not
        own = [a / b for a, b in zip(times[name], times[by_hand(name)])]  # what render() adds to the same work
        print(f"{name}: render() / by hand in the same round: median {statistics.median(own):.2f}x "
              f"({min(own):.2f}-{max(own):.2f})")
    if device.type == "cpu" and args.preset != "small":
        print(f"(the CPU goal is the small CNN's: --preset small to check it; this run is {args.preset}'s)")
    elif device.type == "cpu":  # the goal is a CPU's: on a GPU the bare step is no floor (launches dominate)
        for label, of in (("medians", {n: statistics.median(r) for n, r in ratio.items()}), ("fastest rounds", fastest)):
            met = all(of[n] <= 1.15 for n in IMAGE_SPACE)
            print(f"goal: every image-space technique within 1.15x of the bare step ({label}): "
                  f"{'met' if met else 'NOT met'}")
        print_lockstep(lockstep(model, args.steps * args.rounds))
    if device.type == "cuda":
        gpu_goals()


def print_lockstep(times):
    """The lockstep's table: each technique's steps against the bare step taken just before each."""
    cycles = len(times[BARE])
    print(f"\nStep by step: {cycles} cycles of one step of each run in turn (render()'s steps without its setup)\n")
    print("| run | ms per step (median) | / the bare step just before it: median over the steps (quartiles) |\n"
          "|---|---|---|")
    medians = {}
    for name, ts in times.items():
        r = [t / b for t, b in zip(ts, times[BARE])]
        q1, medians[name], q3 = statistics.quantiles(r, n=4) if len(r) > 1 else r * 3  # one cycle: no quartiles
        print(f"| {name} | {1000 * statistics.median(ts):.2f} | {medians[name]:.3f}x ({q1:.3f}-{q3:.3f}) |")
    met = all(medians[n] <= 1.15 for n in IMAGE_SPACE)
    print(f"goal: every image-space technique within 1.15x of the bare step (step by step): "
          f"{'met' if met else 'NOT met'}")


def gpu_goals():
    """Absolute GPU figures (airbench model): CUDA graph against eager, and how far their images differ
    beside how far two eager renders differ (a GPU kernel may be nondeterministic, and the ascent
    magnifies the last bit of a difference)."""
    model = models.build_model(models.cnn_config("airbench", image_size=32)).cuda().eval()
    fourier = fv.techniques()["fourier"]
    channels = [fv.Channel(layer, c) for layer in ("block2.act2", "block3.act2")
                for c in range(models.layer_channels(model, layer))]
    jobs = [("10 classes, fourier, 256 steps", list(range(10)), 0.3),
            (f"all {len(channels)} channels of block2.act2 + block3.act2, fourier, 256 steps", channels, 2.0)]
    print("\n| GPU run | eager s | CUDA graph s | goal s (the graph's) | max image difference: graph vs eager | "
          "eager vs eager |\n|---|---|---|---|---|---|")
    for label, targets, goal in jobs:
        seconds, images = {}, {}
        for run, graphs in [("eager", False), ("graph", True), ("eager again", False)]:
            fv.CUDA_GRAPHS = graphs
            fourier(model, targets, steps=8, progress=False)  # warm-up
            with warnings.catch_warnings(record=True) as caught:  # a capture that fails warns and runs eagerly
                warnings.simplefilter("always")
                seconds[run], r = timed(lambda: fourier(model, targets, steps=256, progress=False))
            if any("CUDA graph" in str(w.message) for w in caught):
                raise RuntimeError(f"{label}: the CUDA graph was not captured, so its time would be an eager one: "
                                   f"{[str(w.message) for w in caught]}")
            images[run] = r.images
        diff = {pair: (images[pair[0]] - images[pair[1]]).abs().max().item()
                for pair in [("graph", "eager"), ("eager again", "eager")]}
        print(f"| {label} | {seconds['eager']:.3f} | {seconds['graph']:.3f} | "
              f"{goal}: {'met' if seconds['graph'] <= goal else 'NOT met'} | "
              f"{diff['graph', 'eager']:.2e} | {diff['eager again', 'eager']:.2e} |")
    fv.CUDA_GRAPHS = True


if __name__ == "__main__":
    args = parse_args()
    speed(args) if args.speed else quality(args)
