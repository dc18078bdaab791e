import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks import Standardize
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.regularization import BatchFormatError
from lightning_tricks.setup.preprocessing import InputStatistics, MomentAccumulator, fit_statistics
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import ImageData, ListModule, Recorder


def digits_images() -> torch.Tensor:
    return torch.tensor(load_digits().images, dtype=torch.float64).unsqueeze(1)  # (1797, 1, 8, 8), 0..16


def reference(x: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """One pass over the whole set at once (the definitions, not the streaming sums)."""
    if mode in ("channel", "channel_mean"):
        dims = [0, *range(2, x.ndim)]
        return {"mean": x.mean(dims), "std": x.std(dims, unbiased=False)}
    if mode == "image":
        return {"mean": x.mean(0)}
    flat = x.flatten(1)
    return {"mean": flat.mean(0), "std": flat.std(0, unbiased=False), "cov": torch.cov(flat.T, correction=0)}


@pytest.mark.parametrize("mode", ["channel", "channel_mean", "image", "feature", "center"])
def test_streaming_statistics_equal_a_one_pass_reference(mode):
    x = torch.randn(203, 3, 5, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 7.0
    stats = fit_statistics(x.split([1, 50, 64, 88]), mode)  # uneven batches
    ref = reference(x, mode)
    torch.testing.assert_close(stats.mean, ref["mean"])
    if mode in ("channel", "feature"):
        torch.testing.assert_close(stats.std, ref["std"])
    else:
        assert stats.std is None
    out = stats.to("cpu", torch.float64).apply(x)
    if mode in ("channel", "feature"):
        expected = (x - ref["mean"].view(1, 3, 1, 1)) / ref["std"].view(1, 3, 1, 1) if mode == "channel" else (
            (x.flatten(1) - ref["mean"]) / ref["std"]).view_as(x)
    else:
        shape = (1, 3, 1, 1) if mode == "channel_mean" else (1, *x.shape[1:])
        expected = x - ref["mean"].view(shape)
    torch.testing.assert_close(out, expected)


def test_constant_features_are_divided_by_one():
    x = digits_images()
    stats = fit_statistics(x.split(100), "feature")
    constant = reference(x, "feature")["std"] == 0
    assert constant.any() and torch.all(stats.std[constant] == 1)


def test_whitening_digits_features_gives_identity_covariance():
    x = digits_images()
    flat = x.flatten(1)
    for k in (None, 40):
        stats = fit_statistics(x.split(128), "whiten", eps=1e-5, n_components=k)
        ref = reference(x, "whiten")
        torch.testing.assert_close(stats.mean, ref["mean"])
        eigenvalues = torch.linalg.eigvalsh(ref["cov"]).flip(0)
        torch.testing.assert_close(stats.eigenvalues, eigenvalues[: k or 64].clamp_min(0), atol=1e-8, rtol=1e-6)
        white = stats.apply(x)
        cov = torch.cov(white.flatten(1).T, correction=0)
        # exactly diag(S / (S + eps)) (the lectures' formula) ...
        torch.testing.assert_close(cov, torch.diag(stats.eigenvalues / (stats.eigenvalues + 1e-5)), atol=1e-6, rtol=0)
        # ... which is the identity within 1e-3 on every direction with variance above 0.01 (digits' blank pixels
        # give directions of zero variance, which whitening cannot scale up)
        kept = int((stats.eigenvalues > 1e-2).sum())
        assert kept >= 40
        torch.testing.assert_close(cov[:kept, :kept], torch.eye(kept, dtype=cov.dtype), atol=1e-3, rtol=0)
        if k is not None:
            assert white.shape == (len(x), k)
    # pca decorrelates: the covariance is diagonal with the eigenvalues on it (the lectures' "decorrelated")
    pca = fit_statistics(x.split(128), "pca", n_components=10)
    rotated = pca.apply(x)
    torch.testing.assert_close(torch.cov(rotated.T, correction=0), torch.diag(pca.eigenvalues), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(rotated, (flat - flat.mean(0)) @ pca.components)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="zca"), "`mode`='zca' is invalid: expected one of 'channel'"),
    (dict(mode="channel", n_components=3), "`n_components`=3 is invalid with mode='channel'"),
    (dict(mode="pca", n_components=0), r"`n_components`=0 is invalid: expected an integer in \[1, inf\]"),
    (dict(eps=0.0), r"`eps`=0.0 is invalid"),
])
def test_bad_arguments_one_line_each(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        Standardize(**kwargs)
    assert "\n" not in str(err.value)


def test_more_components_than_features_is_one_line():
    with pytest.raises(InvalidArgumentError, match="`n_components`=65 is invalid for inputs with 64 features: "
                                                   "expected at most 64.") as err:
        fit_statistics(digits_images().split(500), "whiten", n_components=65)
    assert "\n" not in str(err.value)


def test_callback_statistics_from_the_training_set_normalize_every_stage(tmp_path):
    data = ImageData(n=37, shape=(3, 4, 4), batch_size=8, ones=False)  # 37: a short last batch
    train_x = torch.stack([data._loader(False).dataset[i][0] for i in range(37)]).double()
    callback, recorder = Standardize("channel"), Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0, callbacks=[callback, recorder])
    trainer.fit(ListModule(in_channels=3), datamodule=data)
    ref = reference(train_x, "channel")
    torch.testing.assert_close(callback.statistics.mean, ref["mean"])
    torch.testing.assert_close(callback.statistics.std, ref["std"])
    assert callback.statistics.count == 37 * 16
    expected = ((train_x - ref["mean"].view(1, 3, 1, 1)) / ref["std"].view(1, 3, 1, 1)).float()
    torch.testing.assert_close(torch.cat([x for x, _ in recorder.train]), expected)  # no shuffle: same order
    torch.testing.assert_close(torch.cat(recorder.val), expected)
    # test and predict batches too
    seen = []
    module = ListModule(in_channels=3)
    module.test_step = lambda batch, i=0: seen.append(batch[0].clone())
    trainer.test(module, dataloaders=data.val_dataloader(), verbose=False)
    torch.testing.assert_close(torch.cat(seen), expected)


