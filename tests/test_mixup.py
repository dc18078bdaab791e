import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_tricks import ImageClassifier, Mixup
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization import BatchFormatError, MixedLabels, MixupTargetsUnusedError
from lightning_tricks.regularization.mixup import (
    MixPlan,
    _MixState,
    apply_mix,
    box_mask,
    infer_num_classes,
    mix_targets,
    mixup,
    sample_mix_plan,
)
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import (
    DictModule,
    ImageData,
    ListModule,
    MixinTupleModule,
    Recorder,
)


def one_hot(y: torch.Tensor, k: int, eps: float = 0.0) -> torch.Tensor:
    return F.one_hot(y, k).double() * (1 - eps) + eps / k


def test_fixed_lambda_and_permutation_give_the_formula():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2, 3])
    perm = torch.tensor([3, 0, 4, 1, 2])
    for lam in (torch.full((5,), 0.3), torch.tensor([0.1, 0.5, 0.9, 1.0, 0.0])):
        plan = MixPlan(perm=perm, lam=lam)
        w = lam.double().view(5, 1, 1, 1)
        assert torch.allclose(apply_mix(x, plan), w * x + (1 - w) * x[perm], atol=1e-12)
        for eps in (0.0, 0.1):
            soft = mix_targets(y, plan, 4, eps, dtype=torch.float64)
            expected = lam.double()[:, None] * one_hot(y, 4, eps) + (1 - lam.double()[:, None]) * one_hot(y[perm], 4, eps)
            assert torch.allclose(soft, expected, atol=1e-7)
            assert torch.allclose(soft.sum(1), torch.ones(5, dtype=torch.float64))
            probs = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
            mixed = mix_targets(probs, plan, label_smoothing=eps)
            smoothed = probs * (1 - eps) + eps / 4
            assert torch.allclose(mixed, lam.double()[:, None] * smoothed + (1 - lam.double()[:, None]) * smoothed[perm])
    assert torch.equal(apply_mix(x, MixPlan(perm, torch.ones(5))), x)  # weight 1: bit for bit


def test_cutmix_lambda_is_the_kept_area_fraction():
    n, h, w = 64, 9, 13
    x = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).contiguous()
    plan = sample_mix_plan(n, (h, w), alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, mode="sample",
                           generator=torch.Generator().manual_seed(0))
    out = apply_mix(x, plan)
    own = plan.perm != torch.arange(n)
    kept = (out == x).float().mean((1, 2, 3))
    assert torch.allclose(kept[own], plan.lam[own], atol=1e-6)
    inside = box_mask(plan.boxes, h, w)
    assert torch.equal(out[:, 0] == x[plan.perm][:, 0], inside | ~own[:, None, None])
    heights, widths = plan.boxes[:, 2] - plan.boxes[:, 0], plan.boxes[:, 3] - plan.boxes[:, 1]
    assert (heights < h).any() and (plan.boxes[:, 0] == 0).any() and (plan.boxes[:, 2] == h).any()  # clipped boxes
    assert torch.allclose(plan.lam, 1 - (heights * widths).float() / (h * w))
    assert len(set(plan.lam.tolist())) > 20  # per-sample boxes
    soft = mix_targets(torch.arange(n) % 10, plan, 10)
    assert torch.allclose(soft.sum(1), torch.ones(n))


def test_batch_mode_one_lambda_sample_mode_many_and_mixed_cutmix():
    g = torch.Generator().manual_seed(1)
    batch = sample_mix_plan(7, (8, 8), alpha=0.4, cutmix_alpha=1.0, generator=g)
    assert len(set(batch.lam.tolist())) == 1 and len({tuple(b) for b in batch.boxes.tolist()}) == 1
    sample = sample_mix_plan(200, (8, 8), alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5, mode="sample", generator=g)
    has_box = (sample.boxes[:, 2] > sample.boxes[:, 0]) & (sample.boxes[:, 3] > sample.boxes[:, 1])
    assert 50 < has_box.sum() < 150 and len(set(sample.lam.tolist())) > 100
    assert sorted(sample.perm.tolist()) == list(range(200))


def test_per_sample_p_leaves_unmixed_samples_exact():
    x = torch.randn(300, 3, 4, 4)
    plan = sample_mix_plan(300, alpha=1.0, p=0.5, mode="sample", generator=torch.Generator().manual_seed(3))
    unmixed = plan.lam == 1
    assert 100 < unmixed.sum() < 200
    assert torch.equal(apply_mix(x, plan)[unmixed], x[unmixed])
    soft = mix_targets(torch.arange(300) % 5, plan, 5)
    assert torch.equal(soft[unmixed], F.one_hot(torch.arange(300) % 5, 5).float()[unmixed])


