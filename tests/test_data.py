import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_tricks.zoo import CIFAR10DataModule, DigitsDataModule, SyntheticDataModule


def _labels(dataset):
    return dataset.tensors[1] if hasattr(dataset, "tensors") else dataset.labels


def _images(dataset):
    return dataset.tensors[0] if hasattr(dataset, "tensors") else dataset.images


def test_digits_split_sizes_disjoint_and_stratified():
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.1)
    dm.setup("fit")
    splits = [dm.train_set, dm.val_set, dm.test_set]
    sizes = [len(s) for s in splits]
    assert sum(sizes) == 1797 and sizes[1] == round(1797 * 0.2) and sizes[2] == round(1797 * 0.1)
    overall = Counter(load_digits().target.tolist())
    for split in splits:
        counts = Counter(_labels(split).tolist())
        for c in range(10):
            expected = overall[c] * len(split) / 1797
            assert abs(counts[c] - expected) <= 1.0, (c, counts[c], expected)
    # a partition: together the splits hold every raw image exactly once (as a multiset)
    raw = load_digits().images.reshape(1797, -1)
    recovered = torch.cat([(_images(s) * dm.std + dm.mean) for s in splits]).flatten(1) * 16
    as_rows = Counter(map(tuple, np.round(recovered.numpy()).astype(int).tolist()))
    assert as_rows == Counter(map(tuple, raw.astype(int).tolist()))


def test_digits_normalization_uses_training_split_only():
    dm = DigitsDataModule(resize_to=None)
    dm.setup("fit")
    train = _images(dm.train_set)
    assert train.mean().abs() < 1e-5 and (train.std() - 1).abs() < 1e-3
    # the statistics equal those of the raw training images, not of all images
    raw_train = train * dm.std + dm.mean
    assert torch.allclose(dm.mean.flatten(), raw_train.mean().reshape(1), atol=1e-6)
    raw_all = torch.tensor(load_digits().images, dtype=torch.float32) / 16
    assert not torch.allclose(dm.mean.flatten(), raw_all.mean().reshape(1), atol=1e-5)
    val = _images(dm.val_set)
    assert val.mean().abs() > 1e-4  # not re-centred on its own statistics


def test_digits_seeded_and_resized_and_subset():
    a, b, c = DigitsDataModule(split_seed=1), DigitsDataModule(split_seed=1), DigitsDataModule(split_seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(_images(a.train_set), _images(b.train_set))
    assert not torch.equal(_images(a.train_set), _images(c.train_set))
    dm = DigitsDataModule(resize_to=32, train_subset=300, batch_size=16)
    dm.setup("fit")
    assert dm.image_size == 32 and _images(dm.train_set).shape == (300, 1, 32, 32)
    counts = Counter(_labels(dm.train_set).tolist())
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.long


@pytest.mark.parametrize("kwargs,match", [
    ({"val_fraction": 0.0}, r"`val_fraction`=0.0 is invalid: expected a number in \(0.0, 1.0\)"),
    ({"val_fraction": 1.5}, r"`val_fraction`=1.5 is invalid"),
    ({"test_fraction": -0.1}, r"`test_fraction`=-0.1 is invalid: expected a number in \[0.0, 1.0\)"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, r"`val_fraction`\+`test_fraction`=1.1 is invalid"),
    ({"train_subset": 5}, r"`train_subset`=5 is invalid: expected an integer in \[10, 1257\]"),
    ({"train_subset": 5000}, r"`train_subset`=5000 is invalid"),
    ({"batch_size": 0}, r"`batch_size`=0 is invalid: expected an integer in \[1, inf\]"),
])
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_cifar_folder_loads(cifar_dir):
    for path in (cifar_dir, cifar_dir.parent):  # the folder itself or its parent
        dm = CIFAR10DataModule(str(path), val_size=10, batch_size=4, augment=False)
        dm.setup("fit")
        assert len(dm.train_set) == 140 and len(dm.val_set) == 10 and len(dm.test_set) == 30
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # pixel values are the stored bytes / 255, normalized by training statistics
    with open(cifar_dir / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    test_x = _images(dm.test_set) * dm.std + dm.mean
    expected = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(test_x, expected, atol=1e-5)
    assert _labels(dm.test_set).tolist() == raw[b"labels"]


def test_cifar_augmentation_keeps_shape_and_labels(cifar_dir):
    dm = CIFAR10DataModule(str(cifar_dir), val_size=10, batch_size=8, augment=True)
    dm.setup("fit")
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and int(y) == int(dm.train_set.labels[0])


def test_cifar_missing_folder_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"`data_dir`=.*nowhere' does not exist: expected a folder with data_batch_1"):
        CIFAR10DataModule(str(missing))


def test_cifar_missing_file_and_malformed(cifar_dir):
    os.remove(cifar_dir / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        CIFAR10DataModule(str(cifar_dir))
    with open(cifar_dir / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    dm = CIFAR10DataModule(str(cifar_dir), val_size=10)
    with pytest.raises(ValueError, match="data_batch_3' is not a CIFAR-10 python-pickle batch"):
        dm.setup("fit")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_arbitrary_pickles(cifar_dir):
    with open(cifar_dir / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}, f)
    dm = CIFAR10DataModule(str(cifar_dir), val_size=10)
    with pytest.raises(ValueError, match="refusing to load"):
        dm.setup("fit")


def test_cifar_bad_val_size(cifar_dir):
    dm = CIFAR10DataModule(str(cifar_dir), val_size=500)
    with pytest.raises(ValueError, match=r"`val_size`=500 is invalid: expected 0 < val_size < 150"):
        dm.setup("fit")


def test_synthetic_is_seeded_and_learnable_shape():
    dm = SyntheticDataModule(num_samples=40, num_classes=3, image_shape=[2, 5, 7], batch_size=8, seed=3)
    dm.setup("fit")
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (3, 2, 5)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 2, 5, 7) and int(y.max()) < 3
    other = SyntheticDataModule(num_samples=40, num_classes=3, image_shape=[2, 5, 7], seed=3)
    other.setup("fit")
    assert torch.equal(_images(dm.train_set), _images(other.train_set))
    with pytest.raises(ValueError, match="`image_shape`=\\[3, 32\\] is invalid"):
        SyntheticDataModule(image_shape=[3, 32])


def test_train_subset_sorted_indices_are_unique():
    from lightning_tricks.zoo.data import stratified_subset

    labels = np.repeat(np.arange(5), 20)
    idx = stratified_subset(labels, 25, seed=0)
    assert len(set(idx.tolist())) == 25 and Counter(labels[idx].tolist()) == dict.fromkeys(range(5), 5)
