"""The one seed rule (lightning_tricks.core.seeding): resolution, per-rank derivation, generators, state."""

import pickle

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_tricks.core.distributed import derive_seed
from lightning_tricks.core.seeding import RandomStream, resolve_seed, run_seed, seeded_global_rng
from lightning_tricks.zoo import ImageClassifier, SyntheticDataModule
from tests.helpers import run_ddp


def test_seed_resolution_user_then_seed_everything_then_torch(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    torch.manual_seed(5)
    assert resolve_seed(3) == 3  # the user's seed wins
    assert run_seed() == resolve_seed(None) == 11  # then seed_everything's
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed() == resolve_seed(None) == 5 == torch.initial_seed()  # then torch's
    stream = RandomStream()
    assert stream.seed is None and stream.resolved_seed == 5 and stream.seed == 5
    torch.manual_seed(6)
    assert stream.resolved_seed == 5  # resolved once: a later reseed of torch does not move it


def test_keys_follow_derive_seed_differ_per_rank_and_agree_when_shared():
    ranks = [RandomStream(9) for _ in range(2)]
    shared = [RandomStream(9, shared=True) for _ in range(2)]
    for rank in range(2):
        ranks[rank].rank = shared[rank].rank = rank
    assert [s.key(4, 2) for s in ranks] == [derive_seed(9, 0, 4, 2), derive_seed(9, 1, 4, 2)]
    assert shared[0].key(4, 2) == shared[1].key(4, 2) == derive_seed(9, 4, 2)
    draws = [torch.rand(8, generator=s.seeded("cpu", 4)) for s in ranks]
    assert not torch.equal(*draws)
    same = [torch.rand(8, generator=s.seeded("cpu", 4)) for s in shared]
    assert torch.equal(*same)
    again = torch.rand(8, generator=ranks[0].seeded("cpu", 4))  # the same key: the same draw, the same generator
    assert torch.equal(again, draws[0]) and len(ranks[0].generators) == 1


def test_next_generator_counts_batches_and_state_round_trip_continues_exactly():
    straight = RandomStream(seed=21)
    uninterrupted = [torch.rand(4, generator=straight.next_generator("cpu")) for _ in range(5)]
    first = RandomStream(seed=21)
    for _ in range(2):
        first.next_generator("cpu")
    state = first.state_dict()
    assert state == {"seed": 21, "batches_seen": 2}
    resumed = RandomStream(seed=None)  # seed=None: the checkpoint's seed is used, not this run's
    resumed.load_state_dict(state)
    assert [torch.equal(torch.rand(4, generator=resumed.next_generator("cpu")), u) for u in uninterrupted[2:]] == [
        True, True, True]
    assert resumed.state_dict() == straight.state_dict() == {"seed": 21, "batches_seen": 5}
    older = RandomStream(seed=4)
    older.load_state_dict({"batches_seen": 3, "seed": None})  # a state without a resolved seed keeps the own one
    assert older.state_dict() == {"seed": 4, "batches_seen": 3}


def test_pickled_stream_drops_generators_and_draws_the_same():
    stream = RandomStream(seed=2)
    a = torch.rand(3, generator=stream.seeded("cpu", 7))
    copy = pickle.loads(pickle.dumps(stream))
    assert not copy.generators and torch.equal(torch.rand(3, generator=copy.seeded("cpu", 7)), a)


def test_seeded_global_rng_reproduces_manual_seed_and_restores_the_state():
    before = torch.get_rng_state()
    with seeded_global_rng(13, "cpu"):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(13)
    assert torch.equal(torch.rand(4), inside)


class _RankSeeds(Callback):
    """Seeds torch differently on each rank, as a run without seed_everything may be."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


class _Streams(Callback):
    def __init__(self):
        self.per_rank, self.shared = RandomStream(), RandomStream(shared=True)

    def setup(self, trainer, pl_module, stage):
        self.per_rank.setup(trainer)
        self.shared.setup(trainer)


def _streams_probe(trainer, pl_module):
    streams = next(c for c in trainer.callbacks if isinstance(c, _Streams))
    return {"initial": torch.initial_seed(), "seeds": (streams.per_rank.seed, streams.shared.seed),
            "rank_draw": torch.rand(6, generator=streams.per_rank.seeded("cpu", 0)),
            "shared_draw": torch.rand(6, generator=streams.shared.seeded("cpu", 0))}


@pytest.mark.slow
def test_ddp_seed_is_rank_zeros_and_draws_differ_or_agree(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the run's seed is then torch's, which differs per rank
    model = ImageClassifier("mlp", num_classes=4, in_channels=1, image_size=4, schedule="none")
    dm = SyntheticDataModule(num_samples=16, num_classes=4, image_shape=[1, 4, 4], batch_size=4)
    r0, r1 = run_ddp(model, dm, tmp_path=tmp_path, fn="validate", probe=_streams_probe,
                     callbacks=[_RankSeeds(), _Streams()])
    assert (r0["initial"], r1["initial"]) == (100, 101)
    assert r0["seeds"] == r1["seeds"] == (100, 100)  # rank 0's seed, broadcast
    assert not torch.equal(r0["rank_draw"], r1["rank_draw"])
    assert torch.equal(r0["shared_draw"], r1["shared_draw"])
    assert torch.equal(r0["rank_draw"], torch.rand(6, generator=torch.Generator().manual_seed(derive_seed(100, 0, 0))))
