"""Dead-unit monitoring and training diagnostics: brute-force references, user modules, DDP, resume, bad input."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import DeadUnitMonitor, InitialLossCheck, UpdateRatioMonitor, overfit_check
from lightning_tricks.core.task import TaskNotSupportedError
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.monitoring import (
    DeadUnitTracker,
    InitialLossError,
    NothingToMonitorError,
    dead_unit_heatmap,
    find_watched_modules,
    median_ratio,
    update_ratios,
)
from tests.helpers import cpu_trainer, run_ddp

# ---------------------------------------------------------------------------------------------------
# helpers


class Recorder:
    """Test-side hooks that keep every output of some modules (the brute-force reference)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.calls: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name].append(output.detach().clone())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def brute_force_dead(outputs: list[torch.Tensor], unit_dim: int, threshold: float = 0.0) -> torch.Tensor:
    """Dead mask from all outputs: move the unit axis first, flatten the rest, check every value."""
    flat = torch.cat([o.movedim(unit_dim, 0).reshape(o.shape[unit_dim], -1) for o in outputs], dim=1)
    return ~(flat > threshold).any(dim=1)


class MemoryLogger(Logger):
    """A logger that keeps what it is given, and takes images and histograms like TensorBoard."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.images: list[tuple[str, tuple[int, ...]]] = []
        self.histograms: list[str] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> Any:
        return self

    def add_image(self, tag: str, array: np.ndarray, step: int, dataformats: str = "CHW") -> None:
        assert dataformats == "HWC" and array.dtype == np.uint8 and array.shape[-1] == 3
        self.images.append((tag, array.shape))

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        assert values.numel() > 0
        self.histograms.append(tag)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def logged(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, m[key]) for step, m in self.metrics if key in m]


class UserMLP(pl.LightningModule):
    """Written as a user writes it: list batches, plain F.cross_entropy, self(x) in training_step."""

    def __init__(self, in_features: int = 6, hidden: int = 12, classes: int = 4, lr: float = 0.05,
                 optimizer: str = "sgd", activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.net = nn.Sequential(nn.Linear(in_features, hidden), activation(), nn.Linear(hidden, hidden),
                                 activation(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=self.lr)
        return torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=0.9)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def toy_data(n: int = 64, features: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def kill_units(linear: nn.Linear, units: list[int]) -> None:
    with torch.no_grad():
        linear.bias[units] = -100.0


# ---------------------------------------------------------------------------------------------------
# the functional core against brute force


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_tracker_equals_brute_force_on_linear_model_over_an_epoch_of_training(threshold):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3))
    kill_units(model[0], [2, 7])
    recorder = Recorder({"1": model[1], "3": model[3]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = toy_data(96, classes=3)
    with DeadUnitTracker(model, activations=["relu", "leaky_relu"], threshold=threshold) as tracker:
        for xb, yb in zip(x.split(16), y.split(16), strict=True):  # training: weights change between batches
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    report = tracker.report()
    recorder.remove()
    assert list(report.sites) == ["1", "3"]
    for name in ("1", "3"):
        expected = brute_force_dead(recorder.outputs[name], unit_dim=1, threshold=threshold)
        assert torch.equal(report.sites[name].flagged, expected), name
        assert report.sites[name].positions == 96
    assert report.sites["1"].flagged[[2, 7]].all()
    dead = sum(int(brute_force_dead(recorder.outputs[n], 1, threshold).sum()) for n in ("1", "3"))
    assert report.dead_units == dead and report.dead_fraction == pytest.approx(dead / 18)


def test_tracker_equals_brute_force_per_channel_on_conv2d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3), nn.ReLU6())
    with torch.no_grad():
        model[0].bias[[0, 5]] = -50.0  # channels dead at every position
        model[2].bias[1] = -0.5  # sometimes alive: only brute force knows
    recorder = Recorder({"1": model[1], "3": model[3]})
    with DeadUnitTracker(model) as tracker:
        for seed in range(4):
            model(torch.randn(5, 3, 9, 9, generator=torch.Generator().manual_seed(seed)))
    report = tracker.report()
    for name, units in (("1", 8), ("3", 6)):
        expected = brute_force_dead(recorder.outputs[name], unit_dim=1)
        assert report.sites[name].units == units
        assert torch.equal(report.sites[name].flagged, expected)
    assert report.sites["1"].flagged[[0, 5]].all()
    assert report.sites["3"].positions == 4 * 5 * 7 * 7


class ReusedReLU(nn.Module):
    """One ReLU module applied twice per forward, on tensors of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(4, 6), nn.Linear(6, 3), nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc2(self.relu(self.fc1(x))))


