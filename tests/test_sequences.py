"""Every trick on sequences ``[B, C, L]`` (the 1D zoo models) and flat ``[B, F]`` inputs: the meaning a user expects
(Cutout masks a span, CutMix pastes one, TTA shifts along the length, ...), or a one-line refusal naming the input
the trick needs. References are formulas or brute force, never "it ran".
"""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tricks as lt
from lightning_tricks.core.layout import LayoutError, input_layout
from lightning_tricks.core.surgery import ModelNotSupportedError
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.init.lsuv_init import lsuv
from lightning_tricks.init.schemes import zero_init_residual
from lightning_tricks.monitoring.dead_units import DeadUnitTracker
from lightning_tricks.regularization.cutout import cutout_span
from lightning_tricks.regularization.mixup import apply_mix, sample_mix_plan
from lightning_tricks.regularization.stochastic_depth import (
    DEFAULT_WARMUP_FRACTION,
    stochastic_depth_blocks,
    warmup_ramp,
)
from lightning_tricks.setup.bn_folding import fold_batch_norm
from lightning_tricks.setup.preprocessing import fit_statistics
from lightning_tricks.tta.config import TTAConfig
from lightning_tricks.tta.core import merge_predictions
from lightning_tricks.tta.sequence import apply_sequence_view, sequence_tta_forward
from lightning_tricks.zoo import ImageClassifier, build_backbone
from tests.helpers import cpu_trainer

L = 40


def _loader(n: int = 64, batch: int = 16, flat: bool = False, ones: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 1, L) if ones else torch.randn(n, 1, L, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x.flatten(1) if flat else x, y), batch_size=batch)


