import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_tricks.zoo import DigitsDataModule, ImageClassifier, SyntheticDataModule
from tests.helpers import cpu_trainer


def test_training_step_is_plain_cross_entropy_and_accepts_soft_targets():
    model = ImageClassifier("mlp", num_classes=4, in_channels=1, image_size=4)
    x = torch.randn(6, 1, 4, 4)
    y = torch.randint(0, 4, (6,))
    model.log = lambda *args, **kwargs: None  # outside a Trainer loop; logging is tested by fit below
    loss = model.training_step((x, y), 0)
    assert torch.allclose(loss, F.cross_entropy(model(x), y))
    soft = F.one_hot(y, 4).float() * 0.7 + 0.3 / 4
    loss_soft = model.training_step([x, soft], 0)
    assert torch.allclose(loss_soft, F.cross_entropy(model(x), soft))


@pytest.mark.parametrize("optimizer,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW)])
def test_configure_optimizers(tmp_path, optimizer, cls):
    model = ImageClassifier("mlp", image_size=8, optimizer=optimizer, lr=0.3, weight_decay=0.01, schedule="step",
                            step_size=2, gamma=0.5)
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, cls) and opt.defaults["lr"] == 0.3 and opt.defaults["weight_decay"] == 0.01
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * 0.25)


def test_cosine_schedule_follows_max_epochs(tmp_path):
    model = ImageClassifier("mlp", image_size=8, schedule="cosine", lr=1.0)
    dm = DigitsDataModule(batch_size=256)
    lrs = []

    class LR(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    cpu_trainer(tmp_path, max_epochs=4, callbacks=[LR()], limit_val_batches=0).fit(model, dm)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_learns_synthetic_data(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_samples=256, num_classes=4, image_shape=[1, 8, 8], batch_size=32, signal=1.0)
    model = ImageClassifier("simple_cnn", num_classes=4, in_channels=1, lr=0.05, schedule="none")
    trainer = cpu_trainer(tmp_path, max_epochs=5)
    trainer.fit(model, dm)
    assert trainer.callback_metrics["val_acc"] > 0.9


def test_mismatch_with_datamodule_is_explained(tmp_path):
    model = ImageClassifier("simple_cnn", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match=r"`in_channels`=3 does not match the datamodule's num_channels=1: set "
                                         r"--model.init_args.in_channels=1"):
        cpu_trainer(tmp_path, fast_dev_run=True).fit(model, DigitsDataModule())


@pytest.mark.parametrize("kwargs,match", [
    ({"backbone": "resnet_nope"}, r"`backbone`='resnet_nope' is invalid"),
    ({"optimizer": "lbfgs"}, r"`optimizer`='lbfgs' is invalid: expected one of 'sgd', 'adam', 'adamw'"),
    ({"schedule": "linear"}, r"`schedule`='linear' is invalid: expected one of 'none', 'cosine', 'step'"),
    ({"lr": 0.0}, r"`lr`=0.0 is invalid: expected a number in \(0.0, inf\)"),
    ({"momentum": 1.0}, r"`momentum`=1.0 is invalid"),
    ({"num_classes": 1}, r"`num_classes`=1 is invalid: expected an integer in \[2, inf\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)
