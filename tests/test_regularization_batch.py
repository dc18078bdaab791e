"""Where Cutout and Mixup find the images and targets, and how they put them back."""

from collections import namedtuple

import pytest
import torch

from lightning_tricks.core.batch import BatchFormatError, find_slot, replace_item

Pair = namedtuple("Pair", ["inputs", "labels"])


def test_defaults_for_each_batch_type():
    x, y = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    assert find_slot(x, None, "images", "T") is None
    assert find_slot(["meta", x, y], None, "images", "T") == 1
    assert find_slot(["meta", x, y], None, "targets", "T", after=1) == 2
    assert find_slot({"img": x, "target": y}, None, "images", "T") == "img"
    assert find_slot({"img": x, "target": y}, None, "targets", "T") == "target"
    assert find_slot(Pair(x, y), "labels", "targets", "T") == 1


def test_explicit_keys_and_helpful_errors():
    x, y = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    assert find_slot({"pixels": x, "cls": y}, "pixels", "images", "T") == "pixels"
    with pytest.raises(BatchFormatError, match="set `input_key` to the key"):
        find_slot({"pixels": x, "cls": y}, None, "images", "Mixup")
    with pytest.raises(BatchFormatError, match="set `target_key` to the key"):
        find_slot({"pixels": x, "cls": y}, None, "targets", "Mixup")
    with pytest.raises(BatchFormatError, match=r"`target_key`=5 is out of range"):
        find_slot([x, y], 5, "targets", "Mixup")
    with pytest.raises(BatchFormatError, match="a bare tensor holds only images"):
        find_slot(x, None, "targets", "Mixup")
    with pytest.raises(BatchFormatError, match="dataloader_iter"):
        find_slot(None, None, "images", "Cutout")
    with pytest.raises(BatchFormatError, match="expected the targets right after the images"):
        find_slot([x, "label"], None, "targets", "Mixup", after=0)


def test_replace_keeps_mutable_batches_and_rebuilds_tuples():
    x, y, z = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    batch = [x, y]
    assert replace_item(batch, 1, z) is batch and batch[1] is z
    pair = replace_item(Pair(x, y), 1, z)
    assert type(pair) is Pair and pair.labels is z and pair.inputs is x
    plain = replace_item((x, y), 0, z)
    assert type(plain) is tuple and plain[0] is z
    assert replace_item(x, None, z) is z