def test_module_called_twice_per_forward_is_two_sites_each_exact():
    torch.manual_seed(2)
    model = ReusedReLU()
    with torch.no_grad():
        model.fc2.bias[0] = -100.0
    outputs: list[torch.Tensor] = []
    handle = model.relu.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with DeadUnitTracker(model) as tracker:
        for _ in range(3):
            model(torch.randn(8, 4))
    handle.remove()
    report = tracker.report()
    assert list(report.sites) == ["relu", "relu#2"]
    assert torch.equal(report.sites["relu"].flagged, brute_force_dead(outputs[0::2], 1))
    assert torch.equal(report.sites["relu#2"].flagged, brute_force_dead(outputs[1::2], 1))
    assert report.sites["relu#2"].flagged[0]


def test_torchvision_basic_block_reused_relu_and_timm_model_are_found():
    import timm
    import torchvision

    tv = torchvision.models.resnet18(num_classes=10)
    with DeadUnitTracker(tv) as tracker:
        tv(torch.randn(2, 3, 16, 16))
    sites = list(tracker.report().sites)
    assert len(sites) == 1 + 8 * 2  # stem, then each BasicBlock's self.relu twice
    assert sites[:3] == ["relu", "layer1.0.relu", "layer1.0.relu#2"]
    tm = timm.create_model("resnet10t", num_classes=10)
    with DeadUnitTracker(tm) as tracker:
        tm(torch.randn(2, 3, 16, 16))
    report = tracker.report()
    assert len(report.sites) == sum(isinstance(m, nn.ReLU) for m in tm.modules())
    assert all(s.units > 0 for s in report.sites.values())


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def test_functional_relu_model_needs_layers_and_preactivation_mode_is_exact():
    model = FunctionalNet()
    with pytest.raises(NothingToMonitorError, match=r"preactivation_layers=\['conv'\].*bn \(BatchNorm2d\), fc1 \(Linear\)"):
        DeadUnitTracker(model)
    with pytest.raises(NothingToMonitorError, match="pattern 'nope' matches no module"):
        DeadUnitTracker(model, preactivation_layers=["nope"])
    with torch.no_grad():
        model.fc1.bias[3] = -100.0
    recorder = Recorder({"bn": model.bn, "fc1": model.fc1})
    with DeadUnitTracker(model, preactivation_layers=["b*", "fc1"]) as tracker:
        for _ in range(3):
            model(torch.randn(6, 1, 5, 5))
    report = tracker.report()
    assert list(report.sites) == ["bn", "fc1"]
    assert torch.equal(report.sites["bn"].flagged, brute_force_dead(recorder.outputs["bn"], 1))
    assert torch.equal(report.sites["fc1"].flagged, brute_force_dead(recorder.outputs["fc1"], 1))
    assert report.sites["fc1"].flagged[3]


class _Scale(nn.Module):  # a custom leaf layer with a parameter of its own
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gain


def test_layer_patterns_go_through_the_one_selector():
    # core.selection's rule: a pattern naming a block selects what is inside it; only layers are watched
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), _Scale(4)), nn.Identity(), nn.Linear(4, 2))
    watched = find_watched_modules(model, activations=[], preactivation_layers=["0"])
    assert [(w.name, w.source) for w in watched] == [("0.0", "preactivation_layers"), ("0.2", "preactivation_layers")]
    assert [w.name for w in find_watched_modules(model, activations=[], preactivation_layers=["*.0", "2"])] == ["0.0", "2"]
    with pytest.raises(NothingToMonitorError, match=r"`preactivation_layers` pattern '1' matches only modules .*'1' \(Identity: "
                                                    r"not a conv, linear or norm layer"):
        find_watched_modules(model, activations=[], preactivation_layers=["1"])


def test_sequence_outputs_use_features_after_linear_and_gelu_is_opt_in():
    model = nn.Sequential(nn.Linear(4, 7), nn.GELU(), nn.Linear(7, 2))
    with pytest.raises(NothingToMonitorError):
        DeadUnitTracker(model)
    with torch.no_grad():
        model[0].bias[6] = -100.0
    with DeadUnitTracker(model, activations=["gelu"]) as tracker:
        model(torch.randn(3, 5, 4))  # (batch, length, features)
    site = tracker.report().sites["1"]
    assert site.units == 7 and site.flagged.tolist() == [False] * 6 + [True]


def test_saturated_tanh_and_sigmoid_units_equal_brute_force_fraction():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight[0] *= 1000.0  # unit 0 pinned at +-1
        model[0].bias[1] = 50.0  # unit 1 pinned at +1
        model[2].bias[0] = -40.0  # sigmoid unit 0 pinned at 0
    recorder = Recorder({"1": model[1], "3": model[3]})
    with DeadUnitTracker(model, saturation_eps=0.01, saturation_fraction=0.9) as tracker:
        model(torch.randn(200, 3))
    report = tracker.report()
    for name, (low, high) in (("1", (-1.0, 1.0)), ("3", (0.0, 1.0))):
        out = torch.cat(recorder.outputs[name])
        share = ((out <= low + 0.01) | (out >= high - 0.01)).float().mean(dim=0)
        assert torch.equal(report.sites[name].flagged, share >= 0.9)
        assert report.sites[name].kind == "saturation"
    assert report.sites["1"].flagged[:2].all() and report.sites["3"].flagged[0]
    assert math.isnan(report.dead_fraction) and report.saturated_fraction > 0


