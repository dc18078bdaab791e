"""The Lightning shell of lightning_tricks.init: WeightInit and ActivationStatistics."""

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tricks import ActivationStatistics, ImageClassifier, SyntheticDataModule, WeightInit
from lightning_tricks.core.batch import find_slot, get_item
from lightning_tricks.core.model_probe import batch_input as probe_batch_input
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.errors import BatchFormatError
from lightning_tricks.init import activation_statistics, select_modules
from lightning_tricks.init._measure import measurement_mode
from tests.helpers import REPO, cpu_trainer, run_cli, run_ddp


class UserNet(pl.LightningModule):
    """Written as a user writes one: list batches, plain F.cross_entropy, a tanh or ReLU MLP."""

    def __init__(self, activation: type[nn.Module] = nn.ReLU, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, width), activation(), nn.Linear(width, width),
                                 activation(), nn.Linear(width, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n=128, seed=0, batch_size=32, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g) * 3 + 1, torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch_size, shuffle=shuffle)


class Snapshot(Callback):
    """Records the weights and the global RNG state in setup (placed before/after WeightInit) and at fit start."""

    def __init__(self):
        self.setup_state = self.fit_start_state = self.rng = None

    def setup(self, trainer, pl_module, stage):
        self.setup_state = copy.deepcopy(pl_module.state_dict())
        self.rng = torch.get_rng_state()

    def on_fit_start(self, trainer, pl_module):
        self.fit_start_state = copy.deepcopy(pl_module.state_dict())


def _variances_at(model, state, x):
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    out = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: out.setdefault(n, o.var(unbiased=False).item()) and None)
             for n, m in select_modules(model)]
    with torch.no_grad(), measurement_mode(model):
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_in_setup_on_an_unmodified_module_with_list_batches(tmp_path):
    before, after = Snapshot(), Snapshot()
    init = WeightInit("lsuv", tol=0.02, num_batches=4)
    model = UserNet()
    model.train()
    cpu_trainer(tmp_path, max_steps=1, callbacks=[before, init, after]).fit(model, train_dataloaders=_loader())
    assert [r.name for r in init.lsuv_report] == ["net.1", "net.3", "net.5"]
    assert all(r.converged for r in init.lsuv_report)
    assert init.initialized_layers == ["net.1", "net.3", "net.5"]
    assert torch.equal(before.rng, after.rng)  # reading batches did not consume training's randomness
    held_out = _variances_at(model, after.setup_state, next(iter(_loader(n=512, seed=1, batch_size=512)))[0])
    assert all(abs(v - 1) < 0.25 for v in held_out.values()), held_out
    assert not torch.equal(before.setup_state["net.1.weight"], after.setup_state["net.1.weight"])
    assert torch.all(after.setup_state["net.1.bias"] == 0)


class _DictData(Dataset):
    def __init__(self, key="image"):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 16, generator=g) * 4, torch.randint(0, 3, (64,), generator=g)
        self.key = key

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"label": self.y[i], self.key: self.x[i]}


class DictNet(UserNet):
    key = "image"

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[self.key]), batch["label"])


def test_lsuv_takes_the_input_named_by_input_key(tmp_path):
    init = WeightInit("lsuv", input_key="image")
    cpu_trainer(tmp_path, max_steps=1, callbacks=[init]).fit(DictNet(), DataLoader(_DictData(), batch_size=32))
    assert all(r.converged for r in init.lsuv_report)
    with pytest.raises(BatchFormatError, match=r"WeightInit: `input_key`='img' is not in the batch"):
        cpu_trainer(tmp_path, max_steps=1, callbacks=[WeightInit("lsuv", input_key="img")]).fit(
            DictNet(), DataLoader(_DictData(), batch_size=32))


