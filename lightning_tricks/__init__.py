"""lightning-tricks: the practice of CS231n's "Training Neural Networks" as drop-in Lightning callbacks.

Every public callback and mixin is re-exported here, so configs can say ``lightning_tricks.<Name>``.
"""

from lightning_tricks import errors
from lightning_tricks.checkpoint import apply_recorded_tricks, load_from_checkpoint
from lightning_tricks.core.model_probe import infer_num_classes
from lightning_tricks.early_stopping import (
    EarlyStopping,
)
from lightning_tricks.ensemble import (
    EMAMembers,
    Ensemble,
    SnapshotEnsemble,
)
from lightning_tricks.exact_evaluation import ExactDistributedEvaluation
from lightning_tricks.init import (
    ActivationStatistics,
    WeightInit,
)
from lightning_tricks.large_batch import LargeBatchScaling
from lightning_tricks.monitoring import (
    DeadUnitMonitor,
    DeadUnitTracker,
    DivergenceStop,
    InitialLossCheck,
    UpdateRatioMonitor,
    overfit_check,
)
from lightning_tricks.regularization import (
    BatchTransformMixin,
    Cutout,
    DropConnect,
    DropConnectConv2d,
    DropConnectLinear,
    FractionalMaxPooling,
    Mixup,
    SeededFractionalMaxPool2d,
    StochasticDepth,
    WeightPenalty,
)
from lightning_tricks.setup import (
    ActivationSwap,
    BatchAugment,
    FoldReport,
    Maxout,
    MaxoutConv2d,
    Standardize,
    fold_batch_norm,
    swap_activations,
)
from lightning_tricks.transfer import Finetune
from lightning_tricks.tta import TestTimeAugmentation, TTAConfig, TTAWrapper
from lightning_tricks.zoo import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageClassifier,
    MNIST1DDataModule,
    SyntheticDataModule,
)

__version__ = "0.1.0"

# Callbacks; `lightning-tricks --help` prints this list.
CALLBACKS: tuple[str, ...] = (
    "ActivationStatistics",
    "ActivationSwap",
    "BatchAugment",
    "Cutout",
    "DeadUnitMonitor",
    "DivergenceStop",
    "DropConnect",
    "EMAMembers",
    "EarlyStopping",
    "ExactDistributedEvaluation",
    "Finetune",
    "FractionalMaxPooling",
    "InitialLossCheck",
    "LargeBatchScaling",
    "Mixup",
    "SnapshotEnsemble",
    "Standardize",
    "StochasticDepth",
    "TestTimeAugmentation",
    "UpdateRatioMonitor",
    "WeightInit",
    "WeightPenalty",
)

__all__ = [
    "ActivationStatistics",
    "ActivationSwap",
    "BatchAugment",
    "BatchTransformMixin",
    "CALLBACKS",
    "CIFAR10DataModule",
    "Cutout",
    "DeadUnitMonitor",
    "DeadUnitTracker",
    "DigitsDataModule",
    "DivergenceStop",
    "DropConnect",
    "DropConnectConv2d",
    "DropConnectLinear",
    "EMAMembers",
    "EarlyStopping",
    "Ensemble",
    "ExactDistributedEvaluation",
    "Finetune",
    "FoldReport",
    "FractionalMaxPooling",
    "ImageClassifier",
    "InitialLossCheck",
    "LargeBatchScaling",
    "MNIST1DDataModule",
    "Maxout",
    "MaxoutConv2d",
    "Mixup",
    "SeededFractionalMaxPool2d",
    "SnapshotEnsemble",
    "Standardize",
    "StochasticDepth",
    "SyntheticDataModule",
    "TTAConfig",
    "TTAWrapper",
    "TestTimeAugmentation",
    "UpdateRatioMonitor",
    "WeightInit",
    "WeightPenalty",
    "__version__",
    "apply_recorded_tricks",
    "errors",
    "fold_batch_norm",
    "infer_num_classes",
    "load_from_checkpoint",
    "overfit_check",
    "swap_activations",
]