def test_tuple_batches_in_place_and_shape_changing_pca_needs_lists(tmp_path):
    recorder = Recorder()
    data = ImageData(n=16, ones=False, kind="tuple")
    callback = Standardize("image")
    cpu_trainer(tmp_path, max_steps=2, callbacks=[callback, recorder]).fit(ListModule(), datamodule=data)
    assert recorder.batch_types[0] is tuple
    train_x = torch.stack([data._loader(False).dataset[i][0] for i in range(16)])
    torch.testing.assert_close(recorder.train[0][0], train_x[:8] - train_x.mean(0))
    with pytest.raises(BatchFormatError, match="yield lists or dicts"):
        cpu_trainer(tmp_path, max_steps=1, callbacks=[Standardize("pca", n_components=3)]).fit(
            ListModule(), datamodule=ImageData(n=16, ones=False, kind="tuple"))


def test_checkpoint_keeps_the_statistics_and_resume_does_not_recompute(tmp_path):
    data = ImageData(n=24, ones=False, shape=(3, 4, 4))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Standardize("channel")
    cpu_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[first, ckpt]).fit(
        ListModule(in_channels=3), datamodule=data)
    resumed = Standardize("channel")
    resumed.compute = None  # would fail if called
    cpu_trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(ListModule(in_channels=3), datamodule=data,
                                                                 ckpt_path=ckpt.last_model_path)
    torch.testing.assert_close(resumed.statistics.mean, first.statistics.mean, rtol=0, atol=0)
    # validate alone from the checkpoint restores them; without one it says what to do
    fresh = Standardize("channel")
    cpu_trainer(tmp_path, callbacks=[fresh]).validate(ListModule(in_channels=3), datamodule=data,
                                                      ckpt_path=ckpt.last_model_path, verbose=False)
    torch.testing.assert_close(fresh.statistics.std, first.statistics.std, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="Standardize has no statistics yet"):
        cpu_trainer(tmp_path, callbacks=[Standardize()]).validate(ListModule(in_channels=3), datamodule=data,
                                                                 verbose=False)
    state = InputStatistics.from_state_dict(first.statistics.state_dict())
    assert state.mode == "channel" and torch.equal(state.mean, first.statistics.mean)


