import pytest
import torch
from torch import nn

from study.errors import ConfigError
from study.models import (
    ConvBlock,
    ConvNet,
    ConvNetSpec,
    DeepNeuralNet,
    ShallowNeuralNet,
    TwinDeepNeuralNet,
    count_parameters,
)


def test_shallow_net_shapes_and_parameters():
    net = ShallowNeuralNet(5, 10, 2)
    assert net(torch.ones(5)).shape == (2,)
    assert net(torch.ones(7, 5)).shape == (7, 2)
    assert count_parameters(net) == (5 + 1) * 10 + (10 + 1) * 2


def test_deep_net_follows_the_profile():
    net = DeepNeuralNet(10, [10, 7, 5], 1)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (10, 10),
        (10, 7),
        (7, 5),
        (5, 1),
    ]
    assert net(torch.rand(10)).shape == (1,)
    assert net(torch.rand(3, 10)).shape == (3, 1)


def test_deep_net_output_activation_and_image_input():
    net = DeepNeuralNet(8, [16], 8, output_activation=nn.Sigmoid())
    out = net(torch.rand(4, 8))
    assert ((out > 0) & (out < 1)).all()
    image_net = DeepNeuralNet(28 * 28, [32], 10)
    assert image_net(torch.rand(6, 1, 28, 28)).shape == (6, 10)


@pytest.mark.parametrize("profile", [[], [0], [4, -1]])
def test_deep_net_rejects_bad_profiles(profile):
    with pytest.raises(ConfigError, match="hidden_layer_profile"):
        DeepNeuralNet(4, profile, 2)


def test_twin_net_shares_one_tower():
    twin = TwinDeepNeuralNet(5, [10, 10], 1)
    tower = DeepNeuralNet(5, [10, 10], 1)
    assert count_parameters(twin) == count_parameters(tower)
    out = twin(torch.ones((2, 5)))
    assert out.shape == (2, 1)
    assert torch.equal(out[0], out[1])
    batch = torch.rand(2, 4, 5)
    batch[1] = batch[0]
    out = twin(batch)
    assert out.shape == (2, 4, 1) and torch.equal(out[0], out[1])
    different = twin(torch.stack([torch.zeros(5), torch.ones(5)]))
    assert not torch.equal(different[0], different[1])


@pytest.mark.parametrize(
    "spec",
    [
        ConvNetSpec(),
        ConvNetSpec(blocks=(ConvBlock(8, 5, False, "avg"),), head_width=0, dropout=0.3),
        ConvNetSpec(
            blocks=(ConvBlock(4), ConvBlock(8), ConvBlock(16, 3, True, "none")),
            head_width=32,
            dropout=0.1,
        ),
    ],
)
def test_convnet_shapes(spec):
    net = ConvNet(spec)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(net) > 0


def test_convnet_rejects_bad_specs():
    with pytest.raises(ConfigError, match="kernel_size"):
        ConvBlock(8, kernel_size=4)
    with pytest.raises(ConfigError, match="pool"):
        ConvBlock(8, pool="median")
    with pytest.raises(ConfigError, match="pooling"):
        ConvNet(ConvNetSpec(blocks=tuple(ConvBlock(2) for _ in range(6))))
