"""The :class:`Ensemble` LightningModule: several trained models evaluated as one (validate, test, predict)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torchmetrics import Metric

from lightning_tricks.core.batch import Key, check_key
from lightning_tricks.core.lightning_classes import lightning_module_types
from lightning_tricks.core.task import Task, TaskNotSupportedError, check_task_kind, infer_task, require_task
from lightning_tricks.core.training_style import count_optimizers, refuse_several_optimizers
from lightning_tricks.core.validation import (
    ConfigError,
    InvalidArgumentError,
    check_choice,
    check_optional_int,
)
from lightning_tricks.ensemble import _vmap, screening, stages
from lightning_tricks.ensemble.inputs import (
    MemberInputs,
    adopt_trainer_standardize,
    batch_inputs,
    batch_targets,
    split_batch,
)
from lightning_tricks.ensemble.loading import (
    ClassSpec,
    check_checkpoint_files,
    checkpoint_members,
    class_path,
)
from lightning_tricks.ensemble.metrics import epoch_values, stage_metrics, update_metrics, warn_padding
from lightning_tricks.ensemble.voting import (
    as_logits,
    check_vote_weights,
    fit_vote_weights,
    hard_vote,
    multilabel_vote,
    soft_vote,
    vote_shares,
)
from lightning_tricks.evaluation import install_exact_evaluation, uninstall_exact_evaluation

VOTING = ("soft", "hard", "weighted")
FAST_PATHS = ("auto", "probe", "vmap", "loop")
EMA_MEMBERS = ("ema", "raw", "both")


def check_checkpoints(checkpoints: Any) -> list[str]:
    """Validate the ``checkpoints`` argument: a list of paths (``None`` is an empty list)."""
    if checkpoints is None:
        return []
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Sequence):
        raise InvalidArgumentError(f"`checkpoints`={checkpoints!r} is invalid: expected a list of .ckpt paths.")
    for path in checkpoints:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise InvalidArgumentError(f"`checkpoints`={list(checkpoints)!r} is invalid: expected a list of "
                                       ".ckpt paths.")
    return [str(p) for p in checkpoints]


def check_member_class(member_class: Any, count: int) -> list[ClassSpec | None]:
    """Validate ``member_class``: one class (or import path) for every checkpoint, or a list of ``count``."""
    specs = member_class if isinstance(member_class, (list, tuple)) else [member_class] * count
    if len(specs) != count:
        raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected one class for all "
                                   f"checkpoints or a list of {count}, one per checkpoint.")
    for spec in specs:
        if spec is not None and not isinstance(spec, str) and not (
                isinstance(spec, type) and issubclass(spec, lightning_module_types())):
            raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected a LightningModule "
                                       "subclass or its import path 'package.module.ClassName'.")
    return list(specs)


def check_ensemble_arguments(checkpoints: Any, members: Any, member_class: Any, voting: Any, weights: Any,
                             fast_path: Any, ema_members: Any, num_classes: Any, member_kwargs: Any = None
                             ) -> tuple[list[str], list[nn.Module], list[ClassSpec | None], int, list[float] | None]:
    """The Ensemble's validator: ``(checkpoints, members, class per checkpoint, member count, weights)``."""
    checkpoints = check_checkpoints(checkpoints)
    modules = list(members) if members is not None else []
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise InvalidArgumentError(f"`members`[{i}]={module!r} is invalid: expected a torch.nn.Module.")
    if not checkpoints and not modules:
        raise InvalidArgumentError("`checkpoints`=[] is invalid: expected at least one checkpoint path "
                                   "(or modules in `members`).")
    check_choice("voting", voting, VOTING)
    check_choice("fast_path", fast_path, FAST_PATHS)
    check_choice("ema_members", ema_members, EMA_MEMBERS)
    check_optional_int("num_classes", num_classes, 2)
    specs = check_member_class(member_class, len(checkpoints))
    if member_kwargs is not None and not (isinstance(member_kwargs, dict) and all(isinstance(k, str)
                                                                               for k in member_kwargs)):
        raise InvalidArgumentError(f"`member_kwargs`={member_kwargs!r} is invalid: expected a dict of constructor "
                                   "argument names to values, or None.")
    member_count = len(checkpoints) * (2 if ema_members == "both" else 1) + len(modules)
    if weights is not None:
        if voting == "soft":
            raise InvalidArgumentError(f"`weights`={weights!r} is invalid with `voting`='soft': use "
                                       "voting='weighted' for a weighted mean of probabilities.")
        weights = check_vote_weights(weights, member_count)
    return checkpoints, modules, specs, member_count, weights


