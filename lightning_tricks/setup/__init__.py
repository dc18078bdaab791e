"""One-time setup beyond initialization and regularization: activations, preprocessing, BatchNorm folding."""

from lightning_tricks.setup.bn_folding import FoldReport, fold_batch_norm

__all__ = ["FoldReport", "fold_batch_norm"]
