"""Training dynamics from CS231n: the babysitting steps, and random coarse-to-fine hyperparameter search on Optuna.

* ``lightning-tricks tune`` (:mod:`lightning_tricks.tuning.study`): a study of trials, each the ``fit``
  config with values drawn from a search-space file (:mod:`lightning_tricks.tuning.space`), stored in
  a database, with pruning that takes the same decision on every DDP rank
  (:class:`~lightning_tricks.tuning.pruning.TrialPruning`) and the lectures' figures
  (:mod:`lightning_tricks.tuning.report`).
* ``lightning-tricks babysit`` (:mod:`lightning_tricks.tuning.babysit`): the lectures' steps 1-3.

Optuna is imported only when a study runs, so ``import lightning_tricks`` stays light.
"""

from lightning_tricks.tuning.pruning import CurveRecorder, TrialPruning
from lightning_tricks.tuning.space import Distribution, SearchSpace, load_search_space, narrow

__all__ = ["CurveRecorder", "Distribution", "SearchSpace", "TrialPruning", "load_search_space", "narrow"]
