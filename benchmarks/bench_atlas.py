"""Atlas benchmark: the whole atlas of the notebooks' classifier, built from scratch, and its time.

    python benchmarks/bench_atlas.py --dataset cifar10-jpeg     # after the three notebooks

Builds into outputs/atlas_bench/ (emptied first, so nothing is reused; a folder given with --out is
emptied only if it holds an atlas): every channel of every block's last spatial layer and the classes,
under both techniques, and the activation atlas of the last layer under the first, at 256 steps (STEPS or
--steps, if set, changes them: the goals are at 256). Goals:
the CPU default model (`compact`) in at most 15 minutes on 2 CPU cores; `airbench` in at most 1 minute on a
GPU. Then, where Playwright and Chromium are
installed, a screenshot of the last layer's page goes to screenshot.png in that folder (copy it to
docs/atlas_layer.png to update the README's).
"""
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import atlas  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402


def main():
    args = atlas.arguments(__doc__.split("\n")[0])
    out = Path(args.out).expanduser()
    # never the notebooks' own atlas, from any folder (the default --out, relative, means theirs too)
    if args.out == str(atlas.ATLAS_DIR) or out.resolve() == (ROOT / atlas.ATLAS_DIR).resolve():
        out = ROOT / "outputs" / "atlas_bench"
    try:
        atlas.saved_manifest(out)  # emptied below: only an atlas's folder, or a new or empty one
    except (OSError, ValueError) as e:
        sys.exit(f"--out: {e}")
    model, d, vae = atlas.notebook_models(args.dataset, args.data_dir, args.preset, args.vae_preset, args.techniques,
                                          args.seed, args.checkpoints)
    if out.is_dir():  # from scratch: the atlas's own files go (a file of the user's stays, as build_atlas keeps it)
        atlas._empty(out)
        (out / atlas.MANIFEST).unlink(missing_ok=True)
    layers = models.block_layers(model, d.size)
    channels = sum(models.layer_channels(model, layer, d.size) for layer in layers)
    start = time.perf_counter()
    atlas.build_atlas(model, d, vae, args.techniques, out, steps=args.steps)
    took = time.perf_counter() - start
    device = training.get_device()
    print(f"atlas of {args.preset} on {d.name}: {channels} channels in {len(layers)} layers + {len(d.classes)} "
          f"classes + the activation atlas, techniques {', '.join(args.techniques)}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, {device}: {took:.0f} s ({took / 60:.1f} min); "
          f"{verdict(args, device, took)}")
    screenshot(out / f"layer-{atlas.safe(layers[-1])}.html", out / "screenshot.png")


def verdict(args, device, seconds):
    """The goal this run is measured against, met or not; none for a run unlike the goal's (its preset, steps,
    or 2 CPU threads)."""
    gpu = device.type == "cuda"
    preset, minutes = ("airbench", 1) if gpu else ("compact", 15)
    cpu = device.type == "cpu" and torch.get_num_threads() == 2  # an Apple GPU's run is neither goal's
    if args.preset != preset or args.steps != 256 or not (gpu or cpu):
        return f"the goal is {minutes} min for {preset} at 256 steps{'' if gpu else ' on 2 CPU threads'}: not this run"
    return f"goal {minutes} min: {'met' if seconds <= 60 * minutes else 'NOT met'}"


def screenshot(page_path, png):
    """A screenshot of the top of one atlas page, in headless Chromium (skipped without it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")  # the package's name on some systems
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("(no screenshot: needs Playwright and Chromium)")
        return
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=dict(width=1280, height=900))
        page.goto(page_path.resolve().as_uri())
        page.screenshot(path=str(png))
        browser.close()
    print(f"screenshot: {png}")


if __name__ == "__main__":
    main()
