import hashlib
import pickle
import urllib.error

import numpy as np
import pytest
import torch

import data


def test_synthetic_is_deterministic_and_well_formed():
    a = data.load_data("synthetic", n_train=500, n_test=100, seed=3)
    b = data.load_data("synthetic", n_train=500, n_test=100, seed=3)
    c = data.load_data("synthetic", n_train=500, n_test=100, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (3, 32, 32)
    assert a.train_y.dtype == torch.int64 and len(a.classes) == 10
    assert a.templates.shape == (10, 3, 32, 32)
    assert len(a.train_y) + len(a.val_y) == 500 and len(a.test_y) == 100


def test_synthetic_images_carry_their_planted_feature(synthetic):
    x = synthetic.test_x.float().div(255).flatten(1)
    t = synthetic.templates.flatten(1)
    x, t = x - x.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    corr = (x / x.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T  # (N, 10)
    assert (corr.argmax(1) == synthetic.test_y).float().mean() > 0.95


def test_templates_are_flip_symmetric():
    t = data.synthetic_templates()
    assert torch.allclose(t, t.flip(3))


@pytest.mark.parametrize("n, val", [(50000, 5000), (1000, 100), (61, 6)])
def test_split_is_deterministic_disjoint_and_complete(n, val):
    tr, va = data.split_indices(n, seed=1)
    tr2, va2 = data.split_indices(n, seed=1)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == val and len(tr) == n - val
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(n))
    assert not torch.equal(va, data.split_indices(n, seed=2)[1])


@pytest.mark.parametrize("val_size", [0, -100, 1000, 0.1, True])
def test_a_validation_size_that_leaves_no_split_is_refused(val_size):
    with pytest.raises(ValueError, match=r"val_size must be an int from 1 to 999: .*got " + repr(val_size)):
        data.split_indices(1000, val_size)
    assert [len(i) for i in data.split_indices(1000, 999)] == [1, 999]


def test_data_remember_the_seed_of_their_split():
    d = data.load_data("synthetic", seed=3, n_train=200, n_test=20)
    assert d.seed == 3
    data.check_seed(d, 3)
    with pytest.raises(ValueError, match=r"loaded with seed 3 \(their train/val split\), not 4: .*re-run the data cell"):
        data.check_seed(d, 4)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="cifar10, fashion-mnist, synthetic"):
        data.load_data("imagenet")