def test_heatmap_figure_and_bad_rows():
    fig = dead_unit_heatmap({"a": [0.0, 0.5], "b": [1.0, float("nan")]}, epochs=[0, 1])
    assert len(fig.axes) == 2  # heat map and color bar
    with pytest.raises(ValueError, match="2 values for 3 epochs"):
        dead_unit_heatmap({"a": [0.0, 0.5]}, epochs=[0, 1, 2])


# ---------------------------------------------------------------------------------------------------
# the callback on a user's module


def test_monitor_on_user_module_logs_brute_force_fractions_draws_and_removes_hooks(tmp_path):
    torch.manual_seed(4)
    model = UserMLP(lr=0.0)  # fixed weights: the brute force is one pass over the data afterwards
    kill_units(model.net[0], [0, 1, 2])
    x, y = toy_data(48)
    logger = MemoryLogger()
    monitor = DeadUnitMonitor(plot_dir=str(tmp_path / "plots"), warn_fraction=0.5)
    ratio = UpdateRatioMonitor(every_n_steps=1)
    trainer = cpu_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[monitor, ratio])
    trainer.fit(model, loader(x, y), loader(x[:16], y[:16]))
    with torch.no_grad():
        h1 = model.net[1](model.net[0](x))
        h2 = model.net[3](model.net[2](h1))
    expected = {"net.1": float((~(h1 > 0).any(0)).float().mean()), "net.3": float((~(h2 > 0).any(0)).float().mean())}
    metrics = trainer.callback_metrics
    for site, fraction in expected.items():
        assert float(metrics[f"dead_units/train/{site}"]) == pytest.approx(fraction)
    total = (expected["net.1"] * 12 + expected["net.3"] * 12) / 24
    assert float(metrics["dead_units/train/overall"]) == pytest.approx(total)
    assert [r["epoch"] for r in monitor.history["train"]] == [0, 1]
    assert not monitor.history["validate"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert (tmp_path / "plots" / "dead_units_train.png").stat().st_size > 1000
    assert logger.images and logger.images[0][0] == "dead_units/train/heatmap"
    assert any("dead_units/train/overall" in m for _, m in logger.metrics)
    assert ratio.history == []  # lr 0: no parameter moved, nothing to record


def test_monitor_warns_above_warn_fraction_and_validation_passes_are_separate(tmp_path):
    torch.manual_seed(5)
    model = UserMLP(lr=0.0)
    kill_units(model.net[0], list(range(6)))  # half of the first layer, a quarter of all units at least
    with torch.no_grad():
        model.net[0].bias[6:] = -1.0  # the others fire on some inputs only
    x, y = toy_data(32)
    x_val = -x[:8]
    monitor = DeadUnitMonitor(stages="both", warn_fraction=0.2, plot=False)
    trainer = cpu_trainer(tmp_path, max_epochs=1, val_check_interval=0.5, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"DeadUnitMonitor: \d+\.\d% of 24 units are dead after epoch 0 \(train pass\)"):
        trainer.fit(model, loader(x, y), loader(x_val, y[:8]))
    with torch.no_grad():
        train_dead = ~(model.net[1](model.net[0](x)) > 0).any(0)
        val_dead = ~(model.net[1](model.net[0](x_val)) > 0).any(0)
    assert not torch.equal(train_dead, val_dead)  # so a pass leaking into the other would show
    assert torch.equal(monitor.last_report["train"].sites["net.1"].flagged, train_dead)
    assert torch.equal(monitor.last_report["validate"].sites["net.1"].flagged, val_dead)
    metrics = trainer.callback_metrics
    assert float(metrics["dead_units/validate/net.1"]) == pytest.approx(float(val_dead.float().mean()))
    assert float(metrics["dead_units/train/net.1"]) == pytest.approx(float(train_dead.float().mean()))
    assert not any(k.startswith("val_dead") for k in metrics)
    # validation in the middle and at the end of the epoch; the sanity check is not counted
    assert [r["epoch"] for r in monitor.history["validate"]] == [0, 0]
    assert len(monitor.history["train"]) == 1


def test_trainer_validate_alone_tracks_the_validation_pass(tmp_path):
    torch.manual_seed(12)
    model = UserMLP()
    kill_units(model.net[2], [4])
    x, y = toy_data(24)
    monitor = DeadUnitMonitor(stages="validate", plot=False)
    cpu_trainer(tmp_path, callbacks=[monitor]).validate(model, loader(x, y))
    with torch.no_grad():
        dead = ~(model.net[3](model.net[2](model.net[1](model.net[0](x)))) > 0).any(0)
    assert torch.equal(monitor.last_report["validate"].sites["net.3"].flagged, dead) and dead[4]
    assert len(monitor.history["validate"]) == 1 and not monitor.history["train"]
    assert all(not m._forward_hooks for m in model.modules())


def test_deprecated_layers_and_validation_stage_warn_and_behave_identically(tmp_path):
    model = FunctionalNet()
    with pytest.warns(DeprecationWarning, match=r"DeadUnitTracker: `layers` is renamed `preactivation_layers`"):
        old = DeadUnitTracker(model, layers=["b*", "fc1"])
    new = DeadUnitTracker(model, preactivation_layers=["b*", "fc1"])
    assert [(w.name, w.kind, w.dim_rule) for w in old.watched] == [(w.name, w.kind, w.dim_rule) for w in new.watched]
    with pytest.warns(DeprecationWarning, match="find_watched_modules: `layers` is renamed"):
        assert [w.name for w in find_watched_modules(model, activations=[], layers=["fc1"])] == ["fc1"]
    for build in (lambda: DeadUnitTracker(model, layers=["fc1"], preactivation_layers=["bn"]),
                  lambda: DeadUnitMonitor(layers=["fc1"], preactivation_layers=["bn"])):
        with pytest.raises(InvalidArgumentError, match="`layers`=.* and `preactivation_layers`=.* are the same"):
            build()

    def fit(**kwargs: Any) -> DeadUnitMonitor:
        torch.manual_seed(5)
        net = UserMLP()
        kill_units(net.net[0], [1, 3])
        x, y = toy_data(32)
        monitor = DeadUnitMonitor(plot=False, **kwargs)
        cpu_trainer(tmp_path, max_epochs=2, callbacks=[monitor]).fit(net, loader(x, y), loader(-x[:8], y[:8]))
        return monitor

    with pytest.warns(DeprecationWarning) as caught:
        old_monitor = fit(layers=["net.0"], stages="validation")
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("`layers` is renamed `preactivation_layers`" in m for m in messages)
    assert any("`stages`='validation' is renamed 'validate'" in m for m in messages)
    new_monitor = fit(preactivation_layers=["net.0"], stages="validate")
    assert old_monitor.stages == new_monitor.stages == "validate"
    assert old_monitor.preactivation_layers == new_monitor.preactivation_layers == ["net.0"]
    assert old_monitor.state_key == new_monitor.state_key
    assert old_monitor.history == new_monitor.history and len(new_monitor.history["validate"]) == 2
    assert "net.0" in new_monitor.history["validate"][-1]["dead"]


def test_model_with_nothing_to_monitor_fails_at_setup(tmp_path):
    class Functional(UserMLP):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))

        def forward(self, x):
            return self.net[1](F.relu(self.net[0](x)))

    x, y = toy_data(16)
    trainer = cpu_trainer(tmp_path, callbacks=[DeadUnitMonitor()])
    with pytest.raises(NothingToMonitorError, match=r"DeadUnitMonitor found nothing to monitor in Functional.*"
                                                    r"preactivation_layers=\['net.0'\]"):
        trainer.fit(Functional(), loader(x, y))
    monitor = DeadUnitMonitor(preactivation_layers=["net.0"], plot=False)
    cpu_trainer(tmp_path, callbacks=[monitor]).fit(Functional(), loader(x, y))
    assert list(monitor.history["train"][0]["dead"]) == ["net.0"]