@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_odd_and_single_batches_dtypes_channels_last(n, dtype):
    x = torch.randn(n, 3, 8, 6, dtype=dtype).to(memory_format=torch.channels_last)
    y = torch.arange(n) % 3
    out, soft = mixup(x, y, 3, alpha=1.0, cutmix_alpha=1.0, mode="sample", generator=torch.Generator().manual_seed(n))
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert soft.shape == (n, 3) and torch.allclose(soft.sum(1), torch.ones(n))
    if n == 1:
        assert torch.equal(out, x) and torch.equal(soft, F.one_hot(y, 3).float())


def test_beta_draws_follow_beta_alpha():
    plan = sample_mix_plan(20000, alpha=0.4, mode="sample", generator=torch.Generator().manual_seed(0))
    lam = plan.lam.double()
    assert abs(lam.mean() - 0.5) < 0.01 and abs(lam.var() - 0.25 / (2 * 0.4 + 1)) < 0.005  # Beta(a, a) variance


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=0.0), "`alpha`=0.0 is invalid"), (dict(alpha=-1.0), "`alpha`=-1.0 is invalid"),
    (dict(cutmix_alpha=0.0), "`cutmix_alpha`=0.0 is invalid"), (dict(switch_prob=0.5), "`switch_prob`=0.5 is invalid"),
    (dict(cutmix_alpha=1.0, switch_prob=1.5), "`switch_prob`=1.5 is invalid"), (dict(p=1.01), "`p`=1.01 is invalid"),
    (dict(p=-0.5), "`p`=-0.5 is invalid"), (dict(mode="pair"), "`mode`='pair' is invalid"),
    (dict(label_smoothing=1.0), "`label_smoothing`=1.0 is invalid"), (dict(num_classes=1), "`num_classes`=1 is invalid"),
    (dict(targets="onehot"), "`targets`='onehot' is invalid"), (dict(seed=1.5), "`seed`=1.5 is invalid"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")):
        Mixup(**kwargs)


def test_integer_images_and_bad_labels():
    with pytest.raises(InvalidArgumentError, match="expected floating-point images"):
        mixup(torch.ones(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(InvalidArgumentError, match=r"labels in \[0, 5\] are invalid for num_classes=3"):
        mixup(torch.ones(4, 3, 8, 8), torch.tensor([0, 5, 1, 2]), 3)


def test_mixed_labels_are_hard_labels_everywhere_but_in_cross_entropy():
    y = torch.tensor([0, 2, 1, 2, 0])
    plan = sample_mix_plan(5, alpha=1.0, mode="sample", generator=torch.Generator().manual_seed(4))
    state = _MixState(plan, 0.1, None, "Mixup")
    labels = MixedLabels.wrap(y, state)
    logits = torch.randn(5, 3, requires_grad=True)
    soft = mix_targets(y, plan, 3, 0.1)
    assert torch.allclose(F.cross_entropy(logits, labels), F.cross_entropy(logits, soft))
    assert torch.allclose(nn.CrossEntropyLoss(reduction="sum")(logits, labels.long().to("cpu")),
                          F.cross_entropy(logits, soft, reduction="sum"))
    assert state.consumed
    accuracy = (logits.argmax(1) == labels).float().mean()
    assert type(accuracy) is torch.Tensor and accuracy == (logits.argmax(1) == y).float().mean()
    assert type(labels + 1) is torch.Tensor and torch.equal(labels.view(-1).as_subclass(torch.Tensor), y)
    with pytest.warns(UserWarning, match="smooth the labels twice"):
        F.cross_entropy(logits, labels, label_smoothing=0.1)


def test_user_module_accuracy_from_y_trains_and_eval_untouched(tmp_path):
    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[Mixup(alpha=1.0, seed=0), recorder])
    trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8, ones=False))
    assert trainer.global_step == 4 and "train_acc" in trainer.callback_metrics
    data = ImageData(n=16, ones=False).train_dataloader()
    originals = [x for x, _ in data] * 2
    for (x, y), plan, x0 in zip(recorder.train, recorder.plans, originals, strict=True):
        w = plan.lam.view(-1, 1, 1, 1)
        assert torch.allclose(x, w * x0 + (1 - w) * x0[plan.perm], atol=1e-6)
        assert torch.equal(y, torch.arange(8) % 4)  # each sample's own label
    val = [x for x, _ in ImageData(n=16, ones=False).val_dataloader()]  # 2 batches per validation pass
    assert len(recorder.val) == 6 and all(torch.equal(v, val[i % 2]) for i, v in enumerate(recorder.val))


