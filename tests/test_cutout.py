import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks import Cutout
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization import BatchFormatError
from lightning_tricks.regularization.cutout import NO_HOLE, cutout, cutout_mask, sample_cutout_centers
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import DictModule, ImageData, ListModule, MixinTupleModule, Recorder


def brute_force_mask(centers: torch.Tensor, length: int, height: int, width: int) -> torch.Tensor:
    """The clipped-square geometry, pixel by pixel."""
    mask = torch.zeros(centers.shape[0], height, width, dtype=torch.bool)
    for i, sample in enumerate(centers.tolist()):
        for cy, cx in sample:
            if cy == NO_HOLE:
                continue
            for r in range(max(cy - length // 2, 0), min(cy - length // 2 + length, height)):
                for c in range(max(cx - length // 2, 0), min(cx - length // 2 + length, width)):
                    mask[i, r, c] = True
    return mask


@pytest.mark.parametrize("height,width,length,n_holes,p", [
    (8, 8, 4, 1, 1.0), (7, 11, 3, 1, 1.0), (12, 6, 5, 2, 1.0), (9, 9, 1, 3, 0.6), (6, 10, 6, 1, 1.0),
])
def test_zeroed_area_is_the_clipped_squares(height, width, length, n_holes, p):
    images = torch.ones(40, 3, height, width)
    centers = sample_cutout_centers(40, height, width, n_holes, p, torch.Generator().manual_seed(5))
    out = cutout(images, length, n_holes, p=p, generator=torch.Generator().manual_seed(5))
    expected = brute_force_mask(centers, length, height, width)
    assert torch.equal(out == 0, expected[:, None].expand_as(out))
    assert torch.equal(cutout_mask(centers, length, height, width), expected)
    drawn = centers[..., 0] != NO_HOLE
    if p < 1:
        assert 0 < drawn[:, 0].sum() < 40 and torch.equal(drawn, drawn[:, :1].expand_as(drawn))
    # centers anywhere in the image (the paper's): holes at the border are clipped to less than length^2
    if n_holes == 1 and p == 1:
        areas = expected.sum((1, 2))
        assert areas.max() <= length * length and (areas < length * length).any()


def test_each_sample_gets_its_own_holes_and_centers_cover_the_image():
    centers = sample_cutout_centers(2000, 8, 12, generator=torch.Generator().manual_seed(0))
    assert centers.shape == (2000, 1, 2)
    assert centers[..., 0].min() == 0 and centers[..., 0].max() == 7
    assert centers[..., 1].min() == 0 and centers[..., 1].max() == 11
    out = cutout(torch.ones(16, 1, 16, 16), 4, generator=torch.Generator().manual_seed(1))
    masks = (out == 0).flatten(1)
    assert len({tuple(m.tolist()) for m in masks}) > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_memory_format_fraction_and_fill(dtype):
    images = torch.randn(6, 3, 16, 24, dtype=dtype).to(memory_format=torch.channels_last)
    out = cutout(images, 0.25, fill=0.5, generator=torch.Generator().manual_seed(2))  # 0.25 * 16 = 4 pixels
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    centers = sample_cutout_centers(6, 16, 24, generator=torch.Generator().manual_seed(2))
    mask = cutout_mask(centers, 4, 16, 24)[:, None].expand_as(out)
    assert torch.all(out[mask] == 0.5) and torch.equal(out[~mask], images[~mask])
    same = images.clone()
    assert cutout(same, 4, generator=torch.Generator().manual_seed(2), inplace=True) is same
    assert torch.equal(same == 0, cutout_mask(centers, 4, 16, 24)[:, None].expand_as(same) | (images == 0))


def test_grayscale_without_channel_dim_and_p_zero_is_identity():
    images = torch.ones(4, 8, 8)
    assert (cutout(images, 2, generator=torch.Generator().manual_seed(0)) == 0).flatten(1).sum(1).gt(0).all()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert cutout(images, 2, p=0.0, generator=generator) is images
    assert torch.equal(generator.get_state(), state)  # nothing drawn


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=0), "`length`=0 is invalid"), (dict(length=-3), "`length`=-3 is invalid"),
    (dict(length=1.5), "`length`=1.5 is invalid"), (dict(length=0.0), "`length`=0.0 is invalid"),
    (dict(length=True), "`length`=True is invalid"), (dict(p=1.5), "`p`=1.5 is invalid"),
    (dict(p=-0.1), "`p`=-0.1 is invalid"), (dict(n_holes=0), "`n_holes`=0 is invalid"),
    (dict(fill="zero"), "`fill`='zero' is invalid"), (dict(input_key=-1), "`input_key`=-1 is invalid"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Cutout(**kwargs)


def test_bad_images():
    with pytest.raises(InvalidArgumentError, match="expected floating-point images"):
        cutout(torch.ones(2, 3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(InvalidArgumentError, match=r"`length`=9 is invalid for 8x10 images"):
        cutout(torch.ones(2, 3, 8, 10), 9)
    with pytest.raises(InvalidArgumentError, match="expected"):
        cutout(torch.ones(2, 8), 4)


def test_user_module_list_batches_train_and_eval_untouched(tmp_path):
    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_epochs=1, callbacks=[Cutout(length=3, seed=1), recorder])
    trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8))
    assert trainer.global_step == 2 and len(recorder.train) == 2
    assert all(t is list for t in recorder.batch_types)
    for x, _ in recorder.train:
        assert ((x == 0).flatten(1).sum(1) > 0).all() and ((x == 0) | (x == 1)).all()
    assert recorder.val and all(torch.equal(v, torch.ones_like(v)) for v in recorder.val)


def test_length_larger_than_images_fails_at_first_batch(tmp_path):
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Cutout(length=9)])
    with pytest.raises(InvalidArgumentError, match="`length`=9 is invalid for 8x8 images"):
        trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8))
    assert trainer.global_step == 0