def test_resume_from_checkpoint_continues_history(tmp_path):
    x, y = toy_data(32)

    def fit(epochs: int, ckpt: str | None = None) -> tuple[DeadUnitMonitor, UpdateRatioMonitor]:
        torch.manual_seed(6)
        dead, ratio = DeadUnitMonitor(plot=False), UpdateRatioMonitor(every_n_steps=1)
        # with validation every 2 epochs, ModelCheckpoint saves at validation end, before on_train_epoch_end:
        # the epoch's figures must be in the checkpoint already
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
        trainer = cpu_trainer(tmp_path, max_epochs=epochs, enable_checkpointing=True, check_val_every_n_epoch=2,
                              callbacks=[dead, ratio, checkpoint])
        trainer.fit(UserMLP(), loader(x, y), loader(x[:16], y[:16]), ckpt_path=ckpt)
        return dead, ratio

    full_dead, full_ratio = fit(3)
    fit(2)
    resumed_dead, resumed_ratio = fit(3, str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in resumed_dead.history["train"]] == [0, 1, 2]
    assert resumed_dead.history == full_dead.history
    assert [r["step"] for r in resumed_ratio.history] == list(range(6))
    assert [r["median"] for r in resumed_ratio.history] == pytest.approx([r["median"] for r in full_ratio.history])


# ---------------------------------------------------------------------------------------------------
# update/weight ratio


