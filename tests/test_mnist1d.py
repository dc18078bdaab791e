"""MNIST-1D in the zoo: generated locally by the `mnist1d` package (checked against it), cached, split as the paper.

The whole session shares one generated copy (tests/conftest.py points the cache at a temporary folder).
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.zoo import MNIST1DDataModule, build_backbone
from lightning_tricks.zoo import mnist1d as m1d
from tests.helpers import REPO


def _package_dataset(shuffle_seq: bool = False) -> dict:
    """The reference: the package's own make_dataset with its default arguments."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.shuffle_seq = shuffle_seq
    return make_dataset(args)


@pytest.fixture(scope="module")
def reference():
    state = np.random.get_state(), random.getstate()
    data = _package_dataset()
    np.random.set_state(state[0])
    random.setstate(state[1])
    return data


def test_arrays_are_the_packages_make_dataset_default_split(reference):
    data = m1d.load_mnist1d()
    assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)
    np.testing.assert_allclose(data["x"], reference["x"].astype(np.float32), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data["y"], reference["y"])
    np.testing.assert_array_equal(data["y_test"], reference["y_test"])
    assert sorted(np.bincount(data["y"], minlength=10)) != [0] * 10 and set(data["y"].tolist()) == set(range(10))


def test_cache_is_written_once_and_read_back_and_global_random_state_kept(tmp_path, monkeypatch):
    path = m1d.cache_path(m1d.mnist1d_args(False), tmp_path)
    assert path.parent == tmp_path and path.name.startswith("mnist1d-") and path.suffix == ".npz"
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    first = m1d.load_mnist1d(cache_dir=tmp_path)  # generates (make_dataset reseeds the global generators)
    assert (np.random.rand(), random.random()) == expected
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    def no_generation(args):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(m1d, "generate_mnist1d", no_generation)
    second = m1d.load_mnist1d(cache_dir=tmp_path)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # the environment variable moves the default cache folder; shuffle_seq is another file
    monkeypatch.setenv(m1d.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert m1d.default_cache_dir() == tmp_path / "elsewhere"
    assert m1d.cache_path(m1d.mnist1d_args(True)) != m1d.cache_path(m1d.mnist1d_args(False))


def test_a_corrupt_cache_file_is_regenerated(tmp_path, monkeypatch):
    fake = {"x": np.ones((4, 40), np.float32), "y": np.arange(4), "x_test": np.zeros((2, 40), np.float32),
            "y_test": np.arange(2)}
    monkeypatch.setattr(m1d, "generate_mnist1d", lambda args: fake)
    path = m1d.cache_path(m1d.mnist1d_args(False), tmp_path)
    path.write_bytes(b"not an npz")
    data = m1d.load_mnist1d(cache_dir=tmp_path)
    assert data["x"].shape == (4, 40)
    with np.load(path) as f:
        np.testing.assert_array_equal(f["x"], fake["x"])


def test_datamodule_shapes_splits_and_normalization():
    dm = MNIST1DDataModule(batch_size=100, val_size=500)
    dm.setup("fit")
    xtr, ytr = dm.tensors("train")
    xva, yva = dm.tensors("val")
    xte, yte = dm.tensors("test")
    assert xtr.shape == (3500, 1, 40) and xva.shape == (500, 1, 40) and xte.shape == (1000, 1, 40)
    assert dm.num_classes == 10 and dm.num_channels == 1 and dm.sequence_length == 40
    # validation is carved from the training part, stratified (class shares as in the 4,000), disjoint from training
    share = np.bincount(m1d.load_mnist1d()["y"], minlength=10) / 4000
    assert np.abs(np.bincount(yva.numpy(), minlength=10) - 500 * share).max() <= 1
    raw = m1d.load_mnist1d()
    raw_train = torch.from_numpy(raw["x"])
    mean, std = dm.mean.flatten(), dm.std.flatten()
    train_raw = xtr[:, 0] * std + mean
    val_raw = xva[:, 0] * std + mean
    rows = {tuple(np.round(r, 4)) for r in raw_train.numpy()}
    assert all(tuple(np.round(r, 4)) in rows for r in train_raw.numpy()[:50])
    assert not {tuple(np.round(r, 4)) for r in train_raw.numpy()} & {tuple(np.round(r, 4)) for r in val_raw.numpy()}
    # statistics from the training split only
    assert torch.allclose(xtr.mean(), torch.tensor(0.0), atol=1e-5) and torch.allclose(xtr.std(), torch.tensor(1.0), atol=1e-3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 40) and y.dtype == torch.long


def test_split_is_fixed_by_split_seed_and_flat_inputs():
    a = MNIST1DDataModule(val_size=200, split_seed=1)
    b = MNIST1DDataModule(val_size=200, split_seed=1, flat=True)
    c = MNIST1DDataModule(val_size=200, split_seed=2)
    xa, ya = a.tensors("val")
    xb, yb = b.tensors("val")
    assert xb.shape == (200, 40) and torch.equal(xa.flatten(1), xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, c.tensors("val")[0])
    full = MNIST1DDataModule(val_size=0)
    assert full.tensors("train")[0].shape == (4000, 1, 40) and len(full.tensors("val")[1]) == 0
    sub = MNIST1DDataModule(val_size=0, train_subset=100)
    assert np.abs(np.bincount(sub.tensors("train")[1].numpy(), minlength=10) - 10).max() <= 1


def test_shuffle_seq_is_one_fixed_permutation_of_the_steps():
    plain = m1d.load_mnist1d(False)
    shuffled = m1d.load_mnist1d(True)
    np.testing.assert_array_equal(plain["y"], shuffled["y"])
    # recover the permutation column by column from the first signals: it must map every signal
    x, xs = plain["x"], shuffled["x"]
    perm = [int(np.argmin(np.abs(x[:64] - xs[:64, [j]]).sum(0))) for j in range(40)]
    assert sorted(perm) == list(range(40)) and perm != list(range(40))
    np.testing.assert_allclose(xs, x[:, perm], atol=1e-5)
    dm = MNIST1DDataModule(shuffle_seq=True, val_size=0)
    assert dm.tensors("train")[0].shape == (4000, 1, 40)


@pytest.mark.parametrize("kwargs", [dict(val_size=-1), dict(val_size=4000), dict(train_subset=5),
                                    dict(val_size=500, train_subset=3600)])
def test_bad_arguments_fail_in_one_line(kwargs):
    with pytest.raises(InvalidArgumentError, match=f"`{next(iter(kwargs)) if 'train_subset' not in kwargs else 'train_subset'}`"):
        MNIST1DDataModule(**kwargs)


def test_sequence_backbones_match_the_papers_parameter_counts():
    # the paper's models.py: LinearBase 410, MLPBase 15,210, ConvBase 5,210, GRUBase 5,134 parameters
    counts = {name: sum(p.numel() for p in build_backbone(name, 10, 1).parameters())
              for name in ("mnist1d_logistic", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_gru")}
    assert counts == {"mnist1d_logistic": 410, "mnist1d_mlp": 15210, "mnist1d_cnn": 5210, "mnist1d_gru": 5134}
    x = torch.randn(3, 1, 40)
    for name in (*counts, "resnet1d", "resnet1d_8"):
        net = build_backbone(name, 10, 1).eval()
        assert net(x).shape == (3, 10)
        assert torch.allclose(net(x), net(x[:, 0]), atol=1e-6)  # [B, L] is read as one channel
    with pytest.raises(InvalidArgumentError, match="length"):
        build_backbone("mnist1d_cnn", 10, 1)(torch.randn(2, 1, 50))


def test_the_example_trains_the_papers_cnn(tmp_path, monkeypatch, capsys):
    """examples/mnist1d.yaml, cut to a few epochs: the paper's CNN learns (chance is 10%)."""
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(REPO / "examples" / "mnist1d.yaml"), "--trainer.max_epochs=6",
                     "--trainer.check_val_every_n_epoch=6"])
    assert cli.model.hparams.backbone == "mnist1d_cnn"
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Final validation accuracy:")][-1]
    assert float(line.split(":")[1]) > 0.5
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["runs"]
