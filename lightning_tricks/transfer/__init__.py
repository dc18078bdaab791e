"""Transfer learning: find and replace the classifier head, freeze all but the last blocks, load local weights.

CS231n: "Transfer learning with CNNs: train on a big dataset (or take a trained network), then for a
small dataset of C classes reinitialize the last layer and train only it; with more data, fine-tune
more layers." The functional core, usable without Lightning:

* :func:`find_head` names the classifier (a timm model's ``pretrained_cfg["classifier"]``, else the
  last ``nn.Linear``/``nn.Conv2d`` registered), or checks a name the user gives;
* :func:`replace_head` puts a freshly initialized layer for ``num_classes`` classes in its place;
* :func:`backbone_units` cuts the rest of the model into ordered *units* (a residual block, or a
  layer with weights together with the normalization layers that follow it) so that ``last:K`` means
  the same thing on torchvision, timm, zoo and plain models;
* :func:`freeze` trains the head plus ``"head"`` / ``"last:K"`` / ``"all"`` units, puts every frozen
  unit in eval mode (BatchNorm running statistics do not drift, dropout is off), and
  :func:`param_groups` splits the parameters into head and backbone groups for discriminative learning
  rates;
* :func:`load_weights` reads a local file (a Lightning checkpoint, a torchvision or timm
  ``state_dict``, ``.safetensors``), aligns its key prefixes with the model's, skips the head, and
  lists every missing, unexpected or mis-shaped key in one message. Nothing is ever downloaded.

:class:`Finetune` (:mod:`lightning_tricks.transfer.finetune`) is the Lightning callback built on these. The core
is in :mod:`lightning_tricks.transfer.freezing` and :mod:`lightning_tricks.transfer.weights`; this package re-exports
every public name (card: ``docs/transfer.md``, example: ``examples/transfer.yaml``).
"""

from lightning_tricks.errors import WeightsMismatchError
from lightning_tricks.transfer.finetune import Finetune, check_finetune_args
from lightning_tricks.transfer.freezing import (
    HEAD_TYPES,
    FreezePlan,
    Unit,
    apply_freeze,
    backbone_units,
    find_head,
    freeze,
    new_head_like,
    param_groups,
    parse_train,
    plan_freeze,
    replace_head,
    set_unit_modes,
)
from lightning_tricks.transfer.weights import LoadReport, load_weights, read_state_dict

__all__ = [
    "HEAD_TYPES",
    "Finetune",
    "FreezePlan",
    "LoadReport",
    "Unit",
    "WeightsMismatchError",
    "apply_freeze",
    "backbone_units",
    "check_finetune_args",
    "find_head",
    "freeze",
    "load_weights",
    "new_head_like",
    "param_groups",
    "parse_train",
    "plan_freeze",
    "read_state_dict",
    "replace_head",
    "set_unit_modes",
]