def test_update_ratios_function_against_numpy():
    g = torch.Generator().manual_seed(0)
    before = [torch.randn(3, 4, generator=g), torch.zeros(5), torch.randn(2, generator=g).half()]
    after = [b + 0.01 * torch.randn(b.shape, generator=g).to(b.dtype) for b in before]
    ratios = update_ratios(before, after)
    for i in (0, 2):
        b, a = before[i].double().numpy(), after[i].double().numpy()
        assert float(ratios[i]) == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-3)
    assert math.isnan(float(ratios[1]))
    assert median_ratio(ratios) == pytest.approx(float(ratios[[0, 2]].mean()))
    with pytest.raises(ValueError, match="changed shape"):
        update_ratios([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_ratio_equals_hand_computation(optimizer, tmp_path):
    torch.manual_seed(7)
    model = UserMLP(lr=0.01, optimizer=optimizer)
    reference = copy.deepcopy(model.net)
    x, y = toy_data(96)
    logger = MemoryLogger()
    monitor = UpdateRatioMonitor(every_n_steps=2)
    trainer = cpu_trainer(tmp_path, logger=logger, callbacks=[monitor])
    trainer.fit(model, loader(x, y))
    # by hand: the same steps with plain torch, ratios of the real updates
    opt = (torch.optim.Adam(reference.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9))
    names = [f"net.{n}" for n, _ in reference.named_parameters()]
    expected: dict[int, list[float]] = {}
    for step, (xb, yb) in enumerate(zip(x.split(16), y.split(16), strict=True)):
        before = [p.detach().clone() for p in reference.parameters()]
        opt.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        opt.step()
        expected[step] = [float((p.detach() - b).norm() / b.norm()) for p, b in zip(reference.parameters(), before, strict=True)]
    assert [r["step"] for r in monitor.history] == [0, 2, 4]
    for step in (0, 2, 4):
        logged = dict(logger.metrics)[step]
        assert [logged[f"update_ratio/{n}"] for n in names] == pytest.approx(expected[step], rel=1e-4)
        weights = [r for r, p in zip(expected[step], reference.parameters(), strict=True) if p.ndim >= 2]
        assert logged["update_ratio/median"] == pytest.approx(float(np.median(weights)), rel=1e-4)
    # through pl_module.log: trainer.callback_metrics holds the last measurement (step 4)
    metrics = trainer.callback_metrics
    assert [float(metrics[f"update_ratio/{n}"]) for n in names] == pytest.approx(expected[4], rel=1e-4)
    weights = [r for r, p in zip(expected[4], reference.parameters(), strict=True) if p.ndim >= 2]
    assert float(metrics["update_ratio/median"]) == pytest.approx(float(np.median(weights)), rel=1e-4)


def test_early_stopping_and_model_checkpoint_monitor_the_update_ratio(tmp_path):
    import lightning_tricks as lt

    torch.manual_seed(3)
    x, y = toy_data(64)  # 4 batches an epoch
    monitor = UpdateRatioMonitor(every_n_steps=1, warn_below=1e-12, warn_above=1e12)
    stopper = lt.EarlyStopping(monitor="update_ratio/median", mode="min", patience=100, restore_best_weights=False,
                               check_on_train_epoch_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="update_ratio/median", mode="min", save_top_k=1)
    trainer = cpu_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[monitor, stopper, checkpoint])
    trainer.fit(UserMLP(lr=0.01), loader(x, y))
    # each epoch-end check sees the median measured at the epoch's last step
    last_of_epoch = [r["median"] for r in monitor.history if r["step"] % 4 == 3]
    assert len(last_of_epoch) == 3 and len(set(last_of_epoch)) == 3
    assert float(stopper.best_score) == pytest.approx(min(last_of_epoch), rel=1e-6)
    assert stopper.best_epoch == last_of_epoch.index(min(last_of_epoch))
    assert float(checkpoint.best_model_score) == pytest.approx(min(last_of_epoch), rel=1e-6)


def test_monitor_metrics_under_manual_optimization_with_two_optimizers(tmp_path):
    from lightning_tricks import LargeBatchScaling
    from lightning_tricks.large_batch import lr_multiplier
    from tests.matrix_checks import fit

    ratio = UpdateRatioMonitor(every_n_steps=1, warn_below=1e-12, warn_above=1e12)
    dead = DeadUnitMonitor(plot=False)
    scaling = LargeBatchScaling(reference_batch_size=2, warmup_steps=3)
    module, _, trainer = fit("gan", [ratio, dead, scaling])
    assert not module.automatic_optimization and len(trainer.optimizers) == 2
    metrics = trainer.callback_metrics
    assert float(metrics["update_ratio/median"]) == pytest.approx(ratio.history[-1]["median"], rel=1e-6)
    finite = {n: r for n, r in ratio.last_ratios.items() if math.isfinite(r)}
    assert finite and all(float(metrics[f"update_ratio/{n}"]) == pytest.approx(r, rel=1e-6) for n, r in finite.items())
    record = dead.history["train"][-1]
    assert record["saturated"]  # the GAN's tanh and sigmoid (its Leaky ReLUs are not watched by default)
    for kind, prefix, overall in (("dead", "dead_units/train", "overall"),
                                  ("saturated", "dead_units/train/saturated", "saturated_overall")):
        if record[overall] is not None:
            assert float(metrics[f"{prefix}/overall"]) == pytest.approx(record[overall])
        assert all(float(metrics[f"{prefix}/{site}"]) == pytest.approx(f) for site, f in record[kind].items())
    batches = trainer.global_step // 2  # each optimizer steps once a batch; t counts its own steps
    expected = lr_multiplier(batches - 1, scaling.factor, 3)
    assert float(metrics["large_batch/lr_scale"]) == pytest.approx(expected) and scaling.factor > 1


def test_update_ratio_warns_when_too_high_and_logs_histograms(tmp_path):
    torch.manual_seed(8)
    x, y = toy_data(32)
    logger = MemoryLogger()
    monitor = UpdateRatioMonitor(every_n_steps=1, histograms=True, median_over="all")
    with pytest.warns(UserWarning, match=r"median update/weight ratio .* above 0.01 .*too high"):
        cpu_trainer(tmp_path, logger=logger, callbacks=[monitor]).fit(UserMLP(lr=5.0), loader(x, y))
    finite = [r for r in monitor.last_ratios.values() if math.isfinite(r)]
    assert len(monitor.last_ratios) == 6 and monitor.history[-1]["median"] == pytest.approx(float(np.median(finite)))
    tags = set(logger.histograms)
    assert {"weights/net.0.weight", "gradients/net.0.weight", "activations/net.1", "activations/net.3"} <= tags


# ---------------------------------------------------------------------------------------------------
# initial loss and overfit check


def test_initial_loss_of_fresh_model_passes_and_equals_first_batch_loss(tmp_path):
    torch.manual_seed(9)
    model = UserMLP(classes=10)
    x, y = toy_data(64, classes=10)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x[:16]), y[:16]))
    check = InitialLossCheck()
    trainer = cpu_trainer(tmp_path, accumulate_grad_batches=2, callbacks=[check])
    trainer.fit(model, loader(x, y))
    assert check.observed == pytest.approx(first, rel=1e-6)  # not halved by gradient accumulation
    assert check.expected == pytest.approx(math.log(10)) and check.passed
    assert float(trainer.callback_metrics["initial_loss/observed"]) == pytest.approx(first, rel=1e-6)
    assert float(trainer.callback_metrics["initial_loss/expected"]) == pytest.approx(math.log(10), rel=1e-6)
    assert abs(check.observed - 2.30) < 0.2


