"""The vectorized path: members of one architecture run as one ``torch.func.vmap`` call.

Chosen only where a measured probe shows it faster than running the members one by one (or when the
user asks for it with ``fast_path="vmap"``); the loop stays the default on CPU. Everything vmap-specific
lives here; `Ensemble._plan` is its one caller, so the path can be dropped by deleting this module
and that method.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_tricks.core.distributed import all_reduce
from lightning_tricks.core.validation import InvalidArgumentError

# the probe keeps the vectorized call only if it wins every round and its median beats the loop's by this
# margin, so that noise on a shared machine does not pick the slower path
VMAP_MARGIN = 0.9
PROBE_ROUNDS = 5
# the probe's clock; tests replace it with a deterministic one
clock: Callable[[], float] = time.perf_counter


def architecture_key(module: nn.Module) -> tuple:
    """What must be equal for two modules to run as one vectorized call: every submodule's type and
    settings (``extra_repr``), and every parameter's and buffer's name, shape and dtype."""
    return (
        type(module),
        tuple((name, type(m), m.extra_repr()) for name, m in module.named_modules()),
        tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
    )


class StackedGroup:
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


def probe(stack: StackedGroup, loop: Callable[[], Any], x: torch.Tensor) -> list[float]:
    """Median seconds of the vectorized call and of the loop, and the rounds the vectorized call won.

    Rounds are interleaved (the calls that checked the outputs were the warm-up) and stop at the first
    round the vectorized call loses, since it must win them all: a slower vmap costs one round.
    """
    runs: dict[str, Callable[[], Any]] = {"vmap": lambda: stack(x), "loop": loop}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(PROBE_ROUNDS):
        for name, run in runs.items():
            _sync_device(x.device)
            start = clock()
            run()
            _sync_device(x.device)
            samples[name].append(clock() - start)
        if samples["vmap"][-1] >= samples["loop"][-1]:
            break
    wins = sum(v < lp for v, lp in zip(samples["vmap"], samples["loop"], strict=True))
    return [statistics.median(samples["vmap"]), statistics.median(samples["loop"]), float(wins)]


def choose(mode: str, stack: StackedGroup, run_member: Callable[[int], torch.Tensor], group: Sequence[int],
           names: str, x: torch.Tensor, sync: bool) -> str:
    """``vmap`` or ``loop`` for one group of members, after checking that vmap gives the loop's outputs.

    ``mode`` is ``vmap`` (always, after the check; an error if it fails) or ``probe`` (time both ways);
    with ``sync`` the decision is the same on every DDP rank (a collective).
    """
    failure, timing = "", [0.0, 0.0, 0.0]
    try:
        vectorized = stack(x)
        looped = torch.stack([run_member(i) for i in group])
        if vectorized.shape != looped.shape or not torch.allclose(vectorized.float(), looped.float(),
                                                                 rtol=1e-4, atol=1e-5):
            diff = (vectorized.float() - looped.float()).abs().max().item() if vectorized.shape == looped.shape \
                else f"shapes {tuple(vectorized.shape)} vs {tuple(looped.shape)}"
            failure = f"its outputs differ from running the members one by one (max difference {diff})"
        elif mode != "vmap":
            timing = probe(stack, lambda: [run_member(i) for i in group], x)
    except Exception as err:  # noqa: BLE001 - a forward vmap cannot batch (data-dependent code, .item())
        failure = f"vmap cannot run it ({type(err).__name__}: {err})"
    if mode == "vmap" and failure:
        raise InvalidArgumentError(f"`fast_path`='vmap' cannot serve members {names}: {failure}. "
                                   "Use fast_path='loop' (or 'auto').")
    # [vmap seconds, loop seconds, rounds vmap won, rounds, failures], summed over ranks when synced, so that
    # every rank takes the same decision
    summary = torch.tensor([*timing, PROBE_ROUNDS, float(bool(failure))], dtype=torch.float64)
    if sync:
        all_reduce(summary)
    vmap_time, loop_time, wins, rounds, failures = summary.tolist()
    if mode == "vmap":
        return "vmap"
    if failure:
        rank_zero_warn(f"Ensemble: members {names} run one by one because {failure}.")
    return "vmap" if not failures and wins == rounds and vmap_time < VMAP_MARGIN * loop_time else "loop"
