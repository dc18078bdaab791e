import pytest
import torch
from torch import nn

from lightning_tricks.core.stochastic import STOCHASTIC_EVAL_ATTR, stochastic_eval, stochastic_modules


class _Noisy(nn.Module):
    lt_stochastic_eval = False

    def forward(self, x):
        return x + torch.randn_like(x) if (self.training or self.lt_stochastic_eval) else x


def _model():
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), _Noisy()).eval()


def test_stochastic_eval_makes_only_stochastic_layers_random_and_restores():
    model = _model()
    x = torch.randn(4, 8)
    ref = model(x)
    assert torch.equal(model(x), ref)  # deterministic in eval
    with stochastic_eval(model) as mods:
        assert [type(m) for m in mods] == [nn.Dropout, _Noisy]
        assert not model[1].training  # batch norm stays in eval: no batch statistics, no update
        running = model[1].running_mean.clone()
        a, b = model(x), model(x)
        assert not torch.equal(a, b)
        assert torch.equal(model[1].running_mean, running)
    assert not model[2].training and getattr(model[3], STOCHASTIC_EVAL_ATTR) is False
    assert torch.equal(model(x), ref)


def test_stochastic_eval_restores_on_exception():
    model = _model()
    with pytest.raises(RuntimeError), stochastic_eval(model):
        raise RuntimeError("boom")
    assert not model[2].training and model[3].lt_stochastic_eval is False


def test_no_stochastic_layers_yields_empty():
    assert stochastic_modules(nn.Linear(2, 2)) == []
    with stochastic_eval(nn.Linear(2, 2)) as mods:
        assert mods == []