class _InputRecorder(Callback):
    """Records every tensor the model's forward receives, and where TTA's probe and Cutout find the images."""

    def __init__(self):
        self.forward_inputs, self.probe_images, self.cutout_images = [], None, None

    def setup(self, trainer, pl_module, stage):
        pl_module.net.register_forward_pre_hook(lambda m, args: self.forward_inputs.append(args[0].detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.probe_images is None:
            self.probe_images = probe_batch_input(batch).clone()
            if "image" in batch:
                self.cutout_images = get_item(batch, find_slot(batch, None, "images", "Cutout")).clone()


@pytest.mark.parametrize("key", ["image", "features"])
def test_a_dict_batch_reaches_lsuv_and_activation_statistics_as_it_reaches_the_other_tricks(tmp_path, key):
    """{"label": ..., key: ...}: the label comes first; an image-like key wins, else the first float tensor."""
    recorder = _InputRecorder()
    init, stats = WeightInit("lsuv", num_batches=1), ActivationStatistics(plot=False, bins=0)
    model = DictNet()
    model.key = key
    cpu_trainer(tmp_path, max_steps=1, callbacks=[recorder, init, stats]).fit(
        model, DataLoader(_DictData(key), batch_size=32))
    images = _DictData().x[:32]
    assert torch.equal(recorder.forward_inputs[0], images)  # LSUV's forward pass, in setup
    assert torch.equal(recorder.probe_images, images)  # what TestTimeAugmentation's probe looks for
    if key == "image":
        assert torch.equal(recorder.cutout_images, images)
    assert torch.equal(stats._inputs, images)
    assert all(r.converged for r in init.lsuv_report)


def test_kaiming_with_zero_init_residual_on_the_zoo_resnet(tmp_path):
    after = Snapshot()
    model = ImageClassifier("resnet20", in_channels=3, backbone_kwargs={"width": 8}, schedule="none")
    data = SyntheticDataModule(num_samples=16, image_shape=[3, 8, 8], batch_size=8)
    init = WeightInit("kaiming_normal", mode="fan_out", bias=0.01, zero_init_residual=True, include=["model.layer*"])
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[init, after]).fit(model, datamodule=data)
    state = after.setup_state
    assert len(init.initialized_layers) == 18 and all(n.startswith("model.layer") for n in init.initialized_layers)
    for name in init.initialized_layers:
        w = state[f"{name}.weight"]
        assert w.var().item() == pytest.approx(2 / (w.shape[0] * 9), rel=0.25)
    bn2 = [k for k in state if k.endswith("bn2.weight")]
    assert len(bn2) == 9 and all(torch.all(state[k] == 0) for k in bn2)
    assert torch.all(state["model.bn1.weight"] == 1) and torch.all(state["model.layer1.0.bn1.weight"] == 1)


def test_no_reinit_for_validate_or_a_second_fit(tmp_path):
    model, init = UserNet(), WeightInit("normal", std=0.5)
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[init])
    trainer.fit(model, train_dataloaders=_loader())
    trained = copy.deepcopy(model.state_dict())
    assert init.skipped is None
    probe = Snapshot()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[init, probe])
    trainer.validate(model, dataloaders=_loader())
    trainer.fit(model, train_dataloaders=_loader())
    assert "initialized by an earlier fit" in init.skipped
    assert all(torch.equal(trained[k], v) for k, v in probe.setup_state.items())


def test_resume_keeps_the_checkpoint_weights_and_does_not_reinitialize(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cpu_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[WeightInit("kaiming_normal"), ckpt]).fit(
        UserNet(), train_dataloaders=_loader())
    saved = torch.load(ckpt.last_model_path, weights_only=True)
    fresh = UserNet()
    constructed = copy.deepcopy(fresh.state_dict())
    init, probe = WeightInit("lsuv"), Snapshot()
    cpu_trainer(tmp_path, max_steps=4, callbacks=[init, probe]).fit(fresh, train_dataloaders=_loader(),
                                                                     ckpt_path=ckpt.last_model_path)
    assert init.skipped.startswith("resuming from") and init.lsuv_report == []
    # setup cannot know it resumes (Lightning names the checkpoint only after setup): it initializes, and the
    # restore that follows replaces every initialized weight with the checkpoint's
    assert any(not torch.equal(constructed[k], v) for k, v in probe.setup_state.items())
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in probe.fit_start_state.items())  # restored as saved
    assert saved["callbacks"][WeightInit("kaiming_normal").state_key]["scheme"] == "kaiming_normal"


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"scheme": "xavier"}, r"`scheme`='xavier' is invalid: expected one of 'default', 'zeros'"),
    ({"scheme": "normal", "std": -1.0}, r"`std`=-1.0 is invalid"),
    ({"scheme": "lsuv", "tol": 0.0}, r"`tol`=0.0 is invalid"),
    ({"scheme": "lsuv", "max_iters": 0}, r"`max_iters`=0 is invalid"),
    ({"scheme": "lsuv", "num_batches": 0}, r"`num_batches`=0 is invalid"),
    ({"scheme": "kaiming_normal", "tol": 0.1}, r"`tol`=0.1 is invalid with scheme='kaiming_normal': it is used only by"),
    ({"include": "fc"}, r"`include`='fc' is invalid: expected a non-empty list"),
    ({"zero_init_residual": "yes"}, r"`zero_init_residual`='yes' is invalid"),
    ({"scheme": "lsuv", "input_key": 1.5}, r"`input_key`=1.5 is invalid"),
])
def test_weight_init_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        WeightInit(**kwargs)


