"""Fractional max pooling, the layer and the functional core: :class:`SeededFractionalMaxPool2d`,
:func:`apply_fractional_pooling` and the paper's test-time averaging (:func:`average_pooling_draws`).
Public names are re-exported from :mod:`lightning_tricks.regularization.fractional_pooling`, whose
docstring has the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.core.deprecation import register_renames, renamed_argument
from lightning_tricks.core.distributed import derive_seed
from lightning_tricks.core.layout import model_layout
from lightning_tricks.core.randomness import LayerRandomness
from lightning_tricks.core.selection import check_patterns
from lightning_tricks.core.surgery import (
    ModelNotSupportedError,
    Predicate,
    SurgeryReport,
    keys_unchanged,
    mark,
    replace_module,
    select_modules,
)
from lightning_tricks.core.validation import check_int, check_range

register_renames("FractionalMaxPooling", {"layers": "include"})

DEFAULT_RATIO = 1 / math.sqrt(2)
"""The paper's :math:`\\alpha = \\sqrt 2`: each layer halves the number of pixels."""


def check_fractional_pooling_args(output_ratio: float = DEFAULT_RATIO, kernel_size: int = 2,
                                  include: Sequence[str] | None = None, test_samples: int = 1,
                                  max_batch: int | None = None, exclude: Sequence[str] | None = None, *,
                                  layers: Sequence[str] | None = None) -> tuple[list[str] | None, list[str] | None]:
    """The one validator of FractionalMaxPooling's arguments (layer, functional core, callback); returns
    ``(include, exclude)`` (``layers`` is the deprecated name of ``include``)."""
    include = renamed_argument("FractionalMaxPooling", "layers", "include", layers, include, None)
    check_range("output_ratio", output_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    check_int("kernel_size", kernel_size, 1)
    check_int("test_samples", test_samples, 1)
    if max_batch is not None:
        check_int("max_batch", max_batch, 1)
    return check_patterns("include", include), check_patterns("exclude", exclude, allow_empty=True)


class SeededFractionalMaxPool2d(nn.FractionalMaxPool2d):
    """``nn.FractionalMaxPool2d`` with owned randomness, a deterministic eval and autocast support.

    Args:
        kernel_size: pooling window (2: overlapping regions, as in the paper).
        output_ratio: output size / input size, in (0, 1); default ``1/sqrt(2)``.
        randomness: generators to draw from (a callback shares one among its layers); a private one
            seeded with 0 when ``None``.
        index: this layer's index among the trick's layers (keys its draws and its eval sample).

    Attributes:
        lt_stochastic_eval: while True, eval draws fresh regions (test-time averaging); False by default.

    Examples:
        >>> pool = SeededFractionalMaxPool2d().eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = pool(x)
        >>> y.shape, torch.equal(y, pool(x))
        (torch.Size([2, 3, 5, 5]), True)
    """

    lt_stochastic_eval = False

    def __init__(self, kernel_size: int = 2, output_ratio: float = DEFAULT_RATIO,
                 randomness: LayerRandomness | None = None, index: int = 0) -> None:
        check_fractional_pooling_args(output_ratio, kernel_size)
        super().__init__(kernel_size, output_ratio=(output_ratio, output_ratio))
        self.lt_randomness = randomness if randomness is not None else LayerRandomness(0)
        self.lt_index = index
        self.lt_stochastic_eval = False
        # The eval regions, (channels, 2): one fixed draw, made at the first eval forward from (seed, layer).
        # Not saved in the state_dict: it is reproducible from the seed.
        self.register_buffer("eval_sample", None, persistent=False)
        self._lt_mark()

    def _lt_mark(self) -> None:
        """The marker buffer: a plain strict load must fail; its values rebuild the layer (see checkpoint.py)."""
        mark(self, "FractionalMaxPooling", [float(self.output_ratio[0]), int(self.kernel_size[0]),
                                            self.lt_randomness.seed, self.lt_index])

    def _eval_sample(self, channels: int, device: torch.device) -> torch.Tensor:
        if self.eval_sample is None or self.eval_sample.shape[0] != channels:
            key = derive_seed(self.lt_randomness.seed, 0xE7A1, self.lt_index)
            self.eval_sample = torch.rand(channels, 2, generator=torch.Generator().manual_seed(key)).to(device)
        return self.eval_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        n, c = (x.shape[0], x.shape[1]) if batched else (1, x.shape[0])
        if self.training or self.lt_stochastic_eval:
            generator = self.lt_randomness.generator(x.device, self.lt_index, self.training)
            samples = torch.rand(n, c, 2, generator=generator, device=x.device, dtype=x.dtype)
        else:
            samples = self._eval_sample(c, x.device).to(device=x.device, dtype=x.dtype).expand(n, c, 2)
        return F.fractional_max_pool2d(x, self.kernel_size, self.output_size, self.output_ratio,
                                       self.return_indices, _random_samples=samples)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, output_ratio={self.output_ratio[0]:.4g}"


def _can_wrap(module: nn.Module) -> str | None:
    if isinstance(module, SeededFractionalMaxPool2d):
        return None
    if type(module) is nn.MaxPool2d:
        return "it returns indices (for MaxUnpool2d), whose sizes would change" if module.return_indices else None
    return "FractionalMaxPooling replaces nn.MaxPool2d layers"


def fractional_pools(model: nn.Module) -> list[SeededFractionalMaxPool2d]:
    """The fractional pooling layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, SeededFractionalMaxPool2d)]


def apply_fractional_pooling(
    model: nn.Module,
    output_ratio: float = DEFAULT_RATIO,
    *,
    kernel_size: int = 2,
    include: Sequence[str] | None = None,
    randomness: LayerRandomness | None = None,
    predicate: Predicate | None = None,
    exclude: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> tuple[SurgeryReport, dict[str, nn.Module]]:
    """Replace ``nn.MaxPool2d`` layers of ``model`` by :class:`SeededFractionalMaxPool2d` (idempotent).

    Pooling layers hold no state, so ``state_dict`` keys are unchanged. The replaced layers' own
    kernel, stride and padding are not kept: every converted layer pools by ``output_ratio``.

    Args:
        model: any module.
        output_ratio: output size / input size, in (0, 1).
        kernel_size: pooling window of the new layers.
        include: glob patterns on qualified module names (``None``: every ``nn.MaxPool2d``); a pattern also
            selects the pools inside a match.
        randomness: shared generators; a private one seeded with 0 when ``None``.
        predicate: extra filter ``(name, module) -> bool``.
        exclude: glob patterns of pools (or of modules whose pools) to leave as they are.
        layers: deprecated: use ``include``.

    Returns:
        The report and the replaced ``nn.MaxPool2d`` modules by name (to undo the change).

    Raises:
        ModelNotSupportedError: the model has no ``nn.MaxPool2d``.
        InvalidArgumentError: a bad argument, or a pattern that matches no ``nn.MaxPool2d``.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
        >>> apply_fractional_pooling(net)[0].converted
        ['1']
    """
    include, exclude = check_fractional_pooling_args(output_ratio, kernel_size, include, exclude=exclude,
                                                     layers=layers)
    chosen = select_modules(model, include, can_wrap=_can_wrap, arg_name="include", trick="FractionalMaxPooling",
                            predicate=predicate, exclude=exclude)
    if not chosen:
        if any(isinstance(m, nn.MaxPool1d) for m in model.modules()) or model_layout(model) == "sequence":
            raise ModelNotSupportedError(
                f"FractionalMaxPooling needs images: {type(model).__name__} is a 1D (sequence) model, and torch's "
                "fractional max pooling exists only in 2D and 3D (nn.FractionalMaxPool2d/3d); pick another regularizer."
            )
        raise ModelNotSupportedError(
            f"FractionalMaxPooling found no nn.MaxPool2d in {type(model).__name__}: it replaces max-pooling layers "
            "(modules, not F.max_pool2d calls in forward); add nn.MaxPool2d layers or pick another regularizer."
        )
    report = SurgeryReport("FractionalMaxPooling", detail=f"output_ratio={output_ratio:.4g}, kernel_size={kernel_size}")
    shared = randomness if randomness is not None else LayerRandomness(0)
    before = list(model.state_dict().keys())
    device = next(model.parameters(), torch.empty(0)).device
    replaced: dict[str, nn.Module] = {}
    for index, (name, module) in enumerate(chosen):
        new = SeededFractionalMaxPool2d(kernel_size, output_ratio, shared, index)
        if isinstance(module, SeededFractionalMaxPool2d) and (
                (module.kernel_size, module.output_ratio) == (new.kernel_size, new.output_ratio)):
            module.lt_randomness, module.lt_index = shared, index
            module.eval_sample = None  # redrawn from the (possibly new) seed at the next eval forward
            module._lt_mark()
            report.already.append(name)
            continue
        new.to(device=device).train(module.training)
        replaced[name] = replace_module(model, name, new)
        report.converted.append(name)
    keys_unchanged(before, model, "FractionalMaxPooling")
    return report, replaced


@contextmanager
def pooling_draws(model: nn.Module) -> Iterator[list[SeededFractionalMaxPool2d]]:
    """Within the block, the fractional pooling layers (only them) draw fresh regions in eval mode."""
    pools = fractional_pools(model)
    previous = [p.lt_stochastic_eval for p in pools]
    try:
        for pool in pools:
            pool.lt_stochastic_eval = True
        yield pools
    finally:
        for pool, flag in zip(pools, previous, strict=True):
            pool.lt_stochastic_eval = flag


def average_pooling_draws(
    model: nn.Module,
    x: torch.Tensor,
    samples: int,
    max_batch: int | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The paper's test procedure: average the class probabilities of ``samples`` pooling draws.

    The ``samples`` copies of the batch run as one batch (every example and copy draws its own regions),
    split into chunks of at most ``max_batch`` rows. Only the fractional pooling layers are random;
    dropout and batch norm stay as the model's mode says (call it in ``eval()``).

    Args:
        model: the model holding the fractional pooling layers (and called, unless ``forward`` is given).
        x: a batch of inputs; the model must return logits of shape ``(batch, classes)``.
        samples: number of draws ``k`` (1 is a single random draw).
        max_batch: most rows per forward pass (default: all ``k * batch`` at once).
        forward: what to call instead of ``model`` (e.g. a LightningModule's original forward).

    Returns:
        ``log(mean_k softmax(logits_k))`` in float32: log-probabilities of the averaged prediction, which
        work as logits (``argmax``, ``cross_entropy``, ``softmax`` gives the averaged probabilities).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(1), nn.LazyLinear(3))
        >>> _ = apply_fractional_pooling(net[:2]); _ = net(torch.zeros(1, 1, 12, 12))
        >>> with torch.no_grad():
        ...     probabilities = average_pooling_draws(net.eval(), torch.randn(5, 1, 12, 12), samples=12).exp()
        >>> probabilities.sum(1)
        tensor([1.0000, 1.0000, 1.0000, 1.0000, 1.0000])
    """
    check_int("samples", samples, 1)
    if max_batch is not None:
        check_int("max_batch", max_batch, 1)
    call = forward if forward is not None else model
    batch = x.shape[0]
    copies_per_pass = samples if max_batch is None else max(1, max_batch // max(batch, 1))
    outputs = []
    with pooling_draws(model):
        done = 0
        while done < samples:
            copies = min(copies_per_pass, samples - done)
            logits = call(x.repeat(copies, *([1] * (x.dim() - 1))))
            if logits.dim() != 2 or logits.shape[0] != copies * batch:
                raise ValueError(f"average_pooling_draws expects logits of shape (batch, classes), got {tuple(logits.shape)}.")
            outputs.append(logits.float().log_softmax(-1).view(copies, batch, -1))
            done += copies
    log_probs = torch.cat(outputs)
    return torch.logsumexp(log_probs, dim=0) - math.log(samples)
