"""Datasets as uint8 tensors, the train/val split, and the in-memory batch loader with augmentation.

`load_data(name, root)` returns a `Data`: uint8 images (N, C, H, W), int64 labels, class names,
split into train / val / test. `name` is a built-in dataset, or an image folder or archive
(train/<class>/*, test/<class>/*) given by its path or by its base name in DATA_DIR. `Loader` slices batches from memory on the training device and
augments there (random translate with reflect padding, horizontal flip), with no per-image Python.
"""
import contextlib
import functools
import glob
import gzip
import hashlib
import io
import math
import numbers
import operator
import os
import re
import struct
import sys
import tarfile
import time
import uuid
import warnings
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DATASETS = ("cifar10", "fashion-mnist", "synthetic", "synthetic-hard")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says what to do."""


@dataclass(eq=False)  # compared by identity: == on its tensors would be ambiguous
class Data:
    name: str
    classes: list           # class names, index = label
    train_x: torch.Tensor   # (N, C, H, W) uint8
    train_y: torch.Tensor   # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    templates: torch.Tensor = None  # synthetic only: (10, 3, 32, 32) float in [0, 1], the planted features
    seed: int = 0                   # the seed of the train/val split (and of synthetic images)

    @property
    def channels(self):
        return self.train_x.shape[1]

    @property
    def size(self):
        """Side of the images in pixels; an error for images that are not square, which training, our models'
        recorded size and the notebooks need (render() takes size=(height, width) for a model of one's own)."""
        h, w = self.train_x.shape[-2:]
        if h != w:
            raise ValueError(f"the {self.name} images are {w}x{h} (width x height), not square: crop or resize "
                             f"them to one side to train a model on them and run the notebooks")
        return w

    def class_index(self, label):
        """A class's index from its index or its name ("cat"); an error that lists the names otherwise."""
        if isinstance(label, str):
            if label not in self.classes:
                shown = ", ".join(map(repr, self.classes[:20])) + (", ..." if len(self.classes) > 20 else "")
                raise ValueError(f"{label!r} is not a class of {self.name}; its classes are {shown}")
            return self.classes.index(label)
        try:
            index = None if isinstance(label, bool) else operator.index(label)  # Python, NumPy, 0-d tensor ints
        except TypeError:  # a float, a batch
            index = None
        if index is None or index < 0:
            raise ValueError(f"a class must be an index from 0 or a name of {self.name}'s classes; got {label!r}")
        if index >= len(self.classes):
            raise ValueError(f"class index {index} is out of range: {self.name} has {len(self.classes)} classes "
                             f"(0..{len(self.classes) - 1})")
        return index

    def fingerprint(self):
        """A short hash of the training and validation images and labels: what a checkpoint was trained on.
        Hashed again only once one of them is another tensor or was changed in place (its _version): a
        notebook's cells check it often, and 150 MB of CIFAR-10 take a third of a second."""
        tensors = (self.train_x, self.train_y, self.val_x, self.val_y)
        seen, digest = self.__dict__.get("_fingerprint", ((), None))
        if len(seen) == len(tensors) and all(ref() is t and v == t._version for (ref, v), t in zip(seen, tensors)):
            return digest
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())  # the same on any device
        self.__dict__["_fingerprint"] = [(weakref.ref(t), t._version) for t in tensors], h.hexdigest()[:16]
        return self.__dict__["_fingerprint"][1]

    def __getstate__(self):
        """Pickled (torch.save, a worker process) without the fingerprint's cache: its weak references are not."""
        return {k: v for k, v in self.__dict__.items() if k != "_fingerprint"}

    def channel_stats(self):
        """Per-channel mean and std of the training images in [0, 1] (for the model's Normalize)."""
        x = self.train_x.float().div_(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
        return x.mean(1).tolist(), x.std(1).tolist()

    def __repr__(self):
        return (f"Data({self.name!r}, {self.channels} channel(s), train {len(self.train_y)}, "
                f"val {len(self.val_y)}, test {len(self.test_y)}, classes {self.classes})")


IMAGE_FORMS = "uint8 in [0, 255] or float in [0, 1]"


def check_count(name, value, low):
    """A clear error unless value is an int (a Python or NumPy one, not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_real(name, value, low, inclusive=True, hint=""):
    """A clear error unless value is a finite number >= low (> low where not inclusive); hint ends it."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not (ok and (value >= low if inclusive else value > low)):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}{hint}")


_OURS = [Path(__file__).resolve().with_name(f"{name}.py") for name in
         ("atlas", "attribution", "data", "featureviz", "metrics", "models", "training", "utils")]
_PASSED = (str(Path(torch.__file__).parent) + os.sep, contextlib.__file__)  # wrappers between (inference_mode's)


def warn(message):
    """warnings.warn(message), shown at the first caller outside the lab's modules and torch's wrappers: the
    notebook cell or script that can act on it, however deep in our functions it was found."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (Path(frame.f_code.co_filename).resolve() in _OURS
                                        or frame.f_code.co_filename.startswith(_PASSED)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


def plain(value):
    """A NumPy number (or a list or tuple of them) as Python's own: a checkpoint stores it, and torch.load's
    weights_only (the only safe way to load one) refuses NumPy scalars."""
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a complex one stays, for the checks to name
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_images(images, name="images"):
    """Refuse anything but uint8 in [0, 255] or float in [0, 1] (within 1e-3 of it), with an error that
    names the accepted forms; returns the images unchanged. Called at entry points, never per step."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, {IMAGE_FORMS}; got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"{name} must be {IMAGE_FORMS}; got dtype {images.dtype}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # rounding's error either way (un-normalized images); NaN fails
            hint = (" (normalized images? undo it: images * std + mean)" if lo < -1e-3
                    else " (floats in 0-255: divide by 255, or pass uint8)" if hi > 1.5 else "")
            raise ValueError(f"{name} must be {IMAGE_FORMS}; got floats in [{lo.item():.4g}, {hi.item():.4g}]{hint}")
    return images


