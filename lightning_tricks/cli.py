"""The ``lightning-tricks`` command: a LightningCLI in subclass mode.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path, the user's own
included. The zoo's ``ImageClassifier`` is the default model; the digits datamodule is the default
data of our own models only (``ImageClassifier``, ``Ensemble``): a model of your own with its own
``*_dataloader`` methods trains on them (``--data null`` says so explicitly). Our callbacks are imported here, so ``--trainer.callbacks+=Cutout``
resolves short names, and ``EarlyStopping`` (a name Lightning exports too) means ours. A class you name
starts from its own constructor defaults: the zoo's defaults belong to the zoo's classes only.

What the command adds to a plain LightningCLI, each for a newcomer's first hour:

* argument errors in one line (the argument, the bad value, the valid choices, a did-you-mean), exit 2;
* ``fit`` stops at the first non-finite training loss (:class:`~lightning_tricks.DivergenceStop`,
  ``--divergence_stop=false`` turns it off);
* when standard output is not a terminal, one line per epoch instead of progress bars, and two
  Lightning messages that are noise in every run are quieted (the "Tip" advertisements and a torch
  ``LeafSpec`` deprecation raised inside Lightning); warnings about your own code are untouched;
* no ``config.yaml`` written into the working directory of a run that has no logger.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import lightning.pytorch.callbacks as pl_callbacks
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

import lightning_tricks
from lightning_tricks.core.cli_errors import debugging, missing_file_message, one_line, option_strings
from lightning_tricks.core.lightning_classes import (
    LEGACY,
    datamodule_types,
    is_overridden,
    lightning_module_types,
    lightning_types,
    package_of,
)
from lightning_tricks.core.runtime_errors import explain_runtime_error
from lightning_tricks.errors import user_error_in
from lightning_tricks.monitoring.divergence import DivergenceStop

PROG = "lightning-tricks"
ZOO_MODEL = "lightning_tricks.zoo.ImageClassifier"
ZOO_DATA = "lightning_tricks.zoo.DigitsDataModule"
# ckpt_path values Lightning resolves itself rather than reading a file
_CKPT_KEYWORDS = ("last", "best", "hpc")


def _fail(line: str) -> None:
    sys.stderr.write(f"{PROG}: error: {line}\n")
    raise SystemExit(2)


class TricksArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line (argument, bad value, choices, did-you-mean), exit 2.

    jsonargparse calls ``error`` with ``exit_on_error=False`` while it tries alternatives (a value
    against each type of a Union); those are left to it. Only the final report is shortened.
    ``--help`` is not an error and prints everything. ``LIGHTNING_TRICKS_DEBUG=1`` restores the full text.
    """

    @override
    def add_lightning_class_args(self, lightning_class: Any, nested_key: str, subclass_mode: bool = False,
                                 required: bool = True) -> list[str]:
        """``--model``/``--data`` take a subclass of either package's LightningModule/LightningDataModule."""
        bases = {"model": lightning_module_types(load=True), "data": datamodule_types(load=True)}.get(nested_key)
        if subclass_mode and bases and lightning_class in bases:
            return self.add_subclass_arguments(bases, nested_key, fail_untyped=False, required=required)
        return super().add_lightning_class_args(lightning_class, nested_key, subclass_mode, required)

    @override
    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or debugging():
            return super().error(message, ex)
        _fail(one_line(message, option_strings(self)))


class _QuietSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's log folder, and nowhere when the run has none.

    Lightning's callback writes into ``trainer.log_dir``, which is the working directory for a run with
    no logger and no ``default_root_dir``: an example run from a repository would leave a
    ``config.yaml`` in it. A run that keeps no logs keeps no config either.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: LightningModule, stage: str) -> None:
        root_given = self.config.get("trainer", Namespace()).get("default_root_dir") is not None
        if trainer.logger is None and not root_given:
            return
        super().setup(trainer, pl_module, stage)


