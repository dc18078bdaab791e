"""Model surgery shared by the structural tricks: selection, names kept, idempotence, pickling, resume."""

import copy
import logging
import pickle

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_tricks import DropConnect, FractionalMaxPooling, StochasticDepth
from lightning_tricks.checkpoint import recorded_tricks
from lightning_tricks.core.surgery import (
    _DERIVED,
    SurgeryReport,
    SwappableMixin,
    derived_class,
    keys_unchanged,
    marker_values,
    original_class,
    replace_module,
    select_modules,
    swap_class,
)
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization.dropconnect import _DropConnectMixin, apply_dropconnect
from lightning_tricks.regularization.fractional_pooling import (
    DEFAULT_RATIO,
    SeededFractionalMaxPool2d,
    apply_fractional_pooling,
)
from lightning_tricks.regularization.stochastic_depth import _DepthMixin, apply_stochastic_depth
from tests.helpers import cpu_trainer, run_ddp
from tests.structural_user_module import TinyResNet, UserResidualBlock, digits_loader


def _linear_only(module):
    return None if type(module) is nn.Linear else "not a Linear"


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), nn.Linear(8, 2))


def test_select_by_pattern_default_and_predicate():
    net = _net()
    names = lambda chosen: [n for n, _ in chosen]  # noqa: E731
    assert names(select_modules(net, None, can_wrap=_linear_only, arg_name="layers", trick="T")) == ["0", "2.0", "3"]
    assert names(select_modules(net, ["2.*"], can_wrap=_linear_only, arg_name="layers", trick="T")) == ["2.0"]
    assert names(select_modules(net, None, can_wrap=_linear_only, arg_name="layers", trick="T",
                                default=lambda n, m: n != "3")) == ["0", "2.0"]
    assert names(select_modules(net, ["*"], can_wrap=_linear_only, arg_name="layers", trick="T",
                                predicate=lambda n, m: m.out_features == 8 if isinstance(m, nn.Linear) else True)) \
        == ["0", "2.0"]


def test_a_pattern_selects_what_is_inside_a_match_and_exclude_drops():
    net = _net()
    names = lambda chosen: [n for n, _ in chosen]  # noqa: E731
    # "2" is a Sequential (not convertible): it selects the convertible modules inside it instead of failing
    assert names(select_modules(net, ["2"], can_wrap=_linear_only, arg_name="include", trick="T")) == ["2.0"]
    assert names(select_modules(net, None, can_wrap=_linear_only, arg_name="include", trick="T",
                                exclude=["2"])) == ["0", "3"]
    assert names(select_modules(net, ["*"], can_wrap=_linear_only, arg_name="include", trick="T",
                                exclude=["3"])) == ["0", "2.0"]
    with pytest.raises(InvalidArgumentError, match=r"T: `exclude` pattern 'nine' matches no module"):
        select_modules(net, None, can_wrap=_linear_only, arg_name="include", trick="T", exclude=["nine"])


def test_selector_matching_nothing_or_only_unconvertible_names_argument_and_pattern():
    with pytest.raises(InvalidArgumentError, match=r"T: `layers` pattern 'head\*' matches no module: names look like '0', '1', '2'"):
        select_modules(_net(), ["head*"], can_wrap=_linear_only, arg_name="layers", trick="T")
    with pytest.raises(InvalidArgumentError, match=r"`layers` pattern '2.1' matches only modules T cannot act on: "
                                                   r"'2.1' \(BatchNorm1d: not a Linear\)"):
        select_modules(_net(), ["2.1"], can_wrap=_linear_only, arg_name="layers", trick="T")


class _Loud(SwappableMixin):
    def forward(self, x):
        return 2 * super().forward(x)


