import pytest
import torch
from torch import nn

from models import (DEFAULT_INPUT, MODELS, BasicBlock, CifarResNet, WideBlock, WideResNet, build_model, resnet8_bn,
                    resnet18_bn, resnet20_bn, wrn16_4_bn)

# Layer types for which hfopt's curvature engine has exact rules.
ALLOWED_MODULES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Linear,
    nn.Identity,
    nn.Sequential,
)
# Containers whose forward() uses only F.relu, torch.flatten and residual additions.
CUSTOM_CONTAINERS = (BasicBlock, CifarResNet, WideBlock, WideResNet)

BATCH = 3


def _input(name: str, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, *DEFAULT_INPUT[name], generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_model():
    expected = {"c3d3_bn", "allcnnc_bn", "resnet8_bn", "resnet20_bn", "resnet18_bn", "wrn16_4_bn",
                "digits_convnet_bn", "mlp_bn"}
    assert set(MODELS) == expected
    assert set(DEFAULT_INPUT) == set(MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16")


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_output_shape(name, train):
    model = build_model(name, num_classes=7).train(train)
    with torch.no_grad():
        out = model(_input(name))
    assert out.shape == (BATCH, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_only_supported_layers(name):
    for module in MODELS[name]().modules():
        assert type(module) in ALLOWED_MODULES + CUSTOM_CONTAINERS, type(module)
        if isinstance(module, nn.Conv2d):
            assert module.padding_mode == "zeros"
            assert all(isinstance(p, int) for p in module.padding)
        if isinstance(module, nn.ReLU):
            assert not module.inplace


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_under_seed(name):
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = MODELS[name]()
        outputs.append((model.state_dict(), model(_input(name))))
    (state_a, out_a), (state_b, out_b) = outputs
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize(
    ("factory", "blocks", "params"), [(resnet8_bn, 1, (70e3, 85e3)), (resnet20_bn, 3, (0.26e6, 0.28e6))]
)
def test_resnet_structure(factory, blocks, params):
    model = factory()
    for stage in (model.layer1, model.layer2, model.layer3):
        assert sum(isinstance(m, BasicBlock) for m in stage) == blocks
    assert params[0] < sum(p.numel() for p in model.parameters()) < params[1]
    # Only the first block of the strided stages changes shape and needs a projection.
    projections = [m for m in model.modules() if isinstance(m, BasicBlock) and len(m.shortcut) > 0]
    assert projections == [model.layer2[0], model.layer3[0]]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet18_structure():
    model = resnet18_bn()
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[0].conv1.out_channels for s in stages] == [64, 128, 256, 512]
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.2e6  # the CIFAR ResNet-18's 11.17M
    projections = [m for m in model.modules() if isinstance(m, BasicBlock) and len(m.shortcut) > 0]
    assert projections == [model.layer2[0], model.layer3[0], model.layer4[0]]


def test_wide_resnet_structure():
    model = wrn16_4_bn()
    blocks = [m for m in model.modules() if isinstance(m, WideBlock)]
    assert len(blocks) == 6 and [b.conv1.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256]
    assert [b.project is not None for b in blocks] == [True, False, True, False, True, False]
    assert 2.7e6 < sum(p.numel() for p in model.parameters()) < 2.8e6  # WRN-16-4's 2.75M
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=15)
    with pytest.raises(ValueError, match="blocks"):
        CifarResNet((1, 2))
