"""Mixup, TestTimeAugmentation and InitialLossCheck, unchanged, on modules written the way public projects write them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tricks import InitialLossCheck, Mixup, TTAWrapper
from lightning_tricks import TestTimeAugmentation as TTACallback  # an alias pytest does not collect
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import ImageData, Recorder
from tests.step_style_modules import CLASSES, STYLES, ImageNetStyle

VIEWS = {"views": ["translate", "vflip"], "translate": 1}


class DataWithTest(ImageData):
    def test_dataloader(self):
        return self.val_dataloader()


def _mixed_nll_by_hand(initial: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, plan) -> float:
    """``mean_i lam_i * nll(y_i) + (1 - lam_i) * nll(y_perm(i))`` of the untrained module (training mode, as in the step)."""
    with torch.no_grad():
        log_probs = F.log_softmax(initial.train()(x), dim=1)  # idempotent on LitResnet's log-probabilities
    rows, lam = torch.arange(len(y)), plan.lam
    return float((lam * -log_probs[rows, y] + (1 - lam) * -log_probs[rows, y[plan.perm]]).mean())


@pytest.mark.parametrize("style", list(STYLES), ids=lambda s: s.__name__)
def test_style_trains_with_mixup_and_initial_loss_check_and_tests_with_tta(style, tmp_path):
    torch.manual_seed(0)
    module = style()
    initial = copy.deepcopy(module)
    data = DataWithTest(n=32, batch_size=8, ones=False, classes=CLASSES, num_classes_attr=False)
    check, recorder = InitialLossCheck(), Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[check, Mixup(alpha=1.0), recorder])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 8 and len(recorder.plans) == 8  # every batch mixed
    (x, y), plan = recorder.train[0], recorder.plans[0]
    assert not torch.equal(x, next(iter(data.train_dataloader()))[0])
    # the first loss is Mixup's soft loss on the first mixed batch, and InitialLossCheck read it with C from the logits
    assert check.observed == pytest.approx(_mixed_nll_by_hand(initial, x, y, plan), rel=1e-5)
    assert check.expected == pytest.approx(math.log(CLASSES)) and check.passed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())

    key = STYLES[style]
    plain = cpu_trainer(tmp_path).test(module, datamodule=data, verbose=False)[0][key]
    tta = TTACallback(**VIEWS)
    augmented = cpu_trainer(tmp_path, callbacks=[tta]).test(module, datamodule=data, verbose=False)[0][key]
    x_all, y_all = data.test_dataloader().dataset.x, data.test_dataloader().dataset.y
    with torch.no_grad():
        reference = float(F.nll_loss(TTAWrapper(module.eval(), **VIEWS)(x_all), y_all))
    assert augmented == pytest.approx(reference, rel=1e-5) and abs(augmented - plain) > 1e-4
    assert tta._found == ({"test": "model"} if style is ImageNetStyle else {})  # self.model(images) was found
    assert "forward" not in module.__dict__ and all("forward" not in m.__dict__ for m in module.modules())


def _ddp_probe(trainer, pl_module):
    check = next(c for c in trainer.callbacks if isinstance(c, InitialLossCheck))
    tta = next(c for c in trainer.callbacks if isinstance(c, TTACallback))
    data = trainer.datamodule.val_dataloader().dataset
    with torch.no_grad():
        reference = float(F.nll_loss(TTAWrapper(pl_module.model.eval(), **VIEWS)(data.x), data.y))
    return {"observed": check.observed, "expected": check.expected, "found": dict(tta._found),
            "val_loss": float(trainer.callback_metrics["val_loss_epoch"]), "reference": reference,
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules())}


@pytest.mark.slow
def test_ddp_imagenet_style_with_all_three(tmp_path):
    """Under DDP the model is wrapped and the steps are redirected through it: the probe still finds `model`."""
    torch.manual_seed(0)
    data = ImageData(n=32, batch_size=8, ones=False, classes=CLASSES)
    callbacks = [InitialLossCheck(), Mixup(mode="sample"), TTACallback(**VIEWS, stages=["validate"])]
    ranks = run_ddp(ImageNetStyle(), data, tmp_path=tmp_path, probe=_ddp_probe, callbacks=callbacks, max_epochs=1,
                    num_sanity_val_steps=0)
    for rank in ranks:
        assert rank["found"] == {"validate": "model"} and rank["hooks"] == 0
        assert rank["expected"] == pytest.approx(math.log(CLASSES)) and rank["observed"] == ranks[0]["observed"]
        assert rank["val_loss"] == pytest.approx(rank["reference"], rel=1e-5)
