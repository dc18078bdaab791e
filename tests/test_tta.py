import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_tricks
from lightning_tricks import ImageClassifier, TTAConfig, TTAWrapper
from lightning_tricks import TestTimeAugmentation as TTACallback  # an alias pytest does not collect
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.tta import ForwardNotCalledError, View, apply_view, merge_predictions, tta_forward
from tests.helpers import cpu_trainer, run_ddp

N_TEST, BATCH, CLASSES = 45, 4, 5  # 45 is not divisible by 2 ranks x 4


def _cnn(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES)).to(dtype).eval()


class Recorder(nn.Module):
    """Records the batch of every call (rows, shape, inference mode) and forwards to ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.shape[0], tuple(x.shape[1:]), torch.is_inference_mode_enabled()))
        return self.inner(x)


def _brute_force(model, x, config) -> torch.Tensor:
    """Mean of the per-view probabilities, one view at a time."""
    with torch.no_grad():
        probs = [model(apply_view(x, view, config)).softmax(-1) for view in config.expanded]
    return torch.stack(probs).mean(0)


# -- configuration and bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"views": []}, "`views`=[] is invalid: expected a non-empty list"),
    ({"views": ["hflip", "rotate"]}, "`views`=['hflip', 'rotate'] is invalid"),
    ({"views": "hflip"}, "`views`='hflip' is invalid"),
    ({"merge": "median"}, "`merge`='median' is invalid: expected one of 'mean', 'gmean', 'max', 'vote'"),
    ({"scales": [32, 0]}, "`scales`=[32, 0] is invalid: expected a non-empty list of sizes > 0"),
    ({"scales": [-8]}, "`scales`=[-8] is invalid"),
    ({"views": ["five_crop"], "crop_size": 40, "scales": [32, 48]}, "`crop_size`=40 is invalid: it is larger than the image at scale 32"),
    ({"views": ["five_crop"]}, "`crop_size`=None is invalid with views 'five_crop'"),
    ({"views": ["hflip"], "crop_size": 24}, "`crop_size`=24 is invalid: no view crops"),
    ({"views": ["ten_crop", "hflip"], "crop_size": 24}, "'ten_crop' already includes the horizontal flips"),
    ({"views": ["translate", "center_crop"], "crop_size": 24}, "'translate' and 'center_crop' both choose"),
    ({"views": ["five_crop", "ten_crop"], "crop_size": 24}, "at most one of center_crop, five_crop, ten_crop"),
    ({"task": "regression", "merge": "vote"}, "`merge`='vote' is invalid with task='regression'"),
    ({"max_batch": 0}, "`max_batch`=0 is invalid"),
    ({"stochastic_passes": 0}, "`stochastic_passes`=0 is invalid"),
    ({"padding_mode": "circular"}, "`padding_mode`='circular' is invalid"),
    ({"stages": ["fit"]}, "`stages`=['fit'] is invalid"),
    ({"module": "net-1"}, "`module`='net-1' is invalid"),
])
def test_bad_arguments_are_refused_with_the_argument_named(kwargs, message):
    with pytest.raises(InvalidArgumentError) as err:
        TTACallback(**kwargs)
    assert message in str(err.value)


def test_crop_larger_than_the_image_fails_at_the_first_batch():
    tta = TTAWrapper(_cnn(), views=["five_crop"], crop_size=40)
    with pytest.raises(InvalidArgumentError, match=r"`crop_size`=40 is invalid for images of 32x32: expected crop_size <= 32"):
        tta(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match=r"`translate`=8 is invalid for images of 8x32"):
        TTAWrapper(_cnn(), views=["translate"], translate=8)(torch.randn(1, 3, 8, 32, dtype=torch.float64))


def test_view_counts_and_crops_match_torchvision():
    assert TTAConfig(views=("hflip", "five_crop"), crop_size=28).num_views == 10
    assert TTAConfig(views=("ten_crop",), crop_size=28, scales=(32, 40, 48)).num_views == 30
    assert TTAConfig(views=("translate", "vflip"), stochastic_passes=2).num_views == 9 * 2 * 2
    x = torch.randn(2, 3, 33, 30)
    config = TTAConfig(views=("ten_crop",), crop_size=27)
    ours = sorted((apply_view(x, v, config) for v in config.expanded), key=lambda t: t.sum().item())
    # the five crops and their mirrors (torchvision's ten_crop mirrors the image first, which moves the center crop
    # by a pixel when the margin is odd)
    reference = sorted([v for c in TF.five_crop(x, [27, 27]) for v in (c, c.flip(-1))], key=lambda t: t.sum().item())
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    shifted = apply_view(torch.arange(9.0).reshape(1, 1, 3, 3), View(shift=(1, -1)), TTAConfig(translate=1))
    assert shifted[0, 0].tolist() == [[1.0, 2.0, 2.0], [1.0, 2.0, 2.0], [4.0, 5.0, 5.0]]  # down 1, left 1, replicated


# -- merging --------------------------------------------------------------------------------------------

def test_identity_view_is_exactly_the_plain_model():
    model = _cnn(torch.float32)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(TTAWrapper(model, views=["identity"])(x), model(x))
    single = torch.randn(1, 3, 4)
    assert all(torch.equal(merge_predictions(single, mode), single[0]) for mode in ("mean", "gmean", "max", "vote"))


@pytest.mark.parametrize("kwargs", [
    {"views": ["hflip", "five_crop"], "crop_size": 12},
    {"views": ["translate", "vflip"], "translate": 2, "padding_mode": "reflect"},
    {"views": ["hflip"], "scales": [12, 16, 20]},  # three shapes: one batch per shape
    {"views": ["center_crop"], "crop_size": 10, "scales": [12, 16]},
])
def test_merged_output_is_the_mean_of_per_view_probabilities(kwargs):
    model = Recorder(_cnn())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    tta = TTAWrapper(model, **kwargs)
    with torch.no_grad():
        merged = tta(x)
    groups = len(kwargs.get("scales", [])) if "crop_size" not in kwargs else 1
    assert len(model.calls) == max(1, groups)  # views of one shape go through the model together
    assert sum(rows for rows, _, _ in model.calls) == tta.config.num_views * 3
    assert all(inference for _, _, inference in model.calls)
    torch.testing.assert_close(merged.exp(), _brute_force(model.inner, x, tta.config), rtol=0, atol=1e-12)


def test_max_batch_bounds_every_model_call_and_keeps_the_result():
    model = Recorder(_cnn())
    x = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        whole = TTAWrapper(model, views=["ten_crop"], crop_size=12)(x)
        model.calls.clear()
        chunked = TTAWrapper(model, views=["ten_crop"], crop_size=12, max_batch=16)(x)
    assert [rows for rows, _, _ in model.calls] == [16, 16, 16, 16, 6]  # 70 rows
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


def test_flip_invariant_cnn_is_unchanged_and_flip_sensitive_model_changes_as_expected():
    invariant = _cnn()
    with torch.no_grad():  # mirror-symmetric kernels + symmetric padding + global pooling: f(hflip x) = f(x)
        for m in invariant.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        plain = invariant(x).log_softmax(-1)
        torch.testing.assert_close(TTAWrapper(invariant, views=["hflip"])(x), plain, rtol=0, atol=1e-12)
    sensitive = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, CLASSES)).double().eval()
    with torch.no_grad():
        merged = TTAWrapper(sensitive, views=["hflip"])(x)
        expected = (sensitive(x).softmax(-1) + sensitive(x.flip(-1)).softmax(-1)) / 2
        assert (merged.exp() - sensitive(x).softmax(-1)).abs().max() > 1e-2
    torch.testing.assert_close(merged.exp(), expected, rtol=0, atol=1e-12)


def test_merge_modes_against_their_formulas():
    logits = torch.randn(6, 4, CLASSES, dtype=torch.float64)
    p = logits.softmax(-1)
    torch.testing.assert_close(merge_predictions(logits, "mean").exp(), p.mean(0))
    g = p.prod(0) ** (1 / 6)
    torch.testing.assert_close(merge_predictions(logits, "gmean").exp(), g / g.sum(-1, keepdim=True))
    m = p.amax(0)
    torch.testing.assert_close(merge_predictions(logits, "max").exp(), m / m.sum(-1, keepdim=True))
    votes = F.one_hot(p.argmax(-1), CLASSES).sum(0).double()
    torch.testing.assert_close(merge_predictions(logits, "vote").exp(), (votes + p.mean(0)) / 7)
    assert torch.equal(merge_predictions(logits, "vote").argmax(-1), votes.add(p.mean(0)).argmax(-1))
    raw = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(merge_predictions(raw, task="regression"), raw.mean(0))
    with pytest.raises(ValueError, match="expected \\(batch, classes\\) logits"):
        merge_predictions(raw)


def test_gmean_stays_finite_on_large_negative_logits():
    logits = torch.tensor([[[-1e4, -2e4, -3e4]], [[-3e4, -1e4, -5e4]], [[-2e30, -1e30, -3e30]]])
    merged = merge_predictions(logits, "gmean")
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged.exp().sum(-1), torch.ones(1))
    naive = logits.prod(0) ** (1 / 3)  # ttach's gmean: a product of logits
    assert torch.isnan(naive).any() or torch.isinf(naive).any()
    for mode in ("mean", "max", "vote"):
        assert torch.isfinite(merge_predictions(logits, mode)).all()


def test_vote_breaks_ties_by_mean_probability_then_lowest_class():
    # two views vote class 0, two vote class 1; class 1's probabilities are larger on average
    logits = torch.log(torch.tensor([[[0.5, 0.4, 0.1]], [[0.5, 0.4, 0.1]], [[0.1, 0.9, 0.0]], [[0.3, 0.6, 0.1]]]) + 1e-9)
    assert merge_predictions(logits, "vote").argmax(-1).item() == 1
    symmetric = torch.log(torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]]))
    out = merge_predictions(symmetric, "vote")
    assert out.argmax(-1).item() == 0 and torch.isfinite(out).all()
    assert torch.equal(out, merge_predictions(symmetric, "vote"))  # deterministic


# -- stochastic passes ----------------------------------------------------------------------------------

class Noisy(nn.Module):
    """An opted-in stochastic layer (the lightning_tricks.core.stochastic contract)."""

    lt_stochastic_eval = False

    def __init__(self) -> None:
        super().__init__()
        self.active_calls = 0

    def forward(self, x):
        if self.training or self.lt_stochastic_eval:
            self.active_calls += 1
            return x + 0.1 * torch.randn_like(x)
        return x


def test_stochastic_passes_draw_fresh_randomness_reproducibly_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), Noisy(),
                          nn.Linear(16, CLASSES)).double().eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    running = model[2].running_mean.clone()
    tta = TTAWrapper(model, views=["identity"], stochastic_passes=8, seed=3)
    state = torch.get_rng_state()
    with torch.no_grad():
        a, b, plain = tta(x), tta(x), model(x)
    assert torch.equal(torch.get_rng_state(), state)  # the draws came from a seeded fork
    assert torch.equal(a, b) and not torch.allclose(a, plain.log_softmax(-1))
    assert model[4].active_calls == 2 and model[4].lt_stochastic_eval is False
    assert not model[3].training and not model[2].training and torch.equal(model[2].running_mean, running)
    other = TTAWrapper(model, views=["identity"], stochastic_passes=8, seed=4)(x)
    assert not torch.allclose(other, a)
    with pytest.raises(InvalidArgumentError, match="`stochastic_passes`=2 is invalid for the model Linear: it has no stochastic layer"):
        TTAWrapper(nn.Linear(4, 2), views=["identity"], stochastic_passes=2)


# -- Lightning: an unmodified user module ---------------------------------------------------------------

class UserNet(pl.LightningModule):
    """Written as users write theirs: list batches, self(x), F.cross_entropy, a torchmetrics metric."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(dropout), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(32, CLASSES))
        self.acc = MulticlassAccuracy(CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(CLASSES, average="micro")
        self.tta_in_training: list[bool] = []
        self.tta_in_validation: list[bool] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.tta_in_training.append(self.forward.__name__ == "forward_with_tta")
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.tta_in_validation.append(self.forward.__name__ == "forward_with_tta")
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        self.log("test_acc", self.acc)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N_TEST, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (N_TEST,), generator=g)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