def _declared_num_classes(module: nn.Module) -> int | None:
    """The member's class count: its ``num_classes`` hyper-parameter, else the outputs of its last layer with
    weights when that is an ``nn.Linear`` (None: unknown until its first output)."""
    hparams = getattr(module, "hparams", None)
    value = hparams.get("num_classes") if hasattr(hparams, "get") else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    weighted = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    return weighted[-1].out_features if weighted and isinstance(weighted[-1], nn.Linear) else None


def _check_class_counts(names: Sequence[str], counts: Sequence[int | None], expected: int | None,
                        what: str) -> None:
    known = {n for n in counts if n is not None} | ({expected} if expected is not None else set())
    if len(known) > 1:
        listing = ", ".join(f"{name}: {n}" for name, n in zip(names, counts, strict=True) if n is not None)
        extra = f" (expected {expected})" if expected is not None else ""
        raise InvalidArgumentError(f"The ensemble's members {what} different numbers of classes ({listing}){extra}: "
                                   "every member must score the same classes.")


def _check_outputs(names: Sequence[str], outputs: Sequence[Any], batch: int, expected: int | None) -> None:
    for name, out in zip(names, outputs, strict=True):
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidArgumentError(f"Ensemble member {name} returned {got} for a batch of {batch}: "
                                       "expected forward(x) to return (batch, classes) logits.")
    widths = [out.shape[1] for out in outputs]
    if len(set(widths)) > 1 or expected not in (None, widths[0]):
        _check_class_counts(names, widths, expected, "output")


def _attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    try:
        return module.trainer
    except RuntimeError:  # "is not attached to a `Trainer`"
        return None


