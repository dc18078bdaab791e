"""Layer-sequential unit-variance (LSUV) initialization (Mishkin & Matas 2015, "All you need is a good init").

Orthonormal pre-initialization, then, layer by layer in the order the forward pass reaches them,
scale each conv/linear weight by ``1 / sqrt(Var(output))`` on a real batch until
``|Var(output) - 1| < tol`` or ``max_iters`` rescalings.

Our implementation needs **one** forward pass. The paper re-runs the network for every layer and
every iteration; here a forward hook on each layer measures its output, rescales the weight, recomputes
only that layer on the same input, and hands the corrected output on. Every later layer therefore sees
exactly the input a fresh forward pass with the already-scaled weights would give it, so the result is
the paper's, at the cost of one forward pass plus one extra layer evaluation per rescaling.

Batch norm: LSUV measures each layer's *own* output, before any normalization that follows it, and
scales that to unit variance. A batch-norm layer right after it then renormalizes anyway, so the
scale changes nothing downstream (it only sets the weight norm, hence the effective learning rate);
the batch-norm layers run with the batch's statistics, as in training, and their running statistics
are restored afterwards. Dropout and other stochastic layers are off during the pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tricks.core.distributed import all_reduce
from lightning_tricks.core.validation import InvalidArgumentError, check_int, check_positive
from lightning_tricks.init._measure import run_with_hooks
from lightning_tricks.init.schemes import apply_scheme, resolve_scheme, select_modules


@dataclass(frozen=True)
class LSUVLayer:
    """What LSUV did to one layer.

    Attributes:
        name: the layer's name in ``named_modules()``.
        variance: the variance of its output after the last rescaling, over the whole batch (all ranks).
        iterations: rescalings applied (0: already within ``tol``, or never reached).
        converged: ``|variance - 1| < tol``.
        reached: whether the forward pass ran the layer (one it never runs keeps its orthonormal init).
    """

    name: str
    variance: float
    iterations: int
    converged: bool
    reached: bool = True


def output_variance(output: torch.Tensor) -> float:
    """Variance of all elements of ``output``, over every rank's batch (all-reduced; needs every rank)."""
    flat = output.detach()
    moments = torch.stack([
        torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
        flat.sum(dtype=torch.float64),
        flat.float().square().sum(dtype=torch.float64),
    ])
    count, total, squares = all_reduce(moments).tolist()
    mean = total / count
    return max(squares / count - mean * mean, 0.0)


def check_lsuv_arguments(tol: float, max_iters: int) -> None:
    check_positive("tol", tol)
    check_int("max_iters", max_iters, 1)


def lsuv(
    module: nn.Module,
    inputs: Any,
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    bias: float | None = 0.0,
    layer_types: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    orthogonal_init: bool = True,
    generator: torch.Generator | None = None,
) -> list[LSUVLayer]:
    """LSUV-initialize ``module``'s conv/linear layers in place on the batch ``inputs``.

    The model stays on its device and its train/eval flags and batch-norm running statistics are
    restored. Under DDP every rank must call it (variances are all-reduced, so all ranks scale alike
    even with different batches); broadcast the module afterwards to make the weights bit-identical.

    Args:
        module: the model; ``module(inputs)`` must run its forward pass.
        inputs: the batch the model takes (e.g. the ``x`` of a training batch), on the model's device.
        tol: stop when ``|Var - 1| < tol``; > 0.
        max_iters: most rescalings per layer; >= 1.
        bias: constant for the layers' biases (None leaves them).
        layer_types: layer classes to scale (default conv and linear; see :func:`select_modules`).
        include: name patterns to restrict the selection to.
        exclude: name patterns to remove from the selection.
        orthogonal_init: start with the orthonormal pre-initialization of the paper (False: scale the
            current weights).
        generator: random generator of the orthonormal draw.

    Returns:
        One :class:`LSUVLayer` per selected layer, in the order the forward pass reached them (then
        the layers it never reached).

    Raises:
        InvalidArgumentError: ``tol <= 0``, ``max_iters < 1``, a selector that matches nothing, or a
            model without conv/linear layers.

    Examples:
        >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> report = lsuv(net, torch.randn(256, 64), generator=torch.Generator().manual_seed(0))
        >>> [(layer.name, layer.converged) for layer in report]
        [('0', True), ('2', True)]
    """
    check_lsuv_arguments(tol, max_iters)
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise InvalidArgumentError("LSUV: the input batch has NaN or infinite values, so no output variance can be "
                                   "measured: clean the data (e.g. torch.nan_to_num) or drop those samples.")
    layers = select_modules(module, layer_types, include, exclude, owner="LSUV")
    if orthogonal_init:
        apply_scheme(module, resolve_scheme("lsuv", bias=bias), layer_types=layer_types, include=include,
                     exclude=exclude, generator=generator, owner="LSUV")
    elif bias is not None:
        with torch.no_grad():
            for _, layer in layers:
                if isinstance(getattr(layer, "bias", None), torch.Tensor):
                    layer.bias.fill_(bias)

    names = {id(m): n for n, m in layers}
    report: dict[str, LSUVLayer] = {}
    recomputing = False

    def scale_layer(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        nonlocal recomputing
        name = names[id(layer)]
        if recomputing or name in report:  # later calls of a shared layer already use the scaled weight
            return None
        if not isinstance(output, torch.Tensor):
            raise InvalidArgumentError(f"LSUV: layer {name!r} ({type(layer).__name__}) returned "
                                       f"{type(output).__name__}, not a tensor; exclude it.")
        variance, iterations = output_variance(output), 0
        while abs(variance - 1.0) >= tol and iterations < max_iters and 0.0 < variance < math.inf:
            layer.weight.mul_(variance**-0.5)
            iterations += 1
            recomputing = True
            try:
                output = layer(*args, **kwargs)
            finally:
                recomputing = False
            variance = output_variance(output)
        report[name] = LSUVLayer(name, variance, iterations, abs(variance - 1.0) < tol)
        return output

    run_with_hooks(module, inputs, [layer for _, layer in layers], scale_layer, with_kwargs=True)

    missed = [n for n, _ in layers if n not in report]
    for name in missed:
        report[name] = LSUVLayer(name, math.nan, 0, False, reached=False)
    if missed:
        warnings.warn(f"LSUV: the forward pass never ran {len(missed)} selected layer(s) ({', '.join(missed[:5])}"
                      f"{', ...' if len(missed) > 5 else ''}); they keep their current weights.", UserWarning, stacklevel=2)
    failed = [r for r in report.values() if r.reached and not r.converged]
    if failed:
        worst = ", ".join(f"{r.name} (Var={r.variance:.3g})" for r in failed[:5])
        warnings.warn(f"LSUV: {len(failed)} layer(s) did not reach |Var - 1| < {tol} within max_iters={max_iters}: "
                      f"{worst}. A zero-variance output cannot be scaled; raise max_iters or tol otherwise.",
                      UserWarning, stacklevel=2)
    return list(report.values())


__all__ = ["LSUVLayer", "check_lsuv_arguments", "lsuv", "output_variance"]