def test_dict_and_tuple_batches(tmp_path):
    for module, kind in ((DictModule(), "dict"), (ListModule(), "tuple"), (MixinTupleModule(), "tuple")):
        recorder, callback = Recorder(), Cutout(length=3)
        trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback, recorder])
        trainer.fit(module, datamodule=ImageData(n=16, batch_size=8, kind=kind))
        assert recorder.batch_types == [dict if kind == "dict" else tuple] * 2
        assert all(((x == 0).flatten(1).sum(1) > 0).all() for x, _ in recorder.train)
        assert callback.state_dict()["batches_seen"] == 2  # the mixin's pass is the only one


def test_tuple_of_views_fails_naming_the_mixin(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    storage = torch.ones(16, 1, 8, 8)

    class SliceData(pl.LightningDataModule):
        def train_dataloader(self):  # yields slices of the dataset's own tensor (no collation copy)
            return DataLoader([(storage[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in (0, 8)],
                              batch_size=None, collate_fn=lambda sample: sample)

    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[Cutout(length=3)])
    with pytest.raises(BatchFormatError, match="BatchTransformMixin"):
        trainer.fit(ListModule(), datamodule=SliceData())
    assert torch.equal(storage, torch.ones_like(storage))  # the dataset was not modified


def test_p_zero_leaves_batches_untouched(tmp_path):
    class Identity(Recorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train.append(batch[0])

    recorder, callback = Identity(), Cutout(length=3, p=0.0)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback, recorder])
    trainer.fit(ListModule(), datamodule=ImageData(n=16, batch_size=8))
    assert all(torch.equal(x, torch.ones_like(x)) for x in recorder.train)
    assert callback.state_dict()["batches_seen"] == 0 and not callback.randomness.generators  # no draws, no generator


def test_resume_mid_epoch_reproduces_masks(tmp_path):
    data = ImageData(n=48, batch_size=8)  # 6 batches an epoch

    def fit(ckpt_path=None):
        recorder = Recorder()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        trainer = cpu_trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
                              callbacks=[Cutout(length=3, seed=3), recorder, checkpoint])
        trainer.fit(ListModule(), datamodule=data, ckpt_path=ckpt_path)
        return [x == 0 for x, _ in recorder.train]

    full = fit()
    assert len(full) == 12
    resumed = fit(ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(resumed) == 8
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(full[4], full[5])


def _masks_probe(trainer, pl_module):
    recorder = next(c for c in trainer.callbacks if isinstance(c, Recorder))
    return {"masks": [x == 0 for x, _ in recorder.train], "steps": trainer.global_step}


def test_ddp_masks_differ_across_ranks(tmp_path):
    results = run_ddp(ListModule(), ImageData(n=32, batch_size=8), tmp_path=tmp_path, probe=_masks_probe,
                      callbacks=[Cutout(length=3), Recorder()], max_epochs=1)
    assert [r["steps"] for r in results] == [2, 2]
    for a, b in zip(results[0]["masks"], results[1]["masks"], strict=True):
        assert a.flatten(1).any(1).all() and b.flatten(1).any(1).all()
        assert not torch.equal(a, b)


# -- tasks (issue 20): Cutout changes the images only ----------------------------------------------------

def test_cutout_on_a_segmentation_batch_leaves_the_masks_and_fills_the_holes(tmp_path):
    """The chosen contract (Albumentations' CoarseDropout and torchvision's RandomErasing do the same): a hole
    hides the object, it does not remove it, so each pixel keeps its label and the model learns it from context."""
    from tests.regularization_modules import SegModule, seg_loader

    module = SegModule()
    cpu_trainer(tmp_path, max_steps=2, callbacks=[Cutout(length=4, fill=0.0, seed=0)]).fit(module, seg_loader(kind="dict"))
    raw = list(seg_loader())
    for (x, y), (raw_x, raw_y) in zip(module.seen, raw, strict=True):
        assert torch.equal(y, raw_y)
        holes = (x != raw_x).any(dim=1)
        assert holes.any() and torch.equal(x[:, 0][holes], torch.zeros(int(holes.sum())))