class Ensemble(pl.LightningModule):
    """Evaluate several trained models as one: ``trainer.validate/test/predict(Ensemble(...))``.

    Members come from checkpoint paths (each built with its own LightningModule class, recorded by
    LightningCLI or given as ``member_class``), from modules passed in Python, or both, and may differ
    in architecture. Every member is loaded and checked when the Ensemble is built, so a missing, empty
    or corrupt file, weights of another class, another number of classes or a checkpoint trained with
    several optimizers (a GAN) fails there, in one line naming the file. The files load through
    Lightning's ``load_from_checkpoint`` with ``weights_only=True`` unless ``trust_checkpoints``, and get
    back the structural tricks they record (`lightning_tricks.checkpoint.apply_recorded_tricks`).

    Each member gets its inputs normalized as it was trained: the ``Standardize`` statistics its
    checkpoint records (`lightning_tricks.checkpoint.recorded_input_statistics`; `set_member_inputs` for
    modules given in Python), else those of the evaluating trainer's ``Standardize``; a trainer's
    ``Standardize`` never normalizes an Ensemble's batches itself. Batches may be tuples, lists or dicts
    (``input_key``/``target_key``).

    Voting: ``soft`` averages the members' softmax probabilities and takes the argmax (the lectures'
    recipe), ``hard`` takes the per-sample majority of the members' argmax classes (ties go to the tied
    class with the highest mean probability, then the lowest index; ``weights`` make it a weighted
    majority), ``weighted`` is soft voting with ``weights``, or with weights fitted on the
    datamodule's validation set (`fit_vote_weights`) when ``weights`` is None.

    Members of one architecture can run as one vectorized call (``torch.func.vmap``) where a measured probe
    on the first batch shows it faster: ``fast_path="probe"`` times both ways (up to 5 interleaved rounds,
    the same decision on every DDP rank) and keeps the vectorized call only if it gives the same outputs,
    wins every round and is at least 10% faster. ``auto`` (the default) probes on accelerators and runs
    the loop on CPU, where the loop was faster in our measurements (``python -m benchmarks ensemble``).

    Logged at the end of each ``validate``/``test`` epoch, side by side: ``{stage}_acc`` and
    ``{stage}_loss`` (negative log-likelihood of the ensemble's probabilities; not for hard voting),
    ``{stage}_acc_member_{i}`` and ``{stage}_loss_member_{i}`` for every member, and
    ``{stage}_acc_member_mean``/``{stage}_loss_member_mean``. They are torchmetrics states summed over
    DDP ranks. ``predict`` returns ``{"probs": (N, C), "preds": (N,)}`` per batch (for hard voting
    ``probs`` holds the vote shares).

    Args:
        checkpoints: ``.ckpt`` paths of the members.
        members: modules given in Python (``forward(x)`` returns ``(N, C)`` logits), after the checkpoints.
        member_class: the members' LightningModule class (import path, or the class in Python), or one per
            checkpoint; ``None`` uses the ``_class_path`` that LightningCLI stores in the checkpoint.
        voting: ``soft``, ``hard`` or ``weighted``.
        weights: one non-negative weight per member (``weighted``, or a weighted majority with ``hard``).
        fast_path: ``auto`` (probe on accelerators, loop on CPU), ``probe`` (probe on any device), ``vmap``
            (always vectorize members of one architecture, after checking the outputs once) or ``loop``.
        ema_members: for checkpoints written during fit with Lightning's ``EMAWeightAveraging``: ``ema``
            (the averaged weights, what Lightning loads), ``raw`` (the training weights kept next to
            them) or ``both`` (two members per checkpoint; every checkpoint must have both).
        trust_checkpoints: load with ``weights_only=False`` and import the modules checkpoints name. Only
            for files from a trusted source: unpickling can run arbitrary code.
        num_classes: the class count; checked against the members and the datamodule.
        member_kwargs: constructor arguments passed to every checkpoint member's class, as
            ``load_from_checkpoint(**kwargs)`` takes them: those its hyper-parameters lack (a module that
            needs ``data_path`` but does not save it) or override.
        input_key: where a batch holds the inputs: a dict key or a position (default: a dict's ``image``,
            ``x``, ... or a sequence's first tensor, as every trick finds them).
        target_key: where a batch holds the targets (default: a dict's ``label``, ``y``, ... or the item after
            the inputs).
        max_loss_ratio: before each validate/test/predict, a member whose mean cross-entropy on the labelled
            data (the datamodule's validation set, else the evaluated data) is not finite, above
            ``max_loss_ratio`` x the median of the other members' or above ``max_loss_ratio`` x log(C) is left
            out of the vote, with one warning line naming it and its loss (no member left: refused); > 1, or
            None to let every member vote.
        task: ``classification`` (softmax over classes) or ``multilabel`` (a sigmoid per label: soft voting
            averages the members' sigmoid probabilities, hard voting takes each label's majority, ``preds``
            are multi-hot at 0.5; predict only, since the logged metrics are single-label); None reads it
            from the first batch's targets (`lightning_tricks.core.task`), single-label when a predict batch
            has none. Members may return logits, log-probabilities or probabilities.

    Raises:
        InvalidArgumentError: an empty or malformed checkpoint list, an unknown choice, weights of the
            wrong length or negative, ``weights`` with ``soft`` voting.
        DataNotFoundError: a checkpoint path that does not exist.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_tricks.zoo import DigitsDataModule
        >>> ensemble = Ensemble(checkpoints=["a.ckpt", "b.ckpt"], voting="soft")  # doctest: +SKIP
        >>> pl.Trainer().test(ensemble, datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        checkpoints: list[str] | None = None,
        members: Sequence[nn.Module] | None = None,
        member_class: ClassSpec | list[ClassSpec] | None = None,
        voting: str = "soft",
        weights: list[float] | None = None,
        fast_path: str = "auto",
        ema_members: str = "ema",
        trust_checkpoints: bool = False,
        num_classes: int | None = None,
        member_kwargs: dict[str, Any] | None = None,
        input_key: Key = None,
        target_key: Key = None,
        max_loss_ratio: float | None = 10.0,
        task: str | None = None,
    ) -> None:
        super().__init__()
        self.task_override = check_task_kind("task", task)
        # until the first batch shows the targets, a member's (N, C) output is read as single-label
        self.task, self._task_read = (task or "classification"), task is not None
        if task is not None:
            require_task("Ensemble", Task(task), ("classification", "multilabel"),
                         "evaluate the members yourself.")
        self.input_key, self.target_key = check_key("input_key", input_key), check_key("target_key", target_key)
        self.max_loss_ratio = screening.check_max_loss_ratio(max_loss_ratio)
        checkpoints, modules, self._class_specs, member_count, weights = check_ensemble_arguments(
            checkpoints, members, member_class, voting, weights, fast_path, ema_members, num_classes, member_kwargs)
        check_checkpoint_files(checkpoints)
        self.save_hyperparameters(ignore=["members", "member_class"])
        self.hparams["member_class"] = (None if member_class is None else
                                        [s if isinstance(s, str) else class_path(s) for s in self._class_specs])
        self.checkpoints, self.voting, self.fast_path = checkpoints, voting, fast_path
        self.ema_members, self.trust_checkpoints, self.num_classes = ema_members, trust_checkpoints, num_classes
        self.member_kwargs = dict(member_kwargs or {})
        self.member_count = member_count
        self.members = nn.ModuleList()
        self.member_names: list[str] = []
        self._python_members = modules
        self._declared_classes: list[int | None] = []
        self.register_buffer("vote_weights", None if weights is None else torch.tensor(weights))
        self._groups: list[list[int]] = []
        self._plans: dict[int, str] = {}
        self._stacks: dict[int, _vmap.StackedGroup] = {}
        self._metrics: dict[str, dict[str, Metric]] = {}
        self.member_inputs = MemberInputs()
        self.voters: list[int] | None = None  # None: every member votes
        self.load_members()  # every member checked now: a bad file fails here, in one line naming it

    applies_member_preprocessing = True
    """Each member's inputs are normalized here as that member was trained (a trainer's ``Standardize`` skips)."""

    # -- members ---------------------------------------------------------------------------------------------

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
        self._declared_classes = [_declared_num_classes(m) for _, m, _ in loaded]
        _check_class_counts([name for name, _, _ in loaded], self._declared_classes, self.num_classes, "predict")
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

    def train(self, mode: bool = True) -> Ensemble:
        """Members always stay in eval mode: an ensemble evaluates, it never updates batch-norm statistics."""
        super().train(mode)
        self.members.eval()
        return self

    # -- forward ---------------------------------------------------------------------------------------------

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
        _check_outputs(self.member_names, outputs, x.shape[0], self.expected_num_classes())
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

    def vote(self, member_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, preds)`` of this ensemble's voting: probabilities (vote shares for hard) and classes."""
        weights = self.vote_weights
        if self.voters is not None:  # members excluded by screening do not vote
            member_logits = member_logits[self.voters]
            weights = None if weights is None else weights[self.voters]
        if self.voting == "weighted" and weights is None:
            raise ConfigError("voting='weighted' without weights needs fitted weights: call fit_weights(dataloader) "
                              "or evaluate through a Trainer with a datamodule that has a validation set.")
        if self.task == "multilabel":
            return multilabel_vote(member_logits, self.voting, weights)
        if self.voting == "hard":
            return vote_shares(member_logits, weights), hard_vote(member_logits, weights)
        probs = soft_vote(member_logits, weights)
        return probs, probs.argmax(dim=-1)

    def _read_task(self, member_outputs: torch.Tensor, targets: Any) -> None:
        """The task, read once from the first member's output and the targets (`lightning_tricks.core.task`)."""
        if self._task_read:
            return
        kind = infer_task(member_outputs[0], targets, self.task_override).kind
        require_task("Ensemble", Task(kind), ("classification", "multilabel"),
                     "evaluate the members yourself, or pass task='classification' or 'multilabel' if the "
                     "targets misled the probe.")
        self.task, self._task_read = kind, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's class probabilities (vote shares for hard voting): ``(batch, classes)``."""
        return self.vote(self.member_logits(x))[0]

    # -- fitted weights --------------------------------------------------------------------------------------

    def fit_weights(self, dataloader: Any, sync: bool = False) -> torch.Tensor:
        """Fit the voting weights on labelled ``(x, y)`` batches (`fit_vote_weights`) and keep them.

        Args:
            dataloader: an iterable of ``(inputs, targets)`` batches (a validation set).
            sync: see `member_logits`.

        Returns:
            The weights, one per member, summing to 1.
        """
        logits, targets = [], []
        for batch in dataloader:
            x, y = split_batch(batch, self.input_key, self.target_key)
            logits.append(self.member_logits(x.to(self.device), sync=sync).float())
            targets.append(y.to(self.device))
        if not logits:
            raise ConfigError("fit_weights got an empty dataloader: expected labelled validation batches.")
        voters = self.voters if self.voters is not None else list(range(len(self.members)))
        fitted = fit_vote_weights(torch.cat(logits, dim=1)[voters], torch.cat(targets))
        weights = torch.zeros(len(self.members), device=self.device)  # excluded members: weight 0
        weights[voters] = fitted.float().to(self.device)
        self.vote_weights = weights
        return self.vote_weights

    def screen_members(self, dataloader: Any, what: str = "validation") -> list[int]:
        """Leave out of the vote the members whose mean loss on ``dataloader``'s labelled batches is not finite or
        far above the others' (`lightning_tricks.ensemble.screening`); returns the indices of those that vote.
        Run before every validate/test/predict through a Trainer (``max_loss_ratio=None`` switches it off)."""
        self.voters = None if self.max_loss_ratio is None else screening.screen(self, [dataloader], what)
        return self.voters if self.voters is not None else list(range(len(self.members)))

    # -- Lightning hooks -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ConfigError("An Ensemble only evaluates (validate, test, predict): train its members on their own, "
                              "or use the SnapshotEnsemble callback while training one model.")
        self.load_members()
        trainer = _attached_trainer(self)
        datamodule = trainer.datamodule if trainer is not None else None
        theirs = getattr(datamodule, "num_classes", None)
        mine = self.expected_num_classes()
        if isinstance(theirs, int) and mine is not None and theirs != mine:
            raise InvalidArgumentError(f"The ensemble's members predict {mine} classes but the datamodule has "
                                       f"num_classes={theirs}.")
        if trainer is not None:
            adopt_trainer_standardize(self, trainer)
        rank_zero_info("Ensemble members: " + ", ".join(f"{i}: {n}" for i, n in enumerate(self.member_names)))
        if trainer is not None and stage in ("validate", "test"):
            # no DistributedSampler padding: DDP metrics equal the single-process ones (lightning_tricks.evaluation)
            install_exact_evaluation(trainer, self, ["validate", "test"])

    def teardown(self, stage: str) -> None:
        trainer = _attached_trainer(self)
        if trainer is not None:
            uninstall_exact_evaluation(trainer, self)

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = split_batch(batch, self.input_key, self.target_key)
        outputs = self.member_outputs(x, sync=True)
        self._read_task(outputs, y)
        logits = self._as_logits(outputs)
        if self.task == "multilabel":
            raise TaskNotSupportedError("Ensemble logs single-label metrics only; for a multi-label model use "
                                        "trainer.predict(ensemble) (mean sigmoid probabilities) and your own metric.")
        scores, preds = self.vote(logits)
        if stage not in self._metrics:
            self._metrics[stage] = stage_metrics(len(self.members), logits.shape[-1], self.voting != "hard",
                                                  logits.device)
        update_metrics(self._metrics[stage], logits, scores, preds, y)

    def _log_epoch(self, stage: str) -> None:
        metrics = self._metrics.pop(stage, None)
        for name, value in (epoch_values(metrics) if metrics is not None else {}).items():
            self.log(f"{stage}_{name}", value, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch_inputs(batch, self.input_key)
        outputs = self.member_outputs(x, sync=True)
        self._read_task(outputs, batch_targets(batch, self.input_key, self.target_key))
        logits = self._as_logits(outputs)
        scores, preds = self.vote(logits)
        return {"probs": scores, "preds": preds}

    def _warn_padding(self, loaders: Any) -> None:
        warn_padding(loaders, self.trainer.world_size)

    def on_validation_start(self) -> None:
        self._warn_padding(self.trainer.val_dataloaders)
        stages.screen_before(self, "validate")
        stages.fit_weights_on_validation_set(self, "validate")

    def on_test_start(self) -> None:
        self._warn_padding(self.trainer.test_dataloaders)
        stages.screen_before(self, "test")
        stages.fit_weights_on_validation_set(self, "test")

    def on_predict_start(self) -> None:
        stages.screen_before(self, "predict")
        stages.fit_weights_on_validation_set(self, "predict")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
