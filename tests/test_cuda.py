"""GPU paths: mixed precision, channels-last, CUDA generators, DDP over NCCL. Skipped without a CUDA device.

``benchmarks/gpu_check.sh`` runs these (``pytest -m cuda``) on a machine with one NVIDIA GPU. Every test
compares the GPU result with a reference (the CPU result, fp32, or the unfolded model), so a kernel that
runs but computes something else fails.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_tricks as lt
from lightning_tricks.zoo import ImageClassifier, SyntheticDataModule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu_check.sh)"),
]


class _LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _fit(tmp_path: Path, callbacks: list[Callback], precision: str, channels_last: bool = False,
         backbone: str = "resnet20", steps: int = 4, **trainer_kwargs) -> tuple[ImageClassifier, _LossRecorder]:
    pl.seed_everything(0)
    model = ImageClassifier(backbone=backbone, in_channels=3, image_size=32, lr=0.05)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    recorder = _LossRecorder()
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=1, limit_train_batches=steps,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[*callbacks, recorder], **trainer_kwargs)
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, batch_size=32))
    return model, recorder


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_regularizers_train_under_mixed_precision(tmp_path: Path, precision: str, channels_last: bool) -> None:
    callbacks = [lt.Cutout(length=8, seed=0), lt.Mixup(alpha=1.0, seed=0), lt.StochasticDepth(p=0.2, seed=0),
                 lt.WeightPenalty(l2=1e-4)]
    _, recorder = _fit(tmp_path, callbacks, precision, channels_last=channels_last)
    assert len(recorder.losses) == 4 and all(torch.isfinite(torch.tensor(recorder.losses)))


def test_cutout_draws_on_the_batch_device() -> None:
    from lightning_tricks.regularization.cutout import cutout

    x = torch.rand(16, 3, 32, 32, device="cuda") + 1.0
    out = cutout(x, length=8, generator=torch.Generator(device="cuda").manual_seed(3))
    holes = (out == 0).all(dim=1).flatten(1).sum(dim=1)  # zeroed pixels per image, all channels
    assert out.device.type == "cuda" and out.dtype == x.dtype
    assert ((holes > 0) & (holes <= 64)).all()  # one hole per image, at most 8x8 (clipped at the border)
    assert len(set(holes.tolist())) > 1 or len({tuple(m.nonzero()[0].tolist()) for m in (out == 0).all(1)}) > 1


def test_random_stream_draws_on_the_device_and_seeded_passes_leave_cuda_rng_alone() -> None:
    from lightning_tricks.core.distributed import derive_seed
    from lightning_tricks.core.seeding import RandomStream, seeded_global_rng

    stream = RandomStream(seed=5)
    generator = stream.next_generator("cuda")
    draw = torch.rand(64, device="cuda", generator=generator)
    expected = torch.rand(64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(derive_seed(5, 0, 0)))
    assert generator.device.type == "cuda" and torch.equal(draw, expected) and stream.batches_seen == 1
    before = torch.cuda.get_rng_state()
    with seeded_global_rng(11, "cuda"):
        inside = torch.rand(8, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    torch.cuda.manual_seed(11)
    assert torch.equal(torch.rand(8, device="cuda"), inside)


def test_tta_on_gpu_equals_cpu() -> None:
    from lightning_tricks.tta import TTAWrapper

    torch.manual_seed(0)
    net = ImageClassifier(backbone="simple_cnn", in_channels=3, image_size=32).eval()
    x = torch.randn(8, 3, 32, 32)
    wrapper = TTAWrapper(net, views=["identity", "hflip"])
    with torch.no_grad():
        cpu = wrapper(x)
        gpu = TTAWrapper(net.cuda(), views=["identity", "hflip"])(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_fold_batch_norm_on_gpu() -> None:
    from lightning_tricks.zoo.backbones import build_backbone

    model = build_backbone("resnet20").cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    folded = lt.fold_batch_norm(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_ddp_over_nccl_on_one_gpu(tmp_path: Path) -> None:
    if not torch.distributed.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    _, recorder = _fit(tmp_path, [lt.Cutout(length=8, seed=0), lt.DeadUnitMonitor()], "32-true", strategy="ddp")
    assert len(recorder.losses) == 4 and all(torch.isfinite(torch.tensor(recorder.losses)))