def check_batch(images, channels=None, name="images"):
    """check_images, and a batch (B, C, H, W) of at least one image, with `channels` channels where given:
    one image (C, H, W), or gray images for an RGB model, would broadcast into wrong answers."""
    check_images(images, name)
    if images.dim() != 4 or not len(images):
        hint = f": for one image (C, H, W) pass {name}[None]" if images.dim() == 3 else ""
        raise ValueError(f"{name} must be a batch (B, C, H, W) of at least one image; got shape "
                         f"{tuple(images.shape)}{hint}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} have {images.shape[1]} channel(s), the model takes {channels}: got shape "
                         f"{tuple(images.shape)}")
    return images


def check_labels(labels, n, num_classes=None, name="labels"):
    """labels as (n,) int64 class indices on the CPU, in 0..num_classes-1 where num_classes is given; a clear
    error otherwise (a float label would be truncated, an out-of-range one wrap or fail deep in torch)."""
    if labels is None:
        raise ValueError(f"{name} must be ({n},) integer class indices, one per image; got None")
    try:
        y = torch.as_tensor(labels).cpu()
    except (TypeError, ValueError, RuntimeError):  # names, or targets (a render's r.targets)
        shown = type(labels[0]).__name__ if isinstance(labels, (list, tuple)) and labels else type(labels).__name__
        raise ValueError(f"{name} must be ({n},) integer class indices, one per image (a render's: "
                         f"r.target_index); got {type(labels).__name__} of {shown}") from None
    if y.shape != (n,) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be ({n},) integer class indices, one per image; got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    if num_classes is not None and n and not (0 <= y.min() and y.max() < num_classes):
        raise ValueError(f"{name} must be class indices in 0..{num_classes - 1} (num_classes={num_classes}); "
                         f"got values from {y.min().item()} to {y.max().item()}")
    return y.long()


def to_float(images, name="images"):
    """The one converter at every public entry point that takes images: check_images, then float in [0, 1]."""
    images = check_images(images, name)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def data_dir(root=None):
    """DATA_DIR from the argument, else the environment, else ./data."""
    return Path(root or os.environ.get("DATA_DIR", "").strip() or "data").expanduser()  # blank: unset, as README says


def writable_dir(root, name="DATA_DIR", fix="set DATA_DIR to"):
    """root, created if missing; an error naming it (`name`) that says what to do (`fix` a folder you can write
    to) where it is a file or not writable."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{name} {root} is a file, not a folder: {fix} a folder (it is created if missing)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{name} {root} cannot be created ({e}): {fix} a folder you can write to") from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {root} is not writable: {fix} a folder you can write to")
    return root


def load_data(name="cifar10", root=None, seed=0, val_size=None, **synthetic_kwargs):
    """Load a dataset and split its training set into train/val deterministically.

    `name` is one of DATASETS, or an image folder or .tar/.tar.gz archive of one: its path, or its
    base name in `root`. The Data's name is that base name, so both spellings share checkpoints.
    """
    root, name = data_dir(root), os.fspath(name)  # a pathlib.Path too
    check_count("seed", seed, 0)  # before a download or a decode
    templates = None
    if synthetic_kwargs and name not in ("synthetic", "synthetic-hard"):
        raise ValueError(f"unknown option(s) {', '.join(sorted(synthetic_kwargs))} for {name!r}: load_data takes name, "
                         f"root, seed and val_size, and the synthetic datasets their own (n_train, n_test, ...)")
    if name == "cifar10":
        (x, y), (tx, ty), classes = load_cifar10(root)
    elif name == "fashion-mnist":
        (x, y), (tx, ty), classes = load_fashion_mnist(root)
    elif name == "synthetic":
        (x, y), (tx, ty), classes, templates = make_synthetic(seed=seed, **synthetic_kwargs)
    elif name == "synthetic-hard":
        (x, y), (tx, ty), classes = make_synthetic_hard(seed=seed, **synthetic_kwargs)
    else:
        path = find_image_folder(name, root)
        (x, y), (tx, ty), classes = load_image_folder(path, Path(root))
        name = folder_name(path)
    for split, labels in (("training", y), ("test", ty)):
        if len(labels) and not (0 <= labels.min() and labels.max() < len(classes)):
            raise ValueError(f"the {name} {split} labels run from {labels.min().item()} to {labels.max().item()}, "
                             f"outside 0..{len(classes) - 1} for its {len(classes)} classes: the files are "
                             f"corrupt; delete them from {root} and load again")
    train_idx, val_idx = split_indices(len(y), val_size, seed)
    _check_every_class_trains(name, classes, y[train_idx])
    return Data(name, classes, x[train_idx], y[train_idx], x[val_idx], y[val_idx], tx, ty, templates, seed)


def _check_every_class_trains(name, classes, train_y):
    """Warn of classes left without a training image by the train/val split (not stratified): an image folder's
    class of one or a few images, all drawn for validation."""
    missing = [c for c, n in zip(classes, torch.bincount(train_y, minlength=len(classes)).tolist()) if n == 0]
    if missing:
        warn(f"the {name} classes {missing} have no training image after the train/val split (all drawn for "
             f"validation): add training images of them, or load with another seed")


def check_seed(d, seed):
    """An error unless `d` was loaded with this seed: a notebook whose SEED changed since its data cell ran
    would otherwise train on the old split and record the new seed, a checkpoint no split matches."""
    if d.seed != seed:
        raise ValueError(f"the {d.name} data were loaded with seed {d.seed} (their train/val split), not {seed}: load "
                         f"them again with seed={seed} (in a notebook: re-run the data cell after changing SEED)")


def atomic_write(path, write, sync=False):
    """Call write(tmp_path), then rename onto path: a crash never leaves a half-written file. The temporary
    name is random, so that two processes writing one file (even with one pid, in two containers) never share it.
    sync: the file synced (os.fsync) before the rename, so that a system crash leaves no name on an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # not mkstemp: keep the umask's mode
    try:
        write(tmp)
        if sync:
            with open(tmp, "r+b") as f:  # a handle that may write: Windows' fsync (FlushFileBuffers) needs one
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def split_indices(n, val_size=None, seed=0):
    """Deterministic disjoint (train, val) index tensors: 5,000 val for 50,000 images, else 10%."""
    if n < 2:
        raise ValueError(f"the training set has {n} image(s): at least 2 are needed, one of them held out for "
                         f"validation, which picks the best checkpoint")
    if val_size is None:
        val_size = 5000 if n == 50000 else max(1, round(0.1 * n))
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Integral) or not 1 <= val_size < n:
        raise ValueError(f"val_size must be an int from 1 to {n - 1}: the training images ({n}) held out for "
                         f"validation, which picks the best checkpoint; got {val_size!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _to_tensors(dset):
    x = torch.as_tensor(dset.data)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]  # (N, C, H, W)
    return x.contiguous(), torch.as_tensor(dset.targets, dtype=torch.int64)


