"""What every trick shares, and nothing a single trick owns.

- :mod:`~lightning_tricks.core.task`: the task contract (what the model outputs, what the targets are).
- :mod:`~lightning_tricks.core.batch`: where the inputs and targets are in a batch (one accessor).
- :mod:`~lightning_tricks.core.selection`: which modules or parameters a trick acts on (one selector).
- :mod:`~lightning_tricks.core.validation`: argument checks; the errors are in :mod:`lightning_tricks.errors`.
- :mod:`~lightning_tricks.core.deprecation`: renamed arguments, accepted for one release.
- :mod:`~lightning_tricks.core.callback`, :mod:`~lightning_tricks.core.randomness`,
  :mod:`~lightning_tricks.core.seeding`, :mod:`~lightning_tricks.core.distributed`: the callback shell,
  owned randomness and DDP helpers every trick uses.
- :mod:`~lightning_tricks.core.surgery`, :mod:`~lightning_tricks.core.stochastic`,
  :mod:`~lightning_tricks.core.model_probe`, :mod:`~lightning_tricks.core.layout`,
  :mod:`~lightning_tricks.core.training_style`, :mod:`~lightning_tricks.core.lightning_classes`: what tricks
  need to know about the model and the way it is trained.
- :mod:`~lightning_tricks.core.checkpoint_io`, :mod:`~lightning_tricks.core.cli_errors`,
  :mod:`~lightning_tricks.core.runtime_errors`, :mod:`~lightning_tricks.core.monitor_mode`: loading files,
  one-line messages and a monitored metric's direction.

Nothing here imports a trick.
"""