def _reference(model: UserNet, data: Data, **kwargs) -> tuple[float, float]:
    """TTA accuracy and loss computed by hand with the plain wrapper."""
    with torch.no_grad():
        log_probs = TTAWrapper(model, **kwargs)(data.x)
    return (log_probs.argmax(1) == data.y).double().mean().item(), F.nll_loss(log_probs, data.y).item()


TRANSLATE = {"views": ["translate", "vflip"], "translate": 1}


def test_user_module_reports_tta_accuracy_and_gets_its_forward_back(tmp_path):
    torch.manual_seed(0)
    model, data = UserNet().eval(), Data()
    plain_forward = model.forward
    keys = set(model.state_dict())
    tta = TTACallback(**TRANSLATE, max_batch=50)
    result = cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=data, verbose=False)[0]
    acc, loss = _reference(model, data, **TRANSLATE)
    assert result["test_acc"] == pytest.approx(acc, abs=1e-6) and result["test_loss"] == pytest.approx(loss, abs=1e-5)
    plain = cpu_trainer(tmp_path).test(model, datamodule=data, verbose=False)[0]
    with torch.no_grad():
        assert plain["test_loss"] == pytest.approx(F.cross_entropy(model(data.x), data.y).item(), abs=1e-6)
    assert abs(plain["test_loss"] - result["test_loss"]) > 1e-4  # the callback did change the predictions
    assert "forward" not in model.__dict__ and model.forward == plain_forward and not tta.active
    assert set(model.state_dict()) == keys
    predictions = torch.cat(cpu_trainer(tmp_path, callbacks=[tta]).predict(model, datamodule=data))
    with torch.no_grad():
        torch.testing.assert_close(predictions, TTAWrapper(model, **TRANSLATE)(data.x).exp())


