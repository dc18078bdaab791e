import pickle
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _mnist1d_cache(tmp_path_factory):
    """MNIST-1D is generated once per test session into a temporary cache, never into the user's cache folder."""
    import os

    folder = tmp_path_factory.mktemp("lightning-tricks-cache")
    old = os.environ.get("LIGHTNING_TRICKS_CACHE")
    os.environ["LIGHTNING_TRICKS_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LIGHTNING_TRICKS_CACHE", None)
    else:
        os.environ["LIGHTNING_TRICKS_CACHE"] = old


# tiny models: one intra-op thread is faster, and 2-process DDP tests do not oversubscribe the cores
torch.set_num_threads(1)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar_folder(root: Path, per_class_per_batch: int = 3, seed: int = 0) -> Path:
    """A tiny CIFAR-10 folder in the exact python-pickle layout of ``cifar-10-batches-py``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str) -> None:
        labels = [c for c in range(10) for _ in range(per_class_per_batch)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}")
    batch("test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": 30,
                     b"num_vis": 3072}, f)
    return folder


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    return make_cifar_folder(tmp_path)
