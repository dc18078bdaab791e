"""DropConnect: masks, scaling, gradients, layer choice, errors, the callback on a user module, DDP."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import DropConnect, DropConnectConv2d, DropConnectLinear
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.stochastic import stochastic_eval
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization.dropconnect import apply_dropconnect, dropconnect_weight
from lightning_tricks.zoo import build_backbone
from tests.helpers import cpu_trainer, run_ddp
from tests.structural_user_module import TinyResNet, digits_loader


def _mask_of(randomness, layer, step, shape, p, samples=None):
    """The mask the layer draws at ``step``: same generator key, same draw."""
    randomness.step = step
    gen = randomness.generator(torch.device("cpu"), layer)
    return dropconnect_weight(torch.ones(shape), p, gen, samples)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_monte_carlo_mean_of_training_outputs_matches_eval(kind):
    torch.manual_seed(0)
    p, steps = 0.5, 1500
    randomness = LayerRandomness(seed=1)
    if kind == "linear":
        layer = DropConnectLinear(6, 3, p=p, randomness=randomness)
        x = torch.randn(1, 6)
    else:
        layer = DropConnectConv2d(2, 3, 2, p=p, randomness=randomness)
        x = torch.randn(1, 2, 2, 2)  # one output pixel per channel
    with torch.no_grad():
        expected = layer.eval()(x).flatten()
        layer.train()
        outputs = []
        for step in range(steps):
            randomness.step = step
            outputs.append(layer(x).flatten())
        outputs = torch.stack(outputs)
        # Var of one output: sum_i w_i^2 x_i^2 * p / (1 - p)  (inverted Bernoulli scaling)
        patches = x.flatten() if kind == "linear" else x.flatten()
        var = (layer.weight.flatten(1) ** 2 * patches ** 2).sum(1) * p / (1 - p)
    tolerance = 4 * (var / steps).sqrt()
    assert ((outputs.mean(0) - expected).abs() <= tolerance).all(), (outputs.mean(0), expected, tolerance)
    assert outputs.std(0).sub(var.sqrt()).abs().div(var.sqrt()).max() < 0.1  # the noise has the predicted size


def test_mask_resampled_each_step_same_within_a_step_and_eval_deterministic():
    randomness = LayerRandomness(seed=0)
    layer = DropConnectLinear(16, 8, p=0.5, randomness=randomness)
    x = torch.randn(4, 16)
    randomness.step = 0
    a, a_again = layer(x), layer(x)  # recomputation in the same step (activation checkpointing) sees the same mask
    randomness.step = 1
    b = layer(x)
    assert torch.equal(a, a_again) and not torch.equal(a, b)
    layer.eval()
    plain = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), plain) and torch.equal(layer(x), plain)


def test_gradient_flows_only_through_kept_weights_and_output_uses_the_mask():
    randomness = LayerRandomness(seed=3)
    p = 0.4
    layer = DropConnectLinear(5, 4, p=p, randomness=randomness)
    x = torch.randn(3, 5)
    randomness.step = 7
    out = layer(x)
    mask = _mask_of(randomness, 0, 7, (4, 5), p)  # 0 or 1/(1-p)
    assert torch.allclose(out, F.linear(x, layer.weight * mask, layer.bias))
    out.sum().backward()
    dense = x.sum(0).expand(4, 5)  # d(sum out)/dW without a mask
    assert torch.allclose(layer.weight.grad, dense * mask)
    assert (layer.weight.grad[mask == 0] == 0).all() and (layer.weight.grad[mask > 0] != 0).all()
    assert torch.equal(layer.bias.grad, torch.full((4,), 3.0))  # bias kept unless drop_bias


def test_per_sample_masks_equal_a_loop_over_examples_and_average_to_eval():
    randomness = LayerRandomness(seed=5)
    p = 0.5
    layer = DropConnectLinear(6, 3, p=p, mode="sample", drop_bias=True, randomness=randomness)
    x = torch.randn(4, 2, 6)  # extra dimension: the mask is per example (first dimension)
    randomness.step = 2
    out = layer(x)
    gen = randomness.generator(torch.device("cpu"), 0)  # same key -> the weights, then the bias masks
    w_masks = dropconnect_weight(torch.ones(3, 6), p, gen, samples=4)
    b_masks = dropconnect_weight(torch.ones(3), p, gen, samples=4)
    loop = torch.stack([F.linear(x[i], layer.weight * w_masks[i], layer.bias * b_masks[i]) for i in range(4)])
    assert torch.allclose(out, loop, atol=1e-6)
    assert not torch.equal(w_masks[0], w_masks[1])
    with torch.no_grad():  # one forward of many copies: per-example masks average to the eval output
        copies = torch.randn(1, 6).expand(20000, 6)
        mean = layer(copies).mean(0)
        assert torch.allclose(mean, layer.eval()(copies[:1])[0], atol=0.06)


def test_drop_bias_masks_the_bias_and_p0_is_the_plain_layer():
    randomness = LayerRandomness(seed=0)
    layer = DropConnectLinear(3, 1000, p=0.5, drop_bias=True, randomness=randomness)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    randomness.step = 0
    values = layer(torch.ones(1, 3)).unique()
    assert values.tolist() == [0.0, 2.0]
    plain = DropConnectLinear(3, 2, p=0.0)
    x = torch.randn(2, 3)
    assert torch.equal(plain.train()(x), F.linear(x, plain.weight, plain.bias))


def test_default_skips_the_classifier_head_and_p0_converts_nothing():
    cnn = build_backbone("simple_cnn", in_channels=1)
    report = apply_dropconnect(cnn, 0.5)
    assert report.converted == ["head.1"] and report.skipped[0][0] == "head.4"
    assert type(cnn.head[4]) is nn.Linear and isinstance(cnn.head[1], DropConnectLinear)
    untouched = build_backbone("simple_cnn", in_channels=1)
    assert apply_dropconnect(untouched, 0.0).total == 0
    assert all(type(m).__module__.startswith("torch") for m in untouched.modules() if m is not untouched)
    convs = apply_dropconnect(build_backbone("simple_cnn", in_channels=1), 0.2, layer_types=["Conv2d"])
    assert convs.converted == [f"features.{i}" for i in (0, 3, 7, 10)]
    head_only = apply_dropconnect(build_backbone("resnet20"), 0.5, include=["fc"])
    assert head_only.converted == ["fc"]


def test_mc_dropconnect_through_stochastic_eval():
    layer = DropConnectLinear(8, 8, p=0.5).eval()
    x = torch.randn(2, 8)
    with stochastic_eval(layer) as changed:
        assert changed == [layer]
        assert not torch.equal(layer(x), layer(x))
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs,message", [
    (dict(p=1.0), r"`p`=1.0 is invalid: expected a number in \[0.0, 1.0\)"),
    (dict(p=-0.1), r"`p`=-0.1 is invalid"),
    (dict(mode="row"), r"`mode`='row' is invalid: expected one of 'step', 'sample'"),
    (dict(layer_types=["BatchNorm2d"]), r"`layer_types`='BatchNorm2d' is invalid"),
    (dict(include="fc1"), r"`include`='fc1' is invalid: expected a list of glob patterns"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        DropConnect(**kwargs)


def test_a_pattern_on_a_container_selects_the_layers_inside_it():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 2))
    assert apply_dropconnect(net, 0.5, include=["1"]).converted == ["1.0", "1.2"]


def test_bad_selections_fail_naming_the_argument():
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'fc9' matches no module"):
        apply_dropconnect(TinyResNet(), 0.5, include=["fc9"])
    with pytest.raises(InvalidArgumentError, match=r"'stem.1' \(BatchNorm2d: DropConnect converts Linear"):
        apply_dropconnect(TinyResNet(), 0.5, include=["stem.1"])
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(InvalidArgumentError, match="subclass of a layer type; its owner may use its weight"):
        apply_dropconnect(attention, 0.5, include=["0.out_proj"])
    with pytest.raises(InvalidArgumentError, match=r"`mode`='sample' is invalid for the convolutions"):
        apply_dropconnect(TinyResNet(), 0.5, include=["stem.0"], layer_types=["Conv2d"], mode="sample")
    with pytest.raises(ModelNotSupportedError, match=r"no Linear layer in CifarResNet besides the classifier head 'fc'"):
        apply_dropconnect(build_backbone("resnet20"), 0.5)


def test_callback_trains_an_unmodified_user_module(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    before = model.fc1.weight.detach().clone()
    callback = DropConnect(p=0.5, mode="sample", seed=3)
    trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, train_dataloaders=digits_loader(64))
    assert isinstance(model.fc1, DropConnectLinear) and type(model.fc2) is nn.Linear
    assert callback.batches_seen == 4 and not torch.equal(model.fc1.weight, before)
    assert callback.state_dict() == {"seed": 3, "batches_seen": 4}


def _dropconnect_probe(trainer, module):
    randomness = module.fc1.lt_randomness
    randomness.step = 0
    module.fc1.train()
    with torch.no_grad():
        out = module.fc1(torch.ones(1, module.fc1.in_features))
    return {"out": out, "weight": module.fc1.weight.detach().clone(), "rank": randomness.rank}


def test_ddp_two_processes_masks_differ_per_rank_weights_agree(tmp_path):
    results = run_ddp(TinyResNet(), tmp_path=tmp_path, probe=_dropconnect_probe, callbacks=[DropConnect(p=0.5)],
                      max_epochs=1, limit_val_batches=0)
    assert [r["rank"] for r in results] == [0, 1]
    assert not torch.equal(results[0]["out"], results[1]["out"])  # each rank draws its own masks
    assert torch.equal(results[0]["weight"], results[1]["weight"])  # gradients were averaged


def test_layers_is_the_deprecated_name_of_include():
    torch.manual_seed(0)
    old_model, x = TinyResNet(), torch.randn(4, 1, 8, 8)
    new_model = copy.deepcopy(old_model)
    with pytest.warns(DeprecationWarning, match="DropConnect: `layers` is renamed `include`"):
        old = apply_dropconnect(old_model, 0.5, layers=["fc1"])
    assert old.converted == apply_dropconnect(new_model, 0.5, include=["fc1"]).converted == ["fc1"]
    assert torch.equal(old_model.train()(x), new_model.train()(x))  # same layers, same seed: the same masks
    with pytest.warns(DeprecationWarning, match="write include=\\['fc1'\\]"):
        callback = DropConnect(p=0.5, layers=["fc1"])
    assert callback.init_args() == DropConnect(p=0.5, include=["fc1"]).init_args()
    assert callback.state_key == DropConnect(p=0.5, include=["fc1"]).state_key  # old checkpoints' key: resumable
    with pytest.raises(InvalidArgumentError, match=r"`layers`=\['fc1'\] and `include`=\['fc2'\] are the same argument"):
        DropConnect(layers=["fc1"], include=["fc2"])


def test_exclude_leaves_the_matched_layers_as_they_are():
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 2))
    report = apply_dropconnect(net, 0.5, exclude=["1.0"])
    assert report.converted == ["0", "1.1"]  # not the head (2, the default rule) nor 1.0 (exclude)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 2))
    assert apply_dropconnect(fresh, 0.5, include=["*"], exclude=["1"]).converted == ["0", "2"]