def test_identity_view_callback_reports_the_plain_figures_exactly(tmp_path):
    torch.manual_seed(0)
    model, data = UserNet(), Data()
    plain = cpu_trainer(tmp_path).test(model, datamodule=data, verbose=False)[0]
    with pytest.warns(UserWarning, match="single identity view"):
        identity = cpu_trainer(tmp_path, callbacks=[TTACallback(views=["identity"])]).test(
            model, datamodule=data, verbose=False)[0]
    assert identity == plain


class Exploding(UserNet):
    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        if batch_idx == 1:
            raise RuntimeError("boom in test_step")


def test_forward_is_restored_after_an_exception_inside_test(tmp_path):
    model = Exploding()
    tta = TTACallback(views=["vflip"])
    with pytest.raises(RuntimeError, match="boom in test_step"):
        cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=Data(), verbose=False)
    assert "forward" not in model.__dict__ and not tta.active
    with torch.no_grad():
        x = torch.randn(2, 1, 8, 8)
        assert torch.equal(model(x), model.net(x))


class CallsBackbone(UserNet):
    """Lightning's ImageNet example's style: the step calls the submodule (``self.model(images)``), not self(x)."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)  # bypasses self.forward
        self.acc(logits, y)
        self.log("test_acc", self.acc)
        self.log("test_loss", F.cross_entropy(logits, y))


class Preprocesses(UserNet):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc(self.net(x * 2.0), y)  # no module is called with the batch's input tensor
        self.log("test_acc", self.acc)


class NoModel(UserNet):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc(x.flatten(1)[:, :CLASSES], y)  # never calls `net`


def test_a_step_that_calls_a_submodule_is_augmented_from_its_first_batch(tmp_path):
    torch.manual_seed(0)
    model, data = CallsBackbone(), Data()
    plain = cpu_trainer(tmp_path).test(model, datamodule=data, verbose=False)[0]
    model.acc.reset()
    tta = TTACallback(**TRANSLATE)
    result = cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=data, verbose=False)[0]
    acc, loss = _reference(model, data, **TRANSLATE)
    assert result["test_acc"] == pytest.approx(acc, abs=1e-6) and result["test_loss"] == pytest.approx(loss, abs=1e-5)
    assert abs(result["test_loss"] - plain["test_loss"]) > 1e-4  # every batch, the first one included, was augmented
    assert tta._found == {"test": "net"} and not tta.active
    assert "forward" not in model.__dict__ and "forward" not in model.net.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # the probe's hooks are gone
    model.acc.reset()
    again = cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=data, verbose=False)[0]  # finds `net` again
    assert again == result
    model.acc.reset()
    explicit = cpu_trainer(tmp_path, callbacks=[TTACallback(**TRANSLATE, module="net")]).test(
        model, datamodule=data, verbose=False)[0]
    assert explicit == result


def test_a_step_that_calls_no_module_with_its_input_fails_loudly(tmp_path):
    model = Preprocesses()
    with pytest.raises(ForwardNotCalledError, match="or set `module` to the submodule to augment"):
        cpu_trainer(tmp_path, callbacks=[TTACallback(views=["vflip"])]).test(model, datamodule=Data(), verbose=False)
    assert "forward" not in model.__dict__ and all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ForwardNotCalledError, match="NoModel.net.forward, and check `module`"):
        cpu_trainer(tmp_path, callbacks=[TTACallback(views=["vflip"], module="net")]).test(
            NoModel(), datamodule=Data(), verbose=False)
    with pytest.raises(InvalidArgumentError, match="`module`='backbone' is invalid for Preprocesses"):
        cpu_trainer(tmp_path, callbacks=[TTACallback(module="backbone")]).test(model, datamodule=Data())


def test_stochastic_passes_need_a_stochastic_layer_at_setup(tmp_path):
    with pytest.raises(InvalidArgumentError, match="`stochastic_passes`=4 is invalid for UserNet"):
        cpu_trainer(tmp_path, callbacks=[TTACallback(views=["identity"], stochastic_passes=4)]).test(
            UserNet(), datamodule=Data())
    model = UserNet(dropout=0.5)
    tta = TTACallback(views=["identity"], stochastic_passes=4, seed=1)
    first = cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=Data(), verbose=False)[0]
    again = cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=Data(), verbose=False)[0]
    plain = cpu_trainer(tmp_path).test(model, datamodule=Data(), verbose=False)[0]
    assert first == again and first["test_loss"] != plain["test_loss"]


def test_checkpoint_resume_then_test_with_tta(tmp_path):
    torch.manual_seed(0)
    data = Data()
    trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(UserNet(), datamodule=data)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    trained = UserNet.load_from_checkpoint(tmp_path / "tiny.ckpt", weights_only=True).eval()
    fresh = UserNet()  # random weights: test must load the checkpoint first, then augment
    result = cpu_trainer(tmp_path, callbacks=[TTACallback(**TRANSLATE)]).test(
        fresh, datamodule=data, ckpt_path=str(tmp_path / "tiny.ckpt"), weights_only=True, verbose=False)[0]
    assert result["test_acc"] == pytest.approx(_reference(trained, data, **TRANSLATE)[0], abs=1e-6)


def test_torchvision_and_timm_models_merge_like_the_brute_force():
    for backbone in ("tv:resnet18", "timm:test_resnet"):
        torch.manual_seed(0)
        model = ImageClassifier(backbone, num_classes=CLASSES, in_channels=3).double().eval()
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        tta = TTAWrapper(model, views=["hflip", "center_crop"], crop_size=28)
        with torch.no_grad():
            merged = tta(x)
        torch.testing.assert_close(merged.exp(), _brute_force(model, x, tta.config), rtol=0, atol=1e-10)


def test_exported_and_listed():
    assert "TestTimeAugmentation" in lightning_tricks.CALLBACKS and lightning_tricks.TestTimeAugmentation is TTACallback
    assert lightning_tricks.TTAWrapper is TTAWrapper and lightning_tricks.TTAConfig is TTAConfig


def test_non_image_inputs_identity_is_the_model_and_passes_average_the_seeded_draws():
    """(batch, features) inputs: the identity view is forward(x) itself; stochastic passes are one batch of K * B rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, CLASSES)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = torch.randn(4, CLASSES)
    assert tta_forward(lambda v: out, x, TTAConfig(views=["identity"])) is out  # no copy, no merge
    passes = 5
    merged = tta_forward(model, x, TTAConfig(views=["identity"], stochastic_passes=passes), seed=7,
                         stochastic_module=model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model[1].train()
        draws = model(x.repeat(passes, 1)).softmax(-1).view(passes, 4, CLASSES)
        model[1].eval()
    torch.testing.assert_close(merged.exp(), draws.mean(0), rtol=0, atol=1e-12)
    assert not torch.allclose(merged.exp(), model(x).softmax(-1))  # the passes did draw dropout masks
    with pytest.raises(ValueError, match="views \\['hflip'\\] need image batches"):
        tta_forward(model, x, TTAConfig(views=["hflip"]))


# -- DDP ------------------------------------------------------------------------------------------------

def _test_metrics(trainer, pl_module):
    return {**{k: float(v) for k, v in trainer.callback_metrics.items()}, "batches": trainer.num_test_batches,
            "restored": "forward" not in pl_module.__dict__}


def test_ddp_tta_test_accuracy_equals_single_process(tmp_path):
    torch.manual_seed(0)
    model, data = UserNet(), Data()
    single = cpu_trainer(tmp_path, callbacks=[TTACallback(**TRANSLATE)]).test(
        model, datamodule=data, verbose=False)[0]
    ranks = run_ddp(model, data, tmp_path=tmp_path, fn="test", probe=_test_metrics,
                    callbacks=[TTACallback(**TRANSLATE, max_batch=64)])
    for rank in ranks:
        assert rank["test_acc"] == single["test_acc"]
        assert rank["test_loss"] == pytest.approx(single["test_loss"], abs=1e-6)
        assert rank["batches"] == [6] and rank["restored"]


def test_ddp_fit_validates_with_tta_and_trains_without(tmp_path):
    torch.manual_seed(0)
    model, data = UserNet(), Data()

    def probe(trainer, pl_module):
        # validation ran once, after the last training step: the final weights are the validated ones
        reference = _reference(pl_module, data, views=["vflip"])[0]
        return {"val_acc": float(trainer.callback_metrics["val_acc"]), "reference": reference,
                "tta_in_training": pl_module.tta_in_training, "tta_in_validation": pl_module.tta_in_validation,
                "restored": pl_module.forward.__func__ is UserNet.forward}

    tta = TTACallback(views=["vflip"], stages=["validate"])
    ranks = run_ddp(model, data, tmp_path=tmp_path, fn="fit", probe=probe, callbacks=[tta], max_epochs=1,
                    limit_train_batches=3, num_sanity_val_steps=0)
    for rank in ranks:
        assert rank["val_acc"] == pytest.approx(rank["reference"], abs=1e-6)
        assert rank["tta_in_training"] == [False] * 3 and rank["tta_in_validation"] == [True] * 6
        assert rank["restored"]


# -- the CLI, as a user runs it -------------------------------------------------------------------------

USER_PROJECT = '''
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class DigitNet(pl.LightningModule):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                 nn.Flatten(), nn.Linear(16 * hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
'''


@pytest.mark.slow
def test_cli_tests_a_user_checkpoint_with_the_example_config_on_two_processes(tmp_path, monkeypatch):
    import sys

    import yaml

    from lightning_tricks import DigitsDataModule
    from tests.helpers import REPO, run_cli

    (tmp_path / "user_project.py").write_text(USER_PROJECT)
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_project import DigitNet

    config = yaml.safe_load((REPO / "examples" / "tta.yaml").read_text())
    tta_args = config["trainer"]["callbacks"][-1]["init_args"]
    data_args = {**config["data"]["init_args"], "test_fraction": 0.155}  # 279 test images: DDP would pad one
    pl.seed_everything(0)
    model, data = DigitNet(), DigitsDataModule(**data_args)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "user.ckpt"
    trainer.save_checkpoint(ckpt)
    x, y = data.test_set.tensors
    assert len(y) == 279
    with torch.no_grad():
        expected = (TTAWrapper(model.eval(), **tta_args)(x).argmax(1) == y).double().mean().item()
    proc = run_cli(["test", "--config", str(REPO / "examples" / "tta.yaml"), "--model", "user_project.DigitNet",
                    "--ckpt_path", str(ckpt), "--weights_only=true", "--data.test_fraction=0.155",
                    "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false"], cwd=tmp_path,
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    reported = float([ln for ln in proc.stdout.splitlines() if ln.startswith("Test accuracy:")][-1].split(":")[1])
    assert reported == pytest.approx(expected, abs=1e-4), (reported, expected)
    assert "TestTimeAugmentation: test predictions of DigitNet average 9 views" in proc.stdout + proc.stderr
    del sys.modules["user_project"]


# -- the seed rule ------------------------------------------------------------------------------------

def test_default_seed_is_the_runs_seed(tmp_path, monkeypatch):
    """seed=None follows seed_everything, as every stochastic callback does; an explicit seed ignores it."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test
    model = UserNet(dropout=0.5)

    def test(run_seed, **kwargs):
        pl.seed_everything(run_seed, verbose=False)
        tta = TTACallback(views=["identity"], stochastic_passes=4, **kwargs)
        return cpu_trainer(tmp_path, callbacks=[tta]).test(model, datamodule=Data(), verbose=False)[0], tta

    default, tta = test(3)
    assert tta.state_dict() == {"seed": 3}
    assert test(0, seed=3)[0] == default and test(4)[0] != default


class EvalNoise(nn.Module):
    """Noise only in TTA's stochastic passes: training stays deterministic whatever the run's seed."""

    lt_stochastic_eval = False

    def forward(self, x):
        return x + 0.5 * torch.randn_like(x) if self.lt_stochastic_eval else x


class EvalNoiseNet(UserNet):
    def __init__(self) -> None:
        super().__init__()
        self.net[2] = EvalNoise()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.nll_loss(self(x), y))


def test_resume_under_another_run_seed_validates_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """seed=None is resolved once and kept in the checkpoint: the resumed run draws the saved run's passes."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")

    def fit(epochs, run_seed, ckpt_path=None, save=None):
        pl.seed_everything(run_seed, verbose=False)
        torch.manual_seed(0)  # the same initial weights in every run
        trainer = cpu_trainer(tmp_path, max_epochs=epochs, num_sanity_val_steps=0, callbacks=[
            TTACallback(views=["identity"], stochastic_passes=3, stages=["validate"])])
        trainer.fit(EvalNoiseNet(), datamodule=Data(), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return float(trainer.callback_metrics["val_loss"])

    straight = fit(2, run_seed=1)
    fit(1, run_seed=1, save=tmp_path / "one.ckpt")
    assert fit(2, run_seed=2, ckpt_path=str(tmp_path / "one.ckpt")) == straight
    assert fit(2, run_seed=2) != straight  # the run's seed moves the draws: the resumed run used the saved one


# -- tasks: multi-label, softmax outputs, dense maps (issue 20) ------------------------------------------

from lightning_tricks.core.task import TaskNotSupportedError  # noqa: E402


def test_multilabel_merge_is_the_mean_of_sigmoid_probabilities_per_label():
    logits = torch.randn(4, 3, 6, dtype=torch.float64) * 3
    merged = merge_predictions(logits, "mean", "multilabel")
    torch.testing.assert_close(merged.sigmoid(), logits.sigmoid().mean(0))  # a softmax across labels is wrong
    torch.testing.assert_close(merge_predictions(logits, "gmean", "multilabel"), logits.mean(0))
    p = logits.sigmoid()
    top = p.amax(0) / (p.amax(0) + (1 - p).amax(0))  # the per-class max of the two-class distribution, renormalized
    torch.testing.assert_close(merge_predictions(logits, "max", "multilabel").sigmoid(), top)
    votes = (p > 0.5).double().sum(0)
    torch.testing.assert_close(merge_predictions(logits, "vote", "multilabel").sigmoid(), (votes + p.mean(0)) / 5)
    from lightning_tricks.core.task import Task
    probs = merge_predictions(p, "mean", Task("multilabel", "probs", 6, sigmoid=True))
    torch.testing.assert_close(probs, p.mean(0))


def test_softmax_and_log_softmax_outputs_keep_their_form():
    from lightning_tricks.core.task import Task
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    p = logits.softmax(-1)
    torch.testing.assert_close(merge_predictions(p, "mean", Task("classification", "probs", 5)), p.mean(0))
    torch.testing.assert_close(merge_predictions(logits.log_softmax(-1), "mean", Task("classification", "log_probs", 5)),
                               p.mean(0).log())
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Softmax(dim=1)).double().eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        out = TTAWrapper(model, views=["hflip"])(x)  # task read from the output: softmax probabilities
        reference = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(out, reference)


class _ML(pl.LightningModule):
    """A public-project style multi-label module: BCE-with-logits on multi-hot targets, sigmoid > 0.5 accuracy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 6))
        self.outputs: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.outputs.append(logits)
        self.log("test_loss", F.binary_cross_entropy_with_logits(logits, y))
        self.log("test_acc", ((logits.sigmoid() > 0.5).float() == y).float().mean())


def test_callback_on_a_multilabel_module_averages_sigmoids(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 8, 8, generator=g), (torch.rand(12, 6, generator=g) > 0.6).float()
    model = _ML().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    cpu_trainer(tmp_path, callbacks=[TTACallback(views=["hflip", "vflip"])]).test(model, loader, verbose=False)
    merged = torch.cat(model.outputs)
    with torch.no_grad():
        views = [model.net(v) for v in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))]
    reference = torch.stack(views).sigmoid().mean(0)
    torch.testing.assert_close(merged.sigmoid(), reference, rtol=0, atol=1e-6)
    # the wrapper sees no targets: it must be told; left to infer, it takes (B, C) for single-label
    with torch.no_grad():
        told = TTAWrapper(model.net, views=["hflip", "vflip"], task="multilabel")(x)
    torch.testing.assert_close(told.sigmoid(), reference, rtol=0, atol=1e-6)


def _pixel_model(classes: int = 3, dtype=torch.float64) -> nn.Module:
    """A fully convolutional per-pixel classifier whose output depends on position (not flip/shift equivariant)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, classes, 3, padding=1)).to(dtype).eval()


