"""Unseeded runs: every stochastic trick works when the run's seed is a 64-bit value >= 2**63.

Nobody calls ``seed_everything``: the run's seed is ``torch.initial_seed()``, which for an unseeded process
is a uniform 64-bit value, so half of all unseeded runs have one >= 2**63 (``torch.manual_seed(2**64 - 59)``
here). Each trick must take it as its seed (rank 0's under DDP, broadcast to the other rank even when that
rank's own generator was seeded otherwise), train, checkpoint, and load back through our loader to the
same evaluation network. Before the fix, fractional max pooling crashed at fit start with
``ValueError: Overflow when unpacking long long`` (the seed went into an int64 marker buffer).
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_tricks as lt
from lightning_tricks.zoo import ImageClassifier
from tests.helpers import run_ddp
from tests.reliability_tricks import STOCHASTIC, TRICKS, TinyData, make_model, trainer

BIG_SEED = 2**64 - 59


def _seeds(callbacks) -> list[int]:
    """The resolved seed of every callback that owns randomness."""
    return [c.randomness.seed for c in callbacks if getattr(c, "randomness", None) is not None]


@pytest.fixture
def unseeded(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(BIG_SEED)
    assert torch.initial_seed() == BIG_SEED


@pytest.mark.parametrize("name", STOCHASTIC)
def test_unseeded_run_with_a_seed_above_2_63(name, tmp_path, unseeded):
    make, backbone, _ = TRICKS[name]
    callbacks = make(tmp_path)
    model = make_model(backbone)
    fit = trainer(tmp_path, callbacks, max_epochs=3)
    fit.fit(model, datamodule=TinyData())
    assert fit.global_step == 12
    seeds = _seeds(callbacks)
    if name != "SnapshotEnsemble":  # a schedule, no draws: it owns no seed
        assert seeds and all(seed == BIG_SEED for seed in seeds), seeds
    path = tmp_path / "unseeded.ckpt"
    fit.save_checkpoint(path)
    # the checkpoint evaluates as the trained network: the seed (in records and marker buffers) round-trips
    loaded = lt.load_from_checkpoint(ImageClassifier, path).eval()
    x = TinyData().val_set.tensors[0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _SeedRankOneOtherwise(Callback):
    """Rank 1's torch generator gets another seed before the tricks resolve theirs (it comes first)."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            torch.manual_seed(5)


def _probe(trainer, pl_module):
    tricks = [c for c in trainer.callbacks if getattr(c, "randomness", None) is not None]
    assert tricks and all(c.randomness.seed == BIG_SEED for c in tricks), [c.randomness.seed for c in tricks]
    return {name: p.detach().clone() for name, p in pl_module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("backbone,names,strategy", [
    ("simple_cnn", ["Cutout", "BatchAugment", "FractionalMaxPooling", "TTA", "LSUV", "SnapshotEnsemble"], "ddp_fork"),
    ("resnet20", ["StochasticDepth", "Mixup"], "ddp_fork_find_unused_parameters_true"),
])
def test_unseeded_ddp_every_rank_takes_rank_zeros_64_bit_seed(backbone, names, strategy, tmp_path, unseeded):
    callbacks = [_SeedRankOneOtherwise()] + [c for name in names for c in TRICKS[name][0](tmp_path)]
    rank0, rank1 = run_ddp(make_model(backbone), TinyData(), tmp_path=tmp_path, probe=_probe, callbacks=callbacks,
                           strategy=strategy,
                           max_epochs=3, num_sanity_val_steps=0, limit_val_batches=1)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # DDP kept the replicas identical: every structural decision agreed
        assert torch.equal(rank0[key], rank1[key]), key