def test_soft_targets_dict_batches_and_num_classes_from_the_datamodule(tmp_path):
    class SoftDictModule(DictModule):  # with targets="soft", accuracy needs y.argmax(1)
        def training_step(self, batch, batch_idx):
            logits = self(batch["image"])
            self.log("train_acc", (logits.argmax(1) == batch["label"].argmax(1)).float().mean())
            return nn.CrossEntropyLoss()(logits, batch["label"])

    recorder, callback = Recorder(), Mixup(alpha=0.5, cutmix_alpha=1.0, targets="soft", label_smoothing=0.1)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback, recorder])
    trainer.fit(SoftDictModule(classes=4), datamodule=ImageData(n=16, batch_size=8, kind="dict", classes=4))
    assert callback._num_classes == 4 and trainer.global_step == 2
    for _, soft in recorder.train:
        assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8)) and soft.min() >= 0.1 / 4 - 1e-6


def test_tuple_batches_fail_at_first_batch_naming_the_mixin_and_work_with_it(tmp_path):
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Mixup()])
    with pytest.raises(BatchFormatError, match=r"Add lightning_tricks.BatchTransformMixin"):
        trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8, kind="tuple"))
    assert trainer.global_step == 0
    recorder, callback = Recorder(), Mixup(mode="sample")
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback, recorder])
    trainer.fit(MixinTupleModule(), datamodule=ImageData(n=16, batch_size=8, kind="tuple", ones=False))
    assert recorder.batch_types == [tuple, tuple] and len(recorder.plans) == 2 and callback.state_dict()["batches_seen"] == 2


def test_a_loss_that_ignores_y_fails_at_first_backward(tmp_path):
    class SquaredErrorModule(ListModule):  # one_hot(y) is a plain tensor: the loss never sees the mixed labels
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x).softmax(1), F.one_hot(y, 4).float())

    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Mixup()])
    with pytest.raises(MixupTargetsUnusedError, match="F.nll_loss or nn.NLLLoss.*targets='soft'"):
        trainer.fit(SquaredErrorModule(), datamodule=ImageData(n=16, batch_size=8))
    assert trainer.global_step == 0


@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_on_log_softmax_is_the_mixed_nll_by_hand(mode, reduction):
    n, k = 9, 5
    y = torch.tensor([0, 4, 1, 3, 2, 2, 0, 1, 4])
    plan = sample_mix_plan(n, alpha=0.7, mode=mode, generator=torch.Generator().manual_seed(5))
    assert (len(set(plan.lam.tolist())) == 1) == (mode == "batch")
    logits = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    log_probs = F.log_softmax(logits, dim=1)
    rows, lam = torch.arange(n), plan.lam.double()
    nll_own, nll_partner = -log_probs[rows, y], -log_probs[rows, y[plan.perm]]
    per_sample = lam * nll_own + (1 - lam) * nll_partner  # lam * nll(y_i) + (1 - lam) * nll(y_j)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    weighted = lam * weight[y] * nll_own + (1 - lam) * weight[y[plan.perm]] * nll_partner
    weighted = {"mean": weighted.mean(), "sum": weighted.sum(), "none": weighted}[reduction]
    for loss_fn in (lambda lp, t: F.nll_loss(lp, t, reduction=reduction), nn.NLLLoss(reduction=reduction)):
        state = _MixState(plan, 0.0, None, "Mixup")
        got = loss_fn(log_probs, MixedLabels.wrap(y, state).long())
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert state.consumed and type(got) is torch.Tensor
    got = nn.NLLLoss(weight=weight, reduction=reduction)(log_probs, MixedLabels.wrap(y, _MixState(plan, 0.0, None, "M")))
    torch.testing.assert_close(got, weighted, rtol=1e-12, atol=1e-12)
    # on log_softmax outputs the soft NLL is the soft cross-entropy of the logits, gradients included
    labels = MixedLabels.wrap(y, _MixState(plan, 0.1, None, "Mixup"))
    nll = F.nll_loss(F.log_softmax(logits, 1), labels, reduction=reduction)
    ce = F.cross_entropy(logits, mix_targets(y, plan, k, 0.1, dtype=torch.float64), reduction=reduction)
    torch.testing.assert_close(nll, ce, rtol=1e-12, atol=1e-12)
    (grad_nll,) = torch.autograd.grad(nll.sum(), logits)
    (grad_ce,) = torch.autograd.grad(ce.sum(), logits)
    torch.testing.assert_close(grad_nll, grad_ce, rtol=1e-10, atol=1e-12)