@pytest.mark.parametrize(("init", "pattern"), [
    (WeightInit(include=["head*"]), r"WeightInit: `include` pattern 'head\*' matches no module: names look like 'net', 'net.0', 'net.1'"),
    (WeightInit(zero_init_residual=True), r"`zero_init_residual`=True found no residual block in UserNet"),
    (WeightInit("lsuv", layer_types=["Conv2d"]), r"`layer_types` entry 'Conv2d' matches no module of UserNet"),
])
def test_weight_init_fails_at_setup_naming_the_selector(tmp_path, init, pattern):
    with pytest.raises(InvalidArgumentError, match=pattern):
        cpu_trainer(tmp_path, max_steps=1, callbacks=[init]).fit(UserNet(), train_dataloaders=_loader())


class _ImageLogger(Logger):
    """A logger with W&B's ``log_image(key, images, step)``, recording the calls."""

    name, version = "images", 0

    def __init__(self):
        super().__init__()
        self.images, self.metrics = [], []

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


class _Writer:
    def __init__(self):
        self.figures = []

    def add_figure(self, tag, figure, global_step=None):
        self.figures.append((tag, type(figure).__name__, global_step))


class _TensorBoardLike(_ImageLogger):
    """A logger whose experiment has TensorBoard's ``add_figure``."""

    def __init__(self):
        super().__init__()
        self.writer = _Writer()

    @property
    def experiment(self):
        return self.writer


class FirstBatch(Callback):
    def __init__(self):
        self.state = self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch, self.state = batch[0].clone(), copy.deepcopy(pl_module.state_dict())


def test_activation_statistics_callback_logs_draws_and_measures_the_first_batch(tmp_path):
    first = FirstBatch()
    stats_cb = ActivationStatistics(every_n_epochs=2, bins=10, max_samples=20)
    model = UserNet(nn.Tanh)
    cpu_trainer(tmp_path, max_epochs=4, callbacks=[first, stats_cb], logger=CSVLogger(tmp_path),
                log_every_n_steps=1).fit(model, train_dataloaders=_loader())
    assert [(epoch, step) for epoch, step, _ in stats_cb.history] == [(0, 0), (1, 8), (3, 16)]
    reference = copy.deepcopy(model)
    reference.load_state_dict(first.state)
    expected = activation_statistics(reference, first.batch[:20], bins=10)
    assert [s.as_dict() for s in stats_cb.history[0][2]] == [s.as_dict() for s in expected]
    assert [s.name for s in expected] == ["net.2", "net.4"] and expected[0].saturated_fraction is not None
    pngs = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "activation_statistics").iterdir())
    assert pngs == ["epoch000_step000000.png", "epoch001_step000008.png", "epoch003_step000016.png"]
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # the first measurement is a step metric, sent with the first logged step; the later ones end their epochs
    logged = [row for row in rows if row.get("activation_stats/net.2/std")]
    # (Lightning sends a step metric again at the epoch's later logging steps, until the epoch ends)
    assert [int(row["step"]) for row in logged] == [0, 1, 2, 3, 7, 15]
    assert float(logged[0]["activation_stats/net.2/std"]) == pytest.approx(expected[0].std)
    assert float(logged[0]["activation_stats/net.4/saturated_fraction"]) == pytest.approx(expected[1].saturated_fraction)