@contextlib.contextmanager
def _alone(root, name):
    """One process at a time in root for `name`'s download and extraction (two notebooks started at once would
    write one archive over each other): an exclusive lock on root/.{name}.lock, waited for. None where the folder
    cannot be written, as nothing is written there then, or that cannot lock (Windows, some network file systems)."""
    try:
        import fcntl
        lock = open(Path(root) / f".{name}.lock", "a")
    except (ImportError, OSError):
        lock = None
    if lock is None:  # not yielded inside the except: an error of the body would read as raised handling it
        yield
        return
    with lock:  # closing the file releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network ones): as on Windows
            pass
        yield


def load_cifar10(root):
    """CIFAR-10 through torchvision; downloads into root, or extracts cifar-10-python.tar.gz there (one process
    at a time)."""
    from torchvision.datasets import CIFAR10

    if not (Path(root) / CIFAR10.base_folder).exists():
        writable_dir(root)  # the archive is extracted, or downloaded, into it; extracted files are only read
    with _alone(root, "cifar10"):
        return _cifar10_in(root)


def _cifar10_in(root):
    """load_cifar10's work, alone in root."""
    from torchvision.datasets import CIFAR10, cifar

    folder, archive = Path(root) / CIFAR10.base_folder, Path(root) / CIFAR10.filename
    if not folder.exists():
        if archive.exists() and not cifar.check_integrity(str(archive), CIFAR10.tgz_md5):
            raise DatasetUnavailable(f"the CIFAR-10 archive {archive} is corrupt or truncated (its checksum does "
                                     f"not match): delete it, and download it again or let torchvision download it")
    elif not archive.exists():  # no archive to extract again: the extracted files must be whole
        for fname, md5 in CIFAR10.train_list + CIFAR10.test_list:
            if (folder / fname).exists() and not cifar.check_integrity(str(folder / fname), md5):
                raise DatasetUnavailable(
                    f"the CIFAR-10 file {folder / fname} is corrupt or truncated (its checksum does not match): "
                    f"delete it (or the folder {folder}) and put cifar-10-python.tar.gz into {Path(root).resolve()}, "
                    f"or let torchvision download it")
    try:
        train, test = (CIFAR10(root, train=t, download=True) for t in (True, False))
    except Exception as e:  # offline: URLError, OSError, RuntimeError...
        raise DatasetUnavailable(
            f"CIFAR-10 is not in {Path(root).resolve()} and could not be downloaded ({e}). "
            f"Put cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) or its "
            f"extracted folder cifar-10-batches-py/ into {Path(root).resolve()}, or set DATA_DIR to the "
            f"folder that holds it. To work offline, set DATASET to the path of an image folder or archive of "
            f"CIFAR-10 (a JPEG copy, say: README, Data), or use DATASET=synthetic, or DATASET=fashion-mnist with "
            f"the Debian package dataset-fashion-mnist installed."
        ) from e
    return _to_tensors(train), _to_tensors(test), list(train.classes)


