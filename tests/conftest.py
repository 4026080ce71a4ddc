import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic():
    """A small synthetic dataset shared by the tests."""
    import data
    return data.load_data("synthetic", n_train=3000, n_test=600, seed=0)
