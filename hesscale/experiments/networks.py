"""The networks of the paper's Fig. 1 and Fig. 2 experiments."""

from __future__ import annotations

from torch import nn


def tanh_mlp(inputs: int, hidden: list[int], outputs: int) -> nn.Sequential:
    """``Linear → Tanh`` for every hidden width, then a Linear output layer."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def fig1_network() -> nn.Sequential:
    """6 inputs, three hidden layers of 16 tanh units, 10 outputs (Section 4)."""
    return tanh_mlp(6, [16, 16, 16], 10)


def fig2a_network(outputs: int) -> nn.Sequential:
    """64 inputs, one hidden layer of 512 tanh units, ``outputs`` outputs (Fig. 2a)."""
    return tanh_mlp(64, [512], outputs)


def fig2b_network(layers: int) -> nn.Sequential:
    """64 inputs, ``layers`` hidden layers of 512 tanh units, 100 outputs (Fig. 2b)."""
    return tanh_mlp(64, [512] * layers, 100)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ResidualTanhMLP(nn.Module):
    """``inputs → width``, then residual blocks ``h + W₂ tanh(W₁ h)`` each followed by a tanh,
    then ``width → outputs``: a graph with fan-out at every block."""

    def __init__(self, inputs: int, width: int, blocks: int, outputs: int):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.act = nn.Tanh()
        self.head = nn.Linear(width, outputs)
        self.out_features = outputs

    def forward(self, x):
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = self.act(h + block(h))
        return self.head(h)


def residual_network(blocks: int = 4) -> ResidualTanhMLP:
    """The Fig. 2b network's size as a residual MLP: 64 inputs, ``blocks`` blocks of two
    512-wide tanh layers, 100 outputs."""
    return ResidualTanhMLP(64, 512, blocks, 100)
