"""Small networks as data: factories of model, input, target and loss, with readable ids.

Each case is a dict with ``model_fn``, ``input_fn``, ``target_fn``, ``loss_fn`` and ``seed``;
:func:`build` instantiates one in float64 on a device.
"""

from __future__ import annotations

import torch
from torch import nn

N = 3  # batch size of most cases


def _labels(classes, *shape):
    return lambda: torch.randint(0, classes, (N, *shape))


def _mlp(act, width=5, inputs=4, outputs=3):
    return lambda: nn.Sequential(
        nn.Linear(inputs, width),
        act(),
        nn.Linear(width, width, bias=False),
        act(),
        nn.Linear(width, outputs),
    )


ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.2),
    "elu": lambda: nn.ELU(alpha=0.7),
    "selu": nn.SELU,
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "logsigmoid": nn.LogSigmoid,
    "relu6": nn.ReLU6,
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
}

CASES: dict[str, dict] = {}

for _name, _act in ACTIVATIONS.items():
    CASES[f"mlp-{_name}"] = dict(
        model_fn=_mlp(_act),
        input_fn=lambda: torch.randn(N, 4) * 2,
        target_fn=_labels(3),
        loss_fn=nn.CrossEntropyLoss,
    )


def _conv_case(conv, dims, head_act=nn.Tanh, pool=None, size=6, channels=2):
    def model():
        layers = [conv(), head_act()]
        if pool is not None:
            layers.append(pool())
        layers += [nn.Flatten(), nn.LazyLinear(3)]
        return nn.Sequential(*layers)

    return dict(
        model_fn=model,
        input_fn=lambda: torch.randn(N, channels, *([size] * dims)),
        target_fn=_labels(3),
        loss_fn=nn.CrossEntropyLoss,
    )


CONVS = {
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), 1),
    "conv1d-stride2-pad1-dil2": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), 1),
    "conv2d-groups2": (lambda: nn.Conv2d(2, 4, 3, padding=1, groups=2), 2),
    "conv2d-same-evenkernel": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), 2),
    "conv2d-valid-stride": (lambda: nn.Conv2d(2, 3, 3, stride=(2, 1), padding="valid"), 2),
    "conv2d-nobias": (lambda: nn.Conv2d(2, 3, 2, bias=False), 2),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2, stride=2, padding=1), 3),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), 1),
    "convtranspose2d-outpad": (
        lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        2,
    ),
    "convtranspose3d": (lambda: nn.ConvTranspose3d(2, 2, 2, dilation=2), 3),
}
for _name, (_conv, _dims) in CONVS.items():
    CASES[_name] = _conv_case(_conv, _dims, size=5 if _dims < 3 else 4)

POOLS = {
    "maxpool1d": (lambda: nn.MaxPool1d(2), 1),
    "maxpool2d-overlap": (lambda: nn.MaxPool2d(3, stride=1, padding=1), 2),
    "maxpool2d-dilation-ceil": (lambda: nn.MaxPool2d(2, dilation=2, ceil_mode=True), 2),
    "maxpool3d": (lambda: nn.MaxPool3d(2), 3),
    "avgpool1d-pad": (lambda: nn.AvgPool1d(3, stride=2, padding=1), 1),
    "avgpool1d-nopadcount": (lambda: nn.AvgPool1d(3, 2, 1, count_include_pad=False), 1),
    "avgpool2d": (lambda: nn.AvgPool2d(2), 2),
    "avgpool2d-ceil-nopadcount": (
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        2,
    ),
    "avgpool2d-divisor": (lambda: nn.AvgPool2d(2, stride=1, divisor_override=3), 2),
    "avgpool3d": (lambda: nn.AvgPool3d(2, stride=1), 3),
    "adaptiveavgpool1d": (lambda: nn.AdaptiveAvgPool1d(3), 1),
    "adaptiveavgpool2d": (lambda: nn.AdaptiveAvgPool2d((2, 3)), 2),
    "adaptiveavgpool3d": (lambda: nn.AdaptiveAvgPool3d(2), 3),
}
_CONV_OF_DIM = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
for _name, (_pool, _dims) in POOLS.items():
    CASES[_name] = _conv_case(
        (lambda d: lambda: _CONV_OF_DIM[d](2, 2, 2, padding=1))(_dims),
        _dims,
        pool=_pool,
        size=5 if _dims < 3 else 3,
    )

CASES["conv2d-relu-maxpool"] = _conv_case(
    lambda: nn.Conv2d(2, 3, 2, padding=1),
    2,
    head_act=nn.ReLU,
    pool=lambda: nn.MaxPool2d(2, stride=1),
    size=4,
)