def test_swap_class_keeps_object_parameters_hooks_and_is_idempotent():
    layer = nn.Linear(3, 3)
    weight, calls = layer.weight, []
    layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3)
    ref = layer(x)
    assert swap_class(layer, _Loud) is True
    assert isinstance(layer, nn.Linear) and isinstance(layer, _Loud) and original_class(layer) is nn.Linear
    assert layer.weight is weight and torch.allclose(layer(x), 2 * ref) and len(calls) == 2
    assert swap_class(layer, _Loud) is False and type(layer) is derived_class(_Loud, nn.Linear)


def test_swapped_user_class_pickles_and_deepcopies_even_in_a_fresh_process():
    block = UserResidualBlock(4)
    swap_class(block, _Loud)
    x = torch.randn(1, 4, 5, 5)
    ref = block.eval()(x)
    data = pickle.dumps(block)
    _DERIVED.pop((_Loud, UserResidualBlock))  # a fresh process has not created the derived class yet
    loaded = pickle.loads(data)
    assert isinstance(loaded, _Loud) and isinstance(loaded, UserResidualBlock)
    assert torch.equal(loaded(x), ref)
    clone = copy.deepcopy(loaded)
    assert clone.conv1.weight is not loaded.conv1.weight and torch.equal(clone(x), ref)


def test_replace_module_refuses_stateful_modules_and_keys_check():
    net = _net()
    with pytest.raises(ValueError, match="has state"):
        replace_module(net, "0", nn.Identity())
    assert isinstance(replace_module(net, "1", nn.Tanh()), nn.ReLU) and isinstance(net[1], nn.Tanh)
    before = list(net.state_dict())
    net[0] = nn.Linear(4, 8, bias=False)
    with pytest.raises(RuntimeError, match=r"removed \['0.bias'\]"):
        keys_unchanged(before, net, "T")


def test_report_message_counts_names_and_skips():
    report = SurgeryReport("T", converted=["a", "b"], already=["c"], skipped=[("d", "the head")], detail="p=0.5")
    assert report.message("layers") == ("T: 3 layers (2 converted now, 1 already converted); p=0.5; "
                                        "modules: 'a', 'b', 'c'; left 'd' as is: the head.")


def _all_tricks(model):
    apply_dropconnect(model, 0.5, include=["fc1"])
    apply_stochastic_depth(model, 0.5)
    apply_fractional_pooling(model)


def test_state_dict_keys_identical_and_checkpoints_load_both_ways():
    """Parameter and buffer names never change; fractional pooling (another network at evaluation) adds one marker
    buffer, so its checkpoint loads into the plain architecture only non-strictly, with an error naming the trick."""
    plain = TinyResNet()
    keys = list(plain.state_dict())
    marker = "pool.lightning_tricks_FractionalMaxPooling"
    tricked = TinyResNet()
    _all_tricks(tricked)
    assert [k for k in tricked.state_dict() if k != marker] == keys and marker in tricked.state_dict()
    assert marker_values(tricked.state_dict()[marker], "fiii") == [DEFAULT_RATIO, 2, 0, 0]  # ratio, kernel, seed, index
    tricked.load_state_dict(plain.state_dict())  # strict: plain -> tricked (the marker keeps its value)
    for k, v in plain.state_dict().items():
        assert torch.equal(tricked.state_dict()[k], v)
    fresh = TinyResNet()
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "pool.lightning_tricks_FractionalMaxPooling"'):
        fresh.load_state_dict(tricked.state_dict())  # tricked -> plain, strict
    assert fresh.load_state_dict(tricked.state_dict(), strict=False).unexpected_keys == [marker]
    without_pooling = TinyResNet()
    apply_dropconnect(without_pooling, 0.5, include=["fc1"])
    apply_stochastic_depth(without_pooling, 0.5)
    fresh.load_state_dict(without_pooling.state_dict())  # evaluation unchanged by the trick: strict both ways
    again = [apply_dropconnect(tricked, 0.5, include=["fc1"]), apply_stochastic_depth(tricked, 0.5),
             apply_fractional_pooling(tricked)[0]]  # idempotent: a second surgery changes nothing
    assert [(r.converted, r.already) for r in again] == [([], ["fc1"]), ([], ["blocks.0", "blocks.1"]), ([], ["pool"])]
    assert [k for k in tricked.state_dict() if k != marker] == keys
    converted = (_DropConnectMixin, _DepthMixin, SeededFractionalMaxPool2d)
    assert [n for n, m in tricked.named_modules() if isinstance(m, converted)] == ["pool", "blocks.0", "blocks.1", "fc1"]


