"""Every access to Lightning's private state, in one place (listed with reasons in ``docs/internals.md``).

Each function here exists because Lightning has no public route to what a trick needs; each says
which. They were verified against the Lightning versions in :data:`VERIFIED_LIGHTNING`. On another
version :func:`require_verified` refuses, with one line, the features whose failure would be silent
(a metric computed on the wrong samples), unless ``LIGHTNING_TRICKS_ALLOW_UNVERIFIED_LIGHTNING=1``;
the others fail loudly on their own when an attribute is gone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_tricks.errors import UnverifiedLightningError  # noqa: F401  (re-exported)

VERIFIED_LIGHTNING: tuple[str, ...] = ("2.6",)
"""Lightning minor versions these accesses were checked against (the test suite runs on them)."""
ALLOW_ENV = "LIGHTNING_TRICKS_ALLOW_UNVERIFIED_LIGHTNING"


def lightning_minor(version: str = lightning.__version__) -> str:
    """``"2.6"`` for ``"2.6.5"`` or ``"2.6.0rc1"``."""
    return ".".join(version.split(".")[:2])


def require_verified(feature: str, version: str = lightning.__version__) -> None:
    """Refuse ``feature`` on a Lightning version outside :data:`VERIFIED_LIGHTNING` (one line, how to proceed)."""
    if lightning_minor(version) in VERIFIED_LIGHTNING or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UnverifiedLightningError(
        f"{feature} replaces a private Lightning method and was verified on Lightning "
        f"{', '.join(VERIFIED_LIGHTNING)}.x, not {version}: install lightning=={VERIFIED_LIGHTNING[-1]}.*, turn the "
        f"feature off, or set {ALLOW_ENV}=1 to try it anyway.")


# == Monitoring and early stopping (monitoring/, early_stopping/, large_batch.py) ========================================
# Checked on lightning 2.6.6 and pytorch_lightning 2.6.6 (the same methods, at the same places, in both packages);
# Lightning's own EarlyStopping tests of 2.6.5 (../shared/conformance) mock and override these methods.


def callback_state_key(callback: Any, **identity: Any) -> str:
    """``callback._generate_state_key(**identity)``: the key of a callback's state in a checkpoint, built as
    Lightning's own callbacks build theirs (class name and the arguments that tell two instances apart).

    ``Callback._generate_state_key`` is the protected helper Lightning's callbacks use; there is no public
    equivalent, and a key built another way would not match the checkpoints written so far.
    """
    return callback._generate_state_key(**identity)


class EarlyStoppingHooks(LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` whose two private extension points call methods of a subclass.

    Lightning's ``on_validation_end``/``on_train_epoch_end`` run the check through
    ``_run_early_stopping_check(trainer)``, which decides through ``_evaluate_stopping_criteria(current)``;
    no public hook exists for either. A subclass overrides :meth:`_check` (the check) and :meth:`_decide` (the
    decision) instead, and reaches Lightning's own parts through :func:`lightning_stopping_decision`,
    :func:`stopping_decision` and :func:`log_stopping_info`. Lightning's tests mock both methods, on the
    instance and on Lightning's class: both stay honoured.
    """

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._check(trainer)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        return self._decide(current)

    def _check(self, trainer: pl.Trainer) -> None:
        """The check (default: Lightning's)."""
        super()._run_early_stopping_check(trainer)

    def _decide(self, current: Tensor) -> tuple[bool, str | None]:
        """The decision (default: Lightning's)."""
        return lightning_stopping_decision(self, current)


def lightning_stopping_decision(callback: EarlyStoppingHooks, current: Tensor) -> tuple[bool, str | None]:
    """Lightning's own ``EarlyStopping._evaluate_stopping_criteria`` for ``callback`` (looked up on Lightning's class
    at each call, so a patched one is honoured): ``(should_stop, reason)``; it updates ``best_score``,
    ``wait_count`` and ``stopping_reason``."""
    return super(EarlyStoppingHooks, callback)._evaluate_stopping_criteria(current)


def stopping_decision(callback: EarlyStoppingHooks, current: Tensor) -> tuple[bool, str | None]:
    """``callback._evaluate_stopping_criteria(current)``: the decision as Lightning's check takes it, so that an
    override or a mock on the instance (Lightning's tests use both) is honoured."""
    return callback._evaluate_stopping_criteria(current)


def log_stopping_info(trainer: pl.Trainer, message: str, log_rank_zero_only: bool) -> None:
    """``EarlyStopping._log_info``: Lightning's message format for early stopping (``[rank: r]`` prefixes under
    DDP, rank zero only on request), which its tests check."""
    LightningEarlyStopping._log_info(trainer, message, log_rank_zero_only)


