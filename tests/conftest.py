import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic():
    """A small synthetic dataset shared by the tests."""
    import data
    return data.load_data("synthetic", n_train=3000, n_test=600, seed=0)


CIFAR10_JPEG = Path(os.environ.get("CIFAR10_JPEG") or
                    Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")


def missing(reason):
    """A dataset the tests need is missing: skip, or fail under CI (whose run provides it)."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cifar10_jpeg_path():
    """The CIFAR-10 JPEG archive (CIFAR10_JPEG, else ../shared/data/); missing: skip, or fail under CI."""
    if not CIFAR10_JPEG.exists():
        missing(f"the CIFAR-10 JPEG archive is not at {CIFAR10_JPEG} (set CIFAR10_JPEG to its path)")
    return CIFAR10_JPEG


@pytest.fixture(scope="session")
def debian_fashion_mnist():
    """Fashion-MNIST from the Debian package dataset-fashion-mnist (.ci/run installs it); missing: skip, or fail
    under CI."""
    import data
    if not data.DEBIAN_FASHION_MNIST.exists():
        missing(f"dataset-fashion-mnist is not installed (no {data.DEBIAN_FASHION_MNIST})")


@pytest.fixture(scope="session")
def cifar10_jpeg(cifar10_jpeg_path, tmp_path_factory):
    """(DATA_DIR holding its decoded cache, Data) of the CIFAR-10 JPEG copy, decoded once per session."""
    import data
    root = tmp_path_factory.mktemp("cifar10-jpeg-cache")
    return root, data.load_data(str(cifar10_jpeg_path), root)
