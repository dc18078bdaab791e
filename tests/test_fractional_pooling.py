"""Fractional max pooling: eval determinism, owned draws, k-draw averaging, autocast, setup checks, DDP."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import FractionalMaxPooling, SeededFractionalMaxPool2d
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.stochastic import stochastic_eval
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization.fractional_pooling import (
    apply_fractional_pooling,
    average_pooling_draws,
    fractional_pools,
    pooling_draws,
)
from lightning_tricks.zoo import build_backbone
from tests.helpers import cpu_trainer, run_ddp
from tests.structural_user_module import TinyResNet, digits_loader


def test_eval_is_deterministic_training_draws_are_keyed_by_step():
    randomness = LayerRandomness(seed=0)
    pool = SeededFractionalMaxPool2d(randomness=randomness)
    x = torch.randn(4, 3, 11, 11)
    assert pool(x).shape == (4, 3, 7, 7)  # int(11 / sqrt(2))
    randomness.step = 0
    a, a_again = pool(x), pool(x)
    randomness.step = 1
    b = pool(x)
    assert torch.equal(a, a_again) and not torch.equal(a, b)
    pool.eval()
    first = pool(x)
    assert torch.equal(first, pool(x)) and torch.equal(first, pool(x))
    torch_pool = nn.FractionalMaxPool2d(2, output_ratio=1 / math.sqrt(2)).eval()
    assert not torch.equal(torch_pool(x), torch_pool(x))  # what we fix: torch's module is random in eval
    # the eval regions are one fixed draw per channel, the same for every example
    u = pool.eval_sample
    assert u.shape == (3, 2) and not torch.equal(u[0], u[1])
    assert torch.equal(first, F.fractional_max_pool2d(x, 2, output_size=(7, 7), _random_samples=u.expand(4, 3, 2)))
    again = SeededFractionalMaxPool2d(randomness=LayerRandomness(seed=0)).eval()
    assert torch.equal(again(x), first)  # reproducible from (seed, layer), although not in the state_dict


def test_stochastic_eval_contract_draws_fresh_regions_in_eval():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Dropout(0.5)).eval()
    apply_fractional_pooling(model)
    x = torch.randn(2, 1, 12, 12)
    with stochastic_eval(model) as changed:
        assert model[1] in changed
        assert not torch.equal(model(x), model(x))
    with pooling_draws(model) as pools:  # only the pooling layers: dropout stays off
        assert pools == [model[1]] and not model[2].training
    assert torch.equal(model(x), model(x))


def _classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1),
                        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    apply_fractional_pooling(net)
    return net.eval()


@pytest.mark.parametrize("max_batch", [None, 8])
def test_average_of_k_draws_equals_the_mean_of_the_draws_probabilities(max_batch):
    net = _classifier()
    x = torch.randn(3, 1, 16, 16)
    k = 7
    seen = []
    original = net.forward

    def recording(batch):
        out = original(batch)
        seen.append(out)
        return out

    net.forward = recording
    averaged = average_pooling_draws(net, x, k, max_batch=max_batch)
    logits = torch.cat(seen).view(k, 3, 5)  # every pass holds whole copies of the batch
    assert sum(s.shape[0] for s in seen) == k * 3 and all(s.shape[0] <= (max_batch or 99) for s in seen)
    assert torch.allclose(averaged.exp(), logits.softmax(-1).mean(0), atol=1e-6)
    assert not torch.allclose(logits[0], logits[1])  # each copy drew its own regions
    assert torch.equal(net(x), net(x))  # eval is deterministic again afterwards
    one = average_pooling_draws(_classifier(), x, 1)
    assert torch.allclose(one.exp().sum(1), torch.ones(3))


def test_autocast_bfloat16_on_cpu_in_training_eval_and_averaging():
    net = _classifier()
    x = torch.randn(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.train()
        out = net(x)
        out.float().sum().backward()
        net.eval()
        assert net(x).dtype == torch.bfloat16 and torch.equal(net(x), net(x))
        averaged = average_pooling_draws(net, x, 4)
    assert out.dtype == torch.bfloat16 and net[0].weight.grad is not None
    assert averaged.dtype == torch.float32 and torch.isfinite(averaged).all()


def test_flatten_into_linear_fails_at_setup_and_the_model_is_left_as_it_was(tmp_path):
    model = TinyResNet(global_pool=False)
    model.example_input_array = torch.zeros(1, 1, 8, 8)
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[FractionalMaxPooling()])
    with pytest.raises(ModelNotSupportedError, match=r"changes the spatial size after pooling \(pool: MaxPool2d gives "
                                                     r"4x4, fractional pooling 5x5\), and the layers after it need "
                                                     r"the original size: the forward pass fails"):
        trainer.fit(model, train_dataloaders=digits_loader(32))
    assert model.train_steps == 0 and type(model.pool) is nn.MaxPool2d


def test_setup_check_finds_the_input_shape_from_the_dataset(tmp_path):
    """No example_input_array: the first batch of the training data gives the shape."""
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[FractionalMaxPooling()])
    with pytest.raises(ModelNotSupportedError, match="checked with input \\(2, 1, 8, 8\\)"):
        trainer.fit(TinyResNet(global_pool=False), train_dataloaders=digits_loader(32))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        loader = digits_loader(32)
        for x, y in loader:
            yield from zip(x, y, strict=True)


def test_without_an_example_input_at_setup_the_first_batch_is_checked_before_the_step(tmp_path):
    """Loaders given to fit() are not public at setup: the size check runs on the first batch, before training."""
    stream = torch.utils.data.DataLoader(_Stream(), batch_size=8)
    fits = TinyResNet()
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[FractionalMaxPooling()]).fit(
        fits, train_dataloaders=stream)
    assert fits.train_steps == 1
    model = TinyResNet(global_pool=False)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[FractionalMaxPooling()])
    with pytest.raises(ModelNotSupportedError, match=r"pool: MaxPool2d gives 4x4, fractional pooling 5x5.*checked with "
                                                     r"input \(2, 1, 8, 8\)"):
        trainer.fit(model, train_dataloaders=stream)
    assert model.train_steps == 0 and type(model.pool) is nn.MaxPool2d


@pytest.mark.parametrize("kwargs,message", [
    (dict(output_ratio=0.0), r"`output_ratio`=0.0 is invalid: expected a number in \(0.0, 1.0\)"),
    (dict(output_ratio=1.0), r"`output_ratio`=1.0 is invalid"),
    (dict(output_ratio=1.5), r"`output_ratio`=1.5 is invalid"),
    (dict(test_samples=0), r"`test_samples`=0 is invalid: expected an integer in \[1, inf\]"),
    (dict(kernel_size=0), r"`kernel_size`=0 is invalid"),
    (dict(include=[]), r"`include`=\[\] is invalid"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        FractionalMaxPooling(**kwargs)


def test_bad_models_and_selectors():
    with pytest.raises(ModelNotSupportedError, match="found no nn.MaxPool2d in CifarResNet"):
        apply_fractional_pooling(build_backbone("resnet20"))
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'features.99' matches no module"):
        apply_fractional_pooling(build_backbone("simple_cnn"), include=["features.99"])
    with pytest.raises(InvalidArgumentError, match=r"'features.0' \(Conv2d: FractionalMaxPooling replaces nn.MaxPool2d"):
        apply_fractional_pooling(build_backbone("simple_cnn"), include=["features.0"])
    indices = nn.Sequential(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(InvalidArgumentError, match="returns indices"):
        apply_fractional_pooling(indices, include=["0"])


def test_torchvision_resnet_maxpool_is_replaced():
    model = build_backbone("resnet18")
    report, replaced = apply_fractional_pooling(model)
    assert report.converted == ["maxpool"] and isinstance(replaced["maxpool"], nn.MaxPool2d)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_test_samples_average_in_test_and_forward_is_restored(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    callback = FractionalMaxPooling(test_samples=12, seed=0)
    trainer = cpu_trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, train_dataloaders=digits_loader(128))
    x = next(iter(digits_loader(64, batch_size=64)))[0]
    model.eval()
    callback.randomness.reset_eval()
    expected = average_pooling_draws(model, x, 12)
    captured = []
    tester = cpu_trainer(tmp_path, callbacks=[callback])
    original_test_step = model.test_step

    def test_step(batch, batch_idx):
        captured.append(model(batch[0]))
        return original_test_step(batch, batch_idx)

    model.test_step = test_step
    metrics = tester.test(model, dataloaders=digits_loader(64, batch_size=64), verbose=False)[0]
    assert torch.allclose(captured[0], expected, atol=1e-5)  # the user's test_step saw the 12-draw average
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert "forward" not in model.__dict__  # the class's forward is back
    assert torch.equal(model(x), model(x))


def test_forward_is_restored_after_an_exception_in_test(tmp_path):
    model = TinyResNet()

    def failing_test_step(batch, batch_idx):
        raise RuntimeError("boom")

    model.test_step = failing_test_step
    trainer = cpu_trainer(tmp_path, callbacks=[FractionalMaxPooling(test_samples=4)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.test(model, dataloaders=digits_loader(32), verbose=False)
    assert "forward" not in model.__dict__


def _pool_probe(trainer, module):
    pool = fractional_pools(module)[0]
    pool.lt_randomness.step = 0
    pool.train()
    out = pool(torch.arange(64.0).view(1, 1, 8, 8).expand(1, 4, 8, 8))
    return {"out": out, "weights": [p.detach().clone() for p in module.parameters()]}


def test_ddp_two_processes_draws_differ_per_rank_weights_agree(tmp_path):
    results = run_ddp(TinyResNet(), tmp_path=tmp_path, probe=_pool_probe, callbacks=[FractionalMaxPooling()],
                      max_epochs=1, limit_val_batches=0)
    assert not torch.equal(results[0]["out"], results[1]["out"])
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        assert torch.equal(a, b)


def test_layers_is_the_deprecated_name_of_include():
    torch.manual_seed(0)
    old_model, x = build_backbone("simple_cnn"), torch.randn(2, 3, 16, 16)
    new_model = copy.deepcopy(old_model)
    with pytest.warns(DeprecationWarning, match="FractionalMaxPooling: `layers` is renamed `include`"):
        old, _ = apply_fractional_pooling(old_model, layers=["features"])
    new, _ = apply_fractional_pooling(new_model, include=["features"])
    assert old.converted == new.converted and len(old.converted) == 2  # both pools inside `features`
    assert torch.equal(old_model.train()(x), new_model.train()(x))
    with pytest.warns(DeprecationWarning):
        callback = FractionalMaxPooling(layers=["features.6"])
    assert callback.init_args() == FractionalMaxPooling(include=["features.6"]).init_args()
    assert callback.state_key == FractionalMaxPooling(include=["features.6"]).state_key
    with pytest.raises(InvalidArgumentError, match=r"`layers`=\['a'\] and `include`=\['b'\] are the same argument"):
        FractionalMaxPooling(layers=["a"], include=["b"])


def test_exclude_leaves_the_matched_pools_as_they_are():
    model = build_backbone("simple_cnn")
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    report, _ = apply_fractional_pooling(model, exclude=[pools[0]])
    assert report.converted == pools[1:]
    assert isinstance(model.get_submodule(pools[0]), nn.MaxPool2d)
