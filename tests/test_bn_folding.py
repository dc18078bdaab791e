"""fold_batch_norm: outputs equal the unfolded model in eval mode, the formula, what is left and why."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import lightning_tricks as lt
from lightning_tricks.setup.bn_folding import FoldReport, MissingExampleInputError, fold_batch_norm
from lightning_tricks.zoo import ImageClassifier
from lightning_tricks.zoo.backbones import build_backbone


def _trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if module.weight is not None:
                with torch.no_grad():
                    module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    module.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _assert_folds_exactly(model: nn.Module, x: torch.Tensor, expect_folded: int) -> FoldReport:
    model = _trained_statistics(model)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_batch_norm(model, x[:2], return_report=True)
    assert len(report.folded) == expect_folded and not report.skipped
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return report


def test_conv_bn_formula() -> None:
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
    net = _trained_statistics(nn.Sequential(conv, bn, nn.ReLU()))
    folded = fold_batch_norm(net, torch.randn(1, 3, 8, 8))
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[0].weight, conv.weight * s.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded[0].bias, (conv.bias - bn.running_mean) * s + bn.bias)
    assert isinstance(folded[1], nn.Identity)


@pytest.mark.parametrize("build, x, count", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                           nn.BatchNorm2d(8, affine=False), nn.Flatten(), nn.Linear(8 * 12 * 12, 5),
                           nn.BatchNorm1d(5)), torch.randn(6, 3, 16, 16), 3),
    (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ConvTranspose1d(4, 3, 3), nn.BatchNorm1d(3)),
     torch.randn(5, 2, 10), 2),
    (lambda: build_backbone("resnet20"), torch.randn(4, 3, 32, 32), 19),
    (lambda: build_backbone("simple_cnn"), torch.randn(4, 3, 32, 32), None),
    (lambda: build_backbone("resnet18", num_classes=10), torch.randn(3, 3, 32, 32), 20),
    (lambda: build_backbone("timm:resnet18", num_classes=10), torch.randn(3, 3, 32, 32), 20),
], ids=["sequential-conv-linear", "conv1d-transpose", "zoo-resnet20", "zoo-simple_cnn", "torchvision-resnet18",
        "timm-resnet18"])
def test_outputs_equal_unfolded_model(build, x: torch.Tensor, count: int | None) -> None:
    model = build()
    bns = sum(isinstance(m, _BatchNorm) for m in model.modules())
    _assert_folds_exactly(model, x, bns if count is None else count)


def test_timm_batchnorm_act_keeps_its_activation() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU))
    net = _trained_statistics(net)
    folded = fold_batch_norm(net, torch.randn(2, 3, 8, 8))
    assert any(isinstance(m, nn.ReLU) for m in folded[1].modules())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-6, rtol=1e-5)
        assert (folded(x) >= 0).all()


class TwoConsumers(nn.Module):
    """The conv output also feeds a skip connection: folding the BatchNorm into it would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.shared, self.bn_shared = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.pre_bn, self.after = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.unused_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = self.bn(h) + h
        h = self.shared(self.bn_shared(self.shared(h)))  # called twice
        return self.after(self.pre_bn(torch.relu(h)))  # BatchNorm after an activation, before the conv


def test_what_cannot_be_folded_is_left_and_listed() -> None:
    model = _trained_statistics(TwoConsumers())
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match="left 4"):
        folded, report = fold_batch_norm(model, x, return_report=True)
    assert report.folded == {}
    assert "also used outside" in report.skipped["bn"]
    assert "runs 2 times" in report.skipped["bn_shared"]
    assert "does not come straight" in report.skipped["pre_bn"]
    assert "does not run" in report.skipped["unused_bn"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_no_running_statistics_is_left() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.warns(UserWarning):
        _, report = fold_batch_norm(net, torch.randn(2, 3, 8, 8), return_report=True)
    assert "track_running_stats=False" in report.skipped["1"]


class UsesWeightDirectly(nn.Module):
    """A forward that reads the conv's weight itself: one trace cannot see that folding changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def test_a_changed_output_raises_instead_of_returning_a_wrong_model() -> None:
    with pytest.raises(RuntimeError, match="differs from the original"):
        fold_batch_norm(_trained_statistics(UsesWeightDirectly()), torch.randn(2, 3, 8, 8))


def test_lightning_module_uses_example_input_array_and_is_not_changed() -> None:
    module = ImageClassifier(backbone="resnet20", num_classes=10, in_channels=3, image_size=32)
    module.example_input_array = torch.randn(2, 3, 32, 32)
    _trained_statistics(module)
    module.train()
    folded = lt.fold_batch_norm(module)
    assert module.training and not folded.training
    assert any(isinstance(m, _BatchNorm) for m in module.modules())
    x = torch.randn(4, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module(x), atol=1e-5, rtol=1e-5)


def test_missing_example_input_is_one_clear_line() -> None:
    with pytest.raises(MissingExampleInputError) as info:
        fold_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    message = str(info.value)
    assert "\n" not in message and "example_input" in message and "Sequential" in message


def test_model_without_batch_norm_is_an_equal_copy() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = fold_batch_norm(net, torch.randn(2, 3), return_report=True)
    assert folded is not net and report.folded == {} and report.skipped == {}
    x = torch.randn(5, 3)
    torch.testing.assert_close(folded(x), net(x))
