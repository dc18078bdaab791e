import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.transforms.v2 import functional as TF

from lightning_tricks import BatchAugment, Standardize
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.setup.augment import apply_augment, augment, rgb_pca_basis, sample_augment_params
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import DictModule, ImageData, ListModule, Recorder

TV_PADDING = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}


def per_sample_reference(images, params, padding, padding_mode, pca_basis=None):
    """torchvision's per-image functional ops, one image at a time, with the drawn parameters."""
    out = []
    for i, image in enumerate(images):
        if padding:
            image = TF.pad(image, [padding] * 4, padding_mode=TV_PADDING[padding_mode])
            top, left = params.offsets[i].tolist() if params.offsets is not None else (padding, padding)
            image = TF.crop(image, top, left, images.shape[-2], images.shape[-1])
        if params.flip is not None and params.flip[i]:
            image = TF.horizontal_flip(image)
        if params.brightness is not None:
            image = TF.adjust_brightness(image, float(params.brightness[i]))
        if params.contrast is not None:
            image = TF.adjust_contrast(image, float(params.contrast[i]))
        if params.alpha is not None:
            shift = sum(params.alpha[i, j] * pca_basis[:, j] for j in range(image.shape[0]))
            image = (image + shift.view(-1, 1, 1)).clamp(0, 1)
        out.append(image)
    return torch.stack(out)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("batch_size,height,width", [(1, 8, 8), (17, 12, 10), (64, 32, 32)])
def test_equals_a_per_sample_torchvision_loop(padding_mode, batch_size, height, width):
    images = torch.rand(batch_size, 3, height, width)
    basis = rgb_pca_basis(torch.cov(images.movedim(1, -1).reshape(-1, 3).T))
    params = sample_augment_params(batch_size, 3, padding=3, flip=0.5, brightness=0.3, contrast=0.4, pca_std=0.1,
                                   generator=torch.Generator().manual_seed(batch_size))
    out = apply_augment(images, params, 3, padding_mode, basis, clamp=True)
    torch.testing.assert_close(out, per_sample_reference(images, params, 3, padding_mode, basis), atol=1e-6, rtol=0)


def test_augment_draws_per_sample_and_equals_apply_with_the_same_generator():
    images = torch.rand(256, 3, 16, 16)
    params = sample_augment_params(256, 3, 4, 0.5, 0.2, 0.2, 0.1, generator=torch.Generator().manual_seed(3))
    assert len({tuple(o) for o in params.offsets.tolist()}) > 40  # 81 possible offsets
    assert params.offsets.min() == 0 and params.offsets.max() == 8
    assert 90 < int(params.flip.sum()) < 166
    assert params.brightness.unique().numel() == 256 and params.alpha.shape == (256, 3)
    assert params.brightness.min() >= 0.8 and params.brightness.max() <= 1.2
    basis = torch.eye(3)
    out = augment(images, 4, 0.5, 0.2, 0.2, 0.1, pca_basis=basis, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, apply_augment(images, params, 4, "zeros", basis))
    # the crop really moves content: a sample with offset (0, 0) and no flip is the image shifted by 4
    plain = augment(images, 4, 0.0, generator=torch.Generator().manual_seed(3))
    i = next(i for i, o in enumerate(params.offsets.tolist()) if o == [0, 0])
    assert torch.equal(plain[i, :, 4:, 4:], images[i, :, :-4, :-4]) and torch.all(plain[i, :, :4] == 0)


def test_grayscale_and_unnormalized_values_and_identity_when_off():
    images = torch.randn(5, 1, 6, 6) * 3
    params = sample_augment_params(5, 1, 2, 1.0, 0.0, 0.5, generator=torch.Generator().manual_seed(0))
    out = apply_augment(images, params, 2)
    ref = per_sample_reference(images.clamp(0, 1), params, 2, "zeros")  # torchvision clamps to [0, 1]
    torch.testing.assert_close(apply_augment(images.clamp(0, 1), params, 2, clamp=True), ref, atol=1e-6, rtol=0)
    assert out.min() < 0 and out.max() > 1  # without clamp, normalized images keep their range
    off = augment(images, padding=0, flip=0.0)
    assert torch.equal(off, images) and off is not images


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding=-1), r"`padding`=-1 is invalid: expected an integer in \[0, inf\]"),
    (dict(flip=1.5), r"`flip`=1.5 is invalid"),
    (dict(brightness=2.0), r"`brightness`=2.0 is invalid: expected a number in \[0.0, 1.0\]"),
    (dict(padding_mode="wrap"), "`padding_mode`='wrap' is invalid: expected one of 'zeros', 'reflect', 'replicate'"),
    (dict(pca_std=-0.1), r"`pca_std`=-0.1 is invalid"),
    (dict(pca_basis=[[1.0, 0.0]]), "`pca_basis`=.* is invalid: expected a square"),
])
def test_bad_arguments_one_line_each(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message) as err:
        BatchAugment(**kwargs)
    assert "\n" not in str(err.value)