def test_dense_flip_views_are_flipped_back_before_averaging():
    model = _pixel_model()
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["hflip", "vflip"])(x)
        p = [model(x), model(x.flip(-1)).flip(-1), model(x.flip(-2)).flip(-2), model(x.flip(-1).flip(-2)).flip(-1).flip(-2)]
    reference = torch.stack([o.softmax(1) for o in p]).mean(0)
    torch.testing.assert_close(merged.exp(), reference, rtol=0, atol=1e-12)
    wrong = torch.stack([model(v).softmax(1) for v in (x, x.flip(-1))]).mean(0)  # the old, unflipped average
    assert not torch.allclose(TTAWrapper(model, views=["hflip"])(x).exp(), wrong)


def test_dense_translate_views_are_moved_back_and_each_pixel_averages_the_views_that_saw_it():
    model = _pixel_model()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    config = TTAConfig(views=["translate"], translate=1)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["translate"], translate=1)(x)
        outs = {v.shift: model(apply_view(x, v, config)).softmax(1) for v in config.expanded}
    reference = torch.zeros(1, 3, 5, 6, dtype=torch.float64)
    for i in range(5):
        for j in range(6):
            seen = [o[0, :, i + dy, j + dx] for (dy, dx), o in outs.items() if 0 <= i + dy < 5 and 0 <= j + dx < 6]
            reference[0, :, i, j] = torch.stack(seen).mean(0)
    torch.testing.assert_close(merged.exp(), reference, rtol=0, atol=1e-12)