def test_loader_augmentation_keeps_labels_aligned():
    # image i is constant with value 10 * label: any crop or flip keeps it constant
    y = torch.arange(200) % 10
    x = (y * 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    loader = data.Loader(x, y, batch_size=64, shuffle=True, augment=True, seed=0)
    seen = []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
        assert torch.allclose(xb.amax((1, 2, 3)), yb.float() * 10 / 255)
        assert torch.allclose(xb.amin((1, 2, 3)), yb.float() * 10 / 255)
        seen.append(yb)
    assert len(seen) == 4 and sorted(torch.cat(seen).tolist()) == sorted(y.tolist())


def test_loader_shuffles_each_epoch_anew_and_the_same_for_a_seed():
    x, y = torch.zeros(100, 1, 8, 8, dtype=torch.uint8), torch.arange(100)

    def epochs(seed, shuffle=True, count=2):
        loader = data.Loader(x, y, batch_size=30, shuffle=shuffle, seed=seed)
        return [torch.cat([yb for _, yb in loader]).tolist() for _ in range(count)]
    first, second = epochs(0)
    assert sorted(first) == list(range(100)) and first != list(range(100)) and second != first
    assert epochs(0) == [first, second] and epochs(1)[0] != first
    assert epochs(0, shuffle=False) == [list(range(100))] * 2


def test_loader_translates_and_flips_within_range():
    # one bright pixel per image at a known place; after augmentation it moves at most 2 px,
    # possibly mirrored, and both flips and several shifts occur
    n = 400
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    x[:, 0, 10, 6] = 255
    loader = data.Loader(x, torch.zeros(n, dtype=torch.int64), batch_size=n, augment=True, seed=1)
    xb, _ = next(iter(loader))
    pos = xb[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 32, pos % 32
    assert (xb.flatten(1).amax(1) == 1).all() and (xb.flatten(1) > 0).sum(1).eq(1).all()
    assert ((rows - 10).abs() <= 2).all()
    mirrored = cols > 16
    assert ((cols[~mirrored] - 6).abs() <= 2).all() and ((cols[mirrored] - 25).abs() <= 2).all()
    assert 0.35 < mirrored.float().mean() < 0.65
    assert len(set(zip(rows.tolist(), cols.tolist()))) >= 40  # 5 x 5 shifts x 2 flips = 50


def test_loader_without_augmentation_is_exact_and_ordered():
    x = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(70)
    batches = list(data.Loader(x, y, batch_size=32))
    assert [len(b[1]) for b in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([b[0] for b in batches]), x.float() / 255)
    assert len(data.Loader(x, y, batch_size=32, drop_last=True)) == 2


def _write_cifar(root, n_per_batch=20):
    """A small CIFAR-10 copy in the real on-disk format (python pickles of uint8 rows)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batches[name] = (images, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": images, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    return batches, names


def test_cifar10_reads_the_real_on_disk_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    batches, names = _write_cifar(tmp_path)
    # our small files cannot have the real files' md5 sums; everything else is torchvision's real path
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    d = data.load_data("cifar10", root=tmp_path)
    assert d.classes == names and d.channels == 3
    assert len(d.train_y) + len(d.val_y) == 100 and len(d.val_y) == 10
    img, label = batches["test_batch"][0][0], batches["test_batch"][1][0]
    assert torch.equal(d.test_x[0], torch.from_numpy(img.reshape(3, 32, 32)))  # channel-first, not scrambled
    assert d.test_y[0].item() == label


def test_cifar10_offline_error_says_where_to_put_the_archive(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(data.DatasetUnavailable, match="cifar-10-python.tar.gz") as e:
        data.load_data("cifar10", root=tmp_path)
    assert str(tmp_path) in str(e.value) and "DATASET=synthetic" in str(e.value)
    assert "the path of an image folder or archive of CIFAR-10" in str(e.value)  # the JPEG copy, offline
    assert "DATASET=fashion-mnist with the Debian package dataset-fashion-mnist" in str(e.value)  # no download


def test_a_second_cifar10_load_waits_for_the_first_to_download_and_extract(tmp_path, monkeypatch):
    """Two notebooks started at once: the second waits on the first's lock instead of reading (or writing) a
    half-downloaded archive."""
    import fcntl
    import threading
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    loaded = []
    with open(tmp_path / ".cifar10.lock", "a") as first:  # the first process, at work
        fcntl.flock(first, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: loaded.append(data.load_data("cifar10", root=tmp_path)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not loaded  # waiting
    second.join(timeout=60)  # the first is done: its file closed, the lock released
    assert len(loaded) == 1 and len(loaded[0].test_y) == 20


def test_cifar10_in_a_folder_that_cannot_be_written_is_read(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(data.os, "access", lambda *args: False)  # a read-only DATA_DIR
    assert len(data.load_data("cifar10", root=tmp_path).test_y) == 20
    with pytest.raises(PermissionError, match="not writable"):  # where the archive would be extracted: refused
        data.load_data("cifar10", root=tmp_path / "empty")


def test_a_corrupt_cifar10_archive_says_so(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive" * 1000)
    with pytest.raises(data.DatasetUnavailable, match=r"archive .*cifar-10-python.tar.gz is corrupt or truncated"):
        data.load_data("cifar10", root=tmp_path)


def test_fashion_mnist_error_when_nothing_is_reachable(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(FashionMNIST, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(data.DatasetUnavailable, match="dataset-fashion-mnist"):
        data.load_data("fashion-mnist", root=tmp_path)


def _write_fashion_mnist(folder, suffix, value, train=20, test=4):
    """Fashion-MNIST's four IDX files (suffix "" or ".gz"): 28 x 28 images of one value (value + 1 for the test
    set's), labels i % 10 ((i + 3) % 10 for the test set's)."""
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    write = (lambda p, b: p.write_bytes(gzip.compress(b))) if suffix else (lambda p, b: p.write_bytes(b))
    for prefix, n, v, shift in (("train", train, value, 0), ("t10k", test, value + 1, 3)):
        write(folder / f"{prefix}-images-idx3-ubyte{suffix}",
              struct.pack(">4I", 2051, n, 28, 28) + bytes([v]) * n * 784)
        write(folder / f"{prefix}-labels-idx1-ubyte{suffix}", struct.pack(">2I", 2049, n) +
              bytes((i + shift) % 10 for i in range(n)))


def test_fashion_mnist_reads_the_debian_packages_files(tmp_path, monkeypatch):
    _write_fashion_mnist(tmp_path / "debian", ".gz", 7)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    d = data.load_data("fashion-mnist", root=tmp_path / "unused", val_size=2)
    assert d.train_x.shape == (18, 1, 32, 32) and d.test_x.shape == (4, 1, 32, 32) and d.train_y.dtype == torch.long
    assert (d.test_x[:, :, 2:-2, 2:-2] == 8).all() and (d.train_x[:, :, 2:-2, 2:-2] == 7).all()  # each set its file
    assert d.test_x[:, :, :2].max() == 0 and d.test_x[:, :, :, -2:].max() == 0  # zero padding to 32 px
    assert d.test_y.tolist() == [3, 4, 5, 6] and sorted(d.train_y.tolist() + d.val_y.tolist()) == sorted(
        i % 10 for i in range(20))
    assert not (tmp_path / "unused").exists()  # read in place


def test_fashion_mnist_downloaded_before_is_read_from_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    _write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", "", 1)  # torchvision's extracted files
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(data.os, "access", lambda *args: False)  # a read-only DATA_DIR
    d = data.load_data("fashion-mnist", root=tmp_path, val_size=2)
    assert len(d.test_y) == 4 and d.train_x.shape[1:] == (1, 32, 32)
    with pytest.raises(PermissionError, match="not writable"):  # where it would be downloaded to: refused
        data.load_data("fashion-mnist", root=tmp_path / "empty")


@pytest.mark.usefixtures("debian_fashion_mnist")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    d = data.load_data("fashion-mnist", root=tmp_path)
    assert d.train_x.shape[1:] == (1, 32, 32) and d.channels == 1
    assert len(d.train_y) == 54000 and len(d.val_y) == 6000 and len(d.test_y) == 10000
    assert d.train_x[:, :, :2].max() == 0 and d.train_x[:, :, :, -2:].max() == 0  # zero padding
    assert d.classes[0] == "T-shirt/top" and not list(tmp_path.rglob("*.tmp"))


def test_augmented_images_are_reflect_padded_crops_of_the_original():
    import torch.nn.functional as F

    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    out, _ = next(iter(data.Loader(x, torch.zeros(32, dtype=torch.int64), 32, augment=True, seed=5)))
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect") / 255
    for k in range(32):
        views = [v for dy in range(5) for dx in range(5) for v in (padded[k, :, dy:dy + 32, dx:dx + 32],)]
        views += [v.flip(2) for v in views]
        assert any(torch.equal(out[k], v) for v in views)


def _template_strength(d):
    """Mean over classes of: the spatial SD of the class's mean image over the mean spatial SD of its
    images. High when each class has a fixed template, near 0 when its feature moves and changes phase."""
    x = d.train_x.float() / 255
    out = []
    for k in range(len(d.classes)):
        xk = x[d.train_y == k]
        out.append(xk.mean(0).std() / xk.std((1, 2, 3)).mean())
    return torch.stack(out).mean().item()


def test_synthetic_hard_is_deterministic_balanced_and_has_no_fixed_template():
    a = data.load_data("synthetic-hard", n_train=1000, n_test=200)
    b = data.load_data("synthetic-hard", n_train=1000, n_test=200)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.dtype == torch.uint8 and a.test_x.shape == (200, 3, 32, 32)
    assert len(set(a.classes)) == 10 and a.templates is None
    assert torch.bincount(a.test_y, minlength=10).tolist() == [20] * 10
    easy = data.load_data("synthetic", n_train=1000, n_test=200)
    assert _template_strength(a) < 0.5 * _template_strength(easy)  # measured: 0.11 against 0.90
    with pytest.raises(ValueError, match="size must be an int >= 28, got 16"):  # its fine stripes would alias
        data.load_data("synthetic-hard", n_train=100, n_test=20, size=16)
    assert data.load_data("synthetic-hard", n_train=100, n_test=20, size=28).test_x.shape == (20, 3, 28, 28)


def test_options_of_the_synthetic_sets_are_refused_elsewhere(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) n_train for 'fashion-mnist'.*synthetic datasets their own"):
        data.load_data("fashion-mnist", tmp_path, n_train=100)  # used to load all 60,000, silently


def test_data_dir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_dir("~/d") == tmp_path / "d"
    monkeypatch.setenv("DATA_DIR", "~/e")
    assert data.data_dir() == tmp_path / "e"


def test_loader_refuses_a_translation_beyond_the_image():
    x, y = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"translate must be from 0 to 7 px for \(8, 8\) images"):
        data.Loader(x, y, augment=True, translate=8)


@pytest.mark.parametrize("damage", ["whole", "cut short", "not IDX", "not gzip", "damaged inside"])
def test_an_idx_file_is_read_whole_or_refused(tmp_path, damage):
    import gzip
    import struct
    raw = struct.pack(">4I", 2051, 3, 2, 4) + bytes(range(24))  # 3 images of 2x4
    raw = {"whole": raw, "cut short": raw[:-1], "not IDX": b"\x1f\x8b" + raw[2:]}.get(damage, raw)
    path = tmp_path / "x-idx3-ubyte.gz"
    blob = raw if damage == "not gzip" else gzip.compress(raw)
    if damage == "damaged inside":  # the deflate stream's bytes changed: zlib's own error, or the CRC check's
        blob = blob[:12] + bytes(b ^ 0x55 for b in blob[12:-8]) + blob[-8:]
    path.write_bytes(blob)
    if damage == "whole":
        assert torch.equal(data._read_idx_gz(path), torch.arange(24, dtype=torch.uint8).view(3, 2, 4))
        return
    with pytest.raises(data.DatasetUnavailable, match=f"{path}.*reinstall"):
        data._read_idx_gz(path)


def test_edge_arguments_of_the_synthetic_sets_the_loader_and_the_image_check():
    hard = data.load_data("synthetic-hard", n_train=40, n_test=0)  # no test set: the empty draw is typed
    assert hard.test_x.shape == (0, 3, 32, 32) and hard == hard and hard != data.load_data("synthetic-hard", n_train=40,
                                                                                             n_test=0)  # by identity
    for name, kwargs, match in [("synthetic", dict(n_train=1.5e4), "n_train must be an int >= 0, got 15000.0"),
                                ("synthetic-hard", dict(n_test=-1), "n_test must be an int >= 0, got -1"),
                                ("synthetic-hard", dict(size=0), "size must be an int >= 28, got 0"),
                                ("synthetic", dict(noise=-0.1), "noise must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            data.load_data(name, **kwargs)
    x, y = hard.train_x, hard.train_y
    with pytest.raises(ValueError, match="translate must be an int >= 0, got 1.5"):  # was a failure at the first batch
        data.Loader(x, y, augment=True, translate=1.5)
    with pytest.raises(ValueError, match=r"Loader takes images \(N, C, H, W\); got shape \(36, 32, 32\)"):
        data.Loader(x[:, 0], y, augment=True)
    assert data.check_images(torch.full((1, 3, 2, 2), -6e-8)) is not None  # an un-normalized image's rounding
    with pytest.raises(ValueError, match=r"got floats in \[-0.01"):
        data.check_images(torch.full((1, 3, 2, 2), -0.01))


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_each_write_its_own_temporary_name(tmp_path):
    path, seen = tmp_path / "f.bin", []
    path.write_bytes(b"old")

    def fail(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        data.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    data.atomic_write(path, lambda tmp: (seen.append(tmp), tmp.write_bytes(b"new")))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert seen[0] != seen[1] and seen[0].parent == seen[1].parent == tmp_path  # two writers never share one


def test_a_class_is_found_by_its_index_or_its_name():
    d = data.load_data("synthetic", n_train=100, n_test=20)
    assert d.class_index(3) == 3 and d.class_index(d.classes[3]) == 3 and d.class_index(np.int64(2)) == 2
    assert d.class_index(d.test_y[0]) == d.test_y[0].item()  # a label as the data hold it
    with pytest.raises(ValueError, match=rf"'cat' is not a class of synthetic; its classes are {d.classes[0]!r}, "):
        d.class_index("cat")
    with pytest.raises(ValueError, match=r"class index 10 is out of range: synthetic has 10 classes \(0\.\.9\)"):
        d.class_index(10)
    for bad in (-1, 2.0, True, torch.arange(2)):
        with pytest.raises(ValueError, match="a class must be an index from 0 or a name of synthetic's classes"):
            d.class_index(bad)


def test_the_fingerprint_is_hashed_again_only_when_the_data_change(monkeypatch):
    d = data.load_data("synthetic", n_train=200, n_test=20)
    first, hashed, sha256 = d.fingerprint(), [], hashlib.sha256
    monkeypatch.setattr(data.hashlib, "sha256", lambda *a: hashed.append(1) or sha256(*a))
    assert d.fingerprint() == first and hashed == []  # the same tensors, unchanged: not hashed again
    d.train_x[0, 0, 0, 0] ^= 1  # changed in place
    assert d.fingerprint() != first and len(hashed) == 1
    d.train_x[0, 0, 0, 0] ^= 1
    assert d.fingerprint() == first and len(hashed) == 2
    d.val_y = d.val_y.clone()  # another tensor of the same values
    assert d.fingerprint() == first and len(hashed) == 3
    d.val_y = d.val_y.flip(0)
    assert d.fingerprint() != first
    copy = pickle.loads(pickle.dumps(d))  # the cache's weak references stay behind
    assert copy.fingerprint() == d.fingerprint() and torch.equal(copy.train_x, d.train_x)
