"""Model ensembles: checkpoint ensembles with soft, hard or weighted voting, snapshot ensembles, EMA members.

The lectures' recipe: train several models independently and, at test time, average their predicted
class distributions, then take the argmax. Snapshots of one run taken at the ends of cyclic
learning-rate cycles (Huang et al. 2017) and the exponential moving average of the weights are two
cheaper sources of members.

Functional core (plain torch, no Lightning): :func:`soft_vote`, :func:`hard_vote`, :func:`vote_shares`,
:func:`fit_vote_weights`, :func:`snapshot_lr`, :func:`load_member`. Lightning shell: the
:class:`Ensemble` LightningModule (``validate``/``test``/``predict``), the :class:`SnapshotEnsemble`
callback and :class:`EMAMembers` (Lightning's ``EMAWeightAveraging`` that also keeps the raw weights).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import pickle
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks._validation import (
    ConfigError,
    DataNotFoundError,
    InvalidArgumentError,
    check_choice,
    check_int,
    check_positive,
)
from lightning_tricks.distributed import all_reduce
from lightning_tricks.evaluation import install_exact_evaluation, uninstall_exact_evaluation

VOTING = ("soft", "hard", "weighted")
FAST_PATHS = ("auto", "probe", "vmap", "loop")
EMA_MEMBERS = ("ema", "raw", "both")

# Lightning's allowlist of instantiators a checkpoint may name (lightning.pytorch.core.saving._ALLOWED_INSTANTIATORS).
_TRUSTED_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
# auto picks the vectorized path only if it wins every probe round and its median beats the loop's by this
# margin, so that noise on a shared machine does not pick the slower path
_VMAP_MARGIN = 0.9
_PROBE_ROUNDS = 5

ClassSpec = str | type[pl.LightningModule]


class CheckpointError(ConfigError):
    """A checkpoint that cannot serve as an ensemble member: not a Lightning checkpoint, unknown class, bad weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses because it holds arbitrary Python objects."""


# ----------------------------------------------------------------------------------------------------------------
# Functional core: voting


def _check_member_logits(member_logits: torch.Tensor) -> None:
    if not isinstance(member_logits, torch.Tensor) or member_logits.ndim != 3 or member_logits.shape[0] < 1:
        shape = tuple(member_logits.shape) if isinstance(member_logits, torch.Tensor) else type(member_logits).__name__
        raise InvalidArgumentError(f"`member_logits` of shape {shape} is invalid: expected (members, batch, classes).")


def check_vote_weights(weights: Sequence[float] | torch.Tensor, members: int, name: str = "weights") -> list[float]:
    """Validate voting weights: ``members`` finite non-negative numbers, not all zero. Returns them as floats."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != members:
        raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected {members} weights, one per member.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected finite non-negative numbers.")
    if sum(values) <= 0:
        raise InvalidArgumentError(f"`{name}`={values!r} is invalid: expected at least one positive weight.")
    return [float(v) for v in values]


