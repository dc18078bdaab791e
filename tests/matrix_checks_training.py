"""The checks of the trick x project matrix for augmentation, TTA, ensembles, stopping and fine-tuning cells."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_tricks as lt
from tests.matrix_checks import Hooks, build, close, first_batch, fit, split_batch
from tests.public_projects import CLASSES, PROJECTS, trainer

# ------------------------------------------------------------------------------------------------ tricks owned elsewhere


def check_activation_swap(project: str) -> None:
    module, data = build(project)
    reference = copy.deepcopy(module)
    for m in list(reference.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.ReLU:
                setattr(m, child_name, nn.LeakyReLU(0.01))
    trainer(project, [lt.ActivationSwap(to="leaky_relu")]).validate(module, data, verbose=False)
    x, _ = first_batch(data, "val")
    module.eval()
    reference.eval()
    with torch.no_grad():
        close(module(x), reference(x))
    assert not any(type(m) is nn.ReLU for m in module.modules())


def _step_batches(callback: Any, project: str) -> tuple[list[Any], list[Any], Any]:
    raw: list[Any] = []
    got: list[Any] = []

    def before(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        raw.append(tuple(t.clone() for t in split_batch(batch)))

    def after(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        got.append(split_batch(batch))

    module, _, _ = fit(project, [Hooks(on_train_batch_start=before), callback, Hooks(on_train_batch_start=after)],
                       limit_train_batches=1)
    return raw, got, module


def check_batch_augment(project: str) -> None:
    raw, got, _ = _step_batches(lt.BatchAugment(padding=0, flip=1.0, seed=0), project)
    (x, y), (x2, y2) = raw[0], got[0]
    close(x2, x.flip(-1))
    close(y2, y.flip(-1) if y.ndim == 3 else y)  # dense targets follow the geometry


def check_cutout(project: str) -> None:
    raw, got, _ = _step_batches(lt.Cutout(length=4, seed=0), project)
    (x, y), (x2, y2) = raw[0], got[0]
    for a, b in zip(x, x2, strict=True):
        changed = (a != b).any(0)
        assert bool((b[:, changed] == 0).all())
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 4 and 0 < len(cols) <= 4
        assert int(changed.sum()) == len(rows) * len(cols)  # one rectangle
    assert torch.equal(y2.as_subclass(torch.Tensor), y)


def check_mixup(project: str) -> None:
    raw, got, _ = _step_batches(lt.Mixup(alpha=1.0, seed=0), project)
    (x, y), (x2, y2) = raw[0], got[0]
    # x2 = lam * x + (1 - lam) * x[perm]: for each i and candidate partner j, the least-squares lam, then the best j
    flat, flat2 = x.flatten(1).double(), x2.flatten(1).double()
    diff = flat.unsqueeze(1) - flat.unsqueeze(0)  # [i, j]: x_i - x_j
    target = flat2.unsqueeze(1) - flat.unsqueeze(0)  # x2_i - x_j = lam (x_i - x_j)
    lams = (diff * target).sum(-1) / diff.square().sum(-1).clamp_min(1e-12)
    residual = (target - lams.unsqueeze(-1) * diff).abs().amax(-1)
    residual.diagonal().copy_((flat2 - flat).abs().amax(-1))  # partner itself: x2_i == x_i
    perm = residual.argmin(1)
    assert residual.gather(1, perm[:, None]).max() < 1e-4
    same = (flat2 - flat).abs().amax(-1) < 1e-6  # paired with itself (or lam = 1): unchanged
    perm[same] = torch.arange(len(perm))[same]
    mixed = ~same
    assert mixed.any()
    lam_rows = lams[torch.arange(len(perm)), perm][mixed]
    lam = lam_rows[0].item()
    assert torch.allclose(lam_rows, torch.full_like(lam_rows, lam), atol=1e-4)  # one lam per batch
    if y.ndim == 2:  # multi-hot targets mix as soft targets
        close(y2, lam * y + (1 - lam) * y[perm], atol=5e-3)
    elif y.ndim == 3:  # masks: the per-pixel loss is mixed, lam * CE(own mask) + (1 - lam) * CE(partner's)
        logits = torch.randn(len(y), CLASSES, *y.shape[1:])
        expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        close(F.cross_entropy(logits, y2), expected, atol=5e-3)
    else:
        soft = y2.soft_targets(CLASSES)
        close(soft, lam * F.one_hot(y, CLASSES) + (1 - lam) * F.one_hot(y[perm], CLASSES), atol=5e-3)


def check_tta(project: str) -> None:
    module, data = build(project)
    tr = trainer(project, [lt.TestTimeAugmentation(views=["hflip"], stages=["validate"])])
    metrics = tr.validate(module, data, verbose=False)[0]
    module.eval()
    x, y = first_batch(data, "val")
    with torch.no_grad():
        if project == "gan":
            d = module.discriminator
            assert metrics["val_d_real"] == pytest.approx(((d(x) + d(x.flip(-1))) / 2).mean().item(), rel=1e-4)
            return
        net = module.model if project == "plain" else module
        a, b = net(x), net(x.flip(-1))
        if project == "multilabel":
            p = (a.sigmoid() + b.sigmoid()) / 2
            loss = F.binary_cross_entropy(p, y)
        elif project == "segmentation":
            p = (a.softmax(1) + b.flip(-1).softmax(1)) / 2
            loss = F.nll_loss(p.log(), y)
        elif project == "softmax":
            loss = F.nll_loss(((a + b) / 2 + 1e-8).log(), y)
        else:
            loss = F.nll_loss(((a.softmax(1) + b.softmax(1)) / 2).log(), y)
    assert metrics["val_loss"] == pytest.approx(loss.item(), rel=1e-3, abs=1e-5)


MONITORS = {"gan": "val_d_real"}


def check_early_stopping(project: str) -> None:
    monitor = MONITORS.get(project, "val_loss")
    records: list[tuple[float, dict[str, torch.Tensor]]] = []

    def keep(trainer: Any, module: Any) -> None:
        if trainer.sanity_checking:
            return
        records.append((trainer.callback_metrics[monitor].item(),
                        {k: v.detach().clone() for k, v in module.state_dict().items()}))

    stopper = lt.EarlyStopping(monitor=monitor, mode="min", patience=5, restore_best_weights=True)
    module, _, _ = fit(project, [Hooks(on_validation_end=keep), stopper], max_epochs=3, limit_train_batches=1)
    assert len(records) == 3
    best = min(range(3), key=lambda i: records[i][0])
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            close(v, records[best][1][k])


def _member_probs(project: str, member: Any, x: torch.Tensor) -> torch.Tensor:
    out = member(x)
    if project == "multilabel":
        return out.sigmoid()
    return out if project == "softmax" else out.softmax(1)


def check_ensemble(project: str) -> None:
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(PROJECTS[project][0]().eval())
    _, data = build(project)
    ensemble = lt.Ensemble(members=members)
    # the Ensemble is a lightning.pytorch module: it runs in lightning.pytorch's Trainer, whatever its members' package
    out = trainer("plain").predict(ensemble, dataloaders=data.predict_dataloader())
    x, _ = first_batch(data, "predict")
    with torch.no_grad():
        expected = torch.stack([_member_probs(project, m, x) for m in members]).mean(0)
    close(out[0]["probs"], expected, atol=1e-5)


def check_snapshot_ensemble(project: str, tmp_path: Any) -> None:
    lrs: dict[int, list[float]] = {}

    def keep(trainer: Any, module: Any, optimizer: Any) -> None:
        i = [id(o) for o in trainer.optimizers].index(id(optimizer))
        lrs.setdefault(i, []).append(optimizer.param_groups[0]["lr"])

    snapshots = lt.SnapshotEnsemble(cycles=2, lr=0.1, dirpath=str(tmp_path))
    module, _, _ = fit(project, [snapshots, Hooks(on_before_optimizer_step=keep)], max_epochs=2)
    assert len(snapshots.snapshot_paths) == 2
    cosine = [0.05 * (1 + math.cos(math.pi * (t % 2) / 2)) for t in range(4)]  # two cycles of 2 batches each
    for i, got in lrs.items():
        assert got == pytest.approx(cosine), (i, got)


def check_ema_members(project: str) -> None:
    decay = 0.5
    ema: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}

    def average(trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for n, p in module.named_parameters():
            raw[n] = p.detach().clone()
            ema[n] = raw[n].clone() if n not in ema else decay * ema[n] + (1 - decay) * raw[n]

    callback = lt.EMAMembers(decay=decay)
    fit(project, [Hooks(on_train_batch_end=average), callback])
    for n in ema:
        close(callback.ema_state[n], ema[n])
        close(callback.raw_state[n], raw[n])


def check_divergence_stop(project: str) -> None:
    batches: list[int] = []

    def poison(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == 1:
            with torch.no_grad():
                if project == "gan":  # a saturated discriminator: BCE's losses jump to ~100 (NaN would raise in BCE)
                    module.discriminator.model[2].weight.mul_(1e4)
                else:
                    for p in module.parameters():
                        p.fill_(float("nan"))

    _, _, tr = fit(project, [Hooks(on_train_batch_start=poison,
                                   on_train_batch_end=lambda t, m, o, b, i: batches.append((t.current_epoch, i))),
                             # a GAN's losses may rise 3x by design: the factor rule watches the loss it is told
                             lt.DivergenceStop(monitor="d_loss") if project == "gan" else lt.DivergenceStop()],
                       max_epochs=3)
    assert tr.should_stop and batches == [(0, 0), (0, 1)], batches  # not epochs 1 and 2


def check_initial_loss(project: str) -> None:
    check = lt.InitialLossCheck()
    fit(project, [check], limit_train_batches=1)
    expected = {"multilabel": math.log(2), "segmentation": math.log(3)}.get(project, math.log(CLASSES))
    assert check.expected == pytest.approx(expected)


def check_finetune(project: str) -> None:
    module, data = build(project)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tune = lt.Finetune(train="head")
    fit(project, [tune], module=module, data=data)
    head = {"multilabel": "classifier", "segmentation": "outc", "dict": "model.1", "pl_package": "fc",
            "softmax": "net.3", "plain": "model.9", "gan": "discriminator.model.2"}[project]
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            continue
        if k.startswith(head + "."):
            assert not torch.equal(v, before[k]), k  # re-initialized and trained
        else:
            assert torch.equal(v, before[k]), k  # frozen (batch-norm statistics included)