def test_dense_five_crops_are_pasted_back_with_coverage_weights():
    model = _pixel_model()
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    c = 5
    with torch.no_grad():
        merged = TTAWrapper(model, views=["five_crop"], crop_size=c)(x)
        corners = {(0, 0): None, (0, 8 - c): None, (7 - c, 0): None, (7 - c, 8 - c): None,
                   (int(round((7 - c) / 2)), int(round((8 - c) / 2))): None}
        for top, left in corners:
            corners[(top, left)] = model(x[..., top:top + c, left:left + c]).softmax(1)
    reference = torch.zeros(2, 3, 7, 8, dtype=torch.float64)
    for i in range(7):
        for j in range(8):
            seen = [o[:, :, i - t, j - s] for (t, s), o in corners.items() if t <= i < t + c and s <= j < s + c]
            reference[:, :, i, j] = torch.stack(seen).mean(0)
    torch.testing.assert_close(merged.exp(), reference, rtol=0, atol=1e-12)


def test_dense_scales_are_resized_back():
    model = _pixel_model()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["identity"], scales=[6, 8, 12])(x)
        outs = [F.interpolate(model(TF.resize(x, [s], antialias=True)), size=(8, 8), mode="bilinear",
                              align_corners=False).softmax(1) for s in (6, 8, 12)]
    torch.testing.assert_close(merged.exp(), torch.stack(outs).mean(0), rtol=0, atol=1e-12)