class UnevenData(ImageData):
    """101 training samples: under 2 ranks, DistributedSampler gives 51 and 50 + 1 padded duplicate."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(101, 3, 4, 4, generator=g) * 2 + 1
        return DataLoader(TensorDataset(x, torch.arange(101) % 4), batch_size=16, shuffle=True)


@pytest.mark.slow
def test_ddp_uneven_shards_equal_the_single_process_statistics(tmp_path):
    data = UnevenData()
    x = data.train_dataloader().dataset.tensors[0].double()

    def probe(trainer, pl_module):
        return {name: cb.statistics for cb in trainer.callbacks if isinstance(cb, Standardize)
                for name in [cb.mode]}

    results = run_ddp(ListModule(in_channels=3), data, tmp_path=tmp_path, probe=probe, max_epochs=1,
                      limit_val_batches=0, callbacks=[Standardize("channel"), Standardize("whiten", input_key=0)])
    single = fit_statistics(x.split(16), "whiten")
    for rank in range(2):
        channel, white = results[rank]["channel"], results[rank]["whiten"]
        assert channel.count == 101 * 16 and white.count == 101
        torch.testing.assert_close(channel.mean, reference(x, "channel")["mean"])
        torch.testing.assert_close(channel.std, reference(x, "channel")["std"])
        torch.testing.assert_close(white.eigenvalues, single.eigenvalues)
        torch.testing.assert_close(white.components, single.components)
    assert torch.equal(results[0]["channel"].mean, results[1]["channel"].mean)


def test_accumulator_example_and_empty():
    with pytest.raises(ConfigError, match="no training sample was seen"):
        MomentAccumulator("channel").finalize()


def test_bf16_autocast_with_swap_augment_and_standardize(tmp_path):
    from lightning_tricks import ActivationSwap, BatchAugment

    module = ListModule(in_channels=3)
    callbacks = [ActivationSwap("prelu"), BatchAugment(padding=1, brightness=0.2, pca_std=0.1), Standardize("channel")]
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=1, precision="bf16-mixed", callbacks=callbacks)
    trainer.fit(module, datamodule=ImageData(n=24, shape=(3, 6, 6), ones=False))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert isinstance(module.net[2], torch.nn.PReLU) and callbacks[1].pca_basis.shape == (3, 3)


def test_an_ensemble_of_standardize_trained_checkpoints_evaluates_on_standardized_inputs(tmp_path):
    """Issue 20: the Ensemble evaluated raw inputs (test loss 5.75 vs 2.12); ``statistics_from`` gives it the statistics."""
    from lightning.pytorch import Trainer

    from lightning_tricks import Ensemble
    from tests.public_projects import PlainClassifier, TupleData, class_labels

    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    module, data = PlainClassifier(), TupleData(class_labels)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    Trainer(max_epochs=1, callbacks=[Standardize(), checkpoint], default_root_dir=tmp_path, **kwargs).fit(module, data)
    path = checkpoint.last_model_path
    member = Trainer(callbacks=[Standardize()], **kwargs).test(module, data, ckpt_path=path, verbose=False)[0]
    ensemble = Ensemble(checkpoints=[path], member_class=PlainClassifier)
    got = Trainer(callbacks=[Standardize(statistics_from=path)], **kwargs).test(ensemble, data, verbose=False)[0]
    assert got["test_loss"] == pytest.approx(member["test_loss"], rel=1e-5)
    # the Ensemble also reads each member's recorded statistics itself: no Standardize, or one without statistics
    for callbacks in ([], [Standardize()]):
        alone = Trainer(callbacks=callbacks, **kwargs).test(Ensemble(checkpoints=[path], member_class=PlainClassifier),
                                                            data, verbose=False)[0]
        assert alone["test_loss"] == pytest.approx(member["test_loss"], rel=1e-5)
    other = tmp_path / "plain.ckpt"
    torch.save({"callbacks": {}}, other)
    with pytest.raises(ConfigError, match="holds no Standardize statistics for mode='channel'"):
        Trainer(callbacks=[Standardize(statistics_from=str(other))], **kwargs).test(ensemble, data, verbose=False)
