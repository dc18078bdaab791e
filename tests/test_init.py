"""The functional core of lightning_tricks.init: schemes, zero-init-residual, LSUV, activation statistics."""

import copy
import math
import re
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from benchmarks.lsuv import lsuv_reference
from lightning_tricks.core.batch import find_inputs
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.errors import BatchFormatError
from lightning_tricks.init import (
    LECTURE_CASES,
    activation_statistics,
    deep_network_statistics,
    init_weights,
    lsuv,
    plot_activation_statistics,
    select_modules,
    zero_init_residual,
)
from lightning_tricks.init._measure import measurement_mode
from lightning_tricks.zoo import CifarResNet, SimpleCNN, build_backbone


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ schemes

LAYERS = {  # name: (factory, fan_in, fan_out, shape of the weight flattened to a matrix)
    "linear": (lambda: nn.Linear(500, 300), 500, 300, (300, 500)),
    "conv2d": (lambda: nn.Conv2d(32, 48, 5), 32 * 25, 48 * 25, (48, 32 * 25)),
}


def _expected_variance(scheme, fan_in, fan_out, shape, **kw):
    """The formulas, written out independently of the implementation."""
    gains = {"linear": 1.0, "relu": 2.0, "tanh": 25 / 9, "selu": 9 / 16,
             "leaky_relu": 2.0 / (1 + kw.get("negative_slope", 0.01) ** 2)}
    g2 = gains[kw.get("nonlinearity", "relu" if scheme.startswith("kaiming") else "linear")]
    if scheme == "normal":
        return kw.get("std", 0.01) ** 2
    if scheme.startswith("xavier"):
        return g2 * 2 / (fan_in + fan_out)
    if scheme.startswith("lecun"):
        return g2 / fan_in
    if scheme.startswith("kaiming"):
        return g2 / (fan_out if kw.get("mode") == "fan_out" else fan_in)
    if scheme == "orthogonal":
        return g2 / max(shape)
    raise AssertionError(scheme)


SCHEME_CASES = [
    ("normal", {}), ("normal", {"std": 0.05}),
    ("xavier_uniform", {}), ("xavier_normal", {}), ("xavier_normal", {"nonlinearity": "tanh"}),
    ("lecun_uniform", {}), ("lecun_normal", {}),
    ("kaiming_normal", {}), ("kaiming_uniform", {}), ("kaiming_normal", {"mode": "fan_out"}),
    ("kaiming_normal", {"nonlinearity": "leaky_relu", "negative_slope": 0.2}),
    ("kaiming_uniform", {"nonlinearity": "tanh"}), ("kaiming_normal", {"nonlinearity": "selu"}),
    ("orthogonal", {}), ("orthogonal", {"nonlinearity": "relu"}),
]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("scheme", "kwargs"), SCHEME_CASES, ids=lambda c: str(c))
def test_scheme_gives_the_variance_its_formula_promises(scheme, kwargs, layer):
    factory, fan_in, fan_out, shape = LAYERS[layer]
    module = factory()
    init_weights(module, scheme, generator=_gen(), **kwargs)
    w = module.weight.detach().double()
    expected = _expected_variance(scheme, fan_in, fan_out, shape, **kwargs)
    # the relative standard error of a variance over >= 38k draws is < 1%
    assert w.var().item() == pytest.approx(expected, rel=0.05)
    assert abs(w.mean().item()) < 4 * math.sqrt(expected / w.numel())
    assert torch.all(module.bias == 0)


def test_orthogonal_rows_are_orthonormal_times_gain():
    conv = nn.Conv2d(16, 24, 3)
    init_weights(conv, "orthogonal", nonlinearity="relu", generator=_gen())
    flat = conv.weight.detach().double().reshape(24, -1)
    assert torch.allclose(flat @ flat.T, 2.0 * torch.eye(24, dtype=torch.float64), atol=1e-5)


def test_lectures_xavier_is_lecun_and_torch_xavier_averages_the_fans():
    a, b = nn.Linear(1000, 10), nn.Linear(1000, 10)
    init_weights(a, "lecun_normal", generator=_gen())
    init_weights(b, "xavier_normal", generator=_gen())
    assert a.weight.var().item() == pytest.approx(1 / 1000, rel=0.05)  # W = randn / sqrt(Din)
    assert b.weight.var().item() == pytest.approx(2 / 1010, rel=0.05)


