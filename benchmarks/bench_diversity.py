"""The sweep behind Diversity's default weight: several images per class and per channel, at each weight.

    python benchmarks/bench_diversity.py                  # the notebooks' checkpoints (run them first)
    python benchmarks/bench_diversity.py --weights 0,1,3 --images 6 --technique fourier --seeds 1

For every weight, the technique renders --images images of each of the 10 classes and of each channel
of a fixed sample (metrics.channel_sample: two per block) and prints, averaged over the units:
diversity (mean pairwise distance in the independent classifier's features) against the reference
(random real test images of the class; a channel's top exemplars), the lowest and the mean normalized
activation (1.0 = the best real image), and the naturalness metrics of the quality table
(naturalness, share flagged by the path check) for the classes, which must not get worse than at 0.
Each figure is a mean over --seeds render seeds (the naturalness metrics with their SD over the seeds);
the lowest activation is the lowest of any image of any seed.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import featureviz as fv  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402


def notebook_options(description):
    """A parser with the options that find the notebooks' classifier checkpoints: --dataset, --ckpt-dir, --preset,
    --seed (notebook_settings fills in those left out)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", help="a dataset name or image-folder path (data.load_data; default: DATASET, "
                   "else cifar10-jpeg)")
    p.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints"), help="where the notebooks' checkpoints are")
    p.add_argument("--preset", choices=sorted(models.CNN_PRESETS),
                   help="the notebooks' classifier preset (default: PRESET, else this device's)")
    p.add_argument("--seed", type=int, help="the notebooks' SEED (their train/val split; default: SEED, else 0)")
    return p


def notebook_settings(p, args):
    """The notebook options left out, from the environment as the notebooks read it, else their defaults."""
    training.from_environment(p, args, [
        ("dataset", "DATASET", "cifar10-jpeg", {}),
        ("preset", "PRESET", training.device_defaults()["preset"], dict(choices=models.CNN_PRESETS)),
        ("seed", "SEED", 0, dict(low=0, high=training.MAX_SEED))])


def parse_args():
    p = notebook_options(__doc__.split("\n")[0])
    p.add_argument("--weights", type=weights, default="0,0.5,1,1.25,1.5,2,3", help="comma-separated Diversity weights")
    p.add_argument("--images", type=training.at_least(2), default=6,
                   help=f"images per unit, 2 to {3 * metrics.R} (a channel's exemplars: its top {3 * metrics.R})")
    p.add_argument("--technique", default="fourier", choices=("pixel", "pixel+reg", "fourier", "maco"))
    p.add_argument("--steps", type=training.at_least(1), default=256)
    p.add_argument("--seeds", type=training.at_least(1), default=3,
                   help="render seeds per weight: means over them, the lowest of all")
    args = p.parse_args()
    if args.images > 3 * metrics.R:
        p.error(f"argument --images: at most {3 * metrics.R}, a channel's top exemplars, got {args.images}")
    notebook_settings(p, args)
    return args


