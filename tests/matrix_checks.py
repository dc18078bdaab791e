"""The checks of the trick x project matrix (tests/test_public_projects.py): helpers, and the structural, init,
monitoring and setup tricks' cells. Each check runs one trick on one project and compares its effect with a
reference computed here; a refusal propagates as the trick's ConfigError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_tricks as lt
from lightning_tricks.core.surgery import original_class
from tests.public_projects import PROJECTS, trainer

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

    module, _, _ = fit(project, [lt.StochasticDepth(p=0.5, rule="linear", seed=0)])
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
    stats_cb = lt.ActivationStatistics(plot=False, bins=0)
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