def test_bias_constant_default_and_generator_reproducibility():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(1, 4, 3), nn.Linear(16, 2, bias=False))
    init_weights(net, "kaiming_normal", bias=0.01, generator=_gen(3))
    assert torch.all(net[0].bias == 0.01) and torch.all(net[2].bias == 0.01)
    first = copy.deepcopy(net.state_dict())
    init_weights(net, "kaiming_normal", bias=0.01, generator=_gen(3))
    assert all(torch.equal(first[k], v) for k, v in net.state_dict().items())
    before = copy.deepcopy(net.state_dict())
    assert init_weights(net, "default") == ["0", "2", "3"]  # default leaves weights and biases as they are
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    init_weights(net, "default", bias=0.5)
    assert torch.all(net[0].bias == 0.5) and torch.equal(net[0].weight, before["0.weight"])


def test_zeros_warns_and_zeroes():
    net = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="does not break symmetry"):
        init_weights(net, "zeros")
    assert torch.all(net.weight == 0) and torch.all(net.bias == 0)


def test_include_exclude_and_layer_types_select_by_name_and_ancestor():
    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    net.add_module("head", nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert [n for n, _ in select_modules(net)] == ["body.0", "body.2", "head.0"]
    assert [n for n, _ in select_modules(net, include=["head"])] == ["head.0"]
    assert [n for n, _ in select_modules(net, exclude=["body.2", "head"])] == ["body.0"]
    assert [n for n, _ in select_modules(net, include=["body.*"], exclude=["*.0"])] == ["body.2"]
    assert [n for n, _ in select_modules(net, layer_types=["BatchNorm1d"])] == ["head.1"]
    before = net.head[0].weight.clone()
    init_weights(net, "normal", std=1.0, exclude=["head"], generator=_gen())
    assert torch.equal(net.head[0].weight, before) and net.body[0].weight.std() > 0.5


@pytest.mark.parametrize(("call", "pattern"), [
    (lambda: init_weights(nn.Linear(2, 2), "he"), r"`scheme`='he' is invalid: expected one of 'default'"),
    (lambda: init_weights(nn.Linear(2, 2), "normal", std=-0.1), r"`std`=-0.1 is invalid: expected a number in \(0.0"),
    (lambda: init_weights(nn.Linear(2, 2), "normal", std=0.0), r"`std`=0.0 is invalid"),
    (lambda: init_weights(nn.Linear(2, 2), "kaiming_normal", nonlinearity="swish"), r"`nonlinearity`='swish'"),
    (lambda: init_weights(nn.Linear(2, 2), "kaiming_normal", mode="fan_avg"), r"`mode`='fan_avg'"),
    (lambda: init_weights(nn.Linear(2, 2), "normal", nonlinearity="relu"), r"`nonlinearity`='relu' is invalid with scheme='normal'"),
    (lambda: init_weights(nn.Linear(2, 2), "xavier_normal", mode="fan_out"), r"`mode`='fan_out' is invalid with"),
    (lambda: init_weights(nn.Linear(2, 2), "kaiming_normal", negative_slope=0.1), r"`negative_slope`=0.1 is invalid"),
    (lambda: init_weights(nn.Linear(2, 2), "xavier_normal", std=0.1), r"`std`=0.1 is invalid with scheme='xavier_normal'"),
    (lambda: init_weights(nn.Linear(2, 2), bias=float("inf")), r"`bias`=inf is invalid"),
    (lambda: init_weights(nn.Sequential(nn.Linear(2, 2)), include=["fc*"]), r"init_weights: `include` pattern 'fc\*' matches no module: names look like '0'"),
    (lambda: init_weights(nn.Sequential(nn.Linear(2, 2)), exclude=["head"]), r"`exclude` pattern 'head' matches no"),
    (lambda: init_weights(nn.Sequential(nn.Linear(2, 2)), layer_types=["Conv2d"]), r"`layer_types` entry 'Conv2d' matches no module"),
    (lambda: init_weights(nn.Sequential(nn.ReLU())), r"no layer of Sequential matches layer_types"),
    (lambda: init_weights(nn.Sequential(nn.Linear(2, 2)), exclude=["0"]), r"leave no layer"),
    (lambda: init_weights(nn.BatchNorm1d(3), "kaiming_normal", layer_types=["BatchNorm1d"]), r"needs fan_in/fan_out"),
])
def test_bad_arguments_name_the_argument(call, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        call()


# ------------------------------------------------------------------------------------------------ zero-init residual


def _changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize(("build", "pattern"), [
    (lambda: torchvision.models.resnet18(num_classes=10), r"layer\d\.\d+\.bn2"),
    (lambda: torchvision.models.resnet50(num_classes=10), r"layer\d\.\d+\.bn3"),
    (lambda: timm.create_model("resnet18", num_classes=10, zero_init_last=False), r"layer\d\.\d+\.bn2"),
    (lambda: timm.create_model("resnet26", num_classes=10, zero_init_last=False), r"layer\d\.\d+\.bn3"),
    (lambda: CifarResNet(20), r"layer\d\.\d+\.bn2"),
], ids=["tv-resnet18", "tv-resnet50", "timm-resnet18", "timm-resnet26", "zoo-resnet20"])
def test_zero_init_residual_zeroes_exactly_the_last_norm_gamma_of_each_branch(build, pattern):
    model = build()
    expected = {f"{n}.weight" for n, _ in model.named_modules() if re.fullmatch(pattern, n)}
    assert expected
    before = copy.deepcopy(model.state_dict())
    zeroed = zero_init_residual(model)
    assert {f"{n}.weight" for n in zeroed} == expected
    assert _changed(before, model) == expected  # nothing else moved (not even the norms' beta or stats)
    assert all(torch.all(model.state_dict()[k] == 0) for k in expected)


def test_zero_init_residual_matches_torchvision_own_flag():
    ours, theirs = torchvision.models.resnet18(), torchvision.models.resnet18(zero_init_residual=True)
    init_weights(ours, "default", zero_init_residual=True)
    zero = {k for k, v in theirs.state_dict().items() if k.endswith("weight") and v.dim() == 1 and torch.all(v == 0)}
    assert zero == {k for k, v in ours.state_dict().items() if k.endswith("weight") and v.dim() == 1 and torch.all(v == 0)}


class _MyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU())
        self.norm2 = nn.GroupNorm(2, 4)

    def forward(self, x):
        return x + self.norm2(self.branch(self.conv(x)))


def test_zero_init_residual_on_user_blocks_by_class_attribute_or_name_pattern():
    model = nn.Sequential(_MyBlock(), _MyBlock())
    assert zero_init_residual(model, ["_MyBlock.norm2"]) == ["0.norm2", "1.norm2"]
    assert torch.all(model[0].norm2.weight == 0) and torch.all(model[0].branch[0].weight == 1)
    model = nn.Sequential(_MyBlock(), _MyBlock())
    assert zero_init_residual(model, ["*.branch.0"]) == ["0.branch.0", "1.branch.0"]
    assert zero_init_residual(model, ["_MyBlock.branch.0"]) == ["0.branch.0", "1.branch.0"]  # dotted attribute
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(model(x), x + model[0].norm2.bias.view(1, -1, 1, 1) * 0)  # branches start at zero


@pytest.mark.parametrize(("spec", "pattern"), [
    (True, r"`zero_init_residual`=True found no residual block in Sequential: it knows .*'MyBlock.bn2'"),
    (["_MyBlock.bn9"], r"spec '_MyBlock.bn9': module '0' \(_MyBlock\) has no submodule 'bn9'"),
    (["layer*.bn2"], r"spec 'layer\*.bn2' matches nothing"),
    (["*.branch.1"], r"'0.branch.1' \(ReLU\) has no `weight`"),
    ([], r"`zero_init_residual`=\[\] is invalid"),
])
def test_zero_init_residual_errors(spec, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        zero_init_residual(nn.Sequential(_MyBlock()), spec)


# ------------------------------------------------------------------------------------------------ LSUV


def _layer_output_variances(model, x):
    variances = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: variances.setdefault(n, o.double().var(unbiased=False).item())
                                     and None) for n, m in select_modules(model)]
    with torch.no_grad(), measurement_mode(model):
        model(x)
    for h in hooks:
        h.remove()
    return variances


