"""Training diagnostics from CS231n's "babysitting the learning process": dead and saturated units,
update/weight ratios, the initial-loss check, the overfit-a-small-sample check, the stop on a diverging
loss, and their plots."""

from lightning_tricks.monitoring.dead_unit_monitor import DeadUnitMonitor
from lightning_tricks.monitoring.dead_units import (
    ACTIVATION_TYPES,
    DEFAULT_ACTIVATIONS,
    DeadUnitReport,
    DeadUnitTracker,
    NothingToMonitorError,
    SiteReport,
    WatchedModule,
    find_watched_modules,
)
from lightning_tricks.monitoring.divergence import DivergenceStop
from lightning_tricks.monitoring.initial_loss import (
    InitialLossCheck,
    InitialLossError,
    OverfitReport,
    expected_initial_loss,
    overfit_check,
)
from lightning_tricks.monitoring.plots import (
    dead_unit_heatmap,
    figure_to_array,
    log_figure,
    save_figure,
    update_ratio_plot,
)
from lightning_tricks.monitoring.update_ratio import UpdateRatioMonitor, median_ratio, snapshot, update_ratios

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_ACTIVATIONS",
    "DeadUnitMonitor",
    "DeadUnitReport",
    "DeadUnitTracker",
    "DivergenceStop",
    "InitialLossCheck",
    "InitialLossError",
    "NothingToMonitorError",
    "OverfitReport",
    "SiteReport",
    "UpdateRatioMonitor",
    "WatchedModule",
    "dead_unit_heatmap",
    "expected_initial_loss",
    "figure_to_array",
    "find_watched_modules",
    "log_figure",
    "median_ratio",
    "overfit_check",
    "save_figure",
    "snapshot",
    "update_ratio_plot",
    "update_ratios",
]
