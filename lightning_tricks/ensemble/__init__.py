"""Model ensembles: checkpoint ensembles with soft, hard or weighted voting, snapshot ensembles, EMA members.

The lectures' recipe: train several models independently and, at test time, average their predicted
class distributions, then take the argmax. Snapshots of one run taken at the ends of cyclic
learning-rate cycles (Huang et al. 2017) and the exponential moving average of the weights are two
cheaper sources of members.

One module per responsibility:

- `voting`: the functional core (plain torch): `soft_vote`, `hard_vote`, `vote_shares`,
  `fit_vote_weights`;
- `loading`: members built from checkpoints, safely (`load_member`, `read_checkpoint`);
- `module`: the `Ensemble` LightningModule (``validate``/``test``/``predict``), with its argument checks
  (`checks`), how its members load and run (`members`) and its Lightning hooks (`hooks`);
- `snapshot`: `snapshot_lr` and the `SnapshotEnsemble` callback;
- `ema`: `EMAMembers`, Lightning's ``EMAWeightAveraging`` that also keeps the raw weights.
"""

from lightning_tricks.ensemble._vmap import architecture_key
from lightning_tricks.ensemble.ema import EMAMembers
from lightning_tricks.ensemble.loading import (
    CheckpointError,
    UnsafeCheckpointError,
    load_member,
    read_checkpoint,
)
from lightning_tricks.ensemble.module import Ensemble
from lightning_tricks.ensemble.snapshot import SnapshotEnsemble, snapshot_lr
from lightning_tricks.ensemble.voting import (
    check_vote_weights,
    fit_vote_weights,
    hard_vote,
    soft_vote,
    vote_shares,
)

__all__ = [
    "CheckpointError",
    "EMAMembers",
    "Ensemble",
    "SnapshotEnsemble",
    "UnsafeCheckpointError",
    "architecture_key",
    "check_vote_weights",
    "fit_vote_weights",
    "hard_vote",
    "load_member",
    "read_checkpoint",
    "snapshot_lr",
    "soft_vote",
    "vote_shares",
]
