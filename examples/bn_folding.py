"""Fold BatchNorm into the convolutions of a trained model before deploying it.

Run:  python examples/bn_folding.py [--epochs 3] [--fast]

Trains the zoo's CIFAR-style ResNet-20 on the embedded digits for a few epochs, then builds the
inference copy with one line, `lightning_tricks.fold_batch_norm(model)`, and checks that the folded
copy predicts exactly what the trained model predicts on the test split.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch

import lightning_tricks as lt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=float, default=1.0, help="fraction of training batches per epoch")
    parser.add_argument("--fast", action="store_true", help="one epoch of 3 batches (a smoke test of the script)")
    args = parser.parse_args()
    if args.fast:
        args.epochs, args.limit_batches = 1, 3
    pl.seed_everything(0)
    data = lt.DigitsDataModule(batch_size=64, resize_to=16)
    model = lt.ImageClassifier(backbone="resnet20", in_channels=1, image_size=16, lr=0.1)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=args.limit_batches, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=run_dir)
        trainer.fit(model, datamodule=data)
    data.setup("test")
    x, y = next(iter(data.test_dataloader()))

    folded = lt.fold_batch_norm(model, x[:2])  # the one line: an inference copy, the model is unchanged

    model.eval()
    with torch.no_grad():
        logits, folded_logits = model(x), folded(x)
    print(f"BatchNorm layers left in the folded copy: "
          f"{sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())}")
    print(f"largest logit difference: {float((logits - folded_logits).abs().max()):.2e}; "
          f"same predictions: {bool((logits.argmax(1) == folded_logits.argmax(1)).all())}; "
          f"test-batch accuracy: {float((folded_logits.argmax(1) == y).float().mean()):.3f}")


if __name__ == "__main__":
    main()
