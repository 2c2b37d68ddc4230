"""The tutorial's networks, completed, and a configurable CNN for the image studies.

Networks return raw scores (logits); losses apply the sigmoid/softmax themselves, which is
numerically safer than the tutorial's `nn.Sigmoid` + `nn.BCELoss` at losses near 0.001.
`output_activation` is still there for the tutorial's usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from study import device as dev
from study.errors import ConfigError


class ShallowNeuralNet(nn.Module):
    """The tutorial's one-hidden-layer ReLU network."""

    def __init__(self, input_width: int, hidden_layer_width: int, output_width: int) -> None:
        super().__init__()
        self.hidden_layer = nn.Linear(input_width, hidden_layer_width)
        self.hidden_relu = nn.ReLU()
        self.output_layer = nn.Linear(hidden_layer_width, output_width)

    def forward(self, input: Tensor) -> Tensor:
        return self.output_layer(self.hidden_relu(self.hidden_layer(input)))


class DeepNeuralNet(nn.Module):
    """A ReLU network with hidden widths `hidden_layer_profile` (the tutorial's exercise).

    Inputs with more than two dimensions (images) are flattened per sample. `dropout` is
    applied after every hidden ReLU (0 disables it).
    """

    def __init__(
        self,
        input_width: int,
        hidden_layer_profile: Sequence[int],
        output_width: int,
        output_activation: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        profile = list(hidden_layer_profile)
        if not profile or any(int(w) < 1 for w in profile):
            raise ConfigError(
                f"hidden_layer_profile: needs at least one width >= 1, got {profile}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {dropout}")
        self.hidden_layer_profile = tuple(int(w) for w in profile)
        self.layers = nn.ModuleList()
        for in_width, out_width in zip([input_width, *profile[:-1]], profile, strict=True):
            self.layers.append(nn.Linear(in_width, out_width))
            self.layers.append(nn.ReLU())
            if dropout > 0:
                self.layers.append(nn.Dropout(dropout))
        self.output_layer = nn.Linear(profile[-1], output_width)
        self.output_activation = output_activation if output_activation else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        x = input.flatten(1) if input.dim() > 2 else input
        for layer in self.layers:
            x = layer(x)
        return self.output_activation(self.output_layer(x))


def build_boolean_net(
    hidden_layer_profile: Sequence[int], input_bits: int, output_bits: int, seed: int
) -> DeepNeuralNet:
    """The ReLU network of a Boolean candidate with initial weights drawn from `seed` (logits
    out). The one place that seeds a Boolean network: the trainer and the population trainer
    start every member from exactly these weights."""
    with dev.seeded(seed):
        return DeepNeuralNet(input_bits, hidden_layer_profile, output_bits)


class TwinDeepNeuralNet(nn.Module):
    """Two towers that share one `DeepNeuralNet`: identical inputs give identical outputs.

    Input has shape (2, ...) or (2, batch, ...): index 0 is the query, 1 the value.
    """

    def __init__(
        self, input_width: int, hidden_layer_profile: Sequence[int], output_width: int
    ) -> None:
        super().__init__()
        self.tower = DeepNeuralNet(input_width, hidden_layer_profile, output_width)

    def forward(self, input: Tensor) -> Tensor:
        output_query = self.tower(input[0])
        output_value = self.tower(input[1])
        return torch.stack([output_query, output_value], dim=0)


@dataclass(frozen=True)
class ConvBlock:
    """One convolution block: conv -> [batch norm] -> ReLU -> [2x2 pool] -> [residual unit:
    two more convolutions at the pooled size, added to their input]."""

    channels: int
    """Output channels of the convolution."""
    kernel_size: int = 3
    """Square kernel side in pixels (odd; 'same' padding keeps the spatial size)."""
    batch_norm: bool = True
    """Batch normalisation after the convolution."""
    pool: str = "max"
    """Downsampling after the block: "max", "avg" or "none" (2x2, stride 2)."""
    residual: bool = False
    """A residual unit after the pool: conv-BN-ReLU-conv-BN plus the unit's input, ReLU
    (needs batch_norm)."""

    def __post_init__(self) -> None:
        if self.residual and not self.batch_norm:
            raise ConfigError("residual: a residual unit needs batch_norm")
        if self.channels < 1:
            raise ConfigError(f"channels: must be >= 1, got {self.channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(
                f"kernel_size: must be a positive odd number, got {self.kernel_size}"
            )
        if self.pool not in ("max", "avg", "none"):
            raise ConfigError(f"pool: must be max, avg or none, got {self.pool!r}")


@dataclass(frozen=True)
class ConvNetSpec:
    """Architecture of a `ConvNet`: conv blocks, then a dense head."""

    blocks: tuple[ConvBlock, ...] = field(default_factory=lambda: (ConvBlock(32), ConvBlock(64)))
    head_width: int = 128
    """Width of the hidden dense layer of the head (0: straight to the classes)."""
    dropout: float = 0.0
    """Dropout before the classifier (the head's last dense layer)."""
    global_pool: bool = False
    """Average each channel over the image before the head (else flatten every pixel)."""

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ConfigError("blocks: a ConvNet needs at least one conv block")
        if self.head_width < 0:
            raise ConfigError(f"head_width: must be >= 0, got {self.head_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


class ConvNet(nn.Module):
    """Configurable CNN: `spec.blocks` conv blocks, global flatten, dense head, logits."""

    def __init__(
        self,
        spec: ConvNetSpec,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.spec = spec
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for block in spec.blocks:
            layers.append(
                nn.Conv2d(
                    channels,
                    block.channels,
                    block.kernel_size,
                    padding=block.kernel_size // 2,
                    bias=not block.batch_norm,
                )
            )
            if block.batch_norm:
                layers.append(nn.BatchNorm2d(block.channels))
            layers.append(nn.ReLU())
            if block.pool != "none":
                if min(height, width) < 2:
                    raise ConfigError(
                        f"blocks: too many pooling blocks for a {input_shape[1]}x"
                        f"{input_shape[2]} input"
                    )
                pool = nn.MaxPool2d(2) if block.pool == "max" else nn.AvgPool2d(2)
                layers.append(pool)
                height, width = height // 2, width // 2
            if block.residual:
                layers.append(ResidualUnit(block.channels, block.kernel_size))
            channels = block.channels
        self.features = nn.Sequential(*layers)
        flat = channels if spec.global_pool else channels * height * width
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if spec.global_pool else []
        head.append(nn.Flatten())
        if spec.head_width > 0:
            head += [nn.Linear(flat, spec.head_width), nn.ReLU()]
            flat = spec.head_width
        if spec.dropout > 0:  # before the classifier only: on the CPU, drawing a mask per
            head.append(nn.Dropout(spec.dropout))  # flattened pixel costs more than a conv
        head.append(nn.Linear(flat, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, input: Tensor) -> Tensor:
        return self.head(self.features(input))


class ResidualUnit(nn.Module):
    """conv-BN-ReLU-conv-BN, added to the input, then ReLU (same channels and size)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(input + self.body(input))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
