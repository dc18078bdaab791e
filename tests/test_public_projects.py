"""Every public trick on every project of :mod:`tests.public_projects`: it serves, checked against a reference, or refuses.

:data:`EXPECTED` is the contract, one entry per (trick, project): ``"serves"`` means the trick runs and its
effect equals an independent reference computed here (a formula, a brute-force recomputation with our own
hooks, the plain model); ``"refuses"`` means it raises a :class:`~lightning_tricks._validation.ConfigError`
whose message is one line that says what to do. No cell is skipped. Cells that other branches are fixing
carry a strict ``xfail`` (:data:`KNOWN_WRONG`) with what they do wrong today; the lead removes the entry when
the fix is merged, and the strict mark fails the run if a cell passes while still marked.

Each cell builds its tiny module and trains at most a few batches of 8 samples on CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_tricks as lt
from lightning_tricks._validation import ConfigError
from lightning_tricks.core.task import TaskNotSupportedError
from lightning_tricks.surgery import original_class
from tests.public_projects import CLASSES, PROJECTS, trainer

PROJECT_NAMES = tuple(PROJECTS)
CLASSIFIERS = ("dict", "pl_package", "softmax", "plain")
"""The single-label classifiers (dict batches, the old package name, softmax outputs, log-softmax in the step)."""

S, R = "serves", "refuses"


def _row(**cells: str) -> dict[str, str]:
    assert set(cells) == set(PROJECT_NAMES), set(PROJECT_NAMES) ^ set(cells)
    return cells


def _all(outcome: str) -> dict[str, str]:
    return dict.fromkeys(PROJECT_NAMES, outcome)


EXPECTED_ROWS: dict[str, dict[str, str]] = {
    "WeightPenalty": _all(S),
    "DropConnect": _row(multilabel=R, segmentation=R, gan=S, dict=R, pl_package=R, softmax=S, plain=R),
    "StochasticDepth": _row(multilabel=R, segmentation=R, gan=R, dict=R, pl_package=R, softmax=R, plain=S),
    "FractionalMaxPooling": _row(multilabel=S, segmentation=R, gan=R, dict=S, pl_package=S, softmax=S, plain=S),
    "WeightInit": _all(S),
    "WeightInit[lsuv]": {**_all(S), "gan": R},
    "ActivationStatistics": {**_all(S), "gan": R},
    "DeadUnitMonitor": _all(S),
    "UpdateRatioMonitor": _all(S),
    "LargeBatchScaling": _all(S),
    "Standardize": _all(S),
    "ExactDistributedEvaluation": _all(S),
    "fold_batch_norm": _all(S),
    "ActivationSwap": {**_all(S), "gan": R},
    "BatchAugment": _all(S),
    "Cutout": _all(S),
    "Mixup": {**_all(S), "segmentation": R, "gan": R},
    "TestTimeAugmentation": _all(S),
    "EarlyStopping": _all(S),
    "Ensemble": {**_all(S), "segmentation": R, "gan": R},
    "SnapshotEnsemble": _all(S),
    "EMAMembers": _all(S),
    "DivergenceStop": _all(S),
    "InitialLossCheck": {**_all(S), "gan": R},
    "Finetune": {**_all(S), "gan": R},
}
EXPECTED: dict[tuple[str, str], str] = {(t, p): o for t, row in EXPECTED_ROWS.items() for p, o in row.items()}
"""(trick, project) -> ``"serves"`` | ``"refuses"``: the contract a reader can check at a glance."""

KNOWN_WRONG: dict[tuple[str, str], str] = {
    ("ActivationSwap", "pl_package"): "owned by cli-names: a pytorch_lightning module fails with the unrelated "
                                      "ValueError 'Expected a parent' instead of being swapped",
    ("EMAMembers", "pl_package"): "owned by training-styles/cli-names: a pytorch_lightning module fails with "
                                  "ValueError 'Expected a parent' (Lightning's WeightAveraging checks lightning.pytorch)",
    ("BatchAugment", "segmentation"): "owned by task-contract: flips the images but not the [B, H, W] masks",
    ("Mixup", "segmentation"): "owned by task-contract: asks for `num_classes` (InvalidArgumentError) instead of "
                               "refusing dense targets with TaskNotSupportedError or mixing the masks",
    ("TestTimeAugmentation", "multilabel"): "owned by task-contract: merges multi-label views with a softmax across "
                                            "labels; the loss differs from BCE on the mean sigmoid probabilities",
    ("TestTimeAugmentation", "segmentation"): "owned by task-contract: raises a plain ValueError (not a ConfigError) "
                                              "advising task='regression', which averages flipped maps without "
                                              "flipping them back",
    ("TestTimeAugmentation", "softmax"): "owned by task-contract: returns log-probabilities to a step that takes "
                                         "log(forward) of probabilities: val_loss is NaN",
    ("TestTimeAugmentation", "gan"): "owned by task-contract: the discriminator's [B, 1] sigmoid output is merged as "
                                     "a 1-class softmax: val_d_real is log(1) = 0.0 instead of the mean over views",
    ("Ensemble", "pl_package"): "owned by training-styles/cli-names: Ensemble is a lightning.pytorch module, so the "
                                "project's pytorch_lightning.Trainer rejects it (TypeError: `model` must be a "
                                "`LightningModule`)",
    ("SnapshotEnsemble", "gan"): "owned by training-styles: counts both optimizers' steps (snapshots at steps 2 and 4 "
                                 "of 4 optimizer steps = 2 batches, cosine cycles over the wrong length)",
    ("DivergenceStop", "gan"): "owned by training-styles: under manual optimization the logged g_loss/d_loss jump to "
                               "~100 (BCE's clamp, > 3x the first loss) and training never stops",
    ("InitialLossCheck", "multilabel"): "owned by task-contract: expects log(C) for a BCE loss (log 2 per label)",
    ("InitialLossCheck", "segmentation"): "owned by task-contract: takes the image width as the class count",
    ("Finetune", "gan"): "owned by training-styles: fails inside autograd ('element 0 of tensors does not require "
                         "grad') instead of refusing two optimizers in one line",
    ("Ensemble", "multilabel"): "owned by training-styles: votes multi-label members with a softmax across labels",
    ("Ensemble", "gan"): "owned by training-styles: a GAN member fails with a raw RuntimeError, not a one-line refusal",
    ("Ensemble", "dict"): "owned by training-styles: predict on dict batches fails with AttributeError "
                          "\"'dict' object has no attribute 'device'\" (no input_key/target_key)",
    ("Ensemble", "softmax"): "owned by training-styles: applies a softmax to members that already return probabilities",
}
"""Cells other branches own that are wrong today: strict xfail with what is wrong."""

REFUSAL_TYPES: dict[tuple[str, str], type[Exception]] = {
    ("Mixup", "segmentation"): TaskNotSupportedError,
}
"""Refusals that must name the task (a generic ConfigError is not enough)."""

FIX_WORDS = ("pass", "use", "set", "add", "remove", "give", "select", "return", "choose", "call", "make")


# ------------------------------------------------------------------------------------------------ helpers


def build(project: str) -> tuple[Any, Any]:
    torch.manual_seed(0)
    module_cls, data, _ = PROJECTS[project]
    return module_cls(), data()


def fit(project: str, callbacks: list, module: Any = None, data: Any = None, **overrides: Any) -> tuple[Any, Any, Any]:
    if module is None:
        module, data = build(project)
    tr = trainer(project, callbacks, **overrides)
    tr.fit(module, data)
    return module, data, tr


def first_batch(data: Any, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(getattr(data, f"{split}_dataloader")()))
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


class Hooks(Callback):
    """A probe whose hooks are plain functions (only the given ones run)."""

    def __init__(self, **hooks: Callable[..., None]) -> None:
        self.hooks = hooks

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_") or name in ("setup", "teardown"):
            hooks = object.__getattribute__(self, "hooks")
            if name in hooks:
                return hooks[name]
        return object.__getattribute__(self, name)


def optimizer_of(module: Any) -> list[torch.optim.Optimizer]:
    optimizers = module.optimizers()
    return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]


def swapped(module: nn.Module, base: type) -> list[tuple[str, nn.Module]]:
    """The submodules whose class was swapped by a structural trick from ``base``."""
    return [(n, m) for n, m in module.named_modules() if type(m) is not base and original_class(m) is base]


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------ my tricks


def check_weight_penalty(project: str) -> None:
    l1, l2 = 1e-3, 1e-2
    before: dict[int, torch.Tensor] = {}
    seen: list[int] = []

    def record(trainer: Any, module: Any, optimizer: Any) -> None:
        before.clear()
        before.update({id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"]
                       if p.grad is not None})

    def compare(trainer: Any, module: Any, optimizer: Any) -> None:
        norms = {id(p) for m in module.modules() if isinstance(m, lt.regularization.penalty.NORM_TYPES)
                 for p in m.parameters(recurse=False)}
        for p in (p for g in optimizer.param_groups for p in g["params"] if id(p) in before):
            weight = p.ndim >= 2 and id(p) not in norms
            expected = l1 * p.detach().sign() + 2 * l2 * p.detach() if weight else torch.zeros_like(p)
            close(p.grad - before[id(p)], expected, atol=1e-6)
        seen.append(len(before))

    module, _, tr = fit(project, [Hooks(on_before_optimizer_step=record), lt.WeightPenalty(l1=l1, l2=l2),
                                  Hooks(on_before_optimizer_step=compare)])
    steps = 2 * len(optimizer_of(module))
    assert len(seen) == steps and all(seen), seen  # once per optimizer step, every optimizer


def check_drop_connect(project: str) -> None:
    p = 0.5
    module, _, _ = fit(project, [lt.DropConnect(p=p, seed=0)])
    layers = swapped(module, nn.Linear)
    assert layers
    for _, layer in layers:
        layer.eval()
        x = torch.randn(5, layer.in_features)
        close(layer(x), F.linear(x, layer.weight, layer.bias))  # evaluation: the plain layer
        layer.train()
        with torch.no_grad():
            effective = (layer(torch.eye(layer.in_features)) - layer.bias).T  # one mask per step: W * M
        w = layer.weight.detach()
        dropped = effective.abs() < 1e-7
        close(effective[~dropped], (w / (1 - p))[~dropped])  # inverted scaling of the kept weights
        assert 0.2 < dropped.float().mean() < 0.8


def check_stochastic_depth(project: str) -> None:
    from torchvision.models.resnet import BasicBlock

    module, _, _ = fit(project, [lt.StochasticDepth(drop_rate=0.5, rule="linear", seed=0)])
    blocks = swapped(module, BasicBlock)
    assert [n for n, _ in blocks] == ["model.4", "model.5"]
    for index, (_, block) in enumerate(blocks, start=1):
        p = 0.5 * index / len(blocks)
        x = torch.randn(4, 8, 4, 4)

        def branch(b: Any, x: torch.Tensor) -> torch.Tensor:
            return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))

        block.eval()
        close(block(x), F.relu(x + branch(block, x)))
        block.train()
        kept = []
        for _ in range(30):
            with torch.no_grad():
                out = block(x)
                ref = F.relu(x + branch(block, x) / (1 - p)) if block.lt_last_kept else F.relu(x)
            close(out, ref)
            kept.append(block.lt_last_kept)
        assert any(kept) and not all(kept)


def check_fractional_max_pooling(project: str) -> None:
    module, _, _ = fit(project, [lt.FractionalMaxPooling(seed=0)])
    pools = [m for m in module.modules() if isinstance(m, lt.SeededFractionalMaxPool2d)]
    assert len(pools) == 1 and not any(type(m) is nn.MaxPool2d for m in module.modules())
    pool = pools[0]
    x = torch.randn(2, 8, 8, 8)
    for mode in (True, False):
        pool.train(mode)
        y = pool(x)
        assert y.shape[-2:] == (int(8 / math.sqrt(2)), int(8 / math.sqrt(2)))
        flat_x, flat_y = x.flatten(2), y.flatten(2)
        close(flat_y.amax(-1), flat_x.amax(-1))  # the pooling regions cover the input
        assert bool((flat_y.unsqueeze(-1) == flat_x.unsqueeze(-2)).any(-1).all())  # every output is an input value
    close(pool(x), pool(x))  # evaluation is deterministic


def _weights_at_train_start(callbacks: list, project: str) -> tuple[Any, dict[str, torch.Tensor], Any]:
    state: dict[str, torch.Tensor] = {}
    probe = Hooks(on_train_start=lambda trainer, module: state.update(
        {k: v.detach().clone() for k, v in module.state_dict().items()}))
    module, data, _ = fit(project, [*callbacks, probe], limit_train_batches=1)
    return module, state, data


def check_weight_init(project: str) -> None:
    init = lt.WeightInit(scheme="kaiming_normal", seed=0)
    module, state, _ = _weights_at_train_start([init], project)
    gain = nn.init.calculate_gain(init.args.nonlinearity, init.args.negative_slope)
    pooled = []
    assert init.initialized_layers
    for name in init.initialized_layers:  # Var(w) = gain^2 / fan_in, fan_in = inputs per output unit
        w = state[f"{name}.weight"]
        z = (w / (gain / math.sqrt(w[0].numel()))).flatten()
        assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel()) + 0.02, (name, z.std())
        pooled.append(z)
    z = torch.cat(pooled)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.08, (z.mean(), z.std())
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) and n not in init.initialized_layers
                   for n, m in module.named_modules()), init.initialized_layers


def check_lsuv(project: str) -> None:
    init = lt.WeightInit(scheme="lsuv", seed=0)
    module, state, data = _weights_at_train_start([init], project)
    module.load_state_dict(state)
    x, _ = first_batch(data)
    layers = dict(module.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [layers[r.name].register_forward_hook(lambda m, a, y, n=r.name: outputs.setdefault(n, y))
               for r in init.lsuv_report]
    assert handles
    module.train()
    for m in module.modules():  # measurement as LSUV does it: batch norm on batch statistics, dropout off
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        module(x)
    for handle in handles:
        handle.remove()
    for name, y in outputs.items():
        assert abs(y.float().var().item() - 1) <= init.tol + 1e-3, (name, y.var())


def check_activation_statistics(project: str) -> None:
    stats_cb = lt.ActivationStatistics(save_figure=False, bins=0)
    state: dict[str, torch.Tensor] = {}

    def keep(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            state.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    module, data, _ = fit(project, [Hooks(on_train_batch_start=keep), stats_cb], limit_train_batches=1)
    _, _, stats = stats_cb.history[0]
    module.load_state_dict(state)
    x, _ = first_batch(data)
    layers = dict(module.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, a, y, n=n: outputs.setdefault(n, []).append(y.clone()))
               for n, m in layers.items() if n in {s.name.partition("#")[0] for s in stats}]
    assert handles
    module.train()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    outputs = {(n if k == 0 else f"{n}#{k + 1}"): y for n, ys in outputs.items() for k, y in enumerate(ys)}
    assert {s.name for s in stats} == set(outputs), ([s.name for s in stats], list(outputs))
    for s in stats:
        y = outputs[s.name].float()
        assert s.mean == pytest.approx(y.mean().item(), abs=1e-4) and s.std == pytest.approx(y.std(unbiased=False).item(), rel=1e-4)
        assert s.zero_fraction == pytest.approx((y == 0).float().mean().item(), abs=1e-6)


def check_dead_unit_monitor(project: str) -> None:
    monitor = lt.DeadUnitMonitor(plot=False)
    bounds = {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0)}
    eps, share = monitor.saturation_eps, monitor.saturation_fraction
    peaks: dict[str, torch.Tensor] = {}
    pinned: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, int] = {}
    handles: list[Any] = []

    def attach(trainer: Any, module: Any) -> None:
        for name, m in module.named_modules():
            if type(m) not in (nn.ReLU, *bounds):
                continue

            def hook(mod: Any, a: Any, y: torch.Tensor, name: str = name) -> None:
                if not mod.training:
                    return
                calls[name] = calls.get(name, 0) + 1  # the k-th call in a forward is its own site
                site = name if calls[name] == 1 else f"{name}#{calls[name]}"
                units = y.detach().transpose(0, 1).flatten(1)  # unit = channel (conv) / feature (linear)
                if type(mod) is nn.ReLU:
                    peaks[site] = units.amax(1) if site not in peaks else torch.maximum(peaks[site], units.amax(1))
                else:
                    low, high = bounds[type(mod)]
                    pinned.setdefault(site, []).append((units <= low + eps) | (units >= high - eps))
            handles.append(m.register_forward_hook(hook))
        handles.append(module.register_forward_pre_hook(lambda *args: calls.clear()))  # calls count per forward

    probe = Hooks(on_train_start=attach, on_train_batch_start=lambda *args: calls.clear())
    fit(project, [probe, monitor])
    for h in handles:
        h.remove()
    record = monitor.history["train"][-1]
    dead = {k: v for k, v in record["dead"].items() if v is not None}
    saturated = {k: v for k, v in record["saturated"].items() if v is not None}
    assert set(dead) == set(peaks) and set(saturated) == set(pinned), (record, list(peaks), list(pinned))
    assert peaks or pinned
    for site, per_unit in peaks.items():  # dead: never above 0 on any example of the epoch
        assert dead[site] == pytest.approx((per_unit <= 0).float().mean().item(), abs=1e-6), site
    for site, flags in pinned.items():  # saturated: within eps of a bound for >= 99% of its outputs
        per_unit = torch.cat(flags, dim=1).float().mean(1)
        assert saturated[site] == pytest.approx((per_unit >= share).float().mean().item(), abs=1e-6), site


def check_update_ratio_monitor(project: str) -> None:
    monitor = lt.UpdateRatioMonitor(every_n_steps=2, warn_below=1e-12, warn_above=1e12)
    per_batch: list[dict[str, float]] = []
    start: dict[str, torch.Tensor] = {}

    def at_start(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        start.clear()
        start.update({n: p.detach().clone() for n, p in module.named_parameters()})

    def at_end(trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        ratios = {}
        for n, p in module.named_parameters():
            if start[n].norm() > 0 and p.requires_grad:
                ratios[n] = ((p.detach() - start[n]).norm() / start[n].norm()).item()
        per_batch.append(ratios)

    module, _, _ = fit(project, [Hooks(on_train_batch_start=at_start, on_train_batch_end=at_end), monitor])
    optimizers = len(optimizer_of(module))
    # every 2 optimizer steps: batches 0 (steps 0) for one optimizer; every batch (steps 0-1, 2-3) for two
    measured = [0] if optimizers == 1 else [0, 1]
    assert [h["step"] for h in monitor.history] == [optimizers * b for b in measured]
    reference = per_batch[measured[-1]]
    got = {n: r for n, r in monitor.last_ratios.items() if math.isfinite(r)}
    assert set(got) == set(reference), set(got) ^ set(reference)
    for n, r in reference.items():
        assert got[n] == pytest.approx(r, rel=1e-4), n


def check_large_batch_scaling(project: str) -> None:
    seen: dict[int, list[float]] = {}
    base: dict[int, list[float]] = {}

    def hook_optimizers(trainer: Any, module: Any) -> None:
        for i, opt in enumerate(trainer.optimizers):
            opt.register_step_pre_hook(lambda o, a, k, i=i: seen.setdefault(i, []).append(o.param_groups[0]["lr"]))

    def unscaled(trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        for i, optimizer in enumerate(trainer.optimizers):
            base.setdefault(i, []).append(optimizer.param_groups[0]["lr"])

    scaling = lt.LargeBatchScaling(reference_batch_size=2, warmup_steps=2)  # k = 8 / 2 = 4
    module, _, _ = fit(project, [Hooks(on_train_batch_start=unscaled), scaling,
                                 Hooks(on_train_start=hook_optimizers)])
    assert len(seen) == len(optimizer_of(module))
    for i, lrs in seen.items():  # each optimizer's t-th step: m(t) = 1 + 3 t / 2
        assert lrs == pytest.approx([b * m for b, m in zip(base[i], (1.0, 2.5), strict=True)]), (i, lrs, base[i])


def check_standardize(project: str) -> None:
    seen: list[Any] = []

    def keep(trainer: Any, module: Any, batch: Any, batch_idx: int, *rest: Any) -> None:
        x, y = split_batch(batch)
        seen.append((x.clone(), y.clone()))

    module, data = build(project)
    x_all = torch.cat([split_batch(b)[0] for b in data.train_dataloader()])
    mean = x_all.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = x_all.std(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    fit(project, [lt.Standardize(), Hooks(on_train_batch_start=keep, on_validation_batch_start=keep)],
        module=module, data=data)
    raw = [first_batch(data, "train"), next(b for i, b in enumerate(data.train_dataloader()) if i == 1),
           first_batch(data, "val")]
    assert len(seen) == 3
    for (x, y), batch in zip(seen, raw, strict=True):
        raw_x, raw_y = split_batch(batch) if not isinstance(batch, tuple) else batch
        close(x, (raw_x - mean) / std, atol=1e-4)
        assert torch.equal(y, raw_y)  # targets untouched (multi-hot, masks, labels)


def check_exact_distributed_evaluation(project: str) -> None:
    module, data = build(project)
    plain = trainer(project).validate(module, data, verbose=False)
    exact = trainer(project, [lt.ExactDistributedEvaluation()]).validate(module, data, verbose=False)
    assert plain == exact and plain[0]


def check_fold_batch_norm(project: str) -> None:
    module, data = build(project)
    fit(project, [], module=module, data=data)  # running statistics that are not the identity
    module.eval()
    x = torch.randn(4, module.hparams.latent_dim) if project == "gan" else first_batch(data, "val")[0]
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    folded, report = lt.fold_batch_norm(module, x, return_report=True)
    with torch.no_grad():
        close(folded(x), module(x), atol=1e-4)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert left == 0 and norms == {"gan": 0, "segmentation": 6, "plain": 5}.get(project, 1), (left, norms, report)


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
    else:
        soft = y2.soft_targets(CLASSES)
        close(soft, lam * F.one_hot(y, CLASSES) + (1 - lam) * F.one_hot(y[perm], CLASSES), atol=5e-3)


def _task_of(project: str) -> str:
    return {"multilabel": "multilabel", "segmentation": "dense", "gan": "regression"}.get(project, "classification")


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
    out = trainer(project).predict(ensemble, dataloaders=data.predict_dataloader())
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
                             lt.DivergenceStop()], max_epochs=3)
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


CHECKS: dict[str, Callable[..., None]] = {
    "WeightPenalty": check_weight_penalty,
    "DropConnect": check_drop_connect,
    "StochasticDepth": check_stochastic_depth,
    "FractionalMaxPooling": check_fractional_max_pooling,
    "WeightInit": check_weight_init,
    "WeightInit[lsuv]": check_lsuv,
    "ActivationStatistics": check_activation_statistics,
    "DeadUnitMonitor": check_dead_unit_monitor,
    "UpdateRatioMonitor": check_update_ratio_monitor,
    "LargeBatchScaling": check_large_batch_scaling,
    "Standardize": check_standardize,
    "ExactDistributedEvaluation": check_exact_distributed_evaluation,
    "fold_batch_norm": check_fold_batch_norm,
    "ActivationSwap": check_activation_swap,
    "BatchAugment": check_batch_augment,
    "Cutout": check_cutout,
    "Mixup": check_mixup,
    "TestTimeAugmentation": check_tta,
    "EarlyStopping": check_early_stopping,
    "Ensemble": check_ensemble,
    "SnapshotEnsemble": check_snapshot_ensemble,
    "EMAMembers": check_ema_members,
    "DivergenceStop": check_divergence_stop,
    "InitialLossCheck": check_initial_loss,
    "Finetune": check_finetune,
}


NOT_ROWS: dict[str, str] = {
    "BatchTransformMixin": "the mixin Cutout/Mixup name in their refusals; exercised through those rows",
    "DropConnectConv2d": "DropConnect's layer (its row converts the model's layers)",
    "DropConnectLinear": "DropConnect's layer (its row converts the model's layers)",
    "SeededFractionalMaxPool2d": "FractionalMaxPooling's layer (its row checks the converted layer)",
    "Maxout": "a layer users build into their own model; no model here has one to swap",
    "MaxoutConv2d": "a layer users build into their own model; no model here has one to swap",
    "swap_activations": "ActivationSwap's functional core (its row)",
    "DeadUnitTracker": "DeadUnitMonitor's functional core (its row)",
    "TTAConfig": "TestTimeAugmentation's configuration (its row)",
    "TTAWrapper": "TestTimeAugmentation's functional core (its row)",
    "FoldReport": "fold_batch_norm's report (its row)",
    "overfit_check": "babysit's sanity step (training-styles' scope); tests/test_babysit.py",
    "apply_recorded_tricks": "checkpoint loading, not a trick; tests/test_checkpoint.py",
    "load_from_checkpoint": "checkpoint loading, not a trick; tests/test_checkpoint.py",
    "infer_num_classes": "a probe the tricks use, not a trick; tests/test_model_probe.py",
    "CIFAR10DataModule": "zoo data", "DigitsDataModule": "zoo data", "SyntheticDataModule": "zoo data",
    "ImageClassifier": "zoo model", "CALLBACKS": "the list of callbacks", "__version__": "the version",
}
"""Public names that are not rows of the matrix, and why: a new public trick must be added to one or the other."""


def test_matrix_covers_every_public_trick() -> None:
    covered = {name.split("[")[0] for name in EXPECTED_ROWS}
    assert set(lt.CALLBACKS) <= covered, set(lt.CALLBACKS) - covered
    assert set(lt.__all__) == covered | set(NOT_ROWS), set(lt.__all__) ^ (covered | set(NOT_ROWS))
    assert set(CHECKS) == set(EXPECTED_ROWS)
    assert set(KNOWN_WRONG) <= set(EXPECTED)


def _cells() -> list[Any]:
    cells = []
    for trick, project in EXPECTED:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[(trick, project)])] \
            if (trick, project) in KNOWN_WRONG else []
        cells.append(pytest.param(trick, project, marks=marks, id=f"{trick}-{project}"))
    return cells


@pytest.mark.parametrize(("trick", "project"), _cells())
def test_cell(trick: str, project: str, tmp_path: Any) -> None:
    check = CHECKS[trick]
    args = (project, tmp_path) if trick == "SnapshotEnsemble" else (project,)
    if EXPECTED[(trick, project)] == S:
        check(*args)
        return
    with pytest.raises(ConfigError) as info:
        check(*args)
    assert isinstance(info.value, REFUSAL_TYPES.get((trick, project), ConfigError)), repr(info.value)
    message = str(info.value)
    assert "\n" not in message.strip() and len(message) < 600, message
    assert any(word in message.lower() for word in FIX_WORDS), message
