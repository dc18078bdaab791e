"""lightning-tricks: the practice of CS231n's "Training Neural Networks" as drop-in Lightning callbacks.

Every public callback and mixin is re-exported here, so configs can say ``lightning_tricks.<Name>``.
"""

from lightning_tricks.ensemble import (
    EMAMembers,
    Ensemble,
    SnapshotEnsemble,
)
from lightning_tricks.evaluation import ExactDistributedEvaluation
from lightning_tricks.init import (
    ActivationStatistics,
    WeightInit,
)
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
from lightning_tricks.stopping import (
    EarlyStopping,
)
from lightning_tricks.tta import TestTimeAugmentation, TTAConfig, TTAWrapper
from lightning_tricks.zoo import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageClassifier,
    SyntheticDataModule,
)

__version__ = "0.1.0"

# Callbacks; `lightning-tricks --help` prints this list.
CALLBACKS: tuple[str, ...] = (
    "ActivationStatistics",
    "Cutout",
    "DeadUnitMonitor",
    "DivergenceStop",
    "DropConnect",
    "EMAMembers",
    "EarlyStopping",
    "ExactDistributedEvaluation",
    "FractionalMaxPooling",
    "InitialLossCheck",
    "Mixup",
    "SnapshotEnsemble",
    "StochasticDepth",
    "TestTimeAugmentation",
    "UpdateRatioMonitor",
    "WeightInit",
    "WeightPenalty",
)

__all__ = [
    "ActivationStatistics",
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
    "FractionalMaxPooling",
    "ImageClassifier",
    "InitialLossCheck",
    "Mixup",
    "SeededFractionalMaxPool2d",
    "SnapshotEnsemble",
    "StochasticDepth",
    "SyntheticDataModule",
    "TTAConfig",
    "TTAWrapper",
    "TestTimeAugmentation",
    "UpdateRatioMonitor",
    "WeightInit",
    "WeightPenalty",
    "__version__",
    "overfit_check",
]