@pytest.mark.parametrize("name", ["mlp", "simple_cnn", "resnet20", "tv:resnet18"])
def test_lsuv_gives_unit_variance_on_a_held_out_batch_and_leaves_mode_device_and_stats(name):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10, in_channels=3, image_size=8)
    model.train()
    model.get_submodule(next(n for n, m in model.named_modules() if n and not list(m.children()))).eval()
    modes = {n: m.training for n, m in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    report = lsuv(model, torch.randn(64, 3, 8, 8), tol=0.05, generator=_gen())
    assert [r.name for r in report] and all(r.converged and r.reached for r in report)
    assert {r.name for r in report} == {n for n, _ in select_modules(model)}
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())
    held_out = _layer_output_variances(model, torch.randn(64, 3, 8, 8))
    assert set(held_out) == {r.name for r in report}
    assert all(abs(v - 1) < 0.3 for v in held_out.values()), held_out


def test_lsuv_equals_the_papers_multi_pass_procedure():
    torch.manual_seed(1)
    ours = CifarResNet(20, width=8)
    theirs = copy.deepcopy(ours)
    x = torch.randn(16, 3, 8, 8)
    a = lsuv(ours, x, generator=_gen(5))
    b = lsuv_reference(theirs, x, generator=_gen(5))
    assert [(r.name, r.iterations) for r in a] == [(r.name, r.iterations) for r in b]
    assert sum(r.iterations for r in a) > 0
    for (k, v), w in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.allclose(v, w, rtol=1e-5, atol=1e-7), k


