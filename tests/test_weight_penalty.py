import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_tricks import WeightPenalty
from lightning_tricks.core.validation import InvalidArgumentError
from lightning_tricks.regularization.weight_penalty import (
    add_penalty_gradient_,
    penalty_value,
    select_parameters,
)
from tests.helpers import cpu_trainer, run_ddp
from tests.regularization_modules import ImageData, ListModule

DEFAULT_SELECTION = ["net.0.weight", "net.5.weight", "net.7.weight"]  # conv and linear weights; no bias, no BN


class GradRecorder(Callback):
    """Copies parameters and gradients at every optimizer step (place it before or after WeightPenalty)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                           for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("l1,l2", [(0.0, 0.3), (0.2, 0.0), (0.05, 0.7)])
def test_gradient_equals_autograd_of_the_penalty(l1, l2):
    params = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                    requires_grad=True)]
    with torch.no_grad():
        params[0][0, 0] = 0.0  # |W| at 0: autograd's subgradient is 0, so is sign(0)
    penalty_value(params, l1, l2).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    assert add_penalty_gradient_(params, l1, l2) == 2
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-12)
    value = penalty_value(params, l1, l2)
    assert torch.isclose(value, sum(l1 * p.abs().sum() + l2 * (p ** 2).sum() for p in params))


def test_trainer_gradient_with_accumulation_equals_autograd_of_loss_plus_penalty(tmp_path):
    """Lightning scales each of the 2 micro-batch losses by 1/2; the penalty is added once, at the step."""
    torch.manual_seed(0)
    model, data = ListModule(), ImageData(n=32, batch_size=8, ones=False)
    reference = copy.deepcopy(model).double()
    recorder = GradRecorder()
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, accumulate_grad_batches=2, precision="64-true",
                          callbacks=[WeightPenalty(l1=0.01, l2=0.05), recorder])
    trainer.fit(model, datamodule=data)
    batches = list(data.train_dataloader())[:2]
    loss = sum(F.cross_entropy(reference(x.double()), y) for x, y in batches) / 2
    selected = [p for n, p in reference.named_parameters() if n in DEFAULT_SELECTION]
    (loss + penalty_value(selected, 0.01, 0.05)).backward()
    assert len(recorder.steps) == 1
    for name, p in reference.named_parameters():
        assert torch.allclose(recorder.steps[0][name][1], p.grad, atol=1e-6, rtol=0), name
    assert abs(float(trainer.callback_metrics["weight_penalty/loss"]) - float(penalty_value(selected, 0.01, 0.05))) < 1e-6


def test_amp_gradients_are_unscaled_before_the_penalty(tmp_path):
    torch.manual_seed(0)
    model, data = ListModule(), ImageData(n=16, batch_size=8, ones=False)
    reference = copy.deepcopy(model)
    before, after = GradRecorder(), GradRecorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, plugins=[plugin],
                          callbacks=[before, WeightPenalty(l2=0.5), after])
    trainer.fit(model, datamodule=data)
    x, y = next(iter(data.train_dataloader()))
    F.cross_entropy(reference(x), y).backward()
    for name, p in reference.named_parameters():
        weight, grad_before = before.steps[0][name]
        grad_after = after.steps[0][name][1]
        assert torch.allclose(grad_before, p.grad, rtol=0.05, atol=1e-3), name  # unscaled (x1024 otherwise)
        penalty = 2 * 0.5 * weight if name in DEFAULT_SELECTION else torch.zeros_like(weight)
        assert torch.allclose(grad_after - grad_before, penalty, atol=1e-6), name


def test_default_selection_excludes_biases_and_norms_and_patterns_refine_it():
    import torchvision

    module = ListModule()
    assert [n for n, _ in select_parameters(module)] == DEFAULT_SELECTION
    assert [n for n, _ in select_parameters(module, include=["net.7.*"], exclude_bias_and_norm=False)] == [
        "net.7.weight", "net.7.bias"]
    assert [n for n, _ in select_parameters(module, exclude=["net.0.*"])] == DEFAULT_SELECTION[1:]
    resnet = torchvision.models.resnet18(num_classes=3)
    names = [n for n, _ in select_parameters(resnet)]
    assert "fc.weight" in names and "conv1.weight" in names and "layer1.0.conv2.weight" in names
    assert not any(".bn" in n or "bn1" in n or n.endswith(".bias") or "downsample.1" in n for n in names)
    assert len(names) == 21  # 20 convolutions (3 of them 1x1 downsampling) and the fc weight
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'head\.\*' matches no parameter"):
        select_parameters(module, include=["head.*"])
    # a pattern selects what is inside a match; one that matches only ineligible parameters says why
    assert [n for n, _ in select_parameters(module, include=["net.7"])] == ["net.7.weight"]
    with pytest.raises(InvalidArgumentError, match=r"`include` pattern 'net.7.bias' matches only parameters "
                                                   r"WeightPenalty cannot act on: 'net.7.bias' \(Parameter: bias-like"):
        select_parameters(module, include=["net.7.bias"])
    module.net[7].weight.requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match=r"'net.7.weight' \(Parameter: frozen"):
        select_parameters(module, include=["net.7.weight"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(l1=-0.1), "`l1`=-0.1 is invalid"), (dict(l2=-1e-4), "`l2`=-0.0001 is invalid"),
    (dict(l2=1.0, include="*.weight"), "`include`='*.weight' is invalid"),
    (dict(l2=1.0, exclude=[""]), "`exclude`=[''] is invalid"),
    (dict(l2=1.0, exclude_bias_and_norm="yes"), "`exclude_bias_and_norm`='yes' is invalid"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        WeightPenalty(**kwargs)


def test_empty_selection_fails_at_setup_and_off_warns(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[WeightPenalty(l2=1.0, exclude=["*"])])
    with pytest.raises(InvalidArgumentError, match="WeightPenalty selected no parameter"):
        trainer.fit(ListModule(), datamodule=ImageData())
    before, after = GradRecorder(), GradRecorder()
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[before, WeightPenalty(), after])
    with pytest.warns(UserWarning, match="is off"):
        trainer.fit(ListModule(), datamodule=ImageData())
    assert all(torch.equal(before.steps[0][n][1], after.steps[0][n][1]) for n in before.steps[0])
    assert "weight_penalty/loss" not in trainer.callback_metrics


def test_warns_when_the_optimizer_also_decays(tmp_path):
    class Decayed(ListModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=5e-4)

    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[WeightPenalty(l2=1e-4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Decayed(), datamodule=ImageData())
    assert any("L2 twice" in str(w.message) for w in caught)


def _ddp_probe(trainer, pl_module):
    return {"params": torch.cat([p.detach().flatten() for p in pl_module.parameters()]),
            "penalty": float(trainer.callback_metrics["weight_penalty/loss"]), "steps": trainer.global_step}


def test_ddp_ranks_apply_the_same_penalty(tmp_path):
    torch.manual_seed(0)
    results = run_ddp(ListModule(), ImageData(n=32, batch_size=8, ones=False), tmp_path=tmp_path, probe=_ddp_probe,
                      callbacks=[WeightPenalty(l1=1e-3, l2=1e-2)], max_epochs=2, limit_val_batches=0)
    assert [r["steps"] for r in results] == [4, 4]
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert results[0]["penalty"] == results[1]["penalty"] > 0


def test_layers_built_in_configure_model_are_selected(tmp_path):
    from tests.regularization_modules import small_net

    class Lazy(ListModule):
        def __init__(self):
            super().__init__()
            del self.net

        def configure_model(self):
            if not hasattr(self, "net"):
                self.net = small_net()

    penalty = WeightPenalty(l2=1e-3)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[penalty])
    trainer.fit(Lazy(), datamodule=ImageData())
    assert penalty.selected_names == DEFAULT_SELECTION