def weights(text):
    """An argparse type: comma-separated non-negative numbers, as a list of floats."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = [-1.0]
    if not all(v >= 0 for v in values):  # NaN fails too
        raise argparse.ArgumentTypeError(f"give comma-separated numbers >= 0, such as 0,1,3; got {text!r}")
    return values


def load(args):
    d, ckpt, seed = data.load_data(args.dataset, seed=args.seed), Path(args.ckpt_dir), args.seed  # their split
    hint = (f"run the notebooks first with DATASET={args.dataset}, PRESET={args.preset} and SEED={seed}, or give "
            f"this script theirs (--dataset...)")
    model = training.load_trained(ckpt / f"classifier_{d.name}_{args.preset}.pt", d, seed, hint=hint)[0]
    other = training.load_trained(ckpt / f"independent_{d.name}.pt", d, seed + 1, hint=hint)[0]  # as the notebook
    return d, model, other


def reference_diversity(f, pools, k, draws=5):
    """Mean over units of the diversity of k images drawn from each unit's pool of test-image indices
    (f: the features of the test images)."""
    gen, out = torch.Generator().manual_seed(0), []
    for pool in pools:
        picks = [pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(draws)]
        out.append(sum(metrics.feature_diversity(f[idx], torch.zeros(k, dtype=torch.long)) for idx in picks) / draws)
    return sum(out) / len(out)


def main():
    args = parse_args()
    d, model, other = load(args)
    cov = fv.color_covariance(d.train_x[:10000])
    how = fv.techniques(color_cov=cov, magnitude=fv.magnitude_spectrum(d.train_x[:10000], cov))[args.technique]
    channels = metrics.channel_sample(model, size=d.size)
    ref = metrics.Reference(model, other, d, channels, n_ref=10000)
    k, n_cls = args.images, len(d.classes)
    real_cls = reference_diversity(ref.f_test, [(d.test_y == c).nonzero()[:, 0] for c in range(n_cls)], k)
    one_group = torch.zeros(k, dtype=torch.long)
    real_ch = sum(metrics.feature_diversity(ref.f_test[ref.top[n_cls + j, :k]], one_group)
                  for j in range(len(channels))) / len(channels)
    print(f"{d.name}, {args.technique}, {k} images per unit, {args.steps} steps; reference diversity: "
          f"{real_cls:.2f} (random real images of a class), {real_ch:.2f} (a channel's top {k} exemplars)\n")
    print("| weight | class diversity | lowest / mean class act. | naturalness | path flagged | "
          "channel diversity | lowest / mean channel act. |\n|---|---|---|---|---|---|---|")
    for w in args.weights:
        c = measure(how, model, other, ref, ref.units[:n_cls], 0, w, args)
        h = measure(how, model, other, ref, channels, n_cls, w, args)
        print(f"| {w:g} | {c['div'][0]:.2f} | {c['low']:.2f} / {c['mean'][0]:.2f} | {spread(c['nat'])} | "
              f"{spread(c['path'])} | {h['div'][0]:.2f} | {h['low']:.2f} / {h['mean'][0]:.2f} |", flush=True)


def spread(mean_sd):
    """"mean ± SD", or the mean alone where one seed gives no SD."""
    mean, sd = mean_sd
    return f"{mean:.2f}" + ("" if sd != sd else f" ± {sd:.2f}")


def measure(how, model, other, ref, units, offset, w, args):
    """Per seed, the diversity, the mean normalized activation and (for the classes, offset 0) the
    naturalness metrics of args.images images per unit at weight w, as {key: (mean, SD over seeds: NaN for one)};
    and "low", the lowest normalized activation of any image of any seed. offset: the units' first row in ref."""
    seeds, low = [], float("inf")
    for seed in range(args.seeds):
        terms = [*how.settings.get("regularizers", ()), fv.Diversity(w)]  # the technique's own terms kept
        r = how(model, units, steps=args.steps, images_per_target=args.images, regularizers=terms, seed=seed,
                progress=False)
        # NaN for a unit that no real image excites
        act = metrics.normalized_activation(r.activation, ref.real[:, r.target_index + offset])
        row = dict(div=metrics.diversity(other, r.images, r.target_index), mean=act.nanmean().item())
        if offset == 0:
            row["nat"] = metrics.knn_ratio(ref.stats(r.images), r.target_index, ref.stats.train, ref.train_y,
                                           ref.held, ref.held_y)
            row["path"] = ref.path_check(r.images, r.target_index)[0]
        seeds.append(row)
        low = min(low, act.nan_to_num(float("inf")).min().item())
    out = {key: torch.tensor([float(row[key]) for row in seeds]) for key in seeds[0]}
    return dict(low=low, **{key: (v.mean().item(), v.std().item() if len(v) > 1 else math.nan)
                            for key, v in out.items()})


if __name__ == "__main__":
    main()