class _AnyDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c3 = nn.Conv1d(2, 4, 3, bias=True), nn.Conv3d(1, 3, 2)
        self.shared = nn.Linear(8, 8)
        self.unused = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        a = self.c1(x.reshape(x.shape[0], 2, 32)).flatten(1)[:, :8]
        b = self.c3(x.reshape(x.shape[0], 1, 4, 4, 4)).flatten(1)[:, :8]
        return self.shared(self.drop(torch.tanh(self.shared(a + b))))


def test_lsuv_handles_conv1d_conv3d_shared_and_unreached_layers_deterministically():
    model = _AnyDims()
    x = torch.randn(128, 64)
    with pytest.warns(UserWarning, match=r"never ran 1 selected layer\(s\) \(unused\)"):
        report = {r.name: r for r in lsuv(model, x, bias=0.01, generator=_gen())}
    assert set(report) == {"c1", "c3", "shared", "unused"}
    assert not report["unused"].reached and report["shared"].converged and report["c1"].converged
    assert torch.all(model.c1.bias == 0.01)
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning):
        lsuv(model, x, bias=0.01, generator=_gen())  # dropout is off while measuring: same result again
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_lsuv_reports_layers_that_cannot_converge():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"did not reach \|Var - 1\| < 0.1"):
        report = lsuv(model, torch.zeros(8, 4), generator=_gen())
    assert report[0].variance == 0.0 and not report[0].converged and report[0].iterations == 0


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"tol": 0.0}, r"`tol`=0.0 is invalid"), ({"tol": -1}, r"`tol`=-1 is invalid"),
    ({"max_iters": 0}, r"`max_iters`=0 is invalid: expected an integer in \[1, inf\]"),
    ({"include": ["nothing"]}, r"LSUV: `include` pattern 'nothing' matches no module"),
])
def test_lsuv_bad_arguments(kwargs, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        lsuv(nn.Sequential(nn.Linear(2, 2)), torch.randn(4, 2), **kwargs)


def test_lsuv_without_conv_or_linear_layers_fails_clearly():
    with pytest.raises(InvalidArgumentError, match=r"LSUV: no layer of Sequential matches "
                                                   r"layer_types=\['Linear', 'Conv1d', 'Conv2d', 'Conv3d'\]"):
        lsuv(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), torch.randn(4, 3))


def test_the_model_input_comes_from_the_one_batch_accessor():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert find_inputs((x, y)) is x and find_inputs({"meta": "a", "image": x}) is x
    assert find_inputs({"label": y, "image": x}) is x and find_inputs({"label": y, "feats": x}) is x
    assert find_inputs({"a": y, "image": x}, "image") is x and find_inputs((y, x), 1) is x
    with pytest.raises(BatchFormatError, match=r"`input_key`='img' is not in the batch"):
        find_inputs({"image": x}, "img")
    with pytest.raises(BatchFormatError, match="looked for the images under 'image'"):
        find_inputs({"a": "b"})


# ------------------------------------------------------------------------------------------------ activation statistics