class _EpochLines(Callback):
    """One line per training epoch with the epoch's metrics: the progress bar's replacement off a terminal."""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("_step"))
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(f"Epoch {trainer.current_epoch + 1}{total}: {shown}", flush=True)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning_noise() -> None:
    """Quiet two messages at their source, nothing else: warnings about the user's code stay visible.

    * Lightning's "💡 Tip: ... litlogger / litmodels" advertisements (rank-zero info logs);
    * torch's ``isinstance(treespec, LeafSpec)`` deprecation, raised from inside Lightning's
      ``utilities/_pytree.py`` (a Lightning matter, not the user's).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"(lightning\.pytorch|pytorch_lightning)\.utilities\._pytree")


def _shadowed_callbacks() -> list[str]:
    """Our callbacks whose short name Lightning exports too (EarlyStopping): in our CLI the name means ours."""
    return [name for name in lightning_tricks.CALLBACKS if hasattr(pl_callbacks, name)]


def prefer_our_callbacks(args: list[str]) -> list[str]:
    """``--trainer.callbacks+=EarlyStopping`` -> ``lightning_tricks.EarlyStopping``, saying so in one line."""
    shadowed = set(_shadowed_callbacks())
    out = list(args)
    for i, arg in enumerate(out):
        option, sep, value = arg.partition("=")
        if sep and option in ("--trainer.callbacks", "--trainer.callbacks+") and value in shadowed:
            out[i] = f"{option}=lightning_tricks.{value}"
        elif not sep and i > 0 and out[i - 1] in ("--trainer.callbacks", "--trainer.callbacks+") and arg in shadowed:
            value, out[i] = arg, f"lightning_tricks.{arg}"
        else:
            continue
        sys.stderr.write(f"{PROG}: {value} is lightning_tricks.{value}; for Lightning's own class write "
                         f"lightning.pytorch.callbacks.{value}\n")
    return out


def _callbacks_epilog() -> str:
    names = ", ".join(lightning_tricks.CALLBACKS) or "(none yet)"
    shadowed = ", ".join(_shadowed_callbacks())
    return (
        f"lightning-tricks callbacks (use as --trainer.callbacks+=NAME or class_path: lightning_tricks.NAME; "
        f"on the command line {shadowed or 'a name Lightning exports too'} means ours, write "
        f"lightning.pytorch.callbacks.NAME for Lightning's): {names}. "
        "Zoo: --model ImageClassifier (default) | Ensemble, whose default data is DigitsDataModule | --data DigitsDataModule "
        "| CIFAR10DataModule | SyntheticDataModule, or any class path of your own; a model of your own with "
        "its own *_dataloader methods needs no --data. "
        "fit stops at the first NaN/inf training loss (DivergenceStop); --divergence_stop=false turns that off. "
        "Off a terminal, progress bars become one line per epoch (--trainer.enable_progress_bar=true keeps them). "
        "Three more subcommands take the same config: `lightning-tricks babysit --help` (the lectures' first "
        "checks: initial loss, overfit a sample, a learning-rate search), `lightning-tricks tune --help` "
        "(random coarse-to-fine hyperparameter search on Optuna) and `lightning-tricks recipe --help` (the "
        "lectures' whole course in order: baseline, babysit, a 2-stage search, the best setting trained with "
        "early stopping, an ensemble, test-time augmentation; a report of what each step bought)."
    )


def _data_given(argv: list[str], subcommand: str | None) -> bool:
    """Whether the command line or one of its config files sets ``data``."""
    for i, arg in enumerate(argv):
        if arg == "--data" or arg.startswith(("--data=", "--data.")):
            return True
        if arg in ("-c", "--config") and i + 1 < len(argv):
            source = argv[i + 1]
        elif arg.startswith("--config="):
            source = arg.split("=", 1)[1]
        else:
            continue
        try:
            text = Path(source).read_text() if Path(source).is_file() else source
            config = yaml.safe_load(text)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and ("data" in config or "data" in (config.get(subcommand) or {})):
            return True
    return False


def _import_class(class_path: str | None) -> Any:
    module, _, name = (class_path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


_ZOO_DEFAULTS = {"model": ZOO_MODEL, "data": ZOO_DATA}


def _without_print_config(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--print_config" and not a.startswith("--print_config=")]


def _is_our_model(class_path: str | None) -> bool:
    """Whether the model class is one of this package's (the zoo's ImageClassifier, Ensemble), not the user's."""
    cls = _import_class(class_path)
    return cls is not None and getattr(cls, "__module__", "").split(".")[0] == "lightning_tricks"


