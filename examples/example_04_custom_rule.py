"""
A rule for your own layer
=========================

A layer the engine does not know is refused by name. One call registers its rule: a pure
function of what the module saw (input, output, gradient and curvature at the output) that
returns the curvature at its input and the estimates of its parameters. Here
``y = c ⊙ x``: ``ŝ_x = c² ⊙ ŝ_y`` and ``ŝ_c = Σ_batch x² ⊙ ŝ_y``, checked against the exact
diagonal.
"""

import torch

import hesscale
from hesscale.reference import exact_hessian_diagonal


class Scale(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.c = torch.nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return self.c * x


def scale_rule(ctx):
    s = ctx.curvature_output
    return hesscale.Backprop(s * ctx.module.c**2, {"c": (s * ctx.input**2).sum(0)})


hesscale.register_rule(Scale, scale_rule)

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(4, 6), Scale(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
).double()
x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
loss_fn = torch.nn.CrossEntropyLoss()
_, diag = hesscale.diagonal(model, loss_fn, x, y)
exact = exact_hessian_diagonal(model, loss_fn, x, y)
print("registered layer types include Scale:", "Scale" in hesscale.supported_types())
print(
    "relative error of c:",
    float((diag["1.c"] - exact["1.c"]).abs().sum() / exact["1.c"].abs().sum()),
)
