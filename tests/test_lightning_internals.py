"""The one module that touches Lightning's private state: version guard and the training-loader accessor."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning_internals import (
    ALLOW_ENV,
    UnverifiedLightningError,
    fit_train_dataloader,
    lightning_minor,
    require_verified,
)
from tests.helpers import cpu_trainer


def test_version_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lightning_minor("2.6.5") == "2.6" and lightning_minor("2.7.0rc1") == "2.7"
    require_verified("Exact distributed evaluation", version="2.6.0")
    with pytest.raises(UnverifiedLightningError) as info:
        require_verified("Exact distributed evaluation", version="2.7.0")
    assert "\n" not in str(info.value) and "2.7.0" in str(info.value) and ALLOW_ENV in str(info.value)
    monkeypatch.setenv(ALLOW_ENV, "1")
    require_verified("Exact distributed evaluation", version="2.7.0")


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 3), torch.zeros(n, dtype=torch.long)), batch_size=4)


class _Module(pl.LightningModule):
    def __init__(self, own: int | None = None) -> None:
        super().__init__()
        self.layer, self.own, self.seen = torch.nn.Linear(3, 2), own, None

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OwnLoaders(_Module):
    def train_dataloader(self):
        return _loader(self.own)


class _DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return _loader(12)


class _Probe(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        loader = fit_train_dataloader(trainer, pl_module)
        pl_module.seen = None if loader is None else len(loader.dataset)


@pytest.mark.parametrize("case, expected", [("datamodule", 12), ("arguments", 8), ("module", 16)])
def test_train_loader_seen_from_setup(tmp_path, case: str, expected: int) -> None:
    module = _OwnLoaders(own=16) if case == "module" else _Module()
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[_Probe()])
    if case == "datamodule":
        trainer.fit(module, datamodule=_DataModule())
    elif case == "arguments":
        trainer.fit(module, train_dataloaders=_loader(8))
    else:
        trainer.fit(module)
    assert module.seen == expected
