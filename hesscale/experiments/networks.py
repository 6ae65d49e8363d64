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
