"""``Finetune``: the transfer-learning recipe as one callback, on any torchvision, timm, zoo or plain model.

It does what Lightning's ``BackboneFinetuning`` does without asking for a ``backbone`` attribute, and
keeps frozen BatchNorm layers in eval mode instead of switching off their running statistics
(``BaseFinetuning.freeze`` sets ``track_running_stats=False``, which makes a frozen BatchNorm normalize
with batch statistics: not the pretrained network's computation). It is therefore a plain ``Callback``,
not a ``BaseFinetuning`` subclass. The order of work, and why:

* ``setup`` (before ``configure_optimizers``, before a checkpoint is restored, before DDP wraps the
  model): load the weights file, replace the head, freeze. DDP then registers only the trainable
  parameters, so frozen layers raise no unused-parameter error.
* ``on_fit_start`` (optimizers exist; their saved state is restored only after this hook): split every
  parameter group of the user's optimizer into a head group and a backbone group whose learning rates
  are multiplied by ``backbone_lr_factor``, and remap the schedulers' per-group lists alike. The split
  depends on the configuration only (frozen parameters stay in the backbone group: they have no
  gradient, so optimizers skip them), so a resumed run has the same groups and its optimizer state loads.
* ``on_train_epoch_start``: apply the unfreeze schedule for the current epoch and put frozen units in
  eval mode. The stage is kept in the checkpoint and re-applied before DDP wraps a resumed model.
  Parameters unfrozen after DDP wrapped the model are not in its buckets: their gradients are averaged
  over the ranks here, in ``on_before_optimizer_step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_tricks.core.training_style import count_optimizers, refuse_several_optimizers
from lightning_tricks.core.validation import InvalidArgumentError, check_int, check_positive
from lightning_tricks.transfer.freezing import (
    FreezePlan,
    apply_freeze,
    find_head,
    parse_train,
    plan_freeze,
    replace_head,
)
from lightning_tricks.transfer.weights import load_weights, read_state_dict

_MARK = "_lightning_tricks_finetune"
"""Attribute set on a module once its weights were loaded and head replaced (a second fit must not redo it)."""
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
"""Learning-rate values that optimizers and schedulers (OneCycleLR) keep in a parameter group."""
_PER_GROUP_LRS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")
"""Keys of a torch scheduler's ``state_dict()`` that hold one learning rate per parameter group (``_last_lr`` is
what ``get_last_lr()`` returns); they must follow the split groups. Changed through the public
``state_dict()``/``load_state_dict()`` (the checkpoint format, which torch keeps loadable), not by setting
attributes; a key a torch version lacks is skipped. Checked on torch 2.14.1."""


def check_finetune_args(train: str, num_classes: int | None, backbone_lr_factor: float,
                        unfreeze: dict[int, str] | None) -> list[tuple[int, str]]:
    """Validate the arguments shared by :class:`Finetune` and the functional core; return the stages."""
    level = parse_train("train", train)
    if num_classes is not None:
        check_int("num_classes", num_classes, 1)
    check_positive("backbone_lr_factor", backbone_lr_factor)
    stages = [(0, train)]
    if unfreeze is not None and not isinstance(unfreeze, dict):
        raise InvalidArgumentError(f"`unfreeze`={unfreeze!r} is invalid: expected a mapping epoch -> 'last:K' | 'all'.")
    for epoch, spec in sorted((unfreeze or {}).items()):
        check_int("unfreeze epoch", epoch, 1)
        new = parse_train(f"unfreeze[{epoch}]", spec)
        if level is None or (new is not None and new <= level):
            raise InvalidArgumentError(f"`unfreeze[{epoch}]`={spec!r} is invalid: expected more units than the stage "
                                       f"before ({stages[-1][1]!r}); each stage trains more of the network.")
        level = new
        stages.append((epoch, spec))
    return stages


_FIX = "Apply it to a classifier, or fine-tune the part you mean by hand (requires_grad_, param groups)."


class Finetune(Callback):
    """Transfer learning: start from local weights, replace the head, train the head, the last blocks or all.

    Args:
        train: what trains from the first epoch: ``"head"`` (a linear probe on frozen features),
            ``"last:K"`` (the head and the last K backbone units: residual blocks, or a layer with weights
            and the norms after it) or ``"all"``.
        num_classes: outputs of the new head; ``None`` keeps the model's.
        weights: a local file to start from: a Lightning checkpoint (ours or yours), a torchvision or
            timm ``state_dict`` (``.pth``, ``.safetensors``). Key prefixes are aligned, the head's keys are
            skipped; nothing is downloaded. ``None`` keeps the model's weights.
        head: qualified name of the classifier layer (``"model.fc"``); ``None`` finds it.
        backbone_lr_factor: learning rate of the backbone's parameter groups relative to the head's
            (discriminative learning rates); 1 keeps the user's groups unchanged.
        unfreeze: optional schedule, epoch -> what trains from that epoch on (``{5: "last:2", 10: "all"}``),
            each stage training more than the one before.
        reset_head: replace the head by a freshly initialized layer even when ``num_classes`` is unchanged
            (the lectures' "reinitialize the last layer"); ``False`` keeps it (and loads it from ``weights``).
        strict: fail when the weights file has missing, unexpected or mis-shaped backbone keys (one message
            lists them); ``False`` loads the matching keys and warns.
        trust_checkpoints: load ``weights`` with ``weights_only=False`` (only for files you trust).

    Raises:
        InvalidArgumentError: a bad argument (at construction), a ``head`` that does not exist or
            ``last:K`` beyond the model's units (at setup).
        ModelNotSupportedError: a module with several optimizers (manual optimization: a GAN), at setup when its
            ``configure_optimizers`` tells, else when fit starts, before any step.
        WeightsMismatchError: the weights file does not fit the backbone (at setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> finetune = Finetune(train="last:2", num_classes=5, weights="pretrained.ckpt", backbone_lr_factor=0.1)
        >>> trainer = pl.Trainer(callbacks=[finetune])  # doctest: +SKIP
    """

    def __init__(self, train: str = "head", num_classes: int | None = None, weights: str | None = None,
                 head: str | None = None, backbone_lr_factor: float = 0.1, unfreeze: dict[int, str] | None = None,
                 reset_head: bool = True, strict: bool = True, trust_checkpoints: bool = False) -> None:
        self.stages = check_finetune_args(train, num_classes, backbone_lr_factor, unfreeze)
        if head is not None and (not isinstance(head, str) or not head):
            raise InvalidArgumentError(f"`head`={head!r} is invalid: expected the qualified name of a layer.")
        self.train, self.num_classes, self.weights, self.head = train, num_classes, weights, head
        self.backbone_lr_factor, self.reset_head = backbone_lr_factor, reset_head
        self.strict, self.trust_checkpoints = strict, trust_checkpoints
        self.stage = 0
        self.plans: list[FreezePlan] = []
        self._module: nn.Module | None = None
        self._user_frozen: set[int] = set()
        self._unreduced: list[nn.Parameter] = []
        self._missing_weights = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train=self.train, head=self.head)

    def stage_at(self, epoch: int) -> int:
        """Index into :attr:`stages` of the stage that trains at ``epoch``."""
        return max(i for i, (start, _) in enumerate(self.stages) if start <= epoch)

    # ------------------------------------------------------------------------------------- setup

    def _prepare(self, pl_module: nn.Module, stage: str) -> None:
        """Load the weights and replace the head, once per module.

        A weights file that does not exist is an error only if no checkpoint is resumed (known later, at
        ``load_state_dict``): a resumed checkpoint holds every weight, and the file may be gone. Outside
        fit, only a head of the wrong size is replaced, so that a fine-tuned checkpoint loads for
        ``validate``/``test``/``predict``; a trained head of the right size is never touched.
        """
        if getattr(pl_module, _MARK, None) is not None:
            return
        head = find_head(pl_module, self.head)
        old = pl_module.get_submodule(head)
        old_classes = old.out_features if isinstance(old, nn.Linear) else old.out_channels
        wrong_size = self.num_classes not in (None, old_classes)
        if stage != "fit" and not wrong_size:
            return
        user_frozen = [n for n, p in pl_module.named_parameters() if not p.requires_grad]
        messages = []
        if self.weights is not None and stage == "fit" and not Path(self.weights).expanduser().is_file():
            self._missing_weights = True
        elif self.weights is not None and stage == "fit":
            report = load_weights(pl_module, self.weights, self.head, strict=self.strict, trust=self.trust_checkpoints,
                                  skip_head=self.reset_head)
            messages.append(f"loaded {report.loaded} tensors from {self.weights!r}")
        if wrong_size or (self.reset_head and stage == "fit"):
            replace_head(pl_module, self.num_classes, head)
            messages.append(f"head {head!r} replaced ({old_classes} -> {self.num_classes or old_classes} classes)")
        object.__setattr__(pl_module, _MARK, {"head": head, "user_frozen": user_frozen})
        rank_zero_info("Finetune: " + "; ".join(messages))

    def _apply_stage(self, stage: int, set_modes: bool) -> None:
        self.stage = stage
        apply_freeze(self.plans[stage], self._user_frozen, set_modes=set_modes)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._missing_weights = False
        if stage == "fit" and not pl_module.automatic_optimization:  # before any surgery on a GAN
            refuse_several_optimizers("Finetune", pl_module, count_optimizers(pl_module), _FIX)
        self._prepare(pl_module, stage)
        if stage != "fit":
            return
        self._module = pl_module
        names = set(getattr(pl_module, _MARK)["user_frozen"])
        self._user_frozen = {id(p) for n, p in pl_module.named_parameters() if n in names}
        self.plans = [plan_freeze(pl_module, spec, self.head) for _, spec in self.stages]
        # modes are set at on_train_start: Lightning warns about modules in eval mode before it
        self._apply_stage(0, set_modes=False)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup` and before DDP wraps the model: re-freeze now, so DDP
        # registers the parameters the resumed stage trains.
        self.stage = min(int(state_dict.get("stage", 0)), len(self.stages) - 1)
        self._missing_weights = False  # the checkpoint being resumed holds every weight
        if self._module is not None and self.plans:
            self._apply_stage(self.stage, set_modes=False)

    # -------------------------------------------------------------------------------- optimizers

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_several_optimizers("Finetune", pl_module, len(trainer.optimizers), _FIX)
        if self._missing_weights:
            read_state_dict(self.weights)  # type: ignore[arg-type]  # raises DataNotFoundError, naming the file
        final = self.plans[-1]
        wanted = {id(p) for p in final.trainable_params()} - self._user_frozen
        in_optimizers = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [p for p in final.trainable_params() if id(p) in wanted and id(p) not in in_optimizers]
        if missing and len(trainer.optimizers) != 1:
            rank_zero_warn(f"Finetune: {len(missing)} parameters the schedule trains are in no optimizer; with "
                           f"{len(trainer.optimizers)} optimizers it cannot tell where to add them.")
            missing = []
        head_ids = {id(p) for p in final.head_params()}
        for i, optimizer in enumerate(trainer.optimizers):
            sources = _split_groups(optimizer, head_ids, self.backbone_lr_factor, missing if i == 0 else [])
            for config in trainer.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is optimizer:
                    _remap_scheduler(config.scheduler, sources)
        # DDP put only the parameters trainable now into its buckets; the others' gradients, once unfrozen,
        # are averaged in `on_before_optimizer_step`.
        self._unreduced = []
        if trainer.world_size > 1:
            self._unreduced = [p for p in final.trainable_params() if not p.requires_grad and id(p) in wanted]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stage_at(trainer.current_epoch)
        if stage != self.stage:
            rank_zero_info(f"Finetune: from epoch {trainer.current_epoch} training {self.stages[stage][1]!r}")
        self._apply_stage(stage, set_modes=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        late = [p for p in self._unreduced if p.requires_grad and p.grad is not None]
        if not late:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in late])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for p in late:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def _scaled(group: dict[str, Any], factor: float) -> dict[str, Any]:
    out = dict(group)
    for key in _LR_KEYS:
        if isinstance(out.get(key), (int, float)):
            out[key] = out[key] * factor
    return out


def _split_groups(optimizer: torch.optim.Optimizer, head_ids: set[int], factor: float,
                  extra: list[nn.Parameter]) -> list[tuple[int, float]]:
    """Split each group into head and backbone groups (backbone lrs x ``factor``); ``extra`` joins group 0's
    backbone part. Returns, per new group, (index of the group it came from, its lr factor)."""
    if factor == 1.0 and not extra:
        return [(i, 1.0) for i in range(len(optimizer.param_groups))]
    groups: list[dict[str, Any]] = []
    sources: list[tuple[int, float]] = []
    for i, group in enumerate(optimizer.param_groups):
        params = list(group["params"]) + (extra if i == 0 else [])
        head = [p for p in params if id(p) in head_ids]
        backbone = [p for p in params if id(p) not in head_ids]
        if head:
            groups.append({**group, "params": head})
            sources.append((i, 1.0))
        if backbone:
            groups.append({**_scaled(group, factor), "params": backbone})
            sources.append((i, factor))
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return sources


def _remap_state(state: dict[str, Any], sources: list[tuple[int, float]], groups: int) -> None:
    """Give ``state``'s per-group learning-rate lists one entry per new group (scaled like the group), children
    of ``SequentialLR``/``ChainedScheduler`` (their state dicts under ``_schedulers``) included."""
    for name in _PER_GROUP_LRS:
        values = state.get(name)
        if isinstance(values, (list, tuple)) and len(values) == groups:
            state[name] = [values[i] * f for i, f in sources]
    for child in state.get("_schedulers") or ():
        if isinstance(child, dict):
            _remap_state(child, sources, groups)


def _remap_scheduler(scheduler: Any, sources: list[tuple[int, float]]) -> None:
    """Give a scheduler's per-group state one entry per new group (learning rates scaled like the group)."""
    groups = 1 + max(i for i, _ in sources)
    state = scheduler.state_dict()
    _remap_state(state, sources, groups)
    scheduler.load_state_dict(state)
    # LambdaLR/MultiplicativeLR keep one function per group (a public attribute); a state dict holds only the
    # functions' own attributes. The children of SequentialLR/ChainedScheduler have no public accessor:
    # `_schedulers` (torch 2.14.1); without it their functions are left as they are.
    _remap_functions(scheduler, sources, groups)


def _remap_functions(scheduler: Any, sources: list[tuple[int, float]], groups: int) -> None:
    functions = getattr(scheduler, "lr_lambdas", None)
    if isinstance(functions, list) and len(functions) == groups:
        scheduler.lr_lambdas = [functions[i] for i, _ in sources]
    for inner in getattr(scheduler, "_schedulers", ()):
        _remap_functions(inner, sources, groups)