def test_initial_loss_warns_with_both_numbers_for_a_scaled_last_layer_and_can_fail(tmp_path):
    torch.manual_seed(10)
    x, y = toy_data(32, classes=10)

    def scaled() -> UserMLP:
        model = UserMLP(classes=10)
        with torch.no_grad():
            model.net[4].weight.mul_(30.0)
        return model

    check = InitialLossCheck()
    with pytest.warns(UserWarning, match=r"first training loss is \d+\.\d{4}, expected about log\(10\) = 2\.3026"):
        cpu_trainer(tmp_path, callbacks=[check]).fit(scaled(), loader(x, y))
    assert check.observed > 3.0 and check.passed is False
    with pytest.raises(InitialLossError, match="expected about log"):
        cpu_trainer(tmp_path, callbacks=[InitialLossCheck(fail=True)]).fit(scaled(), loader(x, y))


def test_initial_loss_finds_the_classes_whatever_the_step_calls_or_needs_num_classes(tmp_path):
    class NetDirect(UserMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # bypasses self(x): the probe finds `net`

    class ForwardDirect(UserMLP):
        def __init__(self, classes):
            super().__init__(classes=classes)
            self.projection = nn.Linear(classes, 7)  # the last nn.Linear, unused: the logits' width comes first

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.forward(x), y)  # bypasses the module's hooks: the probe finds `net`

    class Functional(UserMLP):  # no module ever receives the batch's input, and no nn.Linear
        def __init__(self):
            super().__init__()
            self.net = nn.Identity()
            self.weight = nn.Parameter(torch.randn(6, 4) * 0.01)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(x @ self.weight, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = toy_data(32, classes=3)
    torch.manual_seed(3)
    for module, classes in ((NetDirect(classes=4), 4), (ForwardDirect(classes=5), 5)):
        first = float(F.cross_entropy(module.net(x[:16]), y[:16]))
        check = InitialLossCheck()
        cpu_trainer(tmp_path, callbacks=[check]).fit(module, loader(x, y))
        assert check.expected == pytest.approx(math.log(classes)) and check.observed == pytest.approx(first, rel=1e-6)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())  # hooks removed
    with pytest.raises(InvalidArgumentError, match="InitialLossCheck needs the number of classes.*set `num_classes`"):
        cpu_trainer(tmp_path, callbacks=[InitialLossCheck()]).fit(Functional(), loader(x, y))
    check = InitialLossCheck(num_classes=4)
    cpu_trainer(tmp_path, callbacks=[check]).fit(Functional(), loader(x, y))
    assert check.expected == pytest.approx(math.log(4)) and check.observed is not None


