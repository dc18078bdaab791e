"""Snapshot ensembles (Huang et al. 2017): cyclic cosine learning-rate cycles in one run, a snapshot after each.

Functional core: :func:`snapshot_lr`, the schedule. Lightning shell: the :class:`SnapshotEnsemble` callback.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_tricks.checkpoint import INPUTS, input_records, recorded_input_statistics, records_on_save
from lightning_tricks.core.validation import InvalidArgumentError, check_int, check_positive
from lightning_tricks.ensemble.loading import CheckpointError, class_path, copy_with_weights, read_checkpoint
from lightning_tricks.ensemble.module import Ensemble


def configured_lr(param_group: dict[str, Any], defaults: dict[str, Any] | None = None) -> float:
    """The learning rate a parameter group was configured with, whatever a scheduler has done to ``lr`` since.

    Every torch scheduler records the optimizer's own learning rate as ``initial_lr`` when it is built;
    without a scheduler ``lr`` is the configured one. OneCycleLR is the exception: it overwrites ``lr``
    and ``initial_lr`` with its starting value ``max_lr / div_factor`` and records its peak as ``max_lr``,
    a value it reaches only after a warm-up. Given the optimizer's ``defaults`` (its constructor's
    arguments), a OneCycleLR group takes the learning rate the optimizer was built with, at most
    ``max_lr``; without them, ``max_lr``.

    Examples:
        >>> configured_lr({"lr": 0.004, "initial_lr": 0.004, "max_lr": 0.1}, {"lr": 0.05})
        0.05
        >>> configured_lr({"lr": 0.05, "initial_lr": 0.1})
        0.1
    """
    max_lr = param_group.get("max_lr")
    built = (defaults or {}).get("lr")
    if isinstance(max_lr, (int, float)) and isinstance(built, (int, float)) and built > 0:
        return min(float(built), float(max_lr))
    for key in ("max_lr", "initial_lr", "lr"):
        if isinstance(param_group.get(key), (int, float)):
            return float(param_group[key])
    raise InvalidArgumentError(f"A parameter group without a numeric learning rate: {sorted(param_group)}.")


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot_lr(step: int, total_steps: int, cycles: int, lr: float) -> float:
    """Huang et al. (2017)'s cyclic cosine learning rate at iteration ``step`` (1-based).

    ``alpha(t) = alpha0 / 2 * (cos(pi * ((t - 1) mod ceil(T / M)) / ceil(T / M)) + 1)``: every cycle of
    ``ceil(T / M)`` iterations starts at ``lr`` and anneals towards 0.

    Examples:
        >>> tuple(round(snapshot_lr(t, 8, 2, 0.1), 4) for t in range(1, 9))
        (0.1, 0.0854, 0.05, 0.0146, 0.1, 0.0854, 0.05, 0.0146)
    """
    cycle_length = math.ceil(total_steps / cycles)
    return lr / 2 * (math.cos(math.pi * ((step - 1) % cycle_length) / cycle_length) + 1)


class SnapshotEnsemble(Callback):
    """Snapshot ensembles (Huang et al. 2017): M cosine learning-rate cycles in one run, a snapshot after each.

    Before every optimizer step ``t`` (1-based) of the ``T`` steps the Trainer will take
    (``trainer.estimated_stepping_batches``), every parameter group of every optimizer gets
    :func:`snapshot_lr`: ``alpha0/2 * (cos(pi * ((t-1) mod ceil(T/M)) / ceil(T/M)) + 1)``. At the end of
    each cycle (steps ``ceil(T/M)``, ``2 ceil(T/M)``, ... and ``T``) the model is saved with
    ``trainer.save_checkpoint(weights_only=True)`` to ``dirpath``; an ``ensemble.yaml`` beside the
    snapshots lists them as a ready `Ensemble` config, and `ensemble()` builds the Ensemble in Python
    by loading each snapshot's weights into a deep copy of the trained module (no rebuild from
    hyper-parameters, so modules whose hyper-parameters hold objects such as an ``nn.Module`` work). The schedule is a function of ``trainer.global_step``, so a run resumed with
    ``ckpt_path`` continues it exactly; the base learning rates, budget and snapshot paths are in the
    callback's checkpoint state.

    The callback owns the learning rate: a scheduler returned by ``configure_optimizers`` is removed at
    the start of training, with a warning (as Lightning's ``StochasticWeightAveraging`` does).

    Manual optimization (a GAN: two optimizers stepped in one ``training_step``): ``trainer.global_step``
    counts every optimizer's steps, so the clock is the training batch instead (``t`` = batches done + 1,
    ``T`` = the batches of the run, what ``estimated_stepping_batches`` counts without automatic
    optimization): each optimizer steps once per batch in a GAN's loop, so this is one optimizer's step
    count, and every optimizer follows the same schedule. Bound such a run with ``max_epochs``:
    ``max_steps`` counts every optimizer's steps, and is refused with several optimizers.

    Args:
        cycles: M, the number of cycles and snapshots; 1 <= M <= T, and M cycles of ``ceil(T/M)`` steps
            must fit in T.
        lr: alpha0, the learning rate at the start of every cycle; ``None`` takes each parameter group's
            configured learning rate when training starts (`configured_lr`: the ``initial_lr`` a scheduler
            recorded, else ``lr``; for a OneCycleLR group the learning rate the optimizer was built with,
            at most ``max_lr``: OneCycleLR reaches ``max_lr`` only after a warm-up, and a cycle restarts
            without one).
        dirpath: where snapshots go; defaults to ``<trainer.log_dir>/snapshots``.

    Raises:
        InvalidArgumentError: ``cycles`` < 1 or a non-positive ``lr`` (at construction); more cycles than
            training steps, an unbounded run, a budget changed on resume, or ``max_steps`` with manual
            optimization and several optimizers (when training starts).

    Examples:
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
        self.snapshot_digests: list[str] = []
        self.member_class: str | None = None
        self.batches_done = 0  # the clock under manual optimization
        self._by_batch = False
        self._trained_module: pl.LightningModule | None = None
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

    def _check_manual_budget(self, trainer: pl.Trainer) -> None:
        if self._by_batch and len(trainer.optimizers) > 1 and trainer.max_steps != -1:
            raise InvalidArgumentError(
                f"SnapshotEnsemble with manual optimization and {len(trainer.optimizers)} optimizers places its cycles "
                f"in training batches, but trainer.max_steps={trainer.max_steps} counts every optimizer's steps: "
                "bound the run with max_epochs (and limit_train_batches) instead.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._by_batch = not pl_module.automatic_optimization
        self._check_manual_budget(trainer)
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
            self.base_lrs = [[self.lr if self.lr is not None else configured_lr(group, optimizer.defaults)
                              for group in optimizer.param_groups] for optimizer in trainer.optimizers]
            self._say_one_cycle_peaks(trainer)
        elif [len(lrs) for lrs in self.base_lrs] != [len(o.param_groups) for o in trainer.optimizers]:
            raise InvalidArgumentError("SnapshotEnsemble was resumed with other optimizers or parameter groups than "
                                       "its schedule was planned for: resume with the same configure_optimizers.")
        self._trained_module = pl_module
        self.member_class = class_path(type(pl_module))

    def _say_one_cycle_peaks(self, trainer: pl.Trainer) -> None:
        assert self.base_lrs is not None
        lowered = {(group["max_lr"], lr) for optimizer, lrs in zip(trainer.optimizers, self.base_lrs, strict=True)
                   for group, lr in zip(optimizer.param_groups, lrs, strict=True)
                   if isinstance(group.get("max_lr"), (int, float)) and lr < group["max_lr"]}
        if lowered and self.lr is None:
            peaks = ", ".join(f"max_lr={a:g} -> {b:g}" for a, b in sorted(lowered))
            rank_zero_warn(f"SnapshotEnsemble: OneCycleLR reaches max_lr only after its warm-up and a snapshot cycle "
                           f"restarts without one, so each cycle starts at the optimizer's own lr ({peaks}); pass "
                           "lr= to choose the peak.")

    def _clock(self, trainer: pl.Trainer) -> int:
        """Steps of the schedule done: optimizer steps, or training batches under manual optimization."""
        return self.batches_done if self._by_batch else trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.total_steps is not None and self.base_lrs is not None
        step = min(self._clock(trainer) + 1, self.total_steps)
        factor = snapshot_lr(step, self.total_steps, self.cycles, 1.0)
        for optimizer, lrs in zip(trainer.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr * factor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._by_batch:
            self.batches_done += 1
        step = self._clock(trainer)
        if step == 0 or step in self.snapshot_steps:
            return
        if step % self.cycle_length == 0 or step == self.total_steps:
            self._save_snapshot(trainer, step)

    def _save_snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self._dir is not None
        cycle = math.ceil(step / self.cycle_length)
        path = self._dir / f"snapshot-cycle={cycle}-step={step}.ckpt"
        # weights only, plus the statistics of the run's Standardize callbacks: each member is evaluated on the
        # inputs it was trained on (lightning_tricks.checkpoint.recorded_input_statistics reads them back)
        records = {INPUTS: input_records(trainer.callbacks)}
        with records_on_save(trainer.lightning_module, records if records[INPUTS] else {}):
            trainer.save_checkpoint(path, weights_only=True)  # every rank calls it; rank 0 writes
        # the file's digest lets ensemble() load exactly this file without asking whether to trust it
        self.snapshot_digests.append(trainer.strategy.broadcast(_sha256(path) if trainer.is_global_zero else ""))
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
                  f"#   lightning-tricks test --config {self.config_path} --data <the datamodule you trained on>\n"
                  "# A module whose hyper-parameters hold objects (an nn.Module) also needs trust_checkpoints: true;\n"
                  "# one whose constructor needs arguments not in its hyper-parameters, member_kwargs: {...}.\n")
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.snapshot_paths) < self.cycles:
            rank_zero_warn(f"SnapshotEnsemble: training stopped at step {self._clock(trainer)} of {self.total_steps}, "
                           f"so {len(self.snapshot_paths)} of {self.cycles} snapshots exist.")
        if self.snapshot_paths:
            rank_zero_info(f"SnapshotEnsemble: {len(self.snapshot_paths)} snapshots in {self._dir}; evaluate them with "
                           f"`lightning-tricks test --config {self.config_path}` or SnapshotEnsemble.ensemble().")

    def ensemble(self, **kwargs: Any) -> Ensemble:
        """An `Ensemble` of the snapshots taken so far (``kwargs`` go to ``Ensemble``: voting, ...).

        After ``fit`` in this process, each snapshot's weights load into a deep copy of the trained module.
        A snapshot file is read with ``weights_only=False`` only if it is byte for byte the file this
        callback wrote (its SHA-256 is in the callback's state). Without the trained module (a callback
        restored in another process), the snapshots are rebuilt from their class and hyper-parameters.

        Raises:
            CheckpointError: a snapshot changed on disk since it was written.
        """
        if not self.snapshot_paths:
            raise RuntimeError("SnapshotEnsemble has no snapshots yet: call ensemble() after trainer.fit.")
        if self._trained_module is None:
            return Ensemble(checkpoints=list(self.snapshot_paths), member_class=self.member_class, **kwargs)
        digests = self.snapshot_digests + [""] * (len(self.snapshot_paths) - len(self.snapshot_digests))
        members = [self._snapshot_member(path, digest) for path, digest in zip(self.snapshot_paths, digests, strict=True)]
        ensemble = Ensemble(members=[module for module, _ in members], **kwargs)
        for i, (_, statistics) in enumerate(members):
            if statistics:
                ensemble.set_member_inputs(i, statistics)
        return ensemble

    def _snapshot_member(self, path: str, digest: str) -> tuple[pl.LightningModule, list[Any]]:
        label = f"snapshot {path!r}"
        if digest and _sha256(path) != digest:
            raise CheckpointError(f"{label} changed on disk since SnapshotEnsemble wrote it (its SHA-256 differs): "
                                  "refusing to unpickle it; rerun the training or rebuild it with Ensemble(...).")
        checkpoint = read_checkpoint(path, trust_checkpoints=bool(digest), label=label)
        assert self._trained_module is not None
        module = copy_with_weights(self._trained_module, checkpoint, label)
        return module, recorded_input_statistics(checkpoint)  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "base_lrs": self.base_lrs, "snapshot_paths": list(self.snapshot_paths),
                "snapshot_steps": list(self.snapshot_steps), "snapshot_digests": list(self.snapshot_digests),
                "member_class": self.member_class, "batches_done": self.batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict["total_steps"]
        self.base_lrs = state_dict["base_lrs"]
        self.snapshot_paths = list(state_dict["snapshot_paths"])
        self.snapshot_steps = list(state_dict["snapshot_steps"])
        self.snapshot_digests = list(state_dict.get("snapshot_digests", []))
        self.member_class = state_dict["member_class"]
        self.batches_done = int(state_dict.get("batches_done", 0))


__all__ = ["SnapshotEnsemble", "configured_lr", "snapshot_lr"]