CASES.update(
    {
        "dropout-train": dict(
            model_fn=lambda: nn.Sequential(
                nn.Linear(4, 6), nn.Dropout(0.4), nn.Tanh(), nn.Linear(6, 3)
            ),
            input_fn=lambda: torch.randn(N, 4),
            target_fn=_labels(3),
            loss_fn=nn.CrossEntropyLoss,
        ),
        "dropout2d-train": _conv_case(
            lambda: nn.Conv2d(2, 3, 2), 2, head_act=lambda: nn.Dropout2d(0.5), size=4
        ),
        "dropout-eval": dict(
            model_fn=lambda: nn.Sequential(
                nn.Linear(4, 6), nn.Dropout(0.4).eval(), nn.Tanh(), nn.Linear(6, 3)
            ),
            input_fn=lambda: torch.randn(N, 4),
            target_fn=_labels(3),
            loss_fn=nn.CrossEntropyLoss,
        ),
        "zeropad2d-identity-unflatten": dict(
            model_fn=lambda: nn.Sequential(
                nn.Linear(8, 8),
                nn.Unflatten(1, (2, 2, 2)),
                nn.ZeroPad2d((1, 0, 2, 1)),
                nn.Conv2d(2, 2, 2),
                nn.Identity(),
                nn.Sigmoid(),
                nn.Flatten(),
                nn.Linear(16, 3),
            ),
            input_fn=lambda: torch.randn(N, 8),
            target_fn=_labels(3),
            loss_fn=nn.CrossEntropyLoss,
        ),
        "nested-sequential": dict(
            model_fn=lambda: nn.Sequential(
                nn.Sequential(nn.Linear(4, 5), nn.Tanh()),
                nn.Sequential(nn.Sequential(nn.Linear(5, 5), nn.ELU()), nn.Linear(5, 3)),
            ),
            input_fn=lambda: torch.randn(N, 4),
            target_fn=_labels(3),
            loss_fn=nn.CrossEntropyLoss,
        ),
        "logsoftmax-nll": dict(
            model_fn=lambda: nn.Sequential(
                nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)
            ),
            input_fn=lambda: torch.randn(N, 4),
            target_fn=_labels(3),
            loss_fn=nn.NLLLoss,
        ),
        "inner-softmax": dict(
            model_fn=lambda: nn.Sequential(
                nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
            ),
            input_fn=lambda: torch.randn(N, 4) * 2,
            target_fn=_labels(3),
            loss_fn=nn.CrossEntropyLoss,
        ),
        "linear-on-sequence": dict(
            model_fn=lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)),
            input_fn=lambda: torch.randn(N, 3, 4),
            target_fn=lambda: torch.randn(N, 3, 2),
            loss_fn=nn.MSELoss,
        ),
    }
)

# Losses, each on the same small tanh network (outputs 3).
LOSSES = {
    "ce-mean": (nn.CrossEntropyLoss, _labels(3)),
    "ce-sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), _labels(3)),
    "ce-weight-smoothing-ignore": (
        lambda: nn.CrossEntropyLoss(
            weight=torch.tensor([0.3, 1.0, 2.0]), label_smoothing=0.1, ignore_index=1
        ),
        lambda: torch.tensor([0, 1, 2]),
    ),
    "ce-probabilities": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 1.5]), label_smoothing=0.2),
        lambda: torch.softmax(torch.randn(N, 3), 1),
    ),
    "mse-mean": (nn.MSELoss, lambda: torch.randn(N, 3)),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), lambda: torch.randn(N, 3)),
    "bce-logits-multilabel": (
        lambda: nn.BCEWithLogitsLoss(
            weight=torch.tensor([1.0, 0.5, 2.0]), pos_weight=torch.tensor([2.0, 1.0, 0.5])
        ),
        lambda: torch.randint(0, 2, (N, 3)).double(),
    ),
    "bce-logits-sum-soft": (
        lambda: nn.BCEWithLogitsLoss(reduction="sum"),
        lambda: torch.rand(N, 3),
    ),
    "nll-after-logsoftmax": (nn.NLLLoss, _labels(3)),
}
for _name, (_loss, _target) in LOSSES.items():
    CASES[f"loss-{_name}"] = dict(
        model_fn=(
            (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(1)))
            if _name.startswith("nll")
            else _mlp(nn.Tanh)
        ),
        input_fn=lambda: torch.randn(N, 4),
        target_fn=_target,
        loss_fn=_loss,
    )


def build(case: dict, device="cpu", dtype=torch.float64, seed=0):
    """Instantiate a case: ``(model, loss_fn, inputs, target)``."""
    torch.manual_seed(seed)
    model = case["model_fn"]()
    inputs = case["input_fn"]()
    model(inputs)  # materialise lazy layers
    model = model.to(device=device, dtype=dtype)
    target = case["target_fn"]()
    if target.is_floating_point():
        target = target.to(dtype)
    loss_fn = case["loss_fn"]().to(device=device, dtype=dtype)
    return model, loss_fn, inputs.to(device=device, dtype=dtype), target.to(device)
