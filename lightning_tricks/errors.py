"""The public error hierarchy: every error lightning-tricks raises on purpose is one of these.

Two roots, both under :class:`LightningTricksError`:

* :class:`ConfigError` -- something the user fixes in their arguments, files, model or data. It is
  also Lightning's ``MisconfigurationException``, so code that already catches Lightning's
  configuration errors catches ours. Each subclass is also the built-in type a Python user expects
  (``ValueError`` for a bad value, ``TypeError`` for an unsupported model or batch, ``FileNotFoundError``,
  ``RuntimeError`` for a failed run-time requirement).
* :class:`TrainingCheckError` -- a diagnosis of the training itself that the user asked to be fatal
  (``InitialLossCheck(fail=True)``).

The command line prints any of them as one line (exit status 2); ``LIGHTNING_TRICKS_DEBUG=1`` shows
the traceback.

Examples:
    >>> import lightning_tricks as lt
    >>> try:
    ...     lt.Cutout(p=2.0)
    ... except lt.errors.InvalidArgumentError as error:
    ...     print(error)
    `p`=2.0 is invalid: expected a number in [0.0, 1.0].
    >>> issubclass(lt.errors.InvalidArgumentError, ValueError)
    True
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException


class LightningTricksError(Exception):
    """The root of every error lightning-tricks raises on purpose; the CLI prints it as one line."""


class ConfigError(LightningTricksError, MisconfigurationException):
    """A problem the user fixes in their arguments, files, model or data; the message says how."""


class InvalidArgumentError(ConfigError, ValueError):
    """An argument outside its allowed values (the message names the argument, the value and what is allowed)."""


class StoppingArgumentError(InvalidArgumentError):
    """An invalid early-stopping argument; a ``MisconfigurationException`` as Lightning's ``EarlyStopping`` raises."""


class DataNotFoundError(ConfigError, FileNotFoundError):
    """A data folder or file that is not where the user said."""


class BatchFormatError(ConfigError, TypeError):
    """The batch does not have the shape a trick needs (where the inputs and targets are); the message says how to fix it."""


class TaskNotSupportedError(ConfigError, TypeError):
    """A trick was given a task (multi-label, dense, regression ...) it does not serve; the message says what to do."""


class ModelNotSupportedError(ConfigError, TypeError):
    """The model has nothing a trick can act on, or a module the trick was asked to change cannot be changed."""


class MissingExampleInputError(ConfigError, ValueError):
    """:func:`~lightning_tricks.fold_batch_norm` needs an input to trace, and the model has no ``example_input_array``."""


class NothingToMonitorError(ConfigError, ValueError):
    """The model has no module (or value) the monitor can watch (raised at setup, with what was looked for)."""


class MonitorNotFoundError(ConfigError, RuntimeError):
    """The monitored key is not among the logged metrics (a ``RuntimeError``, as Lightning raises)."""


class ForwardNotCalledError(ConfigError, RuntimeError):
    """The step of the evaluated stage called no model with its input, so test-time augmentation could not act."""


class ForwardOnBatchError(ConfigError, RuntimeError):
    """The model's forward could not run on the batch's input (a GAN's ``forward(z)``, a forward taking a dict ...)."""


class LayoutError(ConfigError, ValueError):
    """An input whose layout (images, sequences, flat features) cannot be told, or that the trick does not serve."""


class MixupTargetsUnusedError(ConfigError, RuntimeError):
    """Mixup mixed the images, but the training step did not give its targets to a label loss it serves."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: not a Lightning checkpoint, unknown class, bad weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses because it holds arbitrary Python objects."""


class UnknownTrickError(CheckpointError, ValueError):
    """A checkpoint records a trick that is not one of lightning_tricks' structural tricks."""


class WeightsMismatchError(ConfigError, RuntimeError):
    """A weights file whose keys or shapes do not fit the model's backbone."""


class UnverifiedLightningError(ConfigError, RuntimeError):
    """A feature that relies on Lightning's private state is used on a Lightning version it was not checked on."""


class LightningTricksDeprecationWarning(DeprecationWarning):
    """A renamed argument, value or module, still accepted until the release the message names.

    Shown once per calling line even outside ``__main__`` (Python hides a plain ``DeprecationWarning``
    raised from library code), so a YAML user sees it too; ``-W ignore::DeprecationWarning`` hides it.
    """


class TrainingCheckError(LightningTricksError, RuntimeError):
    """A check of the training itself failed and the user asked for it to be fatal."""


class InitialLossError(TrainingCheckError):
    """Raised by ``InitialLossCheck(fail=True)`` when the first loss is far from its expected value."""


class RecipeStopped(TrainingCheckError):
    """The recipe stopped on purpose (a failed babysit check without ``--keep-going``): exit status 1."""


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it, outermost first (``__cause__``, else ``__context__``), each once.

    Examples:
        >>> try:
        ...     try:
        ...         raise KeyError("inner")
        ...     except KeyError as inner:
        ...         raise RuntimeError("outer") from inner
        ... except RuntimeError as outer:
        ...     [type(e).__name__ for e in error_chain(outer)]
        ['RuntimeError', 'KeyError']
    """
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and all(cause is not c for c in chain):
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def user_error_in(error: BaseException) -> LightningTricksError | None:
    """The first :class:`LightningTricksError` in ``error``'s chain of causes (jsonargparse and Lightning wrap ours).

    Examples:
        >>> try:
        ...     try:
        ...         raise InvalidArgumentError("`p`=2 is invalid")
        ...     except ValueError as inner:
        ...         raise RuntimeError("wrapped") from inner
        ... except RuntimeError as outer:
        ...     print(user_error_in(outer))
        `p`=2 is invalid
    """
    return next((c for c in error_chain(error) if isinstance(c, LightningTricksError)), None)


__all__ = [
    "BatchFormatError",
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "ForwardNotCalledError",
    "ForwardOnBatchError",
    "InitialLossError",
    "InvalidArgumentError",
    "LayoutError",
    "LightningTricksDeprecationWarning",
    "LightningTricksError",
    "MissingExampleInputError",
    "MixupTargetsUnusedError",
    "ModelNotSupportedError",
    "MonitorNotFoundError",
    "NothingToMonitorError",
    "RecipeStopped",
    "StoppingArgumentError",
    "TaskNotSupportedError",
    "TrainingCheckError",
    "UnknownTrickError",
    "UnsafeCheckpointError",
    "UnverifiedLightningError",
    "WeightsMismatchError",
    "error_chain",
    "user_error_in",
]
