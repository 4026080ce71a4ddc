"""What the parts of a render step cost on their own: microseconds per call on 10 images of 3 x 32 x 32.

    python benchmarks/bench_step_parts.py              # eager parts
    python benchmarks/bench_step_parts.py --compile    # + the image terms' gradients under torch.compile
    python benchmarks/bench_step_parts.py --in-step    # what each technique adds inside whole render steps

bench_featureviz.py --speed times whole steps against a bare step; this one says where the rest goes:
pixel+reg's resampling (forward, and grid_sample's backward), the image terms' closed-form gradients,
the default Shift's phase ramps, the Fourier parameterization's inverse FFT, colour mixing and
sigmoid (forward and backward, with the channels_last gradient our model gives its images on a CPU;
also as the bmm it was before), and Adam's step, fused or not.
Each part is timed alone, with its inputs hot in the caches: inside a step it costs more. --in-step
measures that instead: torch.profiler over whole renders of 10 classes on the untrained `small` model,
each op's self time per step in each image-space technique minus its time in `pixel` without
transforms (the bare step's work), the median over interleaved rounds; the model's heavy kernels are
left out, as their run-to-run spread is larger than what the techniques add.
"""
import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import featureviz as fv  # noqa: E402
import models  # noqa: E402
from bench_featureviz import IMAGE_SPACE, timing_techniques  # noqa: E402


def per_call(runs, calls=300, rounds=10):
    """{name: microseconds per call of runs[name]()}: the median over `rounds` rounds of `calls` calls, the runs
    interleaved in each round (a machine's speed drifts within seconds), after a warm-up."""
    for fn in runs.values():
        for _ in range(100):
            fn()
    us = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            us[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(times) for name, times in us.items()}


def backward_of(forward, x, grad):
    """fn() running forward(x) and its backward into x (x requires grad)."""
    def fn():
        forward(x).backward(grad)
        x.grad = None
    return fn


def adam_step(x, fused):
    """fn() taking one Adam step on a copy of x (its gradient set once), fused or as the default's ops."""
    leaf = x.clone().requires_grad_()
    leaf.grad = torch.rand_like(x)
    return torch.optim.Adam([leaf], lr=0.05, fused=fused).step


