import torch

from lightning_tricks.core import distributed as D
from lightning_tricks.zoo import ImageClassifier, SyntheticDataModule
from tests.helpers import run_ddp


def test_derive_seed_is_stable_and_spreads():
    assert D.derive_seed(0, 1, 2) == D.derive_seed(0, 1, 2)
    seeds = {D.derive_seed(s, r, t) for s in range(4) for r in range(4) for t in range(50)}
    assert len(seeds) == 4 * 4 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_make_generator_reproduces_draws():
    a = torch.rand(5, generator=D.make_generator(7, 0, 3))
    b = torch.rand(5, generator=D.make_generator(7, 0, 3))
    c = torch.rand(5, generator=D.make_generator(7, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_single_process_helpers_are_identity():
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce(t.clone(), "sum").tolist() == [1.0, 2.0]
    assert not D.is_distributed() and D.global_rank() == 0 and D.world_size() == 1


def _collectives_probe(trainer, pl_module):
    rank = trainer.global_rank
    summed = D.all_reduce(torch.tensor([rank + 1.0]), "sum")
    maxed = D.all_reduce(torch.tensor([float(rank)]), "max")
    mean = D.all_reduce(torch.tensor([float(rank)]), "mean")
    # make the ranks differ, then broadcast rank 0's weights
    with torch.no_grad():
        for p in pl_module.parameters():
            p.add_(rank)
    D.broadcast_module(pl_module)
    first = next(pl_module.parameters()).detach().clone()
    gen = D.make_generator(0, rank, 0)
    return {"rank": rank, "sum": summed.item(), "max": maxed.item(), "mean": mean.item(),
            "first": first, "draw": torch.rand(3, generator=gen), "distributed": D.is_distributed()}


def test_ddp_helper_collectives_and_broadcast(tmp_path):
    model = ImageClassifier("mlp", num_classes=4, in_channels=1, image_size=4, schedule="none")
    dm = SyntheticDataModule(num_samples=16, num_classes=4, image_shape=[1, 4, 4], batch_size=4)
    r0, r1 = run_ddp(model, dm, tmp_path=tmp_path, fn="validate", probe=_collectives_probe)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["distributed"] and r1["distributed"]
    assert r0["sum"] == r1["sum"] == 3.0
    assert r0["max"] == r1["max"] == 1.0
    assert r0["mean"] == r1["mean"] == 0.5
    assert torch.equal(r0["first"], r1["first"])
    assert not torch.equal(r0["draw"], r1["draw"])
