"""The shared helpers that find the model a step calls and the number of classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tricks import infer_num_classes
from lightning_tricks.core.model_probe import InputModuleProbe, batch_input
from lightning_tricks.core.validation import InvalidArgumentError


class Net(nn.Module):
    """A LightningModule-like holder: a preprocessing module and a classifier, both submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Identity()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.model(x)


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_batch_input_finds_the_input_of_every_batch_kind():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert batch_input(x) is x and batch_input([x, y]) is x and batch_input((None, x, y)) is x
    assert batch_input({"label": y, "image": x}) is x and batch_input({"features": x, "label": y}) is x
    assert batch_input([1, "a"]) is None and batch_input(None) is None


@pytest.mark.parametrize("call,expected", [
    (lambda net, x: net(x), ""),  # self(x): the root itself, outermost
    (lambda net, x: net.forward(x), "model"),  # self.forward(x) bypasses the root's hooks: its submodule
    (lambda net, x: net.model(x), "model"),  # self.model(x)
    (lambda net, x: net.model(net.scale(x)), "model"),  # Identity returns x itself, but its output is not logits
    (lambda net, x: net.model(x.contiguous()), "model"),  # the same storage counts as the input
])
def test_the_outermost_module_called_with_the_input_is_found(call, expected):
    net, x = Net(), torch.randn(4, 3, 2, 2)
    with InputModuleProbe(net, [x, torch.zeros(4)], accept=lambda out: out.ndim == 2) as probe:
        out = call(net, x)
    assert probe.found is not None and probe.found.name == expected
    assert probe.found.module is net.get_submodule(expected) and torch.equal(probe.found.output, out)
    assert _hooks(net) == 0


def test_nothing_is_found_when_no_module_gets_the_input_and_paused_calls_are_ignored():
    net, x = Net(), torch.randn(4, 3, 2, 2)
    with InputModuleProbe(net, [x]) as probe:
        net(x * 2.0)
        with probe.paused():
            net.model(x)
    assert probe.found is None and _hooks(net) == 0


def test_replace_changes_every_output_of_the_found_module_during_the_probe():
    net, x = Net(), torch.randn(4, 3, 2, 2)
    calls = []

    def replace(module, args, kwargs, output):
        calls.append(args[0].shape[0])
        return torch.zeros_like(output) if module is net.model else None

    with InputModuleProbe(net, [x], replace=replace) as probe:
        first = net.forward(x)
        second = net.model(x[:2])  # a later call of the found module, with another input
        net.model[1](torch.randn(4, 12))  # another module: untouched
    assert probe.found.name == "model" and torch.equal(first, torch.zeros(4, 3)) and torch.equal(second, torch.zeros(2, 3))
    assert calls == [4, 2]


def test_num_classes_rule_and_its_errors():
    net = Net()  # last nn.Linear: 3 classes

    class Trainer:
        class datamodule:  # noqa: N801
            num_classes = 7

    assert infer_num_classes(None, net) == 3
    assert infer_num_classes(None, net, logits=torch.zeros(2, 6)) == 6  # the logits' width beats the last nn.Linear
    assert infer_num_classes(Trainer(), nn.Identity()) == 7  # the datamodule first
    with pytest.raises(InvalidArgumentError, match="the datamodule says num_classes=7 but its logits have 6 classes"):
        infer_num_classes(Trainer(), net, "MyCallback", logits=torch.zeros(2, 6))
    assert infer_num_classes(Trainer(), net, logits=torch.zeros(2, 6), required=False) == 7
    assert infer_num_classes(None, nn.Identity(), required=False) is None
    with pytest.raises(InvalidArgumentError, match="MyCallback needs the number of classes"):
        infer_num_classes(None, nn.Identity(), "MyCallback")
