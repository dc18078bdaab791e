"""The task contract's additions for batch tricks and binary models (core/task.py, issue 20)."""

import pytest
import torch

from lightning_tricks.core.task import (
    TaskNotSupportedError,
    aligned_with_inputs,
    infer_target_task,
    infer_task,
)

IMAGES = torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("targets,kind,classes,spatial,sigmoid", [
    (torch.tensor([0, 2, 1, 1]), "classification", None, 0, False),
    (torch.eye(5)[:4], "classification", 5, 0, False),  # one-hot float rows
    (torch.tensor([[1.0, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]), "multilabel", 3, 0, True),
    (torch.randn(4, 3), "regression", None, 0, False),
    (torch.randn(4), "regression", None, 0, False),
    (torch.randint(0, 3, (4, 8, 8)), "dense", None, 2, False),  # masks
    (torch.randint(0, 2, (4, 2, 8, 8)).float(), "dense", 2, 2, True),  # multi-label maps
    (torch.randn(4, 1, 8, 8), "regression", None, 0, False),  # a float map (depth): regression
])
def test_target_task_from_targets_and_images(targets, kind, classes, spatial, sigmoid):
    task = infer_target_task(targets, IMAGES)
    assert (task.kind, task.num_classes, task.spatial_ndim, task.sigmoid) == (kind, classes, spatial, sigmoid)


def test_target_task_override_and_refusals():
    assert infer_target_task(torch.randn(4, 3), IMAGES, "multilabel").kind == "multilabel"
    with pytest.raises(TaskNotSupportedError, match="task='dense' needs targets on the inputs' grid"):
        infer_target_task(torch.tensor([0, 1, 2, 1]), IMAGES, "dense")
    with pytest.raises(TaskNotSupportedError, match="pass `task`"):
        infer_target_task(["a", "b"], IMAGES)
    sequences = torch.randn(4, 2, 40)  # MNIST-1D style [B, C, L]: per-position labels [B, L] are dense
    assert infer_target_task(torch.randint(0, 3, (4, 40)), sequences).kind == "dense"
    assert aligned_with_inputs(torch.zeros(4, 40), sequences) and not aligned_with_inputs(torch.zeros(4, 39), sequences)


def test_single_logit_binary_models_are_one_label_multilabel():
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    task = infer_task(torch.randn(4, 1), y)
    assert (task.kind, task.num_classes, task.sigmoid, task.form) == ("multilabel", 1, True, "logits")
    assert infer_task(torch.randn(4), y.view(-1)).kind == "multilabel"
    assert infer_task(torch.rand(4, 1) * 0.8 + 0.1, y).form == "probs"  # a forward ending in sigmoid
    seg = infer_task(torch.randn(4, 1, 8, 8), (torch.rand(4, 8, 8) > 0.5).float())
    assert (seg.kind, seg.spatial_ndim, seg.sigmoid) == ("dense", 2, True)
    assert infer_task(torch.randn(4, 1), torch.randn(4, 1)).kind == "regression"  # real-valued targets
    assert infer_task(torch.randn(4, 1)).kind == "regression"  # no targets: nothing says binary