def test_nll_loss_with_plain_labels_and_mixed_labels_in_bad_shapes():
    y = torch.tensor([0, 2, 1])
    log_probs = F.log_softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), 1)
    # untouched without Mixup (equal up to the order of the float summation)
    torch.testing.assert_close(F.nll_loss(log_probs, y), -log_probs[torch.arange(3), y].mean(), rtol=1e-6, atol=0)
    plan = sample_mix_plan(3, alpha=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BatchFormatError, match=r"F.nll_loss got an input of shape \(3, 4, 2\) for 3 mixed labels"):
        F.nll_loss(torch.randn(3, 4, 2), MixedLabels.wrap(y, _MixState(plan, 0.0, None, "Mixup")))
    with pytest.raises(InvalidArgumentError, match=r"`num_classes`=5 does not match the 4 classes F.nll_loss got"):
        F.nll_loss(log_probs, MixedLabels.wrap(y, _MixState(plan, 0.0, 5, "Mixup")))


def test_double_label_smoothing_warns_at_setup(tmp_path):
    class SmoothModule(ListModule):
        def __init__(self):
            super().__init__()
            self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self(x), y)

    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                          callbacks=[Mixup(label_smoothing=0.1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SmoothModule(), datamodule=ImageData(n=16, batch_size=8))
    assert sum("smooth the labels twice" in str(w.message) for w in caught) == 1


def test_num_classes_inference_torchvision_timm_and_errors():
    import timm
    import torchvision

    class Holder(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

    assert infer_num_classes(None, torchvision.models.resnet18(num_classes=7)) == 7
    assert infer_num_classes(None, Holder(timm.create_model("resnet10t", num_classes=5))) == 5
    with pytest.raises(InvalidArgumentError, match="found neither; set `num_classes`"):
        infer_num_classes(None, nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))

    class Trainer:
        datamodule = ImageData(classes=3)

    with pytest.raises(InvalidArgumentError, match="num_classes=3 but the model's last nn.Linear has out_features=4"):
        infer_num_classes(Trainer(), ListModule(classes=4))


def test_timm_model_trains_with_cutmix_soft_targets(tmp_path):
    """The zoo's ImageClassifier (accuracy from the argmax of soft targets) on a timm model."""
    model = ImageClassifier("timm:test_resnet", num_classes=4, in_channels=3, schedule="none")
    callback = Mixup(cutmix_alpha=1.0, switch_prob=0.5, mode="sample", targets="soft")
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, datamodule=ImageData(n=8, shape=(3, 16, 16), batch_size=8, ones=False, classes=4))
    assert trainer.global_step == 1 and callback._num_classes == 4


def test_p_zero_leaves_the_batch_objects_untouched(tmp_path):
    class Identity(Recorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train.append(batch[1])

    recorder, callback = Identity(), Mixup(p=0.0)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback, recorder])
    trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8))
    assert all(type(y) is torch.Tensor for y in recorder.train) and callback.state_dict()["batches_seen"] == 0


def test_resume_mid_epoch_reproduces_lambdas_and_pairs(tmp_path):
    data = ImageData(n=48, batch_size=8)

    def fit(ckpt_path=None):
        recorder = Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
                              callbacks=[Mixup(alpha=0.4, cutmix_alpha=1.0, mode="sample", seed=9), recorder,
                                         checkpoint])
        trainer.fit(ListModule(), datamodule=data, ckpt_path=ckpt_path)
        return recorder.plans

    full = fit()
    resumed = fit(ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(full) == 12 and len(resumed) == 8
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a.perm, b.perm) and torch.equal(a.lam, b.lam) and torch.equal(a.boxes, b.boxes)


def _plans_probe(trainer, pl_module):
    recorder = next(c for c in trainer.callbacks if isinstance(c, Recorder))
    return {"lam": [p.lam for p in recorder.plans], "steps": trainer.global_step,
            "val_acc": float(trainer.callback_metrics["val_acc"])}


