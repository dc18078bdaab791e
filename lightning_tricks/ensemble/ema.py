"""EMA members: the exponential moving average of the weights and the raw weights as two ensemble members."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from lightning_tricks.core.lightning_classes import package_of
from lightning_tricks.core.validation import check_int, check_optional_int, check_range
from lightning_tricks.ensemble.module import Ensemble
from lightning_tricks.errors import ModelNotSupportedError


class EMAMembers(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` that also keeps the raw weights, so both can serve as ensemble members.

    Training, validation and checkpoints behave exactly as with ``EMAWeightAveraging`` (the model holds
    the EMA weights after fit; checkpoints hold them as ``state_dict`` and the raw weights as
    ``current_model_state``). At the end of fit this callback also copies the raw weights, and
    :meth:`members`/:meth:`ensemble` return the EMA model and the raw model as two members. From a
    checkpoint written during fit, ``Ensemble(checkpoints=[...], ema_members="both")`` does the same
    (also with plain ``EMAWeightAveraging``).

    Args:
        decay: EMA decay per update.
        update_every_n_steps: update the average every n optimizer steps.
        update_starting_at_step: first step that updates the average.
        update_starting_at_epoch: first epoch from which the average is updated at epoch ends.
        device: where the averaged model lives (default: the model's device).
        use_buffers: also average buffers (batch-norm statistics).

    Examples:
        >>> import lightning.pytorch as pl
        >>> ema = EMAMembers(decay=0.99)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[ema])
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP
        >>> trainer.test(ema.ensemble(), datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, device: str | None = None,
                 use_buffers: bool = True) -> None:
        check_range("decay", decay, 0.0, 1.0, high_inclusive=False)
        check_int("update_every_n_steps", update_every_n_steps, 1)
        check_optional_int("update_starting_at_step", update_starting_at_step, 0)
        check_optional_int("update_starting_at_epoch", update_starting_at_epoch, 0)
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.raw_state: dict[str, torch.Tensor] | None = None
        self.ema_state: dict[str, torch.Tensor] | None = None
        self._trained_module: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if package_of(pl_module) == "pytorch_lightning":
            raise ModelNotSupportedError(
                "EMAMembers builds on lightning.pytorch's EMAWeightAveraging, which cannot drive a pytorch_lightning "
                "module; import LightningModule and Trainer from lightning.pytorch (the same API) to use EMAMembers.")
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw_state = _cloned_state(pl_module)
        super().on_train_end(trainer, pl_module)  # copies the averaged weights into the model
        self.ema_state = _cloned_state(pl_module)
        self._trained_module = pl_module

    def members(self) -> list[nn.Module]:
        """``[EMA model, raw model]``: two new modules (copies of the trained one), in eval mode."""
        if self.raw_state is None or self.ema_state is None or self._trained_module is None:
            raise RuntimeError("EMAMembers.members() is available after trainer.fit with this callback.")
        members = []
        for state in (self.ema_state, self.raw_state):
            member = copy.deepcopy(self._trained_module)
            member.load_state_dict(state)
            members.append(member.eval())
        return members

    def ensemble(self, **kwargs: Any) -> Ensemble:
        """An :class:`Ensemble` of the EMA model and the raw model (``kwargs`` go to ``Ensemble``)."""
        return Ensemble(members=self.members(), **kwargs)


def _cloned_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


__all__ = ["EMAMembers"]