def test_activation_statistics_sends_the_figure_to_image_loggers(tmp_path):
    board, wandb_like = _TensorBoardLike(), _ImageLogger()
    callback = ActivationStatistics(every_n_epochs=0, bins=5, plot_dir=str(tmp_path / "figs"))
    cpu_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=[board, wandb_like], log_every_n_steps=1).fit(
        UserNet(), train_dataloaders=_loader())
    assert board.writer.figures == [("activation_statistics", "Figure", 0)] and board.images == []
    path = str(tmp_path / "figs" / "epoch000_step000000.png")
    assert wandb_like.images == [("activation_statistics", [path], 0)]
    assert any("activation_stats/net.2/zero_fraction" in m for _, m in wandb_like.metrics)


def test_activation_statistics_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError, match=r"`every_n_epochs`=-1 is invalid"):
        ActivationStatistics(every_n_epochs=-1)
    with pytest.raises(InvalidArgumentError, match=r"`max_samples`=0 is invalid"):
        ActivationStatistics(max_samples=0)
    with pytest.raises(InvalidArgumentError, match=r"`layer_types`=\[\] is invalid"):
        ActivationStatistics(layer_types=[])


# ------------------------------------------------------------------------------------------------ DDP


class RankData(pl.LightningDataModule):
    """Each rank's loader holds different data (and is built before DistributedSampler could align them)."""

    def train_dataloader(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(64, 16, generator=g) * (1 + 2 * rank)
        return DataLoader(TensorDataset(x, torch.randint(0, 3, (64,), generator=g)), batch_size=32)


class RankSeed(Callback):
    """Seeds each rank differently before WeightInit, as a run without seed_everything may be."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)
        self.first = next(iter(trainer.datamodule.train_dataloader()))[0]


@pytest.mark.slow
def test_ddp_ranks_end_bit_identical_after_lsuv_with_different_data_and_seeds(tmp_path):
    seed, init, snapshot, stats = RankSeed(), WeightInit("lsuv", tol=0.02), Snapshot(), ActivationStatistics(bins=8)

    def probe(trainer, module):
        return {"setup": snapshot.setup_state, "batch": seed.first, "lsuv": [r.variance for r in init.lsuv_report],
                "initial_stats": [s.as_dict() for s in stats.history[0][2]]}

    ranks = run_ddp(UserNet(), RankData(), tmp_path=tmp_path, probe=probe, max_steps=1,
                    callbacks=[seed, init, snapshot, stats])
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"])
    assert ranks[0]["setup"].keys() == ranks[1]["setup"].keys()
    for key, value in ranks[0]["setup"].items():
        assert torch.equal(value, ranks[1]["setup"][key]), key
    assert ranks[0]["lsuv"] == ranks[1]["lsuv"] and all(abs(v - 1) < 0.02 for v in ranks[0]["lsuv"])
    assert ranks[0]["initial_stats"] == ranks[1]["initial_stats"]  # all-reduced over both ranks' batches
    assert ranks[0]["initial_stats"][0]["numel"] == 2 * 32 * 32


@pytest.mark.slow
def test_example_config_under_ddp_cli(tmp_path):
    out = tmp_path / "report"
    run_cli(["fit", "--config", str(REPO / "examples" / "init.yaml"), "--trainer.strategy=ddp", "--trainer.devices=2",
             "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.callbacks+=tests.helpers.RankReport",
             f"--trainer.callbacks.out_dir={out}"], cwd=tmp_path)
    import json

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["world_size"] == 2 and reports[0]["first_weight"] == reports[1]["first_weight"]
    assert reports[0]["metrics"]["val_acc"] > 0.3
    assert len(list((tmp_path / "runs" / "init").glob("version_*/activation_statistics/*.png"))) == 1


# ------------------------------------------------------------------------------------------------ renamed arguments


def _public_state(callback):
    return {k: v for k, v in vars(callback).items() if not k.startswith("_") and k != "randomness"}


@pytest.mark.parametrize(("cls", "kwargs", "old", "new", "value", "conflict"), [
    (WeightInit, {"scheme": "lsuv"}, "batch_key", "input_key", "image", ("image", "x")),
    (ActivationStatistics, {}, "batch_key", "input_key", 1, (1, 0)),
    (ActivationStatistics, {}, "save_figure", "plot", False, (True, False)),  # plot=True is the default: not a conflict
    (ActivationStatistics, {}, "figure_dir", "plot_dir", "figs", ("figs", "other")),
])
def test_an_old_argument_name_warns_and_means_the_new_one(cls, kwargs, old, new, value, conflict):
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}: `{old}` is renamed `{new}`.*write {new}="):
        renamed = cls(**kwargs, **{old: value})
    assert _public_state(renamed) == _public_state(cls(**kwargs, **{new: value}))
    assert getattr(renamed, new) == value
    with pytest.raises(InvalidArgumentError, match=rf"`{old}`=.* and `{new}`=.* are the same argument"):
        cls(**kwargs, **{old: conflict[0], new: conflict[1]})


def test_activation_statistics_renamed_plot_dir_is_where_the_figure_goes(tmp_path):
    with pytest.warns(DeprecationWarning, match="`figure_dir` is renamed `plot_dir`"):
        callback = ActivationStatistics(every_n_epochs=0, bins=5, figure_dir=str(tmp_path / "figs"))
    cpu_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(UserNet(nn.Tanh), train_dataloaders=_loader())
    assert callback.figure_path(0, 0) == tmp_path / "figs" / "epoch000_step000000.png" and callback.figure_path(0, 0).exists()


# ------------------------------------------------------------------------------------------------ metrics


class _AfterInit(Callback):
    """Placed after WeightInit: the weights as initialized, and the first training batch's input."""

    def __init__(self):
        self.state = self.batch = None

    def setup(self, trainer, pl_module, stage):
        self.state = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch[0].clone()


@pytest.mark.parametrize("scheme", ["kaiming_normal", "lsuv"])
def test_weight_init_and_activation_statistics_log_through_pl_module_log(tmp_path, scheme):
    init, after, stats = WeightInit(scheme), _AfterInit(), ActivationStatistics(every_n_epochs=0, bins=0, plot=False)
    model = UserNet(nn.Tanh)
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[init, after, stats])
    trainer.fit(model, train_dataloaders=_loader(shuffle=False))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    expected = {f"weight_init/{name}/std": after.state[f"{name}.weight"].std().item() for name in ("net.1", "net.3", "net.5")}
    if scheme == "lsuv":
        for r in init.lsuv_report:
            expected[f"weight_init/{r.name}/lsuv_variance"] = r.variance
            expected[f"weight_init/{r.name}/lsuv_iterations"] = float(r.iterations)
    reference = copy.deepcopy(model)
    reference.load_state_dict(after.state)  # the first batch's weights are the initialized ones
    for s in activation_statistics(reference, after.batch, bins=0):
        expected[f"activation_stats/{s.name}/mean"], expected[f"activation_stats/{s.name}/std"] = s.mean, s.std
        expected[f"activation_stats/{s.name}/zero_fraction"] = s.zero_fraction
        expected[f"activation_stats/{s.name}/saturated_fraction"] = s.saturated_fraction
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_monitoring_the_latest_activation_statistics_with_model_checkpoint(tmp_path):
    """An epoch's measurement is an epoch metric: ModelCheckpoint monitors it (it could not read the logger's)."""
    stats = ActivationStatistics(every_n_epochs=1, bins=0, plot=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="activation_stats/net.2/std", mode="max")
    model = UserNet(nn.Tanh)
    trainer = cpu_trainer(tmp_path, max_epochs=2, callbacks=[stats, checkpoint], enable_checkpointing=True)
    trainer.fit(model, train_dataloaders=_loader())
    last = activation_statistics(model, stats._inputs, bins=0)
    assert float(trainer.callback_metrics["activation_stats/net.2/std"]) == pytest.approx(last[0].std, rel=1e-5)
    assert float(checkpoint.best_model_score) == pytest.approx(max(h[2][0].std for h in stats.history[1:]), rel=1e-5)


def test_log_false_logs_nothing(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[WeightInit(log=False), ActivationStatistics(
        every_n_epochs=0, bins=0, plot=False, log=False)])
    trainer.fit(UserNet(), train_dataloaders=_loader())
    assert not any(k.startswith(("weight_init/", "activation_stats/")) for k in trainer.callback_metrics)