# == (end of the monitoring and early-stopping section) ===========================================================


# -- evaluation loaders (ExactDistributedEvaluation, TTA, Ensemble) ------------------------------------------
# No public hook lets a callback replace the DistributedSampler Lightning puts on evaluation loaders: the
# loaders are wrapped inside the data connector, whatever their source (datamodule, module hooks, arguments).


def data_connector(trainer: pl.Trainer) -> Any:
    """``trainer._data_connector``: where every loader of every stage is prepared."""
    return trainer._data_connector


PREPARE_DATALOADER = "_prepare_dataloader"
"""The connector method that gives a loader its sampler; replaced per instance for the exact stages."""
REQUIRES_DISTRIBUTED_SAMPLER = "_requires_distributed_sampler"
"""The connector method that says whether Lightning would add a DistributedSampler to a loader."""


def rebuild_dataloader(dataloader: DataLoader, **overrides: Any) -> DataLoader:
    """A copy of ``dataloader`` with other constructor arguments, the way Lightning rebuilds loaders for DDP
    (keeping a DataLoader subclass's own arguments); there is no public equivalent."""
    from lightning.fabric.utilities.data import _reinstantiate_wrapped_cls
    from lightning.pytorch.utilities.data import _get_dataloader_init_args_and_kwargs

    args, kwargs = _get_dataloader_init_args_and_kwargs(dataloader, dataloader.sampler)
    kwargs.update(overrides)
    return _reinstantiate_wrapped_cls(dataloader, *args, **kwargs)


# -- the training loader during Callback.setup (LSUV, fractional pooling's probe) ----------------------------
# Loaders given to ``trainer.fit(train_dataloaders=...)`` are reachable only through the fit loop's data
# source until the loop builds them, after ``Callback.setup``. Public routes are tried first.


def _first_loader(loader: Any) -> Any:
    while isinstance(loader, (Mapping, list, tuple)) and loader:  # a collection of loaders: use the first
        loader = next(iter(loader.values())) if isinstance(loader, Mapping) else loader[0]
    return loader