def test_ddp_two_processes_draw_differently(tmp_path):
    results = run_ddp(ListModule(), ImageData(n=32, batch_size=8, ones=False), tmp_path=tmp_path, probe=_plans_probe,
                      callbacks=[Mixup(mode="sample"), Recorder()], max_epochs=1)
    assert [r["steps"] for r in results] == [2, 2]
    assert results[0]["val_acc"] == results[1]["val_acc"]
    for a, b in zip(results[0]["lam"], results[1]["lam"], strict=True):
        assert not torch.equal(a, b)


def test_cutout_and_mixup_together_on_dict_batches_in_bf16(tmp_path):
    """Labels mode with nn.CrossEntropyLoss and accuracy from batch["label"]; images converted to bf16."""
    from lightning_tricks import Cutout

    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, precision="bf16-true",
                          callbacks=[Cutout(length=3), Mixup(mode="sample", cutmix_alpha=1.0), recorder])
    trainer.fit(DictModule(), datamodule=ImageData(n=16, batch_size=8, kind="dict", ones=False))
    assert trainer.global_step == 2 and "train_acc" in trainer.callback_metrics
    assert all(x.dtype == torch.bfloat16 for x, _ in recorder.train) and len(recorder.plans) == 2


def test_mixin_on_the_datamodule(tmp_path):
    from lightning_tricks import BatchTransformMixin

    class MixinData(BatchTransformMixin, ImageData):
        pass

    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Mixup(), recorder])
    trainer.fit(ListModule(), datamodule=MixinData(n=16, batch_size=8, kind="tuple", ones=False))
    assert recorder.batch_types == [tuple, tuple] and len(recorder.plans) == 2


# -- tasks (issue 20): masks, multi-hot rows, regression -------------------------------------------------------

from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_tricks.core.task import TaskNotSupportedError  # noqa: E402
from lightning_tricks.regularization._mix_tasks import mix_masks  # noqa: E402
from tests.regularization_modules import SegModule, seg_loader  # noqa: E402


class _States(Callback):
    """Keeps the mixed labels' state of every batch (put it after Mixup)."""

    def __init__(self) -> None:
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        y = batch["mask"] if isinstance(batch, dict) else batch[1]
        self.states.append(y._mix_state if isinstance(y, MixedLabels) else None)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_mixup_on_masks_mixes_the_per_pixel_loss(tmp_path, mode):
    module, states = SegModule(), _States()
    raw = torch.cat([y for _, y in seg_loader()])
    cpu_trainer(tmp_path, max_steps=2, callbacks=[Mixup(alpha=1.0, mode=mode, seed=0), states]).fit(module, seg_loader())
    for step, state in enumerate(states.states):
        x, own = module.seen[step]
        y = raw[4 * step:4 * step + 4]
        assert torch.equal(own, y)  # no box: each sample keeps its own mask (pixel accuracy stays meaningful)
        with torch.no_grad():
            logits = module(x)
        lam = state.plan.lam
        reference = sum(lam[i] * F.cross_entropy(logits[i:i + 1], y[i:i + 1]) * 64
                        + (1 - lam[i]) * F.cross_entropy(logits[i:i + 1], y[state.plan.perm[i]][None]) * 64
                        for i in range(4)) / (4 * 64)
        torch.testing.assert_close(module.losses[step], reference)
        assert mode == "sample" or torch.unique(lam).numel() == 1


def test_mixed_mask_loss_keeps_the_users_weight_and_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    masks = torch.randint(0, 4, (3, 5, 5), generator=g)
    masks[0, :2] = -100  # ignored pixels in one sample: the two masks have different denominators
    plan = MixPlan(perm=torch.tensor([2, 0, 1]), lam=torch.full((3,), 0.3))
    own, partner, weight = mix_masks(masks, plan)
    mixed = MixedLabels.wrap(own, _MixState(plan, 0.0, None, "Mixup", check_labels=False, partner=partner,
                                            weight=weight))
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    for fn, inputs in ((F.cross_entropy, logits), (F.nll_loss, logits.log_softmax(1))):
        for reduction in ("mean", "sum"):
            got = fn(inputs, mixed, weight=w, reduction=reduction)
            reference = (0.3 * fn(inputs, masks, weight=w, reduction=reduction)
                         + 0.7 * fn(inputs, masks[plan.perm], weight=w, reduction=reduction))
            torch.testing.assert_close(got, reference)
    torch.testing.assert_close(nn.CrossEntropyLoss(label_smoothing=0.1)(logits, mixed),
                               0.3 * F.cross_entropy(logits, masks, label_smoothing=0.1)
                               + 0.7 * F.cross_entropy(logits, masks[plan.perm], label_smoothing=0.1))


