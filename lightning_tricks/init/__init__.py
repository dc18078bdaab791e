"""Weight initialization: schemes on any ``nn.Module``, LSUV, activation statistics, and their callbacks.

Functional core (no Lightning needed): :func:`init_weights`, :func:`zero_init_residual`,
:func:`lsuv`, :func:`activation_statistics`, :func:`plot_activation_statistics`,
:func:`deep_network_statistics` (the lectures' experiment). Lightning shell: :class:`WeightInit`
and :class:`ActivationStatistics`.
"""

from lightning_tricks.init.callback import ActivationStatistics, WeightInit
from lightning_tricks.init.lsuv_init import LSUVLayer, lsuv
from lightning_tricks.init.schemes import (
    DEFAULT_LAYER_TYPES,
    KNOWN_RESIDUAL_BLOCKS,
    NONLINEARITIES,
    SCHEMES,
    init_weights,
    residual_norms,
    resolve_scheme,
    select_modules,
    zero_init_residual,
)
from lightning_tricks.init.statistics import (
    ACTIVATION_TYPES,
    LECTURE_CASES,
    LayerStatistics,
    activation_statistics,
    deep_network_statistics,
    plot_activation_statistics,
)

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_LAYER_TYPES",
    "KNOWN_RESIDUAL_BLOCKS",
    "LECTURE_CASES",
    "NONLINEARITIES",
    "SCHEMES",
    "ActivationStatistics",
    "LSUVLayer",
    "LayerStatistics",
    "WeightInit",
    "activation_statistics",
    "deep_network_statistics",
    "init_weights",
    "lsuv",
    "plot_activation_statistics",
    "residual_norms",
    "resolve_scheme",
    "select_modules",
    "zero_init_residual",
]
