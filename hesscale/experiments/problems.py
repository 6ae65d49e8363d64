"""The DeepOBS test problems of the paper's training experiments (Section 5, Appendix C).

Each problem names its network, data set, batch size, epoch budget of the paper and L2 penalty
(on weights, not biases). Padding: ``"valid"`` everywhere is the paper authors' variant (their
tooling had no ``'same'``) and the default; ``"same"`` follows DeepOBS' layers (TensorFlow's
'same' pooling is approximated by symmetric padding, which gives the same output sizes).
Initialisations are DeepOBS': truncated normal weights (std 0.03 for the MLP, 0.05 and biases
0.05 for 2C2D), Xavier-normal convolutions and Xavier-uniform dense layers with zero biases for
3C3D, Xavier-normal convolutions with biases 0.1 for All-CNN-C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PADDINGS = ("valid", "same")


@dataclass(frozen=True)
class Problem:
    name: str
    dataset: str
    build: Callable[[str], nn.Sequential]  # padding -> network
    batch_size: int
    paper_epochs: int
    l2: float
    classes: int
    context: int | None = None  # text problems: tokens per example

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: (channels, height, width) of the images, or (context,)."""
        return (self.context,) if self.context is not None else IMAGE_SHAPES[self.dataset]


IMAGE_SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32)}
IMAGE_SHAPES["cifar100"] = IMAGE_SHAPES["cifar10"]


def _truncated_normal_(t: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _flat_size(features: nn.Sequential, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *shape)).numel()


def mlp(classes: int = 10) -> nn.Sequential:
    """Flatten, then Linear 784→1000→500→100→classes with tanh (DeepOBS' MLP)."""
    widths = [784, 1000, 500, 100]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(100, classes))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            _truncated_normal_(m.weight, 3e-2)
            nn.init.zeros_(m.bias)
    return net


def two_c_two_d(padding: str = "valid", activation=nn.ReLU, classes: int = 10) -> nn.Sequential:
    """Conv(1→32, 5) act MaxPool(2) → Conv(32→64, 5) act MaxPool(2) → Linear→1024 act →
    Linear→classes."""
    pad = "same" if padding == "same" else 0
    features = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=pad),
        activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=pad),
        activation(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_size(features, IMAGE_SHAPES["mnist"])
    net = nn.Sequential(*features, nn.Linear(flat, 1024), activation(), nn.Linear(1024, classes))
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _truncated_normal_(m.weight, 0.05)
            nn.init.constant_(m.bias, 0.05)
    return net


def three_c_three_d(padding: str = "valid", activation=nn.Tanh, classes: int = 10):
    """Conv(3→64, 5) act MaxPool(3, 2) → Conv(64→96, 3) act MaxPool(3, 2) → Conv(96→128, 3) act
    MaxPool(3, 2) → Linear→512 act → Linear→256 act → Linear→classes."""
    same = padding == "same"
    pool_pad = 1 if same else 0
    features = nn.Sequential(
        nn.Conv2d(3, 64, 5),
        activation(),
        nn.MaxPool2d(3, 2, padding=pool_pad),
        nn.Conv2d(64, 96, 3),
        activation(),
        nn.MaxPool2d(3, 2, padding=pool_pad),
        nn.Conv2d(96, 128, 3, padding="same" if same else 0),
        activation(),
        nn.MaxPool2d(3, 2, padding=pool_pad),
        nn.Flatten(),
    )
    flat = _flat_size(features, IMAGE_SHAPES["cifar10"])
    net = nn.Sequential(
        *features,
        nn.Linear(flat, 512),
        activation(),
        nn.Linear(512, 256),
        activation(),
        nn.Linear(256, classes),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def all_cnn_c(padding: str = "valid", activation=nn.ELU, classes: int = 100) -> nn.Sequential:
    """All-CNN-C (Springenberg et al. 2015) with dropout 0.2 on the input and 0.5 after each
    strided block, ending in a global average over positions."""
    pad = 1 if padding == "same" else 0

    def conv(cin, cout, k, stride=1, p=pad):
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=p), activation()]

    layers = (
        [nn.Dropout(0.2)]
        + conv(3, 96, 3)
        + conv(96, 96, 3)
        + conv(96, 96, 3, 2)
        + [nn.Dropout(0.5)]
        + conv(96, 192, 3)
        + conv(192, 192, 3)
        + conv(192, 192, 3, 2)
        + [nn.Dropout(0.5)]
        + conv(192, 192, 3, p=0)
        + conv(192, 192, 1, p=0)
        + conv(192, classes, 1, p=0)
        + [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    )
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, 0.1)
    return net


def resnet(classes: int, channels: int, width: int) -> nn.Module:
    """ResNet-18 for small images (:class:`~hesscale.experiments.networks.ResNet18`): BatchNorm
    in train mode, PyTorch's default initialisation."""
    from .networks import ResNet18

    return ResNet18(classes, channels, width)


def char_gpt(context: int) -> nn.Module:
    """A character-level GPT over bytes (:class:`~hesscale.experiments.networks.GPT`) sized for
    CPUs: 4 pre-LN blocks of width 64, 4 heads, a tied output layer, GPT-2's initialisation."""
    from .networks import GPT

    return GPT(vocab=256, width=64, context=context, heads=4, layers=4, gpt2_init=True)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("mnist_mlp", "mnist", lambda pad: mlp(), 128, 100, 0.0, 10),
        Problem("fmnist_mlp", "fmnist", lambda pad: mlp(), 128, 100, 0.0, 10),
        Problem("mnist_2c2d", "mnist", lambda pad: two_c_two_d(pad), 128, 100, 0.0, 10),
        Problem("fmnist_2c2d", "fmnist", lambda pad: two_c_two_d(pad), 128, 100, 0.0, 10),
        Problem(
            "cifar10_3c3d",
            "cifar10",
            lambda pad: three_c_three_d(pad, nn.Tanh, 10),
            128,
            100,
            0.002,
            10,
        ),
        Problem(
            "cifar100_3c3d",
            "cifar100",
            lambda pad: three_c_three_d(pad, nn.ELU, 100),
            128,
            200,
            0.002,
            100,
        ),
        # beyond the paper: a ResNet (ResNet-18 of width 8 on Fashion-MNIST, sized for CPUs) and a
        # character-level GPT
        Problem("fmnist_resnet", "fmnist", lambda pad: resnet(10, 1, 8), 128, 10, 0.0, 10),
        Problem("cifar10_resnet18", "cifar10", lambda pad: resnet(10, 3, 64), 128, 100, 0.0, 10),
        Problem("shakespeare_gpt", "shakespeare", lambda pad: char_gpt(64), 32, 10, 0.0, 256, 64),
        Problem(
            "cifar100_allcnnc",
            "cifar100",
            lambda pad: all_cnn_c(pad, nn.ELU, 100),
            256,
            350,
            5e-4,
            100,
        ),
    )
}


def get_problem(name: str) -> Problem:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}") from None


def build_network(problem: Problem, padding: str = "valid") -> nn.Sequential:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return problem.build(padding)