def load_fashion_mnist(root):
    """Fashion-MNIST, padded to 32x32: the Debian package's files read in place, else torchvision."""
    from torchvision.datasets import FashionMNIST

    debian = {f: DEBIAN_FASHION_MNIST / f"{f}-ubyte.gz" for f in
              ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    if all(p.exists() for p in debian.values()):
        x, y, tx, ty = (_read_idx_gz(p) for p in debian.values())
        train, test = (x[:, None], y.long()), (tx[:, None], ty.long())
    else:
        raw = Path(root) / "FashionMNIST" / "raw"
        if not raw.is_dir():  # to be downloaded; files already there are only read
            writable_dir(root)
        try:
            with _alone(root, "fashion-mnist"):  # a second notebook started at once waits
                train, test = (_to_tensors(FashionMNIST(root, train=t, download=True)) for t in (True, False))
        except Exception as e:
            raise DatasetUnavailable(
                f"Fashion-MNIST is not in {Path(root).resolve()} and could not be downloaded, or its files in "
                f"{raw.resolve()} are damaged ({e}). Install the Debian package (apt-get install "
                f"dataset-fashion-mnist), or delete {raw.resolve()} and put the four *-ubyte.gz files there, "
                f"or use DATASET=synthetic."
            ) from e
    pad = lambda t: F.pad(t, (2, 2, 2, 2))  # 28x28 -> 32x32, zero border like the background
    return (pad(train[0]), train[1]), (pad(test[0]), test[1]), list(FashionMNIST.classes)


def _read_idx_gz(path):
    """A gzipped IDX file (the MNIST format) as a uint8 tensor of the shape in its header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, cut short, or damaged inside
        raise DatasetUnavailable(f"{path} cannot be read ({e}): reinstall the package that holds it") from e
    ndim = raw[3] if len(raw) >= 4 and raw[:3] == b"\0\0\x08" else 0  # two zeros, 8 for uint8, the rank
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if ndim and len(raw) >= header else ()
    if not shape or len(raw) - header != math.prod(shape):
        raise DatasetUnavailable(f"{path} is not a whole IDX file of uint8 (its header or its length is wrong): "
                                 f"reinstall the package that holds it")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


# ----------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")  # a GIF's first frame
IMAGE_KINDS = ", ".join(suffix[1:] for suffix in IMAGE_SUFFIXES)  # for messages
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")


def folder_name(path):
    """A dataset's name from its folder or archive: the base name without the archive suffix (of the folder
    itself for '.' or '..')."""
    name = Path(os.path.abspath(path)).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def find_image_folder(name, root):
    """The folder or archive that `name` means: a path, or a short name looked up in root (also in the
    current folder; an error if it names a different dataset in each)."""
    path = Path(name).expanduser()
    if not name:  # not DATA_DIR itself
        raise ValueError(f"the dataset's name is empty; choose one of {', '.join(DATASETS)}, or give an image "
                         f"folder or archive")
    if os.sep in name or "/" in name or name in (".", ".."):
        if path.exists():
            return path
        raise FileNotFoundError(
            f"dataset path {name!r} does not exist; give a folder or a .tar/.tar.gz archive laid out "
            f"as train/<class>/*.jpg and test/<class>/*.jpg")
    suffixes = () if name.endswith(ARCHIVE_SUFFIXES) else ARCHIVE_SUFFIXES  # an archive's name as it is, too
    in_root = [c for c in [root / name] + [root / f"{name}{s}" for s in suffixes] if c.exists()]
    if in_root and path.exists() and not path.samefile(in_root[0]):
        raise ValueError(f"dataset {name!r} is both {in_root[0]} (in DATA_DIR) and {path.resolve()} (in the "
                         f"current folder): give the one you mean as a path, {str(in_root[0])!r} or "
                         f"{os.path.join('.', name)!r}")
    if in_root:
        return in_root[0]
    if path.exists():
        return path
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, give the path of an image folder "
        f"or archive (train/<class>/*, test/<class>/*), or put "
        f"{name if suffixes == () else f'{name}.tar.gz or the folder {name}/'} into {root.resolve()} (DATA_DIR)"
        + (f"; {name}.zip there is not read: extract it" if (root / f"{name}.zip").exists() else ""))


CACHE_FORMAT = 3  # a cache decoded by an older loader (one that merged a second copy of the dataset, or skipped an
                  # archive's linked images, kept both copies of an image added twice, or left a photo's EXIF
                  # orientation unapplied) is decoded again


def load_image_folder(path, root):
    """An image-folder dataset, decoded once into a uint8 cache in root, read from it afterwards (root need
    be writable only for the decode)."""
    path = Path(path)
    files = _list_archive(path) if path.is_file() else _list_folder(path)
    key = hashlib.sha256(repr((CACHE_FORMAT, files)).encode()).hexdigest()[:16]
    cache = root / f"{folder_name(path)}.{key}.pt"
    _remove_killed_writes(root, folder_name(path))
    c = _read_cache(cache)
    if c is None:
        writable_dir(root)  # before the decode, not after it
        c = dict(_decode_image_folder(path, files), source=os.path.realpath(path))
        try:
            atomic_write(cache, lambda tmp: torch.save(c, tmp))
        except (OSError, RuntimeError) as e:  # a full disk (torch's writer raises RuntimeError): the decoded images
            if not isinstance(e, OSError) and "writ" not in str(e):  # serve this load all the same; not another bug
                raise
            warn(f"the decoded {path.name} could not be cached in {root} ({e}); it is decoded again on the next load")
        else:
            _remove_stale_caches(root, path, cache)
    return _mixed(c["train_x"], c["train_y"]), _mixed(c["test_x"], c["test_y"]), list(c["classes"])


def _remove_killed_writes(root, name):
    """Delete the temporary files (atomic_write's) of this dataset's caches whose decode was killed outright, each
    as large as a cache, once an hour old: one that another process is writing now stays."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.pt\.[0-9a-f]{{12}}\.tmp")  # not another's
    for killed in root.glob(f".{glob.escape(name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or a DATA_DIR that is read-only
            if pattern.fullmatch(killed.name) and time.time() - killed.stat().st_mtime > 3600:
                killed.unlink()


def _remove_stale_caches(root, path, cache):
    """Delete the older caches of this dataset: those of its name (not of another whose name starts the same)
    decoded from this path, or from a path that is gone (a moved folder). A dataset of the same name
    elsewhere keeps its cache, so that loading the two in turn does not decode each again."""
    name = folder_name(path)
    for stale in root.glob(f"{glob.escape(name)}.*.pt"):
        if stale == cache or not re.fullmatch(rf"{re.escape(name)}\.[0-9a-f]{{16}}\.pt", stale.name):
            continue
        source = _cached_source(stale)
        if source is None or source == os.path.realpath(path) or not os.path.exists(source):
            with contextlib.suppress(OSError):  # another load removed it already, or holds it open (Windows)
                stale.unlink()


def _cached_source(cache):
    """The path a cache was decoded from, read without its images; None if it is not recorded (an older
    cache) or the cache cannot be read."""
    try:
        return torch.load(cache, weights_only=True, mmap=True).get("source")
    except Exception:  # a damaged cache: nothing worth keeping
        return None


def _read_cache(cache):
    """The decoded dataset saved in `cache`; None if there is none, or it cannot be read (cut short by a full
    disk or a partial copy), so that it is decoded anew."""
    if not cache.exists():
        return None
    try:
        return torch.load(cache, weights_only=True)
    except Exception as e:  # torch.load raises RuntimeError, EOFError or pickle's errors for a damaged file
        warn(f"the cache {cache} cannot be read ({e}); decoding the dataset again")
        return None


def _mixed(x, y):
    """The images in one fixed random order, the same on every machine and for every seed. A folder
    lists them class by class; CIFAR-10's own files mix the classes, and so must anything that takes
    the first images of a set (the notebooks' examples, colour statistics and whitening patches)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def _list_folder(path):
    """(relative path, size, mtime) of every image file under a folder, sorted: the cache key's input. Other
    files (.DS_Store, notes) do not count."""
    out = []
    for f in _tree(path):
        if f.is_file() and _is_image(f.name):
            st = f.stat()
            out.append((f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _tree(path):
    """Every folder and file under path, sorted, through symbolic links to folders too (which rglob skips)."""
    found = []
    for folder, dirs, files in os.walk(path, followlinks=True):
        found += [Path(folder) / name for name in dirs + files]
        for name in dirs:
            _check_no_loop(path, Path(folder) / name)
    return sorted(found)


def _check_no_loop(path, folder):
    """An error if `folder`, under `path`, is a link to a folder that holds it (its parent or one above, out
    of the tree too): the walk would not end."""
    real = os.path.realpath(folder)
    above = folder.parent
    while True:
        if _holds(real, os.path.realpath(above)):
            raise ValueError(f"{folder} links to {real}, a folder that holds it, so the tree under {path} never ends: "
                             f"remove the link or point it elsewhere")
        if above == path:
            return
        above = above.parent


def _holds(folder, path):
    """Whether `folder` is `path` or one of the folders above it (not on another drive, on Windows)."""
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # paths on two drives
        return False


def _list_archive(path):
    """An archive is keyed by its name and the digest of its bytes, one read of the file (its listing would mean
    decompressing it): an archive replaced by another of the same size and time (`cp -p`) is decoded again."""
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise ValueError(f"{path} is a file but not a .tar or .tar.gz archive; give a folder or an archive")
    with open(path, "rb") as f:
        return [(path.name, hashlib.file_digest(f, "sha256").hexdigest())]


def _read_files(path):
    """Yield (relative posix path, read) for each image of a folder or archive, read() giving its bytes (call it
    before the next item, and only for an image that counts), and (path, None) for each folder, in any order."""
    if path.is_dir():
        for f in _tree(path):
            if f.is_dir() or _is_image(f.name):
                yield f.relative_to(path).as_posix(), None if f.is_dir() else functools.partial(_file_bytes, path, f)
        return
    with tarfile.open(path, "r:*") as tar:
        for member in tar:  # an image stored as a link (a hard link, a symbolic one) too, as its folder holds it
            if member.isdir() or ((member.isfile() or member.islnk() or member.issym()) and _is_image(member.name)):
                yield member.name, None if member.isdir() else functools.partial(_member_bytes, path, tar, member)


def _file_bytes(path, f):
    """The bytes of a folder's image file; an error naming one that cannot be read (a link to nothing, no
    permission, not a file: a pipe would never end)."""
    rel = f.relative_to(path).as_posix()
    if not f.is_file():
        raise ValueError(f"{rel} in {path} is {'a link to nothing' if f.is_symlink() else 'not a file'}: "
                         f"remove it or put the image there")
    try:
        return f.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {rel} in {path} ({e.strerror or e}): fix its permissions or remove it") from e


def _member_bytes(path, tar, member):
    """The bytes of an archive's file, or of the file it links to; an error naming a link to no file."""
    try:
        f = tar.extractfile(member)
    except (KeyError, RecursionError):  # a link to a name the archive does not hold, a loop of links
        f = None
    if f is None:  # (also a link to a folder)
        raise ValueError(f"{member.name} in {path} links to {member.linkname}, which is no file the archive holds; "
                         f"add the file or remove the link")
    return f.read()


