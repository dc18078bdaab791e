import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_tricks import ActivationSwap, Maxout, MaxoutConv2d, WeightInit, swap_activations
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.setup.activations import find_functional_activations, resolve_swap
from lightning_tricks.setup.maxout import maxout
from lightning_tricks.zoo import ImageClassifier
from lightning_tricks.zoo.backbones import build_backbone
from tests.helpers import REPO, cpu_trainer, run_ddp
from tests.regularization_modules import ImageData, ListModule


def zoo_and_peer_models():
    return {
        "simple_cnn": (build_backbone("simple_cnn", in_channels=3), torch.randn(3, 3, 16, 16)),
        "mlp": (build_backbone("mlp", in_channels=1, image_size=8, depth=3), torch.randn(3, 1, 8, 8)),
        "resnet20": (build_backbone("resnet20"), torch.randn(3, 3, 16, 16)),
        "torchvision_resnet18": (torchvision.models.resnet18(num_classes=10), torch.randn(3, 3, 32, 32)),
        "timm_resnet18": (timm.create_model("resnet18", num_classes=10), torch.randn(3, 3, 32, 32)),
    }


MODELS = zoo_and_peer_models()


@pytest.mark.parametrize("name", list(MODELS))
def test_swap_keeps_names_and_computes_the_new_activation(name):
    model, x = MODELS[name]
    model = model.eval()
    keys = list(model.state_dict())
    expected = model(x)
    # slope 0 leaky ReLU and PReLU compute ReLU exactly: the swapped model must give the same outputs
    for to in ("leaky_relu", "prelu"):
        swapped = __import__("copy").deepcopy(model)
        report = swap_activations(swapped, to, slope=0.0, example_input=x)
        relus = [n for n, m in swapped.named_modules() if type(m) is nn.ReLU]
        assert relus == [] and report.converted
        torch.testing.assert_close(swapped(x), expected, rtol=0, atol=0)
        new_keys = list(swapped.state_dict())
        extra = [k for k in new_keys if k not in keys]
        assert [k for k in new_keys if k in keys] == keys
        # new keys: PReLU's slopes, and the marker buffer that makes a plain strict load fail (checkpoint.py)
        added = (["weight"] if to == "prelu" else []) + ["lightning_tricks_ActivationSwap"]
        assert extra == [f"{n}.{key}" for n in report.converted for key in added]
    # a non-zero slope changes the outputs (the activations really are replaced)
    leaky = __import__("copy").deepcopy(model)
    swap_activations(leaky, "leaky_relu", slope=0.3)
    assert not torch.allclose(leaky(x), expected)


def test_a_plain_checkpoint_loads_strictly_into_a_swapped_model_and_keeps_its_markers():
    """Fine-tuning a plain checkpoint with another activation: the swapped model's markers are not in it."""
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    swapped = __import__("copy").deepcopy(plain)
    swap_activations(swapped, "elu")
    marker = swapped[1].lightning_tricks_ActivationSwap.clone()
    with torch.no_grad():
        plain[0].weight.add_(1.0)
    assert swapped.load_state_dict(plain.state_dict()).missing_keys == []
    assert torch.equal(swapped[0].weight, plain[0].weight) and torch.equal(swapped[1].lightning_tricks_ActivationSwap,
                                                                          marker)


def test_prelu_is_per_channel_and_shared_widths_get_one_slope():
    model = torchvision.models.resnet50(num_classes=10)  # Bottleneck's relu runs at two widths
    report = swap_activations(model, "prelu", example_input=torch.randn(2, 3, 32, 32))
    assert model.relu.weight.shape == (64,)  # after the stem's 64-channel conv
    assert model.layer1[0].relu.weight.shape == (1,)
    assert any(name == "layer1.0.relu" and "shared" in reason for name, reason in report.skipped)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    swap_activations(mlp, "prelu", slope=0.1, example_input=torch.randn(4, 5))
    assert mlp[1].weight.shape == (7,) and torch.all(mlp[1].weight == 0.1)
    z = torch.randn(4, 5)
    h = mlp[0](z)
    torch.testing.assert_close(mlp(z), mlp[2](torch.where(h > 0, h, 0.1 * h)))


