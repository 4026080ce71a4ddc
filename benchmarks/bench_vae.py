"""VAE benchmark: test bits/dim against training time, per preset.

    python benchmarks/bench_vae.py --preset small --epochs 10     # CIFAR-10 (JPEG copy in DATA_DIR)
    python benchmarks/bench_vae.py --dataset fashion-mnist --epochs 3

Prints one row per epoch (cumulative seconds of training and validation, validation bits/dim) and the final test
bits/dim; saves the curve to outputs/figures/vae_bpd_vs_time.png.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=training.setting("DATASET", "cifar10-jpeg"),
                   help="a dataset name or image-folder path (data.load_data; default: DATASET, else cifar10-jpeg)")
    p.add_argument("--epochs", type=training.positive, default=8)
    p.add_argument("--preset", default="default", choices=sorted(models.VAE_PRESETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ckpt", default=None, help="default checkpoints/bench/vae_<dataset>_<preset>.pt")
    p.add_argument("--png", type=utils.figure_file,
                   default=str(ROOT / "outputs" / "figures" / "vae_bpd_vs_time.png"))
    p.add_argument("--mixtures", type=training.at_least(1), default=models.MIXTURES,
                   help="logistic components per pixel")
    args = p.parse_args()

    d = data.load_data(args.dataset, args.data_dir)
    ckpt_path = args.ckpt or ROOT / "checkpoints" / "bench" / f"vae_{d.name}_{args.preset}.pt"
    start = time.perf_counter()
    vae, ckpt = training.train_vae(d, ckpt_path, preset=args.preset, hyp=dict(epochs=args.epochs), retrain=True,
                                   progress=False, mixtures=args.mixtures)
    wall = time.perf_counter() - start
    test = training.evaluate_vae(vae, d.test_x)
    print(f"{d.name}, VAE preset {args.preset} ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params), "
          f"{args.mixtures} logistic(s) per pixel, {args.epochs} epochs, {torch.get_num_threads()} threads, device {training.get_device()}")
    print("| epoch | seconds, training and validation (cumulative) | val bits/dim |")
    print("|---|---|---|")
    elapsed = 0.0
    points = []
    for row in ckpt["history"]:
        elapsed += row["seconds"]
        points.append((elapsed, row["val_bpd"]))
        print(f"| {row['epoch']} | {elapsed:.0f} | {row['val_bpd']:.3f} |")
    print(f"test bits/dim: {test['bpd']:.3f} (reconstruction {test['nll']:.0f} + KL {test['kl']:.1f} nats/image); "
          f"wall time {wall:.0f} s including validation and latent statistics")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t / 60 for t, _ in points], [b for _, b in points], marker="o")
    ax.set_xlabel(f"training time (minutes, {training.get_device().type})")
    ax.set_ylabel("validation bits/dim")
    ax.set_title(f"VAE ({args.preset}, {args.mixtures} logistic(s) per pixel) on {d.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(Path(args.png), lambda tmp: fig.savefig(tmp, format=Path(args.png).suffix[1:] or "png", dpi=80))


if __name__ == "__main__":
    main()