def _is_image(name):
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


def _place(rel, is_dir):
    """(root, split, class) of the folder train/<class> or of an image in it: root '.', or the one wrapping
    folder allowed (an archive of the folder itself: <name>/train/<class>/<file>). None for anything else,
    hidden folders (.ipynb_checkpoints) included; an error for an image in train/ or test/ but not straight
    in a class folder, which would be left out."""
    parts, root = [p for p in rel.split("/") if p not in ("", ".")], "."
    if any(p.startswith(".") for p in parts):
        return None
    if len(parts) > 1 and parts[0] not in SPLITS and parts[1] in SPLITS:
        root, parts = parts[0], parts[1:]
    if parts and parts[0] in SPLITS and len(parts) == (2 if is_dir else 3):
        return root, parts[0], parts[1]
    if parts and parts[0] in SPLITS and not is_dir:
        raise ValueError(f"the image {rel} is not straight in a class folder: images go into "
                         f"{parts[0]}/<class>/<image>, one folder per class; move it there or delete it")
    return None


def _placed(path, rel, is_dir):
    """_place(rel, is_dir), its error naming the dataset's path."""
    try:
        return _place(rel, is_dir)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _decode_image_folder(path, files):
    """Decode every image of the tree into uint8 tensors; checks the layout and classes (a folder's before
    anything is decoded, an archive's as it decodes) and the sizes (a folder's image by image)."""
    from PIL import Image, ImageOps

    images = {split: {} for split in SPLITS}  # split -> class -> {file name: (relative path, HxW(x3) array)}
    left_out, first = {}, None
    total = sum(1 for f in files if _is_image(f[0])) or None  # unknown for an archive
    folder = path.is_dir()
    if folder:  # listed, not read
        _check_classes(path, _layout(path))
    try:
        for split, cls, rel, read in tqdm(_dataset_files(path, left_out), desc=f"decoding {path.name}",
                                          unit=" files", total=total):
            found = images[split].setdefault(cls, {})
            if read is None:
                continue
            blob = read()
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    array = _pixels(ImageOps.exif_transpose(im))  # a photo turned as its camera says
            except Exception as e:
                raise ValueError(f"cannot read the image {rel} in {path} ({e}); delete or replace it") from e
            if folder:  # (an archive's image may be replaced by a later copy: its sizes are checked after)
                first = _check_size(path, first, rel, array)
            found[rel.rsplit("/", 1)[-1]] = rel, array  # by file name: an image added to an archive twice (tar -r,
                                                        # with or without ./) is its last copy, as extracting it gives
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # a download cut short, a web page
        raise ValueError(f"{path} cannot be read as a .tar or .tar.gz archive ({type(e).__name__}: {e}): it is "
                         f"damaged or cut short; download or copy it again") from e
    if left_out:
        warn(f"{path}: the images in {', '.join(f'{folder}/ ({n})' for folder, n in sorted(left_out.items()))} are "
             f"left out: only train/<class>/ and test/<class>/ are read, and the validation images are drawn from "
             f"train/ (move any there)")
    classes = _check_classes(path, images)
    for split in SPLITS:
        for cls in classes:
            for rel, array in images[split][cls].values():
                first = _check_size(path, first, rel, array)
    return dict(classes=classes, **_stacked(images, classes, first[1]))


