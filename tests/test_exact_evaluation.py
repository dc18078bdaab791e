import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks import ExactDistributedEvaluation
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.exact_evaluation import (
    EvenDistributedBatchSampler,
    equal_batch_counts,
    even_batches,
    exact_eval_dataloader,
    padded_duplicates,
)
from tests.helpers import cpu_trainer, run_ddp

N_TEST, BATCH = 45, 4  # 45 is not divisible by 2 ranks x 4: padding adds one duplicate, ranks hold 23 and 22


def test_even_batches_cover_every_position_once_with_equal_counts():
    for n in range(0, 40):
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            for batch in (1, 2, 3, 5):
                shares = [even_batches(n, batch, world, r) for r in range(world)]
                flat = sorted(p for share in shares for b in share for p in b)
                assert flat == list(range(n))
                assert all(1 <= len(b) <= batch for share in shares for b in share)
                # rank r keeps DistributedSampler's assignment r, r + W, ...
                assert all(p % world == r for r, share in enumerate(shares) for b in share for p in b)
                counts = {len(share) for share in shares}
                if batch >= 2:
                    assert len(counts) == 1 and equal_batch_counts(n, batch, world)
                else:
                    assert max(counts) - min(counts) <= 1
    assert even_batches(45, 4, 2, 1)[-2:] == [[33, 35, 37, 39], [41, 43]]
    assert padded_duplicates(45, 2) == 1 and padded_duplicates(44, 2) == 0 and padded_duplicates(5, 4) == 3


