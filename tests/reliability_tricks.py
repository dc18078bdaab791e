"""Every trick with state or randomness, built the same way for the unseeded and the resume-equality tests.

``TRICKS`` maps a name to ``(make_callbacks(tmp_path), backbone, needs)``: ``make_callbacks`` returns fresh
callbacks (a resumed run must not share objects with the run it resumes); ``backbone`` is the zoo
backbone the trick acts on (fractional pooling needs max pooling, stochastic depth residual blocks);
``needs`` says what the test must provide ("val" for validation-driven callbacks).

The data are ``N_TRAIN`` fixed random 1x8x8 images in 4 classes, not shuffled, in batches of ``BATCH``; the
train loader's sampler can start its first epoch at a given batch (:class:`ResumeSampler`), which is what
a resumable loader (``torchdata``'s ``StatefulDataLoader``) does on a mid-epoch resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Sampler, TensorDataset

import lightning_tricks as lt
from lightning_tricks.zoo import ImageClassifier

N_TRAIN, BATCH, N_VAL, CLASSES = 32, 8, 16, 4
BATCHES_PER_EPOCH = N_TRAIN // BATCH


class ResumeSampler(Sampler[int]):
    """``range(n)`` in order; the first iteration starts at ``start`` (the resumed run's position)."""

    def __init__(self, n: int, start: int = 0) -> None:
        self.n, self.start = n, start

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(range(start, self.n))


class TinyData(pl.LightningDataModule):
    """Fixed random images (a class prototype plus noise), train in order, from batch ``start_batch`` at first."""

    def __init__(self, start_batch: int = 0, nan: bool = False) -> None:
        super().__init__()
        self.start_batch, self.num_classes, self.num_channels = start_batch, CLASSES, 1
        g = torch.Generator().manual_seed(1234)
        prototypes = torch.randn(CLASSES, 1, 8, 8, generator=g)
        y = torch.arange(N_TRAIN + N_VAL) % CLASSES
        x = 2 * prototypes[y] + torch.randn(N_TRAIN + N_VAL, 1, 8, 8, generator=g)
        if nan:
            x[3, 0, 2, 2] = float("nan")
        self.train_set = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
        self.val_set = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=BATCH,
                          sampler=ResumeSampler(N_TRAIN, self.start_batch * BATCH))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=BATCH)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=BATCH)


def make_model(backbone: str = "simple_cnn") -> ImageClassifier:
    kwargs = {"width": 4, "hidden": 8} if backbone == "simple_cnn" else {"width": 4}
    return ImageClassifier(backbone, num_classes=CLASSES, in_channels=1, image_size=8, backbone_kwargs=kwargs,
                           lr=0.05, schedule="cosine")


Factory = Callable[[Path], list[Callback]]

# name -> (callbacks, backbone, stochastic: draws random numbers from the run's seed)
TRICKS: dict[str, tuple[Factory, str, bool]] = {
    "baseline": (lambda p: [], "simple_cnn", False),
    "Cutout": (lambda p: [lt.Cutout(length=0.5, n_holes=2)], "simple_cnn", True),
    "Mixup": (lambda p: [lt.Mixup(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, num_classes=CLASSES)],
              "simple_cnn", True),
    "BatchAugment": (lambda p: [lt.BatchAugment(padding=2, flip=0.5, brightness=0.2, contrast=0.2)],
                     "simple_cnn", True),
    "DropConnect": (lambda p: [lt.DropConnect(p=0.3)], "simple_cnn", True),
    "StochasticDepth": (lambda p: [lt.StochasticDepth(p=0.5, warmup_steps=3)], "resnet20", True),
    "StochasticDepth-test-scaling": (lambda p: [lt.StochasticDepth(p=0.5, scaling="test")],
                                     "resnet20", True),
    "FractionalMaxPooling": (lambda p: [lt.FractionalMaxPooling(test_samples=2)], "simple_cnn", True),
    "TTA": (lambda p: [lt.DropConnect(p=0.3, mode="sample"),
                            lt.TestTimeAugmentation(views=["identity", "hflip"], stochastic_passes=2, stages=["validate"])],
            "simple_cnn", True),
    "WeightInit": (lambda p: [lt.WeightInit("kaiming_normal")], "simple_cnn", True),
    "LSUV": (lambda p: [lt.WeightInit("lsuv")], "simple_cnn", True),
    "Standardize": (lambda p: [lt.Standardize("channel")], "simple_cnn", False),
    "Finetune": (lambda p: [lt.Finetune(train="head", unfreeze={1: "all"})], "simple_cnn", False),
    "LargeBatchScaling": (lambda p: [lt.LargeBatchScaling(reference_batch_size=4, warmup_steps=6)],
                          "simple_cnn", False),
    "SnapshotEnsemble": (lambda p: [lt.SnapshotEnsemble(cycles=3, dirpath=str(p / "snapshots"))],
                         "simple_cnn", True),
    "EMAMembers": (lambda p: [lt.EMAMembers(decay=0.7)], "simple_cnn", False),
    "EarlyStopping": (lambda p: [lt.EarlyStopping(monitor="val_loss", patience=5)], "simple_cnn", False),
    "DivergenceStop": (lambda p: [lt.DivergenceStop(factor=50.0)], "simple_cnn", False),
    "DeadUnitMonitor": (lambda p: [lt.DeadUnitMonitor(plot=False)], "simple_cnn", False),
    "UpdateRatioMonitor": (lambda p: [lt.UpdateRatioMonitor(every_n_steps=2)], "simple_cnn", False),
    "InitialLossCheck": (lambda p: [lt.InitialLossCheck()], "simple_cnn", False),
    "ActivationStatistics": (lambda p: [lt.ActivationStatistics(plot=False)], "simple_cnn", False),
    "WeightPenalty": (lambda p: [lt.WeightPenalty(l2=1e-3)], "simple_cnn", False),
}

STOCHASTIC = [name for name, (_, _, stochastic) in TRICKS.items() if stochastic]


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=3, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, default_root_dir=str(tmp_path),
                                    deterministic=True, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)
