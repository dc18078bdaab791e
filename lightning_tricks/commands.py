"""The ``lightning-tricks`` script: LightningCLI's subcommands and the course's own.

``fit``/``validate``/``test``/``predict`` go to :mod:`lightning_tricks.cli` (a LightningCLI);
``tune`` and ``babysit`` to :mod:`lightning_tricks.tuning.cli`; ``recipe`` to
:mod:`lightning_tricks.recipe.cli`. This module sits above all three, so that the training
commands build on the main CLI and the main CLI knows nothing of them (no import circle).
"""

from __future__ import annotations

import sys

OWN_SUBCOMMANDS = ("tune", "babysit", "recipe")
"""The subcommands that are not LightningCLI's."""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-tricks`` script (also ``python -m lightning_tricks``).

    Every subcommand prints a ``lightning_tricks.errors`` error as one line and exits with status 2
    (``recipe`` exits 1 when it stops on a failed babysit check); ``LIGHTNING_TRICKS_DEBUG=1`` shows the
    traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    # imported on use: `fit` should not pay for Optuna's import, nor `tune` for the recipe's
    if command == "recipe":
        from lightning_tricks.recipe.cli import main as recipe_main

        recipe_main(argv[1:])
    elif command in ("tune", "babysit"):
        from lightning_tricks.tuning.cli import main as tuning_main

        tuning_main(argv)
    else:
        from lightning_tricks.cli import main as cli_main

        cli_main(argv)


__all__ = ["OWN_SUBCOMMANDS", "main"]
