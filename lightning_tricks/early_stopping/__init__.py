"""Early stopping with the four classic triggers, restoring the best weights, the same on every DDP rank.

CS231n: "Early stopping: always do this. Stop training when accuracy on the validation set decreases,
or train for a long time but always keep track of the model snapshot that worked best on val."

Two layers, as everywhere in this package:

* the functional core, usable in any training loop without Lightning: :class:`StoppingRule` (the
  decision: feed it one monitored value per check, it says whether the value improved and whether
  to stop, and why; ``rules.py``) and :class:`WeightSnapshot` (a host-memory copy of a module's
  ``state_dict``, refreshed in place; ``snapshot.py``);
* :class:`EarlyStopping` (``callback.py``), a drop-in subclass of Lightning's ``EarlyStopping`` that
  accepts all of its arguments with the same meaning and adds ``restore_best_weights`` (default True),
  ``baseline``, ``start_from_epoch``, ``worse_for``, ``average_window``/``min_average_change``,
  ``threshold_mode`` and the inference of ``mode`` from the monitored name; every rank agrees on the
  monitored value before deciding (``agreement.py``), and the checkpoint holds the counters in the
  callback's state and the best weights under a key of their own, so a resumed run stops where the
  uninterrupted one would.

The rules, one check at a time (value ``v`` at epoch ``e``; "better" means lower for ``mode="min"``),
in Lightning's order, the first that fires being reported:

* ``check_finite``: a NaN or infinite ``v`` stops training.
* ``stopping_threshold`` / ``divergence_threshold``: ``v`` better / worse than the threshold stops
  training (a ``v`` that is also a new best counts as one, so its weights are the ones restored).
* *improvement*: ``v`` is better than the best so far by more than ``min_delta`` (``abs``) or by more
  than ``min_delta * |best|`` (``rel``). Only an improvement updates the best score and the copy of
  the best weights.
* *patience* (Lightning's): ``wait_count`` counts the checks since the last improvement; a check that
  is not an improvement stops training when it brings the count to ``patience`` (``patience=0``: the
  first one).
* *baseline* (Keras's): an improvement resets ``wait_count`` only if it also beats ``baseline``; an
  improving check never stops training. A run that improves at every check while staying worse than
  the baseline therefore runs on, and stops at its first non-improving check once ``patience``
  checks have passed since the last reset (reported as ``baseline`` while the best never beat it).
* *worse_for=N* (the "decrease in performance over N epochs" trigger; Prechelt's UP criterion): a
  check is *worsening* when it is not an improvement and is strictly worse than the previous check;
  stop after N consecutive worsening checks. Unlike patience, a plateau or any partial recovery
  resets it, so it stops early on a clear overfitting trend and never on a noisy plateau.
* *average change*: with ``average_window=N``, stop when the mean of ``|v_t - v_{t-1}|`` over the
  last N changes (the last N + 1 checks) is below ``min_average_change``.
* ``start_from_epoch``: checks at epochs before it are ignored (no best score, no counting, no
  weights kept) except that a non-finite value still stops training when ``check_finite``.

Counts are in checks, like Lightning's patience (one check per validation by default).
"""

from lightning_tricks.early_stopping.callback import BEST_WEIGHTS_KEY, EarlyStopping, MonitorNotFoundError
from lightning_tricks.early_stopping.rules import (
    LIGHTNING_REASON,
    MODES,
    THRESHOLD_MODES,
    TRIGGERS,
    StopDecision,
    StoppingArgumentError,
    StoppingRule,
)
from lightning_tricks.early_stopping.snapshot import WeightSnapshot

__all__ = ["BEST_WEIGHTS_KEY", "LIGHTNING_REASON", "MODES", "THRESHOLD_MODES", "TRIGGERS", "EarlyStopping",
           "MonitorNotFoundError", "StopDecision", "StoppingArgumentError", "StoppingRule", "WeightSnapshot"]