class TricksCLI(LightningCLI):
    """LightningCLI with the zoo as defaults, one-line errors, a NaN stop, and the final metrics printed."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({key: {"class_path": path} for key, path in _ZOO_DEFAULTS.items()})
        self._zoo_default_parsers = [*getattr(self, "_zoo_default_parsers", []), parser]
        parser.add_argument(
            "--divergence_stop", type=bool, default=True,
            help="fit: stop at the first NaN/inf training loss with one line saying so (adds "
                 "lightning_tricks.DivergenceStop(factor=null) unless trainer.callbacks holds one); false: off.")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = None
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            if self._start_from_chosen_classes():
                super().parse_arguments(parser, args)
        else:
            argv = prefer_our_callbacks(list(sys.argv[1:] if args is None else args))
            first = _without_print_config(argv)  # --print_config prints (and exits) in the final parse only
            self.config = parser.parse_args(first)
            if self._start_from_chosen_classes() or first != argv:
                self.config = parser.parse_args(argv)
        self._check_ckpt_path()
        self._default_data(argv)

    def _node(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _start_from_chosen_classes(self) -> bool:
        """Make the chosen ``--model``/``--data`` class the parser's default; True when it was another (parse again).

        The zoo's classes are the parser's defaults, and jsonargparse keeps every default value whose name and
        type the newly chosen class accepts: ``--model my_pkg.MyNet`` would train MyNet with the zoo's ``lr``,
        ``num_classes``, ``in_channels``... (and ``--data`` a datamodule with the digits' ``batch_size``). Parsed
        again from the chosen class as default, a class starts from its own signature; what the command line
        and the config files set applies on top, as before.
        """
        node, chosen = self._node(), {}
        for key, zoo_path in _ZOO_DEFAULTS.items():
            spec = node.get(key)
            class_path = spec.get("class_path") if isinstance(spec, (Namespace, dict)) else None
            if class_path and _import_class(class_path) is not _import_class(zoo_path):
                chosen[key] = {"class_path": class_path}
        for parser in getattr(self, "_zoo_default_parsers", []) if chosen else []:
            parser.set_defaults(chosen)
        return bool(chosen)

    def _check_ckpt_path(self) -> None:
        path = self._node().get("ckpt_path")
        if path is None or str(path) in _CKPT_KEYWORDS or "://" in str(path) or str(path).startswith("registry"):
            return
        if not Path(path).exists():
            _fail(missing_file_message("ckpt_path", str(path), (".ckpt", ".pt", ".pth")))

    def _default_data(self, argv: list[str] | None) -> None:
        """Drop the default digits datamodule when the model is the user's and the user gave no data.

        The digits default stays in the parser (so ``--data.batch_size=32`` tunes it); it belongs to our
        own models only: a model of your own runs on its own ``*_dataloader`` methods unless ``--data``
        (or a config's ``data:``) names a datamodule.
        """
        node = self._node()
        model = node.get("model")
        if argv is None or node.get("data") is None or model is None or _is_our_model(model.get("class_path")):
            return
        if not _data_given(argv, self.config.get("subcommand")):
            node.data = None

    @override
    def before_instantiate_classes(self) -> None:
        from lightning_tricks._lightning_internals import add_legacy_instantiators

        add_legacy_instantiators(self)  # a pytorch_lightning module's checkpoint records its class too

    def _use_the_models_package(self) -> None:
        """A ``pytorch_lightning`` module trains in ``pytorch_lightning.Trainer`` (Lightning refuses to mix the two).

        Lightning's own callbacks named in the config (``lightning.pytorch.callbacks.ModelCheckpoint``...) are built
        as their ``pytorch_lightning`` twins with the same arguments, so that this Trainer recognizes them; our
        callbacks serve either Trainer. A datamodule of the other package cannot be mixed: one line says so.
        """
        package = package_of(self.model)
        if self.datamodule is not None and package_of(self.datamodule) not in (package, None):
            _fail(f"--data: {type(self.datamodule).__name__} is a {package_of(self.datamodule)} LightningDataModule "
                  f"and {type(self.model).__name__} a {package} LightningModule; Lightning runs one package per "
                  f"Trainer: give a datamodule that imports {package} (or the model's own *_dataloader methods, "
                  "--data null), or import one package in both.")
        if package != LEGACY:
            return
        self.trainer_class = importlib.import_module(LEGACY).Trainer
        init = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        trainer = init.get("trainer") or {}
        specs = self._node().get("trainer", Namespace()).get("callbacks") or []
        callbacks = trainer.get("callbacks")
        if isinstance(callbacks, list) and isinstance(specs, list) and len(specs) == len(callbacks):
            trainer["callbacks"] = [_legacy_twin(cb, spec) for cb, spec in zip(callbacks, specs, strict=True)]

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        self._use_the_models_package()
        node = self._node()
        trainer_node = node.get("trainer", Namespace())
        configured = self._configured_callbacks()
        plain_output = not sys.stdout.isatty() and trainer_node.get("enable_progress_bar") is None \
            and not any(isinstance(c, lightning_types("callbacks.ProgressBar")) for c in configured)
        if plain_output:
            kwargs.setdefault("enable_progress_bar", False)
        trainer = super().instantiate_trainer(**kwargs)
        extra: list[Callback] = []
        if node.get("divergence_stop", True) and self.subcommand in (None, "fit") \
                and not any(isinstance(c, DivergenceStop) for c in trainer.callbacks):
            extra.append(DivergenceStop(factor=None))
        if plain_output:
            extra.append(_EpochLines())
        trainer.callbacks[:0] = extra  # before the checkpoint callbacks, which Lightning keeps last
        return trainer

    @override
    def after_instantiate_classes(self) -> None:
        """No datamodule and no loader of the model's own for the stage: say so in one line, before Lightning starts."""
        needed = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader",
                  "predict": "predict_dataloader"}.get(self.subcommand or "")
        if needed and self.datamodule is None and not is_overridden(needed, self.model):
            _fail(f"--data: {type(self.model).__name__} has no {needed} of its own and no --data was given; name a "
                  f"datamodule: --data DigitsDataModule | CIFAR10DataModule | SyntheticDataModule | "
                  f"my_package.MyDataModule.")

    def _configured_callbacks(self) -> list[Any]:
        init = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        callbacks = (init.get("trainer") or {}).get("callbacks") or []
        return callbacks if isinstance(callbacks, list) else [callbacks]

    def _report(self, prefix: str, title: str) -> None:
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}
        if not metrics:
            return
        print(f"{title}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())), flush=True)
        if f"{prefix}acc" in metrics:
            label = title.split(" (")[0]
            print(f"{label} accuracy: {metrics[f'{prefix}acc']:.4f}", flush=True)

    @override
    def after_fit(self) -> None:
        restored = [getattr(c, "restored_epoch", None) for c in self.trainer.callbacks]
        restored = [e for e in restored if e is not None]
        if restored:
            # the last epoch's metrics describe weights that were just replaced: score the restored ones
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._report("val_", f"Final validation (restored weights of epoch {restored[-1]})")
        else:
            self._report("val_", "Final validation")

    @override
    def after_validate(self) -> None:
        self._report("val_", "Validation")

    @override
    def after_test(self) -> None:
        self._report("test_", "Test")


def _legacy_twin(callback: Any, spec: Any) -> Any:
    """Lightning's own ``lightning.pytorch`` callback rebuilt as its ``pytorch_lightning`` twin (same arguments)."""
    module = type(callback).__module__
    if not module.startswith("lightning.pytorch."):
        return callback
    twin = getattr(importlib.import_module(LEGACY + module[len("lightning.pytorch"):]), type(callback).__name__, None)
    init_args = spec.get("init_args") if isinstance(spec, (Namespace, dict)) else None
    try:
        kwargs = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})
        return twin(**kwargs)
    except Exception as err:  # no twin, or arguments it does not take: say what to do
        _fail(f"--trainer.callbacks: {type(callback).__name__} is lightning.pytorch's and the model a {LEGACY} "
              f"module, and it could not be rebuilt as {LEGACY}'s ({type(err).__name__}: {err}); "
              "leave it out or import lightning.pytorch in the model.")


