"""Stochastic depth: block discovery, schedule, E[train] = test, skipped compute, DDP agreement, errors."""

import copy
from types import SimpleNamespace
from unittest.mock import Mock

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_tricks import StochasticDepth
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization.stochastic_depth import (
    apply_stochastic_depth,
    drop_probabilities,
    drop_residual,
    recalibrate_batch_norm,
    stochastic_depth_blocks,
)
from lightning_tricks.zoo import build_backbone
from tests.helpers import cpu_trainer, run_ddp
from tests.structural_user_module import TinyResNet, digits_loader
from tests.user_module import UserModule


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16), ("timm:resnet18", 8),
                                         ("timm:resnet26", 8), ("resnet56", 27)])
def test_wraps_exactly_the_residual_blocks(name, blocks):
    model = build_backbone(name, num_classes=10)
    keys = list(model.state_dict())
    report = apply_stochastic_depth(model, 0.5)
    assert report.total == blocks == len(stochastic_depth_blocks(model))
    assert list(model.state_dict()) == keys


def test_drop_rate_schedule_matches_the_formula():
    model = build_backbone("resnet56")
    apply_stochastic_depth(model, 0.5)
    probs = [b.lt_drop_prob for b in stochastic_depth_blocks(model)]
    assert probs == pytest.approx([0.5 * l / 27 for l in range(1, 28)])  # noqa: E741
    assert [b.lt_index for b in stochastic_depth_blocks(model)] == list(range(27))
    apply_stochastic_depth(model, 0.2, rule="uniform")  # re-applying reconfigures, idempotently
    assert {b.lt_drop_prob for b in stochastic_depth_blocks(model)} == {0.2}
    assert drop_probabilities(4, 0.4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def _scaled_last_bn(block, last_bn, scale):
    """Reference: the original block with its branch multiplied by ``scale`` (via its last BN's affine)."""
    ref = copy.deepcopy(block)
    ref.__class__ = type(block).__lt_base__
    bn = ref.get_submodule(last_bn)
    with torch.no_grad():
        bn.weight.mul_(scale)
        bn.bias.mul_(scale)
    return ref


@pytest.mark.parametrize("scaling", ["test", "train"])
@pytest.mark.parametrize("name,path,last_bn", [("resnet18", "layer2.0", "bn2"), ("resnet50", "layer2.0", "bn3"),
                                               ("timm:resnet18", "layer2.0", "bn2"),
                                               ("timm:resnet26", "layer1.1", "bn3"),
                                               ("resnet20", "layer2.0", "bn2")])
def test_kept_skipped_and_eval_blocks_equal_the_original_block_scaled(name, path, last_bn, scaling):
    """Training: act(s * branch + shortcut) when kept (s = 1/(1-p) for inverted scaling, else 1), act(shortcut)
    when skipped; eval: act((1-p) * branch + shortcut) for the paper's scaling, the original block otherwise."""
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10)
    block = model.get_submodule(path)
    apply_stochastic_depth(model, 0.5, include=[path], scaling=scaling)
    block.eval()  # BN uses running statistics, so the reference is comparable; our forward checks .training:
    p = block.lt_drop_prob
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    kept_scale = 1 / (1 - p) if scaling == "train" else 1.0
    for kept, scale in ((True, kept_scale), (False, 0.0)):
        block.lt_randomness.step = next(s for s in range(100) if _decision(block, s) == kept)
        block.training = True  # only the block's flag: its BN submodules stay in eval
        out = block(x)
        block.training = False
        assert block.lt_last_kept is kept
        assert torch.allclose(out, _scaled_last_bn(block, last_bn, scale)(x), atol=1e-5)
    eval_scale = 1 - p if scaling == "test" else 1.0
    reference = _scaled_last_bn(block, last_bn, eval_scale)(x)
    assert torch.allclose(block(x), reference, atol=1e-6)
    if scaling == "train":
        assert torch.equal(block(x), reference)  # exactly the original block


def _decision(block, step):
    randomness = block.lt_randomness
    randomness.step = step
    return randomness.uniform(block.lt_index) >= block.lt_drop_prob


