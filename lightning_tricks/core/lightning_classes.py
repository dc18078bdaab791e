"""Lightning's classes under both package names: ``lightning.pytorch`` and the older ``pytorch_lightning``.

The two packages ship the same classes, but ``pytorch_lightning.LightningModule`` is not a subclass of
``lightning.pytorch.LightningModule``: a check against one package's class refuses the other's, and a large
share of public code still writes ``import pytorch_lightning as pl``. Every check in lightning-tricks for a
Lightning class goes through here.

``pytorch_lightning`` is optional. An object of one of its classes exists only once it was imported, so the
checks look it up in ``sys.modules`` and never import it themselves (no start-up cost where nobody uses
it); ``load=True`` imports it when installed (the CLI does, to accept a class path that imports it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

import lightning.pytorch

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
LEGACY = "pytorch_lightning"


def _packages(load: bool) -> list[ModuleType]:
    found: list[ModuleType] = [lightning.pytorch]
    legacy = sys.modules.get(LEGACY)
    if legacy is None and load and importlib.util.find_spec(LEGACY) is not None:
        legacy = importlib.import_module(LEGACY)
    if legacy is not None:
        found.append(legacy)
    return found


def lightning_types(path: str, load: bool = False) -> tuple[type, ...]:
    """The class at ``path`` (``"LightningModule"``, ``"callbacks.WeightAveraging"``) in each package present.

    Examples:
        >>> lightning_types("LightningModule")[0] is lightning.pytorch.LightningModule
        True
    """
    module_path, _, name = path.rpartition(".")
    found = []
    for package in _packages(load):
        try:
            module = importlib.import_module(f"{package.__name__}.{module_path}") if module_path else package
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def lightning_module_types(load: bool = False) -> tuple[type, ...]:
    """``LightningModule`` of ``lightning.pytorch`` and of ``pytorch_lightning`` (when imported or ``load``)."""
    return lightning_types("LightningModule", load)


def datamodule_types(load: bool = False) -> tuple[type, ...]:
    """``LightningDataModule`` of both packages."""
    return lightning_types("LightningDataModule", load)


def callback_types(load: bool = False) -> tuple[type, ...]:
    """``Callback`` of both packages."""
    return lightning_types("Callback", load)


def trainer_types(load: bool = False) -> tuple[type, ...]:
    """``Trainer`` of both packages."""
    return lightning_types("Trainer", load)


def weight_averaging_types() -> tuple[type, ...]:
    """``WeightAveraging`` (``EMAWeightAveraging``'s base) of both packages."""
    return lightning_types("callbacks.WeightAveraging")


def sharding_strategy_types() -> tuple[type, ...]:
    """Strategies that shard the model over ranks (FSDP, DeepSpeed, model parallel), of both packages."""
    return tuple(t for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
                 for t in lightning_types(f"strategies.{name}"))


def is_lightning_module(obj: Any) -> bool:
    """Whether ``obj`` is a LightningModule of either package."""
    return isinstance(obj, lightning_module_types())


def package_of(obj: Any) -> str | None:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package whose Lightning class ``obj`` (or the class
    ``obj``) derives from; None for anything else."""
    cls = obj if isinstance(obj, type) else type(obj)
    for package in _packages(load=False):
        if any(issubclass(cls, t) for t in (getattr(package, n, None) for n in
                                             ("LightningModule", "LightningDataModule", "Callback", "Trainer"))
               if isinstance(t, type)):
            return package.__name__
    return None


def trainer_class_for(obj: Any) -> type:
    """The ``Trainer`` of ``obj``'s package (Lightning runs a module only in its own package's Trainer)."""
    return importlib.import_module(package_of(obj) or "lightning.pytorch").Trainer


def is_overridden(method_name: str, instance: Any) -> bool:
    """Lightning's ``is_overridden`` for a module, datamodule or callback of either package.

    ``lightning.pytorch.utilities.model_helpers.is_overridden`` raises "Expected a parent" for an object of
    ``pytorch_lightning``: the parent class is chosen here among both packages' classes.
    """
    from lightning_utilities.core.overrides import is_overridden as _is_overridden

    if instance is None:
        return False
    for parent in (*lightning_module_types(), *datamodule_types(), *callback_types()):
        if isinstance(instance, parent):
            return _is_overridden(method_name, instance, parent)
    return False


__all__ = ["LEGACY", "PACKAGES", "callback_types", "datamodule_types", "is_lightning_module", "is_overridden",
           "lightning_module_types", "lightning_types", "package_of", "sharding_strategy_types", "trainer_class_for", "trainer_types",
           "weight_averaging_types"]
