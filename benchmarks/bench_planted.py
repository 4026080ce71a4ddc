"""Planted-feature recovery on the harder synthetic set, for our CNN and for a plain nn.Sequential.

    python benchmarks/bench_planted.py                 # 4 seeds, every technique, both models
    python benchmarks/bench_planted.py --seeds 2 --techniques fourier,maco --quick

The set (data.make_synthetic_hard): each class is a Gabor patch (colour axis, orientation, wavelength)
at a random position, phase and scale over a textured background, with faint patches of two other
classes. A visualization of class k recovers its feature when metrics.PlantedDetector, which does not
care where the patch is or how large, finds class k in it. The detector's accuracy on real test images
is printed first: it is what a perfect visualization could reach.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import featureviz as fv  # noqa: E402
import metrics  # noqa: E402
import training  # noqa: E402
from bench_featureviz import fill_defaults, names_in  # noqa: E402
from training import at_least  # noqa: E402


# the counts' defaults, and --quick's, for the counts not given
DEFAULTS = dict(seeds=4, steps=256, epochs=4, plain_epochs=12, vae_epochs=10)
QUICK = dict(seeds=2, steps=16, epochs=1, plain_epochs=1, vae_epochs=1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=at_least(2), help="at least 2, for a spread: default 4 (2 with --quick)")
    p.add_argument("--steps", type=at_least(1), help="default 256 (16 with --quick)")
    p.add_argument("--techniques", type=names_in(fv.TECHNIQUE_NAMES), default=",".join(fv.TECHNIQUE_NAMES),
                   help="comma-separated names")
    p.add_argument("--models", type=names_in(("ours", "plain")), default="ours,plain",
                   help="which of the two models: ours, plain")
    p.add_argument("--epochs", type=at_least(1), help="epochs of our classifier: default 4 (1 with --quick)")
    p.add_argument("--plain-epochs", type=at_least(1), help="epochs of the nn.Sequential: default 12 (1 with --quick)")
    p.add_argument("--vae-epochs", type=at_least(1),
                   help="trained only for the latent techniques: default 10 (1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: small data, 1 epoch, few steps")
    p.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints" / "bench"))
    args = p.parse_args()
    fill_defaults(args, QUICK if args.quick else DEFAULTS)
    return args


def sequential(channels=3, classes=10):
    """A plain CNN that is not one of ours: three conv-BN-ReLU-pool stages, then two linear layers."""
    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stage(channels, 32), *stage(32, 64), *stage(64, 64), nn.AdaptiveMaxPool2d(1),
                         nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes))


def train_plain(model, d, epochs, seed=0):
    """Adam and cross-entropy with flip and translate augmentation: the plain recipe of any tutorial."""
    training.seed_everything(seed)
    device = training.get_device()  # where train_classifier puts ours and the VAE: the techniques need one device
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = data.Loader(d.train_x, d.train_y, 128, shuffle=True, augment=True, seed=seed, device=device)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main():
    args = parse_args()
    n_train, n_test = (3000, 500) if args.quick else (10000, 2000)
    d = data.load_data("synthetic-hard", n_train=n_train, n_test=n_test)
    detector = metrics.PlantedDetector(d.train_x[:2000])
    noise = torch.randint(0, 256, d.test_x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for label, images in (("real test images", d.test_x), ("the test images' pixels shuffled (must fail)",
                                                           metrics._shuffled(d.test_x, 0)),
                          ("uniform noise (must fail)", noise)):
        print(f"detector on {label}: {(detector(images) == d.test_y).float().mean().item():.3f} right (chance 0.1)")
    ckpt = Path(args.ckpt_dir) / ("quick" if args.quick else "full")
    build = dict(ours=lambda: training.train_classifier(d, ckpt / "cnn_small_hard.pt", "small",
                                                        dict(epochs=args.epochs, batch_size=256))[0],
                 plain=lambda: train_plain(sequential(), d, args.plain_epochs))
    nets = {name: build[name]() for name in args.models}
    vae = None
    if set(args.techniques) & set(fv.LATENT_TECHNIQUES):
        vae, _ = training.train_vae(d, ckpt / "vae_small_hard.pt", "small",
                                    dict(epochs=args.vae_epochs, batch_size=64, lr=3e-3, kl_warmup_epochs=1))
    cov = fv.color_covariance(d.train_x)
    every = fv.techniques(vae, cov, fv.magnitude_spectrum(d.train_x, cov))
    labels = dict(ours="our small CNN", plain="nn.Sequential")
    print("\n| technique | " + " | ".join(f"{labels[m]} (test acc {training.evaluate(net, d.test_x, d.test_y)['acc']:.2f})"
                                          for m, net in nets.items()) + " |")
    print("|---|" + "---|" * len(nets))
    classes = list(range(len(d.classes)))
    for name in args.techniques:
        cells = []
        for net in nets.values():
            found = torch.tensor([(detector(every[name](net, classes, steps=args.steps, seed=s, size=d.size,
                                                        progress=False).images) == torch.tensor(classes)).sum().item()
                                  for s in range(args.seeds)], dtype=torch.float)
            cells.append(f"{found.mean():.1f} ± {found.std():.1f} / 10")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{args.seeds} seeds x 10 classes, {args.steps} steps; recovered features out of 10, mean ± SD over seeds")


if __name__ == "__main__":
    main()
