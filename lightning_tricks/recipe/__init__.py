"""The lectures' course as one command: ``lightning-tricks recipe --config X`` (and :func:`run_recipe`).

Baseline, babysit, a 2-stage search, the best trial trained to the end with restore-best early stopping,
an ensemble, test-time augmentation; a report and a figure against the baseline; resumable.

* :mod:`~lightning_tricks.recipe.cli`: the command, :func:`run_recipe`, the step loop;
* :mod:`~lightning_tricks.recipe.steps`: the six steps and the one evaluator they share;
* :mod:`~lightning_tricks.recipe.search`: ``tune``'s study with a sampler a resumed search draws again;
* :mod:`~lightning_tricks.recipe.state`: the state file; :mod:`~lightning_tricks.recipe.report`: report and figure.
"""

from lightning_tricks.recipe.cli import RecipeStopped, recipe_main, run_recipe
from lightning_tricks.recipe.steps import ENSEMBLES, STEPS

__all__ = ["ENSEMBLES", "STEPS", "RecipeStopped", "recipe_main", "run_recipe"]
