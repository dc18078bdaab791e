import pytest
import torch
from torch import nn

from lightning_tricks.zoo import ZOO_BACKBONES, BasicBlock, CifarResNet, build_backbone
from lightning_tricks.zoo.backbones import count_parameters


@pytest.mark.parametrize("name", ["simple_cnn", "mlp", "resnet20", "resnet56"])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_zoo_backbones_shapes(name, channels, size):
    model = build_backbone(name, num_classes=7, in_channels=channels, image_size=size)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)


@pytest.mark.parametrize("depth,blocks,params", [(20, 9, 0.27e6), (56, 27, 0.85e6)])
def test_cifar_resnet_matches_paper(depth, blocks, params):
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters; 3n blocks, n=(depth-2)/6
    model = CifarResNet(depth)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == blocks
    assert abs(count_parameters(model) - params) / params < 0.02
    convs_and_fc = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs_and_fc) == depth  # 6n+2 weighted layers, option-A shortcuts add none


def test_basic_block_is_residual_plus_shortcut():
    block = BasicBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    expected = torch.relu(block.residual(x) + block.shortcut(x))
    assert torch.equal(block(x), expected)
    # option A shortcut: subsample and zero-pad channels, no parameters
    sc = block.shortcut(x)
    assert sc.shape == (2, 32, 4, 4)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2]) and sc[:, :8].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18", "timm:resnet18", "mobilenetv3_small_050"])
def test_torchvision_and_timm_by_name(name):
    model = build_backbone(name, num_classes=5, in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name,match", [
    ("resnet_nope", "`backbone`='resnet_nope' is invalid: expected one of simple_cnn, mlp, resnet20"),
    ("tv:vit_nope", "torchvision has no model 'vit_nope'"),
    ("hf:bert", "prefix must be 'tv:' or 'timm:'"),
])
def test_wrong_backbone_names(name, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(name)


def test_zoo_names_are_exported():
    assert {"simple_cnn", "mlp", "resnet20", "resnet56"} <= set(ZOO_BACKBONES)


def test_bad_resnet_depth():
    with pytest.raises(ValueError, match="`depth`=21 is invalid: expected 6n\\+2"):
        CifarResNet(21)
