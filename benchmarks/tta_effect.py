"""Measured effect of test-time augmentation on digits at 32x32 or MNIST-1D: test accuracy per view set, over seeds.

For each seed, a zoo ``simple_cnn`` is trained on scikit-learn's digits resized to 32x32, in two
regimes: without augmentation (as ``examples/digits.yaml`` trains) and with random shifts of up to
``--shift`` pixels (replicate padding) applied to every training batch. Each trained model is then
evaluated on the 270 test images with no TTA and with each view set below, through
:class:`~lightning_tricks.TTAWrapper`. Flips are included on purpose: they are not label-preserving
for digits (a mirrored 2, 3, 4, 5, 7 or 9 is not that digit), and the table shows what that costs.

``--data mnist1d`` (section ``tta-effect-mnist1d``): the paper's CNN (``mnist1d_cnn``, Adam, lr 1e-2, batch
100, cosine) on MNIST-1D's 4,000 training signals, without augmentation and with random shifts along the
length, tested on its 1,000 test signals through :class:`~lightning_tricks.TTAWrapper` with its views
along the length: ``translate`` (the signal shifted by ``-t``, 0 and ``+t`` steps, replicate padding) and
``hflip`` (the reversed signal, not label-preserving: the analogue of a flip). Crops are left out, since the
paper's CNN takes exactly 40 steps.

Example:
    ``python -m benchmarks tta_effect`` (``--quick`` for a smoke run; ``--data mnist1d``)
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from benchmarks._cli import BenchmarkParser, cached_seed, publish
from lightning_tricks import DigitsDataModule, ImageClassifier, TTAWrapper

VIEW_SETS: dict[str, dict[str, Any]] = {
    "none": {"views": ["identity"]},
    "translate 1 px (K=9)": {"views": ["translate"], "translate": 1},
    "translate 2 px (K=9)": {"views": ["translate"], "translate": 2},
    "translate 2 px, gmean": {"views": ["translate"], "translate": 2, "merge": "gmean"},
    "translate 2 px, vote": {"views": ["translate"], "translate": 2, "merge": "vote"},
    "five_crop 28 (K=5)": {"views": ["five_crop"], "crop_size": 28},
    "scales 28/32/36 (K=3)": {"views": ["identity"], "scales": [28, 32, 36]},
    "hflip (K=2, not label-preserving)": {"views": ["hflip"]},
    "vflip (K=2, not label-preserving)": {"views": ["vflip"]},
}


SEQUENCE_VIEW_SETS: dict[str, dict[str, Any]] = {
    "none": {"views": ["identity"]},
    "translate 1 step (K=3)": {"views": ["translate"], "translate": 1},
    "translate 2 steps (K=3)": {"views": ["translate"], "translate": 2},
    "translate 4 steps (K=3)": {"views": ["translate"], "translate": 4},
    "translate 4 steps, gmean": {"views": ["translate"], "translate": 4, "merge": "gmean"},
    "translate 4 steps, vote": {"views": ["translate"], "translate": 4, "merge": "vote"},
    "translate 8 steps (K=3)": {"views": ["translate"], "translate": 8},
    "reverse (K=2, not label-preserving)": {"views": ["hflip"]},
}
"""View sets along the length of MNIST-1D's signals (TTAWrapper on a 1D model). Crops are left out: the paper's
CNN takes exactly 40 steps."""


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of ``x`` by its own integer offset in ``[-max_shift, max_shift]^2`` (replicate padding);
    a ``[B, C, L]`` signal along its length only."""
    if x.ndim == 3:
        b, _, length = x.shape
        padded = F.pad(x, (max_shift, max_shift), mode="replicate")
        offsets = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
        steps = offsets[:, None] + torch.arange(length)  # (b, L)
        return padded.gather(2, steps[:, None, :].expand(-1, x.shape[1], -1))
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (offsets[0][:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (offsets[1][:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


class RandomShift(Callback):
    """Training augmentation for the second regime: shifts the batch's images in place."""

    def __init__(self, max_shift: int, seed: int) -> None:
        self.max_shift, self.generator = max_shift, torch.Generator().manual_seed(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        x = batch[0]
        x.copy_(random_shift(x, self.max_shift, self.generator))


def train(seed: int, epochs: int, width: int, shift: int, data_name: str = "digits") -> tuple[ImageClassifier, Any]:
    if data_name == "mnist1d":
        from benchmarks._mnist1d import train_mnist1d

        model, data, _ = train_mnist1d("mnist1d_cnn", [RandomShift(shift, seed)] if shift else [], seed, epochs)
        return model, data
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, resize_to=32, split_seed=0)
    model = ImageClassifier("simple_cnn", num_classes=10, in_channels=1, backbone_kwargs={"width": width}, lr=0.05)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[RandomShift(shift, seed)] if shift else [])
    trainer.fit(model, datamodule=data)
    return model.eval(), data


def evaluate_sequences(model: ImageClassifier, data: Any) -> dict[str, float]:
    """Test accuracy of ``model`` on MNIST-1D's test signals with each of :data:`SEQUENCE_VIEW_SETS`."""
    x, y = data.tensors("test")
    accuracies = {}
    with torch.inference_mode():
        for name, kwargs in SEQUENCE_VIEW_SETS.items():
            log_probs = TTAWrapper(model, max_batch=8192, **kwargs)(x)
            accuracies[name] = (log_probs.argmax(1) == y).float().mean().item()
    return accuracies


def evaluate(model: ImageClassifier, data: DigitsDataModule) -> dict[str, float]:
    x, y = data.test_set.tensors  # type: ignore[union-attr]
    accuracies = {}
    with torch.inference_mode():
        for name, kwargs in VIEW_SETS.items():
            log_probs = TTAWrapper(model, max_batch=4096, **kwargs)(x)
            accuracies[name] = (log_probs.argmax(1) == y).float().mean().item()
    return accuracies


def _parser() -> BenchmarkParser:
    p = BenchmarkParser("tta_effect", __doc__, quick="smoke run: one seed, one epoch", section="tta-effect",
                        threads=1)  # one thread: the model is small; on shared cores more threads are slower
    p.add_data_option()
    p.add_seed_cache()
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; 0 with --quick)")
    p.add_data_default("--epochs", {"digits": (8, 1), "mnist1d": (30, 1)}, "training epochs")
    p.add_argument("--width", type=int, default=16, help="simple_cnn width (default 16; digits)")
    p.add_data_default("--shift", {"digits": 2, "mnist1d": 4}, "max shift of the augmented regime (pixels or steps)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate every view set, print the table and write the ``tta-effect`` section of RESULTS.md."""
    args = _parser().parse_args(argv)
    q = args.quick
    seeds = args.seeds or ([0] if q else [0, 1, 2])
    epochs = args.epochs
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|LeafSpec).*")
    sequences = args.data == "mnist1d"
    view_sets = SEQUENCE_VIEW_SETS if sequences else VIEW_SETS
    unit = "steps" if sequences else "px"
    regimes = {"trained without augmentation": 0, f"trained with random shifts <= {args.shift} {unit}": args.shift}
    results: dict[str, dict[str, list[float]]] = {r: {v: [] for v in view_sets} for r in regimes}
    def measure(seed: int) -> dict[str, dict[str, float]]:
        per_regime = {}
        for regime, shift in regimes.items():
            model, data = train(seed, epochs, args.width, shift, args.data)
            per_regime[regime] = (evaluate_sequences if sequences else evaluate)(model, data)
            print(f"{regime}, seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in per_regime[regime].items()),
                  flush=True)
        return per_regime

    for seed in seeds:  # regimes interleaved within each seed
        for regime, accuracies in cached_seed(args, seed, lambda: measure(seed)).items():  # noqa: B023
            for name, acc in accuracies.items():
                results[regime][name].append(acc)

    def cell(values: list[float], base: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        delta = 100 * statistics.mean(v - b for v, b in zip(values, base, strict=True))
        return f"{mean:.2f}{spread} ({delta:+.2f})"

    header = "| views | " + " | ".join(regimes) + " |"
    lines = [header, "|---|" + "---:|" * len(regimes)]
    for name in view_sets:
        lines.append(f"| {name} | " + " | ".join(cell(results[r][name], results[r]["none"]) for r in regimes) + " |")
    if sequences:
        publish(args, "test-time augmentation on MNIST-1D (views along the length)", [
            f"The paper's CNN (`mnist1d_cnn`) trained {epochs} epochs (Adam, lr 0.01, no weight decay, cosine, batch "
            "100) on MNIST-1D's 4,000 training signals, without augmentation or with a random shift along the length "
            "per signal (replicate padding); test accuracy (%) on the 1,000 test signals, mean ± std over seeds "
            f"{seeds}, and in parentheses the mean change against no TTA for the same models. Views by `TTAWrapper` "
            "on the 1D model: `translate t` = the signal shifted by -t, 0 and +t steps (replicate padding); reverse "
            "= `hflip`, the signal and its time reversal. Merge: mean of probabilities unless stated. Crops are "
            "left out: the paper's CNN takes exactly 40 steps.",
            "",
            *lines,
        ])
        return 0
    publish(args, "test-time augmentation on digits at 32x32", [
        f"`simple_cnn` (width {args.width}) trained {epochs} epochs (SGD, lr 0.05, cosine) on the digits training split "
        f"resized to 32x32; test accuracy (%) on the 270 test images, mean ± std over seeds {seeds}, and in "
        "parentheses the mean change against no TTA for the same models. `translate` = the 3x3 grid of shifts "
        "(replicate padding); `five_crop 28` = corners and center; `scales` = resize to 28, 32, 36 (bilinear). "
        "Merge: mean of probabilities unless stated.",
        "",
        *lines,
    ])
    return 0