def test_cutmix_on_masks_pastes_the_mask_box_with_the_image_box(tmp_path):
    module, states = SegModule(), _States()
    callback = Mixup(cutmix_alpha=1.0, switch_prob=1.0, mode="sample", seed=1)
    cpu_trainer(tmp_path, max_steps=2, callbacks=[callback, states]).fit(module, seg_loader(kind="dict"))
    images = torch.cat([x for x, _ in module.seen])
    masks = torch.cat([y for _, y in module.seen])
    # the images' channel 0 is mask + 1: wherever a pixel came from, its label must have come with it
    assert torch.equal(masks, (images[:, 0] - 1).round().long())
    raw = torch.cat([y for _, y in seg_loader()])
    assert not torch.equal(masks, raw) and callback.task.kind == "dense"
    for step, state in enumerate(states.states):  # CutMix samples' labels are exact: weight 1, plain CE
        boxes = state.plan.boxes
        has_box = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        assert has_box.any() and torch.equal(state.weight[has_box], torch.ones(int(has_box.sum())))
        with torch.no_grad():
            expected = F.cross_entropy(module(module.seen[step][0]), module.seen[step][1])
        torch.testing.assert_close(module.losses[step], expected)


def test_mixup_mixes_multi_hot_rows_into_soft_bce_targets(tmp_path):
    class MultiLabel(ListModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            self.soft = getattr(self, "soft", []) + [y.clone()]
            return F.binary_cross_entropy_with_logits(self(x)[:, :3], y)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), (torch.rand(8, 3, generator=g) > 0.5).float()
    y[0] = torch.tensor([1.0, 1.0, 0.0])  # a row with two labels: multi-hot, not one-hot
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    module = MultiLabel(in_channels=3, classes=4)
    callback = Mixup(alpha=0.4, label_smoothing=0.2, seed=0)
    cpu_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, loader)
    assert callback.task.kind == "multilabel"
    from lightning_tricks.core.distributed import derive_seed
    g2 = torch.Generator().manual_seed(derive_seed(0, 0, 0))  # the callback's first batch's stream
    plan = sample_mix_plan(8, None, alpha=0.4, generator=g2)
    smooth = y * 0.8 + 0.1  # toward 1/2 per label, not 1/K
    reference = plan.lam[:, None] * smooth + (1 - plan.lam[:, None]) * smooth[plan.perm]
    torch.testing.assert_close(module.soft[0], reference)


def test_mixup_refuses_regression_and_soft_masks_in_one_line(tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(list(zip(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, generator=g),
                                                  strict=True)), batch_size=4)
    for callback, data, match in ((Mixup(), loader, "Mixup serves classification, multilabel, dense models, not a "
                                                    "regression model"),
                                  (Mixup(targets="soft"), seg_loader(), "cannot turn masks into class maps"),
                                  (Mixup(label_smoothing=0.1), seg_loader(), "pass label_smoothing to F.cross_entropy")):
        with pytest.raises(TaskNotSupportedError, match=match) as err:
            cpu_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(SegModule(), data)
        assert "\n" not in str(err.value)


def test_mixup_on_sequence_labels_mixes_the_loss_and_cutmix_is_refused(tmp_path):
    """[B, C, L] inputs with per-position labels [B, L] (MNIST-1D style): Mixup needs no grid, CutMix does."""
    class SeqModule(SegModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Conv1d(2, 3, 3, padding=1)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, 10, generator=g), torch.randint(0, 3, (4, 10), generator=g)
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=4)
    module, states = SeqModule(), _States()
    cpu_trainer(tmp_path, max_steps=1, callbacks=[Mixup(alpha=1.0, seed=0), states]).fit(module, loader)
    state = states.states[0]
    with torch.no_grad():
        logits = module(module.seen[0][0])
    lam = state.plan.lam[0]
    reference = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[state.plan.perm])
    torch.testing.assert_close(module.losses[0], reference)
    with pytest.raises(TaskNotSupportedError, match="CutMix pastes boxes on a 2-D grid"):
        cpu_trainer(tmp_path, max_steps=1, callbacks=[Mixup(cutmix_alpha=1.0)]).fit(SeqModule(), loader)