@pytest.mark.parametrize("to,expected", [
    ("elu", lambda h: torch.where(h > 0, h, torch.expm1(h))),
    ("selu", lambda h: 1.0507009873554805 * torch.where(h > 0, h, 1.6732632423543772 * torch.expm1(h))),
    ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
    ("silu", lambda h: h / (1 + torch.exp(-h))),
    ("tanh", torch.tanh),
    ("sigmoid", lambda h: 1 / (1 + torch.exp(-h))),
])
def test_each_target_computes_its_formula(to, expected):
    net = nn.Sequential(nn.Linear(6, 9), nn.ReLU(inplace=True), nn.Linear(9, 3))
    swap_activations(net, to)
    x = torch.randn(5, 6)
    torch.testing.assert_close(net(x), net[2](expected(net[0](x))), rtol=1e-5, atol=1e-6)


def test_replace_kinds_and_layer_patterns():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    report = swap_activations(net, "elu", activations=["tanh"])
    assert report.converted == ["1"] and type(net[3]) is nn.ReLU
    assert swap_activations(net, "gelu", include=["5"]).converted == ["5"] and type(net[3]) is nn.ReLU
    # idempotent: a second identical swap converts nothing
    again = swap_activations(net, "gelu", include=["5"])
    assert again.converted == [] and again.already == ["5"]
    with pytest.raises(InvalidArgumentError, match="`include` pattern '0' matches only modules"):
        swap_activations(net, "elu", include=["0"])