def test_callback_training_batches_only_any_batch_size_and_seeded(tmp_path):
    runs = []
    for _ in range(2):
        recorder = Recorder()
        trainer = cpu_trainer(tmp_path, max_epochs=1, callbacks=[BatchAugment(padding=2, brightness=0.3, seed=1),
                                                                recorder])
        trainer.fit(ListModule(), datamodule=ImageData(n=21, batch_size=8, ones=False))  # batches 8, 8, 5
        runs.append(recorder)
    data = ImageData(n=21, batch_size=8, ones=False)
    raw = torch.cat([x for x, _ in data.train_dataloader()])
    seen = torch.cat([x for x, _ in runs[0].train])
    assert seen.shape == raw.shape and not torch.equal(seen, raw)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(runs[0].train, runs[1].train, strict=True))  # same seed
    assert torch.equal(torch.cat(runs[0].val[-3:]), raw)  # validation untouched
    # each batch drew from (seed, rank, batch counter): equal to augment() with that generator
    from lightning_tricks.core.distributed import derive_seed

    first = raw[:8]
    expected = augment(first, 2, 0.5, 0.3, generator=torch.Generator().manual_seed(derive_seed(1, 0, 0)))
    torch.testing.assert_close(runs[0].train[0][0], expected)


def test_dict_and_tuple_batches(tmp_path):
    recorder = Recorder()
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[BatchAugment(padding=2), recorder]).fit(
        DictModule(), datamodule=ImageData(n=8, ones=False, kind="dict"))
    recorder_tuple = Recorder()
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[BatchAugment(padding=2), recorder_tuple]).fit(
        ListModule(), datamodule=ImageData(n=8, ones=False, kind="tuple"))
    assert recorder_tuple.batch_types[0] is tuple
    torch.testing.assert_close(recorder.train[0][0], recorder_tuple.train[0][0])  # same seed, same draws


def test_pca_basis_from_the_training_set_and_resume_continues_the_stream(tmp_path):
    from lightning_tricks.core.distributed import derive_seed

    data = ImageData(n=48, shape=(3, 6, 6), batch_size=8, ones=False)  # 6 batches an epoch
    pixels = torch.cat([x for x, _ in data.train_dataloader()]).movedim(1, -1).reshape(-1, 3).double()

    def fit(ckpt_path=None):
        callback, before, after = BatchAugment(padding=1, pca_std=0.1, seed=5), Recorder(), Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
                    callbacks=[before, callback, after, checkpoint]).fit(ListModule(in_channels=3), datamodule=data,
                                                                         ckpt_path=ckpt_path)
        pairs = [(b, a) for (b, _), (a, _) in zip(before.train, after.train, strict=True)]
        return callback.pca_basis, pairs

    basis, full = fit()
    cov = torch.cov(pixels.T, correction=0).float()
    torch.testing.assert_close(basis @ basis.T, cov, atol=1e-5, rtol=1e-4)  # sum_i s_i^2 p_i p_i^T = covariance
    resumed_basis, resumed = fit(str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert torch.equal(resumed_basis, basis) and len(full) == 12 and len(resumed) == 8
    # batch k of the whole fit draws from (seed, rank, k): the resumed run continues at k = 4
    for k, (raw, seen) in enumerate(full):
        expected = augment(raw, 1, 0.5, pca_std=0.1, pca_basis=basis,
                           generator=torch.Generator().manual_seed(derive_seed(5, 0, k)))
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    for k, (raw, seen) in enumerate(resumed, start=4):
        expected = augment(raw, 1, 0.5, pca_std=0.1, pca_basis=basis,
                           generator=torch.Generator().manual_seed(derive_seed(5, 0, k)))
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)


def test_before_standardize_augments_raw_images(tmp_path):
    recorder = Recorder()
    callbacks = [BatchAugment(padding=0, flip=1.0, seed=0), Standardize("channel_mean"), recorder]
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=callbacks).fit(
        ListModule(), datamodule=ImageData(n=8, ones=False))
    raw = next(iter(ImageData(n=8, ones=False).train_dataloader()))[0]
    mean = callbacks[1].statistics.mean.float()
    torch.testing.assert_close(recorder.train[0][0], raw.flip(-1) - mean.view(1, -1, 1, 1))


