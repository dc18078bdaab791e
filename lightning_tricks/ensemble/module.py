"""The :class:`Ensemble` LightningModule: several trained models evaluated as one (validate, test, predict).

Its parts: the argument checks (`lightning_tricks.ensemble.checks`), how members load and run
(`lightning_tricks.ensemble.members`), and its Lightning hooks (`lightning_tricks.ensemble.hooks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import Metric

from lightning_tricks.core.batch import Key, check_key
from lightning_tricks.core.task import Task, check_task_kind, infer_task, require_task
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.ensemble import _vmap, screening
from lightning_tricks.ensemble.checks import (  # noqa: F401  (re-exported: they lived here)
    EMA_MEMBERS,
    FAST_PATHS,
    VOTING,
    check_checkpoints,
    check_ensemble_arguments,
    check_member_class,
)
from lightning_tricks.ensemble.hooks import EvaluationHooks
from lightning_tricks.ensemble.inputs import MemberInputs, split_batch
from lightning_tricks.ensemble.loading import ClassSpec, check_checkpoint_files, class_path
from lightning_tricks.ensemble.members import MemberRunner
from lightning_tricks.ensemble.voting import (
    fit_vote_weights,
    hard_vote,
    multilabel_vote,
    soft_vote,
    vote_shares,
)


class Ensemble(MemberRunner, EvaluationHooks, pl.LightningModule):
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

    def train(self, mode: bool = True) -> Ensemble:
        """Members always stay in eval mode: an ensemble evaluates, it never updates batch-norm statistics."""
        super().train(mode)
        self.members.eval()
        return self

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