def _dataset_files(path, left_out):
    """Yield (split, class, relative path, read) for each image of the dataset's train/<class>/ and
    test/<class>/ folders, and (split, class, path, None) for each class folder (_read_files); an error where
    they are in more than one place (a leftover copy would put twins on both sides of train/val). The images
    of other folders of class folders (val/<class>/, not the dataset's own wrapping folder) are counted in
    left_out {folder: images}."""
    roots, outside, folders = set(), {}, []
    for rel, read in _read_files(path):
        place = _placed(path, rel, read is None)
        if place is None:
            folder = read is not None and _outside_splits(rel)
            if folder:
                outside[folder] = outside.get(folder, 0) + 1
        elif read is None:  # a class folder: kept until the images say where the dataset is
            folders.append((place, rel))
        else:
            roots.add(place[0])  # images only: an empty leftover folder is no copy, nor are its classes
            if len(roots) > 1:
                raise ValueError(f"{path} holds train/ and test/ in more than one place: "
                                 f"{', '.join(sorted(roots))}; keep one copy of the dataset")
            yield place[1], place[2], rel, read
    yield from ((split, cls, rel, None) for (root, split, cls), rel in folders if root in roots or not roots)
    left_out.update({folder: n for folder, n in outside.items() if folder not in roots})


def _stacked(images, classes, size):
    """{split_x: (N, C, H, W) uint8, split_y: (N,) int64} of {split: {class: {file name: (path, array)}}}, each split's
    images class by class and by file name; each array is dropped as it is copied, so that the images are
    held about once, not twice. Grayscale images are repeated on three channels where any is in colour."""
    channels = 3 if any(a.ndim == 3 for s in images.values() for c in s.values() for _, a in c.values()) else 1
    out = {}
    for split in SPLITS:
        names = [(label, name) for label, cls in enumerate(classes) for name in sorted(images[split][cls])]
        x = torch.empty(len(names), channels, *size, dtype=torch.uint8)
        view = x.numpy()  # written through NumPy: PIL's arrays are read-only, which torch.from_numpy warns about
        for i, (label, name) in enumerate(names):
            _, a = images[split][classes[label]].pop(name)
            view[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a  # (H, W): the same on every channel
        out[f"{split}_x"], out[f"{split}_y"] = x, torch.tensor([label for label, _ in names], dtype=torch.int64)
    return out


def _layout(path):
    """{split: {class: number of images}} of a folder, from its listing: its layout checked (_dataset_files)."""
    layout = {split: {} for split in SPLITS}
    for split, cls, _, read in _dataset_files(path, {}):
        layout[split][cls] = layout[split].get(cls, 0) + (read is not None)
    return layout


def _outside_splits(rel):
    """The folder of class folders that an image outside train/ and test/ sits in (val/ of val/cat/1.png), or
    None: an image one level down (a figure beside a README) or hidden is no dataset's."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if len(parts) < 3 or any(p.startswith(".") for p in parts):
        return None
    return "/".join(parts[:-2])


def _check_classes(path, images):
    """The sorted class names; errors for a missing split, differing class folders or an empty class."""
    for split in SPLITS:
        if not images[split]:
            raise ValueError(f"no {split}/<class>/ folders in {path}: expected train/<class>/<image> and "
                             f"test/<class>/<image> ({IMAGE_KINDS}), one folder per class")
    train, test = set(images["train"]), set(images["test"])
    undecodable = sorted(name for name in train | test if not _utf8(name))
    if undecodable:  # the file system's bytes, not UTF-8: no page or file could be written with the name
        raise ValueError(f"class folder names in {path} are not UTF-8 text: {undecodable}; rename them")
    if train != test:
        raise ValueError(f"the class folders of train/ and test/ differ in {path}: only in train/: "
                         f"{sorted(train - test) or 'none'}; only in test/: {sorted(test - train) or 'none'}")
    for split in SPLITS:
        for cls in sorted(images[split]):
            if not images[split][cls]:
                raise ValueError(f"the class folder {split}/{cls}/ in {path} has no images ({IMAGE_KINDS}); "
                                 f"add images or remove the class from train/ and test/")
    return sorted(train)


def _utf8(name):
    """Whether a name from the file system is text (a byte it could not decode comes as a lone surrogate)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a surrogate standing for a byte the walk could not decode
        return False


def _pixels(im):
    """A PIL image as uint8 (H, W) for grayscale or (H, W, 3) for colour; 16-bit grayscale (modes I;16 and
    I, 0..65535) scaled to 0..255, which PIL's convert('L') would clip at 255 instead."""
    if im.mode.startswith("I"):
        return (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
    return np.asarray(im.convert("L" if im.mode in ("1", "L", "LA", "F") else "RGB"))


def _check_size(path, first, rel, array):
    """(relative path, (H, W)) of the first image checked; an error naming it and `rel` where this image's size
    differs: all images share one size (a folder's checked as they decode, not after the whole set)."""
    if first is None:
        return rel, array.shape[:2]
    if array.shape[:2] != first[1]:
        raise ValueError(f"images of different sizes in {path}: {first[0]} is {first[1][1]}x{first[1][0]} and "
                         f"{rel} is {array.shape[1]}x{array.shape[0]} (width x height); resize them to one size")
    return first


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = [
    "red horizontal stripes", "green vertical stripes", "blue checkerboard", "yellow disc",
    "cyan ring", "magenta cross", "orange diagonal X", "white corners", "purple blob", "teal fine grid",
]


def synthetic_templates():
    """The 10 planted features: (10, 3, 32, 32) in [0, 1], each a pattern in its own colour.

    Every pattern is symmetric under a horizontal flip, so flip augmentation keeps the class.
    """
    r = torch.arange(32, dtype=torch.float32) - 15.5
    yy, xx = r[:, None].expand(32, 32), r[None, :].expand(32, 32)
    rad = (yy ** 2 + xx ** 2).sqrt()
    two_pi = 2 * math.pi
    patterns = [
        torch.cos(two_pi * yy / 8),                                   # horizontal stripes
        torch.cos(two_pi * xx / 8),                                   # vertical stripes
        torch.sign(torch.cos(two_pi * yy / 8) * torch.cos(two_pi * xx / 8)),  # checkerboard
        (rad < 9).float() * 2 - 1,                                    # disc
        ((rad > 8) & (rad < 13)).float() * 2 - 1,                     # ring
        ((yy.abs() < 3) | (xx.abs() < 3)).float() * 2 - 1,           # cross
        (((yy - xx).abs() < 3) | ((yy + xx).abs() < 3)).float() * 2 - 1,  # diagonal X
        ((yy.abs() > 9) & (xx.abs() > 9)).float() * 2 - 1,           # corners
        torch.exp(-rad ** 2 / 60) * 2 - 1,                            # soft blob
        torch.cos(two_pi * yy / 4) * torch.cos(two_pi * xx / 4),      # fine grid
    ]
    colours = torch.tensor([
        [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1],
        [1, -1, 1], [1, 0, -1], [1, 1, 1], [0.2, -1, 1], [-1, 0.5, 0.2],
    ], dtype=torch.float32)
    patterns = torch.stack(patterns)  # (10, 32, 32) in [-1, 1]
    return (0.5 + 0.45 * patterns[:, None] * colours[:, :, None, None]).clamp(0, 1)


def _check_sizes_of_sets(n_train, n_test):
    """Errors that name n_train or n_test where either is no count of images (the split checks n_train's size)."""
    check_count("n_train", n_train, 0)
    check_count("n_test", n_test, 0)


def make_synthetic(n_train=10000, n_test=2000, seed=0, noise=0.12):
    """A deterministic 10-class dataset whose defining feature per class is known (the templates).

    Each image is its class template at a random contrast on a random background tint, plus noise.
    """
    _check_sizes_of_sets(n_train, n_test)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < math.inf:
        raise ValueError(f"noise must be a finite number >= 0 (the noise's SD, in [0, 1] units), got {noise!r}")
    templates = synthetic_templates()
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=gen)]
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.1, generator=gen)
        tint = torch.empty(n, 3, 1, 1).uniform_(-0.1, 0.1, generator=gen)
        eps = torch.randn(n, 3, 32, 32, generator=gen) * noise
        x = 0.5 + contrast * (templates[y] - 0.5) + tint + eps
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return draw(n_train), draw(n_test), list(SYNTHETIC_CLASSES), templates