def parts(n=10, side=32):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, side, side, generator=gen)
    leaf = x.clone().requires_grad_()
    grad = torch.rand(n, 3, side, side, generator=gen)
    grad_cl = grad.contiguous(memory_format=torch.channels_last)  # as our model's backward hands it to its images
    color = fv.color_sqrt(fv.color_covariance(x), 3)
    mixing = fv._mixing(color)
    spec = torch.randn(n, 3, side, side // 2 + 1, dtype=torch.complex64, generator=gen).requires_grad_()
    terms = fv.techniques()["pixel+reg"].settings["regularizers"]
    affine, scale = functools.partial(fv.AFFINE, gen=gen), fv.fourier_scale(side)
    return {
        "resample (AFFINE, pixel+reg's), forward": lambda: fv.AFFINE(x, gen),
        "resample (AFFINE, pixel+reg's), forward + backward": backward_of(affine, leaf, grad),
        "Shift (STANDARD) inside the spectrum: its phase ramps and scale x exp(i ramp)": lambda: fv._polar(
            scale, fv.STANDARD.phase(n, side, side, gen, x.device)),
        **{f"{type(t).__name__} gradient": (lambda t=t: t.gradient(x)) for t in terms},
        "pixel+reg's penalty gradients, summed": lambda: fv._image_terms_gradient(terms, x),
        "Blur gradient (not in pixel+reg)": lambda: fv.Blur(4.0).gradient(x),
        "inverse FFT, forward + backward": backward_of(
            lambda s: torch.fft.irfft2(s, s=(side, side), norm="ortho"), spec, grad),
        "colour mixing (one product, 4 pixels a row at this size, as fourier does it) + sigmoid, forward + backward": backward_of(
            lambda v: fv._to_image(mixing, v), leaf, grad_cl),
        "colour mixing as one (N*H*W, C) x (C, C) product + sigmoid, forward + backward": backward_of(
            lambda v: fv._to_image(color.T, v), leaf, grad_cl),  # one block: one pixel a row
        "colour mixing as a bmm over (C, H*W) planes + sigmoid, forward + backward": backward_of(
            lambda v: torch.sigmoid(torch.bmm(color.expand(n, -1, -1), v.flatten(2)).view_as(v)), leaf, grad_cl),
        "sigmoid alone, forward + backward": backward_of(torch.sigmoid, leaf, grad_cl),
        "Adam step, the default (a for-loop of ops on a CPU)": adam_step(x, fused=False),
        "Adam step, fused (as render() and the bare step take it)": adam_step(x, fused=True),
    }, (terms, x)


def profiled(fn, steps):
    """{op: self CPU microseconds per step} over one call of fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}


def in_step(steps=64, rounds=3, top=12):
    """Print each technique's extra self time per step over `pixel` without transforms, by op."""
    model = models.build_model(models.cnn_config("small", image_size=32)).eval()  # weights do not matter
    how, added = timing_techniques(32), [name for name in IMAGE_SPACE if name != "pixel"]
    runs = {name: how[name] for name in ("pixel", *added)}
    samples = collections.defaultdict(list)  # (run, op) -> [us per step in each round]
    for fn in runs.values():  # warm-up
        fn(model, list(range(10)), steps=4, progress=False)
    for _ in range(rounds):
        for name, fn in runs.items():
            for op, us in profiled(lambda: fn(model, list(range(10)), steps=steps, progress=False), steps).items():
                samples[name, op].append(us)
    ops = {op for _, op in samples}
    # an op absent from a round took 0 us in it
    cost = {(name, op): statistics.median(samples[name, op] + [0.0] * (rounds - len(samples[name, op])))
            for name in runs for op in ops}
    heavy = sorted(op for op in ops if cost["pixel", op] > 100)  # the model's kernels: their spread hides the rest
    ops -= set(heavy)
    extra = {name: {op: cost[name, op] - cost["pixel", op] for op in ops} for name in added}
    worst = sorted(ops, key=lambda op: -max(extra[name][op] for name in added))[:top]
    print(f"\n{steps} steps, {rounds} interleaved rounds; self CPU us per step over `pixel` without transforms, "
          f"leaving out the ops over 100 us per step there ({', '.join(heavy)}): from run to run they move "
          f"by more than these rows. The profiler adds a small cost to every op it records, so a technique of "
          f"many small ops (fourier, maco, pixel+reg) shows more here than it costs unprofiled: compare these "
          f"rows with one another, and the step's cost with bench_featureviz.py --speed\n")
    print("| op | " + " | ".join(added) + " |\n" + "|---" * (len(added) + 1) + "|")
    sums = " | ".join(f"{sum(extra[n].values()):+.0f}" for n in added)
    print(f"| sum over all these ops: the rows below and the rest | {sums} |")
    for op in worst:
        print(f"| {op} | " + " | ".join(f"{extra[n][op]:+.0f}" for n in added) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compile", action="store_true", help="also time the summed gradients under torch.compile")
    p.add_argument("--in-step", action="store_true", help="also profile whole render steps of each technique")
    args = p.parse_args()
    runs, (terms, x) = parts()
    print(f"{torch.get_num_threads()} threads, 10 images of 3 x 32 x 32\n\n| part | us per call (median of 10 "
          f"interleaved rounds of 300 calls) |\n|---|---|")
    for name, us in per_call(runs).items():
        print(f"| {name} | {us:.1f} |")
    if args.compile:
        compiled = torch.compile(fv._image_terms_gradient)
        start = time.perf_counter()
        compiled(terms, x)
        took = time.perf_counter() - start
        assert torch.allclose(compiled(terms, x), fv._image_terms_gradient(terms, x), atol=1e-6)
        print(f"| pixel+reg's penalty gradients, summed, torch.compile ({took:.0f} s to compile) | "
              f"{per_call({'compiled': lambda: compiled(terms, x)})['compiled']:.1f} |")
    if args.in_step:
        in_step()


if __name__ == "__main__":
    main()