class _Seen(Callback):
    """Records the (already transformed) training inputs, after the tricks listed before it."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].clone())


def _fit(backbone: str, callbacks: list, tmp_path, loader: DataLoader | None = None, steps: int = 2, **model_kw):
    model = ImageClassifier(backbone, optimizer="adam", lr=1e-3, schedule="none", **model_kw)
    trainer = cpu_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=loader or _loader())
    return model, trainer


# -- layout --------------------------------------------------------------------------------------------------------


def test_layout_is_read_from_the_model_and_ambiguity_is_refused():
    assert input_layout(torch.zeros(2, 1, L), build_backbone("mnist1d_cnn", 10, 1)) == "sequence"
    assert input_layout(torch.zeros(2, 1, L), build_backbone("mnist1d_gru", 10, 1)) == "sequence"
    assert input_layout(torch.zeros(2, 8, 8), build_backbone("simple_cnn", 10, 1)) == "image"
    assert input_layout(torch.zeros(2, L)) == "flat"
    assert input_layout(torch.zeros(2, L), layout="sequence") == "sequence"
    with pytest.raises(LayoutError, match="set layout='image' or layout='sequence'"):
        input_layout(torch.zeros(2, 1, L), build_backbone("mnist1d_mlp", 10, 1))


# -- Cutout ----------------------------------------------------------------------------------------------------------


def test_cutout_span_is_exactly_length_zeros_at_one_place_per_sample():
    x = torch.ones(256, 3, L)
    out = cutout_span(x, 8, generator=torch.Generator().manual_seed(0))
    centers = torch.randint(0, L, (256, 1), generator=torch.Generator().manual_seed(0))[:, 0]  # the same draw
    for i in range(256):
        start = int(centers[i]) - 4
        expected = torch.ones(L)
        expected[max(0, start):max(0, start + 8)] = 0
        for c in range(3):  # every channel, the same span
            assert torch.equal(out[i, c], expected)
    assert ((out == 0).sum(dim=(1, 2)) == 3 * 8).float().mean() > 0.7  # most spans are not clipped by an end
    flat = cutout_span(torch.ones(4, L), 0.25, generator=torch.Generator().manual_seed(1))  # (N, L); 25% of L
    assert ((flat == 0).sum(1) <= 10).all() and ((flat == 0).sum(1) > 0).all()
    assert torch.equal(cutout_span(x, 8, p=0.0), x)


def test_cutout_callback_masks_a_span_on_the_1d_model_and_flat_inputs(tmp_path):
    seen = _Seen()
    _fit("mnist1d_cnn", [lt.Cutout(length=8, seed=0), seen], tmp_path, _loader(ones=True))
    for batch in seen.inputs:
        for row in batch[:, 0]:
            zeros = (row == 0).nonzero().flatten()
            assert 1 <= len(zeros) <= 8 and torch.equal(zeros, torch.arange(zeros[0], zeros[0] + len(zeros)))
    seen = _Seen()
    _fit("mnist1d_mlp", [lt.Cutout(length=8, layout="sequence", seed=0), seen], tmp_path, _loader(flat=True, ones=True))
    assert seen.inputs[0].shape == (16, L) and ((seen.inputs[0] == 0).sum(1) <= 8).all()
    assert ((seen.inputs[0] == 0).sum(1) > 0).all()
    with pytest.raises(LayoutError, match="layout="):  # an MLP on (N, 1, L): images (N, H, W) or sequences?
        _fit("mnist1d_mlp", [lt.Cutout(length=8)], tmp_path)


# -- Mixup / CutMix --------------------------------------------------------------------------------------------------


def test_mixup_blends_sequences_and_cutmix_pastes_a_span_across_channels():
    x = torch.randn(32, 2, L, generator=torch.Generator().manual_seed(0))
    plan = sample_mix_plan(32, alpha=0.4, mode="sample", generator=torch.Generator().manual_seed(1))
    lam = plan.lam.view(-1, 1, 1)
    torch.testing.assert_close(apply_mix(x, plan), lam * x + (1 - lam) * x[plan.perm])
    plan = sample_mix_plan(32, (2, L), alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, mode="sample",
                           generator=torch.Generator().manual_seed(2), sequence=True)
    out = apply_mix(x, plan)
    for i in range(32):
        pasted = (out[i] != x[i]).any(dim=0)  # steps where anything changed
        top, left, bottom, right = plan.boxes[i].tolist()
        assert (top, bottom) == (0, 2)  # all channels
        expected = torch.zeros(L, dtype=torch.bool)
        expected[left:right] = True
        assert torch.equal(pasted, expected & (x[i] != x[plan.perm[i]]).any(dim=0))
        torch.testing.assert_close(out[i][:, left:right], x[plan.perm[i]][:, left:right])
        assert plan.lam[i].item() == pytest.approx(1 - (right - left) / L)


def test_cutmix_callback_on_the_1d_model(tmp_path):
    seen = _Seen()
    loader = DataLoader(TensorDataset(torch.arange(16.0).view(16, 1, 1).expand(16, 1, L).contiguous(),
                                      torch.arange(16) % 10), batch_size=16)
    _fit("mnist1d_cnn", [lt.Mixup(alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, seed=0), seen], tmp_path, loader,
         steps=1)
    (batch,) = seen.inputs
    # each row is its own constant with one span (possibly empty) of one partner's constant
    for row in batch[:, 0]:
        values = row.unique()
        assert len(values) <= 2
        if len(values) == 2:
            foreign = (row != row[0]) if (row == row[0]).sum() > (row == row[-1]).sum() else (row != row[-1])
            idx = foreign.nonzero().flatten()
            assert torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))


# -- TTA ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate", "reflect"])
def test_tta_shift_view_equals_a_padded_roll_along_the_length(padding_mode):
    x = torch.randn(3, 2, L)
    config = TTAConfig(views=["translate"], translate=3, padding_mode=padding_mode)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = F.pad(x, (3, 3), mode=mode)
    for dx in (-3, 3):
        expected = padded[..., 3 - dx:3 - dx + L]
        assert torch.equal(apply_sequence_view(x, ("shift", dx, False), config), expected)
    zeros = TTAConfig(views=["translate"], translate=3, padding_mode="zeros")
    assert torch.equal(apply_sequence_view(x, ("shift", 3, False), zeros)[..., 3:], torch.roll(x, 3, -1)[..., 3:])
    crops = TTAConfig(views=["five_crop"], crop_size=30)
    assert torch.equal(apply_sequence_view(x, ("crop", "right", False), crops), x[..., 10:])
    assert torch.equal(apply_sequence_view(x, ("crop", "center", True), crops), x[..., 5:35].flip(-1))


def test_tta_on_the_1d_model_merges_the_shift_views_and_refuses_the_default_flip():
    model = build_backbone("resnet1d_8", 10, 1).eval()
    x = torch.randn(5, 1, L)
    config = TTAConfig(views=["translate", "hflip"], translate=2)
    merged = sequence_tta_forward(model, x, config)
    views = [apply_sequence_view(x, ("shift", d, f), config) for d in (-2, 0, 2) for f in (False, True)]
    with torch.no_grad():
        reference = merge_predictions(torch.stack([model(v) for v in views]), "mean", "classification")
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="default view 'hflip'"):
        lt.TTAWrapper(model)(x)
    with pytest.raises(ConfigError, match="no meaning along one axis"):
        lt.TTAWrapper(model, views=["vflip"])(x)
    wrapped = lt.TTAWrapper(model, views=["translate"], translate=2)
    with torch.no_grad():
        reference = merge_predictions(torch.stack([model(apply_sequence_view(x, ("shift", d, False), config))
                                                   for d in (-2, 0, 2)]), "mean", "classification")
        torch.testing.assert_close(wrapped(x), reference, atol=1e-5, rtol=1e-5)


# -- structural tricks on the 1D ResNet and the paper's models -----------------------------------------------------


def test_stochastic_depth_converts_the_1d_resnet_blocks_and_skips_branches(tmp_path):
    callback = lt.StochasticDepth(0.5, rule="uniform", warmup_steps=0, seed=0)
    kept = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept.append([b.lt_last_kept for b in stochastic_depth_blocks(pl_module)])

    model, _ = _fit("resnet1d", [callback, Record()], tmp_path, steps=8)
    assert len(stochastic_depth_blocks(model)) == 9
    decisions = [k for step in kept for k in step]
    assert True in decisions and False in decisions  # p = 0.5: both happen over 72 draws


def test_stochastic_depth_warmup_follows_the_formula(tmp_path):
    """p_l(t) = p_l * min(1, t / W), W = round(fraction * total batches), or W = warmup_steps."""
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([b.lt_drop_prob for b in stochastic_depth_blocks(pl_module)])

    callback = lt.StochasticDepth(0.5, warmup_fraction=0.5, seed=0)  # 12 batches: W = 6
    _fit("resnet1d_8", [callback, Record()], tmp_path, _loader(n=48, batch=4), steps=12)
    targets = [0.5 * (i + 1) / 3 for i in range(3)]  # linear rule, 3 blocks
    assert callback.warmup_batches == 6
    for t, probs in enumerate(seen):
        assert probs == pytest.approx([p * warmup_ramp(t, 6) for p in targets])
        assert probs == pytest.approx([p * min(1.0, t / 6) for p in targets])
    seen.clear()
    _fit("resnet1d_8", [lt.StochasticDepth(0.5, warmup_steps=2, seed=0), Record()], tmp_path, steps=4)
    assert [s[-1] for s in seen] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert lt.StochasticDepth().warmup_fraction == DEFAULT_WARMUP_FRACTION > 0  # on by default


def test_stochastic_depth_warmup_resumes_from_the_checkpointed_count(tmp_path):
    """An interrupted run resumes the ramp where it stopped, with the ramp length of its first fit (checkpointed)."""
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(stochastic_depth_blocks(pl_module)[-1].lt_drop_prob)

    class StopAfterOneEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def fit(epochs, extra=(), ckpt_path=None):
        model = ImageClassifier("resnet1d_8", optimizer="adam", lr=1e-3, schedule="none")
        callback = lt.StochasticDepth(0.5, warmup_fraction=1.0, seed=0)
        trainer = cpu_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0,
                              callbacks=[callback, Record(), *extra])
        trainer.fit(model, train_dataloaders=_loader(n=32, batch=8), ckpt_path=ckpt_path)  # 4 batches an epoch
        return trainer, callback

    fit(2)  # uninterrupted: W = 8 batches
    full = list(seen)
    assert full == pytest.approx([0.5 * t / 8 for t in range(8)])
    seen.clear()
    first, callback = fit(2, extra=[StopAfterOneEpoch()])  # interrupted after 4 batches
    assert callback.warmup_batches == 8 and callback.state_dict()["warmup_batches"] == 8
    first.save_checkpoint(tmp_path / "mid.ckpt")
    seen.clear()
    fit(2, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert seen == pytest.approx(full[4:])  # the ramp continues where it stopped
    seen.clear()
    _, longer = fit(4, ckpt_path=str(tmp_path / "mid.ckpt"))  # a longer run keeps the first fit's ramp length
    assert longer.warmup_batches == 8 and seen[:4] == pytest.approx(full[4:])


def test_zero_init_residual_and_lsuv_on_conv1d():
    net = build_backbone("resnet1d", 10, 1)
    assert len(zero_init_residual(net)) == 9
    zeroed = [m.bn2.weight for m in net.modules() if isinstance(m, lt.zoo.BasicBlock1d)]
    assert len(zeroed) == 9 and all(torch.equal(w, torch.zeros_like(w)) for w in zeroed)
    cnn = build_backbone("mnist1d_cnn", 10, 1)
    x = torch.randn(256, 1, L, generator=torch.Generator().manual_seed(0))
    layers = lsuv(cnn, x, generator=torch.Generator().manual_seed(0))
    assert [layer.name for layer in layers] == ["conv1", "conv2", "conv3", "fc"]
    outputs = {}
    hooks = [getattr(cnn, n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in
             ("conv1", "conv2", "conv3", "fc")]
    with torch.no_grad():
        cnn(x)
    for h in hooks:
        h.remove()
    for name, out in outputs.items():  # brute force: the variance of each layer's output is 1 +- tol
        assert abs(out.var().item() - 1) < 0.1, name


def test_dead_units_are_counted_per_conv1d_channel():
    cnn = build_backbone("mnist1d_cnn", 10, 1)
    with torch.no_grad():
        cnn.conv1.bias[:5] = -1e4  # 5 of the 25 channels never fire
        cnn.conv1.bias[5:] = 1e4  # the others always do
    with DeadUnitTracker(cnn) as tracker:
        for seed in range(3):
            cnn(torch.randn(8, 1, L, generator=torch.Generator().manual_seed(seed)))
    report = tracker.report()
    assert report.sites["act1"].units == 25
    assert report.fractions()["act1"] == pytest.approx(5 / 25)


def test_activation_swap_and_statistics_on_the_1d_cnn(tmp_path):
    swap = lt.ActivationSwap("leaky_relu")
    stats = lt.ActivationStatistics()
    model, _ = _fit("mnist1d_cnn", [swap, stats], tmp_path)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert len(acts) == 3 and all(isinstance(m, nn.LeakyReLU) for m in acts)


def test_standardize_is_per_channel_over_the_length():
    x = torch.randn(100, 3, L) * torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1) + torch.tensor([0.0, 1.0, -3.0]).view(1, 3, 1)
    stats = fit_statistics(x.split(32), "channel")
    torch.testing.assert_close(stats.mean.flatten().float(), x.mean(dim=(0, 2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.std.flatten().float(), x.std(dim=(0, 2), unbiased=False), atol=1e-3, rtol=1e-3)


def test_fold_batch_norm_with_conv1d_and_batchnorm1d():
    net = build_backbone("resnet1d_8", 10, 1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, L))  # running statistics that are not the identity
    net.eval()
    x = torch.randn(4, 1, L)
    folded = fold_batch_norm(net, x)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)


def test_dropconnect_on_the_flat_mlp_and_refusals_of_image_only_tricks(tmp_path):
    model, _ = _fit("mnist1d_mlp", [lt.DropConnect(0.3, seed=0)], tmp_path, _loader(flat=True))
    assert isinstance(model.model.fc1, lt.DropConnectLinear) and isinstance(model.model.fc2, lt.DropConnectLinear)
    with pytest.raises(ModelNotSupportedError, match="fractional max pooling exists only in 2D and 3D"):
        _fit("mnist1d_cnn", [lt.FractionalMaxPooling()], tmp_path)
    with pytest.raises(LayoutError, match=r"BatchAugment needs images \(N, C, H, W\)"):
        _fit("resnet1d_8", [lt.BatchAugment()], tmp_path)


# -- transfer and ensembles ------------------------------------------------------------------------------------------


def test_finetune_loads_a_1d_checkpoint_replaces_the_head_and_freezes_the_rest(tmp_path):
    source, trainer = _fit("resnet1d_8", [], tmp_path)
    ckpt = tmp_path / "pretrained.ckpt"
    trainer.save_checkpoint(ckpt)
    x, y = _loader().dataset.tensors
    five = DataLoader(TensorDataset(x, y % 5), batch_size=16)
    model, _ = _fit("resnet1d_8", [lt.Finetune(train="head", num_classes=5, weights=str(ckpt))], tmp_path, five,
                    num_classes=5, steps=1)
    assert model.model.fc.out_features == 5
    torch.testing.assert_close(model.model.conv1.weight, source.model.conv1.weight)  # loaded, then frozen
    assert not model.model.conv1.weight.requires_grad and model.model.fc.weight.requires_grad


def test_ensemble_soft_votes_1d_members(tmp_path):
    members = [ImageClassifier(b, schedule="none").eval() for b in ("mnist1d_cnn", "resnet1d_8")]
    x = torch.randn(6, 1, L)
    ensemble = lt.Ensemble(members=members, voting="soft")
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
        out = ensemble(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # the mean of the members' probabilities