def test_regression_maps_are_flipped_back_too():
    torch.manual_seed(0)
    model = nn.Conv2d(2, 1, 3, padding=1).double().eval()  # a [B, 1, H, W] map: regression (depth, denoising)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["hflip"], task="regression")(x)
        reference = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    ({"views": ["center_crop"], "crop_size": 4}, "center crop: the border outside it gets no prediction"),
    ({"views": ["five_crop"], "crop_size": 3}, "leave parts of the \\(8, 8\\) input without a prediction"),
    ({"views": ["translate"], "scales": [8, 10]}, "not from both"),
])
def test_dense_views_that_cannot_be_mapped_back_are_refused_in_one_line(kwargs, match):
    model = _pixel_model()
    with pytest.raises(TaskNotSupportedError, match=match) as err:
        TTAWrapper(model, **kwargs)(torch.randn(1, 2, 8, 8, dtype=torch.float64))
    assert "\n" not in str(err.value)
    if "five_crop" not in kwargs["views"]:  # told the task, the config is refused at once
        with pytest.raises(TaskNotSupportedError, match=match):
            TTAConfig(task="dense", **kwargs)


def test_dense_outputs_at_another_resolution_serve_flips_and_refuse_shifts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)).double().eval()  # a stride-2 map: 4x4 for 8x8
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["hflip"], task="dense")(x)
        reference = (model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(merged.exp(), reference, rtol=0, atol=1e-12)
    with pytest.raises(TaskNotSupportedError, match="use flip views only"):
        TTAWrapper(model, views=["translate"], task="dense")(x)


class _Seg(pl.LightningModule):
    """A segmentation module as public projects write it: masks [B, H, W], per-pixel cross-entropy and accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _pixel_model(3, torch.float32)
        self.outputs: list[torch.Tensor] = []

    def test_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        self.outputs.append(logits)
        self.log("test_loss", F.cross_entropy(logits, batch["mask"]))


def test_callback_on_a_segmentation_module_flips_the_maps_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(6, 2, 8, 8, generator=g), torch.randint(0, 3, (6, 8, 8), generator=g)
    loader = DataLoader([{"image": x[i], "mask": m[i]} for i in range(6)], batch_size=3)
    module = _Seg()
    tta = TTACallback(views=["hflip"])
    cpu_trainer(tmp_path, callbacks=[tta]).test(module, loader, verbose=False)
    assert tta.task.kind == "dense" and tta.task.num_classes == 3
    with torch.no_grad():
        reference = (module.model(x).softmax(1) + module.model(x.flip(-1)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(torch.cat(module.outputs).exp(), reference, rtol=0, atol=1e-6)


def test_an_inferred_regression_model_refuses_class_merges_in_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1)).double().eval()  # one output, no targets: regression
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(TaskNotSupportedError, match="merge='vote' needs class scores.*use merge='mean'"):
        TTAWrapper(model, views=["hflip"], merge="vote")(x)
    with torch.no_grad():
        torch.testing.assert_close(TTAWrapper(model, views=["hflip"])(x), (model(x) + model(x.flip(-1))) / 2)


def test_single_logit_binary_model_averages_sigmoids():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1)).double().eval()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        merged = TTAWrapper(model, views=["hflip"], task="multilabel")(x)
        reference = (model(x).sigmoid() + model(x.flip(-1)).sigmoid()) / 2
    assert merged.shape == (5, 1)
    torch.testing.assert_close(merged.sigmoid(), reference)
