"""Test-time augmentation: average the model's predictions over a fixed set of views of each input.

The lectures' "average a fixed set of crops at test time": AlexNet averages 5 crops and their flips,
ResNet resizes to several scales and takes 10 crops at each, and stochastic layers (dropout,
fractional pooling) "average out the randomness" over several passes.

Three layers:

* the functional core: :class:`TTAConfig` (a validated, YAML-friendly description of the views),
  :func:`apply_view`, :func:`merge_predictions` and :func:`tta_forward`, which runs all views of a
  batch that share a shape through the model as one batch of ``B * K`` rows (chunked by
  ``max_batch``), under ``torch.inference_mode`` when autograd is off;
* :class:`TTAWrapper`, a plain ``nn.Module`` around any model (no Lightning needed);
* :class:`TestTimeAugmentation`, the Lightning callback: during ``test`` and ``predict`` (and
  optionally ``validate``) it replaces ``forward`` of the model the steps call -- the LightningModule
  for ``self(x)`` and ``self.forward(x)``, the submodule for ``self.model(x)`` -- by the TTA forward, so
  the user's unmodified ``test_step`` and metrics see merged predictions; the original ``forward`` is
  put back at the end of the stage, also when the stage raises.

Modules: :mod:`~lightning_tricks.tta.config` (the views and their one validator),
:mod:`~lightning_tricks.tta.core` (the functional core), :mod:`~lightning_tricks.tta.wrapper` and
:mod:`~lightning_tricks.tta.callback`.
"""

from lightning_tricks.tta.callback import TTA_STAGES, ForwardNotCalledError, TestTimeAugmentation
from lightning_tricks.tta.config import MERGE_MODES, VIEW_FAMILIES, TTAConfig, View, validate_tta_hparams
from lightning_tricks.tta.core import apply_view, merge_predictions, tta_forward
from lightning_tricks.tta.wrapper import TTAWrapper

__all__ = [
    "MERGE_MODES",
    "TTA_STAGES",
    "VIEW_FAMILIES",
    "ForwardNotCalledError",
    "TTAConfig",
    "TTAWrapper",
    "TestTimeAugmentation",
    "View",
    "apply_view",
    "merge_predictions",
    "tta_forward",
    "validate_tta_hparams",
]
