"""Training on MNIST-1D for the effect benchmarks (not a benchmark itself).

MNIST-1D (Greydanus & Kobak 2020) is the zoo's :class:`~lightning_tricks.zoo.MNIST1DDataModule`: 4,000
training and 1,000 test signals of 40 steps, generated on this machine by the ``mnist1d`` package. The
effect benchmarks train on all 4,000 training signals (``val_size=0``, as the paper) and report accuracy on
the 1,000 test signals. The paper's recipe is Adam at learning rate 1e-2, batch 100, no weight decay; its
CNN reaches 94% after about 6,000 steps, its MLP 68%, where digits' baselines are at 98-99%: there is room
for a trick to show an effect.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PAPER = {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0}
"""The paper's optimizer settings (``ImageClassifier`` arguments)."""
TRAIN_SIZE, TEST_SIZE = 4000, 1000


def mnist1d_data(batch_size: int = 100, train_subset: int | None = None, split_seed: int = 0,
                 eval_batch_size: int = 1000) -> Any:
    """The zoo's MNIST-1D datamodule with all 4,000 training signals (or a stratified ``train_subset``), no
    validation split."""
    from lightning_tricks.zoo import MNIST1DDataModule

    return MNIST1DDataModule(batch_size=batch_size, val_size=0, train_subset=train_subset, split_seed=split_seed,
                             eval_batch_size=eval_batch_size)


def mnist1d_model(backbone: str = "mnist1d_cnn", num_classes: int = 10, schedule: str = "cosine",
                  backbone_kwargs: dict[str, Any] | None = None, **optim: Any) -> Any:
    """The zoo's ``ImageClassifier`` with a sequence backbone and the paper's optimizer (``optim`` overrides it)."""
    from lightning_tricks.zoo import ImageClassifier

    return ImageClassifier(backbone, num_classes=num_classes, in_channels=1, schedule=schedule,
                           backbone_kwargs=backbone_kwargs, **{**PAPER, **optim})


def quiet() -> None:
    """Silence Lightning's info lines and the warnings every tiny CPU run raises."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|val_dataloader|GPU available|"
                                              "TPU available|`max_epochs` was not set).*")


def trainer(epochs: int | None = None, callbacks: list | None = None, *, steps: int = -1, accumulate: int = 1,
            root: str = "/tmp") -> Any:
    """A CPU Trainer without validation, logging, checkpoints or progress bar."""
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, accumulate_grad_batches=accumulate,
                      callbacks=callbacks or [], default_root_dir=root)


def train_mnist1d(backbone: str, callbacks: list, seed: int, epochs: int, *, batch_size: int = 100,
                  accumulate: int = 1, train_subset: int | None = None, backbone_kwargs: dict[str, Any] | None = None,
                  **optim: Any) -> tuple[Any, Any, float]:
    """Seed, train ``backbone`` on MNIST-1D for ``epochs`` (cosine schedule, paper's optimizer unless ``optim``
    says otherwise); returns the model in eval mode, the datamodule and the training seconds."""
    import lightning.pytorch as pl

    quiet()
    pl.seed_everything(seed, verbose=False)
    data = mnist1d_data(batch_size=batch_size, train_subset=train_subset)
    model = mnist1d_model(backbone, backbone_kwargs=backbone_kwargs, **optim)
    start = time.perf_counter()
    trainer(epochs, callbacks, accumulate=accumulate).fit(model, datamodule=data)
    return model.eval(), data, time.perf_counter() - start


def test_accuracy(model: torch.nn.Module, data: Any) -> float:
    """Top-1 accuracy of ``model`` (as it is: call ``.eval()`` first) on the 1,000 test signals."""
    x, y = data.tensors("test")
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