def test_a_pattern_selects_the_activations_inside_a_matching_module():
    """The package's one selector: a pattern naming a block selects what is inside it (as WeightInit's does)."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()))
    assert swap_activations(net, "elu", include=["2"]).converted == ["2.1", "2.2"] and type(net[1]) is nn.ReLU
    with pytest.raises(InvalidArgumentError, match=r"ActivationSwap: `include` pattern 'head' matches no module: "
                                                   r"names look like '0', '1', '2', '2.0'"):
        swap_activations(net, "elu", include=["head"])


def test_exclude_leaves_the_matching_activations_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()))
    assert swap_activations(net, "elu", exclude=["2.2"]).converted == ["1", "2.1"] and type(net[2][2]) is nn.ReLU
    with pytest.raises(InvalidArgumentError, match=r"ActivationSwap: `exclude` pattern 'head' matches no module"):
        swap_activations(net, "elu", exclude=["head"])


@pytest.mark.parametrize(("old", "new", "value", "other"), [
    ("replace", "activations", ["tanh"], ["relu"]),
    ("layers", "include", ["3"], ["1"]),
])
def test_the_old_argument_names_warn_and_give_the_same_swap(old, new, value, other):
    def net():
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    message = rf"ActivationSwap: `{old}` is renamed `{new}`.*write {new}="
    with pytest.warns(DeprecationWarning, match=message):
        swap = ActivationSwap("elu", **{old: value}, **({"activations": ["tanh"]} if old == "layers" else {}))
    reference = ActivationSwap("elu", **{new: value}, **({"activations": ["tanh"]} if old == "layers" else {}))
    assert swap.spec == reference.spec and swap.state_key == reference.state_key
    assert swap.init_args() == reference.init_args() and new in swap.init_args() and old not in swap.init_args()
    kwargs = {"activations": ["tanh"]} if old == "layers" else {}
    old_net, new_net = net(), net()
    with pytest.warns(DeprecationWarning, match=message):
        old_report = swap_activations(old_net, "elu", **{old: value}, **kwargs)
    assert old_report.converted == swap_activations(new_net, "elu", **{new: value}, **kwargs).converted
    assert [type(m) for m in old_net] == [type(m) for m in new_net]
    for call in (ActivationSwap, resolve_swap):
        with pytest.raises(InvalidArgumentError, match=rf"`{old}`=.* and `{new}`=.* are the same argument"):
            call("elu", **{old: value, new: other})
    with pytest.warns(DeprecationWarning, match=rf"SwapSpec.{old} is renamed SwapSpec.{new}"):
        assert getattr(reference.spec, old) == getattr(reference.spec, new)


def test_a_record_of_an_earlier_release_reapplies_without_a_warning():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    record = {"class_path": "lightning_tricks.setup.activation_swap.ActivationSwap",
              "init_args": {"to": "elu", "replace": ["relu"], "slope": None, "alpha": 1.0, "layers": None,
                            "strict": False}, "modules": ["3"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        report = ActivationSwap.reapply(net, record)
    assert report.converted == ["3"] and type(net[1]) is nn.ReLU and type(net[3]) is nn.ELU


def test_a_module_shared_under_two_names_is_replaced_under_both():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net.append(net[1])  # the same ReLU object registered twice (as torchvision's Bottleneck reuses self.relu)
    report = swap_activations(net, "elu")
    assert report.converted == ["1"] and net[1] is net[3] and type(net[3]) is nn.ELU


@pytest.mark.parametrize("kwargs,message", [
    (dict(to="swish"), "`to`='swish' is invalid: expected one of 'relu', 'leaky_relu'"),
    (dict(to="leaky_relu", slope=1.5), r"`slope`=1.5 is invalid: expected a number in \[0.0, 1.0\)"),
    (dict(to="prelu", slope=-0.1), r"`slope`=-0.1 is invalid"),
    (dict(to="elu", slope=0.1), "only leaky_relu and prelu have a slope"),
    (dict(to="elu", alpha=0.0), r"`alpha`=0.0 is invalid: expected a number in \(0.0, inf\)"),
    (dict(to="elu", activations=["relu", "mish"]), "`activations`='mish' is invalid"),
    (dict(to="elu", activations="relu"), "`activations`='relu' is invalid: expected a non-empty list"),
])
def test_bad_arguments_one_line_each(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        ActivationSwap(**kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidArgumentError, match=message):
        resolve_swap(**kwargs)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MixedNet(FunctionalNet):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.fc1(x.flatten(1)))
        return self.fc2(torch.relu(h) + h.relu())


def test_functional_calls_are_found_outside_modules_only():
    x = torch.randn(2, 1, 8, 8)
    calls = find_functional_activations(FunctionalNet(), x)
    assert [kind for kind, _ in calls] == ["relu"] and "FunctionalNet.forward" in calls[0][1]
    assert len(find_functional_activations(MixedNet(), x)) == 2  # torch.relu and Tensor.relu, not self.act
    assert find_functional_activations(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3)) == []
    assert find_functional_activations(FunctionalNet(), x, kinds=["tanh"]) == []


class FunctionalModule(ListModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


def test_functional_model_fails_at_setup_with_one_line_and_mixed_model_warns(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[ActivationSwap("elu")])
    with pytest.raises(ModelNotSupportedError, match="found no relu activation module in FunctionalModule") as err:
        trainer.fit(FunctionalModule(FunctionalNet()), datamodule=ImageData(ones=False))
    message = str(err.value)
    assert "\n" not in message and "1 functional relu call(s) in FunctionalNet.forward" in message
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[ActivationSwap("elu")])
    module = FunctionalModule(MixedNet())
    with pytest.warns(UserWarning, match="2 functional relu call\\(s\\) in MixedNet.forward"):
        trainer.fit(module, datamodule=ImageData(ones=False))
    assert type(module.net.act) is nn.ELU
    with pytest.raises(ModelNotSupportedError, match="MixedNet.forward"):
        cpu_trainer(tmp_path, max_steps=1, callbacks=[ActivationSwap("gelu", strict=True)]).fit(
            FunctionalModule(MixedNet()), datamodule=ImageData(ones=False))


class MLPModule(ListModule):
    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 4))


@pytest.mark.parametrize("swap,init,variance", [
    (dict(to="selu"), dict(scheme="kaiming_normal"), lambda fan_in: 1.0 / fan_in),  # LeCun normal
    (dict(to="leaky_relu", slope=0.2), dict(scheme="kaiming_normal"), lambda fan_in: 2.0 / (1 + 0.04) / fan_in),
    (dict(to="elu"), dict(scheme="kaiming_normal"), lambda fan_in: 2.0 / fan_in),
    (dict(to="tanh"), dict(scheme="xavier_normal"), lambda fan_in: (5 / 3) ** 2 * 2 / (fan_in + 256)),
    (dict(to="selu"), dict(scheme="kaiming_normal", nonlinearity="relu"), lambda fan_in: 2.0 / fan_in),  # explicit
])
def test_weight_init_after_a_swap_uses_the_new_activations_gain(tmp_path, swap, init, variance):
    module = MLPModule()
    trainer = cpu_trainer(tmp_path, max_steps=0, limit_val_batches=0,
                          callbacks=[ActivationSwap(**swap), WeightInit(**init, seed=0)])
    trainer.fit(module, datamodule=ImageData(ones=False))
    weight = module.net[3].weight  # 256 x 256
    assert weight.var().item() == pytest.approx(variance(256), rel=0.03)


def test_swap_after_weight_init_is_an_error_naming_the_order(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=0, callbacks=[WeightInit("kaiming_normal"), ActivationSwap("selu")])
    with pytest.raises(ConfigError, match="put ActivationSwap first") as err:
        trainer.fit(MLPModule(), datamodule=ImageData(ones=False))
    assert "\n" not in str(err.value)
    # with an explicit nonlinearity the order does not matter
    cpu_trainer(tmp_path, max_steps=0, limit_val_batches=0, callbacks=[
        WeightInit("kaiming_normal", nonlinearity="relu"), ActivationSwap("selu")]).fit(
        MLPModule(), datamodule=ImageData(ones=False))


def test_resume_continues_with_the_swapped_modules_and_trained_slopes(tmp_path):
    data = ImageData(ones=False, n=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MLPModule(width=16)
    trainer = cpu_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ActivationSwap("prelu"), ckpt])
    trainer.fit(first, datamodule=data)
    trained = first.net[2].weight.detach().clone()
    assert trained.shape == (16,) and not torch.allclose(trained, torch.full((16,), 0.25))  # slopes were trained
    saved = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert torch.equal(saved["net.2.weight"], trained)
    resumed = MLPModule(width=16)
    loaded = {}
    probe = _Probe(loaded)
    trainer = cpu_trainer(tmp_path, max_epochs=3, callbacks=[ActivationSwap("prelu"), probe])
    trainer.fit(resumed, datamodule=data, ckpt_path=ckpt.last_model_path)
    assert type(resumed.net[2]) is nn.PReLU and torch.equal(loaded["slopes"], trained)
    assert not torch.equal(resumed.net[2].weight.detach(), trained)  # and training continued


class _Probe(__import__("lightning.pytorch").pytorch.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        self.out["slopes"] = pl_module.net[2].weight.detach().clone()


class NoForwardModule(MLPModule):
    def forward(self, x):
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_a_module_without_forward_is_swapped_without_the_trace(tmp_path):
    module, callback = NoForwardModule(width=8), ActivationSwap("prelu")
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[callback]).fit(
        module, datamodule=ImageData(ones=False))
    assert type(module.net[2]) is nn.PReLU and module.net[2].weight.shape == (1,)
    assert any(name == "trace" and "NotImplementedError" in reason for name, reason in callback.report.skipped)


def test_zoo_classifier_by_backbone_name(tmp_path):
    module = ImageClassifier(backbone="simple_cnn", num_classes=4, in_channels=1)
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[ActivationSwap("prelu")])
    trainer.fit(module, datamodule=ImageData(ones=False))
    prelus = [m for m in module.modules() if isinstance(m, nn.PReLU)]
    assert sorted(p.weight.numel() for p in prelus) == [32, 32, 64, 64, 128]  # per channel of each stage


def test_maxout_equals_the_maximum_of_its_pieces():
    layer = Maxout(6, 4, pieces=3)
    x = torch.randn(5, 6)
    pieces = torch.stack([F.linear(x, layer.linear.weight[j::3], layer.linear.bias[j::3]) for j in range(3)])
    torch.testing.assert_close(layer(x), pieces.max(0).values)
    conv = MaxoutConv2d(2, 3, kernel_size=3, pieces=2, padding=1)
    img = torch.randn(2, 2, 7, 7)
    full = conv.conv(img)
    torch.testing.assert_close(conv(img), torch.maximum(full[:, 0::2], full[:, 1::2]))
    with pytest.raises(ValueError, match="not a multiple of pieces=4"):
        maxout(torch.randn(2, 6), 4)
    with pytest.raises(InvalidArgumentError, match="`pieces`=0 is invalid"):
        Maxout(3, 3, pieces=0)


def test_user_module_on_the_cli(tmp_path, monkeypatch):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(REPO / "examples" / "digits.yaml"), "--model", "tests.user_module.UserModule",
                     "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     "--trainer.callbacks+=ActivationSwap", "--trainer.callbacks.to=prelu"])
    swap = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSwap))
    assert swap.spec.to == "prelu" and swap.report.total == 1
    assert type(cli.model.net[2]) is nn.PReLU and cli.model.net[2].weight.shape == (64,)  # hidden=64 channels
    assert "net.2.weight" in cli.model.state_dict()


@pytest.mark.slow
def test_ddp_two_processes_swap_alike_and_train_the_slopes(tmp_path):
    def probe(trainer, pl_module):
        return {"types": [type(m).__name__ for m in pl_module.net], "slopes": pl_module.net[2].weight.detach().clone()}

    results = run_ddp(MLPModule(width=16), ImageData(ones=False, n=32), tmp_path=tmp_path, probe=probe, max_epochs=2,
                      callbacks=[ActivationSwap("prelu")])
    assert results[0]["types"] == results[1]["types"] and results[0]["types"][2] == "PReLU"
    assert torch.equal(results[0]["slopes"], results[1]["slopes"])
    assert not torch.allclose(results[0]["slopes"], torch.full((16,), 0.25))