def _check_ckpt_path(cli: TricksCLI) -> None:
    """``--ckpt_path``: a missing, empty, truncated or corrupt file, or another model's, is one line before anything
    runs or is written (Lightning would fail later, with a traceback, after writing the run's config)."""
    lightning_tricks.checkpoint.check_checkpoint_path(cli.model, cli.config_init[cli.subcommand].get("ckpt_path"))


def _apply_recorded_tricks(cli: TricksCLI) -> None:
    """``validate/test/predict --ckpt_path``: re-apply the structural tricks the checkpoint records (e.g. fractional
    pooling) to the model before Lightning restores its weights, so it evaluates as it was trained."""
    _check_ckpt_path(cli)
    lightning_tricks.checkpoint.apply_tricks_recorded_in(cli.model, cli.config_init[cli.subcommand].get("ckpt_path"))


TricksCLI.before_fit = _check_ckpt_path  # type: ignore[method-assign]
TricksCLI.before_validate = TricksCLI.before_test = TricksCLI.before_predict = _apply_recorded_tricks  # type: ignore[method-assign]


def build_cli(args: list[str] | None = None, run: bool = True) -> TricksCLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``."""
    quiet_lightning_noise()
    parser_kwargs: dict[str, Any] = {"epilog": _callbacks_epilog(), "description": lightning_tricks.__doc__}
    return TricksCLI(
        LightningModule,
        None,  # --data is optional (``--data null``); the digits default belongs to our models only
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=TricksArgumentParser,
        parser_kwargs={**parser_kwargs, **{c: dict(parser_kwargs) for c in ("fit", "validate", "test", "predict")}},
        save_config_callback=_QuietSaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _check_ckpt_file(argv: list[str]) -> None:
    """``--ckpt_path FILE`` that is empty, truncated, corrupt or not a checkpoint: one line before LightningCLI reads
    its hyperparameters (which it does first, failing with a traceback)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else (
            argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None)
        if value is not None:
            lightning_tricks.checkpoint.read_checkpoint_file(value)


def main(args: list[str] | None = None) -> None:
    """LightningCLI's subcommands of the ``lightning-tricks`` script (`lightning_tricks.commands` dispatches).

    A ``lightning_tricks.errors`` error (a bad argument value, a missing data folder)
    is printed as one line and exits with status 2; set ``LIGHTNING_TRICKS_DEBUG=1`` for the traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    try:
        _check_ckpt_file(argv)
        build_cli(args)
    except Exception as err:
        # jsonargparse wraps errors raised in __init__: look down the chain for ours
        cause = user_error_in(err)
        known = explain_runtime_error(err) if cause is None else None
        if (cause is None and known is None) or debugging():
            raise
        _fail(known or str(cause))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])


__all__ = ["TricksArgumentParser", "TricksCLI", "build_cli", "main", "prefer_our_callbacks", "quiet_lightning_noise"]