def _normalized(weights: Sequence[float] | torch.Tensor | None, members: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((members,), 1.0 / members, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(check_vote_weights(weights, members), dtype=like.dtype, device=like.device)
    return w / w.sum()


def soft_vote(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """The ensemble's class probabilities: the (weighted) mean of the members' softmax probabilities.

    Args:
        member_logits: ``(members, batch, classes)`` logits.
        weights: one non-negative weight per member (normalized to sum 1); ``None`` is the plain mean.

    Returns:
        ``(batch, classes)`` probabilities in float32 (or the logits' dtype if wider).

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
        >>> soft_vote(logits).argmax(-1)
        tensor([0])
    """
    _check_member_logits(member_logits)
    probs = member_logits.float().softmax(dim=-1) if member_logits.dtype != torch.float64 else member_logits.softmax(-1)
    w = _normalized(weights, probs.shape[0], probs)
    return torch.einsum("m,mnc->nc", w, probs)


def vote_shares(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Each class's share of the (weighted) votes, a member voting for its argmax class: ``(batch, classes)``."""
    _check_member_logits(member_logits)
    votes = F.one_hot(member_logits.argmax(dim=-1), member_logits.shape[-1]).float()
    w = _normalized(weights, votes.shape[0], votes)
    return torch.einsum("m,mnc->nc", w, votes)


def hard_vote(member_logits: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Majority voting: the class most members (by weight) predict, for each sample.

    Ties are broken deterministically: among the tied classes, the one with the highest mean softmax
    probability wins, and if that ties too, the lowest class index.

    Args:
        member_logits: ``(members, batch, classes)`` logits.
        weights: one non-negative weight per member (a weighted majority); ``None`` gives one vote each.

    Returns:
        ``(batch,)`` class indices.

    Example:
        >>> logits = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 2.0, 0.0]]])
        >>> hard_vote(logits)
        tensor([1])
    """
    shares = vote_shares(member_logits, weights)
    tied = shares == shares.max(dim=-1, keepdim=True).values
    tie_break = torch.where(tied, soft_vote(member_logits, weights), torch.full_like(shares, -1.0))
    return tie_break.argmax(dim=-1)


def fit_vote_weights(member_logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 2000,
                     tol: float = 1e-9) -> torch.Tensor:
    """Voting weights that minimize the negative log-likelihood of the weighted soft vote on labelled data.

    The mixture ``p(y|x) = sum_m w_m p_m(y|x)`` is fitted over the probability simplex by
    expectation-maximization, which increases the likelihood at every step and reaches the global
    optimum of this convex problem; it starts from equal weights and needs no learning rate.

    Args:
        member_logits: ``(members, samples, classes)`` logits on held-out (validation) data.
        targets: ``(samples,)`` class indices.
        max_iter: EM iterations at most.
        tol: stop when no weight moves by more than this.

    Returns:
        ``(members,)`` float64 weights summing to 1.

    Example:
        >>> good = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
        >>> bad = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
        >>> fit_vote_weights(torch.stack([good, bad]), torch.tensor([0, 1])).argmax().item()
        0
    """
    _check_member_logits(member_logits)
    if targets.ndim != 1 or targets.shape[0] != member_logits.shape[1]:
        raise InvalidArgumentError(f"`targets` of shape {tuple(targets.shape)} is invalid: expected "
                                   f"({member_logits.shape[1]},), one class index per sample.")
    check_int("max_iter", max_iter, 1)
    log_probs = member_logits.double().log_softmax(dim=-1)
    index = targets.to(log_probs.device).view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    likelihood = log_probs.gather(-1, index).squeeze(-1).exp().clamp_min(1e-300)  # (members, samples)
    weights = torch.full((likelihood.shape[0],), 1.0 / likelihood.shape[0], dtype=torch.float64,
                         device=likelihood.device)
    for _ in range(max_iter):
        responsibility = weights[:, None] * likelihood
        updated = (responsibility / responsibility.sum(dim=0, keepdim=True)).mean(dim=1)
        converged = bool((updated - weights).abs().max() <= tol)
        weights = updated
        if converged:
            break
    return weights / weights.sum()


# ----------------------------------------------------------------------------------------------------------------
# Functional core: the snapshot schedule


def snapshot_lr(step: int, total_steps: int, cycles: int, lr: float) -> float:
    """Huang et al. (2017)'s cyclic cosine learning rate at iteration ``step`` (1-based).

    ``alpha(t) = alpha0 / 2 * (cos(pi * ((t - 1) mod ceil(T / M)) / ceil(T / M)) + 1)``: every cycle of
    ``ceil(T / M)`` iterations starts at ``lr`` and anneals towards 0.

    Example:
        >>> [round(snapshot_lr(t, 8, 2, 0.1), 4) for t in range(1, 9)]
        [0.1, 0.0854, 0.05, 0.0146, 0.1, 0.0854, 0.05, 0.0146]
    """
    cycle_length = math.ceil(total_steps / cycles)
    return lr / 2 * (math.cos(math.pi * ((step - 1) % cycle_length) / cycle_length) + 1)


# ----------------------------------------------------------------------------------------------------------------
# Functional core: safe member loading


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str, label: str) -> type:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InvalidArgumentError(f"`{label}`={path!r} is invalid: expected an importable "
                                   f"'package.module.ClassName' ({err}).") from err


def _class_named_by_checkpoint(path: Any, trust: bool, label: str) -> type:
    if not isinstance(path, str) or "." not in path:
        raise CheckpointError(f"{label} names its class as {path!r}: expected 'package.module.ClassName'.")
    module_name, _, name = path.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        if not trust:
            raise CheckpointError(
                f"{label} names its class {path!r}, whose module is not imported; importing a module named by a file "
                f"runs that module's code. Pass member_class={path!r} if you vouch for it, import the module first, "
                "or opt in with trust_checkpoints=True.")
        module = importlib.import_module(module_name)
    target = getattr(module, name, None)
    if not isinstance(target, type):
        raise CheckpointError(f"{label} names its class {path!r}, which {module_name!r} does not define.")
    return target


def _torch_load(path: Path, trust: bool, label: str) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust:
            raise CheckpointError(f"{label} could not be unpickled: {err}") from err
        found = re.search(r"GLOBAL (\S+) was not", str(err))
        what = f"`{found.group(1)}`" if found else "a Python object that is not a tensor or plain value"
        raise UnsafeCheckpointError(
            f"{label} was refused: it holds {what}, and loading anything beyond tensors and plain values means "
            "unpickling, which can run arbitrary code on this machine. If you trust where the file comes from, "
            "opt in with trust_checkpoints=True (YAML: `trust_checkpoints: true`); otherwise re-save it with "
            "tensors and plain values only.") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{label} is not a readable torch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{label} has no 'state_dict': expected a Lightning checkpoint "
                              "(from ModelCheckpoint or trainer.save_checkpoint).")
    return checkpoint


def _init_kwargs(cls: type, hparams: dict[str, Any], hparams_name: Any) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    named = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if isinstance(hparams_name, str) and hparams_name in named:  # old style: __init__(self, hparams)
        return {hparams_name: hparams}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return hparams
    return {k: v for k, v in hparams.items() if k in named}


def load_member(path: str | os.PathLike, member_class: ClassSpec | None = None, trust_checkpoints: bool = False,
                weights: str = "ema", label: str | None = None) -> pl.LightningModule:
    """Build a LightningModule from a checkpoint, safely: ``torch.load(weights_only=True)`` by default.

    The class is ``member_class`` when given, else the ``_class_path`` that LightningCLI records in the
    checkpoint's hyper-parameters (``load_from_checkpoint_support``, on by default). A class named by
    the checkpoint is resolved only from modules already imported, as Lightning does, unless
    ``trust_checkpoints``. The module is built from the saved hyper-parameters (through LightningCLI's
    instantiator when the checkpoint names it), its ``on_load_checkpoint`` hook runs, and the weights
    load strictly. The module is returned in eval mode, on the CPU.

    Args:
        path: the ``.ckpt`` file.
        member_class: the LightningModule class or its import path; ``None`` reads ``_class_path``.
        trust_checkpoints: load with ``weights_only=False`` and import modules the checkpoint names
            (only for files from a trusted source: unpickling can run arbitrary code).
        weights: which weights of a checkpoint written during fit with Lightning's ``WeightAveraging``
            (e.g. ``EMAWeightAveraging``): ``ema`` (its ``state_dict``, the averaged weights) or ``raw``
            (``current_model_state``, the training weights). A checkpoint without weight averaging
            holds one set of weights, used for both.
        label: how errors name the file (defaults to the path).

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs more than ``weights_only`` loading and is not trusted.
        CheckpointError: no state dict, an unknown class, or weights that do not fit the class.

    Example:
        >>> member = load_member("runs/digits/version_0/checkpoints/best.ckpt")  # doctest: +SKIP
    """
    check_choice("weights", weights, ("ema", "raw"))
    label = label or f"checkpoint {str(path)!r}"
    return _build_member(read_checkpoint(path, trust_checkpoints, label), member_class, trust_checkpoints, weights,
                         label)


def read_checkpoint(path: str | os.PathLike, trust_checkpoints: bool = False, label: str | None = None
                    ) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint onto the CPU, with ``weights_only=True`` unless trusted.

    Raises:
        DataNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file needs unpickling and ``trust_checkpoints`` is False; the message
            names the object found, the risk and the opt-in.
        CheckpointError: not a torch file, or no ``state_dict``.
    """
    label = label or f"checkpoint {str(path)!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"{label} does not exist: expected a Lightning checkpoint file (.ckpt).")
    return _torch_load(file, trust_checkpoints, label)


def _build_member(checkpoint: dict[str, Any], member_class: ClassSpec | None, trust_checkpoints: bool, weights: str,
                  label: str) -> pl.LightningModule:
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    instantiator = hparams.pop("_instantiator", None)
    named_class = hparams.pop("_class_path", None)
    if member_class is None:
        if named_class is None:
            raise CheckpointError(
                f"{label} does not record its LightningModule class (LightningCLI stores it as `_class_path`; "
                "checkpoints of Python-built modules do not): pass member_class='package.module.ClassName'.")
        cls = _class_named_by_checkpoint(named_class, trust_checkpoints, label)
    else:
        cls = _import_class(member_class, "member_class") if isinstance(member_class, str) else member_class
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise CheckpointError(f"{label}: the member class {cls!r} is not a LightningModule subclass.")
    try:
        kwargs = _init_kwargs(cls, hparams, checkpoint.get("hparams_name"))
        if instantiator in _TRUSTED_INSTANTIATORS:  # LightningCLI's: builds nested class_path arguments too
            from lightning.pytorch.cli import instantiate_module

            model = instantiate_module(cls, kwargs)
        else:
            model = cls(**kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's constructor may raise anything
        raise CheckpointError(f"{label}: building {_class_path(cls)} from its saved hyper-parameters failed: "
                              f"{type(err).__name__}: {err}") from err
    state = checkpoint["state_dict"]
    if weights == "raw" and isinstance(checkpoint.get("current_model_state"), dict):
        state = checkpoint["current_model_state"]
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{label}: its weights do not fit {_class_path(cls)} built from its hyper-parameters "
                              f"(a different class or architecture?): {err}") from err
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Execution: a vectorized path for members of one architecture


def architecture_key(module: nn.Module) -> tuple:
    """What must be equal for two modules to run as one vectorized call: every submodule's type and
    settings (``extra_repr``), and every parameter's and buffer's name, shape and dtype."""
    return (
        type(module),
        tuple((name, type(m), m.extra_repr()) for name, m in module.named_modules()),
        tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
    )


class _StackedGroup:
    """Members of one architecture whose parameters and buffers live in stacked tensors, run with vmap.

    After stacking, each member's tensors are views into the stacked ones, so no memory is duplicated
    and in-place updates of a member reach the stack; a member tensor replaced by another (``.to()``,
    assignment) is detected and the stack is rebuilt.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    def _tensors(self) -> list[tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]:
        return [(self.params, [dict(m.named_parameters()) for m in self.modules]),
                (self.buffers, [dict(m.named_buffers()) for m in self.modules])]

    def _valid(self) -> bool:
        for stacked, per_member in self._tensors():
            if len(stacked) != len(per_member[0]):
                return False
            for k, tensors in enumerate(per_member):
                for name, tensor in tensors.items():
                    if name not in stacked or tensor.data_ptr() != stacked[name][k].data_ptr():
                        return False
        return True

    def _stack(self) -> None:
        with torch.no_grad(), torch.inference_mode(False):
            for stacked, per_member in self._tensors():
                stacked.clear()
                for name in per_member[0]:
                    stacked[name] = torch.stack([tensors[name].detach() for tensors in per_member])
                    for k, tensors in enumerate(per_member):
                        tensors[name].data = stacked[name][k]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._valid():
            self._stack()
        base = self.modules[0]

        def call(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], inputs: torch.Tensor) -> Any:
            return torch.func.functional_call(base, (params, buffers), (inputs,))

        return torch.func.vmap(call, in_dims=(0, 0, None))(self.params, self.buffers, x)


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# The Ensemble LightningModule


class Ensemble(pl.LightningModule):
    """Evaluate several trained models as one: ``trainer.validate/test/predict(Ensemble(...))``.

    Members come from checkpoint paths (each built with its own LightningModule class, recorded by
    LightningCLI or given as ``member_class``), from modules passed in Python, or both, and may differ
    in architecture. Checkpoints load lazily, at ``setup`` (or the first forward in plain Python), with
    ``torch.load(weights_only=True)`` unless ``trust_checkpoints``.

    Voting: ``soft`` averages the members' softmax probabilities and takes the argmax (the lectures'
    recipe), ``hard`` takes the per-sample majority of the members' argmax classes (ties go to the tied
    class with the highest mean probability, then the lowest index; ``weights`` make it a weighted
    majority), ``weighted`` is soft voting with ``weights``, or with weights fitted on the
    datamodule's validation set (:func:`fit_vote_weights`) when ``weights`` is None.

    Members of one architecture can run as one vectorized call (``torch.func.stack_module_state``-style
    stacking, ``functional_call`` and ``vmap``). ``fast_path="probe"`` times both ways on the first batch
    (up to 5 interleaved rounds; the same decision on every DDP rank) and keeps the vectorized call only
    if it gives the same outputs, wins every round and is at least 10% faster. ``auto`` (the default)
    probes on accelerators and runs the loop on CPU, where vmap was slower for every zoo model
    (1.2-3.6x, ``benchmarks/ensemble.py``) and a probe would only cost time.

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

    Raises:
        InvalidArgumentError: an empty or malformed checkpoint list, an unknown choice, weights of the
            wrong length or negative, ``weights`` with ``soft`` voting.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_tricks.zoo import DigitsDataModule
        >>> ensemble = Ensemble(checkpoints=["a.ckpt", "b.ckpt"], voting="soft")
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
    ) -> None:
        super().__init__()
        checkpoints = self._check_checkpoints(checkpoints)
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
        if num_classes is not None:
            check_int("num_classes", num_classes, 2)
        self._class_specs = self._check_member_class(member_class, len(checkpoints))
        member_count = len(checkpoints) * (2 if ema_members == "both" else 1) + len(modules)
        if weights is not None:
            if voting == "soft":
                raise InvalidArgumentError(f"`weights`={weights!r} is invalid with `voting`='soft': use "
                                           "voting='weighted' for a weighted mean of probabilities.")
            weights = check_vote_weights(weights, member_count)
        self.save_hyperparameters(ignore=["members", "member_class"])
        self.hparams["member_class"] = (None if member_class is None else
                                        [s if isinstance(s, str) else _class_path(s) for s in self._class_specs])
        self.checkpoints, self.voting, self.fast_path = checkpoints, voting, fast_path
        self.ema_members, self.trust_checkpoints, self.num_classes = ema_members, trust_checkpoints, num_classes
        self.member_count = member_count
        self.members = nn.ModuleList()
        self.member_names: list[str] = []
        self._python_members = modules
        self._declared_classes: list[int | None] = []
        self.register_buffer("vote_weights", None if weights is None else torch.tensor(weights))
        self._groups: list[list[int]] = []
        self._plans: dict[int, str] = {}
        self._stacks: dict[int, _StackedGroup] = {}
        self._metrics: dict[str, dict[str, Metric]] = {}

    # -- arguments -------------------------------------------------------------------------------------------

    @staticmethod
    def _check_checkpoints(checkpoints: Any) -> list[str]:
        if checkpoints is None:
            return []
        if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Sequence):
            raise InvalidArgumentError(f"`checkpoints`={checkpoints!r} is invalid: expected a list of .ckpt paths.")
        for path in checkpoints:
            if not isinstance(path, (str, os.PathLike)) or not str(path):
                raise InvalidArgumentError(f"`checkpoints`={list(checkpoints)!r} is invalid: expected a list of "
                                           ".ckpt paths.")
        return [str(p) for p in checkpoints]

    @staticmethod
    def _check_member_class(member_class: Any, count: int) -> list[ClassSpec | None]:
        specs = member_class if isinstance(member_class, (list, tuple)) else [member_class] * count
        if len(specs) != count:
            raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected one class for all "
                                       f"checkpoints or a list of {count}, one per checkpoint.")
        for spec in specs:
            if spec is not None and not isinstance(spec, str) and not (
                    isinstance(spec, type) and issubclass(spec, pl.LightningModule)):
                raise InvalidArgumentError(f"`member_class`={member_class!r} is invalid: expected a LightningModule "
                                           "subclass or its import path 'package.module.ClassName'.")
        return list(specs)

    # -- members ---------------------------------------------------------------------------------------------

    def load_members(self) -> nn.ModuleList:
        """Load the checkpoints (once) and group members of one architecture; returns ``self.members``.

        Raises:
            DataNotFoundError: a checkpoint file is missing.
            UnsafeCheckpointError: a checkpoint needs unpickling and ``trust_checkpoints`` is False.
            CheckpointError: a checkpoint that cannot be built, or ``ema_members='both'`` on a checkpoint
                without EMA weights.
            InvalidArgumentError: members that declare different class counts.
        """
        if len(self.members):
            return self.members
        loaded: list[tuple[str, nn.Module]] = []
        variants = {"ema": ("ema",), "raw": ("raw",), "both": ("ema", "raw")}[self.ema_members]
        for i, (path, spec) in enumerate(zip(self.checkpoints, self._class_specs, strict=True)):
            label = f"`checkpoints`[{i}]={path!r}"
            checkpoint = read_checkpoint(path, self.trust_checkpoints, label)
            if self.ema_members == "both" and not isinstance(checkpoint.get("current_model_state"), dict):
                raise CheckpointError(
                    f"{label} holds one set of weights (no 'current_model_state'), so `ema_members`='both' cannot "
                    "make two members of it: write it during fit with lightning.pytorch.callbacks.EMAWeightAveraging "
                    "(or lightning_tricks.EMAMembers), or set ema_members='ema'.")
            for variant in variants:
                module = _build_member(checkpoint, spec, self.trust_checkpoints, variant, label)
                suffix = f"[{variant}]" if self.ema_members == "both" else ""
                loaded.append((f"{_short_names(self.checkpoints)[i]}{suffix}", module))
        loaded += [(f"members[{i}]:{type(m).__name__}", m) for i, m in enumerate(self._python_members)]
        self._declared_classes = [_declared_num_classes(m) for _, m in loaded]
        self._check_declared_classes([name for name, _ in loaded])
        for name, module in loaded:
            module.eval()
            self.members.append(module)
            self.member_names.append(name)
        keys: dict[tuple, list[int]] = {}
        for i, module in enumerate(self.members):
            keys.setdefault(architecture_key(module), []).append(i)
        self._groups = list(keys.values())
        return self.members

    def _check_declared_classes(self, names: list[str]) -> None:
        known = {n for n in self._declared_classes if n is not None}
        if self.num_classes is not None:
            known.add(self.num_classes)
        if len(known) > 1:
            listing = ", ".join(f"{name}: {n}" for name, n in zip(names, self._declared_classes, strict=True)
                                if n is not None)
            extra = f"; num_classes={self.num_classes}" if self.num_classes is not None else ""
            raise InvalidArgumentError(f"The ensemble's members predict different numbers of classes ({listing}"
                                       f"{extra}): every member must score the same classes.")

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

    def member_logits(self, x: torch.Tensor, sync: bool = False) -> torch.Tensor:
        """Every member's logits for ``x``: ``(members, batch, classes)``, without gradients.

        Args:
            x: a batch of inputs.
            sync: make the fast-path decision (``auto``/``probe``) identical on all DDP ranks (a collective:
                only pass True where every rank calls this at the same point, as in the Lightning hooks).
        """
        self.load_members()
        outputs: list[torch.Tensor | None] = [None] * len(self.members)
        with torch.no_grad():
            for gi, group in enumerate(self._groups):
                if len(group) > 1 and self._plan(gi, x, sync) == "vmap":
                    stacked = self._stacks[gi](x)
                    for k, i in enumerate(group):
                        outputs[i] = stacked[k]
                else:
                    for i in group:
                        outputs[i] = self._run_member(i, x)
        return self._check_outputs(outputs, x)

    def _run_member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.members[i](x)

    def _check_outputs(self, outputs: list[Any], x: torch.Tensor) -> torch.Tensor:
        for name, out in zip(self.member_names, outputs, strict=True):
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InvalidArgumentError(f"Ensemble member {name} returned {got} for a batch of {x.shape[0]}: "
                                           "expected forward(x) to return (batch, classes) logits.")
        widths = [out.shape[1] for out in outputs]
        expected = self.expected_num_classes()
        if len(set(widths)) > 1 or (expected is not None and widths[0] != expected):
            listing = ", ".join(f"{name}: {w}" for name, w in zip(self.member_names, widths, strict=True))
            extra = f" (expected {expected})" if expected is not None else ""
            raise InvalidArgumentError(f"The ensemble's members output different numbers of classes ({listing})"
                                       f"{extra}: every member must score the same classes.")
        return torch.stack(outputs)

    def _plan(self, gi: int, x: torch.Tensor, sync: bool) -> str:
        if gi in self._plans:
            return self._plans[gi]
        # auto never vectorizes on CPU: there vmap was 1.2-3.6x slower than the loop for every zoo model
        # (benchmarks/ensemble.py), so the probe's one-time cost would buy nothing
        if self.fast_path == "loop" or (self.fast_path == "auto" and x.device.type == "cpu"):
            self._plans[gi] = "loop"
            return "loop"
        group = self._groups[gi]
        stack = self._stacks.setdefault(gi, _StackedGroup([self.members[i] for i in group]))
        failure, probe = "", [0.0, 0.0, 0.0]
        try:
            vectorized = stack(x)
            looped = torch.stack([self._run_member(i, x) for i in group])
            if vectorized.shape != looped.shape or not torch.allclose(vectorized.float(), looped.float(),
                                                                     rtol=1e-4, atol=1e-5):
                diff = (vectorized.float() - looped.float()).abs().max().item() if vectorized.shape == looped.shape \
                    else f"shapes {tuple(vectorized.shape)} vs {tuple(looped.shape)}"
                failure = f"its outputs differ from running the members one by one (max difference {diff})"
            elif self.fast_path != "vmap":
                probe = self._probe(gi, x)
        except Exception as err:  # noqa: BLE001 - a forward vmap cannot batch (data-dependent code, .item())
            failure = f"vmap cannot run it ({type(err).__name__}: {err})"
        names = ", ".join(self.member_names[i] for i in group)
        if self.fast_path == "vmap" and failure:
            raise InvalidArgumentError(f"`fast_path`='vmap' cannot serve members {names}: {failure}. "
                                       "Use fast_path='loop' (or 'auto').")
        # [vmap seconds, loop seconds, rounds vmap won, rounds, failures], summed over ranks when synced, so that
        # every rank takes the same decision
        summary = torch.tensor([*probe, _PROBE_ROUNDS, float(bool(failure))], dtype=torch.float64)
        if sync:
            all_reduce(summary)
        vmap_time, loop_time, wins, rounds, failures = summary.tolist()
        if self.fast_path == "vmap":
            plan = "vmap"
        else:
            plan = "vmap" if not failures and wins == rounds and vmap_time < _VMAP_MARGIN * loop_time else "loop"
            if failure:
                rank_zero_warn(f"Ensemble: members {names} run one by one because {failure}.")
        self._plans[gi] = plan
        if plan == "loop":
            del self._stacks[gi]  # the members keep their tensors (views of the stack's storage, no copy)
        return plan

    def _probe(self, gi: int, x: torch.Tensor) -> list[float]:
        """Median seconds of the vectorized call and of the loop, and the rounds the vectorized call won.

        Rounds are interleaved (the calls that checked the outputs were the warm-up) and stop at the first
        round the vectorized call loses, since it must win them all: a slower vmap costs one round.
        """
        group, stack = self._groups[gi], self._stacks[gi]
        runs: dict[str, Callable[[], Any]] = {
            "vmap": lambda: stack(x), "loop": lambda: [self._run_member(i, x) for i in group]}
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(_PROBE_ROUNDS):
            for name, run in runs.items():
                _sync_device(x.device)
                start = time.perf_counter()
                run()
                _sync_device(x.device)
                samples[name].append(time.perf_counter() - start)
            if samples["vmap"][-1] >= samples["loop"][-1]:
                break
        wins = sum(v < lp for v, lp in zip(samples["vmap"], samples["loop"], strict=True))
        return [statistics.median(samples["vmap"]), statistics.median(samples["loop"]), float(wins)]

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
        if self.voting == "weighted" and weights is None:
            raise ConfigError("voting='weighted' without weights needs fitted weights: call fit_weights(dataloader) "
                              "or evaluate through a Trainer with a datamodule that has a validation set.")
        if self.voting == "hard":
            return vote_shares(member_logits, weights), hard_vote(member_logits, weights)
        probs = soft_vote(member_logits, weights)
        return probs, probs.argmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's class probabilities (vote shares for hard voting): ``(batch, classes)``."""
        return self.vote(self.member_logits(x))[0]

    # -- fitted weights --------------------------------------------------------------------------------------

    def fit_weights(self, dataloader: Any, sync: bool = False) -> torch.Tensor:
        """Fit the voting weights on labelled ``(x, y)`` batches (:func:`fit_vote_weights`) and keep them.

        Args:
            dataloader: an iterable of ``(inputs, targets)`` batches (a validation set).
            sync: see :meth:`member_logits`.

        Returns:
            The weights, one per member, summing to 1.
        """
        logits, targets = [], []
        for batch in dataloader:
            x, y = self._split(batch)
            x, y = x.to(self.device), y.to(self.device)
            logits.append(self.member_logits(x, sync=sync).float())
            targets.append(y)
        if not logits:
            raise ConfigError("fit_weights got an empty dataloader: expected labelled validation batches.")
        weights = fit_vote_weights(torch.cat(logits, dim=1), torch.cat(targets))
        self.vote_weights = weights.float().to(self.device)
        return self.vote_weights

    def _fit_weights_from_datamodule(self, stage: str) -> None:
        if self.voting != "weighted" or self.vote_weights is not None:
            return
        datamodule = self.trainer.datamodule
        loader = getattr(datamodule, "val_dataloader", None) if datamodule is not None else None
        if loader is None:
            raise ConfigError("voting='weighted' without weights fits them on the datamodule's validation set, "
                              "but this run has no datamodule with val_dataloader(): pass weights=[...] or a datamodule.")
        if stage == "validate":
            rank_zero_warn("Ensemble: the voting weights are fitted on the validation set that is being evaluated, "
                           "so the validation metrics are optimistic; report test metrics.")
        # every rank fits on the whole validation set (no sampler, no padding), then rank 0's result is used
        weights = self.fit_weights(loader(), sync=True)
        self.vote_weights = self.trainer.strategy.broadcast(weights.cpu(), src=0).to(self.device)
        rank_zero_info("Ensemble: fitted voting weights " + ", ".join(
            f"{name}={w:.3f}" for name, w in zip(self.member_names, self.vote_weights.tolist(), strict=True)))

    # -- Lightning hooks -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ConfigError("An Ensemble only evaluates (validate, test, predict): train its members on their own, "
                              "or use the SnapshotEnsemble callback while training one model.")
        self.load_members()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        theirs = getattr(datamodule, "num_classes", None)
        mine = self.expected_num_classes()
        if isinstance(theirs, int) and mine is not None and theirs != mine:
            raise InvalidArgumentError(f"The ensemble's members predict {mine} classes but the datamodule has "
                                       f"num_classes={theirs}.")
        rank_zero_info("Ensemble members: " + ", ".join(f"{i}: {n}" for i, n in enumerate(self.member_names)))
        if self._trainer is not None and stage in ("validate", "test"):
            # no DistributedSampler padding: DDP metrics equal the single-process ones (lightning_tricks.evaluation)
            install_exact_evaluation(self.trainer, self, ["validate", "test"])

    def teardown(self, stage: str) -> None:
        if self._trainer is not None:
            uninstall_exact_evaluation(self.trainer, self)

    @staticmethod
    def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise InvalidArgumentError(f"An Ensemble evaluates (inputs, targets) batches; got {type(batch).__name__}.")

    def _stage_metrics(self, stage: str, num_classes: int, device: torch.device) -> dict[str, Metric]:
        if stage not in self._metrics:
            metrics: dict[str, Metric] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
            if self.voting != "hard":
                metrics["loss"] = MeanMetric()
            for i in range(len(self.members)):
                metrics[f"acc_member_{i}"] = MulticlassAccuracy(num_classes, average="micro")
                metrics[f"loss_member_{i}"] = MeanMetric()
            self._metrics[stage] = {k: m.to(device) for k, m in metrics.items()}
        return self._metrics[stage]

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = self._split(batch)
        logits = self.member_logits(x, sync=True)
        scores, preds = self.vote(logits)
        metrics = self._stage_metrics(stage, logits.shape[-1], logits.device)
        metrics["acc"].update(preds, y)
        if "loss" in metrics:
            metrics["loss"].update(F.nll_loss(scores.clamp_min(1e-12).log(), y, reduction="none"))
        for i in range(logits.shape[0]):
            metrics[f"acc_member_{i}"].update(logits[i].argmax(dim=-1), y)
            metrics[f"loss_member_{i}"].update(F.cross_entropy(logits[i].float(), y, reduction="none"))

    def _log_epoch(self, stage: str) -> None:
        metrics = self._metrics.pop(stage, None)
        if metrics is None:
            return
        values = {name: metric.compute() for name, metric in metrics.items()}  # synced over ranks
        count = len(self.members)
        for kind in ("acc", "loss"):
            values[f"{kind}_member_mean"] = torch.stack([values[f"{kind}_member_{i}"] for i in range(count)]).mean()
        for name, value in values.items():
            self.log(f"{stage}_{name}", value.float(), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        scores, preds = self.vote(self.member_logits(x, sync=True))
        return {"probs": scores, "preds": preds}

    def _warn_padding(self, loaders: Any) -> None:
        """Say so when DistributedSampler pads the evaluation set with duplicates, which the counts include."""
        if self.trainer.world_size < 2:
            return
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
                extra = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
                if extra > 0:
                    rank_zero_warn(f"Ensemble: DistributedSampler pads the {len(sampler.dataset)} evaluation "  # type: ignore[arg-type]
                                   f"samples with {extra} duplicates, which the metrics count; use a set size "
                                   f"divisible by {self.trainer.world_size} processes for exact metrics.")

    def on_validation_start(self) -> None:
        self._warn_padding(self.trainer.val_dataloaders)
        self._fit_weights_from_datamodule("validate")

    def on_test_start(self) -> None:
        self._warn_padding(self.trainer.test_dataloaders)
        self._fit_weights_from_datamodule("test")

    def on_predict_start(self) -> None:
        self._fit_weights_from_datamodule("predict")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


def _short_names(paths: Sequence[str]) -> list[str]:
    """The shortest path suffixes that tell the files apart (``run_a/best.ckpt``, ``run_b/best.ckpt``)."""
    parts = [Path(p).parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _declared_num_classes(module: nn.Module) -> int | None:
    hparams = getattr(module, "hparams", None)
    value = hparams.get("num_classes") if hasattr(hparams, "get") else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------------------------
# SnapshotEnsemble callback


class SnapshotEnsemble(Callback):
    """Snapshot ensembles (Huang et al. 2017): M cosine learning-rate cycles in one run, a snapshot after each.

    Before every optimizer step ``t`` (1-based) of the ``T`` steps the Trainer will take
    (``trainer.estimated_stepping_batches``), every parameter group's learning rate is set to
    :func:`snapshot_lr`: ``alpha0/2 * (cos(pi * ((t-1) mod ceil(T/M)) / ceil(T/M)) + 1)``. At the end of
    each cycle (steps ``ceil(T/M)``, ``2 ceil(T/M)``, ... and ``T``) the model is saved with
    ``trainer.save_checkpoint(weights_only=True)`` to ``dirpath``; an ``ensemble.yaml`` beside the
    snapshots lists them as a ready :class:`Ensemble` config, and :meth:`ensemble` builds that Ensemble
    in Python. The schedule is a function of ``trainer.global_step``, so a run resumed with
    ``ckpt_path`` continues it exactly; the base learning rates, budget and snapshot paths are in the
    callback's checkpoint state.

    The callback owns the learning rate: a scheduler returned by ``configure_optimizers`` is removed at
    the start of training, with a warning (as Lightning's ``StochasticWeightAveraging`` does).

    Args:
        cycles: M, the number of cycles and snapshots; 1 <= M <= T, and M cycles of ``ceil(T/M)`` steps
            must fit in T.
        lr: alpha0, the learning rate at the start of every cycle; ``None`` takes each parameter group's
            learning rate when training starts.
        dirpath: where snapshots go; defaults to ``<trainer.log_dir>/snapshots``.

    Raises:
        InvalidArgumentError: ``cycles`` < 1 or a non-positive ``lr`` (at construction); more cycles than
            training steps, an unbounded run, or a budget changed on resume (when training starts).

    Example:
        >>> import lightning.pytorch as pl
        >>> snapshots = SnapshotEnsemble(cycles=5, lr=0.1)
        >>> trainer = pl.Trainer(max_epochs=50, callbacks=[snapshots])
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP
        >>> trainer.test(snapshots.ensemble(), datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(self, cycles: int = 5, lr: float | None = None, dirpath: str | None = None) -> None:
        check_int("cycles", cycles, 1)
        if lr is not None:
            check_positive("lr", lr)
        self.cycles, self.lr, self.dirpath = cycles, lr, dirpath
        self.total_steps: int | None = None
        self.base_lrs: list[list[float]] | None = None
        self.snapshot_paths: list[str] = []
        self.snapshot_steps: list[int] = []
        self.member_class: str | None = None
        self._module_class: type[pl.LightningModule] | None = None
        self._dir: Path | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(cycles=self.cycles, lr=self.lr)

    @property
    def cycle_length(self) -> int:
        """Steps per cycle, ``ceil(T / M)`` (known once training starts)."""
        if self.total_steps is None:
            raise RuntimeError("SnapshotEnsemble.cycle_length is known once training starts.")
        return math.ceil(self.total_steps / self.cycles)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dirpath = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "snapshots")
        self._dir = Path(trainer.strategy.broadcast(str(dirpath)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise InvalidArgumentError("SnapshotEnsemble needs a finite training budget to place its cycles: set "
                                       "trainer.max_epochs or trainer.max_steps.")
        total = int(total)
        if self.total_steps is not None and self.total_steps != total:
            raise InvalidArgumentError(
                f"SnapshotEnsemble was resumed with a training budget of {total} steps, but its schedule was "
                f"planned for {self.total_steps}: resume with the same max_epochs/max_steps and data.")
        if self.cycles > total:
            raise InvalidArgumentError(f"`cycles`={self.cycles} is invalid: expected at most the number of training "
                                       f"steps ({total} steps in {trainer.max_epochs} epochs).")
        length = math.ceil(total / self.cycles)
        if math.ceil(total / length) < self.cycles:
            raise InvalidArgumentError(
                f"`cycles`={self.cycles} is invalid for {total} training steps: cycles of ceil({total}/{self.cycles})"
                f"={length} steps make only {math.ceil(total / length)}; use fewer cycles or more steps.")
        self.total_steps = total
        if total % self.cycles and not self.snapshot_steps:
            last = total - (self.cycles - 1) * length
            rank_zero_warn(f"SnapshotEnsemble: {total} steps are not a multiple of {self.cycles} cycles, so the last "
                           f"cycle is cut to {last} of {length} steps and its snapshot is taken at learning rate "
                           f"{snapshot_lr(total, total, self.cycles, 1.0):.3f} x alpha0; a budget divisible by "
                           "the number of cycles avoids this.")
        if trainer.lr_scheduler_configs:
            names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            rank_zero_warn(f"SnapshotEnsemble sets the learning rate itself; removing the scheduler(s) {names} "
                           "returned by configure_optimizers.")
            trainer.lr_scheduler_configs.clear()
        if self.base_lrs is None:
            self.base_lrs = [[self.lr if self.lr is not None else float(group.get("initial_lr", group["lr"]))
                              for group in optimizer.param_groups] for optimizer in trainer.optimizers]
        elif [len(lrs) for lrs in self.base_lrs] != [len(o.param_groups) for o in trainer.optimizers]:
            raise InvalidArgumentError("SnapshotEnsemble was resumed with other optimizers or parameter groups than "
                                       "its schedule was planned for: resume with the same configure_optimizers.")
        self._module_class = type(pl_module)
        self.member_class = _class_path(type(pl_module))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.total_steps is not None and self.base_lrs is not None
        step = min(trainer.global_step + 1, self.total_steps)
        factor = snapshot_lr(step, self.total_steps, self.cycles, 1.0)
        for optimizer, lrs in zip(trainer.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr * factor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step in self.snapshot_steps:
            return
        if step % self.cycle_length == 0 or step == self.total_steps:
            self._save_snapshot(trainer, step)

    def _save_snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self._dir is not None
        cycle = math.ceil(step / self.cycle_length)
        path = self._dir / f"snapshot-cycle={cycle}-step={step}.ckpt"
        trainer.save_checkpoint(path, weights_only=True)  # every rank calls it; rank 0 writes
        self.snapshot_paths.append(str(path.resolve()))
        self.snapshot_steps.append(step)
        if trainer.is_global_zero:
            self._write_config()
        rank_zero_info(f"SnapshotEnsemble: snapshot {len(self.snapshot_paths)}/{self.cycles} saved to {path}")

    @property
    def config_path(self) -> Path | None:
        """The ``ensemble.yaml`` written beside the snapshots."""
        return None if self._dir is None else self._dir / "ensemble.yaml"

    def _write_config(self) -> None:
        assert self.config_path is not None
        config = {"model": {"class_path": "lightning_tricks.Ensemble",
                            "init_args": {"checkpoints": list(self.snapshot_paths), "member_class": self.member_class}}}
        header = ("# The snapshots of one SnapshotEnsemble run as an ensemble (written by lightning-tricks).\n"
                  f"#   lightning-tricks test --config {self.config_path} --data <the datamodule you trained on>\n")
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.snapshot_paths) < self.cycles:
            rank_zero_warn(f"SnapshotEnsemble: training stopped at step {trainer.global_step} of {self.total_steps}, "
                           f"so {len(self.snapshot_paths)} of {self.cycles} snapshots exist.")
        if self.snapshot_paths:
            rank_zero_info(f"SnapshotEnsemble: {len(self.snapshot_paths)} snapshots in {self._dir}; evaluate them with "
                           f"`lightning-tricks test --config {self.config_path}` or SnapshotEnsemble.ensemble().")

    def ensemble(self, **kwargs: Any) -> Ensemble:
        """An :class:`Ensemble` of the snapshots taken so far (``kwargs`` go to ``Ensemble``: voting, ...)."""
        if not self.snapshot_paths:
            raise RuntimeError("SnapshotEnsemble has no snapshots yet: call ensemble() after trainer.fit.")
        member_class = self._module_class or self.member_class
        return Ensemble(checkpoints=list(self.snapshot_paths), member_class=member_class, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "base_lrs": self.base_lrs, "snapshot_paths": list(self.snapshot_paths),
                "snapshot_steps": list(self.snapshot_steps), "member_class": self.member_class}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict["total_steps"]
        self.base_lrs = state_dict["base_lrs"]
        self.snapshot_paths = list(state_dict["snapshot_paths"])
        self.snapshot_steps = list(state_dict["snapshot_steps"])
        self.member_class = state_dict["member_class"]


# ----------------------------------------------------------------------------------------------------------------
# EMA members


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

    Example:
        >>> import lightning.pytorch as pl
        >>> ema = EMAMembers(decay=0.99)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[ema])
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP
        >>> trainer.test(ema.ensemble(), datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, device: str | None = None,
                 use_buffers: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise InvalidArgumentError(f"`decay`={decay!r} is invalid: expected a number in [0.0, 1.0).")
        check_int("update_every_n_steps", update_every_n_steps, 1)
        if update_starting_at_step is not None:
            check_int("update_starting_at_step", update_starting_at_step, 0)
        if update_starting_at_epoch is not None:
            check_int("update_starting_at_epoch", update_starting_at_epoch, 0)
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch)
        self.raw_state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def members(self) -> list[nn.Module]:
        """``[EMA model, raw model]``: two new modules (copies), in eval mode."""
        if self.raw_state is None or self._average_model is None:
            raise RuntimeError("EMAMembers.members() is available after trainer.fit with this callback.")
        ema = copy.deepcopy(self._average_model.module).eval()
        raw = copy.deepcopy(ema)
        raw.load_state_dict(self.raw_state)
        return [ema, raw]

    def ensemble(self, **kwargs: Any) -> Ensemble:
        """An :class:`Ensemble` of the EMA model and the raw model (``kwargs`` go to ``Ensemble``)."""
        return Ensemble(members=self.members(), **kwargs)


__all__ = [
    "CheckpointError",
    "EMAMembers",
    "Ensemble",
    "SnapshotEnsemble",
    "UnsafeCheckpointError",
    "architecture_key",
    "check_vote_weights",
    "fit_vote_weights",
    "hard_vote",
    "load_member",
    "read_checkpoint",
    "snapshot_lr",
    "soft_vote",
    "vote_shares",
]
