"""How the Ensemble runs its members: loading them once, grouping members of one architecture, and running each
group as one vectorized call (``torch.func.vmap``) or a loop, as the fast-path probe decided.

:class:`MemberRunner` is a mixin of :class:`~lightning_tricks.ensemble.module.Ensemble` (its public methods are the
Ensemble's); it reads the attributes the Ensemble's constructor sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.training_style import count_optimizers, refuse_several_optimizers
from lightning_tricks.ensemble import _vmap
from lightning_tricks.ensemble.checks import check_class_counts, check_outputs, declared_num_classes
from lightning_tricks.ensemble.inputs import MemberInputs
from lightning_tricks.ensemble.loading import checkpoint_members
from lightning_tricks.ensemble.voting import as_logits


class MemberRunner:
    """The members of an :class:`~lightning_tricks.ensemble.module.Ensemble` and how they run (a mixin)."""

    members: nn.ModuleList
    member_names: list[str]
    member_inputs: MemberInputs
    num_classes: int | None
    fast_path: str
    task: str
    _groups: list[list[int]]
    _plans: dict[int, str]
    _stacks: dict[int, _vmap.StackedGroup]
    _declared_classes: list[int | None]

    def load_members(self) -> nn.ModuleList:
        """Load the checkpoints (once) and group members of one architecture; returns ``self.members``.

        Raises:
            UnsafeCheckpointError: a checkpoint needs unpickling and ``trust_checkpoints`` is False.
            CheckpointError: a checkpoint that cannot be built, or ``ema_members='both'`` on a checkpoint
                without EMA weights.
            InvalidArgumentError: members that declare different class counts.
        """
        if len(self.members):
            return self.members
        loaded: list[tuple[str, nn.Module, tuple]] = list(checkpoint_members(
            self.checkpoints, self._class_specs, self.ema_members, self.trust_checkpoints, self.member_kwargs))
        loaded += [(f"members[{i}]:{type(m).__name__}", m, ()) for i, m in enumerate(self._python_members)]
        for name, module, _ in loaded:
            if not getattr(module, "automatic_optimization", True):  # a GAN's LightningModule: no class scores
                refuse_several_optimizers(f"Ensemble (member {name})", module, count_optimizers(module),
                                          "Give the Ensemble classifiers.")
        self._declared_classes = [declared_num_classes(m) for _, m, _ in loaded]
        check_class_counts([name for name, _, _ in loaded], self._declared_classes, self.num_classes, "predict")
        for name, module, inputs in loaded:
            self.members.append(module.eval())
            self.member_names.append(name)
            self.member_inputs.add(inputs)
        self._group_members()
        return self.members

    def _group_members(self) -> None:
        """Members of one architecture given the same inputs run together (one vectorized call on the fast path)."""
        keys: dict[tuple, list[int]] = {}
        self._plans, self._stacks = {}, {}
        for i, module in enumerate(self.members):
            keys.setdefault((_vmap.architecture_key(module), self.member_inputs.key(i)), []).append(i)
        self._groups = list(keys.values())

    def set_member_inputs(self, index: int, statistics: Sequence[Any]) -> None:
        """Give member ``index`` the input statistics it was trained with (``Standardize``'s
        :class:`~lightning_tricks.setup.preprocessing.InputStatistics`, applied in order); checkpoint members get
        theirs from their checkpoint."""
        self.member_inputs.set(index, statistics)
        self._group_members()

    def expected_num_classes(self) -> int | None:
        """The class count given or declared by the members' hyper-parameters (``None`` if unknown)."""
        if self.num_classes is not None:
            return self.num_classes
        return next((n for n in self._declared_classes if n is not None), None)

    def member_outputs(self, x: torch.Tensor, sync: bool = False) -> torch.Tensor:
        """Every member's output for ``x`` as it returns it: ``(members, batch, classes)``, without gradients.

        Args:
            x: a batch of inputs.
            sync: make the fast-path decision (``auto``/``probe``) identical on all DDP ranks (a collective:
                only pass True where every rank calls this at the same point, as in the Lightning hooks).
        """
        self.load_members()
        outputs: list[torch.Tensor | None] = [None] * len(self.members)
        with torch.no_grad():
            for gi, group in enumerate(self._groups):
                inputs = self.member_inputs.apply(group[0], x)  # the group shares its statistics
                if len(group) > 1 and self._plan(gi, inputs, sync) == "vmap":
                    stacked = self._stacks[gi](inputs)
                    for k, i in enumerate(group):
                        outputs[i] = stacked[k]
                else:
                    for i in group:
                        outputs[i] = self.members[i](inputs)
        check_outputs(self.member_names, outputs, x.shape[0], self.expected_num_classes())
        return torch.stack(outputs)  # type: ignore[arg-type]

    def member_logits(self, x: torch.Tensor, sync: bool = False) -> torch.Tensor:
        """Every member's logits for ``x``: ``(members, batch, classes)``, without gradients; members that
        return probabilities or log-probabilities are brought to logits (`as_logits`).

        Args:
            x: a batch of inputs.
            sync: see `member_outputs`.
        """
        return self._as_logits(self.member_outputs(x, sync))

    def _as_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([as_logits(out, self.task == "multilabel") for out in outputs])

    def _plan(self, gi: int, x: torch.Tensor, sync: bool) -> str:
        if gi not in self._plans:
            # auto never vectorizes on CPU, where the loop was faster in our measurements: a probe would only cost
            if self.fast_path == "loop" or (self.fast_path == "auto" and x.device.type == "cpu"):
                self._plans[gi] = "loop"
                return "loop"
            group = self._groups[gi]
            stack = self._stacks.setdefault(gi, _vmap.StackedGroup([self.members[i] for i in group]))
            names = ", ".join(self.member_names[i] for i in group)
            mode = "vmap" if self.fast_path == "vmap" else "probe"
            self._plans[gi] = _vmap.choose(mode, stack, lambda i: self.members[i](x), group, names, x, sync)
            if self._plans[gi] == "loop":
                del self._stacks[gi]  # the members keep their tensors (views of the stack's storage, no copy)
        return self._plans[gi]

    def execution_plan(self) -> list[str]:
        """How each member runs, in member order: ``vmap`` (vectorized with its architecture group),
        ``loop``, or ``undecided`` before the first batch."""
        plan = ["loop"] * len(self.load_members())
        for gi, group in enumerate(self._groups):
            for i in group:
                plan[i] = "loop" if len(group) == 1 else self._plans.get(gi, "undecided")
        return plan


__all__ = ["MemberRunner"]