# ----------------------------------------------------------------------------- the harder synthetic set
# Each class is a Gabor patch: a grating along a colour axis, horizontal or vertical, coarse or fine. In
# every image it sits at a random position, phase and scale over a textured background, beside faint
# patches of two other classes; metrics.PlantedDetector finds it wherever it is and however large.

COLOUR_AXES = dict(luminance=(1.0, 1.0, 1.0), red_green=(1.0, -1.0, 0.0), yellow_blue=(0.5, 0.5, -1.0))
HARD_FEATURES = [  # (colour axis, stripes, wavelength in px): the 10 classes, each symmetric under a flip
    (axis, stripes, wavelength) for axis in COLOUR_AXES for wavelength in (8.0, 4.0) for stripes in ("horizontal", "vertical")
    if not (axis == "luminance" and wavelength == 4.0)]
HARD_SCALE = (0.85, 1.2)  # each patch's random scale: of its wavelength and its envelope
HARD_ENVELOPE = 0.75      # the Gaussian envelope's sigma, in wavelengths


def hard_wavelength(feature, size, scale=1.0):
    """A HARD_FEATURES entry's wavelength in px for images of side `size` (its figure is at 32 px)."""
    return feature[2] * scale * size / 32


def gabor_patches(features, size, gen, amplitude):
    """(N, 3, size, size) one Gabor patch per entry of features (HARD_FEATURES entries), each at a random
    centre, phase and scale, with the given peak amplitude."""
    n = len(features)
    u = torch.rand(n, 4, generator=gen)
    centre = size * (0.3 + 0.4 * u[:, :2])                         # (N, 2) y, x: away from the border
    phase = 2 * math.pi * u[:, 2]
    scale = HARD_SCALE[0] + (HARD_SCALE[1] - HARD_SCALE[0]) * u[:, 3]
    wavelength = torch.tensor([hard_wavelength(f, size) for f in features], dtype=torch.float32) * scale
    vertical = torch.tensor([f[1] == "vertical" for f in features], dtype=torch.bool)  # typed: n may be 0
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = r.view(1, -1, 1) - centre[:, 0, None, None], r.view(1, 1, -1) - centre[:, 1, None, None]
    across = torch.where(vertical[:, None, None], xx, yy)          # the stripes vary along this axis
    sigma = (HARD_ENVELOPE * wavelength)[:, None, None]
    patch = torch.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2)) * torch.cos(
        2 * math.pi * across / wavelength[:, None, None] + phase[:, None, None])
    axes = torch.tensor([COLOUR_AXES[f[0]] for f in features], dtype=torch.float32).view(n, 3)
    return amplitude * patch[:, None] * axes[:, :, None, None]


