r"""Stochastic depth (Huang et al. 2016): skip residual branches at random in training, use them all at test.

Block :math:`l` of :math:`L` computes :math:`H_l = \mathrm{act}(b_l f_l(H_{l-1}) + \mathrm{id}(H_{l-1}))` in
training, with :math:`b_l \sim \mathrm{Bernoulli}(1 - p_l)` and :math:`p_l = p \cdot l / L` (the
paper's linear decay rule; its :math:`p_L = 0.5` is ``p=0.5``) or :math:`p_l = p`
(``uniform``). At test every block runs, and the expected training pre-activation matches the test one:

* ``scaling="train"`` (inverted, default, as timm's ``drop_path`` and torchvision's ``stochastic_depth``): a kept
  branch is multiplied by :math:`1/(1-p_l)` in training and eval is the original block, untouched, so a
  checkpoint evaluates correctly wherever it is loaded, with or without the trick.
* ``scaling="test"`` (the paper's): :math:`H_l = \mathrm{act}((1 - p_l) f_l(H_{l-1}) + \mathrm{id}(H_{l-1}))` at
  test; the converted block does this in ``eval()``. The plain model lacks the factor, so each converted block
  carries a marker buffer (see :mod:`lightning_tricks.core.surgery`) and the callback records itself in the
  checkpoint for :func:`lightning_tricks.load_from_checkpoint` and the other loaders to re-apply.

``batch`` mode draws one :math:`b_l` per block per training step for the whole batch and, when it is 0,
does not run the branch at all: that is where the paper's training speed-up comes from (torchvision's
``ops.stochastic_depth`` always computes the branch). The decision is keyed by (seed, step, block), so it
is the same on every DDP rank. ``row`` mode draws one :math:`b_l` per example (timm's ``drop_path``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_tricks.core import surgery
from lightning_tricks.core.batch import find_inputs
from lightning_tricks.core.callback import StructuralCallback
from lightning_tricks.core.lightning_classes import lightning_types
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.surgery import (
    ModelNotSupportedError,
    Predicate,
    SurgeryReport,
    mark,
    original_class,
    select_modules,
    swap_class,
    unmark,
)
from lightning_tricks.core.validation import check_bool, check_int
from lightning_tricks.regularization._depth_blocks import (  # noqa: F401  (re-exported: pickles and imports name them here)
    DEFAULT_WARMUP_FRACTION,
    MODES,
    RULES,
    SCALINGS,
    BlockAdapter,
    _AdapterDepthMixin,
    _auto_detected,
    _can_wrap,
    _DepthMixin,
    _ResidualMethodDepthMixin,
    block_adapters,
    check_stochastic_depth_args,
    drop_probabilities,
    drop_residual,
    has_residual_method,
    stochastic_depth_blocks,
    warmup_ramp,
)

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d,
               nn.LazyBatchNorm3d)
"""The batch-norm layers whose running statistics :func:`recalibrate_batch_norm` recomputes (torch's public classes)."""


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Recompute the batch-norm running statistics of a stochastic-depth model with every block in test form.

    In training, the layers after a block see a mixture of "branch skipped" and "branch kept" inputs, so
    the running statistics batch norm collects do not describe the test-time network (every block on,
    scaled); on our digits runs this cost several points of accuracy (docs/stochastic_depth.md). This
    runs ``batches`` (``(x, ...)`` tuples or tensors) through the model with the converted blocks in their
    test form and batch norm in training mode, averaging the statistics over all of them (momentum
    ``None``), then restores the modes. Parameters are not changed. Call it after training, on training data.

    Args:
        model: a model converted by :func:`apply_stochastic_depth`.
        batches: an iterable of batches (e.g. the training DataLoader).
        max_batches: stop after this many batches (default: all).

    Returns:
        The number of batches used.

    Examples:
        >>> from lightning_tricks.zoo import CifarResNet
        >>> net = CifarResNet(20)
        >>> _ = apply_stochastic_depth(net, 0.5)
        >>> recalibrate_batch_norm(net, [torch.randn(8, 3, 32, 32)] * 2)
        2
    """
    if max_batches is not None:
        check_int("max_batches", max_batches, 1)
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    training = model.training
    device = next(model.parameters()).device
    used = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches
        model.train()
        for block in stochastic_depth_blocks(model):
            block.training = False  # the block runs in test form; its batch norms stay in training mode
        with torch.no_grad():
            for batch in batches:
                model(find_inputs(batch, None, "recalibrate_batch_norm").to(device))  # tuples and dict batches
                used += 1
                if max_batches is not None and used >= max_batches:
                    break
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(training)
    return used


def apply_stochastic_depth(
    model: nn.Module,
    p: float = 0.5,
    *,
    mode: str = "batch",
    rule: str = "linear",
    scaling: str = "train",
    include: Sequence[str] | None = None,
    randomness: LayerRandomness | None = None,
    predicate: Predicate | None = None,
    exclude: Sequence[str] | None = None,
    drop_rate: float | None = None,
    blocks: Sequence[str] | None = None,
) -> SurgeryReport:
    """Convert the residual blocks of ``model`` in place (idempotent; parameter names unchanged).

    Blocks are found automatically: torchvision's ``BasicBlock``/``Bottleneck``, timm's ResNet
    ``BasicBlock``/``Bottleneck``, and any module with a ``residual(x)`` method and a ``shortcut``
    attribute (the zoo's ``BasicBlock``). Your own block qualifies when its ``forward`` computes
    ``... self.residual(x) + <shortcut> ...`` out of place; select it with ``include`` patterns. Block
    ``l`` of ``L`` in ``named_modules()`` order (input to output) gets ``drop_probabilities(L)[l - 1]``.

    Args:
        model: any module.
        p: ``p_L`` of the linear rule (or every block's ``p`` with ``uniform``), in [0, 1).
        mode: ``batch`` (skip the branch for the whole batch: saves compute) or ``row`` (per example).
        rule: ``linear`` or ``uniform``.
        scaling: ``train`` (inverted: a kept branch times ``1 / (1 - p_l)`` in training, eval untouched) or
            ``test`` (the paper's: the branch times ``1 - p_l`` in eval; the blocks get a marker buffer).
        include: glob patterns on qualified module names (``None``: automatic detection); a pattern also
            selects the blocks inside a match (``["layer1"]``: the blocks of that stage).
        randomness: shared generators (the callback's); a private one seeded with 0 when ``None``.
        predicate: extra filter ``(name, module) -> bool``.
        exclude: glob patterns of blocks (or of modules whose blocks) to leave as they are.
        drop_rate: deprecated: use ``p``.
        blocks: deprecated: use ``include``.

    Raises:
        ModelNotSupportedError: no residual block found; a timm block that already has ``drop_path``.
        InvalidArgumentError: a bad argument, or a pattern that matches no convertible block.

    Examples:
        >>> from lightning_tricks.zoo import CifarResNet
        >>> apply_stochastic_depth(CifarResNet(20), 0.5).total
        9
    """
    p, include, exclude = check_stochastic_depth_args(p, mode, rule, scaling, include, exclude=exclude,
                                                      drop_rate=drop_rate, blocks=blocks)
    report = SurgeryReport("StochasticDepth")
    if p == 0:
        return report
    chosen = select_modules(model, include, can_wrap=_can_wrap, arg_name="include", trick="StochasticDepth",
                            default=None if include is not None else _auto_detected, predicate=predicate,
                            exclude=exclude)
    if not chosen:
        raise ModelNotSupportedError(
            f"StochasticDepth found no residual block in {type(model).__name__}: it looks for torchvision and timm "
            "ResNet BasicBlock/Bottleneck and for modules with a `residual(x)` method and a `shortcut` attribute "
            "(the zoo's BasicBlock). For your own block, give it a `residual(x)` method whose output its forward "
            "adds to the shortcut, and select it with `include` (glob patterns on module names)."
        )
    with_drop_path = [n for n, m in chosen if getattr(m, "drop_path", None) is not None]
    if with_drop_path:
        raise ModelNotSupportedError(
            f"StochasticDepth: blocks {with_drop_path[:3]} already apply timm's drop_path (the model was created "
            "with drop_path_rate > 0): create it with drop_path_rate=0, or leave stochastic depth to timm."
        )
    probabilities = drop_probabilities(len(chosen), p, rule)
    report.detail = (f"drop probabilities {probabilities[0]:.3g}..{probabilities[-1]:.3g} ({rule} rule), "
                     f"mode={mode!r}, scaling={scaling!r}")
    before = list(model.state_dict().keys())
    shared = randomness if randomness is not None else LayerRandomness(0, per_rank=mode == "row")
    for index, ((name, module), p_l) in enumerate(zip(chosen, probabilities, strict=True)):
        mixin = _AdapterDepthMixin if original_class(module) in block_adapters() else _ResidualMethodDepthMixin
        (report.converted if swap_class(module, mixin) else report.already).append(name)
        module._lt_configure(p_l, mode, scaling, shared, index)  # type: ignore[attr-defined]
        if scaling == "test":  # the plain block evaluates differently: a plain strict load must fail
            mark(module, "StochasticDepth", [p_l])
        else:
            unmark(module, "StochasticDepth")
    surgery.keys_unchanged(before, model, "StochasticDepth")
    return report


class StochasticDepth(StructuralCallback):
    """Stochastic depth on an unmodified LightningModule with residual blocks.

    At ``setup`` (before checkpoint restore and DDP wrapping) the residual blocks are converted in place
    (parameter names unchanged). In training, block ``l`` of ``L`` is skipped with probability
    ``p_l = p * l / L`` (``rule='linear'``, the paper's) or ``p`` (``uniform``). Eval
    runs every block. With ``scaling='train'`` (default, inverted, as timm and torchvision) a kept branch
    is multiplied by ``1 / (1 - p_l)`` in training and eval is the original block, so a checkpoint
    evaluates correctly wherever it is loaded. With ``scaling='test'`` (the paper's) the branch is
    multiplied by ``1 - p_l`` at test: the callback records itself in every checkpoint, which
    :func:`lightning_tricks.load_from_checkpoint`, the Ensemble loaders and the CLI's ``--ckpt_path``
    re-apply, and a plain ``MyModule.load_from_checkpoint`` fails on the blocks' marker buffers
    (``Unexpected key(s) ... lightning_tricks_StochasticDepth``) instead of evaluating without the factor.
    Either way the expected training pre-activation equals the test one.

    ``mode='batch'`` skips the whole branch for the batch (no compute for it: faster training) with a
    decision keyed by (seed, step, block), identical on every DDP rank. Parameters of a skipped block
    get no gradient, so under DDP the strategy must have ``find_unused_parameters=True``: the callback
    stops before the first step with what to set otherwise (also for ``static_graph=True`` and non-DDP
    distributed strategies). ``mode='row'`` drops per example (every branch is computed; no effect on DDP).

    Args:
        p: the last block's drop probability (``linear``) or every block's (``uniform``), in [0, 1).
            The paper uses 0.5. 0 converts nothing.
        mode: ``batch`` or ``row``.
        rule: ``linear`` or ``uniform``.
        scaling: ``train`` (inverted; eval is the untouched model) or ``test`` (the paper's).
        include: glob patterns on qualified module names selecting the blocks (default: automatic detection
            of torchvision/timm ResNet blocks and blocks with ``residual(x)`` and ``shortcut``); a pattern also
            selects the blocks inside a match (``["model.layer3"]``: that stage's blocks).
        warmup_fraction: ramp every ``p_l`` linearly from 0 over this fraction of the run's training batches
            (``trainer.estimated_stepping_batches`` times the accumulation), then hold it (Composer's
            ``drop_warmup``). On by default: inverted scaling at a high drop rate and learning rate can fail to
            train from the first steps, and a warm-up avoids it (docs/stochastic_depth.md). 0: no warm-up.
        warmup_steps: ramp over exactly this many training batches instead (0: no warm-up); wins over
            ``warmup_fraction`` when set.
        seed: seed of the decisions; ``None`` uses the run's seed (``seed_everything``'s, else
            ``torch.initial_seed()``; rank 0's under DDP).
        exclude: glob patterns of blocks to leave as they are.
        log: log ``stochastic_depth/p``, the deepest block's drop probability at that step (it rises during
            the warm-up), at every training batch (``pl_module.log``, so ``EarlyStopping``/``ModelCheckpoint``
            can monitor it); ``False`` logs nothing.
        drop_rate: deprecated: use ``p``.
        blocks: deprecated: use ``include``.

    Raises:
        InvalidArgumentError: a bad argument, or an ``include``/``exclude`` pattern that matches no convertible block.
        ModelNotSupportedError: (at setup) no residual block, a timm model with ``drop_path_rate > 0``;
            in ``batch`` mode (before the first step) DDP without ``find_unused_parameters=True``, with
            ``static_graph=True``, or an unsupported distributed strategy.

    Examples:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[StochasticDepth(p=0.5)], logger=False)  # doctest: +SKIP
    """

    converts = "residual blocks"

    def __init__(self, p: float = 0.5, mode: str = "batch", rule: str = "linear", scaling: str = "train",
                 include: list[str] | None = None, warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
                 warmup_steps: int | None = None, seed: int | None = None, exclude: list[str] | None = None,
                 log: bool = True, drop_rate: float | None = None, blocks: list[str] | None = None) -> None:
        super().__init__(seed)
        self.log_enabled = check_bool("log", log)  # not `self.log`: Lightning sets that to pl_module.log
        p, include, exclude = check_stochastic_depth_args(p, mode, rule, scaling, include, warmup_steps,
                                                          warmup_fraction, exclude, drop_rate=drop_rate, blocks=blocks)
        self.p, self.mode, self.rule, self.include, self.exclude = p, mode, rule, include, exclude
        self.scaling = scaling
        self.warmup_fraction, self.warmup_steps = float(warmup_fraction), warmup_steps
        self.warmup_batches = warmup_steps or 0  # the ramp's length in batches, fixed at the first train start
        self._warmup_fixed = warmup_steps is not None  # restored from a checkpoint, or given
        self.per_rank = mode == "row"  # batch decisions must agree on every rank
        self._blocks: list[nn.Module] = []
        self._targets: list[float] = []

    @property
    def state_key(self) -> str:
        # `drop_rate`, `blocks`: the first release's names, so its checkpoints resume
        return self.selection_state_key(drop_rate=self.p, mode=self.mode, blocks=self.include)

    def init_args(self) -> dict[str, Any]:
        return {"p": self.p, "mode": self.mode, "rule": self.rule, "scaling": self.scaling,
                "include": self.include, "exclude": self.exclude, "warmup_fraction": self.warmup_fraction, "warmup_steps": self.warmup_steps,
                "seed": self.randomness.seed}

    def changes_evaluation(self) -> bool:
        return self.scaling == "test"

    def record(self) -> dict[str, Any] | None:
        record = super().record()
        if record is not None:  # the exact p_l of each block (the test-time factor is 1 - p_l)
            record["drop_probabilities"] = list(self._targets)
        return record

    @classmethod
    def reapply(cls, model: nn.Module, record: dict[str, Any]) -> SurgeryReport:
        report = super().reapply(model, record)
        probabilities = record.get("drop_probabilities")
        if probabilities is not None:
            blocks = [model.get_submodule(name) for name in record["modules"]]
            for block, p in zip(blocks, probabilities, strict=True):
                block.lt_drop_prob = float(p)
        return report

    def convert(self, model: nn.Module, randomness: LayerRandomness, modules: list[str] | None = None
                ) -> SurgeryReport:
        report = apply_stochastic_depth(model, self.p, mode=self.mode, rule=self.rule, scaling=self.scaling,
                                        include=self.include if modules is None else modules,
                                        exclude=self.exclude if modules is None else None, randomness=randomness)
        self._blocks = stochastic_depth_blocks(model)
        self._targets = [b.lt_drop_prob for b in self._blocks]
        return report

    def after_convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        known = lightning_types("strategies.DDPStrategy") + lightning_types("strategies.SingleDeviceStrategy")
        if self.mode == "batch" and trainer.world_size > 1 and not isinstance(strategy, known):
            raise ModelNotSupportedError(
                f"StochasticDepth(mode='batch') leaves the parameters of skipped blocks without gradient, which "
                f"{type(strategy).__name__} is not known to handle: use strategy='ddp' or StochasticDepth(mode='row')."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The wrapped model is public once the strategy has set up (the strategy's own DDP arguments are not).
        ddp = trainer.strategy.model
        if self.mode != "batch" or not self._blocks or not isinstance(ddp, DistributedDataParallel):
            return
        if ddp.static_graph:
            raise ModelNotSupportedError(
                "StochasticDepth(mode='batch') skips different blocks at different steps, which DDP's "
                "static_graph=True forbids: use DDPStrategy(static_graph=False) or StochasticDepth(mode='row')."
            )
        if not ddp.find_unused_parameters:
            raise ModelNotSupportedError(
                "StochasticDepth(mode='batch') skips residual blocks, whose parameters then get no gradient in that "
                "step, and DDP runs with find_unused_parameters=False (Lightning's default), which fails at the first "
                "skipped block: pass strategy=DDPStrategy(find_unused_parameters=True) (CLI: "
                "--trainer.strategy=ddp_find_unused_parameters_true), or use StochasticDepth(mode='row')."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._warmup_fixed:  # a resumed run keeps the ramp its first run computed (checkpointed)
            self.warmup_batches = self.warmup_length(trainer)
            self._warmup_fixed = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warmup_batches": self.warmup_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        warmup = state.pop("warmup_batches", None)
        super().load_state_dict(state)
        if warmup is not None and self.warmup_steps is None:
            self.warmup_batches, self._warmup_fixed = int(warmup), True

    def warmup_length(self, trainer: pl.Trainer) -> int:
        """The warm-up in training batches: ``warmup_steps``, else ``warmup_fraction`` of the run's batches.

        The run's length comes from the trainer's limits at the first ``fit`` (the same on every rank); the
        length is kept in the checkpoint, so a resumed run, even with a larger ``max_epochs``, continues the
        same ramp from the checkpointed count of batches seen.
        """
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_fraction == 0 or not self._blocks:
            return 0
        total = float(trainer.estimated_stepping_batches) * max(1, trainer.accumulate_grad_batches)
        if math.isinf(total):
            epoch = float(trainer.num_training_batches)
            rank_zero_warn(
                f"StochasticDepth: warmup_fraction={self.warmup_fraction} needs a finite run (max_steps or max_epochs); "
                + ("ramping over one epoch's batches instead." if math.isfinite(epoch) else
                   "no warm-up. Set warmup_steps to ramp over a number of batches.")
            )
            total = epoch if math.isfinite(epoch) else 0.0
        return round(self.warmup_fraction * total)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if self.warmup_batches and self._blocks:
            ramp = warmup_ramp(self.batches_seen, self.warmup_batches)
            for block, target in zip(self._blocks, self._targets, strict=True):
                block.lt_drop_prob = target * ramp
        if self.log_enabled and self._blocks:  # the deepest block's p_l at this step (the blocks are in depth order)
            pl_module.log("stochastic_depth/p", self._blocks[-1].lt_drop_prob, on_step=True, on_epoch=False)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


__all__ = ["DEFAULT_WARMUP_FRACTION", "SCALINGS", "BlockAdapter", "StochasticDepth", "apply_stochastic_depth", "block_adapters",
           "check_stochastic_depth_args", "drop_probabilities", "drop_residual", "recalibrate_batch_norm",
           "stochastic_depth_blocks", "warmup_ramp"]
