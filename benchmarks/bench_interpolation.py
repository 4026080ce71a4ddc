"""Interpolations between two channels with and without a shared spectrum: how alike neighbouring frames are.

    python benchmarks/bench_interpolation.py              # the notebooks' classifier (run them first)
    python benchmarks/bench_interpolation.py --pairs 2 --seeds 1 --frames 7

For each block's last spatial layer (models.block_layers), --pairs pairs of its channels
(metrics.channel_sample) are each walked from one channel to the other in --frames images,
(1 - t) * a + t * b in one batch, with the `fourier` technique's parameterization, once with each image's
spectrum its own and once with shared=True (one part common to the batch). Printed per layer, as means over
the pairs and --seeds render seeds: the correlation of neighbouring frames (Pearson's, over their pixels),
each frame's activation of its own mix, and the share of walks whose ends each excite their own channel more
than the other end does (ends_apart).
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import atlas  # noqa: E402
import featureviz as fv  # noqa: E402
import metrics  # noqa: E402
import training  # noqa: E402
from bench_diversity import notebook_options, notebook_settings  # noqa: E402


def parse_args():
    p = notebook_options(__doc__.split("\n")[0])
    p.add_argument("--pairs", type=training.at_least(1), default=3, help="pairs of channels per layer")
    p.add_argument("--frames", type=training.at_least(3), default=5, help="images from one channel to the other")
    p.add_argument("--steps", type=training.at_least(1), default=256)
    p.add_argument("--seeds", type=training.at_least(1), default=2, help="render seeds per pair")
    args = p.parse_args()
    notebook_settings(p, args)
    return args


def neighbour_correlation(images):
    """(N - 1,) Pearson's correlation of each image with the next, over all their pixels."""
    x = images.flatten(1) - images.flatten(1).mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return (x[:-1] * x[1:]).sum(1)


def ends_apart(model, images, a, b):
    """Whether the first image excites channel a more than the last does, and the last b more than the first."""
    acts = fv.activations(model, images[[0, -1]], [a, b])
    return bool(acts[0, 0] > acts[1, 0] and acts[1, 1] > acts[0, 1])


def main():
    args = parse_args()
    model, d, _ = atlas.notebook_models(args.dataset, None, args.preset, None, [], args.seed, args.ckpt_dir)
    recipe = fv.techniques(color_cov=fv.color_covariance(d.train_x[:10000]))["fourier"].settings["param"]  # as theirs
    params = {shared: recipe.with_options(shared=shared) for shared in (False, True)}
    walk = torch.linspace(0, 1, args.frames).tolist()
    sample = metrics.channel_sample(model, per_block=2 * args.pairs, size=d.size)
    print("| layer | neighbour correlation, own | shared | mean activation, own | shared | ends apart, own | shared |\n"
          "|---|---|---|---|---|---|---|")
    for layer in dict.fromkeys(c.layer for c in sample):
        channels = [c for c in sample if c.layer == layer]
        if len(channels) < 2:  # a layer of one channel has nothing to walk between
            continue
        found = {shared: ([], [], []) for shared in params}
        for a, b in zip(channels[::2], channels[1::2]):  # a layer of fewer channels gives fewer pairs
            frames = [(1 - t) * a + t * b for t in walk]
            for seed in range(args.seeds):
                for shared, param in params.items():
                    r = fv.render(model, frames, param=param, steps=args.steps, seed=seed, progress=False)
                    found[shared][0].append(neighbour_correlation(r.images).mean())
                    found[shared][1].append(r.activation.mean())
                    found[shared][2].append(torch.tensor(float(ends_apart(model, r.images, a, b))))
        (own, own_act, own_apart), (shared, shared_act, shared_apart) = (
            [torch.stack(v).mean().item() for v in found[s]] for s in (False, True))
        print(f"| {layer} | {own:.2f} | {shared:.2f} | {own_act:.2f} | {shared_act:.2f} | {own_apart:.0%} | "
              f"{shared_apart:.0%} |")


if __name__ == "__main__":
    main()
