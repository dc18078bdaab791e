"""The regularizers log the rate they apply, ``<trick>/<name>`` through ``pl_module.log`` (docs/glossary.md, Metrics).

Each value is checked against its formula at every training batch, under automatic and manual optimization,
with a logger that records every row; ``log=False`` logs nothing.
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger

from lightning_tricks import Cutout, DropConnect, Mixup, StochasticDepth, WeightPenalty
from lightning_tricks.regularization.weight_penalty import penalty_value, select_parameters
from tests.structural_user_module import TinyResNet, digits_loader

BATCHES, BATCH = 4, 8


class Recorder(Logger):
    """Keeps every row of metrics the trainer sends."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def values(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]

    def logged(self) -> set[str]:
        return {key for row in self.rows for key in row}


class Net(TinyResNet):
    """TinyResNet whose training step keeps the targets it received; optionally with manual optimization."""

    def __init__(self, manual: bool = False, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.automatic_optimization = not manual
        self.targets: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.targets.append(y.detach().as_subclass(torch.Tensor).clone())
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def train_dataloader(self):
        return digits_loader(BATCHES * BATCH, batch_size=BATCH)


def _fit(callback, manual: bool, lr: float = 0.05) -> tuple[Net, Recorder]:
    torch.manual_seed(0)
    model, recorder = Net(manual, lr), Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=BATCHES, limit_val_batches=0,
                         logger=recorder, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(model)
    assert len(model.targets) == BATCHES
    return model, recorder


MANUAL = pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])


@MANUAL
def test_stochastic_depth_logs_the_deepest_blocks_p_rising_through_the_warmup(manual):
    p, warmup = 0.5, 2
    _, recorder = _fit(StochasticDepth(p=p, warmup_steps=warmup, seed=0), manual)
    assert recorder.values("stochastic_depth/p") == pytest.approx([p * min(1, t / warmup) for t in range(BATCHES)])


@MANUAL
def test_dropconnect_and_cutout_log_their_probability(manual):
    _, recorder = _fit(DropConnect(p=0.3, seed=0), manual)
    assert recorder.values("dropconnect/p") == pytest.approx([0.3] * BATCHES)
    _, recorder = _fit(Cutout(length=3, p=0.7, seed=0), manual)
    assert recorder.values("cutout/p") == pytest.approx([0.7] * BATCHES)


@MANUAL
def test_mixup_logs_its_probability_and_the_weight_of_each_batch(manual):
    model, recorder = _fit(Mixup(alpha=1.0, p=0.5, targets="soft", num_classes=10, seed=0), manual)
    assert recorder.values("mixup/p") == pytest.approx([0.5] * BATCHES)
    labels = [y for _, y in digits_loader(BATCHES * BATCH, batch_size=BATCH)]  # each batch's own labels
    # sample i keeps lam of its own label (all of it when its partner is itself): the batch's lam is the minimum
    expected = [float(soft.gather(1, own[:, None]).min()) for soft, own in zip(model.targets, labels, strict=True)]
    lams = recorder.values("mixup/lam")
    assert lams == pytest.approx(expected, abs=1e-6)
    assert 1.0 in lams and any(lam < 1.0 for lam in lams)  # p=0.5: some batches mixed, some left alone (1.0)


@MANUAL
def test_weight_penalty_logs_its_loss_term(manual):
    model, recorder = _fit(WeightPenalty(l1=1e-3, l2=1e-2), manual, lr=0.0)  # lr 0: the weights stay as they are
    selected = [p.detach() for _, p in select_parameters(model)]
    assert recorder.values("weight_penalty/loss") == pytest.approx(
        [float(penalty_value(selected, 1e-3, 1e-2))] * BATCHES, rel=1e-6)


@pytest.mark.parametrize("callback", [
    lambda: StochasticDepth(p=0.5, log=False), lambda: DropConnect(p=0.3, log=False),
    lambda: Cutout(length=3, log=False), lambda: Mixup(targets="soft", num_classes=10, log=False),
    lambda: WeightPenalty(l2=1e-2, log=False),
], ids=["StochasticDepth", "DropConnect", "Cutout", "Mixup", "WeightPenalty"])
def test_log_false_logs_nothing(callback):
    _, recorder = _fit(callback(), manual=False)
    prefixes = ("stochastic_depth/", "dropconnect/", "cutout/", "mixup/", "weight_penalty")
    assert recorder.values("train_loss") and not [k for k in recorder.logged() if k.startswith(prefixes)]