def test_shuffled_loader_is_split_identically_on_all_ranks():
    data = list(range(11))
    samplers = [EvenDistributedBatchSampler(RandomSampler(data), 3, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    first = [sum(list(s), []) for s in samplers]
    assert sorted(first[0] + first[1]) == data and not set(first[0]) & set(first[1])
    assert first[0] != sorted(first[0]) or first[1] != sorted(first[1])  # shuffled
    for s in samplers:
        s.set_epoch(1)
    second = [sum(list(s), []) for s in samplers]
    assert sorted(second[0] + second[1]) == data and second != first
    assert len(samplers[0]) == len(samplers[1]) == 2


def test_exact_eval_dataloader_keeps_loader_settings_and_refuses_what_it_cannot_split():
    def collate(items):
        return torch.stack([torch.as_tensor(i) for i in items]) * 10

    loader = DataLoader(list(range(7)), batch_size=3, collate_fn=collate)
    shares = [[b.tolist() for b in exact_eval_dataloader(loader, num_replicas=2, rank=r)] for r in (0, 1)]
    assert shares == [[[0, 20, 40], [60]], [[10, 30], [50]]]
    with pytest.raises(ValueError, match="drop_last=True"):
        exact_eval_dataloader(DataLoader(list(range(7)), batch_size=3, drop_last=True), 2, 0)

    class Buckets(BatchSampler):
        pass

    custom = DataLoader(list(range(7)), batch_sampler=Buckets(SequentialSampler(range(7)), 3, False))
    with pytest.raises(ValueError, match="custom batch sampler"):
        exact_eval_dataloader(custom, 2, 0)


def test_wrong_stages_are_refused():
    with pytest.raises(InvalidArgumentError, match=r"`stages`=\['predict'\] is invalid: expected a non-empty list"):
        ExactDistributedEvaluation(stages=["predict"])
    with pytest.raises(InvalidArgumentError, match="`stages`=\\[\\] is invalid"):
        ExactDistributedEvaluation(stages=[])


class Net(pl.LightningModule):
    """A user's module: list batches, plain cross-entropy, a torchmetrics metric and a per-step synced log."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        self.acc = MulticlassAccuracy(5, average="micro")
        self.seen: list[list[int]] = []

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        self.seen.append(index.tolist())
        self.acc(logits, y)
        self.log("test_acc", self.acc)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("manual_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)
        # a collective on every step: hangs if one rank runs fewer batches than the other
        self.log("step_loss", F.cross_entropy(logits, y), on_step=True, on_epoch=False, sync_dist=True)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_TEST, 1, 4, 4, generator=g), torch.randint(0, 5, (N_TEST,), generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(N_TEST)), batch_size=BATCH)


class HeldOutData(pl.LightningDataModule):
    def test_dataloader(self) -> DataLoader:
        return _loader()


def _metrics(trainer: pl.Trainer, pl_module: Net) -> dict:
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "step_loss"}
    return {**out, "seen": pl_module.seen, "batches": trainer.num_test_batches}


def test_ddp_test_metrics_equal_single_process_and_ranks_run_equal_batches(tmp_path):
    torch.manual_seed(0)
    model = Net()
    single = cpu_trainer(tmp_path).test(model, datamodule=HeldOutData(), verbose=False)[0]
    model.seen = []
    ranks = run_ddp(model, HeldOutData(), tmp_path=tmp_path, fn="test", probe=_metrics,
                    callbacks=[ExactDistributedEvaluation(stages=["test"])])
    seen = [sum(r["seen"], []) for r in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(N_TEST))  # every sample once, none twice
    assert ranks[0]["batches"] == ranks[1]["batches"] == [6]  # 23 and 22 samples, both in 6 batches
    for r in ranks:
        assert r["test_acc"] == single["test_acc"]  # counts: exactly equal
        assert r["manual_acc"] == pytest.approx(single["manual_acc"], abs=1e-6)
        assert r["test_loss"] == pytest.approx(single["test_loss"], abs=1e-6)
    # Lightning's default (padded) evaluation counts one sample twice and misses the single-process value
    padded = run_ddp(model, HeldOutData(), tmp_path=tmp_path, fn="test", probe=_metrics)
    assert sum(len(s) for s in padded[0]["seen"] + padded[1]["seen"]) == N_TEST + 1
    assert padded[0]["test_acc"] != single["test_acc"]


def test_reduce_replacement_keeps_lightning_log_metadata_equal_across_runs(tmp_path):
    """Lightning refuses a second self.log of a key whose stored sync function differs: ours must compare equal."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _Sync

    from lightning_tricks._lightning_internals import exact_evaluation_patch, set_exact_evaluation_patch
    from lightning_tricks.exact_evaluation import _ExactEvaluationPatch, uninstall_exact_evaluation

    trainer = cpu_trainer(tmp_path)
    before = _Sync(fn=trainer.strategy.reduce, _should=True)
    owner = object()

    def install():  # what install_exact_evaluation does on several ranks
        patch = _ExactEvaluationPatch(trainer)
        set_exact_evaluation_patch(trainer, patch)
        patch.owners[id(owner)] = frozenset()

    install()
    first = _Sync(fn=trainer.strategy.reduce, _should=True)
    assert type(trainer.strategy.reduce).__name__ == "_ExactMeanReduce"
    assert first == before and before == first
    uninstall_exact_evaluation(trainer, owner)
    assert "reduce" not in trainer.strategy.__dict__ and "_prepare_dataloader" not in trainer._data_connector.__dict__
    assert _Sync(fn=trainer.strategy.reduce, _should=True) == first
    install()
    assert _Sync(fn=trainer.strategy.reduce, _should=True) == first
    other = object()  # a second owner (e.g. ExactDistributedEvaluation next to TestTimeAugmentation) shares the patch
    exact_evaluation_patch(trainer).owners[id(other)] = frozenset()
    uninstall_exact_evaluation(trainer, owner)
    assert "_prepare_dataloader" in trainer._data_connector.__dict__
    uninstall_exact_evaluation(trainer, other)
    uninstall_exact_evaluation(trainer, other)  # twice is harmless
    assert "_prepare_dataloader" not in trainer._data_connector.__dict__ and "reduce" not in trainer.strategy.__dict__


def test_a_lightning_without_the_replaced_connector_methods_is_one_unverified_lightning_line():
    from types import SimpleNamespace

    from lightning_tricks._lightning_internals import replace_prepare_dataloader
    from lightning_tricks.errors import UnverifiedLightningError

    class Connector:  # a future Lightning whose connector prepares loaders another way
        def _requires_distributed_sampler(self, dataloader):
            return True

    trainer = SimpleNamespace(_data_connector=Connector())
    with pytest.raises(UnverifiedLightningError, match=r"DataConnector\._prepare_dataloader \(checked on") as info:
        replace_prepare_dataloader(trainer, lambda *args: None)
    assert "\n" not in str(info.value) and isinstance(info.value, RuntimeError)
    assert "_prepare_dataloader" not in vars(trainer._data_connector)