@pytest.mark.parametrize("callback", [DropConnect(p=0.3), StochasticDepth(0.5), FractionalMaxPooling()],
                         ids=lambda c: type(c).__name__)
def test_setup_logs_counts_on_rank_zero(callback, tmp_path, caplog):
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[callback])
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyResNet(), train_dataloaders=digits_loader(32))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(type(callback).__name__ + ":")]
    expected = {"DropConnect": "1 layer (1 converted now", "StochasticDepth": "2 residual blocks (2 converted now",
                "FractionalMaxPooling": "1 max-pooling layer (1 converted now"}[type(callback).__name__]
    assert len(lines) == 1 and expected in lines[0]


def _tricks():
    # a warm-up in batches: a fraction of the run (the default) ramps differently in a 1-epoch and a 2-epoch fit
    return [DropConnect(p=0.5), StochasticDepth(p=0.5, warmup_steps=2), FractionalMaxPooling()]


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("index", [0, 1, 2], ids=["DropConnect", "StochasticDepth", "FractionalMaxPooling"])
def test_resume_with_ckpt_path_continues_exactly(index, tmp_path):
    """1 epoch + resume for 1 more equals 2 uninterrupted epochs, bit for bit (the trick's draws continue)."""
    def fit(epochs, ckpt_path=None, save=None):
        torch.manual_seed(0)
        model = TinyResNet()
        trainer = cpu_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, callbacks=[_tricks()[index]])
        trainer.fit(model, train_dataloaders=digits_loader(96), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return _weights(model), trainer.callbacks[0]

    straight, _ = fit(2)
    fit(1, save=tmp_path / "one.ckpt")
    resumed, callback = fit(2, ckpt_path=str(tmp_path / "one.ckpt"))
    assert callback.batches_seen == 6
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    # a resume that restarted the draws would differ: the trick's randomness matters
    restarted, _ = fit(1, ckpt_path=None)
    assert any(not torch.equal(restarted[k], v) for k, v in straight.items())


@pytest.mark.slow
def test_ddp_two_processes_resume_all_tricks_continues_exactly(tmp_path):
    """Under 2-process DDP, with all three tricks: 1 epoch + resume equals 2 epochs on every rank."""
    def fit(epochs, ckpt_path=None, save=None):
        torch.manual_seed(0)

        def probe(trainer, module):
            if save:
                trainer.save_checkpoint(save)  # every rank calls it; rank 0 writes
            return _weights(module)

        return run_ddp(TinyResNet(), tmp_path=tmp_path, probe=probe, callbacks=_tricks(), ckpt_path=ckpt_path,
                       strategy=DDPStrategy(start_method="fork", find_unused_parameters=True),
                       max_epochs=epochs, limit_val_batches=0)

    straight = fit(2)
    fit(1, save=str(tmp_path / "ddp.ckpt"))
    records = recorded_tricks(torch.load(tmp_path / "ddp.ckpt", weights_only=True))
    assert [(r["class_path"].rsplit(".", 1)[1], r["modules"]) for r in records] == [("FractionalMaxPooling", ["pool"])]
    resumed = fit(2, ckpt_path=str(tmp_path / "ddp.ckpt"))
    parameters = [n for n, _ in TinyResNet().named_parameters()]
    for name in parameters:  # DDP keeps the parameters equal on the ranks (BN running stats are per rank)
        assert torch.equal(straight[0][name], straight[1][name]), name
    for rank in (0, 1):
        for key, value in straight[rank].items():
            assert torch.equal(resumed[rank][key], value), (rank, key)