@pytest.mark.slow
def test_ddp_ranks_draw_differently_and_share_the_pca_basis(tmp_path):
    def probe(trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, BatchAugment))
        recorder = next(c for c in trainer.callbacks if isinstance(c, Recorder))
        return {"basis": callback.pca_basis, "first": recorder.train[0][0]}

    results = run_ddp(ListModule(in_channels=3), ImageData(n=32, shape=(3, 6, 6), batch_size=8, ones=True),
                      tmp_path=tmp_path, probe=probe, max_steps=2, limit_val_batches=0,
                      callbacks=[BatchAugment(padding=2, pca_std=0.1, seed=0), Recorder()])
    assert torch.equal(results[0]["basis"], results[1]["basis"])
    assert not torch.equal(results[0]["first"], results[1]["first"])  # same (all-ones) images, other draws


# -- tasks (issue 20): dense targets move with their images --------------------------------------------------

from lightning_tricks.core.task import TaskNotSupportedError  # noqa: E402
from lightning_tricks.setup.augment import crop_flip_targets  # noqa: E402
from tests.regularization_modules import SegModule, seg_loader  # noqa: E402


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_masks_get_the_crop_and_flip_of_their_images(tmp_path, kind, padding_mode):
    module = SegModule()
    cpu_trainer(tmp_path, max_epochs=2, callbacks=[BatchAugment(padding=2, flip=0.5, padding_mode=padding_mode,
                                                                seed=3)]).fit(module, seg_loader(kind=kind))
    images = torch.cat([x for x, _ in module.seen])
    masks = torch.cat([y for _, y in module.seen])
    label = images[:, 0] - 1  # channel 0 was mask + 1: wherever the image pixel came from, its label came too
    expected = torch.where(images[:, 0] == 0, -100, label.round().long()) if padding_mode == "zeros" else label.long()
    assert torch.equal(masks, expected)
    assert (masks == -100).any() == (padding_mode == "zeros")  # crops brought in padding, labelled ignore
    raw = torch.cat([y for _, y in seg_loader(kind="list")]).repeat(2, 1, 1)
    assert not torch.equal(masks, raw)  # the masks did move


def test_flip_only_masks_equal_torch_flip_and_other_targets_stay():
    from lightning_tricks.setup.augment import sample_augment_params
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (6, 5, 7), generator=g)
    params = sample_augment_params(6, 1, padding=0, flip=0.5, generator=g)
    moved = crop_flip_targets(masks, None, params.flip, 0)
    reference = torch.stack([m.flip(-1) if f else m for m, f in zip(masks, params.flip.tolist(), strict=True)])
    assert torch.equal(moved, reference) and params.flip.any() and not params.flip.all()


def test_regression_maps_move_and_class_targets_stay(tmp_path):
    maps = torch.randn(8, 1, 8, 8)  # float maps on the grid (depth): regression, moved too (0 in the padding)
    module = SegModule(classes=1, loss="bce")
    cpu_trainer(tmp_path, max_steps=2, callbacks=[BatchAugment(padding=1, flip=0.5, seed=0)]).fit(
        module, seg_loader(targets=maps))
    images = torch.cat([x for x, _ in module.seen])
    moved = torch.cat([y for _, y in module.seen])
    inside = images[:, 0] != 0
    assert not torch.equal(moved, maps)
    assert torch.equal(moved[:, 0][~inside], torch.zeros_like(moved[:, 0][~inside]))
    # a permutation-free check: every moved pixel inside the image is one of the sample's own map values
    assert all(torch.isin(moved[i, 0][inside[i]], maps[i]).all() for i in range(8))
    aug = BatchAugment(padding=1, flip=1.0, seed=0)
    labels = torch.tensor([0, 1, 2, 1])
    batch = [torch.randn(4, 3, 8, 8), labels.clone()]
    aug.randomness.setup()
    out = aug.transform_batch(cpu_trainer(tmp_path), None, batch)
    assert torch.equal(out[1], labels) and aug.task.kind == "classification"


def test_dense_override_with_targets_off_the_grid_is_refused_in_one_line(tmp_path):
    aug = BatchAugment(padding=1, task="dense")
    aug.randomness.setup()
    with pytest.raises(TaskNotSupportedError, match="task='dense' needs targets on the inputs' grid") as err:
        aug.transform_batch(cpu_trainer(tmp_path), None, [torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])])
    assert "\n" not in str(err.value)


def test_a_mask_beside_a_label_moves_too(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (4, 8, 8), generator=g)
    images = torch.stack((masks.float() + 1, torch.randn(4, 8, 8, generator=g)), dim=1)
    labels = torch.tensor([0, 1, 2, 1])
    aug = BatchAugment(padding=2, flip=0.5, seed=0)
    aug.randomness.setup()
    out = aug.transform_batch(cpu_trainer(tmp_path), None, {"image": images, "label": labels, "mask": masks})
    assert aug.task.kind == "classification" and torch.equal(out["label"], labels)
    expected = torch.where(out["image"][:, 0] == 0, -100, (out["image"][:, 0] - 1).round().long())
    assert torch.equal(out["mask"], expected) and not torch.equal(out["mask"], masks)