def textured_background(n, size, gen, contrast=0.08):
    """(N, 3, size, size) zero-mean colour noise with a 1/f spectrum (like natural texture), RMS `contrast`."""
    if n == 0:  # MKL's FFT refuses an empty batch
        return torch.zeros(0, 3, size, size)
    f = (torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None] ** 2).sqrt().clamp_min(1 / size)
    spec = torch.randn(n, 3, size, size // 2 + 1, 2, generator=gen) / f[..., None]
    x = torch.fft.irfft2(torch.view_as_complex(spec), s=(size, size))
    x = x - x.mean((2, 3), keepdim=True)
    return contrast * x / x.pow(2).mean((1, 2, 3), keepdim=True).sqrt()


def make_synthetic_hard(n_train=10000, n_test=2000, seed=0, size=32):
    """A deterministic 10-class dataset whose classes are HARD_FEATURES: each image is its class's patch
    (random position, phase, scale) over a textured, tinted background, with faint patches of two other
    classes as distractors. The class is in the patch only: no fixed position, no template."""
    _check_sizes_of_sets(n_train, n_test)
    # the fine stripes' wavelength, 4 px x 0.85 at 32 px, falls under 2 px (and aliases) below 19 px, and the
    # detector's band-pass filters (metrics.PlantedDetector) pass their whole band from about 27 px up
    check_count("size", size, 28)
    gen = torch.Generator().manual_seed(seed + 1000)
    k = len(HARD_FEATURES)

    def draw(n):
        y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
        others = (y[:, None] + torch.randint(1, k, (n, 2), generator=gen)) % k  # two other classes
        x = 0.5 + textured_background(n, size, gen) + torch.empty(n, 3, 1, 1).uniform_(-0.1, 0.1, generator=gen)
        x = x + gabor_patches([HARD_FEATURES[i] for i in y.tolist()], size, gen, amplitude=0.3)
        for j in range(2):
            x = x + gabor_patches([HARD_FEATURES[i] for i in others[:, j].tolist()], size, gen, amplitude=0.08)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    classes = [f"{axis.replace('_', '-')} {stripes} {'coarse' if w == 8.0 else 'fine'}" for axis, stripes, w in HARD_FEATURES]
    return draw(n_train), draw(n_test), classes


# ----------------------------------------------------------------------------- loader

class Loader:
    """Batches of (images in [0, 1], labels) sliced from uint8 tensors, augmented on their device.

    Augmentation (train only): random translate by up to `translate` px with reflect padding, and a
    random horizontal flip; both vectorized over the batch. Labels stay aligned with their images.
    """

    def __init__(self, x, y, batch_size=1024, shuffle=False, augment=False, translate=2,
                 drop_last=False, device="cpu", seed=0, channels_last=False):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            raise TypeError(f"Loader takes uint8 images (N, C, H, W) in [0, 255], as data.load_data returns; "
                            f"got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4:
            raise ValueError(f"Loader takes images (N, C, H, W); got shape {tuple(x.shape)}")
        check_count("batch_size", batch_size, 1)
        y = check_labels(y, len(x), name="y")
        if augment:
            check_count("translate", translate, 0)
            if translate >= min(x.shape[-2:]):
                raise ValueError(f"translate must be from 0 to {min(x.shape[-2:]) - 1} px for {tuple(x.shape[-2:])} "
                                 f"images (reflect padding); got {translate}")
        self.x, self.y = x.to(device), y.to(device)  # uint8 (N, C, H, W), int64 (N,)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.translate, self.drop_last, self.device = translate, drop_last, torch.device(device)
        self.channels_last = channels_last
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self):
        n = len(self.y) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        n = len(self.y)
        order = (torch.randperm(n, generator=self.gen, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = self.augment_batch(x)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[idx]

    def augment_batch(self, x):
        """Random translate (with reflection at the border) and horizontal flip, per image."""
        r = self.translate
        dy, dx = torch.randint(-r, r + 1, (2, len(x)), generator=self.gen, device=x.device)
        flip = torch.rand(len(x), generator=self.gen, device=x.device) < 0.5
        return shift(x, dy, dx, flip)


def shift(x, dy, dx, flip=None):
    """Translate each image (B, C, H, W) by its own (dy, dx) px, reflecting at the border, and mirror
    it where flip (B,) is True: one gather, any dtype, differentiable."""
    b, c, h, w = x.shape
    i = torch.arange(h, device=x.device).view(1, h, 1)
    j = torch.arange(w, device=x.device).view(1, 1, w)
    if flip is not None:
        j = torch.where(flip.view(b, 1, 1), w - 1 - j, j)  # (B, 1, W): a flip reverses the columns
    rows = _reflect(i - dy.view(b, 1, 1), h)  # (B, H, 1): output row i reads input row i - dy
    cols = _reflect(j - dx.view(b, 1, 1), w)  # (B, 1, W)
    index = (rows * w + cols).view(b, 1, h * w)
    return x.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


def _reflect(k, n):
    """Indices reflected into [0, n) like reflect padding: -1 -> 1, n -> n - 2."""
    k = k.abs()
    return torch.where(k >= n, 2 * (n - 1) - k, k)