def test_activation_statistics_match_a_brute_force_computation():
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(10, 20), relu, nn.Linear(20, 20), relu, nn.Linear(20, 5), nn.Tanh(),
                          nn.Linear(5, 5), nn.Sigmoid())
    with torch.no_grad():
        model[4].weight.mul_(30)  # saturate the tanh
    x = torch.randn(40, 10)
    outputs, h = [], x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if not isinstance(layer, nn.Linear):
                outputs.append(h.double())
    stats = activation_statistics(model, x, bins=7)
    assert [s.name for s in stats] == ["1", "1#2", "5", "7"]
    assert [s.kind for s in stats] == ["ReLU", "ReLU", "Tanh", "Sigmoid"]
    for s, y in zip(stats, outputs, strict=True):
        assert s.mean == pytest.approx(y.mean().item(), abs=1e-9)
        assert s.std == pytest.approx(y.std(unbiased=False).item(), rel=1e-6)
        assert s.zero_fraction == pytest.approx((y == 0).double().mean().item())
        assert (s.low, s.high, s.numel) == (pytest.approx(y.min().item()), pytest.approx(y.max().item()), y.numel())
        assert s.histogram == torch.histc(y.float(), 7, y.min().item(), y.max().item()).long().tolist()
    assert stats[0].saturated_fraction is None and stats[0].zero_fraction > 0.2
    assert stats[2].saturated_fraction == pytest.approx((outputs[2].abs() > 0.99).double().mean().item())
    assert stats[2].saturated_fraction > 0.2
    sig = outputs[3]
    assert stats[3].saturated_fraction == pytest.approx(((sig < 0.01) | (sig > 0.99)).double().mean().item())
    fig = plot_activation_statistics(stats, "t")
    assert len(fig.axes) == 2 + len(stats)


def test_activation_statistics_needs_activation_modules_or_layer_types():
    model = SimpleCNN(1, 10, width=4, hidden=8)
    assert [s.kind for s in activation_statistics(model, torch.randn(4, 1, 8, 8), bins=0)] == ["ReLU"] * 5
    with pytest.raises(InvalidArgumentError, match=r"found no activation module in Linear .*pass `layer_types`"):
        activation_statistics(nn.Linear(3, 3), torch.randn(2, 3))
    stats = activation_statistics(nn.Linear(3, 3), torch.randn(2, 3), layer_types=["Linear"], bins=0)
    assert [s.name for s in stats] == [""] and stats[0].histogram == []


def test_the_lectures_five_facts():
    """dims=[4096]*7, batch 16, x ~ N(0, 1): the lectures' experiment, with fixed seeds."""
    stats = {label: deep_network_statistics(act, scheme, s, bins=0) for label, (act, scheme, s) in LECTURE_CASES.items()}
    std = {label: [s.std for s in layers] for label, layers in stats.items()}
    sat = [s.saturated_fraction for s in stats["tanh, 0.05*randn"]]
    tiny, xavier_tanh = std["tanh, 0.01*randn"], std["tanh, Xavier"]
    # 1. tanh with 0.01*randn collapses toward zero: layer 6 has about a tenth of layer 1's std
    assert all(b < a for a, b in zip(tiny, tiny[1:], strict=False)) and 0.05 < tiny[5] / tiny[0] < 0.15
    # 2. tanh with 0.05*randn saturates: a third or more of every layer's outputs beyond |0.99|, std near 1
    assert min(sat) > 0.3 and min(std["tanh, 0.05*randn"]) > 0.8
    # 3. tanh with Xavier (1/sqrt(Din)) stays well scaled: no collapse, no saturation
    assert min(xavier_tanh) > 0.25 and max(xavier_tanh) < 0.7 and xavier_tanh[5] > 3 * tiny[5]
    # 4. ReLU with Xavier halves the variance at every layer (std x 1/sqrt(2))
    ratios = [b / a for a, b in zip(std["relu, Xavier"], std["relu, Xavier"][1:], strict=False)]
    assert all(abs(r - 2**-0.5) < 0.05 for r in ratios)
    # 5. ReLU with Kaiming keeps it flat
    kaiming = std["relu, Kaiming"]
    assert all(abs(b / a - 1) < 0.05 for a, b in zip(kaiming, kaiming[1:], strict=False))


def test_measurement_mode_restores_modes_and_running_stats_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    model[2].eval()
    with pytest.raises(RuntimeError), torch.no_grad(), measurement_mode(model):
        assert model[1].training and not model[2].training and not model[0].training
        model(torch.randn(8, 3) * 5)
        raise RuntimeError
    assert model[0].training and model[1].training and not model[2].training
    assert torch.equal(model[1].running_var, torch.ones(3)) and model[1].num_batches_tracked == 0


def test_schemes_warn_nothing_unexpected():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init_weights(CifarResNet(20), "kaiming_normal", mode="fan_out", zero_init_residual=True, generator=_gen())
