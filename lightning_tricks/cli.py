"""The ``lightning-tricks`` command: a LightningCLI in subclass mode.

``--model`` and ``--data`` take any LightningModule / LightningDataModule class path, the user's own
included; they default to the zoo's ``ImageClassifier`` on ``DigitsDataModule``. Our callbacks are
imported here, so ``--trainer.callbacks+=Cutout`` resolves short names.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_tricks
from lightning_tricks._validation import ConfigError


def _callbacks_epilog() -> str:
    names = ", ".join(lightning_tricks.CALLBACKS) or "(none yet)"
    return (
        f"lightning-tricks callbacks (use as --trainer.callbacks+=NAME or class_path: lightning_tricks.NAME; "
        f"where Lightning has the same name, e.g. EarlyStopping, write lightning_tricks.NAME): {names}. "
        "Zoo: --model ImageClassifier (default), --data DigitsDataModule (default) | CIFAR10DataModule | "
        "SyntheticDataModule, or any class path of your own."
    )


class TricksCLI(LightningCLI):
    """LightningCLI with the zoo as defaults, and the final metrics printed after ``fit``/``validate``/``test``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({
            "model": {"class_path": "lightning_tricks.zoo.ImageClassifier"},
            "data": {"class_path": "lightning_tricks.zoo.DigitsDataModule"},
        })

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

    def after_fit(self) -> None:
        restored = [getattr(c, "restored_epoch", None) for c in self.trainer.callbacks]
        restored = [e for e in restored if e is not None]
        if restored and self.datamodule is not None:
            # the last epoch's metrics describe weights that were just replaced: score the restored ones
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._report("val_", f"Final validation (restored weights of epoch {restored[-1]})")
        else:
            self._report("val_", "Final validation")

    def after_validate(self) -> None:
        self._report("val_", "Validation")

    def after_test(self) -> None:
        self._report("test_", "Test")


def build_cli(args: list[str] | None = None, run: bool = True) -> TricksCLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``."""
    parser_kwargs: dict[str, Any] = {"epilog": _callbacks_epilog(), "description": lightning_tricks.__doc__}
    return TricksCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={**parser_kwargs, **{c: dict(parser_kwargs) for c in ("fit", "validate", "test", "predict")}},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-tricks`` script (also ``python -m lightning_tricks``).

    A ``ConfigError`` (a bad argument value, a missing data folder)
    is printed as one line and exits with status 2; set ``LIGHTNING_TRICKS_DEBUG=1`` for the traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("tune", "babysit"):
        from lightning_tricks.tuning.cli import main as tuning_main

        tuning_main(argv)
    try:
        build_cli(args)
    except Exception as err:
        # jsonargparse wraps errors raised in __init__: look down the chain for ours
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or os.environ.get("LIGHTNING_TRICKS_DEBUG"):
            raise
        print(f"lightning-tricks: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