class _LinearResidual(nn.Module):
    """A user block without a final activation: E[train output] must equal the eval output exactly."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))

    def residual(self, x):
        return self.branch(x)

    def forward(self, x):
        return self.residual(x) + x


@pytest.mark.parametrize("scaling", ["test", "train"])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_monte_carlo_expectation_of_training_equals_test(mode, scaling):
    torch.manual_seed(0)
    block = nn.Sequential(_LinearResidual())
    randomness = LayerRandomness(seed=2, per_rank=False)
    apply_stochastic_depth(block, 0.5, mode=mode, rule="uniform", scaling=scaling, include=["0"], randomness=randomness)
    x = torch.randn(1, 4)
    n = 4000
    with torch.no_grad():
        expected = block.eval()(x)
        block.train()
        if mode == "batch":
            outputs = []
            for step in range(n):
                randomness.step = step
                outputs.append(block(x))
            outputs = torch.cat(outputs)
        else:
            randomness.step = 0
            outputs = block(x.expand(n, 4))
        branch = block[0].branch(x)
    kept = 2.0 if scaling == "train" else 1.0  # each output is x + b * kept * branch, b ~ Bernoulli(0.5)
    tolerance = 4 * kept * 0.5 * branch.abs() / n ** 0.5 + 1e-6  # 4 standard deviations of the mean
    assert ((outputs.mean(0) - expected[0]).abs() <= tolerance[0]).all()
    assert set(torch.round((outputs - x) / branch, decimals=4).flatten().tolist()) == {0.0, kept}
    assert torch.allclose(expected, x + (0.5 if scaling == "test" else 1.0) * branch)


def test_batch_mode_skips_the_branch_compute_and_leaves_no_gradient():
    model = build_backbone("resnet20")
    randomness = LayerRandomness(seed=0, per_rank=False)
    apply_stochastic_depth(model, 0.5, randomness=randomness)
    blocks = stochastic_depth_blocks(model)
    calls = []
    for b in blocks:
        b.conv1.register_forward_hook(lambda module, args, out: calls.append(module))
    kept_total = 0
    for step in range(4):
        randomness.step = step
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        kept = [b.lt_last_kept for b in blocks]
        kept_total += sum(kept)
        for b, k in zip(blocks, kept, strict=True):
            assert (b.conv1.weight.grad is not None) is k  # a skipped block's parameters get no gradient
    assert len(calls) == kept_total < 4 * len(blocks)


def test_recalibrate_batch_norm_reads_dict_batches_like_tuples():
    torch.manual_seed(0)
    model = build_backbone("resnet20")
    apply_stochastic_depth(model, 0.5, scaling="train")
    twin = copy.deepcopy(model)
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    recalibrate_batch_norm(model, batches)
    recalibrate_batch_norm(twin, [{"label": y, "image": x} for x, y in batches])  # labels first: never read
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers(), strict=True))


def test_recalibrate_batch_norm_uses_the_test_time_network():
    """With inverted scaling the test-time network is the original one: the recalibrated statistics must be
    those of the plain model run over the same batches (cumulative average)."""
    torch.manual_seed(0)
    model = build_backbone("resnet20")
    plain = copy.deepcopy(model)
    apply_stochastic_depth(model, 0.5, scaling="train")
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(3)]
    weights = [p.detach().clone() for p in model.parameters()]
    model.eval()
    assert recalibrate_batch_norm(model, batches, max_batches=2) == 2
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        plain.train()
        for x, _ in batches[:2]:
            plain(x)
    for ours, ref in zip(model.buffers(), plain.buffers(), strict=True):
        assert torch.allclose(ours, ref, atol=1e-6)
    assert not model.training and all(not b.training for b in stochastic_depth_blocks(model))
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_warmup_ramps_the_drop_probabilities(tmp_path):
    model = TinyResNet()
    callback = StochasticDepth(p=0.4, rule="uniform", warmup_steps=4, seed=0)
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.blocks[0].lt_drop_prob)

    trainer = cpu_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[callback, Record()])
    trainer.fit(model, train_dataloaders=digits_loader(192))
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_functional_drop_residual_row_batch_and_scalings():
    r = torch.ones(1000, 3)
    rows = drop_residual(r, 0.25, "row", scaling="train", generator=torch.Generator().manual_seed(0))
    assert set(rows.unique().tolist()) == {0.0, torch.tensor(4 / 3).item()} and (rows == rows[:, :1]).all()
    assert 0.2 < (rows[:, 0] == 0).float().mean() < 0.3
    paper = drop_residual(r, 0.25, "row", scaling="test", generator=torch.Generator().manual_seed(0))
    assert torch.equal(paper * (4 / 3), rows)  # same mask, no training-time scaling
    whole = drop_residual(r, 0.25, "batch", generator=torch.Generator().manual_seed(1))
    assert whole.unique().numel() == 1
    assert torch.equal(drop_residual(r, 0.25, training=False, scaling="test"), r * 0.75)
    assert torch.equal(drop_residual(r, 0.25, training=False), r)  # the default is inverted scaling
    assert torch.equal(drop_residual(r, 0.0), r)


def test_a_pattern_on_a_stage_selects_the_blocks_inside_it():
    # 'layer1' is a Sequential, not a block: the shared vocabulary selects the convertible blocks inside it
    net = build_backbone("resnet20")
    assert apply_stochastic_depth(net, 0.5, include=["layer1"]).converted == ["layer1.0", "layer1.1", "layer1.2"]
    assert [round(b.lt_drop_prob, 4) for b in stochastic_depth_blocks(net)] == [0.1667, 0.3333, 0.5]


def test_errors_name_what_was_looked_for():
    with pytest.raises(ModelNotSupportedError, match="found no residual block in MLP: it looks for torchvision and timm"):
        apply_stochastic_depth(build_backbone("mlp", in_channels=1, image_size=8), 0.5)
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'fc1' matches only modules StochasticDepth cannot "
                                                   r"act on: 'fc1' \(Linear: not a residual block"):
        apply_stochastic_depth(TinyResNet(), 0.5, include=["fc1"])
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'layer9\.\*' matches no module"):
        apply_stochastic_depth(build_backbone("resnet20"), 0.5, include=["layer9.*"])
    with pytest.raises(ModelNotSupportedError, match="already apply timm's drop_path"):
        apply_stochastic_depth(build_backbone("timm:resnet18", drop_path_rate=0.1), 0.5)
    for kwargs, message in [(dict(p=1.0), r"`p`=1.0 is invalid: expected a number in \[0.0, 1.0\)"),
                            (dict(p=-0.5), "`p`=-0.5 is invalid"),
                            (dict(mode="block"), "`mode`='block' is invalid: expected one of 'batch', 'row'"),
                            (dict(rule="exp"), "`rule`='exp' is invalid"),
                            (dict(scaling="both"), "`scaling`='both' is invalid: expected one of 'test', 'train'"),
                            (dict(warmup_steps=-1), "`warmup_steps`=-1 is invalid")]:
        with pytest.raises(InvalidArgumentError, match=message):
            StochasticDepth(**kwargs)


def test_model_without_residual_blocks_fails_at_setup_before_training(tmp_path):
    model = UserModule()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[StochasticDepth()])
    with pytest.raises(ModelNotSupportedError, match="found no residual block in UserModule"):
        trainer.fit(model, train_dataloaders=digits_loader(32))
    assert trainer.global_step == 0


def _fit_start_under_ddp(callback, **ddp_flags):
    """Call on_fit_start as Lightning does once DDP has wrapped the model (a DDP stand-in with those flags)."""
    wrapped = Mock(spec=DistributedDataParallel, **ddp_flags)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped), world_size=2, global_rank=0)
    callback.on_fit_start(trainer, None)


def test_ddp_without_find_unused_parameters_or_with_static_graph_stops_before_the_first_step():
    """Batch mode leaves skipped blocks' parameters without gradient: DDP must look for unused parameters.
    The callback does not change the strategy (private state): it names the public setting to use."""
    converted = StochasticDepth()
    converted._blocks = [nn.Identity()]  # as after setup on a model with residual blocks
    _fit_start_under_ddp(converted, find_unused_parameters=True, static_graph=False)  # the right setting passes
    with pytest.raises(ModelNotSupportedError, match=r"find_unused_parameters=False \(Lightning's default\).*pass "
                                                     r"strategy=DDPStrategy\(find_unused_parameters=True\) \(CLI: "
                                                     r"--trainer.strategy=ddp_find_unused_parameters_true\)"):
        _fit_start_under_ddp(converted, find_unused_parameters=False, static_graph=False)
    with pytest.raises(ModelNotSupportedError, match=r"static_graph=True forbids: use DDPStrategy\(static_graph=False\) "
                                                     r"or StochasticDepth\(mode='row'\)"):
        _fit_start_under_ddp(converted, find_unused_parameters=True, static_graph=True)
    row = StochasticDepth(mode="row")
    row._blocks = [nn.Identity()]
    _fit_start_under_ddp(row, find_unused_parameters=False, static_graph=True)  # row mode computes every branch


class _RecordDecisions(Callback):
    def __init__(self):
        self.decisions, self.has_grad, self.find_unused = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.find_unused = trainer.strategy.model.find_unused_parameters  # the DDP wrapper's public flag

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.has_grad.append([b.conv1.weight.grad is not None for b in stochastic_depth_blocks(pl_module)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.decisions.append([b.lt_last_kept for b in stochastic_depth_blocks(pl_module)])


def _decisions_probe(trainer, module):
    recorder = next(c for c in trainer.callbacks if isinstance(c, _RecordDecisions))
    return {"decisions": recorder.decisions, "has_grad": recorder.has_grad, "weights": [p.detach().clone() for p in module.parameters()],
            "find_unused": recorder.find_unused}


def test_ddp_two_processes_same_decisions_on_every_rank_and_no_hang(tmp_path):
    model = build_backbone("resnet20", num_classes=10, in_channels=1)
    module = _ZooModule(model)
    results = run_ddp(module, tmp_path=tmp_path, probe=_decisions_probe, max_epochs=1, limit_val_batches=0,
                      strategy=DDPStrategy(start_method="fork", find_unused_parameters=True),
                      callbacks=[StochasticDepth(p=0.5, rule="uniform"), _RecordDecisions()])
    first, second = results
    assert len(first["decisions"]) == 2 and first["decisions"] == second["decisions"]
    assert not all(all(d) for d in first["decisions"])  # blocks were skipped (some parameters unused)
    assert first["find_unused"] is True
    assert first["has_grad"] == first["decisions"] == second["has_grad"]  # skipped: no gradient, as on one process
    for a, b in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(a, b)


class _ZooModule(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self):
        return digits_loader(128, batch_size=32)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_drop_rate_and_blocks_are_the_deprecated_names_of_p_and_include():
    torch.manual_seed(0)
    old_model, x = build_backbone("resnet20"), torch.randn(2, 3, 8, 8)
    new_model = copy.deepcopy(old_model)
    with pytest.warns(DeprecationWarning, match="StochasticDepth: `drop_rate` is renamed `p`"):
        old = apply_stochastic_depth(old_model, drop_rate=0.4, blocks=["layer2"], mode="row")
    new = apply_stochastic_depth(new_model, p=0.4, include=["layer2"], mode="row")
    assert old.converted == new.converted == ["layer2.0", "layer2.1", "layer2.2"]
    assert [b.lt_drop_prob for b in stochastic_depth_blocks(old_model)] == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])
    assert torch.equal(old_model.train()(x), new_model.train()(x))
    with pytest.warns(DeprecationWarning, match="`blocks` is renamed `include`"):
        callback = StochasticDepth(drop_rate=0.3, blocks=["layer1"])
    assert callback.init_args() == StochasticDepth(p=0.3, include=["layer1"]).init_args()
    assert callback.state_key == StochasticDepth(p=0.3, include=["layer1"]).state_key  # old checkpoints resume
    assert drop_probabilities(2, drop_rate=0.5) == drop_probabilities(2, 0.5) == [0.25, 0.5]
    with pytest.raises(InvalidArgumentError, match=r"`drop_rate`=0.3 and `p`=0.2 are the same argument"):
        StochasticDepth(drop_rate=0.3, p=0.2)
    with pytest.raises(InvalidArgumentError, match=r"`blocks`=\['a'\] and `include`=\['b'\] are the same argument"):
        StochasticDepth(blocks=["a"], include=["b"])


def test_exclude_leaves_the_matched_blocks_as_they_are():
    net = build_backbone("resnet20")
    report = apply_stochastic_depth(net, 0.5, exclude=["layer1", "layer3.2"])
    assert report.converted == ["layer2.0", "layer2.1", "layer2.2", "layer3.0", "layer3.1"]
    assert [b.lt_drop_prob for b in stochastic_depth_blocks(net)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