def fit_train_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any | None:
    """The training loader of the current ``fit``, from ``Callback.setup`` on; None when there is none.

    Public routes first: the datamodule's ``train_dataloader``, then the module's own. Loaders passed to
    ``trainer.fit(train_dataloaders=...)`` come from the fit loop's data source (private).
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and _overrides(datamodule, pl.LightningDataModule, "train_dataloader"):
        return _first_loader(datamodule.train_dataloader())
    source = trainer.fit_loop._data_source
    if source.is_defined():
        return _first_loader(source.dataloader())
    if _overrides(pl_module, pl.LightningModule, "train_dataloader"):
        return _first_loader(pl_module.train_dataloader())
    return None


def _overrides(obj: Any, base: type, name: str) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def prepared_train_dataloader(trainer: pl.Trainer) -> Any | None:
    """The training loader as the fit loop will iterate it (``DistributedSampler`` added under DDP), from
    ``on_fit_start`` on; None when there is none (Standardize's statistics pass).

    ``fit_loop.setup_data()`` is what the fit loop itself calls first when it runs (it is then a no-op), and
    ``trainer.train_dataloader`` returns what it set up; there is no public way to have the loader built earlier.
    """
    trainer.fit_loop.setup_data()
    return _first_loader(trainer.train_dataloader)


# -- what the current training step logged (DivergenceStop on manual optimization) ---------------------------
# ``trainer.callback_metrics`` (public) mixes this step's values with stale ones of other stages (the last
# validation epoch's ``val_loss``); only the training loop's result collection tells what this step logged.


def training_step_logged(trainer: pl.Trainer) -> dict[str, Any]:
    """The values logged with ``on_step=True`` (``self.log``'s default in ``training_step``) in the current
    training step, by name (a metric also logged per epoch appears once, without its ``_step`` suffix);
    ``{}`` outside a training step."""
    results = trainer._results
    if results is None or not getattr(results, "training", False):
        return {}
    logged = results.metrics(True)["callback"]
    return {name: value for name, value in logged.items() if not (name.endswith("_step") and name[:-5] in logged)}


# -- pytorch_lightning modules in our CLI ----------------------------------------------------------------------
# LightningCLI records a module's class and arguments in its hyperparameters (``_class_path``: what an Ensemble
# reads to rebuild a member, and ``load_from_checkpoint`` to re-instantiate) through an instantiator that sets
# lightning.pytorch's private hyperparameter context. A pytorch_lightning module reads pytorch_lightning's context,
# so it registers pytorch_lightning's own instantiator (``pytorch_lightning.cli._InstantiatorFn``) for its classes.


def add_legacy_instantiators(cli: Any) -> None:
    """Make ``cli`` record ``_class_path`` and the arguments of a ``pytorch_lightning`` module or datamodule too."""
    import sys

    legacy = sys.modules.get("pytorch_lightning")
    if legacy is None:
        return
    from pytorch_lightning.cli import _InstantiatorFn

    for key, base in (("model", legacy.LightningModule), ("data", legacy.LightningDataModule)):
        cli.parser.add_instantiator(_InstantiatorFn(cli=cli, key=key), base, subclasses=True)


# == evaluation, Ensemble, TTA, tune (the after-training and tuning tricks) =====================================
# -- exact evaluation: the connector's `_prepare_dataloader` and the strategy's `reduce` (exact_evaluation.py) ---------
# Checked on Lightning 2.6.5 and 2.6.6; `require_verified` refuses the feature on other minor versions, and a
# connector without these methods is one UnverifiedLightningError line. The replacements are instance attributes,
# removed again when the last owner (ExactDistributedEvaluation, TestTimeAugmentation, Ensemble) is done.

EXACT_EVALUATION_ATTR = "_lt_exact_evaluation"
"""The connector attribute that holds the shared exact-evaluation patch while one is installed."""


def exact_evaluation_patch(trainer: pl.Trainer) -> Any | None:
    """The exact-evaluation patch installed on ``trainer`` (None when there is none)."""
    return getattr(data_connector(trainer), EXACT_EVALUATION_ATTR, None)


def set_exact_evaluation_patch(trainer: pl.Trainer, patch: Any | None) -> None:
    """Keep ``patch`` with ``trainer``'s data connector (None removes it)."""
    connector = data_connector(trainer)
    if patch is not None:
        setattr(connector, EXACT_EVALUATION_ATTR, patch)
    elif EXACT_EVALUATION_ATTR in connector.__dict__:
        delattr(connector, EXACT_EVALUATION_ATTR)


def replace_prepare_dataloader(trainer: pl.Trainer, replacement: Any) -> Any:
    """Route every loader Lightning prepares (any stage, any source) through ``replacement(dataloader, shuffle,
    mode)``; returns Lightning's own method, to call for the loaders left alone.

    Raises:
        UnverifiedLightningError: this Lightning has no ``DataConnector._prepare_dataloader`` or
            ``_requires_distributed_sampler``.
    """
    connector = data_connector(trainer)
    missing = [name for name in (PREPARE_DATALOADER, REQUIRES_DISTRIBUTED_SAMPLER)
               if not callable(getattr(connector, name, None))]
    if missing:
        raise UnverifiedLightningError(
            f"Exact distributed evaluation needs Lightning's DataConnector.{' and '.join(missing)} (checked on "
            f"Lightning 2.6), which Lightning {lightning.__version__} does not have: pin lightning to 2.6 or turn "
            "exact distributed evaluation off.")
    original = getattr(connector, PREPARE_DATALOADER)
    setattr(connector, PREPARE_DATALOADER, replacement)
    return original


def restore_prepare_dataloader(trainer: pl.Trainer, replacement: Any) -> None:
    """Undo :func:`replace_prepare_dataloader` (only if ``replacement`` is still the one in place)."""
    connector = data_connector(trainer)
    if connector.__dict__.get(PREPARE_DATALOADER) == replacement:
        delattr(connector, PREPARE_DATALOADER)


def requires_distributed_sampler(trainer: pl.Trainer, dataloader: DataLoader) -> bool:
    """Whether Lightning would give ``dataloader`` a ``DistributedSampler`` (not when the user set one, or set
    ``use_distributed_sampler=False``)."""
    return bool(getattr(data_connector(trainer), REQUIRES_DISTRIBUTED_SAMPLER)(dataloader))


def replace_strategy_reduce(strategy: Any, wrap: Any, kind: type) -> None:
    """Set ``strategy.reduce`` to ``wrap(strategy.reduce)`` on the instance, unless a ``kind`` is there already.

    ``self.log(..., sync_dist=True)`` reduces through ``strategy.reduce`` and no hook lets a callback change
    how; Lightning stores the function in each logged key's metadata, so ``wrap``'s result must compare equal
    to the original (see ``evaluation._ExactMeanReduce``).
    """
    if not isinstance(strategy.reduce, kind):
        strategy.reduce = wrap(strategy.reduce)


def restore_strategy_reduce(strategy: Any, kind: type) -> None:
    """Undo :func:`replace_strategy_reduce`: the class's own ``reduce`` again."""
    if isinstance(strategy.__dict__.get("reduce"), kind):
        del strategy.reduce
