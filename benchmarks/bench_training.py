"""Training benchmarks: accuracy and wall time on a dataset, and data-path throughput ratios.

    python benchmarks/bench_training.py accuracy --preset compact --epochs 10    # CIFAR-10 (JPEG copy in DATA_DIR)
    python benchmarks/bench_training.py accuracy --dataset fashion-mnist --epochs 2.4
    python benchmarks/bench_training.py throughput               # our loader vs bare steps vs DataLoader+PIL
    python benchmarks/bench_training.py precision                # a training step in fp32 vs bf16 autocast

Run on an idle machine: every ratio is measured in one process, on the same model.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402


def accuracy(args):
    d = data.load_data(args.dataset, args.data_dir)
    start = time.perf_counter()
    ckpt_path = Path(args.ckpt_dir) / f"bench_{d.name}_{args.preset}.pt"
    model, ckpt = training.train_classifier(d, ckpt_path, preset=args.preset, hyp=dict(epochs=args.epochs),
                                            retrain=True, seed=args.seed)
    train_s = time.perf_counter() - start
    plain = training.evaluate(model, d.test_x, d.test_y, tta_level=0)["acc"]
    tta = training.evaluate(model, d.test_x, d.test_y, tta_level=2)["acc"]
    total_s = time.perf_counter() - start
    print(f"{d.name}, {args.preset} preset, {args.epochs} epochs, {torch.get_num_threads()} threads, "
          f"device {training.get_device()}:")
    print(f"  test accuracy {plain:.4f} (no TTA), {tta:.4f} (flip+translate TTA); best epoch {ckpt['epoch']}, "
          f"val {ckpt['val_acc']:.4f}")
    print(f"  wall time: training {train_s:.0f} s, training + TTA evaluation {total_s:.0f} s")


class PILDataset(torch.utils.data.Dataset):
    """The plain torchvision way: PIL images through per-image transforms."""

    def __init__(self, x, y):
        import torchvision.transforms as T
        from PIL import Image
        mode = "L" if x.shape[1] == 1 else "RGB"
        self.images = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy(), mode) for img in x]
        self.y = y
        self.tf = T.Compose([T.RandomCrop(32, padding=2, padding_mode="reflect"), T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.y[i]


def throughput(args):
    torch.manual_seed(0)
    # twice the images of a measurement, and the warm-up batches of a 2-worker loader (5 of 1024; 10% go to val)
    d = data.load_data("synthetic", n_train=max(12000, 2 * args.images) + 6 * 1024, n_test=10)
    x, y = d.train_x, d.train_y
    mean, std = d.channel_stats()

    def cnn(preset):
        return models.build_model(models.cnn_config(preset, mean=mean, std=std))

    def vae(preset):
        return models.build_model(models.vae_config(preset))

    setups = [  # (name, model, batch size, images per measurement)
        ("airbench CNN", cnn("airbench"), 1024, 3 * 1024),
        ("compact CNN", cnn("compact"), 1024, 4 * 1024),
        ("small CNN", cnn("small"), 1024, args.images),
        ("small CNN", cnn("small"), 256, args.images),
        ("VAE (default)", vae("default"), 128, args.images // 2),
        ("VAE (small)", vae("small"), 128, args.images),
    ]
    # the data path alone: its rate bounds what any loader can gain over PIL for a given model; a pass of each
    # in turn, the first to warm up, then the best of args.rounds
    pil = PILDataset(x, y)
    loaders = {"our Loader": data.Loader(x, y, 512, shuffle=True, augment=True),
               "DataLoader+PIL, 0 workers": torch.utils.data.DataLoader(pil, 512, shuffle=True)}
    alone = dict.fromkeys(loaders, 0.0)
    for round_ in range(args.rounds + 1):
        for name, loader in loaders.items():
            start, n = time.perf_counter(), 0
            for xb, yb in loader:
                n += len(yb)
            alone[name] = max(alone[name], n / (time.perf_counter() - start) if round_ else 0.0)
    for name, value in alone.items():
        print(f"data path alone, {name}: {value:.0f} images/s (best of {args.rounds} passes after a warm-up)")
    pil_alone = alone["DataLoader+PIL, 0 workers"]

    print(f"throughput in images/s, {torch.get_num_threads()} threads; each row one process, same model; each "
          f"cell the best of {args.rounds} interleaved rounds")
    print("| model | bare step on one batch | our Loader | DataLoader+PIL (0 workers) | DataLoader+PIL (2 workers) "
          "| ours / bare | ours / PIL best | bound: 1 + bare / PIL alone |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, batch, images in setups:
        steps = max(2, images // batch)
        model.train()
        is_vae = isinstance(model, models.VAE)
        if not is_vae:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def step(xb, yb):
            loss = model.loss_terms(xb)["loss"] if is_vae else F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def rate(batches):
            it = iter(batches)
            # a warm-up step, and one for each batch a loader's workers queued as it started (2 each): timed,
            # those would have been made before the clock started
            for _ in range(1 + 2 * getattr(batches, "num_workers", 0)):
                step(*next(it))
            n, start = 0, time.perf_counter()
            for _ in range(steps):
                xb, yb = next(it)
                step(xb, yb)
                n += len(yb)
            return n / (time.perf_counter() - start)

        fixed = x[:batch].float() / 255, y[:batch]
        if not is_vae:
            fixed = fixed[0].contiguous(memory_format=torch.channels_last), fixed[1]
        pipelines = {
            "bare": lambda: iter(lambda: fixed, None),
            "ours": lambda: data.Loader(x, y, batch, shuffle=True, augment=True, drop_last=True,
                                        channels_last=not is_vae),
            "pil0": lambda: torch.utils.data.DataLoader(pil, batch, shuffle=True, drop_last=True, num_workers=0),
            "pil2": lambda: torch.utils.data.DataLoader(pil, batch, shuffle=True, drop_last=True, num_workers=2),
        }
        best = {k: 0.0 for k in pipelines}
        for _ in range(args.rounds):  # interleaved rounds, best of each: drift hits all pipelines alike
            for k, make in pipelines.items():
                best[k] = max(best[k], rate(make()))
        bare, ours, pil0, pil2 = best.values()
        print(f"| {name} (batch {batch}) | {bare:.0f} | {ours:.0f} | {pil0:.0f} | {pil2:.0f} | {ours / bare:.3f} "
              f"| {ours / max(pil0, pil2):.2f}x | {1 + bare / pil_alone:.2f}x |", flush=True)


def precision(args):
    """The classifier's forward, backward and SGD step on one fixed batch, in fp32 and in bf16 autocast,
    interleaved rounds (fit's step adds label smoothing and the lookahead, the same in both)."""
    torch.manual_seed(0)
    device = training.get_device()
    layout = torch.contiguous_format if device.type == "cuda" else torch.channels_last  # as fit lays out the weights
    model = models.build_model(models.cnn_config(args.preset)).to(device, memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    x = torch.rand(args.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def rate(bf16, steps=3):
        for i in range(steps + 1):  # the first a warm-up
            if i == 1:
                training.synchronize(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()  # waits for a GPU
        return steps * args.batch / (time.perf_counter() - start)

    rates = {False: [], True: []}
    for _ in range(args.rounds):
        for bf16 in rates:
            rates[bf16].append(rate(bf16))
    fp32, bf16 = max(rates[False]), max(rates[True])
    print(f"{args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, device {device}, "
          f"training.bf16_training: {training.bf16_training(device)}")
    print(f"  images/s, best of {args.rounds}: fp32 {fp32:.0f}, bf16 autocast {bf16:.0f}: bf16 {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--dataset", default=training.setting("DATASET", "cifar10-jpeg"),
                   help="a dataset name or image-folder path (data.load_data; default: DATASET, else cifar10-jpeg)")
    a.add_argument("--preset", default="airbench", choices=sorted(models.CNN_PRESETS))
    a.add_argument("--epochs", type=training.positive, default=10)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--data-dir", default=None)
    a.add_argument("--ckpt-dir", default=str(ROOT / "checkpoints" / "bench"))
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=training.at_least(1), default=8192, help="images per measurement (small models)")
    t.add_argument("--rounds", type=training.at_least(1), default=2)
    r = sub.add_parser("precision")
    r.add_argument("--preset", default="compact", choices=sorted(models.CNN_PRESETS))
    r.add_argument("--batch", type=training.at_least(1), default=1024)
    r.add_argument("--rounds", type=training.at_least(1), default=3)
    args = p.parse_args()
    {"accuracy": accuracy, "throughput": throughput, "precision": precision}[args.cmd](args)