class _TaskModule(pl.LightningModule):
    """One module for the task cases of issue 20: a per-pixel 1x1 conv (dense), or a linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.net = nn.Conv2d(3, 2, 1) if kind == "dense" else nn.Linear(6, 5 if kind != "binary" else 1)
        with torch.no_grad():  # outputs near zero: the expected initial loss exactly
            for p in self.net.parameters():
                p.mul_(1e-3)

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        out = self(x)
        if self.kind in ("dense", "classification"):
            return F.cross_entropy(out, y)
        if self.kind == "regression":
            return F.mse_loss(out, y)
        return F.binary_cross_entropy_with_logits(out, y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _task_data(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if kind == "dense":  # 8x8 images, 2 classes: the old check took the width (8) for C
        return loader(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 2, (16, 8, 8), generator=g))
    x = torch.randn(16, 6, generator=g)
    targets = {"multilabel": (torch.rand(16, 5, generator=g) > 0.5).float(),
               "binary": (torch.rand(16, 1, generator=g) > 0.5).float(),
               "classification": torch.randint(0, 5, (16,), generator=g),
               "regression": torch.randn(16, 5, generator=g)}
    return loader(x, targets[kind])


@pytest.mark.parametrize("kind,expected", [("dense", math.log(2)), ("multilabel", math.log(2)),
                                           ("binary", math.log(2)), ("classification", math.log(5))])
def test_initial_loss_expects_log_c_of_the_class_dimension_and_log_2_for_sigmoid_losses(tmp_path, kind, expected):
    module, data = _TaskModule(kind), _task_data(kind)
    with torch.no_grad():
        first = float(module.loss(next(iter(data))))
    check = InitialLossCheck(fail=True)
    cpu_trainer(tmp_path, max_steps=1, callbacks=[check]).fit(module, data)
    assert check.expected == pytest.approx(expected) and check.observed == pytest.approx(first, rel=1e-6)
    assert check.passed and abs(first - expected) < 0.01
    assert check.task.kind == {"binary": "multilabel"}.get(kind, kind)


def test_initial_loss_refuses_regression_in_one_line(tmp_path):
    with pytest.raises(TaskNotSupportedError, match="InitialLossCheck serves .* not a regression model.*remove") as err:
        cpu_trainer(tmp_path, max_steps=1, callbacks=[InitialLossCheck()]).fit(_TaskModule("regression"),
                                                                               _task_data("regression"))
    assert "\n" not in str(err.value)
    with pytest.raises(TaskNotSupportedError, match="not a regression model"):
        InitialLossCheck(task="regression")
    check = InitialLossCheck(task="multilabel")  # the override wins over the float targets
    cpu_trainer(tmp_path, max_steps=1, callbacks=[check]).fit(_TaskModule("regression"), _task_data("regression"))
    assert check.expected == pytest.approx(math.log(2))


def test_overfit_check_reaches_full_accuracy_and_leaves_the_model_alone(tmp_path):
    torch.manual_seed(11)
    model = UserMLP(hidden=32, lr=0.3)
    state = copy.deepcopy(model.state_dict())
    x, y = toy_data(64, classes=4)  # random labels: only memorizing gets them right
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    report = overfit_check(model, train_dataloader=data, num_batches=1, max_epochs=40, default_root_dir=str(tmp_path))
    assert report.passed and report.accuracy == 1.0 and report.num_samples == 32
    assert report.final_loss < report.initial_loss and report.epochs == 40
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    frozen = overfit_check(UserMLP(lr=0.0), train_dataloader=data, max_epochs=2, default_root_dir=str(tmp_path))
    assert not frozen.passed and frozen.accuracy < 0.9


# ---------------------------------------------------------------------------------------------------
# DDP: all three together; a unit dead on rank 0 and alive on rank 1 is alive


class RankData(UserMLP):
    """Each rank trains on its own data: input 0 is negative on rank 0 and positive on rank 1."""

    def __init__(self) -> None:
        super().__init__(in_features=3, hidden=3, classes=4)
        with torch.no_grad():
            first = self.net[0]
            first.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
            first.bias.copy_(torch.tensor([0.0, 0.0, -100.0]))

    def configure_optimizers(self):  # the first layer stays fixed, so the brute force can use it afterwards
        rest = [p for n, p in self.net.named_parameters() if not n.startswith("0.")]
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.0}, {"params": rest, "lr": 0.05}])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.global_rank)
        x = torch.randn(32, 3, generator=g)
        x[:, 0] = x[:, 0].abs() + 0.1 if self.global_rank == 1 else -x[:, 0].abs() - 0.1
        return loader(x, torch.randint(0, 4, (32,), generator=g))


def _probe(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    import torch.distributed as dist

    dead = next(c for c in trainer.callbacks if isinstance(c, DeadUnitMonitor))
    ratio = next(c for c in trainer.callbacks if isinstance(c, UpdateRatioMonitor))
    check = next(c for c in trainer.callbacks if isinstance(c, InitialLossCheck))
    x = torch.cat([b[0] for b in module.train_dataloader()])
    with torch.no_grad():
        local = ~(module.net[1](module.net[0](x)) > 0).any(0)
    gathered = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(gathered, local)
    overall = gathered[0] & gathered[1]
    flagged = dead.last_report["train"].sites["net.1"].flagged
    assert torch.equal(flagged, overall), (flagged, overall)
    return {"local": local.tolist(), "flagged": flagged.tolist(), "history": dead.history["train"],
            "ratios": ratio.history, "initial": check.observed}


def test_ddp_all_three_agree_and_a_unit_alive_on_one_rank_is_alive(tmp_path):
    callbacks = [DeadUnitMonitor(plot=False), UpdateRatioMonitor(every_n_steps=1), InitialLossCheck(num_classes=4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_ddp(RankData(), tmp_path=tmp_path, probe=_probe, callbacks=callbacks, max_epochs=2,
                          use_distributed_sampler=False)
    rank0, rank1 = results
    assert rank0["local"] == [True, False, True] and rank1["local"] == [False, False, True]
    assert rank0["flagged"] == rank1["flagged"] == [False, False, True]
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 2
    assert rank0["ratios"] == rank1["ratios"] and len(rank0["ratios"]) == 4
    assert rank0["initial"] == rank1["initial"]


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("build,message", [
    (lambda: DeadUnitMonitor(threshold=-0.1), "`threshold`=-0.1 is invalid: expected a number in [0.0, inf)"),
    (lambda: DeadUnitMonitor(warn_fraction=1.5), "`warn_fraction`=1.5 is invalid: expected a number in [0.0, 1.0]"),
    (lambda: DeadUnitMonitor(warn_fraction=-0.1), "`warn_fraction`=-0.1 is invalid"),
    (lambda: DeadUnitMonitor(stages="test"), "`stages`='test' is invalid: expected one of 'train', 'validate'"),
    (lambda: DeadUnitMonitor(activations=["swish"]), "`activations`='swish' is invalid: expected one of 'relu'"),
    (lambda: DeadUnitMonitor(activations=[]), "`activations`=[] is invalid"),
    (lambda: UpdateRatioMonitor(every_n_steps=0), "`every_n_steps`=0 is invalid: expected an integer in [1, inf]"),
    (lambda: UpdateRatioMonitor(warn_below=1e-2, warn_above=1e-3), "`warn_above`=0.001 is invalid"),
    (lambda: InitialLossCheck(tolerance=0.0), "`tolerance`=0.0 is invalid"),
    (lambda: InitialLossCheck(num_classes=1), "`num_classes`=1 is invalid"),
    (lambda: overfit_check(UserMLP(), num_batches=1), "exactly one of them"),
])
def test_bad_arguments_are_clear(build, message):
    with pytest.raises(InvalidArgumentError) as err:
        build()
    assert message in str(err.value)



# ---------------------------------------------------------------------------------------------------
# the shipped configs


def _fit_config(name: str, tmp_path, monkeypatch, epochs: int):
    from lightning_tricks.cli import build_cli

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "examples" / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(["fit", "--config", str(config), f"--trainer.max_epochs={epochs}", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false"])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, DeadUnitMonitor))
    return monitor, [str(w.message) for w in caught]


def test_huge_learning_rate_config_reports_many_dead_units_and_warns(tmp_path, monkeypatch):
    monitor, messages = _fit_config("monitoring_dead.yaml", tmp_path, monkeypatch, epochs=3)
    assert monitor.history["train"][-1]["overall"] > 0.3
    assert any(m.startswith("DeadUnitMonitor:") and "are dead after epoch" in m for m in messages)


def test_sane_config_reports_few_dead_units_and_no_warning(tmp_path, monkeypatch):
    monitor, messages = _fit_config("monitoring.yaml", tmp_path, monkeypatch, epochs=3)  # the ratio peaks in epoch 2
    assert all(r["overall"] < 0.1 for r in monitor.history["train"])
    assert not any(m.startswith(("DeadUnitMonitor:", "UpdateRatioMonitor:", "InitialLossCheck:")) for m in messages)


@pytest.mark.slow
def test_monitoring_config_under_real_ddp_with_two_processes(tmp_path):
    import csv

    from tests.helpers import REPO, run_cli

    proc = run_cli(["fit", "--config", str(REPO / "examples" / "monitoring.yaml"), "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
                   cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert "InitialLossCheck: the first training loss is" in output and ": ok (within 25%)" in output
    run = tmp_path / "runs" / "monitoring" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    dead = [float(r["dead_units/train/overall"]) for r in rows if r.get("dead_units/train/overall")]
    ratio = [float(r["update_ratio/median"]) for r in rows if r.get("update_ratio/median")]
    assert len(dead) == 2 and all(0.0 <= d < 0.1 for d in dead)
    assert ratio and all(1e-4 < r < 1e-2 for r in ratio)
    assert (run / "dead_units_train.png").stat().st_size > 1000
